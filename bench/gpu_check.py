"""GPU check of earkit's loss ops: correctness against float64, then speed and memory against torch.

    python bench/gpu_check.py                            # a CUDA machine (H100/H200), under 5 minutes
    python -m earkit.bench.gpu_check                     # the same
    python bench/gpu_check.py --smoke --out /tmp/s.md    # CPU, Triton interpreter, tiny shapes (CI)

(a) Correctness. masked_cross_entropy and guided_cross_entropy on (B, T, V) = (2, 576, 16384)
    (N = 1152), (16, 576, 16384) (N = 9216) and (1, 8, 16384) (N = 8: so few rows that the
    kernels split each row over several programs), fp32 and bf16, reductions "mean" and
    "none" (with a random upstream gradient), inplace_backward False and True, all with a token
    threshold, windows and a window threshold. Expected loss and gradient come from an
    independent float64 formula (log_softmax + autograd) on the same (rounded) inputs. PASS
    when max |loss error| <= tol * max |loss| and max |grad error| <= tol * max |grad|
    (fp32: 1e-4 and 1e-4; bf16: 1e-3 for the fp32 loss, 2e-2 for the bf16 gradient), and with
    inplace_backward=False the logits are left untouched. The thresholds sit in the widest gap
    between neighbouring losses near the median, so fp32 rounding cannot flip a token's mask.
(b) Speed and memory. fwd+bwd given the logits (no linear layer), bf16, V = 16384, at N = 1152
    and 9216: the earkit op (inplace_backward False and True), the torch eager chain (hard:
    F.cross_entropy(reduction="none") -> keep loss > threshold -> mean over kept; guided:
    p = softmax((1 + eta) z_a - eta z_c), KL(p || softmax(s)) per token via log_softmax, same
    mask and mean), the eager chain after .float(), and torch.compile of the eager chain.
    Median of --reps CUDA-event timings after warmup, each on a fresh clone of the logits;
    peak extra memory = max_memory_allocated during one fwd+bwd minus what was allocated before.
(e) Fused linear + loss: linear_masked_cross_entropy and linear_guided_cross_entropy on
    (B, T) = (2, 576) and (1, 8) with H = 2048, V = 16384 (smoke: (2, 8), H = 32, V = 64, in
    chunks of one sequence), fp32 and bf16, reductions "mean" and "none", the head frozen (d
    hidden only, as in the engine) and trained (d weight and d bias too), all with threshold,
    windows and window threshold, against float64 (PASS: max error <= tol * max |value| for the
    loss and every gradient); then bench/linear.py's table at N = 1152, H = 2048 and N = 9216,
    H = 4096 (the anchors' shapes): earkit against torch eager, torch.compile, Liger and
    cut-cross-entropy where installed, with TFLOP/s and percent of a bf16 matmul.
(d) Engine: `earkit bench engine` (bench/engine.py) at the Janus-Pro-7B and -1B shapes with
    random weights: sampler ms per decode step at batch 1 and 16, one erasure step per pair,
    peak memory, projected time for a 50-pair concept (--engine-sizes; smoke: a tiny Janus).
(c) Report: both tables as markdown, printed and appended to bench/RESULTS.md (or --out) with
    the card, date, torch and triton versions. Exit status 1 when a correctness check fails.

--smoke runs everything on CPU tensors through the Triton interpreter (TRITON_INTERPRET=1,
EARKIT_BACKEND=triton) with (B, T, V) = (2, 8, 64) and a forced split-row layout at (1, 8, 64),
times with perf_counter, measures memory with the profiler (earkit.bench.memory) and compiles
with backend="aot_eager", so CI can run every code path of this script without a GPU.
A row that fails (an exception, out of memory) prints its error and the script goes on.
"""

import argparse
import datetime
import math
import os
import statistics
import sys
import time
import traceback

if __name__ == "__main__" and sys.path and os.path.realpath(sys.path[0]) == os.path.dirname(os.path.realpath(__file__)):
    # Run as `python bench/gpu_check.py`, bench/ is first on sys.path, and its kernels.py and
    # memory.py would shadow top-level modules of those names (Hugging Face's `kernels`
    # package is probed for by name); earkit is imported from the installed package instead.
    sys.path.pop(0)

