"""sample, filter and eval under torchrun (2 CPU processes, gloo) write exactly what one process
writes, and eval and filter keep their images (--images) so that a rerun draws only what is
missing. On the shipped ShapesWorld: its generator, its judge, its template pairs."""

import json

import pytest

from earkit.cli import main as cli_main
from helpers import folder_files
from jobs import torchrun



@pytest.fixture(scope="module")
def world_run(tmp_path_factory):
    """Pairs of the shipped world's template backend and a one-step erasure of circle."""
    from earkit.engine.shapesworld import generator_folder

    folder = tmp_path_factory.mktemp("world")
    pairs = folder / "circle.jsonl"
    assert cli_main(["pairs", "--concept", "circle", "--n", "5", "--out", str(pairs), "--quiet"]) == 0
    erased = folder / "erased"
    assert cli_main(["erase", "--model", str(generator_folder()), "--concept", "circle", "--anchor", "square",
                     "--steps", "1", "--window", "8", "--out", str(erased), "--device", "cpu"]) == 0
    return pairs, erased / "checkpoint"


def test_eval_on_two_ranks_writes_the_metrics_of_one(world_run, tmp_path, capsys, monkeypatch):
    pairs, checkpoint = world_run
    common = ["eval", "--benchmark", str(pairs), "--checkpoint", str(checkpoint), "--seeds", "3", "--batch-size", "4",
              "--device", "cpu", "--quiet"]
    assert cli_main([*common, "--out", str(tmp_path / "one")]) == 0
    done = torchrun([*common, "--out", str(tmp_path / "two"), "--images", str(tmp_path / "images")], tmp_path, EARKIT_DIST_TIMEOUT="120")
    assert done.stdout.count("wrote ") == 1, "rank 0 alone prints"
    one, two = tmp_path / "one", tmp_path / "two"
    assert (one / "metrics.json").read_bytes() == (two / "metrics.json").read_bytes()
    assert (one / "summary.md").read_bytes() == (two / "summary.md").read_bytes()
    timing = [json.loads((folder / "timing.json").read_text()) for folder in (one, two)]
    assert [t["ranks"] for t in timing] == [1, 2] and timing[0]["images"] == timing[1]["images"] == 2 * 3 * 10
    # the report's images are the same pixels too
    assert {k: v for k, v in folder_files(one / "images").items()} == folder_files(two / "images")

    # the kept images: 2 sides x 10 prompts x 3 seeds, each named by its prompt and seed
    stored = sorted(p.name for p in (tmp_path / "images" / "after").iterdir())
    assert len(stored) == 30 + 1 and "images.json" in stored
    # a rerun from them draws nothing and measures the same: the batches left to draw are none
    from earkit.engine import distributed

    drawn, agree = [], distributed.broadcast_from_main
    monkeypatch.setattr(distributed, "broadcast_from_main", lambda value, what: drawn.append(value) or agree(value, what))
    assert cli_main([*common, "--out", str(tmp_path / "again"), "--images", str(tmp_path / "images")]) == 0
    assert drawn == [[], []], "every batch of both sides was there already"
    assert (tmp_path / "again" / "metrics.json").read_bytes() == (one / "metrics.json").read_bytes()

    # other settings than the kept images': refused by name before any drawing
    capsys.readouterr()
    assert cli_main([*common, "--out", str(tmp_path / "other"), "--images", str(tmp_path / "images"),
                     "--temperature", "0.9"]) == 2
    error = capsys.readouterr().err.strip()
    assert "temperature" in error and "0.9" in error and len(error.splitlines()) == 1
    assert not (tmp_path / "other").exists()


def test_filter_on_two_ranks_keeps_and_decides_as_one(world_run, tmp_path):
    pairs, _ = world_run
    common = ["filter", "--pairs", str(pairs), "--seeds", "3", "--batch-size", "3", "--device", "cpu", "--quiet"]
    assert cli_main([*common, "--out", str(tmp_path / "one.jsonl")]) == 0
    torchrun([*common, "--out", str(tmp_path / "two.jsonl")], tmp_path, EARKIT_DIST_TIMEOUT="120")
    for name in ("{}.jsonl", "{}.decisions.jsonl"):
        one, two = (tmp_path / name.format(which) for which in ("one", "two"))
        assert one.read_bytes() == two.read_bytes(), name


def test_sample_on_two_ranks_writes_the_files_of_one(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"a {colour} {shape}\n" for colour in ("red", "blue", "green")
                               for shape in ("circle", "star", "cross")))
    common = ["sample", "--prompts-file", str(prompts), "--images-per-prompt", "2", "--batch-size", "4",
              "--device", "cpu"]
    assert cli_main([*common, "--out", str(tmp_path / "one")]) == 0
    done = torchrun([*common, "--out", str(tmp_path / "two")], tmp_path, EARKIT_DIST_TIMEOUT="120")
    assert done.stdout.count("wrote 20 files") == 1
    assert folder_files(tmp_path / "one") == folder_files(tmp_path / "two")


def test_one_process_commands_refuse_torchrun(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert cli_main(["pairs", "--concept", "circle", "--n", "2", "--out", str(tmp_path / "p.jsonl"), "--quiet"]) == 2
    assert "runs in one process" in capsys.readouterr().err
    monkeypatch.setenv("RANK", "5")
    assert cli_main(["sample", "--prompt", "a red circle", "--out", str(tmp_path / "s")]) == 2
    assert "RANK=5" in capsys.readouterr().err


def test_eval_keeps_its_images_out_of_the_report_folder(tmp_path, capsys):
    out = tmp_path / "report"
    for images in (out, out / "images"):
        assert cli_main(["eval", "--benchmark", "x.jsonl", "--out", str(out), "--images", str(images)]) == 2
        assert "inside the report folder" in capsys.readouterr().err
