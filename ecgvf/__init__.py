"""earkit.ecgvf: the ECGVF benchmark (in progress): the prompt-pair generator so far."""

from .pairs import (
    BackendError,
    OpenAIChatBackend,
    TemplateBackend,
    TransformersBackend,
    add_pairs_arguments,
    check_pair,
    extract_pair_list,
    generate_pairs,
    load_examples,
    pair_request_messages,
    run_pairs,
    validate_items,
    write_generated,
)

__all__ = [
    "generate_pairs", "write_generated", "pair_request_messages", "load_examples",
    "TemplateBackend", "OpenAIChatBackend", "TransformersBackend", "BackendError",
    "extract_pair_list", "check_pair", "validate_items", "add_pairs_arguments", "run_pairs",
]
