"""The ECGVF visual filter: keep a prompt pair only when the images say it is a good pair.

A pair teaches erasure only if its concept prompt really makes the model draw the concept and
its anchor prompt really does not. So both prompts of every pair are drawn with several seeds by
the engine's sampler, a judge looks at each image, and:

    kept     the concept prompt shows the concept in >= min_concept_prompt_rate of its images, and
             the anchor prompt shows it in <= max_anchor_prompt_rate of its images (and, with
             min_anchor_rate, the anchor prompt shows its anchor often enough)
    dropped  otherwise, with every reason that applies (CONCEPT_PROMPT_MISSES, ANCHOR_PROMPT_SHOWS,
             ANCHOR_MISSES)

    records = filter_pairs(pairs, judge, concept_prompt_images, anchor_prompt_images)   # images[p][s]
    records = filter_pairs_with_model(model, tokenizer, pairs, judge, seeds=[0, 1, 2, 3])
    write_filter_results(records, "circle.kept.jsonl")   # + circle.kept.decisions.jsonl

The kept file is pairs JSONL (load_pairs reads it); the decisions file has one record per input
pair: kept or not, the reasons, and the judge's per-image scores and verdicts.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from earkit.io import check_new_files, encode_utf8, parse_json, write_files_atomic

CONCEPT_PROMPT_MISSES = "concept prompt misses the concept"
ANCHOR_PROMPT_SHOWS = "anchor prompt shows the concept"
ANCHOR_MISSES = "anchor prompt misses the anchor"
DROP_REASONS = (CONCEPT_PROMPT_MISSES, ANCHOR_PROMPT_SHOWS, ANCHOR_MISSES)


@dataclass(frozen=True)
class FilterRules:
    min_concept_prompt_rate: float = 0.5  # the concept prompt must show the concept in at least half its images
    max_anchor_prompt_rate: float = 0.0  # and the anchor prompt in none of them
    min_anchor_rate: float | None = None  # None: the anchor is not checked

    def validate(self) -> FilterRules:
        for name in ("min_concept_prompt_rate", "max_anchor_prompt_rate", "min_anchor_rate"):
            value = getattr(self, name)
            if value is None and name == "min_anchor_rate":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
        return self


def decide(concept_prompt_seen, anchor_prompt_seen, rules: FilterRules, *, concept: str, anchor_seen=None,
           anchor: str | None = None) -> tuple[bool, list[str], list[str]]:
    """(kept, reasons, details) for one pair from the judge's verdicts on its images: whether each
    image of the concept prompt, and of the anchor prompt, shows the concept (and, `anchor_seen`,
    whether each image of the anchor prompt shows the anchor)."""
    concept_prompt_seen, anchor_prompt_seen = [bool(v) for v in concept_prompt_seen], [bool(v) for v in anchor_prompt_seen]
    reasons, details = [], []
    shown, total = sum(concept_prompt_seen), len(concept_prompt_seen)
    if shown < rules.min_concept_prompt_rate * total:
        reasons.append(CONCEPT_PROMPT_MISSES)
        details.append(f"the concept prompt shows {concept!r} in {shown}/{total} images; needs at least "
                       f"{rules.min_concept_prompt_rate:g} of them")
    shown, total = sum(anchor_prompt_seen), len(anchor_prompt_seen)
    if shown > rules.max_anchor_prompt_rate * total:
        reasons.append(ANCHOR_PROMPT_SHOWS)
        details.append(f"the anchor prompt still shows {concept!r} in {shown}/{total} images; allowed at most "
                       f"{rules.max_anchor_prompt_rate:g} of them")
    if rules.min_anchor_rate is not None and anchor_seen is not None:
        shown, total = sum(bool(v) for v in anchor_seen), len(anchor_seen)
        if shown < rules.min_anchor_rate * total:
            reasons.append(ANCHOR_MISSES)
            details.append(f"the anchor prompt shows its anchor {anchor!r} in {shown}/{total} images; needs at least "
                           f"{rules.min_anchor_rate:g} of them")
    return not reasons, reasons, details


def pair_concept(pair, concept: str | None, index: int) -> str:
    if concept is not None:
        return concept
    if pair.concept:
        return pair.concept
    raise ValueError(f"pair {index} ({pair.concept_prompt!r}) names no concept: give --concept (the file has no "
                     "concept field, as train_van_gogh.csv)")


def judge_grouped(judge, images_per_pair: list[list], concepts: list[str]) -> list[tuple[list, list]]:
    """(scores, seen) per pair, as lists over its images; the judge runs once per distinct concept."""
    results = [None] * len(images_per_pair)
    for concept in dict.fromkeys(concepts):
        members = [i for i, c in enumerate(concepts) if c == concept]
        flat = [image for i in members for image in images_per_pair[i]]
        scores, seen = judge.verdict(flat, concept)
        start = 0
        for i in members:
            count = len(images_per_pair[i])
            results[i] = ([round(float(s), 6) for s in scores[start:start + count]],
                          [bool(v) for v in seen[start:start + count]])
            start += count
    return results


def filter_pairs(pairs, judge, concept_prompt_images, anchor_prompt_images, *, concept: str | None = None,
                 rules: FilterRules | None = None, seeds=None) -> list[dict]:
    """One decision record per pair, in order; concept_prompt_images[p] and anchor_prompt_images[p]
    are the images of pair p's two prompts (one per seed)."""
    rules = (rules or FilterRules()).validate()
    pairs = list(pairs)
    if len(concept_prompt_images) != len(pairs) or len(anchor_prompt_images) != len(pairs):
        raise ValueError(f"{len(pairs)} pairs but {len(concept_prompt_images)} concept-prompt and "
                         f"{len(anchor_prompt_images)} anchor-prompt image lists")
    concepts = [judge.check_concept(pair_concept(pair, concept, i)) for i, pair in enumerate(pairs)]
    concept_prompt_verdicts = judge_grouped(judge, concept_prompt_images, concepts)
    anchor_prompt_verdicts = judge_grouped(judge, anchor_prompt_images, concepts)
    anchor_verdicts = [None] * len(pairs)
    if rules.min_anchor_rate is not None:
        known = [i for i, pair in enumerate(pairs) if pair.anchor and judge.knows(pair.anchor)]
        for i, result in zip(known, judge_grouped(judge, [anchor_prompt_images[i] for i in known],
                                                  [pair_anchor(pairs[i]) for i in known])):
            anchor_verdicts[i] = result

    records = []
    for index, pair in enumerate(pairs):
        concept_prompt_scores, concept_prompt_seen = concept_prompt_verdicts[index]
        anchor_prompt_scores, anchor_prompt_seen = anchor_prompt_verdicts[index]
        anchor_scores, anchor_seen = anchor_verdicts[index] or (None, None)
        kept, reasons, details = decide(concept_prompt_seen, anchor_prompt_seen, rules, concept=concepts[index],
                                        anchor_seen=anchor_seen, anchor=pair.anchor)
        records.append({
            "index": index, "concept_prompt": pair.concept_prompt, "anchor_prompt": pair.anchor_prompt,
            "concept": pair.concept, "anchor": pair.anchor, "judged_concept": concepts[index],
            "kept": kept, "reasons": reasons, "details": details,
            "concept_prompt_rate": sum(concept_prompt_seen) / len(concept_prompt_seen),
            "anchor_prompt_rate": sum(anchor_prompt_seen) / len(anchor_prompt_seen),
            "anchor_rate": None if anchor_seen is None else sum(anchor_seen) / len(anchor_seen),
            "scores": {"concept_prompt": concept_prompt_scores, "anchor_prompt": anchor_prompt_scores,
                       "anchor": anchor_scores},
            "seen": {"concept_prompt": concept_prompt_seen, "anchor_prompt": anchor_prompt_seen, "anchor": anchor_seen},
            "seeds": list(seeds) if seeds is not None else None,
        })
    return records


