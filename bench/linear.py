"""Benchmark of the fused linear + loss ops (the head's last Linear and the loss in one op).

    python -m earkit.bench kernels                 # also runs this part, after the logits-level table
    python -m earkit.bench kernels --full-shapes   # the issue's grid on a CPU too (slow)

For each op (hard: linear_masked_cross_entropy; guided: linear_guided_cross_entropy) and shape
(N tokens, H hidden, V = 16384; bf16 by default) the median fwd+bwd ms of each implementation
over rotating inputs (ROTATIONS input sets, cycled, so no run finds its operands in cache),
its TFLOP/s counted on the useful matmul flops (hard 4NHV: logits and d hidden; guided 8NHV:
the three logits products and d hidden; the head is frozen, as in the engine, so no d weight),
that rate as a percent of a plain bf16 N x H @ H x V matmul timed in the same run, and the
peak extra memory of one fwd+bwd.

The implementations (a row per one that is installed; the others say why they are missing):
  torch eager       F.linear, then the logits-level eager chain of bench/baselines.py
  torch.compile     the same function compiled (inductor; --no-compile leaves it out)
  earkit            the fused op with the token threshold (and, for guided, the target)
  Liger fused linear CE, cut-cross-entropy (Apple)
                    anchors with no threshold and no soft target: they run their nearest
                    equivalent, hard labels with the thresholded-out tokens given as
                    ignore_index (the same loss value for the hard op; for the guided op a
                    different, cheaper loss), which the table's note says.
Threshold: the median per-token loss (float64 reference), so about half the tokens are kept.
"""

from __future__ import annotations

import datetime
import gc
import math
import os
import statistics
import time

import torch
import torch.nn.functional as F

from earkit.kernels import backend_name, linear_guided_cross_entropy, linear_masked_cross_entropy

from .baselines import ETA, cpu_name, guided_eager, hard_eager
from .memory import MB, cpu_peak_extra_bytes

CPU_SHAPES = [(576, 256, 16384), (1152, 256, 16384), (1152, 512, 16384)]
FULL_SHAPES = [(n, h, 16384) for h in (2048, 4096) for n in (1152, 2304, 9216)]
ROTATIONS = 3
ANCHOR_NOTE = "hard labels, threshold as ignore_index"


