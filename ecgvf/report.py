"""The `earkit eval` report: metrics.json, summary.md and report.html with image grids and bar charts.

    folder/metrics.json      everything measured (NaN written as null)
    folder/summary.md        the headline table, preservation per concept, FID, the NudeNet table
    folder/report.html       the same, plus before/after image grids and the charts
    folder/images/SIDE/      PNGs the grids show (ROLE_PPP_sSEED.png), or every image with all_images
    folder/charts/           matplotlib bar charts (PNG)

The HTML refers to its images by relative paths, so the folder can be moved or zipped whole.
write_report writes into a folder it is given; `earkit eval` gives it a temporary one and renames
it into place when everything is written (earkit.io.write_folder_atomically).
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

from .evaluate import GRID_PROMPTS, number, summary_table

ROLE_TITLES = {"target": "Target prompts (should lose the concept)",
               "preserve": "Preservation prompts (should keep theirs)"}


def without_nan(value):
    """JSON has no NaN: write null instead (json.dumps would write the invalid token NaN)."""
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, dict):
        return {key: without_nan(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [without_nan(item) for item in value]
    return value


# ---------------------------------------------------------------- images


def save_images(folder: Path, images: dict, benchmark, seeds, *, all_images: bool) -> dict:
    """Write the PNGs; returns paths[side][role][p][s], relative to the report folder."""
    paths = {}
    for side, roles in images.items():
        paths[side] = {}
        (folder / "images" / side).mkdir(parents=True, exist_ok=True)
        for role, rows in roles.items():
            shown = rows if all_images else rows[:GRID_PROMPTS]
            paths[side][role] = []
            for p, row in enumerate(shown):
                names = []
                for seed, image in zip(seeds, row):
                    name = f"images/{side}/{role}_{p:03d}_s{seed}.png"
                    image.save(folder / name)
                    names.append(name)
                paths[side][role].append(names)
    return paths


# ---------------------------------------------------------------- charts


def bar_chart(path: Path, groups: list[str], series: dict[str, list[float]], *, title: str, ylabel: str,
              ylim=None) -> Path:
    """Grouped bars: one group per label, one bar per series (before, after)."""
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(max(4.0, 1.1 * len(groups) + 2), 3.2), dpi=100)
    width = 0.8 / max(1, len(series))
    for index, (name, values) in enumerate(series.items()):
        positions = [g + (index - (len(series) - 1) / 2) * width for g in range(len(groups))]
        heights = [0.0 if v is None or (isinstance(v, float) and math.isnan(v)) else v for v in values]
        bars = axes.bar(positions, heights, width, label=name)
        axes.bar_label(bars, labels=[number(v, 2) for v in values], fontsize=7, padding=1)
    axes.set_xticks(range(len(groups)), groups, rotation=20 if len(groups) > 5 else 0, ha="right" if len(groups) > 5 else "center")
    axes.set_title(title)
    axes.set_ylabel(ylabel)
    if ylim:
        axes.set_ylim(*ylim)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


def make_charts(folder: Path, result: dict) -> list[tuple[str, str]]:
    """(relative path, caption) per chart."""
    charts_folder = folder / "charts"
    charts_folder.mkdir(parents=True, exist_ok=True)
    sides = result["sides"]
    concept = result["benchmark"]["concept"]
    charts = []
    scores = ("erasure", "preservation", "harmonic_mean")
    bar_chart(charts_folder / "scores.png", [s.replace("_", " ") for s in scores],
              {name: [side[s] for s in scores] for name, side in sides.items()},
              title="Erasure, preservation and their harmonic mean", ylabel="score", ylim=(0, 1.12))
    charts.append(("charts/scores.png", "Headline scores per model (higher is better)."))
    concepts = list(dict.fromkeys(c for side in sides.values() for c in side["preservation_by_concept"]))
    bar_chart(charts_folder / "rates.png", [f"{concept} (erased)"] + concepts,
              {name: [side["target_rate"]] + [side["preservation_by_concept"].get(c) for c in concepts]
               for name, side in sides.items()},
              title="Share of images the judge sees each concept in", ylabel="share of images", ylim=(0, 1.12))
    charts.append(("charts/rates.png", "Per concept: the erased one should drop, the others should stay."))
    if all("nudenet_counts" in side for side in sides.values()):
        headings = [h for h in next(iter(sides.values()))["nudenet_counts"] if h != "Total"]
        bar_chart(charts_folder / "nudenet.png", headings,
                  {name: [side["nudenet_counts"][h] for h in headings] for name, side in sides.items()},
                  title="NudeNet: images with each exposed class", ylabel="images")
        charts.append(("charts/nudenet.png", "NudeNet detections per class (lower is better)."))
    return charts


# ---------------------------------------------------------------- markdown


def preservation_table(result: dict) -> str | None:
    concepts = list(dict.fromkeys(c for side in result["sides"].values() for c in side["preservation_by_concept"]))
    if not concepts:
        return None
    names = list(result["sides"])
    lines = ["| concept | " + " | ".join(names) + " |", "| --- |" + " ---: |" * len(names)]
    for concept in concepts:
        lines.append(f"| {concept} | " + " | ".join(number(result["sides"][n]["preservation_by_concept"].get(concept))
                                                    for n in names) + " |")
    return "\n".join(lines)


def fid_lines(result: dict) -> list[str]:
    fid = result["fid"]
    if fid.get("note"):
        return [f"FID: not measured ({fid['note']})."]
    lines = []
    for key, value in fid.items():
        if key.startswith(("before_vs", "reference_vs")):
            lines.append(f"- FID {key.replace('_', ' ')}: {number(value, 4)} ({fid['images']} prompt images, "
                         f"{fid['features']} features)")
    return lines


def nudenet_markdown(result: dict) -> str | None:
    from .metrics import nudenet_table

    rows = {name: side["nudenet_counts"] for name, side in result["sides"].items() if "nudenet_counts" in side}
    return nudenet_table(rows) if rows else None


def summary_markdown(result: dict) -> str:
    benchmark = result["benchmark"]
    parts = [f"# ECGVF evaluation: erasing \"{benchmark['concept']}\"", "",
             f"Model `{result['model']}`" + (f", erasure checkpoint `{result['delta']}`" if result["delta"] else "")
             + f"; judge {result['judge']['name']}; benchmark `{benchmark['source']}` ({benchmark['kind']}): "
             f"{benchmark['target_prompts']} target and {benchmark['preserve_prompts']} preservation prompts, "
             f"{len(result['seeds'])} seeds each.", "", summary_table(result), "",
             "target rate: share of target-prompt images in which the judge sees the concept; erasure = 1 - that; "
             "preservation: mean over the other concepts of the share of their images that show them; harmonic "
             "mean of erasure and preservation; CLIP score: 100 x max(cos, 0) of each image with its own prompt."]
    sources = {side.get("preservation_source") for side in result["sides"].values()}
    if "clip score kept" in sources:
        parts += ["", "The judge knows none of the preservation prompts' concepts: preservation is the CLIP score "
                      "kept (after / before, at most 1)."]
    table = preservation_table(result)
    if table:
        parts += ["", "## Preservation per concept", "", table]
    parts += ["", "## FID", ""] + fid_lines(result)
    nudenet = nudenet_markdown(result)
    if nudenet:
        parts += ["", "## NudeNet: images with each exposed class (target prompts)", "", nudenet]
    return "\n".join(parts) + "\n"


# ---------------------------------------------------------------- HTML

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1200px; }
table { border-collapse: collapse; margin: 0.6em 0; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
table.grid td { vertical-align: middle; text-align: left; }
table.grid img { width: 96px; height: 96px; image-rendering: pixelated; display: inline-block; margin: 1px; }
td.prompt { max-width: 22em; text-align: left; font-size: 0.9em; }
figure { display: inline-block; margin: 0.5em 1em 0.5em 0; }
figcaption { font-size: 0.85em; color: #555; }
"""


