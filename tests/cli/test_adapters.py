"""The commands with LoRA adapters and several concepts: `earkit erase --adapter lora`, `--concept`
repeated, and sample / eval / export taking an adapter, or a weighted stack, where they take a
checkpoint. On the shipped ShapesWorld, a few steps each."""

import json

import pytest
from PIL import Image

from earkit.cli import main as cli_main

from helpers import usage_error


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two adapter runs (circle, star) and a full run, 2 steps each, on the shipped world."""
    folder = tmp_path_factory.mktemp("adapter-runs")
    common = ["--steps", "2", "--eval-images", "2", "--lr", "5e-3"]
    for name, extra in (("circle", ["--adapter", "lora", "--lora-rank", "2"]),
                        ("star", ["--adapter", "lora", "--lora-rank", "3", "--concept", "star"]),
                        ("full", [])):
        assert cli_main(["erase", "--out", str(folder / name), *common, *extra]) == 0
    return folder


def test_erase_adapter_prints_the_table_and_leaves_a_peft_folder(runs, capsys):
    checkpoint = runs / "circle" / "checkpoint"
    assert (checkpoint / "adapter_config.json").is_file() and (checkpoint / "adapter_model.safetensors").is_file()
    record = json.loads((checkpoint / "adapter_config.json").read_text())
    assert record["r"] == 2 and record["lora_alpha"] == 4 and record["peft_type"] == "LORA"
    evaluation = json.loads((runs / "circle" / "evaluation.json").read_text())
    assert evaluation["config"]["adapter"] == "lora" and set(evaluation["after"]) == {
        "circle", "square", "triangle", "star", "cross"}
    assert not (runs / "full" / "checkpoint" / "adapter_config.json").exists()


def sample(tmp_path, name, *erasure, seed="0"):
    out = tmp_path / name
    argv = ["sample", "--prompt", "a red circle", "--prompt", "a blue star", "--out", str(out), "--seed", seed,
            "--device", "cpu", *erasure]
    assert cli_main(argv) == 0
    return out


def pngs(folder):
    return {path.name: path.read_bytes() for path in sorted(folder.glob("*.png")) if path.name != "grid.png"}


def test_sample_takes_an_adapter_as_a_checkpoint_and_a_weighted_stack(runs, tmp_path):
    circle, star = str(runs / "circle" / "checkpoint"), str(runs / "star" / "checkpoint")
    as_checkpoint = sample(tmp_path, "as-checkpoint", "--checkpoint", circle)
    as_adapter = sample(tmp_path, "as-adapter", "--adapter", circle)
    assert pngs(as_checkpoint) == pngs(as_adapter) and len(pngs(as_adapter)) == 2
    stacked = sample(tmp_path, "stacked", "--adapter", circle, "--adapter", star, "--adapter-weight", "1",
                     "--adapter-weight", "0.5")
    recorded = json.loads((stacked / "prompts.json").read_text())["checkpoint"]
    assert recorded == f"1 x {circle} + 0.5 x {star}"
    # a zero weight on the second adapter is the first adapter alone
    alone = sample(tmp_path, "alone", "--adapter", circle, "--adapter", star, "--adapter-weight", "1",
                   "--adapter-weight", "0")
    assert pngs(alone) == pngs(as_adapter)
    # run folders stand for their checkpoints, as with --checkpoint
    by_checkpoint = sample(tmp_path, "by-checkpoint", "--adapter", circle, "--adapter", star)
    by_run = sample(tmp_path, "by-run", "--adapter", str(runs / "circle"), "--adapter", str(runs / "star"))
    assert pngs(by_run) == pngs(by_checkpoint)
    assert all(Image.open(path).size == (64, 64) for path in stacked.glob("0*.png"))


@pytest.mark.parametrize("extra, message", [
    (["--checkpoint", "CIRCLE", "--adapter", "CIRCLE"], "give --checkpoint or --adapter, not both"),
    (["--adapter-weight", "2"], "give the --adapter folders too"),
    (["--adapter", "CIRCLE", "--adapter", "STAR", "--adapter-weight", "1"], "1 --adapter-weight for 2 --adapter"),
    (["--adapter", "CIRCLE", "--adapter-weight", "nan"], "finite"),
    (["--adapter", "NOWHERE", "--adapter", "CIRCLE"], "does not exist"),
    (["--adapter", "FULL", "--adapter", "CIRCLE"], "adapter_config.json is unreadable"),
])
def test_bad_adapter_flags_are_one_line_errors_before_anything_is_drawn(runs, tmp_path, capsys, extra, message):
    names = {"CIRCLE": runs / "circle" / "checkpoint", "STAR": runs / "star" / "checkpoint",
             "FULL": runs / "full" / "checkpoint", "NOWHERE": tmp_path / "nowhere"}
    extra = [str(names.get(value, value)) for value in extra]
    error = usage_error(capsys, ["sample", "--prompt", "a red circle", "--out", str(tmp_path / "s"), *extra])
    assert message in error
    assert not (tmp_path / "s").exists()


def test_export_needs_merge_for_an_adapter_and_refuses_it_for_a_full_checkpoint(runs, tmp_path, capsys):
    circle, full = str(runs / "circle" / "checkpoint"), str(runs / "full" / "checkpoint")
    assert "give --merge" in usage_error(capsys, ["export", "--checkpoint", circle, "--out", str(tmp_path / "a")])
    assert "not an adapter folder" in usage_error(capsys, ["export", "--checkpoint", full, "--merge", "--out",
                                                           str(tmp_path / "b")])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert cli_main(["export", "--checkpoint", circle, "--merge", "--out", str(tmp_path / "merged")]) == 0
    # the merged export draws what the adapter draws
    merged = sample(tmp_path, "from-export", "--model", str(tmp_path / "merged"))
    with_adapter = sample(tmp_path, "with-adapter", "--adapter", circle)
    assert pngs(merged) == pngs(with_adapter)


def test_eval_takes_an_adapter_stack(runs, tmp_path, capsys):
    pairs = tmp_path / "circle.jsonl"
    assert cli_main(["pairs", "--concept", "circle", "--n", "3", "--out", str(pairs), "--quiet"]) == 0
    circle, star = str(runs / "circle" / "checkpoint"), str(runs / "star" / "checkpoint")
    out = tmp_path / "report"
    assert cli_main(["eval", "--adapter", circle, "--adapter", star, "--benchmark", str(pairs), "--out", str(out),
                     "--seeds", "1", "--device", "cpu", "--quiet"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["sides"]) == {"before", "after"}
    assert circle in metrics["checkpoint"] and star in metrics["checkpoint"]


def test_erase_several_concepts_in_one_run(tmp_path, capsys):
    out = tmp_path / "both"
    assert cli_main(["erase", "--concept", "circle", "--concept", "star", "--steps", "2", "--eval-images", "2",
                     "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "erased 'circle' (-> 'square') and 'star' (-> 'square')" in printed
    assert "| circle (erased) |" in printed and "| star (erased) |" in printed and "| square |" in printed
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert evaluation["config"]["concept"] == ["circle", "star"]
    error = usage_error(capsys, ["erase", "--concept", "circle", "--concept", "star", "--anchor", "square",
                                 "--anchor", "cross", "--anchor", "triangle", "--out", str(tmp_path / "never")])
    assert "3 anchors for 2 concepts" in error
    error = usage_error(capsys, ["erase", "--concept", "circle", "--concept", "square", "--anchor", "square",
                                 "--out", str(tmp_path / "never")])
    assert "is erased too" in error
    assert not (tmp_path / "never").exists()


def test_filter_and_attack_take_an_adapter_as_they_take_its_merged_checkpoint(runs, tmp_path):
    """An adapter run's checkpoint, given to filter and attack, decides exactly as the full
    checkpoint of its merged weights does (the same images, the same verdicts)."""
    from earkit.engine.checkpoint import erasure_tensors, load_checkpoint, save_checkpoint
    from earkit.engine.model import load_janus
    from earkit.engine.shapesworld import generator_folder

    adapter = runs / "circle" / "checkpoint"
    model, _ = load_janus(str(generator_folder()), device="cpu", dtype="fp32")
    merged = tmp_path / "merged-checkpoint"
    full = load_checkpoint(runs / "full" / "checkpoint")
    save_checkpoint(merged, tensors=erasure_tensors(model, adapter), optimizer_state={}, state={},
                    config=full.config, base_model=str(generator_folder()))
    pairs = tmp_path / "circle.jsonl"
    assert cli_main(["pairs", "--concept", "circle", "--n", "3", "--out", str(pairs), "--quiet"]) == 0
    for name, erasure in (("adapter", ["--adapter", str(adapter)]), ("merged", ["--checkpoint", str(merged)])):
        assert cli_main(["filter", "--pairs", str(pairs), "--seeds", "1", "--device", "cpu", "--quiet", *erasure,
                         "--out", str(tmp_path / f"kept-{name}.jsonl")]) == 0
        assert cli_main(["attack", "--concept", "circle", "--attacks", "white-box", "--attack-steps", "2",
                         "--attack-tokens", "2", "--max-prompts", "2", "--seeds", "1", "--device", "cpu", "--quiet",
                         *erasure, "--out", str(tmp_path / f"attack-{name}")]) == 0
    decisions = [[{k: v for k, v in json.loads(line).items() if k != "filter"}
                  for line in (tmp_path / f"kept-{name}.decisions.jsonl").read_text().splitlines()]
                 for name in ("adapter", "merged")]
    assert decisions[0] == decisions[1] and sum(1 for record in decisions[0] if record) == 3  # the pairs, after a header
    # the white-box search against the erased side, and every verdict, are the same
    records = [json.loads((tmp_path / f"attack-{name}" / "attacks.json").read_text()) for name in ("adapter", "merged")]
    assert records[0]["attacks"] == records[1]["attacks"] and set(records[0]["attacks"]) == {"plain", "white-box"}