SMOKE = "--smoke" in sys.argv[1:]
if SMOKE:
    # Triton reads TRITON_INTERPRET when it is imported, so this must come before torch and
    # earkit pull it in; EARKIT_BACKEND=triton sends CPU tensors to the (interpreted) kernels.
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ["EARKIT_BACKEND"] = "triton"

import torch
import torch.nn.functional as F

from earkit.bench.kernels import guided_eager, hard_eager  # the eager chains, shared with the CPU table
from earkit.kernels import guided_cross_entropy, masked_cross_entropy

ETA = 1.0
MB = 1 << 20

# (B, T, V), window, force the split-row layout (smoke only: on a GPU N = 8 splits by itself).
# Windows of 50 over T = 576 leave a short last window (576 = 11 x 50 + 26).
GPU_CHECKS = [((2, 576, 16384), 50, False), ((16, 576, 16384), 50, False), ((1, 8, 16384), 3, False)]
SMOKE_CHECKS = [((2, 8, 64), 3, False), ((1, 8, 64), 3, True)]
GPU_TIMINGS = [(2, 576, 16384), (16, 576, 16384)]
SMOKE_TIMINGS = [(2, 8, 64)]
# Fused linear + loss: ((B, T), H, V, window).
LINEAR_GPU_CHECKS = [((2, 576), 2048, 16384, 50), ((1, 8), 2048, 16384, 3)]
LINEAR_SMOKE_CHECKS = [((2, 8), 32, 64, 3)]
LINEAR_GPU_TIMINGS = [(1152, 2048, 16384), (9216, 4096, 16384)]
LINEAR_SMOKE_TIMINGS = [(16, 32, 64)]
# (loss: relative to max |loss|, gradient: relative to max |grad|). The loss is fp32 whatever
# the input dtype; a bf16 gradient is rounded to bf16 (2^-8 relative) when stored.
TOLERANCES = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (1e-3, 2e-2)}
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16"}


# ---------------------------------------------------------------- inputs and the float64 reference


def make_inputs(shape, dtype, device, seed=0) -> dict:
    """Logits ~ 2 N(0, 1) with random targets; guided teachers close to the student (a copy of them)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    randn = lambda: torch.randn(shape, generator=gen, device=device)
    concept = randn() * 2
    inputs = {
        "logits": randn() * 2,
        "target": torch.randint(0, shape[-1], shape[:-1], generator=gen, device=device),
        "concept": concept,
        "anchor": concept + 0.5 * randn(),
        "student": concept + 0.5 * randn(),
    }
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}


def grad_input_name(op: str) -> str:
    return "logits" if op == "masked" else "student"


def reference_token_loss(op: str, inputs: dict, x):
    """Per-token loss in float64, differentiable in x (the logits or the student)."""
    if op == "masked":
        return torch.logsumexp(x, -1) - x.gather(-1, inputs["target"][..., None]).squeeze(-1)
    log_p = F.log_softmax((1 + ETA) * inputs["anchor"].double() - ETA * inputs["concept"].double(), -1)
    log_q = F.log_softmax(x, -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def window_sums(values, window: int):
    """(B, T) -> (B, number of windows): sums over windows of `window` positions (the last may be short)."""
    n_windows = -(-values.shape[1] // window)
    padded = F.pad(values, (0, n_windows * window - values.shape[1]))
    return padded.view(values.shape[0], n_windows, window).sum(-1)


def reference_weights(token_loss, threshold, window, window_threshold):
    keep = (token_loss > threshold).double()
    gate = (window_sums(keep * token_loss, window) > window_threshold).double()
    return keep * gate.repeat_interleave(window, dim=1)[:, : token_loss.shape[1]]


def threshold_in_gap(values):
    """A threshold near the median of `values`, midway across the widest gap between neighbours
    in the middle half. Returns (threshold, margin): every value is at least margin away."""
    s = values.flatten().double().sort().values
    n = s.numel()
    lo, hi = max(1, n // 4), max(2, min(n, 3 * n // 4 + 1))
    gaps = s[lo:hi] - s[lo - 1 : hi - 1]
    i = lo + int(gaps.argmax())
    return float((s[i - 1] + s[i]) / 2), float(gaps.max() / 2)


def reference_result(op, inputs, threshold, window, window_threshold, reduction, upstream):
    x = inputs[grad_input_name(op)].double().requires_grad_(True)
    token_loss = reference_token_loss(op, inputs, x)
    weight = reference_weights(token_loss.detach(), threshold, window, window_threshold)
    if reduction == "mean":
        out = (weight * token_loss).sum() / weight.sum().clamp_min(1)
        (grad,) = torch.autograd.grad(out, x)
    else:
        out = weight * token_loss
        (grad,) = torch.autograd.grad((out * upstream.double()).sum(), x)
    return out.detach(), grad


def earkit_loss(op, x, inputs, **options):
    if op == "masked":
        return masked_cross_entropy(x, inputs["target"], **options)
    return guided_cross_entropy(x, inputs["concept"], inputs["anchor"], eta=ETA, **options)


# ---------------------------------------------------------------- (a) correctness


def forced_splits(splits):
    """Set (or clear, with None) the Triton kernels' forced split-row layout, if they expose one."""
    from earkit.kernels import triton_cross_entropy

    if hasattr(triton_cross_entropy, "force_splits"):
        triton_cross_entropy.force_splits = splits


