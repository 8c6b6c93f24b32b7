"""Quick tests of the benchmarks: the memory measure, `python -m earkit.bench kernels --quick`,
and `bench/gpu_check.py --smoke` (the GPU check's every code path on CPU via the Triton interpreter)."""

import os
import subprocess
import sys
from pathlib import Path

import torch

from earkit.bench.memory import MB, cpu_peak_extra_bytes, peak_of_running_sum

REPO = Path(__file__).resolve().parents[1]


def test_peak_of_running_sum():
    assert peak_of_running_sum([]) == 0
    assert peak_of_running_sum([5, 3, -5, 4, -7]) == 8
    assert peak_of_running_sum([-10, 4]) == 0  # a free of something older never goes below the start


def test_cpu_peak_extra_bytes_counts_a_known_pattern():
    already_there = torch.ones(50 * MB, dtype=torch.uint8)  # before the measure: not counted

    def pattern():
        a = torch.empty(100 * MB, dtype=torch.uint8)
        b = torch.empty(100 * MB, dtype=torch.uint8)
        del a
        c = torch.empty(100 * MB, dtype=torch.uint8)  # peak: b + c = 200 MB, never 300
        return b, c

    peak, (b, c) = cpu_peak_extra_bytes(pattern)
    assert abs(peak - 200 * MB) < MB, peak / MB
    assert already_there.numel() == 50 * MB


def test_cpu_peak_extra_bytes_sees_transients_inside_ops():
    # An fp32 copy and a product that live only inside the expression: 400 MB + 400 MB at the
    # peak although nothing big outlives it. The profiler's "[memory]" rows alone miss these.
    x = torch.ones(100 * MB, dtype=torch.uint8)
    peak, total = cpu_peak_extra_bytes(lambda: (x.float() * 2).sum())
    assert abs(peak - 800 * MB) < MB, peak / MB
    assert float(total) == 2 * 100 * MB


def test_cpu_peak_extra_bytes_of_a_backward():
    x = torch.randn(1024, 1024, requires_grad=True)  # 4 MB
    peak, _ = cpu_peak_extra_bytes(lambda: torch.autograd.grad(x.exp().sum(), x))
    # exp's output (saved for backward) and the gradient, 4 MB each, at least.
    assert 8 * MB - 1024 <= peak <= 20 * MB, peak / MB


def run(args, env_extra=None, timeout=180):
    # Not from the repository root: `python -m` puts the working directory first on sys.path, and
    # there the source folder earkit/ would shadow the installed package.
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, *args], cwd=REPO / "tests", env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_kernels_benchmark_quick(tmp_path):
    out = tmp_path / "results.md"
    result = run(["-m", "earkit.bench", "kernels", "--quick", "--out", str(out)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "| op | dtype | impl | median ms | peak extra MB | speedup vs eager | memory ratio vs eager |" in result.stdout
    for op in ("hard", "guided"):
        for dtype in ("fp32", "bf16"):
            assert f"| {op} | {dtype} | torch eager |" in result.stdout
    assert "failed" not in result.stdout, result.stdout
    report = out.read_text()
    assert "### CPU loss kernels" in report and "| hard | fp32 |" in report


def test_gpu_check_smoke_passes_every_check(tmp_path):
    out = tmp_path / "gpu_check.md"
    result = run([str(REPO / "bench" / "gpu_check.py"), "--smoke", "--out", str(out)],
                 env_extra={"TRITON_INTERPRET": "1"})
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    assert "ALL PASS" in result.stdout
    report = out.read_text()
    check_rows = [line for line in report.splitlines() if line.startswith("| 2x8x64") or line.startswith("| 1x8x64")]
    assert len(check_rows) == 32  # 2 shapes x 2 dtypes x 2 ops x 2 reductions x 2 inplace
    assert all(line.endswith("| PASS |") for line in check_rows), "\n".join(check_rows)
    assert "4 split(s) per row" in report  # the split-row layout was exercised
    timing_rows = [line for line in report.splitlines() if line.startswith("| masked | 16 |")
                   or line.startswith("| guided | 16 |")]
    assert len(timing_rows) == 10  # eager, eager fp32, torch.compile, earkit, earkit inplace; per op
    assert all("Error" not in line for line in timing_rows), "\n".join(timing_rows)


def test_load_bench_neighbours_burn_a_core_and_are_always_stopped():
    import time

    from earkit.bench import load

    neighbours = load.start_neighbours("python", 2, seconds=60.0)
    try:
        time.sleep(1.5)
        assert all(process.poll() is None for process in neighbours)  # still busy, not crashed
    finally:
        load.stop(neighbours)
    assert all(process.returncode is not None for process in neighbours)
    # the deadline inside bounds a neighbour even if the benchmark itself is killed
    started = time.perf_counter()
    bounded = load.start_neighbours("torch", 1, seconds=1.0)
    assert bounded[0].wait(timeout=60) == 0 and time.perf_counter() - started < 60


def test_load_bench_table_and_command():
    from earkit.bench import load

    assert load.erase_command(Path("/tmp/x"), quick=True)[-4:] == ["--steps", "16", "--eval-images", "20"]
    rows = [{"load": "none (idle)", "seconds": 10.0, "ratio": 1.0}, {"load": "2 x torch", "seconds": 25.0, "ratio": 2.5}]
    table = load.markdown(rows, "earkit erase", None)
    assert "| 2 x torch | 25.0 | 2.50 |" in table and "Target: at most 3x" in table
