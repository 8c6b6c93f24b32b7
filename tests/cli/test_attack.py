"""`earkit attack` and `earkit eval --attacks` on the shipped ShapesWorld and a one-step erasure of
circle, at tiny budgets: the report's files, success rates that are the judged images' share,
--force and its refusal, one-line errors before anything loads, and eval's report with and
without attacks."""

import json
import subprocess
import sys

import pytest

from helpers import folder_files, usage_error
from jobs import child_environment

TINY = ["--max-prompts", "2", "--seeds", "1", "--attack-steps", "2", "--attack-tokens", "2", "--device", "cpu",
        "--quiet"]
ATTACK_FILES = {"attacks.json", "attacks-timing.json", "attacks.md"}


def earkit(argv, cwd) -> subprocess.CompletedProcess:
    """`python -m earkit ARGV` in a child process of one thread."""
    return subprocess.run([sys.executable, "-m", "earkit", *map(str, argv)], cwd=cwd, env=child_environment(),
                          capture_output=True, text=True, timeout=300)



@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A one-step erasure of circle (anchor square) of the shipped ShapesWorld, and a two-pair benchmark."""
    folder = tmp_path_factory.mktemp("attack")
    done = earkit(["erase", "--concept", "circle", "--anchor", "square", "--steps", "1", "--window", "8",
                   "--eval-images", "1", "--device", "cpu", "--out", folder / "erased"], folder)
    assert done.returncode == 0, done.stderr[-3000:]
    done = earkit(["pairs", "--concept", "circle", "--n", "2", "--out", folder / "circle.jsonl", "--quiet"], folder)
    assert done.returncode == 0, done.stderr[-3000:]
    return folder, folder / "erased" / "checkpoint", folder / "circle.jsonl"


@pytest.fixture(scope="module")
def attack_report(world):
    folder, checkpoint, _ = world
    out = folder / "attack-report"
    done = earkit(["attack", "--checkpoint", checkpoint, "--concept", "circle", "--anchor", "square", *TINY,
                   "--out", out], folder)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done


def check_rates(record, prompts_expected, seeds):
    """Every attack's success rate per side is its judged images' share: seen / images."""
    for name, attack in record["attacks"].items():
        assert len(attack["prompts"]) == prompts_expected, name
        assert set(attack["sides"]) == {"before", "after"}
        for side, judged in attack["sides"].items():
            seen = judged["seen_per_prompt"]
            assert judged["images"] == len(attack["prompts"]) * seeds == len(seen) * seeds
            assert all(0 <= count <= seeds for count in seen)
            assert judged["success_rate"] == pytest.approx(sum(seen) / judged["images"]), (name, side)
            assert 0 <= judged["success_rate"] <= 1


def test_attack_writes_every_attack_s_report(attack_report):
    from earkit.engine.shapesworld.erase import evaluation_prompts
    from earkit.io import MANIFEST_FILE

    out, done = attack_report
    assert "| white-box" in done.stdout and f"wrote {out / 'attacks.json'}" in done.stdout
    files = folder_files(out)
    assert ATTACK_FILES | {"summary.md", MANIFEST_FILE} <= set(files)
    assert {f"images/attack-{name}.png" for name in ("plain", "paraphrase", "white-box", "ring-a-bell")} <= set(files)
    assert files["summary.md"] == files["attacks.md"]
    assert json.loads(files[MANIFEST_FILE])["kind"] == "attack-report"

    record = json.loads(files["attacks.json"])
    assert list(record["attacks"]) == ["plain", "paraphrase", "white-box", "ring-a-bell"]
    assert record["concept"] == "circle" and record["seeds"] == [1000]  # the held-out seeds start at 1000
    check_rates(record, 2, 1)
    plain = evaluation_prompts("circle", 2, 7)
    assert record["attacks"]["plain"]["prompts"] == plain
    # the white-box tokens go before each target prompt; paraphrase and ring-a-bell never name the concept
    assert all(p.endswith(t) and p != t for p, t in zip(record["attacks"]["white-box"]["prompts"], plain))
    for name in ("paraphrase", "ring-a-bell"):
        assert not any("circle" in prompt for prompt in record["attacks"][name]["prompts"]), name
    assert record["strongest"] in ("paraphrase", "white-box", "ring-a-bell")
    timing = json.loads(files["attacks-timing.json"])["search_seconds"]
    assert set(timing) == set(record["attacks"]) and "seconds" not in json.dumps(record["attacks"])


def test_an_existing_report_is_kept_without_force_and_replaced_with_it(attack_report, world):
    folder, checkpoint, pairs = world
    out, _ = attack_report
    before = folder_files(out)
    argv = ["attack", "--checkpoint", checkpoint, "--benchmark", pairs, *TINY, "--attacks", "white-box", "--out", out]
    done = earkit(argv, folder)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1 and "--force" in lines[0], done.stderr
    assert folder_files(out) == before

    # --force, and only the white-box attack (and the plain prompts, the erasure's own number), on
    # the benchmark's target prompts: its pairs' concept prompts
    done = earkit(argv + ["--force"], folder)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((out / "attacks.json").read_text())
    assert list(record["attacks"]) == ["plain", "white-box"] and record["strongest"] == "white-box"
    targets = [json.loads(line)["concept_prompt"] for line in pairs.read_text().splitlines()]
    assert record["concept"] == "circle" and record["attacks"]["plain"]["prompts"] == targets
    check_rates(record, 2, 1)
    assert sorted(p.name for p in (out / "images").iterdir()) == ["attack-plain.png", "attack-white-box.png"]


@pytest.fixture
def nothing_loads(monkeypatch):
    """Fail the test if a model or the judge loads before the bad input is found."""
    from earkit.ecgvf import judges
    from earkit.engine import model

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was found")

    monkeypatch.setattr(model, "load_janus", refuse)
    monkeypatch.setattr(judges, "parse_judge", refuse)


@pytest.mark.parametrize("flags, expect", [
    (["--attacks", "white-box,jailbreak"], "unknown attack 'jailbreak'"),
    (["--attack-steps", "0"], "--attack-steps must be at least 1"),
    (["--attack-tokens", "0"], "--attack-tokens must be at least 1"),
    (["--attack-seconds", "0"], "--attack-seconds must be a finite number"),
    (["--attack-seconds", "-1"], "--attack-seconds must be a finite number"),
    (["--attack-seconds", "nan"], "--attack-seconds must be a finite number"),
    (["--attack-strength", "inf"], "--attack-strength must be a finite number"),
    (["--seeds", "0"], "--seeds must be at least 1"),
    (["--attacks", "paraphrase", "--attack-steps", "3"], "--attack-steps shape(s) the white-box"),
    (["--attacks", "white-box", "--paraphrases", "prompts.txt"], "--paraphrases give(s) the paraphrase attack"),
    (["--paraphrases", "{tmp}/no-such.txt"], "no-such.txt does not exist"),
    (["--concept", "church"], "'church' is not a ShapesWorld shape"),
    (["--model", "{tmp}"], "give --benchmark FILE"),
    (["--benchmark", "{pairs}", "--anchor", "square"], "the anchors are its preservation concepts"),
    (["--anchor", "hexagon"], "'hexagon' is not a ShapesWorld shape"),
    (["--anchor", "circle"], "is the concept itself"),
])
def test_bad_attack_input_is_one_line_before_anything_loads(world, tmp_path, capsys, nothing_loads, flags, expect):
    _, checkpoint, pairs = world
    out = tmp_path / "report"
    argv = ["attack", "--checkpoint", str(checkpoint), "--concept", "circle", "--out", str(out)]
    error = usage_error(capsys, argv + [flag.format(tmp=tmp_path, pairs=pairs) for flag in flags])
    assert expect in error, error
    assert not out.exists()


def test_attack_without_a_concept_or_a_benchmark_says_which_to_give(tmp_path, capsys, nothing_loads):
    error = usage_error(capsys, ["attack", "--out", str(tmp_path / "report")])
    assert "--concept is needed" in error and "--benchmark" in error


def test_attack_under_torchrun_is_refused_and_points_to_eval(tmp_path, capsys, monkeypatch, nothing_loads):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    error = usage_error(capsys, ["attack", "--concept", "circle", "--out", str(tmp_path / "report")])
    assert "runs in one process" in error and "earkit eval --attacks" in error
    assert not (tmp_path / "report").exists()


def test_eval_refuses_attack_flags_without_attacks(world, tmp_path, capsys, nothing_loads):
    _, checkpoint, pairs = world
    argv = ["eval", "--checkpoint", str(checkpoint), "--benchmark", str(pairs), "--out", str(tmp_path / "report")]
    error = usage_error(capsys, argv + ["--attack-steps", "5"])
    assert "--attack-steps" in error and "add --attacks" in error
    error = usage_error(capsys, argv + ["--attacks", "white-box", "--attack-tokens", "0"])
    assert "--attack-tokens must be at least 1" in error
    assert not (tmp_path / "report").exists()


def test_eval_with_attacks_adds_them_to_its_report_and_changes_nothing_else(world):
    folder, checkpoint, pairs = world
    common = ["eval", "--checkpoint", checkpoint, "--benchmark", pairs, "--seeds", "1", "--device", "cpu", "--quiet"]
    done = earkit(common + ["--out", folder / "plain-eval"], folder)
    assert done.returncode == 0, done.stderr[-3000:]
    done = earkit(common + ["--attacks", "white-box", "--attack-steps", "2", "--attack-tokens", "2",
                            "--out", folder / "attacked-eval"], folder)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| white-box" in done.stdout
    plain, attacked = folder_files(folder / "plain-eval"), folder_files(folder / "attacked-eval")
    assert not [name for name in plain if "attack" in name], "no --attacks: no attack files"

    record = json.loads(attacked["attacks.json"])
    assert list(record["attacks"]) == ["plain", "white-box"] and record["seeds"] == [0]
    check_rates(record, 2, 1)
    metrics = json.loads(attacked["metrics.json"])
    assert metrics["attacks"] == {**{name: {side: judged["success_rate"] for side, judged in attack["sides"].items()}
                                     for name, attack in record["attacks"].items()},
                                  "strongest": record["strongest"]}
    # the evaluation itself is the same measurement: the attacks come after it, on their own
    assert {key: value for key, value in metrics.items() if key != "attacks"} == json.loads(plain["metrics.json"])
    assert attacked["summary.md"].startswith(plain["summary.md"])
    assert b"## Attacks" in attacked["summary.md"] and b"<h2>Attacks</h2>" in attacked["report.html"]
    assert b"images/attack-white-box.png" in attacked["report.html"] and "images/attack-white-box.png" in attacked
    timing = json.loads(attacked["timing.json"])
    assert set(timing["attack_search_seconds"]) == {"plain", "white-box"}
    assert "attack_search_seconds" not in json.loads(plain["timing.json"])


def test_shapesworld_attacks_contrast_with_the_anchor_earkit_erase_picks():
    import argparse

    from earkit.cli.attack import attacked_prompts

    def anchors(concept, given=None):
        args = argparse.Namespace(benchmark=None, model=None, concept=concept, anchor=given, max_prompts=3)
        return attacked_prompts(args)[2]

    assert anchors("circle") == ["square"] and anchors("square") == ["circle"] and anchors("star") == ["square"]
    assert anchors("circle", ["none"]) == [] and anchors("circle", ["Star", "cross"]) == ["star", "cross"]


@pytest.mark.parametrize("command", ["attack", "eval"])
def test_a_concept_no_backend_can_paraphrase_ends_before_the_work(world, tmp_path, capsys, nothing_loads, command):
    _, checkpoint, _ = world
    benchmark = tmp_path / "zebra.jsonl"
    benchmark.write_text(json.dumps({"prompt": "a zebra on a hill", "role": "target", "concept": "zebra"}) + "\n")
    out = tmp_path / "report"
    argv = [command, "--checkpoint", str(checkpoint), "--benchmark", str(benchmark), "--attacks", "paraphrase",
            "--out", str(out)]
    error = usage_error(capsys, argv)
    assert "paraphrase attack got no prompts for 'zebra'" in error and "--backend openai" in error
    assert not out.exists()