def describe_layout(shape, device) -> str:
    """How the Triton launcher lays out rows of this shape (informational; private API, may change)."""
    try:
        from earkit.kernels import triton_cross_entropy

        n = shape[0] * shape[1]
        splits, _, block = triton_cross_entropy._split_layout(n, shape[2], torch.device(device))
        return f"{splits} split(s) per row, block {block}"
    except Exception as error:
        return f"layout unknown ({type(error).__name__})"


def check_one(op, inputs, options, reduction, inplace, upstream, expected, dtype):
    """Run the earkit op once; compare with the float64 result. Returns a result row."""
    loss_tol, grad_tol = TOLERANCES[dtype]
    x = inputs[grad_input_name(op)]
    leaf = x.clone().requires_grad_(True)
    buffer = leaf.data_ptr()
    out = earkit_loss(op, leaf, inputs, reduction=reduction, inplace_backward=inplace, **options)
    to_backward = out if reduction == "mean" else (out * upstream).sum()
    (grad,) = torch.autograd.grad(to_backward, leaf)
    expected_out, expected_grad = expected

    loss_err = float((out.detach().double() - expected_out).abs().max())
    loss_scale = max(float(expected_out.abs().max()), 1e-6)
    grad_err = float((grad.double() - expected_grad).abs().max())
    grad_scale = max(float(expected_grad.abs().max()), 1e-12)
    if inplace:
        buffer_note = "reused" if grad.data_ptr() == buffer else "copied"
        buffer_ok = True  # in-place is allowed, not promised, for every layout: reported, not failed
    else:
        buffer_ok = grad.data_ptr() != buffer and torch.equal(leaf.detach(), x)
        buffer_note = "kept" if buffer_ok else "CLOBBERED"
    ok = loss_err <= loss_tol * loss_scale and grad_err <= grad_tol * grad_scale and buffer_ok
    return {
        "loss_err": loss_err, "loss_rel": loss_err / loss_scale, "grad_err": grad_err,
        "grad_rel": grad_err / grad_scale, "grad_max": grad_scale, "buffer": buffer_note,
        "status": "PASS" if ok else "FAIL",
    }


