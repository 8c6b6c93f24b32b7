"""CPU benchmark of the loss ops: earkit's CPU backend against the torch eager chain it replaces.

    python -m earkit.bench kernels                       # N = 2304, V = 16384, fp32 and bf16
    python -m earkit.bench kernels --quick               # tiny shape, 2 repeats (for tests)
    python -m earkit.bench kernels --out bench/RESULTS.md
    (then the fused linear + loss table of bench/linear.py; --no-linear / --linear-only)

What one row measures: forward + backward of the loss given the logits (no linear layer; the
gradient w.r.t. the logits via torch.autograd.grad), on a fresh leaf tensor each repeat (the
clone happens outside the timed region; with inplace_backward=True the op consumes that
buffer). Median wall time over the repeats after a warmup (the rows take turns within each
repeat, so drift on a shared machine hits them alike), and the peak bytes torch allocated
during one fwd+bwd above what existed before (the inputs), measured with the profiler (see
memory.py).

The rows:
  hard   torch eager      logits -> F.cross_entropy(reduction="none") -> keep loss > threshold
                          -> mean over kept -> backward, in the logits' dtype
  hard   torch eager fp32 the same after logits.float() (what earkit computes: fp32 math); bf16 only
  hard   earkit           masked_cross_entropy(threshold=...), inplace_backward False / True
  guided torch eager      p = softmax((1 + eta) z_a - eta z_c), KL(p || softmax(s)) per token via
                          log_softmax, keep > threshold, mean over kept, backward
  guided torch eager fp32 the same after .float(); bf16 only
  guided earkit           guided_cross_entropy(threshold=...), inplace_backward False / True

The threshold of each op is the median per-token loss of the fp32 inputs (reference backend),
so about half the tokens are kept; every row of the op uses the same value. Speedup is the
eager row's time over the row's time; memory ratio is the row's peak over the eager row's
(below 1 is less memory). The earkit rows name the backend that ran them: "native" when
earkit._native is built, else "reference" (the slow pure-torch spec) unless EARKIT_BACKEND says.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import math
import os
import statistics
import time

import torch

from earkit.kernels import backend_name, guided_cross_entropy, masked_cross_entropy, reference

from .baselines import ETA, cpu_name, guided_eager, hard_eager
from .memory import MB, cpu_peak_extra_bytes

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ---------------------------------------------------------------- inputs and thresholds


def make_inputs(n: int, v: int, seed: int = 0) -> dict:
    """fp32 inputs: logits ~ 2 N(0, 1) (losses ~ lse - z_y, a few nats), and guided teacher logits.

    The student starts as a copy of the model the teachers come from, so the three guided
    inputs are close to each other rather than independent.
    """
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, v, generator=gen) * 2
    target = torch.randint(0, v, (n,), generator=gen)
    concept = torch.randn(n, v, generator=gen) * 2
    anchor = concept + 0.5 * torch.randn(n, v, generator=gen)
    student = concept + 0.5 * torch.randn(n, v, generator=gen)
    return {"logits": logits, "target": target, "student": student, "concept": concept, "anchor": anchor}


def median_thresholds(inputs: dict) -> dict:
    """The median per-token loss of each op on the fp32 inputs (computed with the reference)."""
    hard_loss, _, _ = reference.hard_rows(inputs["logits"], inputs["target"], -100, None)
    guided_loss, _, _, _ = reference.guided_rows(inputs["student"], inputs["concept"], inputs["anchor"], ETA, None)
    return {"hard": float(hard_loss.median()), "guided": float(guided_loss.median())}


# ---------------------------------------------------------------- the losses under test


def hard_earkit(logits, target, threshold, inplace=False):
    return masked_cross_entropy(logits, target, threshold=threshold, inplace_backward=inplace)


def guided_earkit(student, concept, anchor, threshold, inplace=False):
    return guided_cross_entropy(student, concept, anchor, eta=ETA, threshold=threshold, inplace_backward=inplace)


def cases(inputs: dict, dtype: torch.dtype, thresholds: dict):
    """(op, impl, the tensor that gets the gradient, loss_fn(leaf) -> scalar loss), eager row first per op."""
    logits = inputs["logits"].to(dtype)
    target = inputs["target"]
    student, concept, anchor = (inputs[k].to(dtype) for k in ("student", "concept", "anchor"))
    t_hard, t_guided = thresholds["hard"], thresholds["guided"]
    earkit = f"earkit {backend_name(torch.device('cpu'))}"
    rows = [("hard", "torch eager", logits, lambda z: hard_eager(z, target, t_hard))]
    if dtype != torch.float32:
        rows.append(("hard", "torch eager fp32", logits, lambda z: hard_eager(z, target, t_hard, upcast=True)))
    rows += [
        ("hard", earkit, logits, lambda z: hard_earkit(z, target, t_hard)),
        ("hard", earkit + " inplace", logits, lambda z: hard_earkit(z, target, t_hard, inplace=True)),
        ("guided", "torch eager", student, lambda s: guided_eager(s, concept, anchor, t_guided)),
    ]
    if dtype != torch.float32:
        rows.append(("guided", "torch eager fp32", student,
                     lambda s: guided_eager(s, concept, anchor, t_guided, upcast=True)))
    rows += [
        ("guided", earkit, student, lambda s: guided_earkit(s, concept, anchor, t_guided)),
        ("guided", earkit + " inplace", student, lambda s: guided_earkit(s, concept, anchor, t_guided, inplace=True)),
    ]
    return rows


# ---------------------------------------------------------------- measuring


def fwd_bwd(loss_fn, leaf):
    """Forward and backward; returns the gradient w.r.t. leaf.

    torch.autograd.grad rather than loss.backward(): in training the logits come out of a
    matmul and their gradient flows on into it. On a leaf, backward() would hand the gradient
    to AccumulateGrad, which clones it when it is the leaf's own buffer (the in-place case),
    adding an N x V copy the engine never pays.
    """
    loss = loss_fn(leaf)
    (grad,) = torch.autograd.grad(loss, leaf)
    return grad


def one_run_ms(loss_fn, base) -> float:
    leaf = base.clone().requires_grad_(True)  # fresh buffer, outside the timing: in-place consumes it
    start = time.perf_counter()
    fwd_bwd(loss_fn, leaf)
    return (time.perf_counter() - start) * 1e3


def interleaved_median_ms(rows, repeats: int, warmup: int):
    """Median fwd+bwd ms of each row over `repeats` runs after `warmup` untimed ones.

    The rows take turns within every repeat rather than running their repeats back to back: on
    a shared machine a slow spell then slows every row alike instead of one row. A row that
    raises is dropped from later turns; its time is NaN and its error is returned.
    """
    times = [[] for _ in rows]
    errors = {}
    for repeat in range(warmup + repeats):
        for i, (op, impl, base, loss_fn) in enumerate(rows):
            if i in errors:
                continue
            try:
                ms = one_run_ms(loss_fn, base)
            except Exception as error:  # one broken row must not hide the others
                errors[i] = f"{type(error).__name__}: {error}"
                print(f"[{op} {impl}] failed: {errors[i]}", flush=True)
                continue
            if repeat >= warmup:
                times[i].append(ms)
    return [math.nan if i in errors else statistics.median(t) for i, t in enumerate(times)], errors


def peak_extra_mb(loss_fn, base) -> float:
    leaf = base.clone().requires_grad_(True)
    gc.collect()
    peak, _ = cpu_peak_extra_bytes(lambda: fwd_bwd(loss_fn, leaf))
    return peak / MB


def run(n: int, v: int, dtype_names, repeats: int, warmup: int, seed: int = 0):
    inputs = make_inputs(n, v, seed)
    thresholds = median_thresholds(inputs)
    results = []
    for dtype_name in dtype_names:
        rows = cases(inputs, DTYPES[dtype_name], thresholds)
        times, errors = interleaved_median_ms(rows, repeats, warmup)
        eager = {}
        for i, ((op, impl, base, loss_fn), ms) in enumerate(zip(rows, times)):
            mb = math.nan
            if i not in errors:
                try:
                    mb = peak_extra_mb(loss_fn, base)
                except Exception as error:
                    print(f"[{op} {dtype_name} {impl}] memory failed: {type(error).__name__}: {error}", flush=True)
            if impl == "torch eager":
                eager[op] = (ms, mb)
            eager_ms, eager_mb = eager.get(op, (math.nan, math.nan))
            results.append({
                "op": op, "dtype": dtype_name, "impl": impl, "ms": ms, "mb": mb,
                "speedup": eager_ms / ms if ms > 0 else math.nan,
                "memory_ratio": mb / eager_mb if eager_mb > 0 else math.nan,
            })
            print(f"  {op:6s} {dtype_name:4s} {impl:28s} {ms:9.2f} ms {mb:9.1f} MB", flush=True)
    return results, thresholds


# ---------------------------------------------------------------- reporting


def markdown_table(results) -> str:
    lines = [
        "| op | dtype | impl | median ms | peak extra MB | speedup vs eager | memory ratio vs eager |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        lines.append(
            f"| {r['op']} | {r['dtype']} | {r['impl']} | {r['ms']:.2f} | {r['mb']:.1f} "
            f"| {r['speedup']:.2f}x | {r['memory_ratio']:.3g} |"
        )
    return "\n".join(lines)


def header(args, thresholds) -> str:
    when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    return (
        f"### CPU loss kernels, {when}\n\n"
        f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
        f"N = {args.n}, V = {args.v}, fwd+bwd given the logits, median of {args.repeats} after "
        f"{args.warmup} warmup; thresholds (median fp32 loss): hard {thresholds['hard']:.4f}, "
        f"guided {thresholds['guided']:.4f}; earkit CPU backend: {backend_name(torch.device('cpu'))}.\n"
        f"Peak extra MB: most bytes torch held during one fwd+bwd above the inputs (profiler "
        f"allocation events). Speedup = eager ms / row ms; memory ratio = row MB / eager MB.\n"
    )


def main(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    report = ""
    if not getattr(args, "linear_only", False):
        report += logits_report(args)
    if not getattr(args, "no_linear", False):
        from . import linear

        report += ("\n" if report else "") + linear.main(args)
    print()
    print(report)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "a") as f:
            f.write("\n" + report)
        print(f"appended to {args.out}")


def logits_report(args) -> str:
    if args.quick:  # a copy: the linear part reads the caller's repeats
        args = argparse.Namespace(**{**vars(args), "n": 64, "v": 512, "repeats": 2, "warmup": 1})
    dtype_names = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    unknown = [d for d in dtype_names if d not in DTYPES]
    if unknown:
        raise SystemExit(f"--dtypes: unknown {unknown}; choose from {', '.join(DTYPES)}")
    print(f"earkit kernels benchmark: N={args.n} V={args.v} dtypes={dtype_names} repeats={args.repeats} "
          f"threads={torch.get_num_threads()} backend={backend_name(torch.device('cpu'))}", flush=True)
    results, thresholds = run(args.n, args.v, dtype_names, args.repeats, args.warmup, args.seed)
    return header(args, thresholds) + "\n" + markdown_table(results) + "\n"
