"""--force replaces what earkit wrote, never anything else; an unwritable --out is found before the work.

Each command is given an output that holds a file earkit did not write (thesis.tex): it must
refuse with one line and exit 2, and the file (and everything beside it) must be as it was.
"""

import json
import os
from pathlib import Path

import pytest

from earkit.cli import main as cli_main
from earkit import io as earkit_io
from earkit.engine import checkpoint
from earkit.engine.tiny import save_tiny_janus
from helpers import folder_files, usage_error

VOCABULARY = ["red", "circle", "blue", "square"]


def foreign_folder(tmp_path: Path, name: str = "p") -> Path:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "thesis.tex").write_text("five years of work\n")
    return folder


def refused(capsys, argv, *, expect: str) -> str:
    error = usage_error(capsys, argv)
    assert expect in error, error
    return error


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model") / "janus"
    save_tiny_janus(folder, VOCABULARY)
    return folder


def test_sample_force_never_deletes_a_file_it_did_not_write(tmp_path, capsys):
    folder = foreign_folder(tmp_path)
    before = folder_files(tmp_path)
    refused(capsys, ["sample", "--prompt", "a red circle", "--out", str(folder), "--force"], expect="thesis.tex")
    assert folder_files(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["p"]


def test_sample_force_replaces_its_own_folder_but_not_once_a_file_is_added(tmp_path, tiny_model, capsys):
    out = tmp_path / "samples"
    argv = ["sample", "--model", str(tiny_model), "--prompt", "a red circle", "--out", str(out), "--device", "cpu"]
    assert cli_main(argv) == 0
    assert cli_main(argv + ["--seed", "1", "--force"]) == 0  # its own output: replaced
    assert json.loads((out / "prompts.json").read_text())["seed"] == 1
    (out / "notes.md").write_text("mine")
    before = folder_files(out)
    refused(capsys, argv + ["--force"], expect="notes.md")
    assert folder_files(out) == before


def test_sample_force_replaces_a_folder_written_before_manifests(tmp_path, tiny_model, capsys):
    out = tmp_path / "samples"
    argv = ["sample", "--model", str(tiny_model), "--prompt", "a red circle", "--out", str(out), "--device", "cpu"]
    assert cli_main(argv) == 0
    (out / earkit_io.MANIFEST_FILE).unlink()  # as the previous release wrote it: prompts.json lists the images
    assert cli_main(argv + ["--force"]) == 0
    (out / earkit_io.MANIFEST_FILE).unlink()
    (out / "thesis.tex").write_text("x")
    refused(capsys, argv + ["--force"], expect="thesis.tex")


def test_export_force_refuses_foreign_folders_and_the_base_model_itself(tmp_path, tiny_model, capsys):
    from earkit.engine.tiny import build_tiny_janus
    from earkit.engine.trainer import select_trainable

    model, _ = build_tiny_janus(VOCABULARY)
    tensors = {name: p.detach() for name, p in select_trainable(model, ["*layers.0.self_attn.q_proj*"]).items()}
    run = tmp_path / "run" / "checkpoint"
    checkpoint.save_checkpoint(run, tensors=tensors, optimizer_state={}, state={"step": 0}, config={},
                               base_model=tiny_model)
    base_before = folder_files(tiny_model)
    foreign = foreign_folder(tmp_path)
    common = ["export", "--model", str(tiny_model), "--checkpoint", str(run)]
    refused(capsys, common + ["--out", str(foreign), "--force"], expect="thesis.tex")
    refused(capsys, common + ["--out", str(tiny_model), "--force"], expect="base model")
    assert folder_files(tiny_model) == base_before and (foreign / "thesis.tex").is_file()
    out = tmp_path / "export"
    assert cli_main(common + ["--out", str(out)]) == 0
    assert cli_main(common + ["--out", str(out), "--force"]) == 0  # an earlier export: replaced
    assert (out / "config.json").is_file()


def test_world_build_force_refuses_a_foreign_folder_before_training(tmp_path, capsys):
    folder = foreign_folder(tmp_path)
    before = folder_files(tmp_path)
    refused(capsys, ["world", "build", "--quick", "--out", str(folder), "--force"], expect="thesis.tex")
    assert folder_files(tmp_path) == before


@pytest.mark.parametrize("with_model", [False, True])
def test_erase_force_starts_over_only_in_a_run_folder(tmp_path, tiny_model, capsys, with_model):
    folder = foreign_folder(tmp_path)
    before = folder_files(tmp_path)
    argv = ["erase", "--out", str(folder), "--force", "--steps", "1"]
    if with_model:
        argv += ["--model", str(tiny_model), "--concept", "circle", "--anchor", "square", "--device", "cpu",
                 "--optimizer", "adamw", "--trainable", "*layers.0.self_attn.q_proj*"]
    refused(capsys, argv, expect="thesis.tex")
    assert folder_files(tmp_path) == before


def test_erase_force_replaces_an_earlier_run(tmp_path, tiny_model, capsys):
    out = tmp_path / "run"
    argv = ["erase", "--model", str(tiny_model), "--concept", "circle", "--anchor", "square", "--device", "cpu",
            "--optimizer", "adamw", "--trainable", "*layers.0.self_attn.q_proj*", "--steps", "1", "--out", str(out)]
    assert cli_main(argv) == 0
    refused(capsys, argv, expect="not empty")
    assert cli_main(argv + ["--force", "--seed", "5"]) == 0
    assert json.loads((out / "metrics.json").read_text())["config"]["seed"] == 5
    (out / "checkpoint" / "my-notes.txt").write_text("mine")
    refused(capsys, argv + ["--force"], expect="checkpoint/my-notes.txt")
    assert (out / "checkpoint" / "my-notes.txt").read_text() == "mine"


def test_eval_force_refuses_a_report_folder_holding_a_foreign_file(tmp_path, capsys):
    from earkit.ecgvf.evaluate import REPORT_FORMAT

    report = tmp_path / "report"
    report.mkdir()
    (report / "metrics.json").write_text(json.dumps({"format": REPORT_FORMAT}))  # an old report, before manifests
    (report / "thesis.tex").write_text("x")
    benchmark = tmp_path / "bench.jsonl"
    benchmark.write_text(json.dumps({"concept_prompt": "a red circle", "anchor_prompt": "a red square"}) + "\n")
    before = folder_files(tmp_path)
    refused(capsys, ["eval", "--benchmark", str(benchmark), "--concept", "circle", "--out", str(report), "--force"],
            expect="thesis.tex")
    assert folder_files(tmp_path) == before


def test_filter_force_never_replaces_a_decisions_file_it_did_not_write(tmp_path, capsys):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"concept_prompt": "a red circle", "anchor_prompt": "a red square"}) + "\n")
    (tmp_path / "kept.decisions.jsonl").write_text("my own notes\n")
    before = folder_files(tmp_path)
    refused(capsys, ["filter", "--pairs", str(pairs), "--out", str(tmp_path / "kept.jsonl"), "--force"],
            expect="kept.decisions.jsonl")
    assert folder_files(tmp_path) == before