def run_checks(checks, device):
    rows = []
    for shape, window, force_split in checks:
        for dtype in (torch.float32, torch.bfloat16):
            try:
                inputs = make_inputs(shape, dtype, device, seed=1)
            except Exception as error:
                print(f"[check {shape} {DTYPE_NAMES[dtype]}] inputs failed: {error!r}")
                continue
            gen = torch.Generator(device=device).manual_seed(3)
            upstream = torch.randn(shape[:-1], generator=gen, device=device)  # for reduction="none"
            forced_splits(4 if force_split else None)
            layout = describe_layout(shape, device)
            print(f"  check shape {shape} {DTYPE_NAMES[dtype]}: {layout}", flush=True)
            for op in ("masked", "guided"):
                base = {"shape": "x".join(map(str, shape)), "dtype": DTYPE_NAMES[dtype], "op": op, "layout": layout}
                try:
                    with torch.no_grad():
                        x64 = inputs[grad_input_name(op)].double()
                        token_loss = reference_token_loss(op, inputs, x64)
                        threshold, margin = threshold_in_gap(token_loss)
                        kept = (token_loss > threshold).double() * token_loss
                        window_threshold, window_margin = threshold_in_gap(window_sums(kept, window))
                        del x64, token_loss, kept
                    options = {"threshold": threshold, "window": window, "window_threshold": window_threshold}
                except Exception as error:
                    print(f"[check {base}] reference failed: {error!r}")
                    rows.append({**base, "reduction": "-", "inplace": "-", "status": f"ERROR {type(error).__name__}"})
                    continue
                for reduction in ("mean", "none"):
                    try:
                        expected = reference_result(op, inputs, threshold, window, window_threshold, reduction,
                                                    upstream)
                    except Exception as error:  # say so, and go on with the next reduction
                        print(f"[check {base} {reduction}] float64 reference failed: {error!r}")
                        expected = error
                    for inplace in (False, True):
                        row = {**base, "reduction": reduction, "inplace": inplace,
                               "margins": f"{margin:.1e} / {window_margin:.1e}"}
                        try:
                            if isinstance(expected, Exception):
                                raise expected
                            row.update(check_one(op, inputs, options, reduction, inplace, upstream, expected, dtype))
                        except Exception as error:
                            traceback.print_exc()
                            row["status"] = f"ERROR {type(error).__name__}: {error}"[:120]
                        rows.append(row)
                        print(f"  check {row['shape']:>12s} {row['dtype']} {op:6s} {reduction:4s} "
                              f"inplace={str(inplace):5s} {row['status']}", flush=True)
                    del expected
            forced_splits(None)
            del inputs
            if device == "cuda":
                torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------- (e) fused linear + loss


def linear_reference(op, x, weight, bias, threshold, window, window_threshold, reduction, upstream, train_head):
    """Loss and gradients (hidden, then weight and bias when train_head) in float64."""
    h = x["student" if op == "guided" else "hidden"].double().requires_grad_(True)
    w = weight.double().requires_grad_(train_head)
    b = bias.double().requires_grad_(train_head)
    head = lambda t: t @ w.t() + b  # noqa: E731
    if op == "masked":
        z = head(h)
        token_loss = torch.logsumexp(z, -1) - z.gather(-1, x["target"][..., None]).squeeze(-1)
    else:
        with torch.no_grad():
            log_p = F.log_softmax((1 + ETA) * head(x["anchor"].double()) - ETA * head(x["concept"].double()), -1)
        log_q = F.log_softmax(head(h), -1)
        token_loss = (log_p.exp() * (log_p - log_q)).sum(-1)
    weights = reference_weights(token_loss.detach(), threshold, window, window_threshold)
    if reduction == "mean":
        out = (weights * token_loss).sum() / weights.sum().clamp_min(1)
        grads = torch.autograd.grad(out, [h, w, b] if train_head else [h])
    else:
        out = weights * token_loss
        grads = torch.autograd.grad((out * upstream.double()).sum(), [h, w, b] if train_head else [h])
    return out.detach(), grads


def linear_earkit(op, x, weight, bias, options, reduction, upstream, train_head):
    from earkit.kernels import linear_guided_cross_entropy, linear_masked_cross_entropy

    h = x["student" if op == "guided" else "hidden"].clone().requires_grad_(True)
    w = weight.clone().requires_grad_(train_head)
    b = bias.clone().requires_grad_(train_head)
    if op == "masked":
        out = linear_masked_cross_entropy(h, w, x["target"], b, reduction=reduction, **options)
    else:
        out = linear_guided_cross_entropy(h, x["concept"], x["anchor"], w, b, eta=ETA, reduction=reduction, **options)
    grads = torch.autograd.grad(out if reduction == "mean" else (out * upstream).sum(), [h, w, b] if train_head else [h])
    return out.detach(), grads


