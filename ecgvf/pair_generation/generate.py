"""The generation loop: ask the backends in turn for pairs until enough valid distinct ones are
in (generate_pairs), and write them with their summary (write_generated).

Nothing a backend says can crash a run: a reply without a JSON list of pairs is retried with
another seed, then dropped and counted as malformed; a backend failure (HTTP error, timeout,
non-JSON body, an exception in generation) is counted the same way; every pair that fails
validation is kept in the summary with its reason.

Each written line is earkit's pairs JSONL (concept_prompt, anchor_prompt, concept, anchor), so
`earkit.engine.pair_files.load_pairs` reads it, plus provenance: backend, model, template, seed, attempt.
"""

from __future__ import annotations

import json
import math
import random
import sys
from pathlib import Path

from earkit.io import check_new_files, encode_utf8, parse_json, unencodable, write_files_atomic

from .backends import BackendError
from .parsing import (DEFAULT_MIN_SIMILARITY, MalformedReply, concept_pattern, extract_pair_list, short_text,
                      validate_items)
from .prompt import TEMPLATE, check_concept, pair_request_messages, word_list


def request_seed(seed: int, backend_label: str, request: int, attempt: int) -> int:
    """A seed per (run seed, backend, request, attempt): a retry asks again with another seed, and
    the same run seed asks the same questions."""
    return random.Random(f"{seed}/{backend_label}/{request}/{attempt}").randrange(2**31)


def _backend_labels(backends) -> list[str]:
    labels, used = [], {}
    for backend in backends:
        for attribute in ("name", "model"):
            if not isinstance(getattr(backend, attribute, None), str):
                raise ValueError(f"backend {backend!r} has no string {attribute!r}")
        if not callable(getattr(backend, "complete", None)):
            raise ValueError(f"backend {backend!r} has no complete(messages, *, seed, temperature, max_tokens)")
        label = f"{backend.name}:{backend.model}"
        used[label] = used.get(label, 0) + 1
        labels.append(label if used[label] == 1 else f"{label}#{used[label]}")
    return labels


