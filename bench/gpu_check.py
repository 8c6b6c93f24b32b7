"""GPU check of earkit: correctness, speed and memory of the loss ops and the engine, in one timed run.

    python -m earkit.bench.gpu_check --out $OUT/gpu_check.md   # a CUDA machine (H100/H200), 7 minutes at most
    python -m earkit.bench.gpu_check --budget 240 --stages a,b  # less time, some stages (--caps b=200: a cap)
    python -m earkit.bench.gpu_check --smoke                    # CPU, Triton interpreter, tiny shapes (CI)
    bash bench/device_run.sh                                    # the GPU machine: offline install, then this

How it runs. This process runs each stage in a child process of its own (`--stage X`), under
the stage's time cap and what is left of --budget (default 420 s): a stage that fails, hangs or
breaks the CUDA context is killed with its process group and the next stage starts. A stage
gets min(its cap, the time left less the minimum of every later stage); one that would get less
than its own minimum is skipped. A child writes each row to a JSON-lines file (and a line to
stdout, the log) the moment it is measured; this process rereads that file while the child
runs and rewrites the markdown report after every new row, so a timeout loses at most the row
in flight.

Stages, in the order they run (correctness first; e and f take seconds and bear on issue 12
directly, so they come before the engine's long stages):
(a) Correctness against float64, every layout that (b) times and a few forced ones, in this order
    (the timed calls first: their figures mean nothing if these are wrong):
    - the calls (b) times, at their shapes: masked_cross_entropy and guided_cross_entropy at
      (B, T, V) = (2, 576, 16384) and (16, 576, 16384), bf16, threshold only, no window,
      reduction "mean", inplace_backward False and True, the layout the op picks itself;
    - the fused calls (b) times: linear_masked_cross_entropy and linear_guided_cross_entropy on
      bench/linear.py's own inputs at N = 1152 H = 2048 and N = 9216 H = 4096, V = 16384, bf16,
      head frozen, threshold only, the chunks and layouts the op picks itself; at N = 1152 also
      rows split in 2 and in 4 and 128-row chunks (linear_cross_entropy.force_chunk_rows);
    - forced layouts, unwindowed, at (2, 576, 16384) bf16, "mean" and "none", in-place or not:
      rows split in 2 and in 4 (triton_cross_entropy.force_splits) and 4096-column blocks looped
      over (force_block_v);
    - the matrix: both logits-level ops on (2, 576, 16384), (16, 576, 16384) and (1, 8, 16384) (so
      few rows that each row is split over programs), fp32 and bf16, reductions "mean" and "none"
      (with a random upstream gradient), inplace_backward False and True, with a token threshold,
      windows of 50 (3 at T = 8) and a window threshold; both fused ops on (B, T) = (2, 576) and
      (1, 8), H = 2048, V = 16384, fp32 and bf16, "mean" and "none", head frozen (d hidden only)
      and trained (d weight and d bias too), threshold, windows and window threshold.
    The expected loss and gradients come from the float64 oracles the op tests use
    (earkit.kernels.testing: log_softmax, autograd, loops over the windows) on the same rounded inputs. PASS when max |loss error| <= tol * max |loss| and,
    for each gradient, max |error| <= tol * max |gradient| (fp32 1e-4, 1e-4; bf16 1e-3 for the
    fp32 loss, 2e-2 for the bf16 gradient), and with inplace_backward=False the logits are left
    untouched. Thresholds sit in the widest gap between neighbouring losses near the median, so
    fp32 rounding cannot flip a token's mask (the timed calls use the median itself: the same
    shapes and code paths, another cut).
(b) Timings, bf16, V = 16384, threshold = the median token loss:
    - fused linear + loss (bench/linear.py), N = 1152 H = 2048 and N = 9216 H = 4096, head
      frozen: earkit, torch eager, Liger and cut-cross-entropy where installed (hard labels,
      the thresholded-out tokens as ignore_index), median wall ms between syncs over 3
      rotating inputs, peak extra MB, TFLOP/s on the useful flops
      (earkit.kernels.linear_cross_entropy.flops: hard 4NHV, guided 8NHV), % of a plain bf16
      matmul of the same run and % of the floor (those flops at 782 TFLOP/s, the H200's
      measured bf16 rate);
    - the loss given the logits at (2, 576) and (16, 576): earkit (inplace False, True) and the
      torch eager chain (F.cross_entropy / log_softmax + KL, mask, mean; also after .float()),
      median of CUDA-event timings, peak extra MB;
    - torch.compile of the eager chains last (each compile takes tens of seconds; DESIGN.md has
      their figures if the stage runs out of time first).
(e) Where the fused ops spend their time: one profiled fwd+bwd (torch.profiler) of each fused op
    at both shapes: wall ms, GPU kernel ms, kernels launched, host-syncing aten ops
    (_local_scalar_dense, nonzero, masked_select), and the kernels by GPU time.
(f) The sampler's CUDA graph against eager decoding on a tiny Janus (earkit.engine.tiny's
    architecture, weights redrawn at unit gain so a wrong position or cache slot shows), fp32
    and bf16, two prompts of different lengths, the same seed: PASS when the tokens are equal;
    the largest logit difference and ms per step of each are reported.
(c) The engine benchmark (bench/engine.py) at the Janus-Pro-7B shape, random weights: sampler ms
    per decode step at batch 1 and 16, one erasure step per pair, peak memory, projected time
    for a 50-pair concept.
(d) The same at the 1B shape.

Report: a stage table; the targets of issue 12 (linear hard <= 3.6 ms and <= 200 MB at N = 9216
H = 4096, linear guided <= 7.2 ms, linear hard <= 0.6 ms at N = 1152 H = 2048) and the anchors of
DESIGN.md (torch eager, torch.compile, Liger, cut-cross-entropy on an H200; and the same rows
of this run), each with PASS (earkit's figure at most the limit) or FAIL and % of the floor;
then each stage's tables. It goes to stdout, ending with a short summary, and with --out FILE to
FILE too: appended after what FILE held, rewritten as rows come in, and the rows themselves to
FILE's name with the suffix .jsonl. Without --out nothing is written but a temporary folder,
removed at the end: never the repository or the installed package.
Exit status: 0 when stage a finished and every correctness row (a, f) passed; 1 otherwise; 2
with no CUDA device (without --smoke).

--smoke runs every stage on CPU tensors through the Triton interpreter (TRITON_INTERPRET=1,
EARKIT_BACKEND=triton) at tiny shapes (logits (2, 8, 64), forced layouts at (1, 8, 64), fused
ops at (2, 8) and N = 16, H = 32, V = 64, the engine at the tiny size only), times with
perf_counter, measures memory with the profiler (earkit.bench.memory) and compiles with
backend="aot_eager", so CI runs every code path of this script without a GPU.

It uses only the public kernel API (earkit.kernels.*, backend_name,
linear_cross_entropy.flops), the float64 oracles of earkit.kernels.testing and three layout
knobs (triton_cross_entropy.force_splits, force_block_v, linear_cross_entropy.force_chunk_rows), so
it outlives changes inside the kernels.
"""

import argparse
import contextlib
import datetime
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings

SMOKE = "--smoke" in sys.argv[1:]
if SMOKE and __name__ == "__main__":
    # Triton reads TRITON_INTERPRET when it is imported, so this must come before torch and
    # earkit pull it in; EARKIT_BACKEND=triton sends CPU tensors to the (interpreted) kernels.
    # The stage processes inherit both.
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ["EARKIT_BACKEND"] = "triton"

import torch

ETA = 1.0
MB = 1 << 20
H200_BF16_TFLOPS = 782.0  # measured on the H200 (DESIGN.md): the floor's rate
V_GPU = 16384

# (loss: relative to max |loss|, gradient: relative to max |grad|). The loss is fp32 whatever
# the input dtype; a bf16 gradient is rounded to bf16 (2^-8 relative) when stored.
TOLERANCES = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (1e-3, 2e-2)}
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16"}
SYNC_OPS = ("aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select")

