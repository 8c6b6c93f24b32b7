"""Prompt pairs: a prompt that shows the concept to erase, and its anchor (replacement) prompt.

The trainer samples images under the concept prompt and teaches the model to draw them as it
would under the anchor prompt (DESIGN.md, "The method"). Pairs come from a concept and an anchor
put into templates, or from a file: earkit's own JSON lines, or the files released with the EAR
paper (shared/ear-data), whose key names are read as they are:

    pairs.jsonl          {"concept_prompt": ..., "anchor_prompt": ..., "concept": ..., "anchor": ...} per line
    train_church.json    [{original_prompt, modified_prompt, concept, replaced}, ...]
    train_nudity.json    [{unsafe_prompt, safe_prompt, concept, category}, ...]
    train_van_gogh.csv   unsafe_prompt,safe_prompt

Every error names the file and the line (for a JSON list, the entry and the line it starts on).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from earkit.io import (
    ANCHOR_PROMPT_KEYS, CONCEPT_PROMPT_KEYS, check_new_files, csv_header, csv_records, file_format, has_column,
    json_list_records, jsonl_records, pick_text, read_prompts, read_text_file, write_text_atomic,
)

# Key names per field, earkit's first, then the EAR files' (the same names in JSONL, JSON and CSV;
# the prompts' keys, CONCEPT_PROMPT_KEYS and ANCHOR_PROMPT_KEYS, are earkit.io's, shared with
# every prompt file). train_nudity.json's "category" ("sexual", ...) is not an anchor, so it is not read.
CONCEPT_KEYS = ("concept",)
ANCHOR_KEYS = ("anchor", "replaced")

# The prompts pairs_from_concept writes when no templates are given: plain English phrasings for
# a general text-to-image model such as Janus-Pro. A model of a small vocabulary (a word-level
# tokenizer) is given templates in its own words (a pairs file, or `templates=`; ShapesWorld's
# default erasure builds its pairs from its own templates).
DEFAULT_TEMPLATES = (
    "{}",
    "a {}",
    "a photo of a {}",
    "a picture of a {}",
    "an image of a {}",
    "a painting of a {}",
    "a close-up photo of the {}",
    "a detailed drawing of a {}",
)


@dataclass(frozen=True)
class PromptPair:
    concept_prompt: str  # shows the concept to erase
    anchor_prompt: str  # what the model should draw instead
    concept: str | None = None
    anchor: str | None = None


def same_text(a: str, b: str) -> bool:
    """Equal up to case and whitespace: such a pair teaches nothing."""
    return " ".join(a.split()).casefold() == " ".join(b.split()).casefold()


def deduplicate(pairs: list[PromptPair]) -> list[PromptPair]:
    """Drop exact repeats, keeping the first of each, in order."""
    return list(dict.fromkeys(pairs))


def pairs_from_concept(concept: str, anchor: str, templates: list[str] | None = None) -> list[PromptPair]:
    """One pair per template: the template with the concept, and with the anchor, in place of "{}"."""
    for name, value in (("concept", concept), ("anchor", anchor)):
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{name} must be a non-empty word or phrase, got {value!r}")
    concept, anchor = concept.strip(), anchor.strip()
    if same_text(concept, anchor):
        raise ValueError(f"concept and anchor are the same ({concept!r} and {anchor!r}): the anchor must be "
                         "what the model draws instead of the concept")
    if isinstance(templates, str):
        raise ValueError(f"templates must be a list of strings, got the single string {templates!r}")
    templates = DEFAULT_TEMPLATES if templates is None else list(templates)
    if not templates:
        raise ValueError("templates is empty")
    for template in templates:
        if not isinstance(template, str) or "{}" not in template:
            raise ValueError(f"template {template!r} has no '{{}}' where the concept goes")
    pairs = [PromptPair(template.replace("{}", concept).strip(), template.replace("{}", anchor).strip(),
                        concept, anchor) for template in templates]
    return deduplicate(pairs)


# ---------------------------------------------------------------- reading files


class EvaluationPromptFile(ValueError):
    """A prompt file (records with a single "prompt", like the EAR test_*.json/csv) where prompt
    pairs were expected: eval --benchmark reads such a file as its target prompts instead."""


def pair_from_record(record, where: str) -> PromptPair:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected an object with a concept prompt and an anchor prompt, got "
                         f"{type(record).__name__}")
    concept_prompt = pick_text(record, CONCEPT_PROMPT_KEYS, where)
    anchor_prompt = pick_text(record, ANCHOR_PROMPT_KEYS, where)
    if concept_prompt is None and anchor_prompt is None and "prompt" in record:
        raise EvaluationPromptFile(f"{where}: has no anchor prompts, only a single 'prompt': this is an evaluation "
                                   "prompt file (like the EAR test_*.json/csv), not concept/anchor pairs for training")
    if concept_prompt is None:
        raise ValueError(f"{where}: missing the concept prompt (one of {', '.join(CONCEPT_PROMPT_KEYS)})")
    if anchor_prompt is None:
        raise ValueError(f"{where}: missing the anchor prompt (one of {', '.join(ANCHOR_PROMPT_KEYS)})")
    if same_text(concept_prompt, anchor_prompt):
        raise ValueError(f"{where}: the concept prompt and the anchor prompt are the same ({concept_prompt!r}); "
                         "a pair must differ")
    return PromptPair(concept_prompt, anchor_prompt, pick_text(record, CONCEPT_KEYS, where),
                      pick_text(record, ANCHOR_KEYS, where))


def pair_csv_records(path: Path, text: str):
    """(where, record) per row of a pairs CSV, as train_van_gogh.csv is: a concept prompt and an
    anchor prompt column."""
    header = csv_header(text)
    if "prompt" in header and not has_column(header, CONCEPT_PROMPT_KEYS + ANCHOR_PROMPT_KEYS):
        raise EvaluationPromptFile(f"{path} line 1: has no anchor prompts, only a 'prompt' column ({','.join(header)}): "
                                   "this is an evaluation prompt file, not concept/anchor pairs for training")
    return csv_records(path, text, ((CONCEPT_PROMPT_KEYS, "concept prompt"), (ANCHOR_PROMPT_KEYS, "anchor prompt")))


def load_pairs(path: str | os.PathLike) -> list[PromptPair]:
    """Read prompt pairs from a .jsonl, .json or .csv file (see the module docstring), stripped and
    without exact repeats. ValueError naming the file and line for anything wrong in it
    (EvaluationPromptFile for a file of single prompts)."""
    path = Path(path).expanduser()
    text = read_text_file(path, "prompt pair file")
    kind = file_format(path, text)
    if kind is None:
        raise ValueError(f"{path}: unknown prompt pair file format (expected .jsonl, .json or .csv)")
    records = {"jsonl": jsonl_records, "json": json_list_records, "csv": pair_csv_records}[kind]
    pairs = [pair_from_record(record, where) for where, record in records(path, text)]
    if not pairs:
        raise ValueError(f"{path} holds no prompt pairs")
    return deduplicate(pairs)


def load_prompts(path: str | os.PathLike) -> list[str]:
    """Prompts whose images an erasure must keep (the trainer's `preserve`), read as every prompt
    file is (earkit.io.read_prompt_records: a text file of one prompt per line, records with a
    "prompt" like the EAR test files, or prompt pairs, whose anchor prompts are read). Stripped and
    without exact repeats; ValueError naming the file and line for anything wrong."""
    return list(dict.fromkeys(read_prompts(path, "prompt file")))


# ---------------------------------------------------------------- writing


def write_pairs_jsonl(pairs: list[PromptPair], path: str | os.PathLike, *, force: bool = False) -> Path:
    """Write pairs as JSON lines that load_pairs reads back equal. Atomic: a temporary file beside
    `path`, flushed to disk, then renamed over it; an existing file is replaced only with force."""
    pairs = list(pairs)
    if not pairs:
        raise ValueError("no pairs to write")
    lines = []
    for index, pair in enumerate(pairs):
        if not isinstance(pair, PromptPair):
            raise ValueError(f"pairs[{index}] is a {type(pair).__name__}, not a PromptPair")
        if not pair.concept_prompt.strip() or not pair.anchor_prompt.strip():
            raise ValueError(f"pairs[{index}] has an empty prompt: {pair}")
        if same_text(pair.concept_prompt, pair.anchor_prompt):
            raise ValueError(f"pairs[{index}]: the concept prompt and the anchor prompt are the same: {pair}")
        record = {"concept_prompt": pair.concept_prompt.strip(), "anchor_prompt": pair.anchor_prompt.strip()}
        record.update({key: value for key, value in (("concept", pair.concept), ("anchor", pair.anchor)) if value})
        lines.append(json.dumps(record, ensure_ascii=False))

    path = Path(path).expanduser()
    check_new_files([path], force=force, what="pairs file")
    return write_text_atomic(path, "\n".join(lines) + "\n")


