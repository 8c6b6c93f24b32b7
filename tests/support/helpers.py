"""Small pieces shared by the op tests: tolerances per dtype, threshold choice, running an op and
comparing it with its float64 oracle's answer, and the checks every op's tests make alike (no rows,
in-place backward, fuzzing). The oracles themselves are earkit.kernels.testing; each test file keeps
its own op's calls and cases. Also what the command tests share: usage_error, folder_files."""

import torch

# Loss values are fp32 whatever the input dtype, and the float64 reference sees the same rounded
# inputs, so they are compared tightly. Gradients are stored in the input dtype: one rounding
# step of it (toward zero under the Triton interpreter, hence a full ulp).
LOSS_TOL = dict(rtol=1e-4, atol=1e-5)
GRAD_TOL = {
    torch.float32: dict(rtol=1e-4, atol=1e-6),
    torch.float16: dict(rtol=2e-3, atol=1e-6),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-6),
}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
REDUCTIONS = ["none", "sum", "mean"]


def threshold_in_gap(values: torch.Tensor, quantile: float) -> float:
    """A threshold near `quantile` of `values` but halfway between two of them, so fp32 rounding
    in a backend can never move a value across it."""
    finite = torch.sort(values[torch.isfinite(values)].double().flatten()).values
    if finite.numel() < 2:
        return float(finite[0] - 1.0) if finite.numel() else 0.0
    index = min(max(int(quantile * (finite.numel() - 1)), 0), finite.numel() - 2)
    return float((finite[index] + finite[index + 1]) / 2)


def far_from(values: torch.Tensor, threshold, margin: float = 1e-4) -> bool:
    if threshold is None:
        return True
    return bool(((values.double() - threshold).abs() > margin).all())


def usage_error(capsys, argv) -> str:
    """Run `earkit ARGV` in-process and return the error it ended with: exit status 2 and exactly
    one line of it, the last on stderr, no traceback (progress bars of model loading may come
    before it)."""
    from earkit.cli import main

    capsys.readouterr()
    assert main(argv) == 2
    stderr = capsys.readouterr().err
    lines = [line for line in stderr.replace("\r", "\n").splitlines() if line.strip()]
    assert "Traceback" not in stderr and lines, stderr
    errors = [line for line in lines if line.startswith("earkit ")]
    assert len(errors) == 1 and errors[0] == lines[-1], lines
    return errors[0]


SHARED_MEMORY_LAYOUTS = ["expanded", "sliding"]


def rows_sharing_memory(layout, shape, generator):
    """(source, make): make(source) is a (..., V) tensor of `shape` whose rows overlap in memory,
    "expanded" (one row, stride 0 along every row dimension, as x.expand gives) or "sliding"
    (row i starts one element after row i - 1). make works on any tensor like source, so
    autograd through it maps a gradient of the rows back to the source."""
    n_classes = shape[-1]
    n_rows = 1
    for size in shape[:-1]:
        n_rows *= size
    if layout == "expanded":
        return 3 * torch.randn(n_classes, generator=generator), lambda source: source.expand(shape)
    row_strides = []
    stride = 1
    for size in reversed(shape[:-1]):
        row_strides.insert(0, stride)
        stride *= size
    source = 3 * torch.randn(n_rows + n_classes - 1, generator=generator)
    return source, lambda source: source.as_strided(shape, tuple(row_strides) + (1,))


def rounding_floors(row_scale, hidden, weight, ulps: float = 16.0):
    """How close a linear + loss op's fp32 gradients can come to float64, from the rounding of the
    probabilities alone: row i of the logits' gradient is a_i (q_i - p_i) (or - onehot), with q and
    p known to about one fp32 ulp of 1 each, so when q ~ p (a student near its target) d hidden,
    d weight and d bias are small sums whose error is set by the size of their terms, not by
    their own size. Returns the floors for (d hidden, d weight, d bias) in their shapes."""
    eps = ulps * torch.finfo(torch.float32).eps
    scale = row_scale.detach().double().abs().reshape(-1)
    rows = hidden.detach().double().abs().reshape(scale.numel(), -1)
    weight = weight.detach().double().abs()
    d_hidden = eps * scale[:, None] * weight.sum(0)[None, :]
    d_weight = eps * (scale @ rows)[None, :].expand(weight.shape[0], -1)
    d_bias = eps * scale.sum().expand(weight.shape[0])
    return [d_hidden.reshape(hidden.shape), d_weight, d_bias]