def make_inputs(n: int, h: int, v: int, dtype, device, seed: int) -> dict:
    """Head features ~ N(0, 1), a head scaled so logits are a few units wide, teachers close to the student."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    concept = randn(n, h)
    inputs = {
        "hidden": randn(n, h),
        "student": concept + 0.3 * randn(n, h),
        "concept": concept,
        "anchor": concept + 0.3 * randn(n, h),
        "weight": randn(v, h) * (2.0 / math.sqrt(h)),
        "bias": randn(v) * 0.1,
    }
    out = {k: x.to(device=device, dtype=dtype) for k, x in inputs.items()}
    out["target"] = torch.randint(0, v, (n,), generator=gen).to(device)
    return out


def token_losses(op: str, x: dict) -> torch.Tensor:
    """Per-token loss in float64 chunks (the threshold and the anchors' ignore mask)."""
    w, b = x["weight"].double(), x["bias"].double()
    losses = []
    for start in range(0, x["hidden"].shape[0], 1024):
        rows = slice(start, start + 1024)
        if op == "hard":
            z = x["hidden"][rows].double() @ w.t() + b
            losses.append(torch.logsumexp(z, -1) - z.gather(-1, x["target"][rows, None]).squeeze(-1))
        else:
            head = lambda k: x[k][rows].double() @ w.t() + b  # noqa: E731
            log_p = F.log_softmax((1 + ETA) * head("anchor") - ETA * head("concept"), -1)
            log_q = F.log_softmax(head("student"), -1)
            losses.append((log_p.exp() * (log_p - log_q)).sum(-1))
    return torch.cat(losses)


def with_triton_logits(loss_fn):
    """loss_fn with the fused op's logits made by its Triton kernel instead of cuBLAS (the
    forward reads EARKIT_LINEAR_LOGITS; the backward of "mean" and "sum" makes no logits)."""
    def run(leaf):
        previous = os.environ.get("EARKIT_LINEAR_LOGITS")
        os.environ["EARKIT_LINEAR_LOGITS"] = "triton"
        try:
            return loss_fn(leaf)
        finally:
            if previous is None:
                os.environ.pop("EARKIT_LINEAR_LOGITS", None)
            else:
                os.environ["EARKIT_LINEAR_LOGITS"] = previous
    return run


def implementations(op: str, x: dict, threshold: float, kept: torch.Tensor, compile_: bool):
    """[(name, note, fn(leaf) -> loss) or (name, why missing, None)], the eager row first."""
    w, b = x["weight"], x["bias"]
    if op == "hard":
        target = x["target"]

        def eager(leaf):
            return hard_eager(F.linear(leaf, w, b), target, threshold)

        def ours(leaf):
            return linear_masked_cross_entropy(leaf, w, target, b, threshold=threshold)
    else:
        concept, anchor = x["concept"], x["anchor"]

        def eager(leaf):
            with torch.no_grad():
                zc, za = F.linear(concept, w, b), F.linear(anchor, w, b)
            return guided_eager(F.linear(leaf, w, b), zc, za, threshold)

        def ours(leaf):
            return linear_guided_cross_entropy(leaf, concept, anchor, w, b, eta=ETA, threshold=threshold)

    rows = [("torch eager", "", eager)]
    if compile_:
        compiled = torch.compile(eager, dynamic=False)
        rows.append(("torch.compile", "", compiled))
    rows.append((f"earkit ({backend_name(w.device)})", "", ours))
    if w.is_cuda and w.dtype != torch.float32:
        # The logits engine earkit does not use by default on a GPU (cuBLAS), timed beside it:
        # the choice was made by a compile report, and this row is the measurement.
        rows.append(("Triton logits kernel (earkit, EARKIT_LINEAR_LOGITS=triton)", "", with_triton_logits(ours)))
    # The anchors: the tokens the threshold drops become ignore_index.
    anchor_target = torch.where(kept, x["target"], torch.full_like(x["target"], -100))
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss(ignore_index=-100)
        rows.append(("Liger fused linear CE", ANCHOR_NOTE, lambda leaf: liger(w, leaf, anchor_target, b)))
    except Exception as error:  # not installed, or no GPU for it
        rows.append(("Liger fused linear CE", f"not run: {type(error).__name__}", None))
    try:
        from cut_cross_entropy import linear_cross_entropy as cce

        rows.append(("cut-cross-entropy", ANCHOR_NOTE + ", no bias",
                     lambda leaf: cce(leaf, w, anchor_target, ignore_index=-100, reduction="mean")))
    except Exception as error:
        rows.append(("cut-cross-entropy", f"not run: {type(error).__name__}", None))
    return rows


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def fwd_bwd(fn, leaf):
    (grad,) = torch.autograd.grad(fn(leaf), leaf)
    return grad


def time_ms(fn, leaves, repeats: int, warmup: int, device) -> float:
    """Median ms over `repeats` runs, cycling through the rotating input leaves."""
    times = []
    for i in range(warmup + repeats):
        leaf = leaves[i % len(leaves)]
        _sync(device)
        start = time.perf_counter()
        fwd_bwd(fn, leaf)
        _sync(device)
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def peak_mb(fn, leaf, device) -> float:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fwd_bwd(fn, leaf)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / MB
    peak, _ = cpu_peak_extra_bytes(lambda: fwd_bwd(fn, leaf))
    return peak / MB


def matmul_tflops(n, h, v, dtype, device, repeats, warmup) -> float:
    """A plain N x H @ H x V matmul in the benchmark's dtype: the ceiling the rows are measured against."""
    a = torch.randn(n, h, device=device).to(dtype)
    b = torch.randn(h, v, device=device).to(dtype)
    times = []
    for i in range(warmup + repeats):
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return 2 * n * h * v / statistics.median(times) / 1e12


def run(shapes, dtype, device, repeats: int, warmup: int, compile_: bool, seed: int = 0, only=None, on_row=None):
    """The table's rows. only: implementation names to run (None: all); on_row(row) is called as
    each row is measured (bench/gpu_check.py streams them to its log, so a timeout loses none)."""
    results = []
    for n, h, v in shapes:
        ceiling = matmul_tflops(n, h, v, dtype, device, repeats, warmup)
        print(f"  N={n} H={h} V={v}: bf16-class matmul {ceiling:.2f} TFLOP/s", flush=True)
        sets = [make_inputs(n, h, v, dtype, device, seed + r) for r in range(ROTATIONS)]
        for op in ("hard", "guided"):
            losses = token_losses(op, sets[0])
            threshold = float(losses.median())
            kept = losses > threshold
            useful = (4 if op == "hard" else 8) * n * h * v
            key = "hidden" if op == "hard" else "student"
            leaves = [s[key].detach().clone().requires_grad_(True) for s in sets]
            # Every input set uses set 0's head and teachers; only the student rows rotate.
            for name, note, fn in implementations(op, sets[0], threshold, kept, compile_):
                if only is not None and name not in only:
                    continue
                row = {"op": op, "n": n, "h": h, "v": v, "impl": name, "note": note, "ms": math.nan,
                       "mb": math.nan, "tflops": math.nan, "pct": math.nan, "ceiling_tflops": ceiling}
                if fn is not None:
                    try:
                        row["ms"] = time_ms(fn, leaves, repeats, warmup, device)
                        row["mb"] = peak_mb(fn, leaves[0], device)
                        row["tflops"] = useful / (row["ms"] / 1e3) / 1e12
                        row["pct"] = 100 * row["tflops"] / ceiling
                    except Exception as error:  # one broken row must not hide the others
                        row["note"] = f"error: {type(error).__name__}: {str(error).splitlines()[0][:60]}"
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                results.append(row)
                if on_row is not None:
                    on_row(row)
                print(f"  {op:6s} N={n:5d} H={h:5d} {name:24s} {row['ms']:10.2f} ms {row['mb']:9.1f} MB "
                      f"{row['tflops']:7.3f} TFLOP/s {row['note']}", flush=True)
        del sets
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def _fmt(value, spec) -> str:
    return "-" if isinstance(value, float) and math.isnan(value) else format(value, spec)


def markdown_table(results) -> str:
    lines = [
        "| op | N | H | impl | median ms | TFLOP/s | % of matmul | peak extra MB | note |",
        "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in results:
        lines.append(f"| linear {r['op']} | {r['n']} | {r['h']} | {r['impl']} | {_fmt(r['ms'], '.2f')} "
                     f"| {_fmt(r['tflops'], '.3f')} | {_fmt(r['pct'], '.1f')} | {_fmt(r['mb'], '.1f')} | {r['note']} |")
    return "\n".join(lines)


def plot(results, path: str) -> str:
    """Time and memory per shape, one bar per implementation; returns what happened, in words."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no plot: matplotlib is not installed (pip install earkit[bench])"
    ran = [r for r in results if not math.isnan(r["ms"])]
    shapes = sorted({(r["n"], r["h"]) for r in ran})
    impls = list(dict.fromkeys(r["impl"] for r in ran))
    fig, axes = plt.subplots(2, 2, figsize=(12, 7), squeeze=False)
    width = 0.8 / max(len(impls), 1)
    for column, op in enumerate(("hard", "guided")):
        for row, (field, label) in enumerate((("ms", "fwd+bwd ms"), ("mb", "peak extra MB"))):
            ax = axes[row][column]
            for i, impl in enumerate(impls):
                values = {(r["n"], r["h"]): r[field] for r in ran if r["op"] == op and r["impl"] == impl}
                ax.bar([s + i * width for s in range(len(shapes))], [values.get(s, 0) for s in shapes], width,
                       label=impl)
            ax.set_xticks([s + 0.4 - width / 2 for s in range(len(shapes))])
            ax.set_xticklabels([f"N={n}\nH={h}" for n, h in shapes], fontsize=8)
            ax.set_ylabel(label)
            ax.set_title(f"linear {op}")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"plot: {path}"


def header(device, dtype, repeats, warmup) -> str:
    when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    if device.type == "cuda":
        where = torch.cuda.get_device_name()
    else:
        where = f"{cpu_name()}, {torch.get_num_threads()} threads"
    return (
        f"### Fused linear + loss, {when}\n\n"
        f"{where}, torch {torch.__version__}, {str(dtype).replace('torch.', '')}; fwd+bwd of the head's last "
        f"Linear and the loss given the head features (head frozen: d hidden only), median of {repeats} "
        f"after {warmup} warmup over {ROTATIONS} rotating input sets; threshold = median token loss. "
        f"TFLOP/s on the useful flops (hard 4NHV, guided 8NHV); % of matmul = that over a plain "
        f"N x H @ H x V matmul timed in the same run. Liger and cut-cross-entropy have no threshold and no "
        f"soft target: they run hard labels with the dropped tokens as ignore_index (for the guided op a "
        f"cheaper loss than the one measured in the other rows).\n"
    )


def main(args) -> str:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[args.linear_dtype]
    if args.quick:
        shapes, repeats, warmup, compile_ = [(64, 32, 512)], 2, 1, False
    else:
        shapes = FULL_SHAPES if (args.full_shapes or device.type == "cuda") else CPU_SHAPES
        repeats, warmup, compile_ = args.repeats, args.warmup, not args.no_compile
    print(f"fused linear + loss: shapes={shapes} dtype={args.linear_dtype} device={device}", flush=True)
    results = run(shapes, dtype, device, repeats, warmup, compile_, args.seed)
    report = header(device, dtype, repeats, warmup) + "\n" + markdown_table(results) + "\n"
    if args.plot:
        report += "\n" + plot(results, args.plot) + "\n"
    return report
