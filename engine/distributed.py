"""earkit on torch.distributed: which process of a job this one is, the process group, and the few
collectives earkit's commands need. Launched by torchrun (so `accelerate launch` and Slurm's
`srun torchrun` as well), on one node or many; NCCL between GPUs, gloo between CPUs.

    torchrun --nproc-per-node 8 -m earkit eval --model FOLDER --checkpoint runs/church --benchmark b.jsonl --out r/

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK (and MASTER_ADDR / MASTER_PORT) for every process;
`earkit` reads them (`launch_environment`), starts the process group once (`start`), and every
library function that can share its work asks `current()`: a lone process (no group) is rank 0
of 1 and runs exactly the code a sharded run does, with no collective at all.

A process that dies or hangs must not leave the others waiting forever: the group has a timeout
(EARKIT_DIST_TIMEOUT seconds, default 1800), and a collective that fails (a peer's connection
closed, or no answer within the timeout) raises PeerLost, which the command line prints as one
line naming this rank, what it was waiting for, and what to do.
"""

from __future__ import annotations

import datetime
import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch

TIMEOUT_ENV = "EARKIT_DIST_TIMEOUT"
DEFAULT_TIMEOUT_SECONDS = 1800.0


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job: rank of world_size, and its GPU index on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes files and shows progress."""
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.world_size > 1

    def __str__(self) -> str:
        return f"rank {self.rank} of {self.world_size}"


ALONE = Ranks()


def _environment_integer(name: str) -> int | None:
    text = os.environ.get(name)
    if text is None or not text.strip():
        return None
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{name}={text!r} in the environment is not an integer (set by torchrun or srun)") from None


def launch_environment() -> Ranks:
    """The job torchrun (or srun with torch's env:// variables) launched this process into; ALONE
    when WORLD_SIZE is unset or 1. ValueError naming the variable when they do not add up."""
    world_size = _environment_integer("WORLD_SIZE")
    if world_size is None or world_size == 1:
        return ALONE
    if world_size < 1:
        raise ValueError(f"WORLD_SIZE={world_size} in the environment: it must be at least 1")
    rank = _environment_integer("RANK")
    if rank is None:
        raise ValueError(f"WORLD_SIZE={world_size} but RANK is not set: launch with torchrun, which sets both")
    if not 0 <= rank < world_size:
        raise ValueError(f"RANK={rank} is outside 0..{world_size - 1} (WORLD_SIZE={world_size})")
    local_rank = _environment_integer("LOCAL_RANK")
    return Ranks(rank, world_size, rank if local_rank is None else local_rank)


def timeout_seconds() -> float:
    """How long a collective waits for the other ranks (EARKIT_DIST_TIMEOUT, default 1800 s)."""
    text = os.environ.get(TIMEOUT_ENV)
    if text is None or not text.strip():
        return DEFAULT_TIMEOUT_SECONDS
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise ValueError(f"{TIMEOUT_ENV}={text!r}: the process group timeout must be a number of seconds > 0")
    return value


def _group_up() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def current() -> Ranks:
    """This process's Ranks when a process group is up (started here or by accelerate), else ALONE."""
    if not _group_up():
        return ALONE
    rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    local_rank = _environment_integer("LOCAL_RANK")
    return Ranks(rank, world_size, rank if local_rank is None else local_rank)


def uses_cuda(device) -> bool:
    """Whether a --device value (None: the default) puts this process on a GPU."""
    if device is None:
        return torch.cuda.is_available()
    return torch.device(str(device)).type == "cuda"


def start(device=None) -> Ranks:
    """Start the process group of the job this process was launched into (nothing for a lone
    process): NCCL when the ranks run on GPUs (each on cuda:LOCAL_RANK), gloo otherwise, with
    the EARKIT_DIST_TIMEOUT timeout on every collective."""
    ranks = launch_environment()
    if not ranks.sharded or _group_up():
        return current() if _group_up() else ranks
    if not torch.distributed.is_available():
        raise RuntimeError("this torch was built without torch.distributed: run earkit without torchrun")
    timeout = datetime.timedelta(seconds=timeout_seconds())
    on_gpu = uses_cuda(device)
    if on_gpu:
        count = torch.cuda.device_count()
        if ranks.local_rank >= count:
            raise ValueError(f"{ranks} has LOCAL_RANK {ranks.local_rank} but this node has {count} GPU(s): "
                             f"start at most {count} processes per node (--nproc-per-node)")
        torch.cuda.set_device(ranks.local_rank)
    try:
        torch.distributed.init_process_group("nccl" if on_gpu else "gloo", timeout=timeout)
    except (RuntimeError, ValueError) as error:
        raise PeerLost(f"{ranks}: could not join the job's process group ({type(error).__name__}: "
                       f"{_first_line(error)}); check MASTER_ADDR/MASTER_PORT, or that every rank started") from None
    return current()


def stop() -> None:
    """Leave the process group (if one is up), once the command is done."""
    if _group_up():
        torch.distributed.destroy_process_group()


def abandon(status: int) -> None:
    """End this process at once with `status`, after a PeerLost: the teardown of a process group
    whose peer died or hangs may wait on it or abort (SIGABRT) at interpreter exit, which would
    turn one clear line and exit 1 into a hang or a core dump."""
    import sys

    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)


