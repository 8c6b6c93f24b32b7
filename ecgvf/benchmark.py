"""ECGVF benchmarks: which prompts test the erasure, and which test that the rest survived.

A benchmark has the erased concept, its target prompts (they ask for the concept: after erasure
the judge should no longer see it) and preservation prompts (they ask for other things, each
optionally naming the concept it should show: after erasure the judge should still see it).
It is read from any of:

    pairs file      earkit pairs JSONL or a released EAR train_* file: target = the concept
                    prompts, preserve = the anchor prompts, each showing its anchor ("square")
    prompt file     an evaluation prompt list (EAR test_church.json, test_van_gogh.csv,
                    Six-CD_Nudity.csv; a .txt with one prompt a line; JSON(L) with "prompt"):
                    all target prompts; preservation prompts come from a second file
    benchmark JSONL {"prompt": ..., "role": "target" | "preserve", "concept": ...} per line
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from earkit.io import jsonl_records, parse_json, read_prompt_records, read_text_file, unencodable

ROLES = ("target", "preserve")


@dataclass(frozen=True)
class BenchmarkPrompt:
    prompt: str
    concept: str | None = None  # what the prompt should show (target prompts: the erased concept)


@dataclass
class Benchmark:
    concept: str
    target: list[BenchmarkPrompt]
    preserve: list[BenchmarkPrompt] = field(default_factory=list)
    source: str = ""
    kind: str = ""

    def anchors(self) -> list[str]:
        """The concepts the preservation prompts show, other than the erased one, in order: what
        an erasure draws instead (a pairs file's anchors)."""
        return list(dict.fromkeys(p.concept for p in self.preserve if p.concept and p.concept != self.concept))

    def describe(self) -> dict:
        return {"concept": self.concept, "source": self.source, "kind": self.kind, "target_prompts": len(self.target),
                "preserve_prompts": len(self.preserve),
                "preserve_concepts": sorted({p.concept for p in self.preserve if p.concept})}


def clean(text) -> str | None:
    return " ".join(text.split()) if isinstance(text, str) and text.strip() else None


def text_field(record: dict, key: str, where: str) -> str | None:
    """clean(record[key]), refusing text that is not valid Unicode (a lone surrogate from a JSON
    escape such as \\ud800): the report written from it after minutes of sampling would fail."""
    value = record.get(key)
    bad = unencodable(value) if isinstance(value, str) else None
    if bad is not None:
        raise ValueError(f"{where}: {key!r} is not valid Unicode text: it holds the lone surrogate {ascii(bad)}")
    return clean(value)


def unique(prompts: list[BenchmarkPrompt]) -> list[BenchmarkPrompt]:
    seen, kept = set(), []
    for prompt in prompts:
        if prompt.prompt.casefold() not in seen:
            seen.add(prompt.prompt.casefold())
            kept.append(prompt)
    return kept


def is_benchmark_jsonl(path: Path, text: str) -> bool:
    first = text.lstrip()
    if not first.startswith("{"):
        return False
    line = 1 + text.count("\n", 0, len(text) - len(first))  # blank lines may come first
    try:
        record = parse_json(first.split("\n", 1)[0], f"{path} line {line}")
    except json.JSONDecodeError:
        return False
    return isinstance(record, dict) and "role" in record


def load_prompt_file(path, *, concept: str | None = None, what: str = "prompt file") -> list[BenchmarkPrompt]:
    """Prompts of a prompt file, read as every prompt file is (earkit.io.read_prompt_records); each
    prompt's concept from its "concept" field, else `concept`."""
    prompts = [BenchmarkPrompt(clean(record["prompt"]), text_field(record, "concept", where) or concept)
               for where, record in read_prompt_records(path, what)]
    return unique(prompts)


def load_benchmark_jsonl(path: Path, text: str, concept: str | None) -> Benchmark:
    roles = {role: [] for role in ROLES}
    for where, record in jsonl_records(path, text):
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected an object")
        prompt, role = text_field(record, "prompt", where), record.get("role")
        if prompt is None:
            raise ValueError(f"{where}: has no 'prompt' text")
        if role not in ROLES:
            raise ValueError(f"{where}: role must be one of {ROLES}, got {role!r}")
        roles[role].append(BenchmarkPrompt(prompt, text_field(record, "concept", where)))
    concept = concept or single_concept([p.concept for p in roles["target"]], path)
    target = [BenchmarkPrompt(p.prompt, concept) for p in roles["target"]]
    return Benchmark(concept, unique(target), unique(roles["preserve"]), str(path), "benchmark")


def single_concept(concepts, path) -> str:
    named = Counter(clean(c) for c in concepts if clean(c))
    if len(named) == 1:
        return next(iter(named))
    if not named:
        raise ValueError(f"{path} names no concept: give --concept")
    shown = ", ".join(f"{c!r}" for c, _ in named.most_common(5))
    raise ValueError(f"{path} names {len(named)} concepts ({shown}...): give --concept to say which one is erased")


def load_benchmark(path, *, concept: str | None = None, preserve=None, max_prompts: int | None = None) -> Benchmark:
    """A Benchmark from a pairs file, a prompt file or a benchmark JSONL (module docstring);
    `preserve` adds the prompts of a second file as preservation prompts. The first max_prompts
    of each role are kept."""
    from earkit.engine.pair_files import EvaluationPromptFile, load_pairs

    path = Path(path).expanduser()
    text = read_text_file(path, "benchmark file")
    concept = clean(concept)
    if is_benchmark_jsonl(path, text):
        benchmark = load_benchmark_jsonl(path, text, concept)
    else:
        try:
            pairs = load_pairs(path)
        except EvaluationPromptFile:
            if concept is None:
                raise ValueError(f"{path} is a prompt file without concept/anchor pairs: give --concept (the concept "
                                 "its prompts ask for)") from None
            benchmark = Benchmark(concept, load_prompt_file(path, concept=concept, what="benchmark file"), [],
                                  str(path), "prompts")
        else:
            concept = concept or single_concept([p.concept for p in pairs], path)
            target = [BenchmarkPrompt(p.concept_prompt, concept) for p in pairs]
            others = [BenchmarkPrompt(p.anchor_prompt, clean(p.anchor)) for p in pairs]
            benchmark = Benchmark(concept, unique(target), unique(others), str(path), "pairs")
    if preserve is not None:
        benchmark.preserve = unique(benchmark.preserve + load_prompt_file(preserve, what="preservation prompt file"))
    targets = {p.prompt.casefold() for p in benchmark.target}
    benchmark.preserve = [p for p in benchmark.preserve if p.prompt.casefold() not in targets]
    if max_prompts is not None:
        if max_prompts < 1:
            raise ValueError(f"max_prompts must be at least 1, got {max_prompts}")
        benchmark.target, benchmark.preserve = benchmark.target[:max_prompts], benchmark.preserve[:max_prompts]
    if not benchmark.target:
        raise ValueError(f"{path} holds no target prompts")
    return benchmark