def test_pairs_force_never_replaces_a_summary_it_did_not_write(tmp_path, capsys):
    out = tmp_path / "circle.jsonl"
    argv = ["pairs", "--concept", "circle", "--n", "3", "--out", str(out)]
    assert cli_main(argv) == 0
    assert cli_main(argv + ["--force", "--seed", "1"]) == 0  # its own pair of files: replaced
    (tmp_path / "circle.summary.json").write_text('{"my": "own notes"}\n')
    before = folder_files(tmp_path)
    refused(capsys, argv + ["--force"], expect="circle.summary.json")
    assert folder_files(tmp_path) == before


def test_check_replaceable_names_what_is_foreign(tmp_path):
    folder = tmp_path / "ckpt"
    checkpoint.save_checkpoint(folder, tensors={"w": __import__("torch").zeros(2)}, optimizer_state={},
                               state={}, config={})
    earkit_io.check_replaceable(folder, force=True, kind="checkpoint", what="checkpoint")
    (folder / "sub").mkdir()
    (folder / "sub" / "extra.bin").write_bytes(b"1")
    with pytest.raises(FileExistsError, match="sub/extra.bin"):
        earkit_io.check_replaceable(folder, force=True, kind="checkpoint", what="checkpoint")
    with pytest.raises(FileExistsError, match="pass --force"):
        earkit_io.check_replaceable(folder, force=False, kind="checkpoint", what="checkpoint")
    with pytest.raises(FileExistsError, match="sub/extra.bin"):
        checkpoint.save_checkpoint(folder, tensors={"w": __import__("torch").ones(2)}, optimizer_state={},
                                   state={}, config={}, force=True)
    assert (folder / "sub" / "extra.bin").read_bytes() == b"1"


# ---------------------------------------------------------------- an output nothing can be written to


def unwritable_folder(tmp_path: Path) -> Path:
    """A folder this process cannot create anything in, whoever it runs as: for root, sysfs
    (permission bits do not stop root), else a read-only folder of our own."""
    if os.geteuid() == 0:
        return Path("/sys")
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    return folder


def test_check_writable_tries_for_real(tmp_path):
    earkit_io.check_writable(tmp_path / "new" / "deeper", "out")
    assert not (tmp_path / "new").exists() and list(tmp_path.iterdir()) == []  # probing leaves nothing
    with pytest.raises(PermissionError, match="cannot write"):
        earkit_io.check_writable(unwritable_folder(tmp_path) / "report", "report folder")


@pytest.mark.parametrize("command", ["eval", "sample", "erase", "filter", "pairs"])
def test_an_unwritable_out_is_one_line_and_exit_2_before_any_work(tmp_path, capsys, command):
    out = unwritable_folder(tmp_path) / "earkit-out"
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"concept_prompt": "a red circle", "anchor_prompt": "a red square"}) + "\n")
    argv = {
        "eval": ["eval", "--benchmark", str(pairs), "--concept", "circle", "--out", str(out)],
        "sample": ["sample", "--prompt", "a red circle", "--out", str(out)],
        "erase": ["erase", "--steps", "1", "--out", str(out)],
        "filter": ["filter", "--pairs", str(pairs), "--out", str(out / "kept.jsonl")],
        "pairs": ["pairs", "--concept", "circle", "--n", "2", "--out", str(out / "circle.jsonl")],
    }[command]
    refused(capsys, argv, expect="cannot write")
