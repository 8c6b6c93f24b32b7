"""`earkit eval`: scores by hand from verdicts the test chose, then end to end on a tiny world with an
erasure checkpoint (the report opened in headless Chromium, every image rendered) and on a tiny
random Janus with the NudeNet judge and an open_clip CLIP model."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from ecgvf_helpers import EAR_DATA, StubJudge, build_tiny_open_clip, rendered, tiny_world_once
from earkit.cli import main as cli_main
from earkit.ecgvf.benchmark import Benchmark, BenchmarkPrompt
from earkit.ecgvf.evaluate import fill_preservation_from_clip, measure_side

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars"]
# Appended to a copy of the report: once the page has loaded, it writes how many <img> decoded.
IMAGE_PROBE = """<script>window.addEventListener('load', function () {
  var images = Array.from(document.images);
  var broken = images.filter(function (image) { return !(image.complete && image.naturalWidth > 0); });
  var out = document.createElement('pre');
  out.id = 'image-check';
  out.textContent = 'IMAGES ' + images.length + ' BROKEN ' + broken.length + ' ' +
    broken.map(function (image) { return image.getAttribute('src'); }).join(' ');
  document.body.appendChild(out);
});</script>"""


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    pytest.fail("headless Chromium is needed to check the HTML report: install it with "
                "`apt-get update && apt-get install -y chromium` (Debian/Ubuntu)")


def open_in_chromium(html_file, profile, *extra) -> str:
    command = [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=5000", *extra,
               html_file.resolve().as_uri()]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True).stdout


tiny_world = pytest.fixture(scope="module", name="tiny_world")(tiny_world_once)


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    """A random torchvision Inception-v3 state dict in a file (fp16: half the bytes)."""
    from safetensors.torch import save_file
    from torchvision.models import inception_v3

    torch.manual_seed(0)
    weights = tmp_path_factory.mktemp("inception") / "inception.safetensors"
    state = inception_v3(weights=None, aux_logits=True, init_weights=False).state_dict()
    save_file({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, str(weights))
    return weights


def test_scores_from_chosen_verdicts_by_hand():
    benchmark = Benchmark("circle", [BenchmarkPrompt("a circle", "circle"), BenchmarkPrompt("a red circle", "circle")],
                          [BenchmarkPrompt("a square", "square"), BenchmarkPrompt("a triangle", "triangle"),
                           BenchmarkPrompt("a house", "house")])  # the judge does not know houses
    images = {"target": [[rendered("circle", 0), rendered("square", 1)], [rendered("circle", 2), rendered("circle", 3)]],
              "preserve": [[rendered("square", 0), rendered("square", 1)], [rendered("triangle", 0), rendered("star", 1)],
                           [rendered("star", 2), rendered("star", 3)]]}
    side = measure_side(images, benchmark, StubJudge(), seeds=[0, 1])
    assert side["target_rate"] == 0.75 and side["erasure"] == 0.25  # 3 of 4 target images show a circle
    assert side["preservation_by_concept"] == {"square": 1.0, "triangle": 0.5}
    assert side["preservation"] == 0.75
    assert side["harmonic_mean"] == pytest.approx(2 * 0.25 * 0.75 / (0.25 + 0.75))
    assert side["target_seen_per_prompt"] == [1, 2] and side["preserve_concepts_not_judged"] == ["house"]

    class Clip:  # image embeddings [1, 0], text embedding [1, 1] for "a circle", [0, 1] for the rest
        name, has_text = "fake-clip", True

        def embed_images(self, images):
            return np.tile([1.0, 0.0], (len(images), 1))

        def embed_texts(self, texts):
            return np.array([[1.0, 1.0] if text == "a circle" else [0.0, 1.0] for text in texts])

    side = measure_side(images, benchmark, StubJudge(), clip=Clip(), seeds=[0, 1])
    assert side["clip_score_target"] == pytest.approx(100 / np.sqrt(2) / 2)  # cos 1/sqrt(2) for prompt 0 only
    assert side["clip_score_preserve"] == 0.0


def test_preservation_falls_back_to_the_clip_score_kept():
    sides = {"before": {"preservation_source": None, "clip_score_preserve": 30.0, "erasure": 0.2,
                        "preservation": float("nan")},
             "after": {"preservation_source": None, "clip_score_preserve": 24.0, "erasure": 0.8,
                       "preservation": float("nan")}}
    fill_preservation_from_clip(sides)
    assert sides["before"]["preservation"] == 1.0 and sides["after"]["preservation"] == pytest.approx(0.8)
    assert sides["after"]["harmonic_mean"] == pytest.approx(0.8)
    assert sides["after"]["preservation_source"] == "clip score kept"


def test_earkit_eval_of_an_erasure_on_a_tiny_world_writes_a_report_chromium_renders(tiny_world, tmp_path, capsys):
    generator = tiny_world / "generator"
    assert cli_main(["erase", "--model", str(generator), "--concept", "circle", "--anchor", "square", "--steps", "2",
                     "--window", "8", "--out", str(tmp_path / "erased"), "--device", "cpu"]) == 0
    pairs = tmp_path / "circle.jsonl"
    assert cli_main(["pairs", "--concept", "circle", "--n", "6", "--out", str(pairs), "--quiet"]) == 0
    capsys.readouterr()
    out = tmp_path / "report"
    argv = ["eval", "--model", str(generator), "--checkpoint", str(tmp_path / "erased" / "checkpoint"), "--benchmark",
            str(pairs), "--out", str(out), "--seeds", "2", "--device", "cpu", "--quiet"]
    assert cli_main(argv) == 0
    printed = capsys.readouterr().out
    assert "eval: erasing 'circle', judge shapesworld, 6 target + 6 preservation prompts x 2 seeds" in printed
    assert re.search(r"before +erasure [\d.]+ .*preservation [\d.]+ +harmonic mean", printed)
    assert re.search(r"after +erasure [\d.]+ .*preservation [\d.]+ +harmonic mean", printed)

    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["sides"]) == {"before", "after"} and metrics["judge"]["name"] == "shapesworld"
    assert metrics["checkpoint"] == str(tmp_path / "erased" / "checkpoint") and "delta" not in metrics
    for side in metrics["sides"].values():
        assert side["erasure"] == pytest.approx(1 - side["target_rate"])
        assert 0 <= side["preservation"] <= 1 and side["clip_score_preserve"] is not None
    assert metrics["fid"]["features"] == "shapesworld" and metrics["fid"]["before_vs_after"] >= 0
    assert "| before |" in (out / "summary.md").read_text() and (out / "charts" / "scores.png").is_file()

    # headless Chromium opens the report: every <img> (grids and charts) decodes
    probe = out / "_image_check.html"
    probe.write_text((out / "report.html").read_text().replace("</body>", IMAGE_PROBE + "</body>"))
    dom = open_in_chromium(probe, tmp_path / "chromium-profile", "--dump-dom")
    found = re.search(r'id="image-check">IMAGES (\d+) BROKEN (\d+)([^<]*)', dom)
    assert found, dom[-2000:]
    assert int(found[1]) == 2 * 2 * 6 * 2 + 2 and int(found[2]) == 0, found[3]  # 2 sides x 2 seeds x 6 prompts x 2 roles + 2 charts
    screenshot = tmp_path / "report.png"
    open_in_chromium(out / "report.html", tmp_path / "chromium-profile-2", f"--screenshot={screenshot}",
                     "--window-size=1200,1600")
    assert screenshot.stat().st_size > 10_000

    probe.unlink()
    assert cli_main(argv) == 2  # exists
    assert "already exists" in capsys.readouterr().err
    assert cli_main(argv + ["--force", "--max-prompts", "2", "--seeds", "1"]) == 0
    assert json.loads((out / "metrics.json").read_text())["benchmark"]["target_prompts"] == 2
    assert not [p for p in tmp_path.iterdir() if ".partial" in p.name or ".old" in p.name]
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("keep me")
    assert cli_main(argv[:argv.index("--out") + 1] + [str(tmp_path / "notes"), "--force"]) == 2
    assert "did not write as a report folder (mine.txt)" in capsys.readouterr().err


def test_earkit_eval_on_a_tiny_random_janus_with_nudenet_and_open_clip(tmp_path, capsys, inception_weights):
    from earkit.engine.tiny import save_tiny_janus

    save_tiny_janus(tmp_path / "janus", ["a", "woman", "man", "photo", "nude", "beach"])
    config, weights = build_tiny_open_clip(tmp_path / "clip")
    references = tmp_path / "real"
    references.mkdir()
    for seed in range(3):
        rendered("star", seed).save(references / f"{seed}.png")
    out = tmp_path / "report"
    assert cli_main(["eval", "--model", str(tmp_path / "janus"), "--benchmark", str(EAR_DATA / "train_nudity.json"),
                     "--concept", "nudity", "--judge", "nudenet", "--clip", f"openclip:{config}:{weights}",
                     "--max-prompts", "2", "--seeds", "1", "--out", str(out), "--device", "cpu", "--quiet",
                     "--inception", str(inception_weights), "--reference-images", str(references)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    side = metrics["sides"]["model"]  # no --checkpoint: one side
    assert list(side["nudenet_counts"]) [-1] == "Total" and len(side["nudenet_counts"]) == 10
    assert side["preservation_source"] == "clip score kept" and side["preservation"] == 1.0
    assert metrics["fid"]["features"] == "inception" and metrics["fid"]["reference_vs_model"] >= 0
    summary = (out / "summary.md").read_text()
    assert "| model | Armpits | Belly | Buttocks | Feet | Breasts (F) |" in summary
    assert "eval: erasing 'nudity', judge nudenet" in capsys.readouterr().out


def test_fid_in_inception_features_when_its_weights_are_given(inception_weights):
    from earkit.ecgvf.evaluate import fid_block
    from earkit.ecgvf.judges import InceptionFeatures
    from earkit.ecgvf.metrics import frechet_distance

    inception = InceptionFeatures(inception_weights)
    before = [[rendered("circle", 0), rendered("square", 1)], [rendered("star", 2), rendered("cross", 3)]]
    after = [[rendered("circle", 4), rendered("circle", 5)], [rendered("circle", 6), rendered("circle", 7)]]
    reference = [rendered("triangle", 8), rendered("star", 9), rendered("square", 10)]
    block = fid_block({"before": {"target": [], "preserve": before}, "after": {"target": [], "preserve": after}},
                      StubJudge(), None, reference=reference, inception=inception)
    assert block["features"] == "inception" and block["images"] == "preserve"
    features = {name: inception.features([image for row in rows for image in row])
                for name, rows in (("before", before), ("after", after), ("reference", [reference]))}
    assert features["before"].shape == (4, 2048)
    assert block["before_vs_after"] == pytest.approx(frechet_distance(features["before"], features["after"]))
    assert block["reference_vs_after"] == pytest.approx(frechet_distance(features["reference"], features["after"]))
    # without Inception weights: the judge's features, else the CLIP model's, else a note
    assert "no feature space" in fid_block({"model": {"target": [], "preserve": before}}, StubJudge(), None)["note"]


def test_bad_input_is_one_line_and_exit_2_before_any_model_loads(tmp_path, capsys):
    base = ["eval", "--out", str(tmp_path / "report"), "--model", str(tmp_path)]
    cases = [(["--benchmark", str(tmp_path / "missing.jsonl")], "does not exist"),
             (["--benchmark", str(EAR_DATA / "test_church.json")], "--concept"),
             (["--benchmark", str(EAR_DATA / "train_church.json"), "--judge", "inception"], "expected one of"),
             (["--benchmark", str(EAR_DATA / "train_church.json")], "--judge is needed"),
             (["--benchmark", str(EAR_DATA / "train_church.json"), "--seeds", "0"], "--seeds"),
             (["--benchmark", str(EAR_DATA / "train_church.json"), "--judge", "nudenet", "--checkpoint",
               str(tmp_path / "nope")], "--checkpoint")]
    for extra, message in cases:
        assert cli_main(base + extra) == 2, extra
        error = capsys.readouterr().err.strip().splitlines()
        assert len(error) == 1 and message in error[0], (extra, error)
    assert not (tmp_path / "report").exists()


HOSTILE = "<script>alert(1)</script> \"&'"


def hostile_report(folder):
    """A report written from a made-up result whose prompts, concept names and paths hold HTML."""
    from PIL import Image

    from earkit.ecgvf.report import write_report

    benchmark = Benchmark(f"circle {HOSTILE}", [BenchmarkPrompt(f"a red circle {HOSTILE}", "circle")],
                          [BenchmarkPrompt(f"a blue square {HOSTILE}", f"square|{HOSTILE}")], source=f"b{HOSTILE}.jsonl")
    side = {"target_rate": 0.5, "erasure": 0.5, "preservation": 1.0, "harmonic_mean": 2 / 3,
            "preservation_by_concept": {f"square|{HOSTILE}": 1.0}, "preservation_source": "judge",
            "nudenet_counts": {f"Feet {HOSTILE}": 1, "Total": 1}}
    result = {"format": "earkit-eval", "benchmark": benchmark.describe(), "judge": {"name": f"j{HOSTILE}"},
              "model": f"m{HOSTILE}", "checkpoint": None, "seeds": [0], "sides": {"model": side},
              "fid": {"images": "preserve", "features": None, "note": f"n{HOSTILE}"}}
    images = {"model": {role: [[Image.new("RGB", (8, 8))]] for role in ("target", "preserve")}}
    return write_report(folder, result, images, benchmark)


def test_the_html_report_escapes_every_value_from_outside(tmp_path):
    from html.parser import HTMLParser

    import earkit.ecgvf.report

    # the template ships in the package (the wheel maps ecgvf/ to earkit/ecgvf, templates/ included)
    assert (Path(earkit.ecgvf.report.__file__).parent / "templates" / "report.html.j2").is_file()
    page = (hostile_report(tmp_path) / "report.html").read_text(encoding="utf-8")
    assert "<script>" not in page and "alert(1)</script>" not in page
    escaped = "&lt;script&gt;alert(1)&lt;/script&gt; &#34;&amp;&#39;"
    for text in (f"circle {escaped}", f"a red circle {escaped}", f"shows: square|{escaped}", f"Feet {escaped}",
                 f"Model m{escaped}; judge j{escaped}; benchmark b{escaped}.jsonl", f"(n{escaped})"):
        assert text in page, text

    class Cells(HTMLParser):  # the text of every table cell, and the alt texts, as a browser reads them
        def __init__(self):
            super().__init__()
            self.cells, self.alts, self.inside = [], [], False

        def handle_starttag(self, tag, attrs):
            self.inside = tag in ("td", "th") or (self.inside and tag in ("br", "small"))
            if tag in ("td", "th"):
                self.cells.append("")
            if tag == "img":
                self.alts.append(dict(attrs)["alt"])

        def handle_data(self, data):
            if self.inside:
                self.cells[-1] += data

    parsed = Cells()
    parsed.feed(page)
    assert f"square|{HOSTILE}" in parsed.cells  # one cell: a "|" in a name splits no table
    assert f"Feet {HOSTILE}" in parsed.cells and f"a red circle {HOSTILE}shows: circle" in parsed.cells
    assert f"model, a blue square {HOSTILE}" in parsed.alts
    summary = (tmp_path / "summary.md").read_text(encoding="utf-8")
    assert f"| square\\|{HOSTILE} | 1.000 |" in summary  # markdown: the "|" escaped


def test_a_report_written_before_the_checkpoint_rename_still_reads():
    from earkit.ecgvf.summary import description

    benchmark = {"source": "b.jsonl", "kind": "pairs", "target_prompts": 1, "preserve_prompts": 1}
    result = {"model": "m", "judge": {"name": "j"}, "benchmark": benchmark, "seeds": [0]}
    assert "erasure checkpoint `old/checkpoint`" in description({**result, "delta": "old/checkpoint"})
    assert "erasure checkpoint `new/checkpoint`" in description({**result, "checkpoint": "new/checkpoint"})
    assert "erasure checkpoint" not in description({**result, "checkpoint": None})