def run_linear_checks(checks, device, smoke):
    from earkit.kernels import linear_cross_entropy

    linear_cross_entropy.force_chunk_rows = 8 if smoke else None  # smoke: one sequence per chunk
    rows = []
    for (batch, seq_len), n_inner, n_cols, window in checks:
        for dtype in (torch.float32, torch.bfloat16):
            loss_tol, grad_tol = TOLERANCES[dtype]
            gen = torch.Generator(device=device).manual_seed(4)
            randn = lambda *shape: torch.randn(*shape, generator=gen, device=device)  # noqa: E731
            concept = randn(batch, seq_len, n_inner)
            x = {"hidden": randn(batch, seq_len, n_inner), "concept": concept,
                 "anchor": concept + 0.3 * randn(batch, seq_len, n_inner),
                 "student": concept + 0.3 * randn(batch, seq_len, n_inner),
                 "target": torch.randint(0, n_cols, (batch, seq_len), generator=gen, device=device)}
            x = {k: v.to(dtype) if v.is_floating_point() else v for k, v in x.items()}
            weight = (randn(n_cols, n_inner) * (2.0 / math.sqrt(n_inner))).to(dtype)
            bias = (0.1 * randn(n_cols)).to(dtype)
            upstream = randn(batch, seq_len)
            label = f"linear {batch}x{seq_len} H={n_inner} V={n_cols}"
            for op in ("masked", "guided"):
                try:
                    # Every weight is 1 at -inf thresholds: "none" gives the per-token loss.
                    token_loss, _ = linear_reference(op, x, weight, bias, -math.inf, seq_len, -math.inf, "none",
                                                     torch.ones_like(upstream), False)
                    threshold, _ = threshold_in_gap(token_loss)
                    kept = (token_loss > threshold).double() * token_loss
                    window_threshold, _ = threshold_in_gap(window_sums(kept, window))
                    options = {"threshold": threshold, "window": window, "window_threshold": window_threshold}
                except Exception as error:
                    traceback.print_exc()
                    rows.append({"shape": label, "dtype": DTYPE_NAMES[dtype], "op": op, "reduction": "-",
                                 "head": "-", "status": f"ERROR {type(error).__name__}"})
                    continue
                for reduction in ("mean", "none"):
                    for train_head in (False, True):
                        row = {"shape": label, "dtype": DTYPE_NAMES[dtype], "op": op, "reduction": reduction,
                               "head": "trained" if train_head else "frozen"}
                        try:
                            want_out, want_grads = linear_reference(op, x, weight, bias, threshold, window,
                                                                    window_threshold, reduction, upstream, train_head)
                            out, grads = linear_earkit(op, x, weight, bias, options, reduction, upstream, train_head)
                            loss_rel = float((out.double() - want_out).abs().max()) / max(
                                float(want_out.abs().max()), 1e-6)
                            grad_rels = [float((g.double() - wg).abs().max()) / max(float(wg.abs().max()), 1e-12)
                                         for g, wg in zip(grads, want_grads)]
                            ok = loss_rel <= loss_tol and all(r <= grad_tol for r in grad_rels)
                            row.update(loss_rel=loss_rel, grad_rels=grad_rels, status="PASS" if ok else "FAIL")
                            del want_out, want_grads, out, grads
                        except Exception as error:
                            traceback.print_exc()
                            row["status"] = f"ERROR {type(error).__name__}: {error}"[:120]
                        rows.append(row)
                        print(f"  check {label} {row['dtype']} linear {op:6s} {reduction:4s} head={row['head']:7s} "
                              f"{row['status']}", flush=True)
            del x, weight, bias
            if device == "cuda":
                torch.cuda.empty_cache()
    linear_cross_entropy.force_chunk_rows = None
    return rows