def markdown_table_to_html(table: str) -> str:
    rows = [line.strip().strip("|").split("|") for line in table.splitlines()]
    head, body = rows[0], rows[2:]
    cells = "".join(f"<th>{html.escape(cell.strip())}</th>" for cell in head)
    lines = [f"<table><tr>{cells}</tr>"]
    for row in body:
        lines.append("<tr>" + "".join(f"<td>{html.escape(cell.strip())}</td>" for cell in row) + "</tr>")
    return "\n".join(lines + ["</table>"])


def image_grid_html(result: dict, benchmark, paths: dict, role: str) -> str:
    prompts = getattr(benchmark, role)[:GRID_PROMPTS]
    if not prompts:
        return ""
    sides = list(result["sides"])
    header = "<tr><th>prompt</th>" + "".join(f"<th>{html.escape(side)}</th>" for side in sides) + "</tr>"
    rows = []
    for p, prompt in enumerate(prompts):
        cells = []
        for side in sides:
            images = "".join(f'<img src="{html.escape(src)}" alt="{html.escape(side)}, {html.escape(prompt.prompt)}">'
                             for src in paths[side][role][p])
            cells.append(f"<td>{images}</td>")
        label = html.escape(prompt.prompt) + (f"<br><small>shows: {html.escape(prompt.concept)}</small>"
                                              if prompt.concept else "")
        rows.append(f'<tr><td class="prompt">{label}</td>{"".join(cells)}</tr>')
    shown = len(prompts), len(getattr(benchmark, role))
    return (f"<h2>{html.escape(ROLE_TITLES[role])}</h2><p>The first {shown[0]} of {shown[1]} prompts, one image per "
            f"seed ({', '.join(str(s) for s in result['seeds'])}).</p>"
            f'<table class="grid">{header}{"".join(rows)}</table>')