def rank_device(device, ranks: Ranks | None = None):
    """The device a rank computes on: its own GPU (cuda:LOCAL_RANK) when the job's ranks run on
    GPUs and `device` names none in particular (None or "cuda"); `device` as it is otherwise.
    ranks: this process's (default: current(), the process group's)."""
    ranks = current() if ranks is None else ranks
    if not ranks.sharded or not uses_cuda(device):
        return device
    if device is None or torch.device(str(device)).index is None:
        return f"cuda:{ranks.local_rank}"
    return device


# ---------------------------------------------------------------- collectives, with a clear end


class PeerLost(RuntimeError):
    """A collective failed: another rank died, hung past the timeout, or never joined."""


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


@contextmanager
def collective(what: str):
    """Run a collective; its failure becomes PeerLost naming this rank and what it waited for."""
    try:
        yield
    except (RuntimeError, ValueError) as error:  # DistBackendError and gloo's timeouts are RuntimeErrors
        if isinstance(error, PeerLost):
            raise
        ranks = current()
        raise PeerLost(
            f"{ranks}: {what} failed: another rank stopped (it died, or did not answer within "
            f"{timeout_seconds():g} s, which {TIMEOUT_ENV} sets); that rank's own output says why "
            f"({type(error).__name__}: {_first_line(error)})") from None


def gather_to_main(value, what: str) -> list | None:
    """Every rank's `value` (picklable), in rank order, on rank 0; None on the other ranks."""
    ranks = current()
    if not ranks.sharded:
        return [value]
    gathered = [None] * ranks.world_size if ranks.main else None
    with collective(what):
        torch.distributed.gather_object(value, gathered, dst=0)
    return gathered


def broadcast_from_main(value, what: str):
    """Rank 0's `value` (picklable), on every rank."""
    ranks = current()
    if not ranks.sharded:
        return value
    holder = [value if ranks.main else None]
    with collective(what):
        torch.distributed.broadcast_object_list(holder, src=0)
    return holder[0]


def all_reduce_sum(tensor: torch.Tensor, what: str) -> torch.Tensor:
    """Sum `tensor` over the ranks, in place (every rank gets the sum); returns it."""
    if current().sharded:
        with collective(what):
            torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
    return tensor


def barrier(what: str) -> None:
    if current().sharded:
        with collective(what):
            torch.distributed.barrier()


# ---------------------------------------------------------------- one outcome for every rank

# An error one rank met becomes this same class on the others (any other class: RuntimeError), so
# that a usage error ends every rank of a torchrun job alike (exit 2) rather than leave them waiting.
# (A subclass, such as the trainer's TrainingDiverged, travels as the first of these it derives from.)
SHARED_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError,
                 ValueError, RuntimeError)


def _verdict(error: BaseException | None):
    if error is None:
        return None
    kind = next((kind for kind in type(error).__mro__ if kind in SHARED_ERRORS), RuntimeError)
    return kind.__name__, str(error)


def _raise_verdict(rank: int, verdict) -> None:
    name, message = verdict
    kind = {kind.__name__: kind for kind in SHARED_ERRORS}.get(name, RuntimeError)
    raise kind(f"rank {rank} of {current().world_size}: {message}")


def main_decides(function, what: str):
    """function() run on rank 0 alone (what reads the output folder, which only rank 0 needs to
    see: ranks share no filesystem), its value handed to every rank, or its error raised on every
    rank alike. In one process: function()."""
    ranks = current()
    if not ranks.sharded:
        return function()
    value, failure = None, None
    if ranks.main:
        try:
            value = function()
        except Exception as error:  # noqa: BLE001 - every rank must hear of it, then it is raised
            failure = error
    value, verdict = broadcast_from_main((value, _verdict(failure)) if ranks.main else None, what)
    if failure is not None:
        raise failure
    if verdict is not None:
        _raise_verdict(0, verdict)
    return value


def all_agree(function, what: str):
    """function() run on every rank (checks of what each rank reads for itself: the config, the
    prompt files, the model's config); when it fails on any rank, every rank raises the first
    failure in rank order, alike. Returns this rank's value. In one process: function()."""
    ranks = current()
    if not ranks.sharded:
        return function()
    value, failure = None, None
    try:
        value = function()
    except Exception as error:  # noqa: BLE001
        failure = error
    verdicts = gather_to_main(_verdict(failure), what)
    first = None
    if ranks.main:
        first = next(((rank, verdict) for rank, verdict in enumerate(verdicts) if verdict is not None), None)
    first = broadcast_from_main(first, what)
    if first is None:
        return value
    if first[0] == ranks.rank:
        raise failure
    _raise_verdict(*first)
