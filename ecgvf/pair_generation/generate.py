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
    backends = [backends] if hasattr(backends, "complete") else list(backends or [])
    if not backends:
        raise ValueError("no backends: give at least one (TemplateBackend() works offline)")
    integers = (("n_pairs", n_pairs, 1), ("retries", retries, 0), ("pairs_per_request", pairs_per_request, 1),
                ("max_tokens", max_tokens, 1), ("patience", patience, 1), ("max_failed_requests", max_failed_requests, 1))
    for name, value, least in integers:
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
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

    per_backend = {label: {"backend": backend.name, "model": backend.model, "requests": 0, "attempts": 0,
                           "received": 0, "valid": 0, "rejected": {}, "malformed_replies": 0, "salvaged_replies": 0,
                           "backend_errors": 0, "errors": [], "malformed_example": None, "retired": False}
                   for label, backend in zip(labels, backends)}
    failed_in_a_row = dict.fromkeys(labels, 0)
    accepted, rejected_pairs, seen = [], [], set()
    requests, stale_rounds, round_index, stopped = 0, 0, 0, None

    from tqdm.auto import tqdm

    bar = tqdm(total=n_pairs, desc=f"pairs for {concept!r}", unit="pair", disable=not progress, file=sys.stderr)
    try:
        while stopped is None:
            found_before = len(accepted)
            for label, backend in zip(labels, backends):
                counts = per_backend[label]
                if counts["retired"]:
                    continue
                if len(accepted) >= n_pairs:
                    break
                if requests >= max_requests:
                    break
                requests += 1
                counts["requests"] += 1
                request_index = counts["requests"] - 1
                for attempt in range(retries + 1):
                    call_seed = request_seed(seed, label, request_index, attempt)
                    counts["attempts"] += 1
                    try:
                        reply = backend.complete(messages, seed=call_seed, temperature=temperature,
                                                 max_tokens=max_tokens)
                    except Exception as error:  # noqa: BLE001 - a failing backend must not end the run
                        counts["backend_errors"] += 1
                        message = str(error) if isinstance(error, BackendError) else f"{type(error).__name__}: {error}"
                        if message not in counts["errors"] and len(counts["errors"]) < 5:
                            counts["errors"].append(message)
                        continue
                    try:
                        items, salvaged = extract_pair_list(reply)
                    except MalformedReply as error:
                        counts["malformed_replies"] += 1
                        if counts["malformed_example"] is None:
                            counts["malformed_example"] = f"{error}: {short_text(str(reply))}"
                        continue
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
                    bar.update(min(len(good), max(0, n_pairs - bar.n)))
                    failed_in_a_row[label] = 0
                    break
                else:  # every attempt failed
                    failed_in_a_row[label] += 1
                    if failed_in_a_row[label] >= max_failed_requests:
                        counts["retired"] = True
            round_index += 1
            stale_rounds = 0 if len(accepted) > found_before else stale_rounds + 1
            if len(accepted) >= n_pairs:
                stopped = "enough pairs"
            elif all(counts["retired"] for counts in per_backend.values()):
                stopped = f"every backend retired after {max_failed_requests} failed requests in a row"
            elif requests >= max_requests:
                stopped = f"request budget spent ({max_requests} requests)"
            elif stale_rounds >= patience:
                stopped = f"no new pair in {patience} rounds"
    finally:
        bar.close()

    rejected_by_reason = {}
    for counts in per_backend.values():
        for reason, number in counts["rejected"].items():
            rejected_by_reason[reason] = rejected_by_reason.get(reason, 0) + number
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
    files = {path: encode_utf8("\n".join(lines) + "\n", path)}
    check_outputs(path, force=force, summary=summary is not None)
    if summary is not None:
        # backslashreplace writes a lone surrogate in a string as its JSON escape (\ud800), which
        # reads back as the same string: the summary is a record of what came back, kept whole.
        text = json.dumps(summary, ensure_ascii=False, indent=1) + "\n"
        files[summary_path(path)] = text.encode("utf-8", "backslashreplace")
    write_files_atomic(files)
    return path
