"""Quick tests of the benchmarks: the memory measure, `python -m earkit.bench kernels --quick`,
and `python -m earkit.bench.gpu_check --smoke` (the GPU check's every stage on CPU via the Triton interpreter)."""

import ast
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from earkit.bench.memory import MB, cpu_peak_extra_bytes, peak_of_running_sum

REPO = Path(__file__).resolve().parents[2]


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
    # from the root that runs the checkout (its earkit/ folder) instead of the installed package.
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


def snapshot(*folders):
    """(path, size, mtime) of every file under the folders, bytecode caches left out."""
    found = set()
    for folder in folders:
        for path in Path(folder).rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts:
                stat = path.stat()
                found.add((str(path), stat.st_size, stat.st_mtime_ns))
    return found


def package_and_repo_folders():
    import earkit.bench

    return [Path(earkit.bench.__file__).resolve().parent, REPO / "bench"]


def gpu_check(args, cwd, timeout=300):
    """python -m earkit.bench.gpu_check --smoke ARGS from cwd (never the repository root)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    return subprocess.run([sys.executable, "-m", "earkit.bench.gpu_check", "--smoke", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def table_rows(report, first_cell):
    return [line for line in report.splitlines() if line.startswith(f"| {first_cell} |")]


def test_gpu_check_smoke_runs_every_stage_and_passes(tmp_path):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    out = tmp_path / "out" / "gpu_check.md"
    before = snapshot(*package_and_repo_folders())
    result = gpu_check(["--out", str(out)], cwd)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    assert "ALL PASS" in result.stdout
    report = out.read_text()
    assert result.stdout.count("### earkit gpu_check --smoke") == 2  # the report, then the summary that ends it
    for letter, what in (("a", "correctness"), ("b", "op timings"), ("e", "profiler"), ("f", "sampler"),
                         ("c", "engine at the Janus-Pro-tiny shape")):
        assert any(what in line and line.endswith("| done |") for line in table_rows(report, letter)), letter
    assert table_rows(report, "d")[0].endswith("| skipped: --engine-sizes names no size for it |")

    # (a) every layout the timings use, the forced ones and the matrix, logits-level then fused
    checks = {group: table_rows(report, group) for group in ("timed", "layout", "matrix")}
    logits = {group: [line for line in lines if "| linear " not in line] for group, lines in checks.items()}
    fused = {group: [line for line in lines if "| linear " in line] for group, lines in checks.items()}
    assert len(logits["timed"]) == 4  # 2 ops x inplace False / True, at the timed shape
    assert len(logits["layout"]) == 24  # 3 layouts x 2 ops x 2 reductions x 2 inplace
    assert len(logits["matrix"]) == 16  # 2 dtypes x 2 ops x 2 reductions x 2 inplace
    assert len(fused["timed"]) == 8  # 2 ops x (own layout + split in 2, in 4, 4-row chunks)
    assert len(fused["matrix"]) == 16  # 2 dtypes x 2 ops x 2 reductions x 2 heads
    every_check = [line for lines in checks.values() for line in lines]
    assert all(line.endswith("| PASS |") for line in every_check), "\n".join(every_check)
    for layout in ("rows split in 2", "rows split in 4"):
        assert any(layout in line for line in logits["layout"]) and any(layout in line for line in fused["timed"])
    assert any("| - | auto | mean |" in line for line in fused["timed"])  # unwindowed, as timed

    # (b) timings, torch.compile last; the targets and anchors table (nothing at the shapes in a smoke run)
    for op in ("masked", "guided"):
        impls = [line.split(" | ")[2] for line in table_rows(report, op)]
        assert impls == ["torch eager", "torch eager fp32", "earkit", "earkit inplace", "torch.compile eager"], impls
    for op in ("hard", "guided"):
        cells = [line.split(" | ") for line in table_rows(report, f"linear {op}")]
        assert any(c[1:4] == ["16", "32", "earkit (triton)"] and float(c[4]) > 0 for c in cells), cells
    assert "| linear hard | 9216 x 4096 | target (issue 12) | 3.60 | - | NOT MEASURED | 200 |" in report
    # (e) profiler, (f) sampler, (c) engine
    assert "#### (e) Where the fused ops spend their time" in report
    assert "linear hard N=16 H=32, by CPU op (self time):" in report and "linear guided N=16 H=32, by" in report
    sampler = table_rows(report, "fp32") + table_rows(report, "bf16")
    assert len(sampler) == 2 and all("| 2 x 16 | True |" in line and line.endswith("| SKIP |") for line in sampler)
    assert "#### (c) Engine, Janus-Pro-tiny shape" in report and "| train_ms_per_pair |" in report

    # the rows, as measured, beside the report; nothing written anywhere else
    rows = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    assert {"check", "linear_check", "timing", "linear_timing", "profile", "kernel", "sampler", "engine"} <= {
        row["kind"] for row in rows}
    assert sorted(path.name for path in out.parent.iterdir()) == ["gpu_check.jsonl", "gpu_check.md"]
    assert list(cwd.iterdir()) == []
    assert snapshot(*package_and_repo_folders()) == before


def test_gpu_check_without_out_writes_only_to_stdout(tmp_path):
    before = snapshot(*package_and_repo_folders())
    result = gpu_check(["--stages", "f"], tmp_path)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    assert "#### (f) Sampler on a tiny Janus" in result.stdout and "report:" not in result.stdout
    assert list(tmp_path.iterdir()) == []
    assert snapshot(*package_and_repo_folders()) == before


def test_gpu_check_stages_past_their_caps_stop_and_the_next_runs(tmp_path):
    out = tmp_path / "gpu_check.md"
    out.write_text("# earlier results\n")
    # a: stops itself between cases at its deadline (or is stopped, on a slow machine); b: cannot finish
    # in 5 s (its imports alone take half of that), so it is killed mid-row; e: runs as usual.
    result = gpu_check(["--stages", "a,b,e", "--caps", "a=10,b=5", "--out", str(out)], tmp_path)
    assert result.returncode == 1, result.stdout[-5000:] + result.stderr[-5000:]  # not every check ran
    report = out.read_text()
    assert report.startswith("# earlier results\n")  # --out keeps what the file held
    stage_a, stage_b, stage_e = (table_rows(report, letter)[0] for letter in "abe")
    assert "OUT OF TIME" in stage_a or "TIMED OUT" in stage_a, stage_a
    assert "TIMED OUT after 5 s" in stage_b and stage_e.endswith("| done |"), (stage_b, stage_e)
    rows = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    # every row measured before a stop is in the report
    measured = [row for row in rows if row["kind"] in ("check", "linear_check")]
    assert sum(len(table_rows(report, group)) for group in ("timed", "layout", "matrix")) == len(measured)
    assert len([row for row in rows if row["kind"] == "timing"]) == len(table_rows(report, "masked") + table_rows(
        report, "guided"))
    assert "not every check ran" in report


def test_gpu_check_budget_keeps_the_later_stages_minimum():
    from earkit.bench.gpu_check import PLANS, allowance, parse_caps

    limits = PLANS["gpu"]["limits"]
    letters = ["a", "b", "e", "f", "c", "d"]
    assert allowance(limits, letters, 0, 420) == limits["a"][0]  # its cap: time enough for all
    # stage c with 100 s left: d needs 40 at least, so c gets 60 (its own minimum: it runs)
    assert allowance(limits, letters, 4, 100) == 60
    assert allowance(limits, letters, 4, 90) < limits["c"][1]  # skipped, d still runs
    assert allowance(limits, letters, 5, 500) == limits["d"][0]
    caps = parse_caps("a=20,d=300", limits)
    assert caps["a"] == (20, 20) and caps["d"] == (300, limits["d"][1]) and caps["b"] == limits["b"]


def test_gpu_check_targets_and_anchors_verdicts():
    from earkit.bench.gpu_check import floor_ms, targets_rows, targets_table

    def row(op, n, h, impl, ms, mb=float("nan")):
        return {"op": op, "n": n, "h": h, "v": 16384, "impl": impl, "ms": ms, "mb": mb}

    measured = [row("hard", 9216, 4096, "earkit (triton)", 3.5, 150.0),
                row("hard", 9216, 4096, "torch eager", 5.2, 1800.0),
                row("guided", 9216, 4096, "earkit (triton)", 8.0, 900.0),
                row("hard", 1152, 2048, "earkit (triton)", 0.7)]
    verdicts = {(r["op"], r["n"], r["against"]): r for r in targets_rows(measured)}
    target = verdicts[("hard", 9216, "target (issue 12)")]
    assert (target["ms_result"], target["mb_result"]) == ("PASS", "PASS")
    assert abs(target["pct_floor"] - 100 * floor_ms("hard", 9216, 4096, 16384) / 3.5) < 1e-9
    assert abs(floor_ms("hard", 9216, 4096, 16384) - 3.16) < 0.01  # DESIGN.md's floors
    assert abs(floor_ms("guided", 9216, 4096, 16384) - 6.32) < 0.02
    assert verdicts[("guided", 9216, "target (issue 12)")]["ms_result"] == "FAIL (1.11x)"
    assert verdicts[("hard", 1152, "target (issue 12)")]["ms_result"] == "FAIL (1.17x)"
    assert verdicts[("hard", 1152, "torch eager (DESIGN.md, H200)")]["ms_result"] == "PASS"
    same_run = verdicts[("hard", 9216, "torch eager (this run)")]
    assert (same_run["limit_ms"], same_run["limit_mb"], same_run["ms_result"]) == (5.2, 1800.0, "PASS")
    assert verdicts[("guided", 1152, "torch eager (DESIGN.md, H200)")]["ms_result"] == "NOT MEASURED"
    assert verdicts[("hard", 9216, "cut-cross-entropy (DESIGN.md, H200)")]["mb_result"] == "FAIL (2.08x)"
    assert "| linear hard | 9216 x 4096 | target (issue 12) | 3.60 | 3.500 | PASS | 200 | 150 | PASS |" in (
        targets_table(measured))


def test_device_scripts_parse_and_wheels_stay_out_of_git():
    for script in ("bench/device_wheels.sh", "bench/device_run.sh"):
        result = subprocess.run(["bash", "-n", str(REPO / script)], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
    assert "/.whl/" in (REPO / ".gitignore").read_text().splitlines()


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


def bench_modules() -> dict:
    return {path.stem: path for path in sorted((REPO / "bench").glob("*.py")) if path.stem != "__init__"}


def bench_imports(path: Path, names) -> set:
    """The bench modules `path` imports: relative (from . import x, from .x import y) or as earkit.bench.x."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level == 1 or module == "earkit.bench":
                candidates = [module] if node.level == 1 and module else [alias.name for alias in node.names]
            elif module.startswith("earkit.bench."):
                candidates = [module.split(".")[2]]
            else:
                continue
            found.update(name.split(".")[0] for name in candidates)
        elif isinstance(node, ast.Import):
            found.update(alias.name.split(".")[2] for alias in node.names if alias.name.startswith("earkit.bench."))
    return found & set(names)