def generate_pairs(concept: str, *, backends, n_pairs: int, seed: int = 0, retries: int = 2, anchors=None,
                   progress: bool = True, style_hints=None, examples=None, pairs_per_request: int = 20,
                   temperature: float = 0.7, max_tokens: int = 2048, min_similarity: float = DEFAULT_MIN_SIMILARITY,
                   max_requests: int | None = None, patience: int = 3,
                   max_failed_requests: int = 3) -> tuple[list[dict], dict]:
    """Ask the backends, in turn, for pairs for `concept` until `n_pairs` valid distinct ones are in.

    Each request asks one backend for `pairs_per_request` pairs through pair_request_messages
    (anchors are the candidates offered). A malformed reply or a backend error is
    retried up to `retries` times with another seed, then the request is given up; a backend whose
    last `max_failed_requests` requests all failed is retired. The run stops when it has n_pairs,
    when every backend is retired, after `max_requests` requests (default: 3 per 20 pairs wanted
    per backend, at least 5 per backend), or after `patience` rounds without a new pair.

    Returns (pairs, summary): at most n_pairs records {concept_prompt, anchor_prompt, concept,
    anchor, backend, model, template, seed, attempt}, and counts of everything that happened.
    """
    concept = check_concept(concept)
    backends = check_run_arguments(backends, (
        ("n_pairs", n_pairs, 1), ("retries", retries, 0), ("pairs_per_request", pairs_per_request, 1),
        ("max_tokens", max_tokens, 1), ("patience", patience, 1), ("max_failed_requests", max_failed_requests, 1)),
        temperature, "TemplateBackend() works offline")
    if not 0.0 <= min_similarity <= 1.0:
        raise ValueError(f"min_similarity must be in [0, 1], got {min_similarity!r}")
    anchors = word_list(anchors, "anchors")
    for anchor in anchors:
        if concept_pattern(concept).search(anchor):
            raise ValueError(f"anchor {anchor!r} contains the concept {concept!r}: it would stay in the anchor prompt")
    labels = _backend_labels(backends)
    if max_requests is None:
        max_requests = len(backends) * max(5, 3 * math.ceil(n_pairs / pairs_per_request))
    messages = pair_request_messages(concept, count=pairs_per_request, anchors=anchors,
                                     style_hints=style_hints, examples=examples)

    accepted, rejected_pairs, seen = [], [], set()

    def take(backend, label, counts, parsed, call_seed, attempt) -> None:
        items, salvaged = parsed
        counts["salvaged_replies"] += salvaged
        counts["received"] += len(items)
        good, bad = validate_items(items, concept, seen=seen, min_similarity=min_similarity)
        for pair in good:
            accepted.append({
                "concept_prompt": pair["concept_prompt"], "anchor_prompt": pair["anchor_prompt"],
                "concept": concept, "anchor": pair["anchor"], "backend": backend.name,
                "model": backend.model, "template": TEMPLATE, "seed": call_seed, "attempt": attempt,
            })
        for pair in bad:
            counts["rejected"][pair["reason"]] = counts["rejected"].get(pair["reason"], 0) + 1
            rejected_pairs.append({**pair, "backend": label, "seed": call_seed, "attempt": attempt})
        counts["valid"] += len(good)

    run = ask_backends(backends, labels, messages, wanted=n_pairs, found=lambda: len(accepted), take=take,
                       parse=extract_pair_list, things="pairs", desc=f"pairs for {concept!r}", progress=progress,
                       seed=seed, retries=retries, temperature=temperature, max_tokens=max_tokens,
                       max_requests=max_requests, patience=patience, max_failed_requests=max_failed_requests,
                       counts_extra={"salvaged_replies": 0})
    per_backend, requests, round_index, stopped = run

    rejected_by_reason = rejections_by_reason(per_backend)
    summary = {
        "concept": concept, "template": TEMPLATE, "seed": seed, "requested": n_pairs,
        "returned": min(n_pairs, len(accepted)),  # the pairs given back (the first n_pairs valid ones)
        "valid": len(accepted), "received": sum(c["received"] for c in per_backend.values()),
        "rejected": rejected_by_reason, "malformed_replies": sum(c["malformed_replies"] for c in per_backend.values()),
        "backend_errors": sum(c["backend_errors"] for c in per_backend.values()),
        "requests": requests, "rounds": round_index, "stopped": stopped, "anchors": anchors,
        "settings": {"retries": retries, "pairs_per_request": pairs_per_request, "temperature": temperature,
                     "max_tokens": max_tokens, "min_similarity": min_similarity, "max_requests": max_requests,
                     "patience": patience, "max_failed_requests": max_failed_requests},
        "per_backend": per_backend, "rejected_pairs": rejected_pairs,
    }
    return accepted[:n_pairs], summary