def linear_check_table(rows) -> str:
    lines = [
        "| shape | dtype | op | reduction | head | max err loss (rel) | max err grad rel: hidden / weight / bias | result |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        grads = " / ".join(f"{g:.1e}" for g in r.get("grad_rels", [])) or "-"
        lines.append(f"| {r['shape']} | {r['dtype']} | linear {r['op']} | {r['reduction']} | {r['head']} "
                     f"| {fmt(r.get('loss_rel'), '.1e')} | {grads} | {r['status']} |")
    return "\n".join(lines)


def run_linear_timings(shapes, device, reps, warmup, compile_):
    from earkit.bench import linear

    try:
        return linear.run(shapes, torch.bfloat16, torch.device(device), reps, warmup, compile_)
    except Exception:
        print("[linear timings] failed:")
        traceback.print_exc()
        return []


# ---------------------------------------------------------------- (b) speed and memory


def fwd_bwd(loss_fn, leaf):
    # autograd.grad hands the gradient on as a matmul's backward would take it; backward() on a
    # leaf would make AccumulateGrad clone an in-place gradient (an N x V copy training never pays).
    (grad,) = torch.autograd.grad(loss_fn(leaf), leaf)
    return grad


def median_ms(loss_fn, base, reps, warmup, device):
    times = []
    for i in range(warmup + reps):
        leaf = base.clone().requires_grad_(True)  # fresh: the in-place backward consumes its buffer
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fwd_bwd(loss_fn, leaf)
            end.record()
            end.synchronize()
            elapsed = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            fwd_bwd(loss_fn, leaf)
            elapsed = (time.perf_counter() - t0) * 1e3
        if i >= warmup:
            times.append(elapsed)
        del leaf
    return statistics.median(times)


def peak_extra_mb(loss_fn, base, device):
    leaf = base.clone().requires_grad_(True)
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fwd_bwd(loss_fn, leaf)  # the gradient it returns is counted: it is still alive at the peak
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        from earkit.bench.memory import cpu_peak_extra_bytes

        peak, _ = cpu_peak_extra_bytes(lambda: fwd_bwd(loss_fn, leaf))
    return peak / MB


def timing_rows(op, inputs, threshold, compile_backend):
    """[(impl, loss_fn(leaf))], the eager row first; compile_backend None leaves torch.compile out."""
    if op == "masked":
        eager_fn, extra = hard_eager, (inputs["target"], threshold)
    else:
        eager_fn, extra = guided_eager, (inputs["concept"], inputs["anchor"], threshold)
    rows = [
        ("torch eager", lambda x: eager_fn(x, *extra)),
        ("torch eager fp32", lambda x: eager_fn(x, *extra, upcast=True)),
    ]
    if compile_backend is not None:
        # Compiles on its first call (timed apart, as "first call"), then once more per new shape.
        compiled = torch.compile(eager_fn, backend=compile_backend, dynamic=False)
        rows.append(("torch.compile eager", lambda x: compiled(x, *extra)))
    rows += [
        ("earkit", lambda x: earkit_loss(op, x, inputs, threshold=threshold)),
        ("earkit inplace", lambda x: earkit_loss(op, x, inputs, threshold=threshold, inplace_backward=True)),
    ]
    return rows


def run_timings(shapes, device, reps, warmup, compile_backend):
    rows = []
    for shape in shapes:
        try:
            inputs = make_inputs(shape, torch.bfloat16, device, seed=2)
        except Exception as error:
            print(f"[timing {shape}] inputs failed: {error!r}")
            continue
        n = shape[0] * shape[1]
        for op in ("masked", "guided"):
            try:
                with torch.no_grad():
                    x64 = inputs[grad_input_name(op)].double()
                    threshold = float(reference_token_loss(op, inputs, x64).median())  # keeps about half
                    del x64
            except Exception as error:
                print(f"[timing {op} N={n}] threshold failed: {error!r}")
                continue
            eager_ms = eager_mb = math.nan
            for impl, loss_fn in timing_rows(op, inputs, threshold, compile_backend):
                row = {"op": op, "n": n, "impl": impl, "ms": math.nan, "mb": math.nan, "note": ""}
                try:
                    t0 = time.perf_counter()
                    fwd_bwd(loss_fn, inputs[grad_input_name(op)].clone().requires_grad_(True))  # compiles, if it does
                    if device == "cuda":
                        torch.cuda.synchronize()
                    first_s = time.perf_counter() - t0
                    row["ms"] = median_ms(loss_fn, inputs[grad_input_name(op)], reps, warmup, device)
                    row["mb"] = peak_extra_mb(loss_fn, inputs[grad_input_name(op)], device)
                    if impl.startswith("torch.compile"):
                        row["note"] = f"first call {first_s:.1f} s"
                except Exception as error:  # OOM or a compile failure: say why, keep going
                    row["note"] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:100]
                    print(f"[timing {op} N={n} {impl}] failed: {row['note']}")
                    if device == "cuda":
                        torch.cuda.empty_cache()
                if impl == "torch eager":
                    eager_ms, eager_mb = row["ms"], row["mb"]
                row["speedup"] = eager_ms / row["ms"] if row["ms"] > 0 else math.nan
                row["memory_ratio"] = row["mb"] / eager_mb if eager_mb > 0 else math.nan
                rows.append(row)
                print(f"  time {op:6s} N={n:5d} {impl:22s} {row['ms']:9.3f} ms {row['mb']:9.1f} MB {row['note']}",
                      flush=True)
        del inputs
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------- (c) report