def pair_anchor(pair) -> str:
    return " ".join(pair.anchor.split()).lower()


def filter_pairs_with_model(model, tokenizer, pairs, judge, *, seeds, concept: str | None = None,
                            rules: FilterRules | None = None, guidance_scale: float = 5.0, temperature: float = 1.0,
                            batch_size: int | None = 16, progress: bool = True, store=None) -> list[dict] | None:
    """Sample both prompts of every pair with each seed (each image with its own seed), then
    filter_pairs. Concepts are checked against the judge before any sampling. Under torchrun
    every rank draws its share and rank 0 judges them all, in one process's order (the other
    ranks return None). store: an engine.drawing.ImageStore keeping the images as they come."""
    from .images import sample_prompt_images

    pairs = list(pairs)
    if not pairs:
        raise ValueError("no pairs to filter")
    for index, pair in enumerate(pairs):
        judge.check_concept(pair_concept(pair, concept, index))
    prompts = [pair.concept_prompt for pair in pairs] + [pair.anchor_prompt for pair in pairs]
    images = sample_prompt_images(model, tokenizer, prompts, seeds, guidance_scale=guidance_scale, temperature=temperature,
                                  batch_size=batch_size, progress=progress, desc="filter: sampling", store=store)
    if images is None:
        return None
    return filter_pairs(pairs, judge, images[:len(pairs)], images[len(pairs):], concept=concept, rules=rules,
                        seeds=seeds)


