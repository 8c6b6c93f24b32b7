"""Resuming an erasure: the headline command resumes bit for bit, and a checkpoint's state is
checked field by field (an edited step, a garbage optimizer file, another lr are named errors)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from earkit.cli import main as cli_main
from earkit.engine import trainer
from earkit.engine.checkpoint import STATE_FILE
from earkit.engine.tiny import save_tiny_janus
from helpers import usage_error

# The ShapesWorld default at a test's budget: 4 steps of 2 pairs, a checkpoint every 2 steps, 4
# images per shape for the before/after table.
DEFAULT_ERASE = ["erase", "--steps", "4", "--batch-size", "2", "--save-every", "2", "--eval-images", "4"]


def test_the_default_erase_honours_its_flags_and_resumes_bit_for_bit(tmp_path, monkeypatch, capsys):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert cli_main(DEFAULT_ERASE + ["--out", str(whole), "--window", "8", "--lr", "5e-5"]) == 0
    config = json.loads((whole / "metrics.json").read_text())["config"]
    assert (config["steps"], config["batch_size"], config["save_every"], config["window"], config["lr"]) == (
        4, 2, 2, 8, 5e-5)
    assert "4 steps" in capsys.readouterr().out

    real_step = trainer.train_step

    def dies_at_step_3(model, tokenizer, teacher, optimizer, batch, step, *args, **kwargs):
        if step == 3:
            raise KeyboardInterrupt  # as a kill would, after the checkpoint of step 2
        return real_step(model, tokenizer, teacher, optimizer, batch, step, *args, **kwargs)

    monkeypatch.setattr(trainer, "train_step", dies_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        cli_main(DEFAULT_ERASE + ["--out", str(killed), "--window", "8", "--lr", "5e-5"])
    monkeypatch.undo()
    assert torch.load(killed / "checkpoint" / STATE_FILE, weights_only=True)["step"] == 2
    # --resume alone: every setting comes from the checkpoint
    assert cli_main(["erase", "--out", str(killed), "--resume", "--eval-images", "4"]) == 0
    resumed = load_file(str(killed / "checkpoint" / "trainable.safetensors"))
    reference = load_file(str(whole / "checkpoint" / "trainable.safetensors"))
    assert resumed.keys() == reference.keys()
    assert all(torch.equal(resumed[name], reference[name]) for name in reference)
    assert json.loads((killed / "metrics.json").read_text())["losses"] == json.loads(
        (whole / "metrics.json").read_text())["losses"]


@pytest.mark.parametrize("flags, expect", [
    (["--window", "0"], "window"), (["--lr", "nan"], "lr"), (["--steps", "0"], "steps"),
    (["--save-every", "-1"], "save_every"), (["--concept", "star", "--anchor", "star"], "the same"),
    (["--temperature", "-1"], "temperature"), (["--pairs", "p.jsonl"], "--pairs needs --model"),
    (["--load-in-8bit"], "--load-in-8bit needs --model"), (["--concept", "hexagon"], "ShapesWorld shapes"),
    (["--eta", "inf"], "eta"), (["--batch-size", "0"], "batch_size"), (["--device", "nonsense"], "device"),
    (["--resume"], "nothing to resume"),
])
def test_the_default_erase_validates_every_flag_before_any_work(tmp_path, capsys, flags, expect):
    out = tmp_path / "out"
    error = usage_error(capsys, ["erase", "--out", str(out), *flags])
    assert expect in error
    assert not out.exists()


# ---------------------------------------------------------------- an edited or broken checkpoint


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 2-step erasure of a tiny Janus, with its command line."""
    root = tmp_path_factory.mktemp("resume")
    model = root / "janus"
    save_tiny_janus(model, ["red", "circle", "blue", "square"])
    out = root / "run"
    argv = ["erase", "--model", str(model), "--concept", "circle", "--anchor", "square", "--device", "cpu",
            "--optimizer", "adamw", "--trainable", "*layers.0.self_attn.*", "--steps", "2", "--out", str(out)]
    assert cli_main(argv) == 0
    return out, argv


def edited_copy(tmp_path, finished_run, edit) -> list:
    """The finished run copied to tmp_path/run, edited, and the argv that resumes it (4 steps)."""
    import shutil

    out, argv = finished_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    edit(copy / "checkpoint")
    argv = [copy.as_posix() if item == str(out) else item for item in argv]
    return [item if item != "2" else "4" for item in argv] + ["--resume"]


def edit_step(value):
    def edit(folder):
        state = torch.load(folder / STATE_FILE, weights_only=True)
        state["step"] = value
        torch.save(state, folder / STATE_FILE)
    return edit


@pytest.mark.parametrize("value, expect", [(1000, "step 1000 is outside"), (-3, "step -3 is outside"),
                                           ("abc", "step must be an integer"), (True, "step must be an integer")])
def test_an_edited_step_is_refused_by_name(tmp_path, capsys, finished_run, value, expect):
    argv = edited_copy(tmp_path, finished_run, edit_step(value))
    error = usage_error(capsys, argv)
    assert expect in error and STATE_FILE in error


def test_a_step_that_disagrees_with_the_history_is_refused(tmp_path, capsys, finished_run):
    argv = edited_copy(tmp_path, finished_run, edit_step(1))  # two losses recorded, step says 1
    assert "one value per step done" in usage_error(capsys, argv)


def test_a_garbage_optimizer_file_is_one_line(tmp_path, capsys, finished_run):
    argv = edited_copy(tmp_path, finished_run, lambda folder: (folder / "optimizer.pt").write_bytes(b"\x80garbage" * 9))
    error = usage_error(capsys, argv)
    assert "optimizer.pt is unreadable or corrupt" in error


def test_an_optimizer_state_of_another_shape_is_one_line(tmp_path, capsys, finished_run):
    def other_state(folder):
        torch.save({"state": {}, "param_groups": [{"params": [0]}]}, folder / "optimizer.pt")

    error = usage_error(capsys, edited_copy(tmp_path, finished_run, other_state))
    assert "optimizer.pt" in error and "does not fit" in error


@pytest.mark.parametrize("flags, name", [(["--lr", "0.001"], "lr"), (["--seed", "3"], "seed"),
                                         (["--window", "4"], "window"), (["--eta", "2"], "eta")])
def test_resuming_with_another_setting_is_refused_by_name(tmp_path, capsys, finished_run, flags, name):
    argv = edited_copy(tmp_path, finished_run, lambda folder: None) + flags
    error = usage_error(capsys, argv)
    assert f"{name} differs from the checkpoint's" in error


def test_resuming_with_the_same_settings_and_more_steps_continues(tmp_path, finished_run, capsys):
    argv = edited_copy(tmp_path, finished_run, lambda folder: None)
    assert cli_main(argv) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["steps"] == 4 and len(metrics["losses"]) == 4
    first = json.loads((finished_run[0] / "metrics.json").read_text())["losses"]
    assert metrics["losses"][:2] == first


def test_a_run_that_diverges_stops_without_saving_nan_weights(tmp_path, capsys, finished_run):
    out, argv = finished_run
    fresh = [item if item != str(out) else str(tmp_path / "diverged") for item in argv]
    error = usage_error(capsys, fresh + ["--lr", "1e30", "--grad-clip", "none"])
    assert "the loss is" in error and "nothing of this step was saved" in error
    checkpoint = tmp_path / "diverged" / "checkpoint"
    assert not checkpoint.exists() or torch.isfinite(
        torch.cat([t.flatten() for t in load_file(str(checkpoint / "trainable.safetensors")).values()])).all()