def ask_backends(backends, labels, messages, *, wanted: int, found, take, parse, things: str, desc: str,
                 progress: bool, seed: int, retries: int, temperature: float, max_tokens: int, max_requests: int,
                 patience: int, max_failed_requests: int, counts_extra=None) -> tuple[dict, int, int, str]:
    """The loop both generators run: rounds in which each backend not retired is asked once
    (ask_with_retries; a reply parse() accepts goes to take(backend, label, counts, parsed,
    call_seed, attempt)), until found() reaches `wanted` or stop_reason says why not.
    Returns (per-backend counts, requests, rounds, the stop reason)."""
    from tqdm.auto import tqdm

    per_backend = backend_counts(labels, backends, **(counts_extra or {}))
    failed_in_a_row = dict.fromkeys(labels, 0)
    requests, stale_rounds, rounds, stopped = 0, 0, 0, None
    bar = tqdm(total=wanted, desc=desc, unit=things.rstrip("s"), disable=not progress, file=sys.stderr)
    try:
        while stopped is None:
            found_before = found()
            for label, backend in zip(labels, backends):
                counts = per_backend[label]
                if counts["retired"]:
                    continue
                if found() >= wanted or requests >= max_requests:
                    break
                requests += 1
                answer = ask_with_retries(backend, label, counts, messages, seed=seed, retries=retries,
                                          temperature=temperature, max_tokens=max_tokens, parse=parse)
                note_request(failed_in_a_row, label, counts, answered=answer is not None,
                             max_failed_requests=max_failed_requests)
                if answer is not None:
                    take(backend, label, counts, *answer)
                    bar.update(min(found(), wanted) - bar.n)
            rounds += 1
            stale_rounds = 0 if found() > found_before else stale_rounds + 1
            stopped = stop_reason(things, found(), wanted, per_backend, requests, max_requests, stale_rounds,
                                  patience, max_failed_requests)
    finally:
        bar.close()
    return per_backend, requests, rounds, stopped


def check_run_arguments(backends, integers, temperature, offline_hint: str) -> list:
    """The backends as a list, once the integers ((name, value, least), ...) and the temperature
    are checked: ValueError naming the first that is wrong."""
    backends = [backends] if hasattr(backends, "complete") else list(backends or [])
    if not backends:
        raise ValueError(f"no backends: give at least one ({offline_hint})")
    for name, value, least in integers:
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    return backends


def backend_counts(labels, backends, **extra) -> dict:
    """{label: the counts a run keeps of one backend}, starting at zero (`extra`: more of them)."""
    return {label: {"backend": backend.name, "model": backend.model, "requests": 0, "attempts": 0, "received": 0,
                    "valid": 0, "rejected": {}, "malformed_replies": 0, **extra, "backend_errors": 0, "errors": [],
                    "malformed_example": None, "retired": False}
            for label, backend in zip(labels, backends)}


def ask_with_retries(backend, label: str, counts: dict, messages, *, seed: int, retries: int, temperature: float,
                     max_tokens: int, parse):
    """One request to one backend: up to retries + 1 attempts, each with its own seed, until a
    reply parse() accepts. Returns (parsed, call_seed, attempt), or None when every attempt failed.
    `counts` (the backend's) records the request, the attempts, the backend errors (the first five
    messages) and the malformed replies (the first one shown): a failing backend never ends a run."""
    counts["requests"] += 1
    for attempt in range(retries + 1):
        call_seed = request_seed(seed, label, counts["requests"] - 1, attempt)
        counts["attempts"] += 1
        try:
            reply = backend.complete(messages, seed=call_seed, temperature=temperature, max_tokens=max_tokens)
        except Exception as error:  # noqa: BLE001 - a failing backend must not end the run
            counts["backend_errors"] += 1
            message = str(error) if isinstance(error, BackendError) else f"{type(error).__name__}: {error}"
            message = short_text(message, 400)
            if message not in counts["errors"] and len(counts["errors"]) < 5:
                counts["errors"].append(message)
            continue
        try:
            parsed = parse(reply)
        except MalformedReply as error:
            counts["malformed_replies"] += 1
            if counts["malformed_example"] is None:
                counts["malformed_example"] = f"{error}: {short_text(str(reply))}"
            continue
        return parsed, call_seed, attempt
    return None


def note_request(failed_in_a_row: dict, label: str, counts: dict, *, answered: bool, max_failed_requests: int) -> None:
    """A backend whose last max_failed_requests requests all failed is retired."""
    failed_in_a_row[label] = 0 if answered else failed_in_a_row[label] + 1
    if failed_in_a_row[label] >= max_failed_requests:
        counts["retired"] = True