def filter_summary(records: list[dict]) -> dict:
    dropped = {reason: sum(reason in r["reasons"] for r in records) for reason in DROP_REASONS}
    return {"pairs": len(records), "kept": sum(r["kept"] for r in records),
            "dropped": sum(not r["kept"] for r in records),
            "dropped_by_reason": {reason: n for reason, n in dropped.items() if n}}


# ---------------------------------------------------------------- writing


def decisions_path(path) -> Path:
    """Where the decisions go beside a kept-pairs file: kept.jsonl -> kept.decisions.jsonl."""
    path = Path(path).expanduser()
    return path.with_name(path.stem + ".decisions.jsonl")


def is_decisions_file(path: Path) -> bool:
    """A decisions file that `earkit filter` wrote: its first line is the {"filter": ...} header."""
    try:
        with open(path, encoding="utf-8") as file:
            first = parse_json(file.readline(1 << 20), str(path))
    except (OSError, ValueError):
        return False
    return isinstance(first, dict) and set(first) == {"filter"}


def check_outputs(out, *, force: bool) -> None:
    """The kept-pairs file (named by --out) is replaced under --force; the decisions file beside it
    (a name the user never typed) only when earkit filter wrote it."""
    out = Path(out).expanduser()
    check_new_files([out, decisions_path(out)], force=force, what="file",
                    derived={decisions_path(out): is_decisions_file})


def write_filter_results(records: list[dict], out, *, force: bool = False, judge: dict | None = None,
                         rules: FilterRules | None = None) -> tuple[Path, Path]:
    """The kept pairs as pairs JSONL (plus their filter scores) and every decision, atomically and
    together: both files or neither (a decisions file without its kept pairs would be refused by a
    rerun without --force). The kept file may be empty of pairs (every pair dropped); the
    decisions say why."""
    out = Path(out).expanduser()
    decisions = decisions_path(out)
    check_outputs(out, force=force)
    kept_lines = []
    for record in records:
        if record["kept"]:
            line = {"concept_prompt": record["concept_prompt"], "anchor_prompt": record["anchor_prompt"]}
            line.update({key: record[key] for key in ("concept", "anchor") if record[key]})
            line["filter"] = {"judge": (judge or {}).get("name"), "concept_prompt_rate": record["concept_prompt_rate"],
                              "anchor_prompt_rate": record["anchor_prompt_rate"], "seeds": record["seeds"]}
            kept_lines.append(json.dumps(line, ensure_ascii=False))
    header = {"summary": filter_summary(records), "judge": judge, "rules": asdict(rules) if rules else None}
    decision_lines = [json.dumps({"filter": header}, ensure_ascii=False)]
    decision_lines += [json.dumps(record, ensure_ascii=False) for record in records]
    # Both to bytes before either is written: whatever fails on the data fails with nothing written.
    files = {decisions: encode_utf8("\n".join(decision_lines) + "\n", decisions),
             out: encode_utf8("".join(line + "\n" for line in kept_lines), out)}
    write_files_atomic(files)
    return out, decisions