def fmt(value, spec):
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def check_table(rows) -> str:
    lines = [
        "| shape (B x T x V) | dtype | op | reduction | inplace | max abs err loss (rel) | max abs err grad (rel) "
        "| max abs grad | logits buffer | threshold margins (token / window) | result |",
        "| --- | --- | --- | --- | --- | --- | --- | ---: | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['dtype']} | {r['op']} | {r['reduction']} | {r['inplace']} "
            f"| {fmt(r.get('loss_err'), '.2e')} ({fmt(r.get('loss_rel'), '.1e')}) "
            f"| {fmt(r.get('grad_err'), '.2e')} ({fmt(r.get('grad_rel'), '.1e')}) | {fmt(r.get('grad_max'), '.2e')} "
            f"| {r.get('buffer', '-')} | {r.get('margins', '-')} | {r['status']} |"
        )
    return "\n".join(lines)


def timing_table(rows) -> str:
    lines = [
        "| op | N | impl | median ms | peak extra MB | speedup vs eager | memory ratio vs eager | note |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['op']} | {r['n']} | {r['impl']} | {fmt(r['ms'], '.3f')} | {fmt(r['mb'], '.1f')} "
            f"| {fmt(r['speedup'], '.2f')}x | {fmt(r['memory_ratio'], '.3f')} | {r['note']} |"
        )
    return "\n".join(lines)


def machine_line(device) -> str:
    import triton

    if device == "cuda":
        card = torch.cuda.get_device_name()
    else:
        card = "CPU (smoke: TRITON_INTERPRET=1, EARKIT_BACKEND=triton)"
    return f"{card}; torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}"