def stop_reason(things: str, found: int, wanted: int, per_backend: dict, requests: int, max_requests: int,
                stale_rounds: int, patience: int, max_failed_requests: int) -> str | None:
    """Why a round of requests ends the run (None: ask again); `things` names what is asked for."""
    if found >= wanted:
        return f"enough {things}"
    if all(counts["retired"] for counts in per_backend.values()):
        return f"every backend retired after {max_failed_requests} failed requests in a row"
    if requests >= max_requests:
        return f"request budget spent ({max_requests} requests)"
    if stale_rounds >= patience:
        return f"no new {things.rstrip('s')} in {patience} rounds"
    return None


def rejections_by_reason(per_backend: dict) -> dict:
    """Every backend's rejection counts added up by reason."""
    totals = {}
    for counts in per_backend.values():
        for reason, number in counts["rejected"].items():
            totals[reason] = totals.get(reason, 0) + number
    return totals


# ---------------------------------------------------------------- writing


def summary_path(path) -> Path:
    """Where write_generated puts the summary beside a pairs file: pairs.jsonl -> pairs.summary.json."""
    path = Path(path).expanduser()
    return path.with_name(path.stem + ".summary.json")


def is_pairs_summary(path: Path) -> bool:
    """A summary that `earkit pairs` wrote: a JSON object with its concept, template and counts."""
    try:
        record = parse_json(path.read_text(encoding="utf-8"), str(path))
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and {"concept", "template", "requested", "valid"} <= set(record)


def check_outputs(path, *, force: bool, summary: bool = True) -> None:
    """Refuse to write over the pairs file without force, and over the summary beside it (a name
    the user never typed) unless earkit pairs wrote it, force or not."""
    path = Path(path).expanduser()
    paths = [path, summary_path(path)] if summary else [path]
    check_new_files(paths, force=force, what="pairs file", derived={summary_path(path): is_pairs_summary})


def write_generated(pairs, path, *, force: bool = False, summary: dict | None = None) -> Path:
    """Write generated pairs as JSON lines (load_pairs reads them); with `summary`, it goes beside
    them as <stem>.summary.json. Both or neither: everything is turned into bytes first, then the
    files are written atomically together (a summary never claims pairs that are not there, and a
    rerun is never refused over half an output). An existing file is replaced only with force."""
    pairs = list(pairs)
    if not pairs:
        raise ValueError("no pairs to write")
    path = Path(path).expanduser()
    lines = []
    for index, pair in enumerate(pairs):
        if not isinstance(pair, dict) or not all(isinstance(pair.get(key), str) and pair[key].strip()
                                                 for key in ("concept_prompt", "anchor_prompt")):
            raise ValueError(f"pairs[{index}] is not a generated pair with concept_prompt and anchor_prompt: {pair!r}")
        line = json.dumps(pair, ensure_ascii=False)
        bad = unencodable(line)
        if bad is not None:  # validate_items rejects these; a pair made elsewhere may still hold one
            raise ValueError(f"pairs[{index}] holds the lone surrogate {ascii(bad)}, which is not valid Unicode and "
                             f"cannot be written as UTF-8: {short_text(line)} (nothing written)")
        lines.append(line)
    return write_lines_with_summary(path, lines, summary,
                                    check=lambda: check_outputs(path, force=force, summary=summary is not None))


def write_lines_with_summary(path: Path, lines: list[str], summary: dict | None, *, check) -> Path:
    """JSON lines at `path` and, given, the summary beside it (summary_path), both or neither:
    everything is turned into bytes first, then check() (the outputs may be written), then the
    files are written atomically together."""
    files = {path: encode_utf8("\n".join(lines) + "\n", path)}
    check()
    if summary is not None:
        # backslashreplace writes a lone surrogate in a string as its JSON escape (\ud800), which
        # reads back as the same string: the summary is a record of what came back, kept whole.
        text = json.dumps(summary, ensure_ascii=False, indent=1) + "\n"
        files[summary_path(path)] = text.encode("utf-8", "backslashreplace")
    write_files_atomic(files)
    return path