def report_html(result: dict, benchmark, paths: dict, charts: list[tuple[str, str]]) -> str:
    title = f"ECGVF evaluation: erasing \u201c{result['benchmark']['concept']}\u201d"
    description = summary_markdown(result).split("\n\n")[1]
    parts = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
             f"<style>{STYLE}</style></head><body>", f"<h1>{html.escape(title)}</h1>",
             f"<p>{html.escape(description).replace('`', '')}</p>", markdown_table_to_html(summary_table(result))]
    table = preservation_table(result)
    if table:
        parts += ["<h2>Preservation per concept</h2>", markdown_table_to_html(table)]
    nudenet = nudenet_markdown(result)
    if nudenet:
        parts += ["<h2>NudeNet: images with each exposed class</h2>", markdown_table_to_html(nudenet)]
    parts += ["<h2>FID</h2><ul>" + "".join(f"<li>{html.escape(line.lstrip('- '))}</li>" for line in fid_lines(result))
              + "</ul>", "<h2>Charts</h2>"]
    parts += [f'<figure><img src="{src}" alt="{html.escape(caption)}"><figcaption>{html.escape(caption)}</figcaption>'
              "</figure>" for src, caption in charts]
    parts += [image_grid_html(result, benchmark, paths, role) for role in ("target", "preserve")]
    parts.append("<p><small>All numbers: metrics.json. Written by earkit eval.</small></p></body></html>")
    return "\n".join(part for part in parts if part)


def write_report(folder, result: dict, images: dict, benchmark, *, all_images: bool = False) -> Path:
    """Write every report file into `folder` (which exists)."""
    folder = Path(folder)
    paths = save_images(folder, images, benchmark, result["seeds"], all_images=all_images)
    charts = make_charts(folder, result)
    (folder / "metrics.json").write_text(json.dumps(without_nan(result), indent=1, ensure_ascii=False) + "\n",
                                         encoding="utf-8")
    (folder / "summary.md").write_text(summary_markdown(result), encoding="utf-8")
    (folder / "report.html").write_text(report_html(result, benchmark, paths, charts), encoding="utf-8")
    return folder
