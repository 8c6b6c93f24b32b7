"""`earkit erase` under torch.distributed (gloo, 2 CPU processes): the ranks share each step's rows
and train to the weights one process trains to (to float rounding), a batch smaller than the world
still runs, a killed rank ends the other with one PeerLost line instead of a hang, and the
checkpoint it left resumes in one process to the uninterrupted result."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from earkit.cli import main as cli_main
from earkit.engine.shapesworld import generator_folder
from jobs import child_environment, free_port
from jobs import torchrun as run_job

TIMEOUT = 20  # EARKIT_DIST_TIMEOUT of the killed run
# The shipped ShapesWorld generator (64 image tokens) at a test's budget; its prompt words are
# shapes and colours, so the default templates' other words only draw a warning.
GENERATOR = str(generator_folder())
TRAIN = ["erase", "--model", GENERATOR, "--concept", "circle", "--anchor", "square", "--device", "cpu",
         "--optimizer", "adamw", "--window", "8", "--seed", "5"]


def torchrun(tmp_path, argv, nproc=2):
    return run_job(argv, tmp_path, ranks=nproc)


def trainable(out) -> dict:
    return load_file(str(Path(out) / "checkpoint" / "trainable.safetensors"))


def metrics(out) -> dict:
    return json.loads((Path(out) / "metrics.json").read_text())


def assert_same_run(got, want, tolerance=1e-5):
    got_tensors, want_tensors = trainable(got), trainable(want)
    assert got_tensors.keys() == want_tensors.keys()
    for name, tensor in want_tensors.items():
        torch.testing.assert_close(got_tensors[name], tensor, rtol=0, atol=tolerance, msg=name)
    got_metrics, want_metrics = metrics(got), metrics(want)
    for name in ("losses", "kept_fractions", "preserve_losses"):
        assert len(got_metrics[name]) == len(want_metrics[name]), name
        assert all(abs(a - b) <= tolerance for a, b in zip(got_metrics[name], want_metrics[name])), (
            name, got_metrics[name], want_metrics[name])
    assert got_metrics["optimizer_steps"] == want_metrics["optimizer_steps"]
    # training changed the weights: the agreement is not that of two untouched models
    base = load_file(str(Path(GENERATOR) / "model.safetensors"))
    if any(".lora_B." in name for name in want_tensors):  # an adapter: B starts at zero
        assert any(bool(tensor.abs().max() > 0) for name, tensor in want_tensors.items() if ".lora_B." in name)
    else:
        assert any(not torch.equal(tensor, base[name]) for name, tensor in want_tensors.items() if name in base)


def test_two_ranks_train_to_the_one_process_weights(tmp_path):
    # 3 rows a step over 2 ranks, 2 + 1, and a token threshold that drops about 60% of the tokens:
    # the ranks' kept-token sums differ, so a loss not scaled to the whole batch's would show.
    # (The default lr: Adam turns a gradient's last-bit noise into up to lr x noise / eps.)
    argv = TRAIN + ["--steps", "3", "--batch-size", "3", "--save-every", "2", "--token-threshold", "2"]
    done = torchrun(tmp_path, argv + ["--out", str(tmp_path / "two")])
    assert cli_main(argv + ["--out", str(tmp_path / "one")]) == 0
    assert_same_run(tmp_path / "two", tmp_path / "one")
    assert done.stdout.count("erased: 3 steps") == 1  # rank 0 alone prints
    assert sorted(entry.name for entry in (tmp_path / "two").iterdir()) == ["checkpoint", "metrics.json"]
    assert 0.2 < min(metrics(tmp_path / "two")["kept_fractions"]) < 0.8


def test_two_ranks_train_a_lora_adapter_to_the_one_process_adapter(tmp_path):
    # every rank draws the same A from the run's seed; the gradients of A and B add up over the ranks
    argv = TRAIN + ["--steps", "3", "--batch-size", "3", "--adapter", "lora", "--lora-rank", "4", "--lr", "1e-3"]
    torchrun(tmp_path, argv + ["--out", str(tmp_path / "two")])
    assert cli_main(argv + ["--out", str(tmp_path / "one")]) == 0
    assert_same_run(tmp_path / "two", tmp_path / "one")
    two = load_file(str(tmp_path / "two" / "checkpoint" / "adapter_model.safetensors"))
    one = load_file(str(tmp_path / "one" / "checkpoint" / "adapter_model.safetensors"))
    assert two.keys() == one.keys() and all(".lora_A." in name or ".lora_B." in name for name in one)
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=1e-5, msg=name)


def test_two_ranks_train_robust_to_the_one_process_weights(tmp_path):
    # --robust: each rank attacks its own rows, each row's attack seeded by its row in the whole
    # batch, so the attacked prompts, and the weights, are those of one process.
    argv = TRAIN + ["--steps", "2", "--batch-size", "3", "--robust", "--robust-steps", "3", "--robust-tokens", "2"]
    torchrun(tmp_path, argv + ["--out", str(tmp_path / "two")])
    assert cli_main(argv + ["--out", str(tmp_path / "one")]) == 0
    assert_same_run(tmp_path / "two", tmp_path / "one")


def test_the_shapesworld_default_resumed_on_two_ranks_with_a_batch_smaller_than_the_world(tmp_path, capsys):
    # One pair a step over two ranks: rank 1 has no rows, adds zero gradients and still takes
    # every step; the preservation term (ShapesWorld's default) is shared out the same way, and
    # rank 0 alone measures before and after. The first step ran in one process: its checkpoint,
    # read on rank 0 and handed to rank 1, continues at another world size.
    argv = ["erase", "--batch-size", "1", "--eval-images", "2", "--optimizer", "adamw"]
    assert cli_main(argv + ["--steps", "1", "--out", str(tmp_path / "two")]) == 0
    done = torchrun(tmp_path, ["erase", "--resume", "--steps", "3", "--eval-images", "2",
                               "--out", str(tmp_path / "two")])
    assert cli_main(argv + ["--steps", "3", "--out", str(tmp_path / "one")]) == 0
    assert_same_run(tmp_path / "two", tmp_path / "one")
    assert done.stdout.count("ShapesWorld: erased 'circle'") == 1 and "| circle (erased) |" in done.stdout
    evaluation = json.loads((tmp_path / "two" / "evaluation.json").read_text())
    assert evaluation["before"] == json.loads((tmp_path / "one" / "evaluation.json").read_text())["before"]
    assert len(metrics(tmp_path / "two")["preserve_losses"]) == 3


AGREEMENT = """
from earkit.engine import distributed
from earkit.engine.distributed import all_agree, main_decides
rank = distributed.start("cpu").rank
def pairs_missing_on_rank_1():
    if rank == 1:
        raise FileNotFoundError("pairs file p.jsonl does not exist")
    return rank