def test_no_two_bench_modules_import_each_other():
    modules = bench_modules()
    imports = {name: bench_imports(path, modules) - {name} for name, path in modules.items()}
    assert imports["loss_ops"] >= {"baselines", "linear"} and "baselines" in imports["linear"]  # the parser sees them
    circles = sorted((a, b) for a in imports for b in imports[a] if a < b and a in imports.get(b, ()))
    assert circles == [], circles


def test_no_bench_module_poses_as_a_top_level_package():
    # `python bench/gpu_check.py` puts bench/ first on sys.path: a bench/kernels.py stood in for Hugging
    # Face's `kernels` package there (transformers probes for it by name).
    # From the root (python -m pytest) the checkout's own engine/ is found as `engine`: that one
    # refuses to be used under the name (earkit/_source_folder.py), so only packages from elsewhere count.
    specs = {name: importlib.util.find_spec(name) for name in bench_modules() if not name.startswith("__")}
    taken = {name for name, spec in specs.items()
             if spec is not None and not Path(spec.origin or next(iter(spec.submodule_search_locations))).is_relative_to(REPO)}
    assert "kernels" not in bench_modules() and taken == set(), taken


def test_gpu_check_runs_as_a_script_from_the_repository_root():
    result = subprocess.run([sys.executable, "bench/gpu_check.py", "--help"], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and "--smoke" in result.stdout, result.stderr[-2000:]


def test_adapters_bench_sizes_count_what_an_erasure_holds():
    from earkit.bench.lora_adapters import janus_pro_7b_sizes, tensors_in

    # Janus-Pro-7B: 5 layers x q, k, v, o of 4096 x 4096; LoRA adds r x (4096 + 4096) to each
    assert janus_pro_7b_sizes() == {"full self_attn": 2 * 20 * 4096 * 4096, "LoRA r4": 4 * 20 * 4 * 8192,
                                    "LoRA r16": 4 * 20 * 16 * 8192}
    state = {0: {"step": 3, "__bnb_optimizer_quant_state__": {"state1": torch.zeros(4, 4, dtype=torch.uint8),
                                                              "absmax1": torch.zeros(2)}},
             1: {"exp_avg": torch.zeros(3), "nested": [torch.zeros(2, dtype=torch.float64)]}}
    assert sorted(t.numel() for t in tensors_in(state)) == [2, 2, 3, 16]
