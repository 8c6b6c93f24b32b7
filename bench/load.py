"""`earkit erase` on a busy machine: how much slower it gets beside other CPU-bound work.

    python -m earkit.bench load                 # the full default `earkit erase`, idle and loaded
    python -m earkit.bench load --quick         # 16 steps, 20 images per shape: a minute or two
    python -m earkit.bench load --loads python,torch --neighbours 2 --out bench/RESULTS.md

A machine shared with other jobs gives each process a share of the cores. A process whose
thread pool is sized to all the cores and synchronises at a barrier after every small op
(OpenMP parallel regions, spin-waiting) does much worse than its share: every op waits for the
thread that the scheduler has parked, and the spinning threads burn the time slices the working
one needs. The benchmark measures exactly that: the same command alone, then beside N
neighbours that the benchmark starts and always stops itself (bounded by a deadline, killed in a
`finally`), and reports loaded / idle. A process that takes its fair share of the cores and
nothing less would be slowed by at most (N + its threads) / its threads; the target for the
default erasure is 3x beside two neighbours.

Neighbours:
  python  a pure-Python busy loop (one thread, never yields)
  torch   a torch job with torch's default thread pool: small matmuls and element-wise ops in a
          loop, the shape of another training run or a test suite on the same machine
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

NEIGHBOURS = {
    "python": "import time\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end:\n    pass\n",
    "torch": ("import time, torch\nend = time.monotonic() + {seconds}\na = torch.randn(192, 192)\n"
              "while time.monotonic() < end:\n    b = (a @ a).relu_().softmax(-1)\n    a = (a + 1e-3 * b).tanh()\n"),
}


def erase_command(out: Path, quick: bool) -> list[str]:
    command = [sys.executable, "-m", "earkit.cli", "erase", "--out", str(out), "--force"]
    if quick:
        command += ["--steps", "16", "--eval-images", "20"]
    return command


def timed_run(command: list[str], env: dict) -> tuple[float, str]:
    """Wall seconds of one run of the command, and the last line it printed (its table's end)."""
    started = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}): {result.stderr.strip()[-2000:]}")
    head = next((line for line in result.stdout.splitlines() if line.strip()), "")
    return seconds, head


def start_neighbours(kind: str, count: int, seconds: float) -> list[subprocess.Popen]:
    code = NEIGHBOURS[kind].format(seconds=seconds)
    env = {key: value for key, value in os.environ.items() if not key.startswith(("OMP_", "EARKIT_"))}
    return [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL) for _ in range(count)]


def stop(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        if process.poll() is None:
            process.kill()
    for process in processes:
        process.wait()


def main(args) -> list[dict]:
    if args.neighbours < 1:
        raise SystemExit("--neighbours must be at least 1")
    loads = [kind.strip() for kind in args.loads.split(",") if kind.strip()]
    unknown = [kind for kind in loads if kind not in NEIGHBOURS]
    if unknown or not loads:
        raise SystemExit(f"--loads: unknown kind(s) {unknown or loads}; choose from {', '.join(NEIGHBOURS)}")
    env = dict(os.environ)
    rows = []
    with tempfile.TemporaryDirectory(prefix="earkit-load-") as scratch:
        command = erase_command(Path(scratch) / "erased", args.quick)
        shown = "earkit erase" + (" --steps 16 --eval-images 20" if args.quick else "")
        idle, head = timed_run(command, env)
        print(f"idle: {idle:.1f} s  ({head[:100]})", flush=True)
        rows.append({"load": "none (idle)", "seconds": idle, "ratio": 1.0})
        for kind in loads:
            # Bounded twice over: a deadline inside the neighbour, and a kill here whatever happens.
            neighbours = start_neighbours(kind, args.neighbours, seconds=max(600.0, 20 * idle))
            try:
                time.sleep(1.0)  # let them reach their loop before the clock starts
                loaded, head = timed_run(command, env)
            finally:
                stop(neighbours)
            rows.append({"load": f"{args.neighbours} x {kind}", "seconds": loaded, "ratio": loaded / idle})
            print(f"beside {args.neighbours} {kind} neighbours: {loaded:.1f} s = {loaded / idle:.2f}x idle", flush=True)
    report = markdown(rows, shown, args)
    print(report)
    if args.out:
        with open(args.out, "a", encoding="utf-8") as file:
            file.write("\n" + report + "\n")
    return rows


def markdown(rows: list[dict], shown: str, args) -> str:
    import torch

    from .baselines import cpu_name

    threads = os.environ.get("OMP_NUM_THREADS", "not set")
    lines = [f"### `{shown}` on a busy machine, {datetime.now():%Y-%m-%d %H:%M}", "",
             f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, OMP_NUM_THREADS {threads}; "
             "wall time of the whole command (loading, measuring before and after, training); neighbours "
             "started and stopped by `python -m earkit.bench load`. Target: at most 3x idle beside two.", "",
             "| neighbours | wall s | x idle |", "| --- | ---: | ---: |"]
    lines += [f"| {row['load']} | {row['seconds']:.1f} | {row['ratio']:.2f} |" for row in rows]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--loads", default="python,torch", help="neighbour kinds, comma-separated: python, torch "
                                                                "(default: %(default)s)")
    parser.add_argument("--neighbours", type=int, default=2, help="neighbour processes at once (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="16 steps and 20 images per shape instead of the default run")
    parser.add_argument("--out", default=None, help="append the markdown table to this file")