def output_folder_taken():
    assert rank == 0, "ran on another rank"
    raise FileExistsError("output folder out exists")
for check, what in ((pairs_missing_on_rank_1, all_agree), (output_folder_taken, main_decides)):
    try:
        what(check, "a check")
    except (FileNotFoundError, FileExistsError) as error:
        print(f"{type(error).__name__}: {error}")
print("values", main_decides(lambda: {"step": 3}, "rank 0's value"), all_agree(lambda: rank, "each its own"))
distributed.stop()
"""


def test_a_check_that_fails_on_one_rank_fails_on_every_rank_alike(tmp_path):
    port = free_port()
    command = [sys.executable, "-c", AGREEMENT]
    ranks = [subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=child_environment(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                                                    MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)))
             for rank in range(2)]
    outputs = [process.communicate(timeout=120) for process in ranks]
    for rank, (process, (stdout, stderr)) in enumerate(zip(ranks, outputs)):
        assert process.returncode == 0, stderr[-3000:]
        lines = stdout.splitlines()
        pairs_line = ("FileNotFoundError: " + ("" if rank == 1 else "rank 1 of 2: ")
                      + "pairs file p.jsonl does not exist")
        folder_line = "FileExistsError: " + ("" if rank == 0 else "rank 0 of 2: ") + "output folder out exists"
        assert lines == [pairs_line, folder_line, f"values {{'step': 3}} {rank}"], lines


def launch_ranks(argv, out_port, world_size=2, **extra):
    """The ranks started directly, as srun starts them (torchrun would end the survivor itself)."""
    command = [sys.executable, "-m", "earkit", *argv]
    return [subprocess.Popen(command, cwd=out_port[0], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=child_environment(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                                                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(out_port[1]), **extra))
            for rank in range(world_size)]


def test_a_killed_rank_ends_the_other_and_the_checkpoint_resumes_in_one_process(tmp_path):
    # sequential WGA: 2 windows a step, each with its own reductions and optimizer step
    argv = TRAIN + ["--steps", "12", "--batch-size", "2", "--save-every", "2", "--wga", "sequential",
                    "--window", "32"]
    killed = tmp_path / "killed"
    ranks = launch_ranks(argv + ["--out", str(killed)], (tmp_path, free_port()), EARKIT_DIST_TIMEOUT=str(TIMEOUT))
    try:
        deadline = time.monotonic() + 180
        while not (killed / "checkpoint").is_dir():
            assert ranks[0].poll() is None and ranks[1].poll() is None, ranks[0].communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 180 s"
            time.sleep(0.02)
        ranks[1].send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        _, stderr = ranks[0].communicate(timeout=TIMEOUT + 40)
        waited = time.monotonic() - killed_at
    finally:
        for process in ranks:
            if process.poll() is None:
                process.kill()
            process.communicate()
    assert ranks[0].returncode == 1, stderr[-3000:]
    assert waited < TIMEOUT + 15, waited
    errors = [line for line in stderr.replace("\r", "\n").splitlines() if line.startswith("earkit erase: error:")]
    assert len(errors) == 1 and "rank 0 of 2" in errors[0] and "failed: another rank stopped" in errors[0], stderr
    assert "Traceback" not in stderr
    step = torch.load(killed / "checkpoint" / "state.pt", weights_only=True)["step"]
    assert 2 <= step < 12 and not (killed / "metrics.json").exists()

    # --resume in ONE process: every setting from the checkpoint rank 0 wrote
    assert cli_main(["erase", "--model", GENERATOR, "--out", str(killed), "--resume"]) == 0
    assert cli_main(argv + ["--out", str(tmp_path / "straight")]) == 0
    assert_same_run(killed, tmp_path / "straight")
