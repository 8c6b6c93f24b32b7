"""The ECGVF prompt-pair generator: concept/anchor prompt pairs for a concept, asked of one or more
LLMs through one structured template, parsed, validated and written with their provenance.

EAR's benchmark builds its training pairs by asking LLMs for prompts that show a concept and the
same prompts with the concept replaced by an anchor ("A church on a hill overlooking the sea" ->
"A ground on a hill overlooking the sea"). Here:

    messages = pair_request_messages("church", count=20)          # the template, filled
    backends = [TemplateBackend(), OpenAIChatBackend("http://127.0.0.1:8000/v1", "qwen2.5-7b")]
    pairs, summary = generate_pairs("church", backends=backends, n_pairs=200)
    write_generated(pairs, "church.jsonl", summary=summary)

One story per module: `prompt` (the request template and its few-shot examples), `backends`
(TemplateBackend, OpenAIChatBackend, TransformersBackend, BackendError, the request deadline),
`parsing` (replies, check_pair, validate_items, rejection reasons), `generate` (generate_pairs,
seeds, write_generated, the summary file), `paraphrase` (prompts that show a concept without
naming it, for the paraphrase attack: generate_paraphrases, write_paraphrases, load_paraphrases);
the command `earkit pairs` (and `earkit pairs --paraphrase`) is earkit/cli/pairs.py.
"""

from .backends import (
    BackendError, OpenAIChatBackend, TemplateBackend, TransformersBackend, check_prompt_vocabulary,
    load_prompt_vocabulary, model_prompt_vocabulary,
)
from .generate import generate_pairs, summary_path, write_generated
from .parsing import (
    ANCHOR_MISSING, CONCEPT_IN_ANCHOR_PROMPT, CONCEPT_MISSING, DUPLICATE, IDENTICAL, INVALID_TEXT, MISSING_FIELD,
    NOT_AN_OBJECT, REJECTION_REASONS, REWRITTEN, MalformedReply, check_pair, extract_pair_list, validate_items,
)
from .paraphrase import (
    NAMES_CONCEPT, NOT_TEXT, PARAPHRASE_REJECTION_REASONS, PARAPHRASE_TEMPLATE, TOO_LONG, check_paraphrase,
    extract_prompt_list, generate_paraphrases, load_paraphrases, paraphrase_request_messages, write_paraphrases,
)
from .prompt import TEMPLATE, load_examples, pair_request_messages

__all__ = [
    "generate_pairs", "write_generated", "summary_path", "pair_request_messages", "load_examples", "TEMPLATE",
    "TemplateBackend", "OpenAIChatBackend", "TransformersBackend", "BackendError", "check_prompt_vocabulary",
    "load_prompt_vocabulary", "model_prompt_vocabulary", "extract_pair_list", "check_pair", "validate_items",
    "MalformedReply",
    "NOT_AN_OBJECT", "MISSING_FIELD", "INVALID_TEXT", "IDENTICAL", "CONCEPT_MISSING", "CONCEPT_IN_ANCHOR_PROMPT",
    "ANCHOR_MISSING", "REWRITTEN", "DUPLICATE", "REJECTION_REASONS",
    "generate_paraphrases", "write_paraphrases", "load_paraphrases", "paraphrase_request_messages",
    "PARAPHRASE_TEMPLATE", "extract_prompt_list", "check_paraphrase", "NOT_TEXT", "NAMES_CONCEPT", "TOO_LONG",
    "PARAPHRASE_REJECTION_REASONS",
]