def run_engine(sizes: str, device: str) -> list[dict]:
    """The engine benchmark (bench/engine.py) at each size; a size that fails is reported and skipped."""
    from earkit.bench.engine import run as run_engine_benchmark

    reports = []
    for size in [s.strip() for s in sizes.split(",") if s.strip() and s.strip() != "none"]:
        started = time.perf_counter()
        try:
            batches = (1, 2) if size == "tiny" else (1, 16)
            reports.append(run_engine_benchmark(size=size, device=device, sampler_batches=batches,
                                                train_batch=2 if size == "tiny" else 8))
            print(f"engine {size} done in {time.perf_counter() - started:.0f} s", flush=True)
        except Exception:
            print(f"[engine {size}] failed:")
            traceback.print_exc()
        if device == "cuda":
            torch.cuda.empty_cache()
    return reports


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Correctness, speed and memory of earkit's loss ops on a GPU.")
    parser.add_argument("--smoke", action="store_true", help="CPU + Triton interpreter, tiny shapes (for CI)")
    parser.add_argument("--out", default=None, help="append the report here (default: bench/RESULTS.md)")
    parser.add_argument("--reps", type=int, default=None, help="timed repeats (default 20; smoke 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed repeats first (default 5; smoke 1)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    parser.add_argument("--no-timing", action="store_true", help="correctness only")
    parser.add_argument("--engine-sizes", default=None,
                        help="Janus-Pro shapes for the engine benchmark, comma-separated (default 7b,1b; smoke tiny; "
                             "'none' to skip)")
    args = parser.parse_args(argv)

    if args.smoke:
        device, checks, timings = "cpu", SMOKE_CHECKS, SMOKE_TIMINGS
        reps, warmup, compile_backend = args.reps or 2, args.warmup or 1, "aot_eager"
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: run on a GPU machine, or use --smoke for the CPU interpreter check")
            return 2
        device, checks, timings = "cuda", GPU_CHECKS, GPU_TIMINGS
        reps, warmup, compile_backend = args.reps or 20, args.warmup or 5, "inductor"
    if args.no_compile:
        compile_backend = None
    out_path = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")
    started = time.perf_counter()
    print(f"earkit gpu_check on {machine_line(device)}", flush=True)

    check_rows = run_checks(checks, device)
    check_rows += run_linear_checks(LINEAR_SMOKE_CHECKS if args.smoke else LINEAR_GPU_CHECKS, device, args.smoke)
    print(f"correctness done in {time.perf_counter() - started:.0f} s", flush=True)
    time_rows = [] if args.no_timing else run_timings(timings, device, reps, warmup, compile_backend)
    linear_rows = [] if args.no_timing else run_linear_timings(
        LINEAR_SMOKE_TIMINGS if args.smoke else LINEAR_GPU_TIMINGS, device, reps, warmup,
        compile_backend == "inductor")
    engine_reports = run_engine(args.engine_sizes or ("tiny" if args.smoke else "7b,1b"), device)
    total_s = time.perf_counter() - started

    n_pass = sum(r["status"] == "PASS" for r in check_rows)
    layouts = "; ".join(sorted({f"{r['shape']}: {r['layout']}" for r in check_rows if "layout" in r}))
    when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    report = (
        f"### earkit gpu_check{' --smoke' if args.smoke else ''}, {when}\n\n"
        f"{machine_line(device)}; {total_s:.0f} s in all.\n\n"
        f"Correctness against float64 (threshold + windows + window threshold; reduction none uses a "
        f"random upstream gradient): {n_pass} of {len(check_rows)} PASS.\n\n"
        f"{check_table([r for r in check_rows if 'layout' in r])}\n\nTriton row layouts: {layouts}.\n\n"
        f"Fused linear + loss against float64 (same thresholds and windows; rel = max error over max |value|):\n\n"
        f"{linear_check_table([r for r in check_rows if 'head' in r])}\n"
    )
    if time_rows:
        report += (
            f"\nfwd+bwd given the logits, bf16, V = {timings[0][2]}, threshold = median loss; median of {reps} "
            f"after {warmup} warmup; peak extra = max allocated during one fwd+bwd above the inputs; "
            f"speedup = eager ms / row ms, memory ratio = row MB / eager MB.\n\n{timing_table(time_rows)}\n"
        )
    if linear_rows:
        from earkit.bench.linear import markdown_table as linear_table

        report += (f"\nFused linear + loss, fwd+bwd given the head features, bf16, head frozen; TFLOP/s on the "
                   f"useful flops (hard 4NHV, guided 8NHV), % of a bf16 N x H @ H x V matmul of the same run; "
                   f"Liger and cut-cross-entropy run hard labels with the thresholded-out tokens as "
                   f"ignore_index (their nearest equivalent).\n\n{linear_table(linear_rows)}\n")
    if engine_reports:
        from earkit.bench.engine import format_report

        report += "".join("\n" + format_report(engine) + "\n" for engine in engine_reports)
    print()
    print(report)
    with open(out_path, "a") as f:
        f.write("\n" + report)
    print(f"appended to {out_path}")
    failed = [r for r in check_rows if r["status"] != "PASS"]
    print(f"{'ALL PASS' if check_rows and not failed else f'{len(failed)} check(s) did not pass'}")
    return 1 if failed or not check_rows else 0


if __name__ == "__main__":
    sys.exit(main())