def empty_cases(last: int) -> list:
    """Inputs with no rows, as (shape, op options) with `last` as the class (or hidden) dimension:
    windowed with and without a gate, no sequences, and unwindowed. Ids: EMPTY_IDS."""
    return [((2, 0, last), dict(window=3, window_threshold=0.5)), ((2, 0, last), dict(window=3)),
            ((0, 4, last), dict(window=3, window_threshold=0.5)), ((0, last), {}), ((2, 0, last), {})]


EMPTY_IDS = ["B0-window", "B0-window-no-gate", "0T-window", "0", "B0"]


# ---------------------------------------------------------------- an op on logits, and what every op's tests choose

def run_logits_op(loss_of, logits, grad_output=None):
    """loss_of(logits) on a fresh leaf, then backward with grad_output (ones by default): (loss, d logits)."""
    leaf = logits.detach().clone().requires_grad_()
    loss = loss_of(leaf)
    loss.backward(torch.ones_like(loss) if grad_output is None else grad_output)
    return loss.detach(), leaf.grad


def assert_logits_op_close(got, want, dtype):
    """run_logits_op's (loss, grad) against an oracle's (loss, grad, ...): an fp32 loss, a gradient in `dtype`."""
    loss, grad = got
    want_loss, want_grad = want[:2]
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), want_loss, **LOSS_TOL)
    assert grad.dtype == dtype
    torch.testing.assert_close(grad.double(), want_grad, **GRAD_TOL[dtype])


