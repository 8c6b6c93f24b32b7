"""`earkit pairs`: generate concept/anchor prompt pairs (ECGVF) with earkit.ecgvf.pair_generation,
from backends named on the command line: template, openai (with --openai-url and --openai-model),
transformers:FOLDER. With --paraphrase: prompts that show the concept without naming it (the
paraphrase attack). add_backend_arguments and backends_from_args are shared with other commands
that ask the same backends."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from earkit.cli.arguments import check_count
from earkit.ecgvf.images import resolve_model
from earkit.ecgvf.pair_generation import (
    OpenAIChatBackend, TemplateBackend, TransformersBackend, generate_pairs, generate_paraphrases, load_examples,
    model_prompt_vocabulary, summary_path, write_generated, write_paraphrases,
)
from earkit.ecgvf.pair_generation.backends import check_timeout
from earkit.ecgvf.pair_generation.generate import check_outputs
from earkit.ecgvf.pair_generation.paraphrase import check_paraphrase_outputs
from earkit.ecgvf.pair_generation.parsing import DEFAULT_MIN_SIMILARITY

BACKEND_FORMS = "template | openai | transformers:FOLDER"
OPENAI_EXAMPLE = "--backend openai --openai-url http://127.0.0.1:8000/v1 --openai-model qwen2.5-7b"


def parse_backend(spec: str, *, timeout: float = 120.0, api_key: str | None = None, device: str = "cpu",
                  openai_url: str | None = None, openai_model: str | None = None, vocabulary: dict | None = None):
    """A backend from its command-line form: "template" (with the prompt `vocabulary`, if any),
    "openai" (the server at `openai_url`, asked for `openai_model`), "transformers:FOLDER"."""
    if spec == "template":
        return TemplateBackend(vocabulary)
    if spec == "openai":
        if not openai_url or not openai_model:
            raise ValueError(f"--backend openai needs --openai-url URL and --openai-model MODEL, e.g. {OPENAI_EXAMPLE}")
        return OpenAIChatBackend(openai_url, openai_model, api_key=api_key, timeout=timeout)
    kind, _, rest = spec.partition(":")
    if kind == "openai":
        raise ValueError(f"--backend {spec!r}: the server is given by its own flags now: {OPENAI_EXAMPLE}")
    if kind in ("transformers", "hf") and rest:
        return TransformersBackend(rest, device=device)
    raise ValueError(f"--backend {spec!r}: expected one of {BACKEND_FORMS}")


def openai_servers(specs: list[str], urls: list[str] | None, models: list[str] | None) -> list[tuple[str, str]]:
    """(url, model) for each `--backend openai`, in order: the n-th takes the n-th --openai-url and
    the n-th --openai-model. ValueError, in one line, when the counts differ."""
    wanted, urls, models = specs.count("openai"), list(urls or []), list(models or [])
    if not wanted and (urls or models):
        given = " and ".join(flag for flag, values in (("--openai-url", urls), ("--openai-model", models)) if values)
        raise ValueError(f"{given} given without --backend openai: add it, e.g. {OPENAI_EXAMPLE}")
    if wanted and (not urls or not models):
        raise ValueError(f"--backend openai needs --openai-url URL and --openai-model MODEL, e.g. {OPENAI_EXAMPLE}")
    if len(urls) != wanted or len(models) != wanted:
        raise ValueError(f"--backend openai is given {wanted} time(s), --openai-url {len(urls)} and --openai-model "
                         f"{len(models)}: give one --openai-url and one --openai-model per --backend openai, in order")
    return list(zip(urls, models))


def template_vocabulary(model) -> dict | None:
    """The prompt vocabulary of --model (<model>/prompt_vocabulary.json), or None: the default
    model (the shipped generator) may have none, or be absent; a --model named must exist."""
    folder = Path(resolve_model(model)).expanduser()
    if not folder.is_dir():
        if model is None:
            return None
        raise FileNotFoundError(f"--model {model}: no such model folder")
    return model_prompt_vocabulary(folder)


def add_backend_arguments(parser: argparse.ArgumentParser, *, device: bool = True) -> None:
    """The flags that name the backends asked (backends_from_args reads them): --backend,
    --openai-url, --openai-model, --timeout, --api-key-env, and --device unless the command has its
    own (`device=False`; its --device then runs transformers backends too)."""
    parser.add_argument("--backend", action="append", default=None,
                        help=f"{BACKEND_FORMS}; repeatable, asked in turn (default: template). Each --backend openai "
                             "takes the next --openai-url and --openai-model, in order")
    parser.add_argument("--openai-url", action="append", default=None,
                        help="the OpenAI-compatible server's base URL, e.g. http://127.0.0.1:8000/v1 "
                             "(one per --backend openai)")
    parser.add_argument("--openai-model", action="append", default=None,
                        help="the model name that server serves (one per --backend openai)")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="seconds per HTTP request, all told: connect, headers, body (default: %(default)s)")
    parser.add_argument("--api-key-env", default="OPENAI_API_KEY",
                        help="environment variable holding the API key for openai backends (default: %(default)s)")
    if device:
        parser.add_argument("--device", default="cpu", help="device for transformers backends (default: %(default)s)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--concept", required=True, help="the concept the pairs replace (or the --paraphrase prompts describe), e.g. church or circle")
    add_backend_arguments(parser)
    parser.add_argument("--model", default=None,
                        help="model folder whose prompt_vocabulary.json the template backend composes with "
                             "(default: the shipped ShapesWorld generator; generic scene templates without one)")
    parser.add_argument("--paraphrase", action="store_true",
                        help="write paraphrase prompts instead of pairs: prompts that show the concept without "
                             "naming it (the paraphrase attack on an erasure), one JSON object a line with its \"prompt\"")
    parser.add_argument("--n", type=int, default=200, help="valid pairs (or prompts) wanted (default: %(default)s)")
    parser.add_argument("--out", required=True, help="pairs (or prompts) JSONL to write; the summary goes beside it")
    parser.add_argument("--anchor", action="append", default=None, help="an anchor candidate; repeatable")
    parser.add_argument("--style", action="append", default=None, help="a style hint for the prompts; repeatable")
    parser.add_argument("--examples", help="few-shot examples from a pairs file (e.g. the released EAR train_church.json)")
    parser.add_argument("--examples-limit", type=int, default=None,
                        help="how many examples to show (default: 3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--retries", type=int, default=2, help="retries of a malformed or failed reply (default: %(default)s)")
    parser.add_argument("--per-request", type=int, default=20,
                        help="pairs (or prompts) asked for per request (default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--max-tokens", type=int, default=2048)
    parser.add_argument("--min-similarity", type=float, default=None,
                        help="least token similarity of the two prompts without the concept/anchor "
                             f"(default: {DEFAULT_MIN_SIMILARITY})")
    parser.add_argument("--max-requests", type=int, default=None, help="request budget over all backends")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--force", action="store_true", help="replace an existing --out")


# backends_from_args' default: the template backend's vocabulary is that of --model
FROM_MODEL_FLAG = object()


def backends_from_args(args, *, vocabulary=FROM_MODEL_FLAG) -> list:
    """The backends the flags of add_backend_arguments name, checked in one line each before any
    request: devices, timeouts, one --openai-url and --openai-model per --backend openai. The
    template backend composes with `vocabulary` (a prompt vocabulary, or None), by default the
    prompt vocabulary of args.model (when the command has one)."""
    from earkit.engine.model import check_device

    specs = args.backend or ["template"]
    device = getattr(args, "device", None) or "cpu"
    if any(spec.startswith("transformers:") for spec in specs):
        check_device(device)
    check_timeout(args.timeout, "--timeout")  # for every backend: nan or 0 is a typo, whichever backend runs
    servers = iter(openai_servers(specs, args.openai_url, args.openai_model))
    if vocabulary is FROM_MODEL_FLAG:
        vocabulary = template_vocabulary(getattr(args, "model", None)) if "template" in specs else None
    api_key = os.environ.get(args.api_key_env) if args.api_key_env else None
    backends = []
    for spec in specs:
        url, model = next(servers) if spec == "openai" else (None, None)
        backends.append(parse_backend(spec, timeout=args.timeout, api_key=api_key, device=device,
                                      openai_url=url, openai_model=model, vocabulary=vocabulary))
    return backends


# Flags that shape pairs only: with --paraphrase they would be ignored, so they are refused.
PAIRS_ONLY_FLAGS = {"anchor": "--anchor", "min_similarity": "--min-similarity", "examples": "--examples",
                    "examples_limit": "--examples-limit", "style": "--style"}


def run(args) -> dict:
    """Generate, write the pairs (or, with --paraphrase, the paraphrase prompts) and their summary,
    print the summary's counts. ValueError when nothing valid came back (the summary is printed
    first, to say why)."""
    if args.paraphrase:
        return run_paraphrase(args)
    out = Path(args.out).expanduser()
    check_outputs(out, force=args.force)  # before asking anyone: a run can take hours of LLM time
    from earkit.io import check_writable

    check_writable(out, "--out")
    backends = backends_from_args(args)
    examples_limit = 3 if args.examples_limit is None else args.examples_limit
    if examples_limit < 0:
        raise ValueError(f"--examples-limit must be >= 0, got {examples_limit}")
    check_count(args.max_requests, "--max-requests")
    examples = load_examples(args.examples, examples_limit) if args.examples else None
    min_similarity = DEFAULT_MIN_SIMILARITY if args.min_similarity is None else args.min_similarity
    pairs, summary = generate_pairs(
        args.concept, backends=backends, n_pairs=args.n, seed=args.seed, retries=args.retries, anchors=args.anchor,
        progress=not args.quiet, style_hints=args.style, examples=examples, pairs_per_request=args.per_request,
        temperature=args.temperature, max_tokens=args.max_tokens, min_similarity=min_similarity,
        max_requests=args.max_requests)
    shown = {key: value for key, value in summary.items() if key != "rejected_pairs"}
    print(json.dumps(shown, indent=1, ensure_ascii=False))
    if not pairs:
        raise ValueError(f"no valid pairs for {summary['concept']!r} ({summary['stopped']}); nothing written")
    write_generated(pairs, out, force=args.force, summary=summary)
    print(f"wrote {len(pairs)} pairs to {out} (summary: {summary_path(out)})")
    return summary


def run_paraphrase(args) -> dict:
    """`earkit pairs --paraphrase`: prompts that show the concept without naming it, written as
    JSONL ({"prompt", "concept", "backend", "model", "template", "seed"} a line) with the summary
    beside it."""
    given = [flag for name, flag in PAIRS_ONLY_FLAGS.items() if getattr(args, name, None) is not None]
    if given:
        raise ValueError(f"{', '.join(given)} shape(s) pairs only, not --paraphrase prompts: leave them out")
    out = Path(args.out).expanduser()
    check_paraphrase_outputs(out, force=args.force)  # before asking anyone
    from earkit.io import check_writable

    check_writable(out, "--out")
    backends = backends_from_args(args)
    check_count(args.max_requests, "--max-requests")
    records, summary = generate_paraphrases(
        args.concept, backends=backends, n=args.n, seed=args.seed, retries=args.retries, progress=not args.quiet,
        temperature=args.temperature, max_tokens=args.max_tokens, max_requests=args.max_requests,
        prompts_per_request=args.per_request)
    shown = {key: value for key, value in summary.items() if key != "rejected_prompts"}
    print(json.dumps(shown, indent=1, ensure_ascii=False))
    if not records:
        errors = [f"{label}: {counts['errors'][0]}" for label, counts in summary["per_backend"].items()
                  if counts["errors"]]
        raise ValueError(f"no valid paraphrase prompts for {summary['concept']!r} ({summary['stopped']}"
                         + (f"; {errors[0]}" if errors else "") + "); nothing written")
    write_paraphrases(records, out, force=args.force, summary=summary)
    print(f"wrote {len(records)} paraphrase prompts to {out} (summary: {summary_path(out)})")
    return summary
