"""engine/distributed.py without a job: what torchrun's variables say, the timeout, and that a
lone process runs every collective as the identity. The jobs themselves (2 gloo processes) are
in tests/ecgvf/test_distributed.py and tests/engine/test_erase_distributed.py."""

import subprocess
import sys
import textwrap
import time

import pytest
import torch

from earkit.engine import distributed
from jobs import child_environment, free_port


@pytest.fixture
def environment(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", distributed.TIMEOUT_ENV):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_a_lone_process_is_rank_0_of_1(environment):
    assert distributed.launch_environment() == distributed.ALONE
    environment.setenv("WORLD_SIZE", "1")
    assert distributed.launch_environment() == distributed.ALONE
    ranks = distributed.current()
    assert ranks.main and not ranks.sharded and str(ranks) == "rank 0 of 1"
    # every collective is the identity
    assert distributed.gather_to_main({"a": 1}, "x") == [{"a": 1}]
    assert distributed.broadcast_from_main([1, 2], "x") == [1, 2]
    tensor = torch.ones(3)
    assert distributed.all_reduce_sum(tensor, "x") is tensor and tensor.tolist() == [1, 1, 1]
    distributed.barrier("x")
    assert distributed.start("cpu") == distributed.ALONE  # no group for one process
    assert distributed.rank_device("cpu") == "cpu" and distributed.rank_device(None) is None


def test_torchrun_variables_are_read_and_checked(environment):
    environment.setenv("WORLD_SIZE", "4")
    environment.setenv("RANK", "3")
    environment.setenv("LOCAL_RANK", "1")
    assert distributed.launch_environment() == distributed.Ranks(3, 4, 1)
    environment.delenv("LOCAL_RANK")
    assert distributed.launch_environment() == distributed.Ranks(3, 4, 3)
    for name, value, message in [("RANK", "4", "RANK=4 is outside 0..3"), ("RANK", "x", "RANK='x'"),
                                 ("WORLD_SIZE", "0", "at least 1")]:
        environment.setenv(name, value)
        with pytest.raises(ValueError, match=message):
            distributed.launch_environment()
        environment.setenv("RANK", "3")
        environment.setenv("WORLD_SIZE", "4")
    environment.delenv("RANK")
    with pytest.raises(ValueError, match="RANK is not set"):
        distributed.launch_environment()


@pytest.mark.parametrize("value", ["0", "-3", "soon", "inf", "nan"])
def test_a_bad_timeout_is_named(environment, value):
    environment.setenv(distributed.TIMEOUT_ENV, value)
    with pytest.raises(ValueError, match=distributed.TIMEOUT_ENV):
        distributed.timeout_seconds()


def test_the_timeout_defaults_to_half_an_hour(environment):
    assert distributed.timeout_seconds() == 1800
    environment.setenv(distributed.TIMEOUT_ENV, "7.5")
    assert distributed.timeout_seconds() == 7.5


SCRIPT = textwrap.dedent("""
    import os, sys, time, torch
    from earkit.engine import distributed
    ranks = distributed.start("cpu")
    assert distributed.gather_to_main(ranks.rank, "gather") == ([0, 1] if ranks.main else None)
    assert distributed.broadcast_from_main("hello" if ranks.main else None, "broadcast") == "hello"
    assert distributed.all_reduce_sum(torch.full((2,), ranks.rank + 1.0), "sum").tolist() == [3.0, 3.0]
    if ranks.rank == 1:
        {fate}
    try:
        distributed.all_reduce_sum(torch.ones(1), "the second sum")
    except distributed.PeerLost as error:
        print(error, file=sys.stderr)
        distributed.abandon(1)  # as earkit's command line does
    """)


@pytest.mark.parametrize("fate, within", [("os._exit(9)", 10), ("time.sleep(60)", 20)])
def test_a_lost_rank_ends_the_other_with_peer_lost(tmp_path, fate, within):
    """A rank that dies (its connection closes) or hangs (no answer within EARKIT_DIST_TIMEOUT):
    the other ends with PeerLost naming itself and what it waited for, not a hang."""
    script = tmp_path / "job.py"
    script.write_text(SCRIPT.format(fate=fate))
    port = free_port()
    processes = []
    for rank in (0, 1):
        env = child_environment(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                                LOCAL_RANK=str(rank), **{distributed.TIMEOUT_ENV: "5"})
        processes.append(subprocess.Popen([sys.executable, str(script)], env=env, cwd=tmp_path,
                                          stderr=subprocess.PIPE, text=True))
    started = time.monotonic()
    try:
        rank0_error = processes[0].communicate(timeout=within + 60)[1]
        waited = time.monotonic() - started
    finally:
        for process in processes:
            process.kill()
            process.wait()
    assert processes[0].returncode == 1, rank0_error[-2000:]
    assert "rank 0 of 2: the second sum failed: another rank stopped" in rank0_error
    assert waited < within + 30