# What each mode runs. Logits-level matrix: ((B, T, V), window, forced splits or None); windows
# of 50 over T = 576 leave a short last window (576 = 11 x 50 + 26).
PLANS = {
    "gpu": dict(
        device="cuda",
        checks=[((2, 576, V_GPU), 50, None), ((16, 576, V_GPU), 50, None), ((1, 8, V_GPU), 3, None)],
        layout_shape=(2, 576, V_GPU),
        layouts=[dict(splits=2), dict(splits=4), dict(block_v=4096)],
        timings=[(2, 576, V_GPU), (16, 576, V_GPU)],
        linear_checks=[((2, 576), 2048, V_GPU, 50), ((1, 8), 2048, V_GPU, 3)],
        linear_matrix_knobs={},
        linear_timings=[(1152, 2048, V_GPU), (9216, 4096, V_GPU)],
        linear_layouts=[dict(splits=2), dict(splits=4), dict(chunk_rows=128)],
        reps=20, warmup=5, compile_backend="inductor", engine_sizes="7b,1b",
        # stage: (cap s, minimum s)
        limits={"a": (110, 30), "b": (160, 40), "e": (45, 15), "f": (40, 15), "c": (120, 60), "d": (90, 40)},
        budget=420, compile_min_s=40,
    ),
    "smoke": dict(
        device="cpu",
        checks=[((2, 8, 64), 3, None)],  # split rows: the forced layouts below
        layout_shape=(1, 8, 64),
        layouts=[dict(splits=2), dict(splits=4), dict(block_v=16)],
        timings=[(2, 8, 64)],
        linear_checks=[((2, 8), 32, 64, 3)],
        linear_matrix_knobs=dict(chunk_rows=8),  # one sequence per chunk: the multi-chunk path
        linear_timings=[(16, 32, 64)],
        linear_layouts=[dict(splits=2), dict(splits=4), dict(chunk_rows=4)],
        reps=2, warmup=1, compile_backend="aot_eager", engine_sizes="tiny",
        limits={"a": (150, 10), "b": (120, 10), "e": (60, 5), "f": (60, 5), "c": (90, 10), "d": (60, 10)},
        budget=400, compile_min_s=0,
    ),
}
STAGE_ORDER = "a,b,e,f,c,d"
STAGE_TITLES = {"a": "correctness vs float64", "b": "op timings", "e": "profiler breakdown of the fused ops",
                "f": "sampler: CUDA graph vs eager"}

# Issue 12's targets and DESIGN.md's anchors (H200, bf16, V = 16384, head frozen), fused linear + loss:
# (op, N, H) -> [(against, ms or None, MB or None)]; the anchors' impl names are bench/linear.py's.
TARGETS = {
    ("hard", 9216, 4096): [("target (issue 12)", 3.6, 200)],
    ("guided", 9216, 4096): [("target (issue 12)", 7.2, None)],
    ("hard", 1152, 2048): [("target (issue 12)", 0.6, None)],
}
ANCHORS = {
    ("hard", 9216, 4096): [("torch eager", 4.94, 1728), ("torch.compile", 3.81, 360),
                           ("Liger fused linear CE", 4.38, 200), ("cut-cross-entropy", 12.9, 72)],
    ("guided", 9216, 4096): [("torch eager", 11.5, 2304), ("torch.compile", 8.62, 1440)],
    ("hard", 1152, 2048): [("torch eager", 0.95, None), ("Liger fused linear CE", 1.76, None),
                           ("cut-cross-entropy", 2.40, None)],
    ("guided", 1152, 2048): [("torch eager", 1.20, None)],
}


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def fmt(value, spec):
    return format(value, spec) if is_number(value) else "-"


def floor_ms(op: str, n: int, h: int, v: int) -> float:
    """The useful matmul flops of one fwd+bwd (head frozen) at the H200's measured bf16 rate."""
    from earkit.kernels.linear_cross_entropy import flops

    return flops(n, h, v, op) / (H200_BF16_TFLOPS * 1e12) * 1e3


# ---------------------------------------------------------------- a stage's side: rows out as they come


class Rows:
    """Append each row to the JSON-lines file at once (and a line to the log)."""

    def __init__(self, path: str, stage: str):
        self.path, self.stage, self.started = path, stage, time.perf_counter()

    def __call__(self, row: dict) -> None:
        row = {"stage": self.stage, "t": round(time.perf_counter() - self.started, 2), **row}
        with open(self.path, "a") as f:
            f.write(json.dumps(row, default=float) + "\n")


class Deadline:
    def __init__(self, at: float | None):
        self.at = at

    def left(self) -> float:
        return math.inf if self.at is None else self.at - time.time()


