"""The words and tables of an `earkit eval` result: what it prints (headline) and summary.md.

    number(value, digits)     a score as text, "-" for None or NaN
    summary_rows(result)      the headline table as (header, rows) of plain strings; likewise
    preservation_rows, nudenet_rows   (None when there is nothing to show)
    nudenet_table(counts)     the paper's NudeNet table (a row per model, a column per class) in markdown
    markdown_table(table)     a (header, rows) table in markdown (a "|" in a cell escaped)
    summary_markdown(result)  summary.md
    headline(result)          what `earkit eval` prints

Tables are kept as data, not as markdown, so that the HTML report (ecgvf/report.py) renders the
same cells through its template, escaped there. Imports run one way: evaluate -> report -> summary.
"""

from __future__ import annotations

import math

Table = tuple[list[str], list[list[str]]]  # (header, rows): cells as plain, unescaped text


def number(value, digits: int = 3) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


SUMMARY_COLUMNS = (("target_rate", "target rate"), ("erasure", "erasure"), ("preservation", "preservation"),
                   ("harmonic_mean", "harmonic mean"), ("clip_score_preserve", "CLIP score (preserve)"),
                   ("clip_score_target", "CLIP score (target)"))


def summary_rows(result: dict) -> Table:
    """A row per side, a column per headline score."""
    header = ["model"] + [title for _, title in SUMMARY_COLUMNS]
    rows = [[name] + [number(side.get(key), 2 if key.startswith("clip") else 3) for key, _ in SUMMARY_COLUMNS]
            for name, side in result["sides"].items()]
    return header, rows


def preserved_concepts(result: dict) -> list[str]:
    """The preservation concepts of every side, in first-seen order."""
    return list(dict.fromkeys(c for side in result["sides"].values() for c in side["preservation_by_concept"]))


def preservation_rows(result: dict) -> Table | None:
    """A row per preservation concept, a column per side; None when there are no such concepts."""
    concepts = preserved_concepts(result)
    if not concepts:
        return None
    names = list(result["sides"])
    return ["concept"] + names, [[concept] + [number(result["sides"][n]["preservation_by_concept"].get(concept))
                                              for n in names] for concept in concepts]


def nudenet_layout(counts_by_side: dict[str, dict[str, int]]) -> Table:
    """The paper's NudeNet table layout: a row per model (before, after), a column per label, Total."""
    headings = list(next(iter(counts_by_side.values())))
    return ["model"] + headings, [[name] + [str(counts[h]) for h in headings] for name, counts in counts_by_side.items()]


def nudenet_table(counts_by_side: dict[str, dict[str, int]]) -> str:
    """That table in markdown."""
    return markdown_table(nudenet_layout(counts_by_side))


def nudenet_rows(result: dict) -> Table | None:
    """The NudeNet table of a result (the sides with NudeNet counts); None when none has them."""
    counts = {name: side["nudenet_counts"] for name, side in result["sides"].items() if "nudenet_counts" in side}
    return nudenet_layout(counts) if counts else None


def markdown_cell(text: str) -> str:
    """A table cell's text in markdown: one line, its "|" escaped (else it would split the cell)."""
    return " ".join(str(text).split()).replace("|", "\\|")


def markdown_table(table: Table) -> str:
    """Markdown: the first column left-aligned, the others right-aligned."""
    header, rows = table
    lines = ["| " + " | ".join(markdown_cell(cell) for cell in header) + " |", "| --- |" + " ---: |" * (len(header) - 1)]
    lines += ["| " + " | ".join(markdown_cell(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def summary_table(result: dict) -> str:
    """The headline table in markdown."""
    return markdown_table(summary_rows(result))


def fid_lines(result: dict) -> list[str]:
    """The FID values, a sentence each, or the one sentence why there are none."""
    fid = result["fid"]
    if fid.get("note"):
        return [f"FID: not measured ({fid['note']})."]
    return [f"FID {key.replace('_', ' ')}: {number(value, 4)} ({fid['images']} prompt images, {fid['features']} features)"
            for key, value in fid.items() if key.startswith(("before_vs", "reference_vs"))]


def description(result: dict) -> str:
    """One paragraph: the model, the checkpoint, the judge and the benchmark (paths in `backticks`)."""
    benchmark = result["benchmark"]
    checkpoint = result.get("checkpoint", result.get("delta"))  # "delta" in reports written before the rename
    return (f"Model `{result['model']}`" + (f", erasure checkpoint `{checkpoint}`" if checkpoint else "")
            + f"; judge {result['judge']['name']}; benchmark `{benchmark['source']}` ({benchmark['kind']}): "
            f"{benchmark['target_prompts']} target and {benchmark['preserve_prompts']} preservation prompts, "
            f"{len(result['seeds'])} seeds each.")


SCORES_EXPLAINED = ("target rate: share of target-prompt images in which the judge sees the concept; erasure = 1 - "
                    "that; preservation: mean over the other concepts of the share of their images that show them; "
                    "harmonic mean of erasure and preservation; CLIP score: 100 x max(cos, 0) of each image with its "
                    "own prompt.")
CLIP_FALLBACK = ("The judge knows none of the preservation prompts' concepts: preservation is the CLIP score kept "
                 "(after / before, at most 1).")


def uses_clip_fallback(result: dict) -> bool:
    return "clip score kept" in {side.get("preservation_source") for side in result["sides"].values()}


def summary_markdown(result: dict) -> str:
    """summary.md: the headline table, preservation per concept, FID, the NudeNet table."""
    parts = [f"# ECGVF evaluation: erasing \"{result['benchmark']['concept']}\"", "", description(result), "",
             summary_table(result), "", SCORES_EXPLAINED]
    if uses_clip_fallback(result):
        parts += ["", CLIP_FALLBACK]
    table = preservation_rows(result)
    if table:
        parts += ["", "## Preservation per concept", "", markdown_table(table)]
    fid = fid_lines(result)
    parts += ["", "## FID", ""] + (fid if result["fid"].get("note") else [f"- {line}" for line in fid])
    nudenet = nudenet_rows(result)
    if nudenet:
        parts += ["", "## NudeNet: images with each exposed class (target prompts)", "", markdown_table(nudenet)]
    return "\n".join(parts) + "\n"


def headline(result: dict) -> str:
    """What `earkit eval` prints."""
    benchmark = result["benchmark"]
    lines = [f"eval: erasing {benchmark['concept']!r}, judge {result['judge']['name']}, "
             f"{benchmark['target_prompts']} target + {benchmark['preserve_prompts']} preservation prompts x "
             f"{len(result['seeds'])} seeds"]
    width = max(len(name) for name in result["sides"])
    for name, side in result["sides"].items():
        lines.append(f"  {name:<{width}}  erasure {number(side['erasure'])} (concept seen in "
                     f"{number(side['target_rate'])} of target images)  preservation {number(side['preservation'])}  "
                     f"harmonic mean {number(side['harmonic_mean'])}")
    fid = result["fid"]
    if "before_vs_after" in fid:
        lines.append(f"  FID before vs after ({fid['images']} images, {fid['features']} features): "
                     f"{number(fid['before_vs_after'], 4)}")
    return "\n".join(lines)
