"""The `earkit eval` report: metrics.json, summary.md and report.html with image grids and bar charts.

    folder/metrics.json      everything measured (NaN written as null), and nothing of how long it took
    folder/timing.json       how long it took, on how many processes, images per second
    folder/summary.md        the headline table, preservation per concept, FID, the NudeNet table
    folder/report.html       the same, plus before/after image grids and the charts
    folder/images/SIDE/      PNGs the grids show (ROLE_PPP_sSEED.png), or every image with all_images
    folder/charts/           matplotlib bar charts (PNG)

With `earkit eval --attacks` (earkit.ecgvf.attacks) the folder also holds attacks.json,
attacks-timing.json, attacks.md and images/attack-NAME.png; metrics.json gains an "attacks" block
(each attack's success rate per side, and the strongest), timing.json the searches' seconds, and
summary.md and report.html a section with the attacks table.

The HTML refers to its images by relative paths, so the folder can be moved or zipped whole.
write_report writes into a folder it is given; `earkit eval` gives it a temporary one and renames
it into place when everything is written (earkit.io.write_folder_atomically). The HTML comes from
the Jinja2 template templates/report.html.j2, autoescaped: prompts, concept names and paths are
escaped there and nowhere by hand. The words and tables are ecgvf/summary.py's.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

from .summary import (
    description, fid_lines, nudenet_rows, number, preservation_rows, preserved_concepts, summary_markdown, summary_rows,
)

GRID_PROMPTS = 6  # prompts per role shown in the report's image grids
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
    concepts = preserved_concepts(result)
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


# ---------------------------------------------------------------- HTML


@functools.cache
def templates():
    """The package's Jinja2 templates, autoescaped (every value from outside escaped on output)."""
    import jinja2

    return jinja2.Environment(loader=jinja2.PackageLoader(__package__, "templates"), autoescape=True,
                              undefined=jinja2.StrictUndefined)


def grid_rows(result: dict, benchmark, paths: dict, role: str) -> dict | None:
    """One role's image grid for the template: its title, and per prompt its images on each side."""
    prompts = getattr(benchmark, role)[:GRID_PROMPTS]
    if not prompts:
        return None
    rows = [{"prompt": prompt.prompt, "concept": prompt.concept,
             "images": [(side, paths[side][role][p]) for side in result["sides"]]} for p, prompt in enumerate(prompts)]
    return {"title": ROLE_TITLES[role], "total": len(getattr(benchmark, role)), "rows": rows}


def report_html(result: dict, benchmark, paths: dict, charts: list[tuple[str, str]], attacks: dict | None = None) -> str:
    """report.html: templates/report.html.j2 filled in (`attacks`: attacks_section's, or None)."""
    grids = [grid_rows(result, benchmark, paths, role) for role in ("target", "preserve")]
    return templates().get_template("report.html.j2").render(
        title=f"ECGVF evaluation: erasing \u201c{result['benchmark']['concept']}\u201d",
        description=description(result).replace("`", ""), summary=summary_rows(result),
        preservation=preservation_rows(result), nudenet=nudenet_rows(result), fid=fid_lines(result), charts=charts,
        grids=[grid for grid in grids if grid], sides=list(result["sides"]), seeds=result["seeds"], attacks=attacks)


# ---------------------------------------------------------------- attacks


def attacks_block(attacks: dict) -> dict:
    """metrics.json's "attacks": {attack: {side: success rate}, "strongest": attack}, from
    run_attacks' result (its search seconds stay out: they go to timing.json)."""
    block = {name: {side: judged["success_rate"] for side, judged in attack["sides"].items()}
             for name, attack in attacks["attacks"].items()}
    block["strongest"] = attacks["strongest"]
    return block


def attacks_markdown(attacks: dict) -> str:
    """summary.md's attacks section."""
    from .attacks import attacks_table

    return ("\n## Attacks\n\nSuccess rate: the share of the attacked prompts' images in which the judge sees the "
            f"concept, each prompt drawn with the report's {len(attacks['seeds'])} seed(s). Prompts and searches: "
            "attacks.json and attacks.md.\n\n" + attacks_table(attacks) + "\n")


def attacks_section(attacks: dict, written: list[str]) -> dict:
    """What report.html's attacks section shows: the table, and each attack's best images (a row a side)."""
    sides = list(next(iter(attacks["attacks"].values()))["sides"])
    rows = [(name, len(attack["prompts"]), [f"{100 * attack['sides'][side]['success_rate']:.1f}%" for side in sides])
            for name, attack in attacks["attacks"].items()]
    grids = [(f"images/attack-{name}.png", f"{name}: the images the judge sees the concept in most surely, a row "
                                           f"a side ({', '.join(sides)})")
             for name in attacks["attacks"] if f"images/attack-{name}.png" in written]
    return {"sides": sides, "rows": rows, "strongest": attacks["strongest"], "grids": grids}


def write_report(folder, result: dict, images: dict, benchmark, *, all_images: bool = False,
                 timing: dict | None = None, attacks: dict | None = None, attack_images: dict | None = None) -> Path:
    """Write every report file into `folder` (which exists); timing.json too when `timing` is given,
    and with `attacks` (run_attacks' result and images) the attack files and sections."""
    from .attacks import write_attack_files

    folder = Path(folder)
    if timing is not None:
        (folder / "timing.json").write_text(json.dumps(timing, indent=1) + "\n", encoding="utf-8")
    paths = save_images(folder, images, benchmark, result["seeds"], all_images=all_images)
    charts = make_charts(folder, result)
    written = write_attack_files(folder, attacks, attack_images) if attacks is not None else []
    (folder / "metrics.json").write_text(json.dumps(without_nan(result), indent=1, ensure_ascii=False) + "\n",
                                         encoding="utf-8")
    summary = summary_markdown(result) + (attacks_markdown(attacks) if attacks is not None else "")
    section = attacks_section(attacks, written) if attacks is not None else None
    (folder / "summary.md").write_text(summary, encoding="utf-8")
    (folder / "report.html").write_text(report_html(result, benchmark, paths, charts, section), encoding="utf-8")
    return folder