def out_of_time(emit, what: str, deadline) -> None:
    emit({"kind": "note", "out_of_time": True, "message": f"{what}: not run, {max(deadline.left(), 0):.0f} s of the "
                                                         f"stage left"})
    print(f"  {what}: not run, out of stage time", flush=True)


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def free(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def short_error(error: BaseException) -> str:
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {text}"[:160]


@contextlib.contextmanager
def layout(splits=None, block_v=None, chunk_rows=None):
    """Force a row layout or chunk size of the kernels (None: the kernels' own choice), then restore."""
    from earkit.kernels import linear_cross_entropy, triton_cross_entropy

    saved = (triton_cross_entropy.force_splits, triton_cross_entropy.force_block_v,
             linear_cross_entropy.force_chunk_rows)
    triton_cross_entropy.force_splits, triton_cross_entropy.force_block_v = splits, block_v
    linear_cross_entropy.force_chunk_rows = chunk_rows
    try:
        yield
    finally:
        (triton_cross_entropy.force_splits, triton_cross_entropy.force_block_v,
         linear_cross_entropy.force_chunk_rows) = saved


def layout_name(knobs: dict) -> str:
    words = {"splits": "rows split in {}", "block_v": "{}-column blocks", "chunk_rows": "{}-row chunks"}
    return ", ".join(words[k].format(v) for k, v in knobs.items() if v is not None) or "auto"


# ---------------------------------------------------------------- inputs and the float64 oracle


def make_inputs(shape, dtype, device, seed=0) -> dict:
    """Logits ~ 2 N(0, 1) with random targets; guided teachers close to the student (a copy of them)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    randn = lambda: torch.randn(shape, generator=gen, device=device)  # noqa: E731
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


def oracle_token_loss(op: str, inputs: dict):
    """Per-token loss l_i (N,) in float64 from the oracle's pieces (earkit.kernels.testing)."""
    from earkit.kernels import testing as oracle

    with torch.no_grad():
        if op == "masked":
            return oracle.hard_token_loss(inputs["logits"].double(), inputs["target"])
        target_logits = oracle.guided_target(inputs["concept"].double(), inputs["anchor"].double(), ETA)
        return oracle.guided_token_loss(inputs["student"].double(), target_logits)


def oracle_window_sums(token_loss, threshold, rows_shape, window: int):
    """The window sums L_w of the tokens kept at `threshold`, none dropped (a window_threshold of -inf)."""
    from earkit.kernels import testing as oracle

    keep = oracle.token_mask(token_loss, threshold)
    return oracle.window_weights(token_loss, keep, rows_shape, window, -math.inf)[1]


def threshold_in_gap(values):
    """A threshold near the median of `values`, midway across the widest gap between neighbours
    in the middle half. Returns (threshold, margin): every value is at least margin away."""
    s = values.flatten().double().sort().values
    n = s.numel()
    lo, hi = max(1, n // 4), max(2, min(n, 3 * n // 4 + 1))
    gaps = s[lo:hi] - s[lo - 1 : hi - 1]
    i = lo + int(gaps.argmax())
    return float((s[i - 1] + s[i]) / 2), float(gaps.max() / 2)


def oracle_result(op, inputs, threshold, window, window_threshold, reduction, upstream):
    """(loss, gradient) of the logits-level op in float64, from earkit.kernels.testing."""
    from earkit.kernels import testing as oracle

    options = dict(threshold=threshold, window=window, window_threshold=window_threshold, reduction=reduction,
                   grad_output=upstream if reduction == "none" else None)
    if op == "masked":
        want = oracle.masked_cross_entropy(inputs["logits"], inputs["target"], **options)
    else:
        want = oracle.guided_cross_entropy(inputs["student"], inputs["concept"], inputs["anchor"], eta=ETA, **options)
    return want.loss, want.grads[0]


def earkit_loss(op, x, inputs, **options):
    from earkit.kernels import guided_cross_entropy, masked_cross_entropy

    if op == "masked":
        return masked_cross_entropy(x, inputs["target"], **options)
    return guided_cross_entropy(x, inputs["concept"], inputs["anchor"], eta=ETA, **options)


# ---------------------------------------------------------------- (a) correctness, loss given the logits


def check_one(op, inputs, options, reduction, inplace, upstream, expected, dtype):
    """Run the earkit op once; compare with the float64 result. Returns the row's measures."""
    loss_tol, grad_tol = TOLERANCES[dtype]
    x = inputs[grad_input_name(op)]
    leaf = x.clone().requires_grad_(True)
    buffer = leaf.data_ptr()
    out = earkit_loss(op, leaf, inputs, reduction=reduction, inplace_backward=inplace, **options)
    to_backward = out if reduction == "mean" else (out * upstream).sum()
    (grad,) = torch.autograd.grad(to_backward, leaf)
    grad = grad.detach()  # an in-place gradient is the leaf's own buffer, which requires grad
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


def logits_checks(emit, deadline, device, group, shape, dtype, window, knobs_list, reductions=("mean", "none"),
                  inplaces=(False, True), seed=1):
    """Check both ops at one shape and dtype under each layout in knobs_list; a row per case."""
    label = "x".join(map(str, shape))
    try:
        inputs = make_inputs(shape, dtype, device, seed=seed)
    except Exception as error:
        emit({"kind": "error", "what": f"check inputs {label}", "message": short_error(error)})
        return
    gen = torch.Generator(device=device).manual_seed(3)
    upstream = torch.randn(shape[:-1], generator=gen, device=device)  # for reduction="none"
    for op in ("masked", "guided"):
        base = {"kind": "check", "group": group, "shape": label, "dtype": DTYPE_NAMES[dtype], "op": op,
                "window": window or "-"}
        if deadline.left() <= 0:
            emit({**base, "layout": "-", "reduction": "-", "inplace": "-", "status": "NOT RUN: out of stage time",
                  "out_of_time": True})
            continue
        try:
            token_loss = oracle_token_loss(op, inputs)
            threshold, margin = threshold_in_gap(token_loss)
            window_threshold, window_margin = None, math.nan
            if window:
                window_threshold, window_margin = threshold_in_gap(
                    oracle_window_sums(token_loss, threshold, shape[:-1], window))
            del token_loss
            options = {"threshold": threshold}
            if window:
                options.update(window=window, window_threshold=window_threshold)
        except Exception as error:
            traceback.print_exc()
            emit({**base, "layout": "-", "reduction": "-", "inplace": "-", "status": f"ERROR {short_error(error)}"})
            continue
        for reduction in reductions:
            try:
                expected = oracle_result(op, inputs, threshold, window, window_threshold, reduction, upstream)
            except Exception as error:  # say so in every row it would have served
                traceback.print_exc()
                expected = error
            for knobs in knobs_list:
                for inplace in inplaces:
                    row = {**base, "layout": layout_name(knobs), "reduction": reduction, "inplace": inplace,
                           "margins": f"{margin:.1e} / {window_margin:.1e}" if window else f"{margin:.1e}"}
                    try:
                        if isinstance(expected, Exception):
                            raise expected
                        with layout(**knobs):
                            row.update(check_one(op, inputs, options, reduction, inplace, upstream, expected, dtype))
                    except Exception as error:
                        traceback.print_exc()
                        row["status"] = f"ERROR {short_error(error)}"
                    emit(row)
                    print(f"  check {group:6s} {label:>12s} {row['dtype']} {op:6s} {reduction:4s} "
                          f"inplace={str(inplace):5s} {row['layout']:24s} {row['status']}", flush=True)
            del expected
    del inputs
    free(device)


# ---------------------------------------------------------------- (a) correctness, fused linear + loss


def linear_oracle(op, x, weight, bias, threshold, window, window_threshold, reduction, upstream, train_head):
    """The fused op's float64 oracle (earkit.kernels.testing): .loss, .grads (hidden, then weight and
    bias when train_head), .token_loss."""
    from earkit.kernels import testing as oracle

    options = dict(threshold=threshold, window=window, window_threshold=window_threshold, reduction=reduction,
                   grad_output=upstream if reduction == "none" else None, head_grads=train_head)
    if op == "masked":
        return oracle.linear_masked_cross_entropy(x["hidden"], weight, x["target"], bias, **options)
    return oracle.linear_guided_cross_entropy(x["student"], x["concept"], x["anchor"], weight, bias, eta=ETA,
                                              **options)


def linear_earkit(op, x, weight, bias, options, reduction, upstream, train_head):
    from earkit.kernels import linear_guided_cross_entropy, linear_masked_cross_entropy

    h = x["student" if op == "guided" else "hidden"].clone().requires_grad_(True)
    w = weight.clone().requires_grad_(train_head)
    b = bias.clone().requires_grad_(train_head)
    if op == "masked":
        out = linear_masked_cross_entropy(h, w, x["target"], b, reduction=reduction, **options)
    else:
        out = linear_guided_cross_entropy(h, x["concept"], x["anchor"], w, b, eta=ETA, reduction=reduction, **options)
    to_backward = out if reduction == "mean" else (out * upstream).sum()
    grads = torch.autograd.grad(to_backward, [h, w, b] if train_head else [h])
    return out.detach(), grads


def linear_checks(emit, deadline, device, group, label, x, weight, bias, dtype, window, knobs_list,
                  reductions=("mean", "none"), heads=(False, True)):
    """Check both fused ops on these inputs under each layout in knobs_list (one float64 reference each)."""
    loss_tol, grad_tol = TOLERANCES[dtype]
    gen = torch.Generator(device=device).manual_seed(5)
    upstream = torch.randn(x["target"].shape, generator=gen, device=device)
    for op in ("masked", "guided"):
        base = {"kind": "linear_check", "group": group, "shape": label, "dtype": DTYPE_NAMES[dtype], "op": op,
                "window": window or "-"}
        if deadline.left() <= 0:
            emit({**base, "layout": "-", "reduction": "-", "head": "-", "status": "NOT RUN: out of stage time",
                  "out_of_time": True})
            continue
        try:
            token_loss = linear_oracle(op, x, weight, bias, None, None, None, "mean", None, False).token_loss
            threshold, _ = threshold_in_gap(token_loss)
            options = {"threshold": threshold}
            window_threshold = None
            if window:
                window_threshold, _ = threshold_in_gap(
                    oracle_window_sums(token_loss, threshold, x["target"].shape, window))
                options.update(window=window, window_threshold=window_threshold)
            del token_loss
        except Exception as error:
            traceback.print_exc()
            emit({**base, "layout": "-", "reduction": "-", "head": "-", "status": f"ERROR {short_error(error)}"})
            continue
        for reduction in reductions:
            for train_head in heads:
                try:
                    want = linear_oracle(op, x, weight, bias, threshold, window, window_threshold, reduction,
                                            upstream, train_head)
                except Exception as error:
                    traceback.print_exc()
                    want = error
                for knobs in knobs_list:
                    row = {**base, "layout": layout_name(knobs), "reduction": reduction,
                           "head": "trained" if train_head else "frozen"}
                    try:
                        if isinstance(want, Exception):
                            raise want
                        want_out, want_grads = want.loss, want.grads
                        with layout(**knobs):
                            out, grads = linear_earkit(op, x, weight, bias, options, reduction, upstream, train_head)
                        loss_rel = float((out.double() - want_out).abs().max()) / max(float(want_out.abs().max()), 1e-6)
                        grad_rels = [float((g.double() - wg).abs().max()) / max(float(wg.abs().max()), 1e-12)
                                     for g, wg in zip(grads, want_grads)]
                        ok = loss_rel <= loss_tol and all(r <= grad_tol for r in grad_rels)
                        row.update(loss_rel=loss_rel, grad_rels=grad_rels, status="PASS" if ok else "FAIL")
                        del out, grads
                    except Exception as error:
                        traceback.print_exc()
                        row["status"] = f"ERROR {short_error(error)}"
                    emit(row)
                    print(f"  check {group:6s} {label} {row['dtype']} linear {op:6s} {reduction:4s} "
                          f"head={row['head']:7s} {row['layout']:16s} {row['status']}", flush=True)
                del want
        free(device)


def matrix_linear_inputs(batch, seq_len, n_inner, n_cols, dtype, device):
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
    return x, weight, bias


def stage_correctness(plan, emit, deadline, args) -> None:
    from earkit.bench import linear

    device = plan["device"]
    # The calls (b) times, first: those figures mean nothing if these are wrong.
    for shape in plan["timings"]:
        logits_checks(emit, deadline, device, "timed", shape, torch.bfloat16, None, [{}], reductions=("mean",),
                      seed=2)
    for i, (n, h, v) in enumerate(plan["linear_timings"]):
        if deadline.left() <= 0:
            out_of_time(emit, f"the timed fused calls at N={n} H={h}", deadline)
            continue
        try:
            x = linear.make_inputs(n, h, v, torch.bfloat16, torch.device(device), seed=0)  # (b)'s own inputs
        except Exception as error:
            emit({"kind": "error", "what": f"linear inputs N={n} H={h}", "message": short_error(error)})
            continue
        knobs = [{}] + (plan["linear_layouts"] if i == 0 else [])
        linear_checks(emit, deadline, device, "timed", f"N={n} H={h} V={v}", x, x["weight"], x["bias"],
                      torch.bfloat16, None, knobs, reductions=("mean",), heads=(False,))
        del x
        free(device)
    # Forced layouts, unwindowed.
    for knobs in plan["layouts"]:
        logits_checks(emit, deadline, device, "layout", plan["layout_shape"], torch.bfloat16, None, [knobs])
    # The matrix: dtypes, reductions, in-place, windows, trained heads.
    for shape, window, splits in plan["checks"]:
        for dtype in (torch.float32, torch.bfloat16):
            logits_checks(emit, deadline, device, "matrix", shape, dtype, window, [dict(splits=splits)])
    for (batch, seq_len), n_inner, n_cols, window in plan["linear_checks"]:
        for dtype in (torch.float32, torch.bfloat16):
            if deadline.left() <= 0:
                out_of_time(emit, f"the fused matrix at {batch}x{seq_len} {DTYPE_NAMES[dtype]}", deadline)
                continue
            x, weight, bias = matrix_linear_inputs(batch, seq_len, n_inner, n_cols, dtype, device)
            linear_checks(emit, deadline, device, "matrix", f"{batch}x{seq_len} H={n_inner} V={n_cols}", x, weight,
                          bias, dtype, window, [plan["linear_matrix_knobs"]])
            del x, weight, bias
            free(device)


# ---------------------------------------------------------------- (b) timings


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


def timing_impls(op, inputs, threshold, compile_backend):
    """[(impl, loss_fn(leaf))], the eager row first; compile_backend None leaves torch.compile out."""
    from earkit.bench.baselines import guided_eager, hard_eager  # the eager chains, shared with the CPU tables

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


def run_timings(emit, shapes, device, reps, warmup, compile_backend, only=None):
    """The loss given the logits, bf16: a row per (shape, op, impl), each emitted as measured."""
    for shape in shapes:
        try:
            inputs = make_inputs(shape, torch.bfloat16, device, seed=2)
        except Exception as error:
            emit({"kind": "error", "what": f"timing inputs {shape}", "message": short_error(error)})
            continue
        n = shape[0] * shape[1]
        for op in ("masked", "guided"):
            try:
                threshold = float(oracle_token_loss(op, inputs).median())  # keeps about half
            except Exception as error:
                emit({"kind": "error", "what": f"timing threshold {op} N={n}", "message": short_error(error)})
                continue
            for impl, loss_fn in timing_impls(op, inputs, threshold, compile_backend):
                if only is not None and impl not in only:
                    continue
                row = {"kind": "timing", "op": op, "n": n, "v": shape[2], "impl": impl, "ms": math.nan,
                       "mb": math.nan, "note": ""}
                try:
                    t0 = time.perf_counter()
                    fwd_bwd(loss_fn, inputs[grad_input_name(op)].clone().requires_grad_(True))  # compiles, if it does
                    sync(device)
                    first_s = time.perf_counter() - t0
                    row["ms"] = median_ms(loss_fn, inputs[grad_input_name(op)], reps, warmup, device)
                    row["mb"] = peak_extra_mb(loss_fn, inputs[grad_input_name(op)], device)
                    if impl.startswith("torch.compile"):
                        row["note"] = f"first call {first_s:.1f} s"
                except Exception as error:  # OOM or a compile failure: say why, keep going
                    row["note"] = short_error(error)[:100]
                    free(device)
                emit(row)
                print(f"  time {op:6s} N={n:5d} {impl:22s} {row['ms']:9.3f} ms {row['mb']:9.1f} MB {row['note']}",
                      flush=True)
        del inputs
        free(device)


def stage_timings(plan, emit, deadline, args) -> None:
    from earkit.bench import linear

    device = torch.device(plan["device"])
    reps, warmup = args.reps or plan["reps"], args.warmup or plan["warmup"]
    compile_backend = None if args.no_compile else plan["compile_backend"]
    emit_linear = lambda row: emit({"kind": "linear_timing", **row})  # noqa: E731
    # 1. The fused ops against their targets and the anchors that need no compile.
    print(f"  fused linear + loss: {plan['linear_timings']}", flush=True)
    linear.run(plan["linear_timings"], torch.bfloat16, device, reps, warmup, False, on_row=emit_linear)
    # 2. The loss given the logits.
    run_timings(emit, plan["timings"], plan["device"], reps, warmup, None)
    # 3. torch.compile rows last; each is skipped, and says so, when the stage has too little time left.
    if compile_backend is None:
        return
    for shape in plan["linear_timings"]:
        if compile_backend != "inductor":
            break  # bench/linear.py compiles with inductor only: not in the smoke run
        if deadline.left() < plan["compile_min_s"]:
            out_of_time(emit, f"torch.compile of the fused rows at {shape}", deadline)
            continue
        linear.run([shape], torch.bfloat16, device, reps, warmup, True, only={"torch.compile"}, on_row=emit_linear)
    for shape in plan["timings"]:
        if deadline.left() < plan["compile_min_s"]:
            out_of_time(emit, f"torch.compile of the logits rows at {shape}", deadline)
            continue
        run_timings(emit, [shape], plan["device"], reps, warmup, compile_backend, only={"torch.compile eager"})


# ---------------------------------------------------------------- (e) profiler breakdown


def fused_op(op, x, threshold):
    """loss(leaf) of the fused op on bench/linear.py's inputs x, as its earkit row calls it."""
    from earkit.kernels import linear_guided_cross_entropy, linear_masked_cross_entropy

    w, b = x["weight"], x["bias"]
    if op == "hard":
        return lambda leaf: linear_masked_cross_entropy(leaf, w, x["target"], b, threshold=threshold)
    return lambda leaf: linear_guided_cross_entropy(leaf, x["concept"], x["anchor"], w, b, eta=ETA,
                                                    threshold=threshold)


def stage_profile(plan, emit, deadline, args) -> None:
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from earkit.bench import linear

    device = plan["device"]
    on_gpu = device == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    for n, h, v in plan["linear_timings"]:
        if deadline.left() <= 0:
            out_of_time(emit, f"the profile at N={n} H={h}", deadline)
            continue
        x = linear.make_inputs(n, h, v, torch.bfloat16, torch.device(device), seed=0)
        for op in ("hard", "guided"):
            try:
                fn = fused_op(op, x, float(linear.token_losses(op, x).median()))  # (b)'s call and threshold
                leaf = x["hidden" if op == "hard" else "student"].detach().clone().requires_grad_(True)
                for _ in range(2):  # compiles and warms the allocator
                    fwd_bwd(fn, leaf)
                sync(device)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # the profiler's notes about blocks that predate it
                    with profile(activities=activities) as prof:
                        t0 = time.perf_counter()
                        fwd_bwd(fn, leaf)
                        sync(device)
                        wall_ms = (time.perf_counter() - t0) * 1e3
                events = prof.events()
                syncs = {name: 0 for name in SYNC_OPS}
                for event in events:
                    if event.name in syncs and event.device_type == DeviceType.CPU:
                        syncs[event.name] += 1
                pieces = {}  # name -> [calls, ms]
                if on_gpu:
                    for event in events:
                        if event.device_type == DeviceType.CUDA:
                            piece = pieces.setdefault(event.name, [0, 0.0])
                            piece[0] += 1
                            piece[1] += event.time_range.elapsed_us() / 1e3
                    where = "GPU kernel"
                else:  # no kernels under the interpreter: the CPU ops by self time instead
                    for average in prof.key_averages():
                        pieces[average.key] = [average.count, average.self_cpu_time_total / 1e3]
                    where = "CPU op (self time)"
                busy = sum(ms for _, ms in pieces.values())
                launches = sum(calls for calls, _ in pieces.values()) if on_gpu else math.nan
                emit({"kind": "profile", "op": op, "n": n, "h": h, "v": v, "wall_ms": wall_ms,
                      "busy_ms": busy, "launches": launches, "where": where,
                      "syncs": sum(syncs.values()), "sync_ops": {k: c for k, c in syncs.items() if c}})
                print(f"  profile {op:6s} N={n:5d} H={h:5d}: wall {wall_ms:.2f} ms, {where} time {busy:.2f} ms, "
                      f"{launches} kernels, host syncs {sum(syncs.values())}", flush=True)
                for name, (calls, ms) in sorted(pieces.items(), key=lambda kv: -kv[1][1])[:12]:
                    emit({"kind": "kernel", "op": op, "n": n, "h": h, "name": name[:100], "calls": calls, "ms": ms,
                          "share": 100 * ms / busy if busy > 0 else math.nan, "where": where})
                    print(f"      {ms:9.3f} ms {calls:5d}x  {name[:100]}", flush=True)
                del leaf, prof, events
            except Exception as error:
                traceback.print_exc()
                emit({"kind": "error", "what": f"profile {op} N={n} H={h}", "message": short_error(error)})
            free(device)
        del x
        free(device)


# ---------------------------------------------------------------- (f) sampler: CUDA graph vs eager


def stage_sampler(plan, emit, deadline, args) -> None:
    from earkit.bench.engine import build_random_model
    from earkit.engine.sampler import cuda_graph_blocker, sample_image_tokens
    from earkit.engine.tiny import sharpen

    device = torch.device(plan["device"])
    # Two prompts of different lengths: the shorter is left-padded, so positions and masks differ per row.
    prompts = ["a photo of a church on a hill", "the sea"]
    for dtype in (torch.float32, torch.bfloat16):
        row = {"kind": "sampler", "dtype": DTYPE_NAMES[dtype], "status": "ERROR"}
        try:
            model, tokenizer = build_random_model("tiny", device, dtype)
            sharpen(model)
            blocker = cuda_graph_blocker(model)
            runs = {}
            for graph in (False, True):
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    for _ in range(2):  # the first graphed call captures; time the second of each
                        sync(device)
                        t0 = time.perf_counter()
                        tokens, logits = sample_image_tokens(model, tokenizer, prompts, guidance_scale=5.0, seed=3,
                                                             cuda_graph=graph, return_logits=True, progress=False)
                        sync(device)
                        seconds = time.perf_counter() - t0
                # Only the sampler's own words about the graph (a capture that failed, or could not be): a
                # library's unrelated warning must not fail the row.
                about_graph = [str(w.message)[:200] for w in caught if "graph" in str(w.message).lower()]
                runs[graph] = (tokens, logits, seconds, about_graph)
            (eager_tokens, eager_logits, eager_s, _), (graph_tokens, graph_logits, graph_s, graph_warnings) = \
                runs[False], runs[True]
            steps = eager_tokens.shape[1]
            equal = bool(torch.equal(eager_tokens, graph_tokens))
            row.update(tokens=f"{eager_tokens.shape[0]} x {steps}", tokens_equal=equal,
                       token_match=float((eager_tokens == graph_tokens).float().mean()),
                       max_logit_diff=float((graph_logits - eager_logits).abs().max()),
                       max_logit=float(eager_logits.abs().max()),
                       eager_ms_per_step=1e3 * eager_s / steps, graph_ms_per_step=1e3 * graph_s / steps,
                       note="; ".join(graph_warnings)[:300])
            if blocker is not None:
                row.update(status="SKIP", note=f"no CUDA graph: {blocker} (both runs eager)")
            elif graph_warnings:
                row["status"] = "FAIL"  # the graph path warned (capture failed): it decoded eagerly
            else:
                row["status"] = "PASS" if equal else "FAIL"
            del model
        except Exception as error:
            traceback.print_exc()
            row["note"] = short_error(error)
        emit(row)
        print(f"  sampler {row['dtype']}: tokens equal {row.get('tokens_equal')}, max logit diff "
              f"{fmt(row.get('max_logit_diff'), '.2e')}, eager {fmt(row.get('eager_ms_per_step'), '.2f')} ms/step, "
              f"graph {fmt(row.get('graph_ms_per_step'), '.2f')} ms/step: {row['status']} {row.get('note', '')}",
              flush=True)
        free(device)


# ---------------------------------------------------------------- (c), (d) the engine


def stage_engine(size):
    def run_stage(plan, emit, deadline, args) -> None:
        from earkit.bench.engine import run

        def on_figure(name, value):
            emit({"kind": "engine", "size": size, "name": name, "value": value})
            print(f"  engine {size}: {name} = {fmt(value, '.3f')}", flush=True)

        tiny = size == "tiny"
        report = run(size=size, device=plan["device"], sampler_batches=(1, 2) if tiny else (1, 16),
                     train_batch=2 if tiny else 8, on_figure=on_figure)
        emit({"kind": "engine_info", "size": size,
              **{k: v for k, v in report.items() if not isinstance(v, float)}})

    return run_stage


def engine_sizes(plan, args) -> list[str]:
    sizes = args.engine_sizes or plan["engine_sizes"]
    return [s.strip() for s in sizes.split(",") if s.strip() and s.strip() != "none"][:2]


def stage_functions(plan, args) -> dict:
    stages = {"a": stage_correctness, "b": stage_timings, "e": stage_profile, "f": stage_sampler}
    for letter, size in zip("cd", engine_sizes(plan, args)):
        stages[letter] = stage_engine(size)
    return stages


def stage_title(letter, plan, args) -> str:
    sizes = dict(zip("cd", engine_sizes(plan, args)))
    if letter in STAGE_TITLES:
        return STAGE_TITLES[letter]
    return f"engine at the Janus-Pro-{sizes[letter]} shape" if letter in sizes else "engine at a second shape"


# ---------------------------------------------------------------- the report


def check_table(rows) -> str:
    lines = [
        "| group | shape (B x T x V) | dtype | op | window | layout | reduction | inplace | max abs err loss (rel) "
        "| max abs err grad (rel) | max abs grad | logits buffer | threshold margins | result |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | ---: | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['group']} | {r['shape']} | {r['dtype']} | {r['op']} | {r['window']} | {r['layout']} "
            f"| {r['reduction']} | {r['inplace']} "
            f"| {fmt(r.get('loss_err'), '.2e')} ({fmt(r.get('loss_rel'), '.1e')}) "
            f"| {fmt(r.get('grad_err'), '.2e')} ({fmt(r.get('grad_rel'), '.1e')}) | {fmt(r.get('grad_max'), '.2e')} "
            f"| {r.get('buffer', '-')} | {r.get('margins', '-')} | {r['status']} |"
        )
    return "\n".join(lines)


def linear_check_table(rows) -> str:
    lines = [
        "| group | shape | dtype | op | window | layout | reduction | head | max err loss (rel) "
        "| max err grad rel: hidden / weight / bias | result |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        grads = " / ".join(f"{g:.1e}" for g in r.get("grad_rels", [])) or "-"
        lines.append(f"| {r['group']} | {r['shape']} | {r['dtype']} | linear {r['op']} | {r['window']} | {r['layout']} "
                     f"| {r['reduction']} | {r['head']} | {fmt(r.get('loss_rel'), '.1e')} | {grads} | {r['status']} |")
    return "\n".join(lines)


def timing_table(rows) -> str:
    lines = [
        "| op | N | impl | median ms | peak extra MB | speedup vs eager | memory ratio vs eager | note |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    eager = {(r["op"], r["n"]): r for r in rows if r["impl"] == "torch eager"}
    for r in rows:
        base = eager.get((r["op"], r["n"]), {})
        speedup = base.get("ms", math.nan) / r["ms"] if is_number(r["ms"]) and r["ms"] > 0 else math.nan
        memory = r["mb"] / base.get("mb", math.nan) if is_number(base.get("mb")) and base["mb"] > 0 else math.nan
        lines.append(f"| {r['op']} | {r['n']} | {r['impl']} | {fmt(r['ms'], '.3f')} | {fmt(r['mb'], '.1f')} "
                     f"| {fmt(speedup, '.2f')}x | {fmt(memory, '.3f')} | {r['note']} |")
    return "\n".join(lines)


def linear_timing_table(rows) -> str:
    lines = [
        "| op | N | H | impl | median ms | % of floor | TFLOP/s | % of matmul | peak extra MB | note |",
        "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        floor = floor_ms(r["op"], r["n"], r["h"], r["v"])
        pct_floor = 100 * floor / r["ms"] if is_number(r["ms"]) and r["ms"] > 0 else math.nan
        lines.append(f"| linear {r['op']} | {r['n']} | {r['h']} | {r['impl']} | {fmt(r['ms'], '.3f')} "
                     f"| {fmt(pct_floor, '.0f')} | {fmt(r['tflops'], '.1f')} | {fmt(r['pct'], '.1f')} "
                     f"| {fmt(r['mb'], '.1f')} | {r['note']} |")
    return "\n".join(lines)


def verdict(value, limit) -> str:
    if limit is None:
        return "-"
    if not is_number(value):
        return "NOT MEASURED"
    return "PASS" if value <= limit else f"FAIL ({value / limit:.2f}x)"


def targets_rows(linear_rows) -> list[dict]:
    """Each target and anchor against earkit's row of the same op and shape: limit, measure, verdict."""
    measured = {}  # (op, n, h, impl) -> row; the last measure wins
    for r in linear_rows:
        impl = "earkit" if r["impl"].startswith("earkit") else r["impl"]
        measured[(r["op"], r["n"], r["h"], impl)] = r
    out = []
    for key in list(dict.fromkeys([*TARGETS, *ANCHORS])):
        op, n, h = key
        ours = measured.get((op, n, h, "earkit"), {})
        ms, mb = ours.get("ms", math.nan), ours.get("mb", math.nan)
        floor = floor_ms(op, n, h, V_GPU)
        limits = list(TARGETS.get(key, []))
        for impl, anchor_ms, anchor_mb in ANCHORS.get(key, []):
            limits.append((f"{impl} (DESIGN.md, H200)", anchor_ms, anchor_mb))
            same_run = measured.get((op, n, h, impl))
            if same_run is not None and (is_number(same_run.get("ms")) or is_number(same_run.get("mb"))):
                limits.append((f"{impl} (this run)", same_run.get("ms") if is_number(same_run.get("ms")) else None,
                               same_run.get("mb") if is_number(same_run.get("mb")) else None))
        for against, limit_ms, limit_mb in limits:
            out.append({"op": op, "n": n, "h": h, "against": against, "limit_ms": limit_ms, "ms": ms,
                        "ms_result": verdict(ms, limit_ms), "limit_mb": limit_mb, "mb": mb,
                        "mb_result": verdict(mb, limit_mb),
                        "pct_floor": 100 * floor / ms if is_number(ms) and ms > 0 else math.nan, "floor_ms": floor})
    return out


def targets_table(linear_rows) -> str:
    lines = [
        "| op | N x H | against | limit ms | earkit ms | result | limit MB | earkit peak extra MB | result "
        "| floor ms | % of floor |",
        "| --- | --- | --- | ---: | ---: | --- | ---: | ---: | --- | ---: | ---: |",
    ]
    for r in targets_rows(linear_rows):
        lines.append(f"| linear {r['op']} | {r['n']} x {r['h']} | {r['against']} | {fmt(r['limit_ms'], '.2f')} "
                     f"| {fmt(r['ms'], '.3f')} | {r['ms_result']} | {fmt(r['limit_mb'], '.0f')} "
                     f"| {fmt(r['mb'], '.0f')} "
                     f"| {r['mb_result']} | {r['floor_ms']:.2f} | {fmt(r['pct_floor'], '.0f')} |")
    return "\n".join(lines)


def profile_section(rows) -> str:
    summaries = [r for r in rows if r["kind"] == "profile"]
    if not summaries:
        return ""
    lines = ["| op | N | H | wall ms (profiled) | kernel / op time ms | GPU activities (kernels, copies, sets) "
             "| host-syncing aten ops |",
             "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in summaries:
        sync_ops = ", ".join(f"{k} x{c}" for k, c in r["sync_ops"].items()) or "none"
        lines.append(f"| linear {r['op']} | {r['n']} | {r['h']} | {r['wall_ms']:.3f} | {r['busy_ms']:.3f} "
                     f"| {fmt(r['launches'], '.0f')} | {sync_ops} |")
    for r in summaries:
        pieces = [k for k in rows if k["kind"] == "kernel" and (k["op"], k["n"], k["h"]) == (r["op"], r["n"], r["h"])]
        lines += ["", f"linear {r['op']} N={r['n']} H={r['h']}, by {r['where']}:", "",
                  "| ms | share | calls | name |", "| ---: | ---: | ---: | --- |"]
        lines += [f"| {k['ms']:.3f} | {fmt(k['share'], '.0f')}% | {k['calls']} | `{k['name']}` |" for k in pieces]
    return "\n".join(lines)


def sampler_table(rows) -> str:
    lines = ["| dtype | tokens | tokens equal | max abs logit diff (max logit) | eager ms/step | graph ms/step | note "
             "| result |", "| --- | --- | --- | --- | ---: | ---: | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['dtype']} | {r.get('tokens', '-')} | {r.get('tokens_equal', '-')} "
                     f"| {fmt(r.get('max_logit_diff'), '.2e')} ({fmt(r.get('max_logit'), '.1f')}) "
                     f"| {fmt(r.get('eager_ms_per_step'), '.2f')} | {fmt(r.get('graph_ms_per_step'), '.2f')} "
                     f"| {r.get('note', '')} | {r['status']} |")
    return "\n".join(lines)


def engine_section(rows, size) -> str:
    figures = [r for r in rows if r["kind"] == "engine" and r["size"] == size]
    info = next((r for r in rows if r["kind"] == "engine_info" and r["size"] == size), None)
    if not figures and info is None:
        return ""
    text = ""
    if info is not None:
        text = (f"{info.get('card', info.get('device'))}, {info.get('dtype')}; {info.get('image_tokens')} image "
                f"tokens; optimizer {info.get('optimizer')}, W = {info.get('window')}, {info.get('train_batch')} pairs "
                f"per step, "
                f"gradient checkpointing {info.get('gradient_checkpointing')}\n\n")
    else:
        text = "(stopped before the end: the figures measured so far)\n\n"
    lines = ["| measure | value |", "| --- | ---: |"]
    lines += [f"| {r['name']} | {fmt(r['value'], '.3f')} |" for r in figures]
    return text + "\n".join(lines)


def correctness_rows(rows) -> list[dict]:
    return [r for r in rows if r["kind"] in ("check", "linear_check", "sampler")]


def describe(row) -> str:
    keys = ("group", "shape", "dtype", "op", "window", "layout", "reduction", "inplace", "head")
    return f"{row['kind']} " + " ".join(f"{k}={row[k]}" for k in keys if k in row) + f": {row['status']}"


def correctness_line(rows, stages) -> tuple[str, bool]:
    checks = correctness_rows(rows)
    counted = [r for r in checks if r["status"] != "SKIP"]
    bad = [r for r in counted if r["status"] != "PASS"]
    a_done = "a" not in stages or stages["a"].get("status") == "done"
    ok = not bad and a_done and (bool(counted) or "a" not in stages)
    text = f"Correctness (a, f): {len(counted) - len(bad)} of {len(counted)} PASS"
    skipped = len(checks) - len(counted)
    if skipped:
        text += f", {skipped} skipped"
    if not a_done:
        text += f"; stage a {stages.get('a', {}).get('status', 'not run')}: not every check ran"
    text += "."
    if bad:
        text += " Not passing:\n\n" + "\n".join(f"- {describe(r)}" for r in bad[:20])
        if len(bad) > 20:
            text += f"\n- ... and {len(bad) - 20} more (tables below)"
    return text, ok


def stage_table(stages) -> str:
    lines = ["| stage | what | time allowed s | took s | rows | result |", "| --- | --- | ---: | ---: | ---: | --- |"]
    for letter, s in stages.items():
        lines.append(f"| {letter} | {s['title']} | {fmt(s.get('allowed_s'), '.0f')} | {fmt(s.get('took_s'), '.0f')} "
                     f"| {s.get('rows', 0)} | {s['status']} |")
    return "\n".join(lines)


def render(meta, stages, rows, final=False) -> tuple[str, str]:
    """(the whole markdown report, the short summary that ends stdout)."""
    by_kind = lambda kind: [r for r in rows if r["kind"] == kind]  # noqa: E731
    correctness, _ = correctness_line(rows, stages)
    elapsed = time.perf_counter() - meta["started"]
    head = (f"### earkit gpu_check{' --smoke' if meta['smoke'] else ''}, {meta['when']}\n\n"
            f"{meta['machine']}; budget {meta['budget']:.0f} s, {elapsed:.0f} s {'in all' if final else 'so far'}"
            f"{'' if final else ' (still running)'}.\n\n")
    targets = (f"Targets (issue 12) and anchors (DESIGN.md: H200, bf16, V = {V_GPU}, head frozen), fwd+bwd of the "
               f"fused linear + loss ops; result PASS when earkit's figure is at most the limit. Floor: the useful "
               f"matmul flops (hard 4NHV, guided 8NHV) at {H200_BF16_TFLOPS:.0f} TFLOP/s.\n\n"
               f"{targets_table(by_kind('linear_timing'))}\n")
    summary = head + stage_table(stages) + "\n\n" + correctness + "\n\n" + targets
    body = [summary]
    if by_kind("linear_timing"):
        body.append(f"#### (b) Fused linear + loss, fwd+bwd given the head features, bf16, head frozen\n\n"
                    f"Median wall ms between syncs over 3 rotating inputs; threshold = median token loss; TFLOP/s on "
                    f"the useful flops; % of matmul: of a plain bf16 N x H @ H x V matmul timed in the same run; "
                    f"Liger and cut-cross-entropy run hard labels with the thresholded-out tokens as ignore_index "
                    f"(their nearest equivalent; for the guided op a cheaper loss).\n\n"
                    f"{linear_timing_table(by_kind('linear_timing'))}\n")
    if by_kind("timing"):
        body.append(f"#### (b) Loss given the logits, fwd+bwd, bf16\n\nthreshold = median loss; median of "
                    f"{meta['reps']} after {meta['warmup']} warmup; peak extra = max allocated during one fwd+bwd "
                    f"above the inputs; speedup = eager ms / row ms, memory ratio = row MB / eager MB.\n\n"
                    f"{timing_table(by_kind('timing'))}\n")
    if by_kind("profile"):
        body.append(f"#### (e) Where the fused ops spend their time (one profiled fwd+bwd)\n\n"
                    f"{profile_section(rows)}\n")
    if by_kind("sampler"):
        body.append(f"#### (f) Sampler on a tiny Janus (weights at unit gain): CUDA graph vs eager, same seed\n\n"
                    f"{sampler_table(by_kind('sampler'))}\n")
    for letter in "cd":
        size = meta["engine_sizes"].get(letter)
        section = engine_section(rows, size) if size else ""
        if section:
            body.append(f"#### ({letter}) Engine, Janus-Pro-{size} shape, random weights\n\n{section}\n")
    notes = [r for r in rows if r["kind"] in ("note", "warning", "error")]
    if notes:
        body.append("#### Notes, warnings and errors\n\n" + "\n".join(
            f"- [{r['stage']}] {r['kind']}: {r.get('what', '') + ': ' if r.get('what') else ''}{r['message']}"
            for r in notes[:60]) + "\n")
    if by_kind("check"):
        body.append(f"#### (a) Correctness of the loss given the logits against float64\n\n"
                    f"Groups: timed = the calls (b) times; layout = forced row layouts; matrix = dtypes, reductions, "
                    f"in-place, windows (reduction none uses a random upstream gradient).\n\n"
                    f"{check_table(by_kind('check'))}\n")
    if by_kind("linear_check"):
        body.append(f"#### (a) Correctness of the fused linear + loss ops against float64\n\n"
                    f"rel = max error over max |value|.\n\n{linear_check_table(by_kind('linear_check'))}\n")
    return "\n".join(body), summary


# ---------------------------------------------------------------- the parent: stages under the budget


class Report:
    """The markdown report, rewritten whole after each new row: what --out held before, then this run."""

    def __init__(self, path: str | None, meta: dict):
        self.path, self.meta = path, meta
        self.prefix = ""
        if path and os.path.exists(path):
            with open(path) as f:
                self.prefix = f.read()
            if self.prefix and not self.prefix.endswith("\n"):
                self.prefix += "\n"

    def write(self, stages, rows, final=False) -> tuple[str, str]:
        text, summary = render(self.meta, stages, rows, final)
        if self.path:
            temporary = f"{self.path}.partial"
            with open(temporary, "w") as f:
                f.write(self.prefix + ("\n" if self.prefix else "") + text)
            os.replace(temporary, self.path)
        return text, summary


def read_new_rows(path: str, offset: int) -> tuple[list[dict], int]:
    """Complete lines after offset (a line still being written waits for the next read)."""
    if not os.path.exists(path):
        return [], offset
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read()
    end = data.rfind(b"\n") + 1
    rows = []
    for line in data[:end].splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            pass  # a torn line from a killed stage
    return rows, offset + end


def stop_group(process: subprocess.Popen) -> None:
    """End the stage's process group (its compile workers too): TERM, then KILL after 5 s."""
    for sig, wait_s in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def machine_line(device: str) -> str:
    import triton

    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        card = f"{props.name} ({props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB)"
    else:
        card = "CPU (smoke: TRITON_INTERPRET=1, EARKIT_BACKEND=triton)"
    try:
        from earkit import __version__ as earkit_version
    except ImportError:
        earkit_version = "?"
    return (f"{card}; torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}, "
            f"python {sys.version.split()[0]}, earkit {earkit_version}")


def allowance(limits: dict, letters: list, i: int, left: float) -> float:
    """Seconds for stage letters[i]: its cap, less what the later stages need at least."""
    cap, _ = limits[letters[i]]
    return min(cap, left - sum(limits[later][1] for later in letters[i + 1:]))


def parse_caps(text: str | None, limits: dict) -> dict:
    """--caps a=60,b=200: new caps (the minimums stay, capped at the new cap)."""
    limits = dict(limits)
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        letter, _, seconds = item.partition("=")
        if letter not in limits or not seconds:
            raise ValueError(f"--caps: expected LETTER=SECONDS with a letter of {', '.join(limits)}, got {item!r}")
        cap = float(seconds)
        limits[letter] = (cap, min(limits[letter][1], cap))
    return limits


def run_parent(args, plan) -> int:
    letters = [s.strip() for s in args.stages.split(",") if s.strip()]
    available = stage_functions(plan, args)
    unknown = [s for s in letters if s not in "abcdef"]
    if unknown:
        print(f"--stages: unknown {unknown}; choose from a, b, c, d, e, f")
        return 2
    try:
        limits = parse_caps(args.caps, plan["limits"])
    except ValueError as error:
        print(error)
        return 2
    # A stage with nothing to run (no engine size for it) takes no time from the others.
    runnable = [letter for letter in letters if letter in available]
    budget = args.budget or plan["budget"]
    started = time.perf_counter()
    for path in (args.out, args.rows):
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    workdir = tempfile.mkdtemp(prefix="earkit-gpu-check-")
    rows_path = args.rows or (os.path.splitext(args.out)[0] + ".jsonl" if args.out else os.path.join(workdir,
                                                                                                     "rows.jsonl"))
    offset = os.path.getsize(rows_path) if os.path.exists(rows_path) else 0  # a rows file of earlier runs is kept
    meta = {"smoke": args.smoke, "when": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
            "machine": machine_line(plan["device"]), "budget": budget, "started": started,
            "reps": args.reps or plan["reps"], "warmup": args.warmup or plan["warmup"],
            "engine_sizes": dict(zip("cd", engine_sizes(plan, args)))}
    print(f"earkit gpu_check on {meta['machine']}; budget {budget:.0f} s; stages {','.join(letters)}; "
          f"rows to {rows_path}", flush=True)
    report = Report(args.out, meta)
    stages = {letter: {"title": stage_title(letter, plan, args),
                       "status": "waiting" if letter in available else "skipped: --engine-sizes names no size for it"}
              for letter in letters}
    rows: list[dict] = []
    report.write(stages, rows)
    process = None

    def stopped(signum, frame):
        raise SystemExit(128 + signum)  # to the finally below, which stops the running stage

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, stopped)
    try:
        for letter in letters:
            stage = stages[letter]
            if letter not in available:
                continue
            left = budget - (time.perf_counter() - started)
            allowed = allowance(limits, runnable, runnable.index(letter), left)
            stage["allowed_s"] = max(allowed, 0)
            if allowed < limits[letter][1]:
                stage["status"] = f"skipped: {left:.0f} s of the budget left"
                print(f"=== stage {letter} ({stage['title']}) {stage['status']}", flush=True)
                report.write(stages, rows)
                continue
            print(f"\n=== stage {letter}: {stage['title']} (at most {allowed:.0f} s; {left:.0f} s of the budget left)",
                  flush=True)
            stage["status"] = "running"
            command = [sys.executable, "-m", "earkit.bench.gpu_check", "--stage", letter, "--rows", rows_path,
                       "--deadline", f"{time.time() + allowed - 5:.1f}"]
            for flag, value in (("--reps", args.reps), ("--warmup", args.warmup),
                                ("--engine-sizes", args.engine_sizes)):
                if value:
                    command += [flag, str(value)]
            command += ["--smoke"] if args.smoke else []
            command += ["--no-compile"] if args.no_compile else []
            stage_started = time.perf_counter()
            sys.stdout.flush()
            # Its own process group, so a stop also ends what it started (inductor's compile workers);
            # not from the current folder, where a checkout's earkit/ would shadow the installed package.
            process = subprocess.Popen(command, cwd=workdir, start_new_session=True)
            timed_out = False
            while True:
                try:
                    process.wait(timeout=0.5)
                    finished = True
                except subprocess.TimeoutExpired:
                    finished = False
                new, offset = read_new_rows(rows_path, offset)
                if new:
                    rows += new
                    stage["rows"] = stage.get("rows", 0) + len(new)
                    stage["took_s"] = time.perf_counter() - stage_started
                    report.write(stages, rows)
                if finished:
                    break
                if time.perf_counter() - stage_started > allowed:
                    timed_out = True
                    stop_group(process)
            new, offset = read_new_rows(rows_path, offset)
            rows += new
            stage["rows"] = stage.get("rows", 0) + len(new)
            stage["took_s"] = time.perf_counter() - stage_started
            if timed_out:
                stage["status"] = f"TIMED OUT after {allowed:.0f} s (the rows measured so far are kept)"
            elif process.returncode != 0:
                stage["status"] = f"FAILED (exit status {process.returncode}; see the log)"
            elif any(row.get("out_of_time") for row in rows if row["stage"] == letter):
                stage["status"] = f"OUT OF TIME: stopped itself at its {allowed:.0f} s, some cases not run"
            else:
                stage["status"] = "done"
            print(f"=== stage {letter}: {stage['status']} in {stage['took_s']:.0f} s, {stage['rows']} rows", flush=True)
            report.write(stages, rows)
    except (SystemExit, KeyboardInterrupt) as stop:
        interrupted = stop
        for stage in stages.values():
            if stage["status"] in ("running", "waiting"):
                stage["status"] = "STOPPED from outside" if stage["status"] == "running" else "not run: stopped"
    else:
        interrupted = None
    finally:
        if process is not None and process.poll() is None:
            stop_group(process)  # a stage in its own session would outlive us
        new, offset = read_new_rows(rows_path, offset)
        rows += new
        text, summary = report.write(stages, rows, final=True)
        shutil.rmtree(workdir, ignore_errors=True)  # the stages' working folder (and the rows, without --out)
    _, ok = correctness_line(rows, stages)
    print("\n" + text)
    print("\n==================== SUMMARY ====================\n" + summary)
    if args.out:
        print(f"report: {args.out} (rows: {rows_path})")
    print("ALL PASS" if ok else "NOT ALL PASS: see the correctness line above")
    if interrupted is not None:
        return interrupted.code if isinstance(interrupted, SystemExit) else 130
    return 0 if ok else 1


# ---------------------------------------------------------------- main


def watch_parent(deadline_at: float | None) -> None:
    """End this stage if the parent is gone (killed from outside: no one would stop us) or long past
    the deadline the parent would have stopped us at."""
    import threading

    parent = os.getppid()

    def watch():
        while True:
            time.sleep(1)
            if os.getppid() != parent or (deadline_at is not None and time.time() > deadline_at + 30):
                os._exit(124)

    threading.Thread(target=watch, daemon=True).start()


def run_child(args, plan) -> int:
    watch_parent(args.deadline)
    emit = Rows(args.rows, args.stage)
    deadline = Deadline(args.deadline)
    seen = set()
    original_showwarning = warnings.showwarning

    def log_warning(message, category, filename, lineno, file=None, line=None):
        text = f"{category.__name__}: {message}"[:300]
        if text not in seen and len(seen) < 20:  # each warning once, a few per stage
            seen.add(text)
            emit({"kind": "warning", "message": text})
        original_showwarning(message, category, filename, lineno, file, line)

    warnings.showwarning = log_warning
    function = stage_functions(plan, args).get(args.stage)
    if function is None:
        print(f"stage {args.stage}: nothing to run", flush=True)
        return 2
    try:
        function(plan, emit, deadline, args)
    except Exception as error:
        traceback.print_exc()
        emit({"kind": "error", "what": f"stage {args.stage}", "message": short_error(error)})
        return 1
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Correctness, speed and memory of earkit on a GPU, in timed stages.")
    parser.add_argument("--smoke", action="store_true", help="CPU + Triton interpreter, tiny shapes (for CI)")
    parser.add_argument("--out", default=None,
                        help="also write the markdown report here (after what the file holds; rows to FILE.jsonl)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for the whole run (default 420: under 7.5 minutes with the stops; smoke 400)")
    parser.add_argument("--stages", default=STAGE_ORDER,
                        help=f"stages to run, in this order (default {STAGE_ORDER}): a correctness, b timings, "
                             f"e profiler, f sampler graph, c and d the engine at each --engine-sizes")
    parser.add_argument("--caps", default=None,
                        help="other time caps for some stages, in seconds, e.g. b=240,c=200 (defaults: a=110, b=160, "
                             "e=45, f=40, c=120, d=90)")
    parser.add_argument("--reps", type=int, default=None, help="timed repeats (default 20; smoke 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed repeats first (default 5; smoke 1)")
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile rows")
    parser.add_argument("--engine-sizes", default=None,
                        help="Janus-Pro shapes of stages c and d, comma-separated (default 7b,1b; smoke tiny; "
                             "'none' to skip both)")
    parser.add_argument("--rows", default=None,
                        help="the JSON-lines file of rows (default: beside --out, or a temporary one)")
    parser.add_argument("--stage", default=None, help=argparse.SUPPRESS)  # a child: run this one stage
    parser.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.smoke and os.environ.get("TRITON_INTERPRET") != "1":
        print("--smoke needs TRITON_INTERPRET=1 before triton is imported: run it as python -m earkit.bench.gpu_check")
        return 2
    plan = PLANS["smoke" if args.smoke else "gpu"]
    if not args.smoke and not torch.cuda.is_available():
        print("no CUDA device: run on a GPU machine, or use --smoke for the CPU interpreter check")
        return 2
    if args.stage:
        return run_child(args, plan)
    return run_parent(args, plan)


if __name__ == "__main__":
    sys.exit(main())
