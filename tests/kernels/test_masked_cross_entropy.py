"""masked_cross_entropy on every backend against the float64 oracle of earkit.kernels.testing (written from DESIGN.md)."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import strategies as st

from earkit.kernels import masked_cross_entropy
from earkit.kernels import testing as oracle
from helpers import (DTYPES, EMPTY_IDS, GRAD_TOL, LOSS_TOL, REDUCTIONS, SHARED_MEMORY_LAYOUTS, assert_gates_matter,
                     assert_logits_op_close, assert_zero_loss_without_rows, assume_clear_of_gates,
                     check_inplace_backward_on_rows_sharing_memory, check_inplace_backward_reuses_the_buffer,
                     draw_gates, empty_cases, fuzz, gates_in_gaps, rows_sharing_memory, run_logits_op,
                     upstream_gradient)


def expected_masked(logits, target, **options):
    """Loss, d loss / d logits, token losses and window sums from the float64 oracle."""
    want = oracle.masked_cross_entropy(logits, target, **options)
    return want.loss, want.grads[0], want.token_loss, want.window_sums


def run_op(logits, target, grad_output=None, **kwargs):
    return run_logits_op(lambda leaf: masked_cross_entropy(leaf, target, **kwargs), logits, grad_output)


def check(logits, target, grad_output=None, **kwargs):
    assert_logits_op_close(run_op(logits, target, grad_output, **kwargs),
                           expected_masked(logits, target, grad_output=grad_output, **kwargs), logits.dtype)


def windowed_case(dtype, seed=0, batch=2, seq_len=11, n_classes=37):
    """Random logits, some ignored rows, and thresholds that mask some tokens and some windows."""
    generator = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(batch, seq_len, n_classes, generator=generator)).to(dtype)
    target = torch.randint(0, n_classes, (batch, seq_len), generator=generator)
    target[0, 2] = -100
    target[1, 5] = -100
    return logits, target, gates_in_gaps(lambda **options: expected_masked(logits, target, **options),
                                         counted=target.reshape(-1) != -100)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference_with_threshold_and_windows(backend, dtype, reduction):
    # T = 11 is not a multiple of W = 3, V = 37 is not a power of two, two rows are ignored.
    logits, target, options = windowed_case(dtype)
    check(logits, target, upstream_gradient(reduction, target.shape, 5), reduction=reduction, **options)
    # The thresholds were chosen to matter: some tokens and some windows are dropped, not all.
    assert_gates_matter(expected_masked(logits, target, **options), options, n_ignored=2)


def test_triton_layouts(triton_layout, monkeypatch):
    monkeypatch.setenv("EARKIT_BACKEND", "triton")
    for dtype in (torch.float32, torch.bfloat16):
        logits, target, options = windowed_case(dtype, seed=3, n_classes=53)
        check(logits, target, reduction="mean", **options)
        check(logits, target, torch.randn(target.shape), reduction="none", threshold=options["threshold"])


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_without_threshold_is_torch_cross_entropy(backend, reduction):
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(13, 29, generator=generator)
    target = torch.randint(0, 29, (13,), generator=generator)
    target[[2, 7]] = 4  # a class-valued ignore_index
    loss, grad = run_op(logits, target, ignore_index=4, reduction=reduction)
    leaf = logits.clone().requires_grad_()
    want = F.cross_entropy(leaf, target, ignore_index=4, reduction=reduction)
    want.backward(torch.ones_like(want))
    torch.testing.assert_close(loss, want.detach(), **LOSS_TOL)
    torch.testing.assert_close(grad, leaf.grad, **GRAD_TOL[torch.float32])


def test_single_row(backend):
    logits = torch.tensor([[0.5, -1.0, 2.0, 0.0, 3.5]])
    check(logits, torch.tensor([2]), reduction="mean", threshold=0.1)
    check(logits, torch.tensor([2]), torch.tensor([-2.0]), reduction="none")
    check(logits[None], torch.tensor([[3]]), reduction="sum", window=4, window_threshold=0.5)


def test_nothing_masked_everything_masked_and_all_ignored(backend):
    logits, target, options = windowed_case(torch.float32, seed=7)
    # Thresholds below every loss keep all tokens and windows.
    check(logits, target, reduction="mean", threshold=-1.0, window=3, window_threshold=-1.0)
    # Above every loss: the mean has nothing to average and is 0, the gradient is exactly 0.
    loss, grad = run_op(logits, target, reduction="mean", threshold=1e6)
    assert loss.item() == 0.0 and not grad.any()
    loss, grad = run_op(logits, target, reduction="mean", window=4, window_threshold=1e6)
    assert loss.item() == 0.0 and not grad.any()
    ignored = torch.full_like(target, -100)
    loss, grad = run_op(logits, ignored, reduction="mean")
    assert loss.item() == 0.0 and not grad.any()
    loss, _ = run_op(logits, ignored, reduction="none")
    assert not loss.any()


# Shapes with no rows: a windowed (B, 0, V) and (0, T, V), and unwindowed (0, V) and (B, 0, V).


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape, options", empty_cases(37), ids=EMPTY_IDS)
def test_no_rows_give_a_zero_loss_and_an_empty_gradient(backend, shape, options, reduction):
    # Nothing to average: "mean" and "sum" are 0, "none" is an empty loss of the target's shape.
    logits = torch.randn(shape, requires_grad=True)
    target = torch.zeros(shape[:-1], dtype=torch.long)
    loss = masked_cross_entropy(logits, target, threshold=0.1, reduction=reduction, **options)
    assert_zero_loss_without_rows(loss, reduction, logits)


@pytest.mark.parametrize("target_probability", [0.9, 0.99, 0.999, 0.9999])
def test_bf16_gradient_of_confident_target(backend, target_probability):
    # softmax(z)[y] -> 1 makes d z_y = p_y - 1 a cancellation; rounding p_y to bf16 before the
    # subtraction (the Liger-Kernel bug) loses it entirely. In fp32 math only the final store rounds.
    n_classes = 512
    generator = torch.Generator().manual_seed(11)
    logits = 0.1 * torch.randn(4, n_classes, generator=generator)
    target = torch.tensor([3, 100, 257, 511])
    others = torch.logsumexp(logits.masked_fill(F.one_hot(target, n_classes).bool(), -math.inf), dim=-1)
    logits[torch.arange(4), target] = others + math.log(target_probability / (1 - target_probability))
    logits = logits.bfloat16()
    _, grad = run_op(logits, target, reduction="sum")
    _, want_grad, _, _ = expected_masked(logits, target, reduction="sum")
    rows = torch.arange(4)
    relative_error = ((grad[rows, target].double() - want_grad[rows, target]) / want_grad[rows, target]).abs()
    assert relative_error.max() < 1e-2, relative_error


def test_inplace_backward_reuses_the_logits_buffer(backend):
    logits, target, options = windowed_case(torch.bfloat16, seed=2)
    check_inplace_backward_reuses_the_buffer(
        lambda z, **inplace: masked_cross_entropy(z, target, reduction="mean", **inplace, **options), logits)


@pytest.mark.parametrize("windowed", [False, True], ids=["rows", "windows"])
@pytest.mark.parametrize("layout", SHARED_MEMORY_LAYOUTS)
def test_inplace_backward_on_rows_sharing_memory(backend, layout, windowed):
    # Rows that overlap in memory (an expanded input, stride 0) cannot hold one gradient each:
    # written in place, every row's gradient landed on the same elements. The op must fall back
    # to a fresh buffer and give the gradient it gives without inplace_backward.
    generator = torch.Generator().manual_seed(13)
    shape = (2, 6, 37) if windowed else (9, 37)
    source, make = rows_sharing_memory(layout, shape, generator)
    target = torch.randint(0, 37, shape[:-1], generator=generator)
    check_inplace_backward_on_rows_sharing_memory(
        lambda logits, **options: masked_cross_entropy(logits, target, **options),
        lambda logits, **options: expected_masked(logits, target, **options), source, make, windowed)


def test_nan_logits_propagate_through_the_threshold(backend):
    logits, target, options = windowed_case(torch.float32, seed=4)
    logits[1, 4, 0] = math.nan
    loss, grad = run_op(logits, target, reduction="mean", **options)
    assert math.isnan(loss.item())
    assert grad[1, 4].isnan().all()
    loss, _ = run_op(logits, target, reduction="none", **options)
    assert loss[1, 4].isnan() and not loss[0].isnan().any()


def check_large_logits(dtype, scale):
    generator = torch.Generator().manual_seed(16)
    unit = scale / 1e3  # spreads above the fp16 grid at this size
    base = scale * (1 + torch.rand(16, 1, generator=generator)) + torch.linspace(0, 30 * unit, 127)
    logits = base + 2 * unit * torch.randn(16, 127, generator=generator)
    logits = ((logits * 64).round() / 64).to(dtype)  # exactly what the float64 oracle sees
    target = torch.randint(0, 127, (16,), generator=generator)
    target[:8] = logits[:8].float().argmax(-1)  # confident tokens: losses near 0
    want_loss, _, token_loss, _ = expected_masked(logits, target, reduction="none")
    assert token_loss.min() < 0.2
    loss = masked_cross_entropy(logits, target, reduction="none")
    torch.testing.assert_close(loss.double(), want_loss, **LOSS_TOL)


@pytest.mark.parametrize("scale", [1e3, 1e4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_large_logits_do_not_cancel(backend, dtype, scale):
    # l = lse - z_y subtracts two numbers of the logits' size, and lse is rounded to ~1e-3 at
    # 1e4: a confident token's loss of 1e-6 came out 0 or 1e-3. As (max - z_y) + log sum
    # exp(z - max) both terms are small and the loss is as exact as its inputs.
    check_large_logits(dtype, scale)


def test_large_logits_triton_layouts(triton_layout, monkeypatch):
    monkeypatch.setenv("EARKIT_BACKEND", "triton")
    check_large_logits(torch.float32, 1e4)


def test_infinite_logits_follow_logsumexp(backend):
    # l = logsumexp(z) - z_y with torch.logsumexp's convention (any +inf gives +inf): a +inf on
    # another class gives l = +inf (softmax puts no mass on y), one on y itself inf - inf = NaN.
    # Triton's running logsumexp shifted by the +inf max and made every such row NaN.
    logits = 3 * torch.randn(4, 37, generator=torch.Generator().manual_seed(15))
    target = torch.tensor([1, 2, 3, 4])
    logits[0, 5] = math.inf
    logits[1, 2] = math.inf
    logits[2, 0] = -math.inf  # a class with no mass: finite
    leaf = logits.clone().requires_grad_()
    loss = masked_cross_entropy(leaf, target, reduction="none")
    loss.backward(torch.ones_like(loss))
    assert loss[0].item() == math.inf and math.isnan(loss[1].item())
    want_loss, want_grad, _, _ = expected_masked(logits[2:], target[2:], reduction="none",
                                                 grad_output=torch.ones(2))
    torch.testing.assert_close(loss[2:].double(), want_loss, **LOSS_TOL)
    torch.testing.assert_close(leaf.grad[2:].double(), want_grad, **GRAD_TOL[torch.float32])
    # softmax(z) - onehot(y) with softmax 0 on the finite classes, NaN on the +inf one.
    want_row = -torch.nn.functional.one_hot(target[0], 37).float()
    want_row[5] = math.nan
    torch.testing.assert_close(leaf.grad[0], want_row, equal_nan=True)
    assert torch.equal(leaf.grad[1].isnan(), torch.arange(37) == 2)


def test_infinite_logits_triton_layouts(triton_layout, monkeypatch):
    monkeypatch.setenv("EARKIT_BACKEND", "triton")
    test_infinite_logits_follow_logsumexp("triton")


@pytest.mark.parametrize(
    "make_args, name",
    [
        (lambda z, y: (z.long(), y, {}), "logits"),
        (lambda z, y: (z.double(), y, {}), "logits"),
        (lambda z, y: (z, y[:, :-1], {}), "target"),
        (lambda z, y: (z, y.float(), {}), "target"),
        (lambda z, y: (z, y.to("meta"), {}), "target"),
        (lambda z, y: (z, torch.where(y == 1, 37, y), {}), "target"),
        (lambda z, y: (z, torch.where(y == 1, -5, y), {}), "target"),
        (lambda z, y: (z, y, {"window": 0}), "window"),
        (lambda z, y: (z, y, {"window": 2.5}), "window"),
        (lambda z, y: (z.view(-1, 37), y.view(-1), {"window": 3}), "logits"),
        (lambda z, y: (z, y, {"window_threshold": 1.0}), "window_threshold"),
        (lambda z, y: (z, y, {"threshold": math.nan}), "threshold"),
        (lambda z, y: (z, y, {"threshold": math.inf}), "threshold"),
        (lambda z, y: (z, y, {"window": 3, "window_threshold": -math.inf}), "window_threshold"),
        (lambda z, y: (z, y, {"reduction": "avg"}), "reduction"),
        (lambda z, y: (z, y, {"ignore_index": "none"}), "ignore_index"),
        (lambda z, y: (z, y, {"ignore_index": True}), "ignore_index"),
        (lambda z, y: (z, y, {"ignore_index": -100.0}), "ignore_index"),
        (lambda z, y: (z, y, {"ignore_index": 2**70}), "ignore_index"),  # beyond int64: not an OverflowError
        (lambda z, y: (z, y, {"ignore_index": -(2**63) - 1}), "ignore_index"),
    ],
)
def test_bad_input_names_the_argument(backend, make_args, name):
    logits, target, _ = windowed_case(torch.float32)
    target = target.clamp_min(0)
    logits_arg, target_arg, kwargs = make_args(logits, target)
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        masked_cross_entropy(logits_arg, target_arg, **kwargs)


@fuzz(40, seq_len=st.integers(1, 9), n_classes=st.integers(1, 40))
def test_fuzz_shapes_and_thresholds(data, backend_name, batch, seq_len, n_classes, reduction):
    seed = data.draw(st.integers(0, 2**16))
    generator = torch.Generator().manual_seed(seed)
    logits = 2 * torch.randn(batch, seq_len, n_classes, generator=generator)
    target = torch.randint(0, n_classes, (batch, seq_len), generator=generator)
    target[torch.rand(batch, seq_len, generator=generator) < 0.15] = -100
    options = dict(draw_gates(data, seq_len, -0.5, 4.0, 10.0), reduction=reduction)
    assume_clear_of_gates(expected_masked(logits, target, **options), options)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EARKIT_BACKEND", backend_name)
        check(logits, target, torch.randn(target.shape, generator=generator) if reduction == "none" else None,
              **options)


@pytest.mark.parametrize("splits", [None, 3])
def test_triton_rows_give_nan_for_a_target_out_of_range(monkeypatch, splits):
    """On CUDA the ops do not read target values back to the host (a sync per call): the Triton
    kernels give a bad row a NaN loss instead of reading out of bounds (CPU targets get the
    ValueError, EARKIT_CHECK_TARGETS=1 turns it on for CUDA)."""
    from earkit.kernels import triton_cross_entropy

    if splits:
        monkeypatch.setattr(triton_cross_entropy, "force_splits", splits)
        monkeypatch.setattr(triton_cross_entropy, "force_block_v", 8)
    logits = torch.randn(5, 37, generator=torch.Generator().manual_seed(3))
    target = torch.tensor([3, 37, -100, -5, 36])
    grad = torch.empty_like(logits)
    loss, keep, lse = triton_cross_entropy.hard_rows(logits, target, -100, None, grad=grad)
    assert torch.isnan(loss[[1, 3]]).all() and loss[2] == 0 and torch.isfinite(loss[[0, 4]]).all()
    torch.testing.assert_close(loss[[0, 4]], F.cross_entropy(logits[[0, 4]], target[[0, 4]], reduction="none"))
    assert keep[2] == 0 and (grad[2] == 0).all()  # an ignored row has no gradient
    torch.testing.assert_close(grad[0], torch.softmax(logits[0], -1) - F.one_hot(target[0], 37).float())
