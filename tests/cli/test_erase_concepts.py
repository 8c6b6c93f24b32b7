"""`earkit erase --concepts SPEC`: several erasures, one run each into OUT/<concept>; under torchrun
concept k runs whole on rank k % WORLD_SIZE (no process group), each equal to its single run."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from earkit.cli import main as cli_main
from earkit.cli.erase import concept_slug, parse_concepts
from earkit.engine.shapesworld import generator_folder
from helpers import usage_error
from jobs import torchrun

GENERATOR = str(generator_folder())
TRAIN = ["erase", "--model", GENERATOR, "--device", "cpu", "--optimizer", "adamw", "--window", "8", "--steps", "2",
         "--batch-size", "2", "--seed", "1"]


def trainable(out) -> dict:
    return load_file(str(Path(out) / "checkpoint" / "trainable.safetensors"))


def test_two_concepts_over_two_ranks_each_equal_its_single_run(tmp_path):
    done = torchrun([*TRAIN, "--concepts", "circle:square, Star:triangle", "--out", str(tmp_path / "many")], tmp_path)
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    assert len(lines) == 2, lines  # one per concept, from the rank that ran it
    assert any(line.startswith("rank 0: circle -> square: 2 steps") for line in lines), lines
    assert any(line.startswith("rank 1: Star -> triangle: 2 steps") for line in lines), lines
    assert sorted(entry.name for entry in (tmp_path / "many").iterdir()) == ["circle", "star"]
    for concept, anchor, slug in (("circle", "square", "circle"), ("Star", "triangle", "star")):
        single = tmp_path / f"single-{slug}"
        assert cli_main(TRAIN + ["--concept", concept, "--anchor", anchor, "--out", str(single)]) == 0
        got, want = trainable(tmp_path / "many" / slug), trainable(single)
        assert got.keys() == want.keys()
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-5, msg=name)
        config = json.loads((tmp_path / "many" / slug / "metrics.json").read_text())["config"]
        assert (config["concept"], config["anchor"]) == (concept, anchor)


def test_the_shapesworld_default_takes_concepts_alone_and_prints_a_line_each(tmp_path, capsys):
    out = tmp_path / "shapes"
    argv = ["erase", "--concepts", "circle,square", "--steps", "1", "--batch-size", "2", "--eval-images", "2",
            "--out", str(out)]
    assert cli_main(argv) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(lines) == 2 and lines[0].startswith("circle -> square: 1 steps") and "drawn as asked" in lines[0], lines
    assert lines[1].startswith("square -> circle: 1 steps"), lines
    for concept, anchor in (("circle", "square"), ("square", "circle")):
        evaluation = json.loads((out / concept / "evaluation.json").read_text())
        assert (evaluation["concept"], evaluation["anchor"]) == (concept, anchor)
    # --resume applies to each run: both are done, so each only measures again
    assert cli_main(argv[:-2] + ["--out", str(out), "--resume"]) == 0
    # --force too: without it the folders are taken
    assert usage_error(capsys, argv).count("exists and is not empty") == 1
    assert cli_main(argv + ["--force"]) == 0


def test_concept_files_of_each_kind(tmp_path):
    (tmp_path / "c.txt").write_text("# erase these\nchurch:cinema\n\n Van Gogh : Monet \n")
    (tmp_path / "c.jsonl").write_text('{"concept": "church", "anchor": "cinema"}\n\n{"concept": "Van Gogh", '
                                      '"anchor": "Monet"}\n')
    (tmp_path / "c.csv").write_text("concept,anchor\nchurch,cinema\nVan Gogh,Monet\n")
    for name in ("c.txt", "c.jsonl", "c.csv"):
        assert parse_concepts(str(tmp_path / name), shapes_world=False) == [("church", "cinema"), ("Van Gogh", "Monet")]
    (tmp_path / "shapes.csv").write_text("concept,anchor\nstar,\nsquare,\n")
    assert parse_concepts(str(tmp_path / "shapes.csv"), shapes_world=True) == [("star", "square"), ("square", "circle")]
    assert parse_concepts("church:cinema , dog:cat", shapes_world=False) == [("church", "cinema"), ("dog", "cat")]
    assert concept_slug("Van Gogh's  Starry-Night!") == "van-gogh-s-starry-night"


@pytest.mark.parametrize("flags, expect", [
    (["--model", GENERATOR, "--concepts", "circle"], "has no anchor"),
    (["--model", GENERATOR, "--concepts", "circle:square,Circle!:triangle"], "would both write"),
    (["--concepts", "circle:square", "--concept", "star"], "drop --concept"),
    (["--model", GENERATOR, "--concepts", "circle:square", "--pairs", "{tmp}/p.jsonl"], "drop --pairs"),
    (["--concepts", "circle:square:star"], "more than one ':'"),
    (["--concepts", "{tmp}/missing.txt"], "does not exist"),
    (["--concepts", "circle:circle"], "the same"),
    (["--concepts", "hexagon"], "ShapesWorld shapes"),
    (["--concepts", "circle:square,,star"], "has no concept"),
    (["--concepts", "{tmp}/bad.jsonl"], "not a JSON record"),
    (["--concepts", "{tmp}/bad.csv"], "'concept' column"),
    (["--concepts", "{tmp}/empty.txt"], "names no concept"),
    (["--concepts", "{tmp}/list.yaml"], "give a .txt"),
    (["--model", GENERATOR, "--concepts", "?!:cinema"], "no folder name"),
    (["--concepts", "circle,star", "--resume"], "nothing to resume"),
])
def test_bad_concepts_are_one_line_before_any_run(tmp_path, capsys, flags, expect):
    (tmp_path / "bad.jsonl").write_text('{"concept": "circle"}\n{oops\n')
    (tmp_path / "bad.csv").write_text("shape,anchor\ncircle,square\n")
    (tmp_path / "empty.txt").write_text("# nothing\n")
    (tmp_path / "list.yaml").write_text("- circle\n")
    out = tmp_path / "out"
    error = usage_error(capsys, ["erase", "--out", str(out), "--steps", "1"] + [f.format(tmp=tmp_path) for f in flags])
    assert expect in error, error
    assert not out.exists()