def upstream_gradient(reduction, shape, seed):
    """For reduction "none", a seeded random gradient of the loss's `shape` to backpropagate; None
    (ones) for a reduced loss."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) if reduction == "none" else None


def gates_in_gaps(expected_of, counted=None) -> dict:
    """A token threshold and a window gate (window 3) that each drop some tokens or windows but not
    all: the 0.3 quantile of the token losses (those `counted`, default all) and the 0.4 quantile of
    the window sums, halfway between two of them. expected_of(**options) is the oracle on the case."""
    _, _, token_loss, _ = expected_of()
    threshold = threshold_in_gap(token_loss if counted is None else token_loss[counted], 0.3)
    _, _, _, window_sums = expected_of(threshold=threshold, window=3, window_threshold=1e9)
    return dict(threshold=threshold, window=3, window_threshold=threshold_in_gap(window_sums, 0.4))


def assert_gates_matter(want, options, n_ignored=0):
    """The oracle's answer `want` under `options` has some tokens (of those not ignored) and some
    windows dropped by the gates, not all."""
    _, _, token_loss, window_sums = want
    assert 0 < (token_loss <= options["threshold"]).sum() < token_loss.numel() - n_ignored
    assert 0 < (window_sums <= options["window_threshold"]).sum() < window_sums.numel()


# ---------------------------------------------------------------- a linear + loss op (hidden @ weight.T + bias)

# A linear op's gradients are sums over V (d hidden) or N (d weight) of rounded terms, so an entry
# near zero carries the rounding of much larger terms: compare against the largest entry.
HEAD_GRAD_SCALE_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def with_rounding_floors(want, hidden, weight):
    """A linear op's float64 oracle answer as (loss, [(gradient, rounding floor) of hidden, weight
    and bias], token losses, window sums)."""
    floors = rounding_floors(want.row_scale, hidden, weight)[:len(want.grads)]
    return want.loss, list(zip(want.grads, floors)), want.token_loss, want.window_sums


def run_head_op(loss_of, hidden, weight, bias=None, grad_output=None, train_head=True):
    """loss_of(hidden, weight, bias) on fresh leaves (the head trained or frozen), then backward with
    grad_output (ones by default): (loss, [d hidden, d weight] + [d bias] when there is a bias)."""
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_(train_head)
    b = bias.detach().clone().requires_grad_(train_head) if bias is not None else None
    loss = loss_of(h, w, b)
    loss.backward(torch.ones_like(loss) if grad_output is None else grad_output)
    return loss.detach(), [h.grad, w.grad] + ([b.grad] if b is not None else [])


def assert_head_grad_close(got, want_and_floor, dtype):
    want, floor = want_and_floor
    assert got is not None and got.dtype == dtype
    tol = max(HEAD_GRAD_SCALE_TOL[dtype] * float(want.abs().max()), float(floor.max()))
    torch.testing.assert_close(got.double(), want, rtol=GRAD_TOL[dtype]["rtol"], atol=tol)


def assert_head_op_close(got, want, dtype, train_head=True):
    """run_head_op's (loss, grads) against with_rounding_floors' answer: an fp32 loss, gradients in
    the input dtype, none for a frozen head."""
    loss, grads = got
    want_loss, want_grads = want[:2]
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), want_loss, **LOSS_TOL)
    assert_head_grad_close(grads[0], want_grads[0], dtype)
    if train_head:
        for got_grad, want_grad in zip(grads[1:], want_grads[1:]):
            assert_head_grad_close(got_grad, want_grad, dtype)
    else:
        assert all(g is None for g in grads[1:])


def head_without_rows(shape, n_classes=37):
    """Leaves for a linear op over no rows: hidden of `shape` (..., H) and a head of n_classes."""
    return (torch.randn(shape, requires_grad=True), torch.randn(n_classes, shape[-1], requires_grad=True),
            torch.randn(n_classes, requires_grad=True))


def assert_compiled_module_matches(module, hidden, *rest):
    """torch.compile(module, fullgraph=True) gives the eager module's loss and gradients (of hidden,
    the module's weight and bias) on module(hidden, *rest)."""

    def loss_and_grads(fn):
        module.zero_grad()
        h = hidden.clone().requires_grad_()
        loss = fn(h, *rest)
        loss.backward()
        return loss.detach(), [h.grad, module.weight.grad, module.bias.grad]

    want_loss, want_grads = loss_and_grads(module)
    loss, grads = loss_and_grads(torch.compile(module, fullgraph=True))
    torch.testing.assert_close(loss, want_loss)
    for got, want in zip(grads, want_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- shared by the four ops' tests

def assert_zero_loss_without_rows(loss, reduction, leaf, *head):
    """The loss of inputs without rows: fp32 zeros ("none": of the rows' shape); backward gives
    `leaf` a gradient of its shape and each of `head` an all-zero one."""
    shape = leaf.shape
    assert loss.dtype == torch.float32
    assert loss.shape == (shape[:-1] if reduction == "none" else ())
    assert not loss.any()
    loss.sum().backward()
    assert leaf.grad.shape == shape
    for parameter in head:
        assert parameter.grad.shape == parameter.shape and not parameter.grad.any()


def check_inplace_backward_reuses_the_buffer(loss_of, first):
    """loss_of(buffer, inplace_backward=True) writes its gradient into `buffer` (a non-leaf copy of
    `first`, as a model's head output would be), and it is the gradient of loss_of(first) to the bit."""
    _, want_grad = run_logits_op(loss_of, first)
    source = first.detach().clone().requires_grad_()
    buffer = source * 1
    seen = []
    buffer.register_hook(lambda grad: seen.append(grad))
    loss_of(buffer, inplace_backward=True).backward()
    assert seen[0].data_ptr() == buffer.data_ptr()
    torch.testing.assert_close(source.grad, want_grad, rtol=0, atol=0)


def check_inplace_backward_on_rows_sharing_memory(loss_of, expected_of, source, make, windowed):
    """loss_of(logits, inplace_backward=..., **options) on rows sharing memory (rows_sharing_memory's
    `make(source)`) against the float64 oracle expected_of(logits, **options) -> (loss, grad, ...):
    through a view of a leaf and on a leaf that is itself the view, the gradient is the oracle's
    and the one without inplace_backward. Windowed: a window gate that drops some windows."""
    options = {}
    if windowed:
        _, _, _, window_sums = expected_of(make(source), window=3, window_threshold=1e9)
        options = dict(window=3, window_threshold=threshold_in_gap(window_sums, 0.4))
    want_loss, want_grad, _, _ = expected_of(make(source), **options)
    source64 = source.double().requires_grad_()
    (want_source_grad,) = torch.autograd.grad(make(source64), source64, want_grad)
    # A view of a leaf (the gradient flows back through expand / as_strided) ...
    leaf = source.clone().requires_grad_()
    loss = loss_of(make(leaf), inplace_backward=True, **options)
    loss.backward()
    torch.testing.assert_close(loss.double(), want_loss, **LOSS_TOL)
    torch.testing.assert_close(leaf.grad.double(), want_source_grad, **GRAD_TOL[torch.float32])
    # ... and a leaf that is itself the overlapping view.
    rows = make(source.clone()).requires_grad_()
    loss_of(rows, inplace_backward=True, **options).backward()
    torch.testing.assert_close(rows.grad.double(), want_grad, **GRAD_TOL[torch.float32])
    plain = make(source.clone()).requires_grad_()  # the same layout without inplace_backward
    loss_of(plain, **options).backward()
    torch.testing.assert_close(rows.grad, plain.grad, rtol=0, atol=0)


def fuzz(max_examples, **strategies):
    """Hypothesis over `data`, `backend_name` (every backend), `batch` (1-3), `reduction` and the
    op's own `strategies`, `max_examples` of them, without deadline."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    def decorate(test):
        return settings(max_examples=max_examples, deadline=None, suppress_health_check=[HealthCheck.too_slow])(
            given(data=st.data(), backend_name=st.sampled_from(["reference", "native", "triton"]),
                  batch=st.integers(1, 3), reduction=st.sampled_from(REDUCTIONS), **strategies)(test))

    return decorate


def draw_gates(data, seq_len, low, threshold_high, window_threshold_high) -> dict:
    """A fuzzed window (or none) up to seq_len + 2, a token threshold in [low, threshold_high] (or
    none) and, with a window, a window threshold in [low, window_threshold_high] (or none)."""
    from hypothesis import strategies as st

    window = data.draw(st.none() | st.integers(1, seq_len + 2))
    threshold = data.draw(st.none() | st.floats(low, threshold_high))
    window_threshold = data.draw(st.none() | st.floats(low, window_threshold_high)) if window else None
    return dict(threshold=threshold, window=window, window_threshold=window_threshold)


def assume_clear_of_gates(want, options) -> None:
    """Skip a fuzzed case whose token losses or window sums (want[2:4] of an oracle answer) lie
    within rounding of their threshold."""
    from hypothesis import assume

    _, _, token_loss, window_sums = want
    assume(far_from(token_loss, options["threshold"]) and far_from(window_sums, options["window_threshold"]))


def folder_files(folder) -> dict:
    """{path relative to folder: bytes} of every file under it: what a test compares folders by."""
    from pathlib import Path

    folder = Path(folder)
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in sorted(folder.rglob("*"))
            if path.is_file()}


KILLED_RUN = """
import json, os, signal, sys
from earkit.engine.trainer import EraseConfig, erase
def die_after_second_step(step, stats):
    if step == 1:  # the checkpoint of step 2 is on disk; the run would go on
        os.kill(os.getpid(), signal.SIGKILL)
erase(EraseConfig(**json.loads(sys.argv[1])), progress=False, on_step=die_after_second_step)
"""


def erase_killed_after_two_steps(cwd, **config) -> None:
    """Run erase(EraseConfig(**config)) in a child process that SIGKILLs itself once the checkpoint
    of step 2 is on disk (save_every=1), and check that it died so. cwd: away from the repository
    root, whose earkit/ folder would shadow the installed package."""
    import json
    import signal
    import subprocess
    import sys

    config = {key: list(value) if isinstance(value, tuple) else value for key, value in config.items()}
    process = subprocess.run([sys.executable, "-c", KILLED_RUN, json.dumps(config)], capture_output=True, text=True,
                             timeout=300, cwd=cwd)
    assert process.returncode == -signal.SIGKILL, process.stderr[-2000:]
