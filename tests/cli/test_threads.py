"""CPU threads sized to the work: one thread for a small model on the CPU (the ShapesWorld
default), torch's default for anything else, the user's OMP_NUM_THREADS always respected.
The speed this buys on a busy machine is measured by `python -m earkit.bench load` (bench/RESULTS.md)."""

import json

import pytest
import torch

from earkit import cli
from earkit.engine import model as model_module
from earkit.engine.shapesworld import generator_folder


def folder_with_hidden_size(tmp_path, hidden_size):
    folder = tmp_path / f"janus-{hidden_size}"
    folder.mkdir()
    config = {"model_type": "janus", "text_config": {"hidden_size": hidden_size}}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_a_small_model_on_the_cpu_gets_one_thread(tmp_path):
    assert model_module.cpu_threads_for(generator_folder(), "cpu") == 1
    assert model_module.cpu_threads_for(folder_with_hidden_size(tmp_path, 4096), "cpu") is None  # Janus-Pro-7B
    assert model_module.cpu_threads_for("deepseek-community/Janus-Pro-1B", "cpu") is None  # a hub id: cannot tell
    assert model_module.cpu_threads_for(tmp_path / "missing", "cpu") is None
    assert model_module.cpu_threads_for(generator_folder(), "meta") is None  # not the CPU


def test_cpu_threads_restores_the_count():
    before = torch.get_num_threads()
    with model_module.cpu_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with model_module.cpu_threads(None):
        assert torch.get_num_threads() == before


@pytest.fixture
def threads_seen(monkeypatch):
    """Run the commands' runners as stubs that record torch's thread count."""
    seen = {}

    def recorder(name):
        def run(args):
            seen[name] = torch.get_num_threads()
        return run

    for name in ("sample", "erase"):
        monkeypatch.setattr(cli.command_module(name), "run", recorder(f"run_{name}"))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    return seen


def test_the_command_runs_shapesworld_on_one_thread_and_restores_the_count(tmp_path, threads_seen):
    original = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert cli.main(["sample", "--prompt", "a red circle", "--out", str(tmp_path / "s")]) == 0
        assert cli.main(["erase", "--out", str(tmp_path / "e")]) == 0
        assert threads_seen == {"run_sample": 1, "run_erase": 1}
        assert torch.get_num_threads() == 2
        big = folder_with_hidden_size(tmp_path, 2048)
        assert cli.main(["sample", "--model", str(big), "--prompt", "x", "--out", str(tmp_path / "b"),
                         "--device", "cpu"]) == 0
        assert threads_seen["run_sample"] == 2
    finally:
        torch.set_num_threads(original)


def test_the_users_omp_num_threads_wins(tmp_path, threads_seen, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    original = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert cli.main(["sample", "--prompt", "a red circle", "--out", str(tmp_path / "s")]) == 0
        assert threads_seen["run_sample"] == 2
    finally:
        torch.set_num_threads(original)
