"""Launching earkit as a torch.distributed job from a test: `torchrun -m earkit ...` on CPU
processes (gloo), each importing the earkit this test imported (the checkout under
`python -m pytest` from the root, else the installed one), one thread a process."""

import os
import socket
import subprocess
import sys
from pathlib import Path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def child_environment(**extra) -> dict:
    """The environment of a child process: this test's earkit first on PYTHONPATH, one thread."""
    import earkit

    source = str(Path(earkit.__file__).resolve().parents[1])
    path = os.pathsep.join(filter(None, [source, os.environ.get("PYTHONPATH")]))
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, **extra}


def torchrun(argv, cwd, ranks: int = 2, timeout: float = 300, **environment) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node RANKS -m earkit ARGV`, run in `cwd` (not the repository root);
    asserts it exits 0 and returns it."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--master-addr",
               "127.0.0.1", "--master-port", str(free_port()), "-m", "earkit", *argv]
    done = subprocess.run(command, cwd=cwd, env=child_environment(**environment), capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done
