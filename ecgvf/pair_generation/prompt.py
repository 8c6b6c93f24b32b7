"""The request template: what every backend is asked, for one concept.

A system message (persona, rules, the output schema) and a user message (the objective, few-shot
examples, and the request as one machine-readable JSON line that the offline TemplateBackend
reads). The template asks for EAR's field names (original_prompt, modified_prompt, replaced),
which LLMs have seen; everything earkit keeps is named concept_prompt, anchor_prompt, anchor.
"""

from __future__ import annotations

import json

from earkit.io import unencodable

from .parsing import ANCHOR_KEYS, ANCHOR_PROMPT_KEYS, CONCEPT_PROMPT_KEYS, field, infer_anchor

TEMPLATE_NAME = "ecgvf-pairs"
TEMPLATE_VERSION = 1
TEMPLATE = f"{TEMPLATE_NAME}/v{TEMPLATE_VERSION}"  # recorded on every pair: bump it when the wording changes

# The marker of the machine-readable request line in the user message. LLMs read the prose around
# it; TemplateBackend reads only this line, so every backend gets the same messages.
REQUEST_MARKER = "Request (JSON): "

PERSONA = (
    "You are a careful data annotator for research on erasing concepts from text-to-image models. "
    "You write short, concrete, visual image-generation prompts and their minimally edited counterparts."
)

RULES = """Rules:
1. Each original prompt describes one picture and contains the concept word exactly as given (a plural is fine).
2. The modified prompt is the original prompt with only the concept word(s) replaced by the replacement; every other word stays the same, in the same order.
3. The modified prompt must not contain the concept, a synonym of it, or a part of it.
4. The replacement is a concrete, visually different thing that fits the same scene; it is recorded in "replaced".
5. Prompts are single sentences of 4 to 25 words. Vary scenes, settings, styles, viewpoints and replacements; never repeat a prompt.
6. Answer with the JSON list only: no prose, no explanation, no code fence."""

OUTPUT_SCHEMA = """Output format: a JSON list with one object per pair, each with exactly these string fields:
[{"original_prompt": "...", "modified_prompt": "...", "replaced": "..."}]"""

# Few-shot examples: the first two from EAR's released train_church.json, one in ShapesWorld's words.
DEFAULT_EXAMPLES = (
    {"concept_prompt": "The church is surrounded by a peaceful garden.",
     "anchor_prompt": "The cinema is surrounded by a peaceful garden.", "anchor": "cinema"},
    {"concept_prompt": "The grand church stands tall in the city center.",
     "anchor_prompt": "The grand skyscraper stands tall in the city center.", "anchor": "skyscraper"},
    {"concept_prompt": "a photo of a small red circle on a white background",
     "anchor_prompt": "a photo of a small red square on a white background", "anchor": "square"},
)


def as_template_example(example: dict) -> dict:
    """An example pair (earkit's names, or the template's) in the template's own field names."""
    return {"original_prompt": field(example, CONCEPT_PROMPT_KEYS), "modified_prompt": field(example, ANCHOR_PROMPT_KEYS),
            "replaced": field(example, ANCHOR_KEYS) or ""}


def pair_request_messages(concept: str, *, count: int = 20, anchors=None, style_hints=None,
                          examples=None) -> list[dict]:
    """The structured template filled for one concept: chat messages (system: persona, rules,
    output schema; user: objective, examples, the request as one JSON line). `anchors` are the
    replacement candidates offered; `examples` are pairs {concept_prompt, anchor_prompt, anchor}."""
    concept = check_concept(concept)
    if not isinstance(count, int) or count < 1:
        raise ValueError(f"count must be a positive integer, got {count!r}")
    anchors = word_list(anchors, "anchors")
    style_hints = word_list(style_hints, "style_hints")
    examples = list(DEFAULT_EXAMPLES if examples is None else examples)

    objective = (f'Objective: write {count} different pairs for the concept "{concept}". In each pair, the '
                 f'original prompt shows a "{concept}"; the modified prompt is the same sentence with '
                 f'"{concept}" replaced by something else.')
    lines = [objective]
    if anchors:
        lines.append("Choose each replacement from: " + ", ".join(anchors) + ".")
    if style_hints:
        lines.append("Style: " + "; ".join(style_hints) + ".")
    if examples:
        shown = [as_template_example(example) for example in examples]
        lines.append("Examples (for another concept or the same one; do not copy them):\n[\n"
                     + ",\n".join(json.dumps(example, ensure_ascii=False) for example in shown) + "\n]")
    request = {"concept": concept, "count": count, "replacement_candidates": anchors, "style_hints": style_hints}
    lines.append(REQUEST_MARKER + json.dumps(request, ensure_ascii=False))
    lines.append(f"Answer with the JSON list of {count} pairs only.")
    return [
        {"role": "system", "content": "\n\n".join([PERSONA, RULES, OUTPUT_SCHEMA])},
        {"role": "user", "content": "\n\n".join(lines)},
    ]


def load_examples(path, limit: int = 3) -> list[dict]:
    """Few-shot examples from a pairs file (earkit JSONL or a released EAR train_* file), read with
    earkit.engine.pair_files.load_pairs: the first `limit` pairs as {concept_prompt, anchor_prompt,
    anchor} (the anchor inferred where the file has none, "" where the concept was only deleted)."""
    from earkit.engine.pair_files import load_pairs

    examples = []
    for pair in load_pairs(path)[:limit]:
        anchor = pair.anchor
        if anchor is None and pair.concept:
            anchor = infer_anchor(pair.concept_prompt, pair.anchor_prompt, pair.concept)
        examples.append({"concept_prompt": pair.concept_prompt, "anchor_prompt": pair.anchor_prompt,
                         "anchor": anchor or ""})
    return examples


def check_concept(concept) -> str:
    """The concept with its whitespace normalised; ValueError when it is empty or not Unicode text."""
    if not isinstance(concept, str) or not concept.strip():
        raise ValueError(f"concept must be a non-empty word or phrase, got {concept!r}")
    check_unicode(concept, "concept")
    return " ".join(concept.split())


def check_unicode(text: str, what: str) -> None:
    # A lone surrogate (a command-line byte that is not UTF-8 arrives as one) would be written on
    # every pair and fail the write after the whole run: refuse it before the first request.
    bad = unencodable(text)
    if bad is not None:
        raise ValueError(f"{what} {ascii(text)} is not valid Unicode text (it holds {ascii(bad)}; not UTF-8 input?)")


def word_list(values, what: str) -> list[str]:
    """Distinct non-empty strings, whitespace normalised, in order; ValueError naming `what` otherwise."""
    if values is None:
        return []
    if isinstance(values, str):
        raise ValueError(f"{what} must be a list of strings, got the single string {values!r}")
    words = []
    for value in values:
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{what} holds {value!r}, not a non-empty string")
        check_unicode(value, f"{what} entry")
        words.append(" ".join(value.split()))
    return list(dict.fromkeys(words))
