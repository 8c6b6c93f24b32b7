"""The `earkit` command's sample and bench paths (erase and export are in test_trainer.py)."""

import json

from earkit.cli import main as cli_main
from earkit.engine.tiny import save_tiny_janus


def test_sample_writes_pngs_grid_and_prompts_and_continues_only_the_same_run(tmp_path, capsys):
    model = tmp_path / "model"
    save_tiny_janus(model, ["red", "circle", "blue", "square"])
    out = tmp_path / "samples"
    argv = ["sample", "--model", str(model), "--prompt", "a red circle", "--prompt", "a blue square",
            "--images-per-prompt", "2", "--out", str(out), "--device", "cpu"]
    assert cli_main(argv) == 0
    names = sorted(p.name for p in out.iterdir())
    # .earkit-files.json lists what earkit wrote, so that --force never deletes anything else
    # images.json: what the images were drawn with, so that a rerun continues only the same run
    assert names == [".earkit-files.json", "000_00.png", "000_01.png", "001_00.png", "001_01.png", "grid.png",
                     "images.json", "prompts.json"]
    assert json.loads((out / "prompts.json").read_text())["prompts"] == ["a red circle", "a blue square"]
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert cli_main(argv) == 0  # the same run again: every image is there, nothing changes
    assert "continuing" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert cli_main(argv + ["--seed", "3"]) == 2  # another run: refused, naming what differs
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and str(out) in error[0] and "seed 0" in error[0] and "seed 3" in error[0]
    assert cli_main(argv + ["--seed", "3", "--force"]) == 0
    assert json.loads((out / "prompts.json").read_text())["seed"] == 3


def test_sample_settings_default_to_janus_pro_or_to_the_shapesworld_generator(tmp_path):
    from earkit.engine import shapesworld

    model = tmp_path / "model"
    save_tiny_janus(model, ["red", "circle"])
    common = ["--prompt", "a red circle", "--device", "cpu"]
    assert cli_main(["sample", "--model", str(model), "--out", str(tmp_path / "janus"), *common]) == 0
    assert cli_main(["sample", "--out", str(tmp_path / "world"), *common]) == 0  # no --model: ShapesWorld
    assert cli_main(["sample", "--out", str(tmp_path / "given"), "--temperature", "0.7", *common]) == 0
    settings = {name: json.loads((tmp_path / name / "prompts.json").read_text())["settings"]
                for name in ("janus", "world", "given")}
    assert (settings["janus"]["guidance_scale"], settings["janus"]["temperature"]) == (5.0, 1.0)
    assert (settings["world"]["guidance_scale"], settings["world"]["temperature"]) == (
        shapesworld.GUIDANCE_SCALE, shapesworld.TEMPERATURE)
    assert settings["given"]["temperature"] == 0.7


def test_sample_without_prompts_is_a_usage_error(tmp_path, capsys):
    assert cli_main(["sample", "--model", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "prompt" in capsys.readouterr().err


def test_bench_engine_tiny_runs(capsys):
    assert cli_main(["bench", "engine", "--size", "tiny", "--random-weights", "--device", "cpu",
                     "--sampler-batches", "1", "--train-batch", "1"]) == 0
    assert "projected_s_per_50_pairs" in capsys.readouterr().out


def test_default_erase_refuses_a_preserve_file_it_would_ignore(tmp_path, capsys):
    keep = tmp_path / "keep.txt"
    keep.write_text("a blue star\n")
    assert cli_main(["erase", "--preserve", str(keep), "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "--preserve needs --model" in error[0]
    assert not (tmp_path / "out").exists()
