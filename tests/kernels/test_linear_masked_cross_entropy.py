"""linear_masked_cross_entropy on every backend against the float64 oracle of earkit.kernels.testing (written from DESIGN.md):
the head's logits hidden @ weight.T + bias, then the thresholded, windowed hard-label loss."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import strategies as st

from earkit.kernels import LinearMaskedCrossEntropyLoss, linear_masked_cross_entropy
from earkit.kernels import linear_cross_entropy, triton_linear_cross_entropy
from earkit.kernels import testing as oracle
from helpers import (DTYPES, EMPTY_IDS, LOSS_TOL, REDUCTIONS, assert_compiled_module_matches, assert_gates_matter,
                     assert_head_op_close, assert_zero_loss_without_rows, assume_clear_of_gates, draw_gates,
                     empty_cases, fuzz, gates_in_gaps, head_without_rows, run_head_op, upstream_gradient,
                     with_rounding_floors)


def expected(hidden, weight, target, bias=None, **options):
    """Loss, (gradient, rounding floor) of hidden, weight and bias, token losses and window sums (float64 oracle)."""
    return with_rounding_floors(oracle.linear_masked_cross_entropy(hidden, weight, target, bias, **options), hidden,
                                weight)


def run_op(hidden, weight, target, bias=None, grad_output=None, train_head=True, **kwargs):
    return run_head_op(lambda h, w, b: linear_masked_cross_entropy(h, w, target, b, **kwargs), hidden, weight, bias,
                       grad_output, train_head)


def check(hidden, weight, target, bias=None, grad_output=None, train_head=True, **kwargs):
    assert_head_op_close(run_op(hidden, weight, target, bias, grad_output, train_head, **kwargs),
                         expected(hidden, weight, target, bias, grad_output=grad_output, **kwargs), hidden.dtype,
                         train_head)


def head_case(dtype, seed=0, batch=2, seq_len=7, n_inner=12, n_classes=37):
    """Random hidden states and head, some ignored rows, thresholds that drop some tokens and windows."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, seq_len, n_inner, generator=generator).to(dtype)
    weight = (torch.randn(n_classes, n_inner, generator=generator) / math.sqrt(n_inner) * 3).to(dtype)
    bias = torch.randn(n_classes, generator=generator).to(dtype)
    target = torch.randint(0, n_classes, (batch, seq_len), generator=generator)
    target[0, 2] = -100
    target[1, 5] = -100
    return (hidden, weight, target, bias), gates_in_gaps(
        lambda **options: expected(hidden, weight, target, bias, **options), counted=target.reshape(-1) != -100)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference_with_threshold_and_windows(backend, small_chunks, dtype, reduction):
    # T = 7 is not a multiple of W = 3, V = 37 and H = 12 are not powers of two; "none" takes
    # the backward's recompute path for d weight and d bias.
    tensors, options = head_case(dtype)
    check(*tensors, upstream_gradient(reduction, tensors[2].shape, 5), reduction=reduction, **options)
    assert_gates_matter(expected(*tensors, **options), options, n_ignored=2)


@pytest.mark.parametrize("engine", ["cublas", "triton"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_logits_engines(monkeypatch, small_chunks, engine, dtype, reduction):
    """Both ways the Triton backend makes the logits (EARKIT_LINEAR_LOGITS): a cuBLAS GEMM into
    fp32 plus the bias, or the Triton kernel. On CPU tensors cuBLAS's mixed-precision GEMM is an
    fp32 matmul of the same values."""
    monkeypatch.setenv("EARKIT_BACKEND", "triton")
    monkeypatch.setenv("EARKIT_LINEAR_LOGITS", engine)
    tensors, options = head_case(dtype, seed=4)
    check(*tensors, upstream_gradient(reduction, tensors[0].shape[:-1], 8), reduction=reduction, **options)


def test_an_unknown_logits_engine_is_named(monkeypatch):
    monkeypatch.setenv("EARKIT_BACKEND", "triton")
    monkeypatch.setenv("EARKIT_LINEAR_LOGITS", "cutlass")
    (hidden, weight, target, bias), options = head_case(torch.float32)
    with pytest.raises(ValueError, match="EARKIT_LINEAR_LOGITS"):
        linear_masked_cross_entropy(hidden, weight, target, bias, **options)


def test_triton_tiles_and_layouts(triton_layout, small_chunks, monkeypatch):
    # 8 x 8 x 4 tiles: ragged row and column tiles and a K loop of three steps at H = 12.
    monkeypatch.setenv("EARKIT_BACKEND", "triton")
    monkeypatch.setattr(triton_linear_cross_entropy, "force_blocks", (8, 8, 4))
    for dtype in (torch.float32, torch.bfloat16):
        tensors, options = head_case(dtype, seed=3)
        check(*tensors, reduction="mean", **options)
        check(*tensors, torch.randn(tensors[2].shape), reduction="none", threshold=options["threshold"])


def test_frozen_head_gets_no_gradient_and_bias_is_optional(backend):
    (hidden, weight, target, bias), options = head_case(torch.float32, seed=1)
    check(hidden, weight, target, bias, train_head=False, reduction="mean", **options)
    check(hidden, weight, target, None, reduction="sum", **options)
    check(hidden, weight, target, None, torch.randn(target.shape), reduction="none")


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_without_threshold_is_linear_then_cross_entropy(backend, reduction):
    generator = torch.Generator().manual_seed(2)
    hidden = torch.randn(13, 6, generator=generator)
    target = torch.randint(0, 29, (13,), generator=generator)
    target[[2, 7]] = 4
    ours = LinearMaskedCrossEntropyLoss(6, 29, ignore_index=4, reduction=reduction)
    theirs = torch.nn.Linear(6, 29)
    theirs.load_state_dict(ours.state_dict())
    h1, h2 = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
    loss = ours(h1, target)
    want = F.cross_entropy(theirs(h2), target, ignore_index=4, reduction=reduction)
    loss.backward(torch.ones_like(loss))
    want.backward(torch.ones_like(want))
    torch.testing.assert_close(loss, want, **LOSS_TOL)
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ours.bias.grad, theirs.bias.grad, rtol=1e-4, atol=1e-6)
    assert "out_features=29" in repr(ours)


def test_everything_masked_and_all_ignored(backend):
    (hidden, weight, target, bias), _ = head_case(torch.float32, seed=7)
    loss, grads = run_op(hidden, weight, target, bias, reduction="mean", threshold=1e6)
    assert loss.item() == 0.0 and not any(g.any() for g in grads)
    loss, grads = run_op(hidden, weight, torch.full_like(target, -100), bias, reduction="mean")
    assert loss.item() == 0.0 and not any(g.any() for g in grads)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape, options", empty_cases(12), ids=EMPTY_IDS)
def test_no_rows_give_a_zero_loss_and_zero_gradients(backend, shape, options, reduction):
    hidden, weight, bias = head_without_rows(shape)
    target = torch.zeros(shape[:-1], dtype=torch.long)
    loss = linear_masked_cross_entropy(hidden, weight, target, bias, threshold=0.1, reduction=reduction, **options)
    assert_zero_loss_without_rows(loss, reduction, hidden, weight, bias)


def test_no_grad_needs_no_gradient_work(backend):
    (hidden, weight, target, bias), options = head_case(torch.float32, seed=8)
    with torch.no_grad():
        loss = linear_masked_cross_entropy(hidden.requires_grad_(), weight, target, bias, **options)
    want, _, _, _ = expected(hidden, weight, target, bias, **options)
    torch.testing.assert_close(loss.double(), want, **LOSS_TOL)


def test_nan_hidden_propagates_through_the_threshold(backend):
    (hidden, weight, target, bias), options = head_case(torch.float32, seed=4)
    hidden[1, 4, 0] = math.nan
    target[1, 4] = 3
    loss, grads = run_op(hidden, weight, target, bias, reduction="mean", **options)
    assert math.isnan(loss.item())
    assert grads[0][1, 4].isnan().all()
    loss, _ = run_op(hidden, weight, target, bias, reduction="none", **options)
    assert loss[1, 4].isnan() and not loss[0].isnan().any()


@pytest.mark.parametrize(
    "make_args, name",
    [
        (lambda h, w, y, b: ((h.long(), w, y, b), {}), "hidden"),
        (lambda h, w, y, b: ((h.double(), w, y, b), {}), "hidden"),
        (lambda h, w, y, b: ((h, w[:, :-1], y, b), {}), "weight"),
        (lambda h, w, y, b: ((h, w[None], y, b), {}), "weight"),
        (lambda h, w, y, b: ((h, w.half(), y, b), {}), "weight"),
        (lambda h, w, y, b: ((h, w.to("meta"), y, b), {}), "weight"),
        (lambda h, w, y, b: ((h, w, y, b[:-1]), {}), "bias"),
        (lambda h, w, y, b: ((h, w, y, b.half()), {}), "bias"),
        (lambda h, w, y, b: ((h, w, y[:, :-1], b), {}), "target"),
        (lambda h, w, y, b: ((h, w, y.float(), b), {}), "target"),
        (lambda h, w, y, b: ((h, w, y.flatten().index_fill(0, torch.tensor([3]), 37).view(y.shape), b), {}), "target"),
        (lambda h, w, y, b: ((h, w, y.flatten().index_fill(0, torch.tensor([3]), -5).view(y.shape), b), {}), "target"),
        (lambda h, w, y, b: ((h, w, y, b), {"window": 0}), "window"),
        (lambda h, w, y, b: ((h.flatten(0, 1), w, y.flatten(), b), {"window": 3}), "hidden"),
        (lambda h, w, y, b: ((h, w, y, b), {"threshold": math.nan}), "threshold"),
        (lambda h, w, y, b: ((h, w, y, b), {"window": 3, "window_threshold": math.inf}), "window_threshold"),
        (lambda h, w, y, b: ((h, w, y, b), {"reduction": "avg"}), "reduction"),
        (lambda h, w, y, b: ((h, w, y, b), {"ignore_index": 1.5}), "ignore_index"),
        (lambda h, w, y, b: ((h, w, y, b), {"ignore_index": False}), "ignore_index"),
        (lambda h, w, y, b: ((h, w, y, b), {"ignore_index": 2**70}), "ignore_index"),
        (lambda h, w, y, b: ((h, w, y, b), {"ignore_index": -(2**63) - 1}), "ignore_index"),
        (lambda h, w, y, b: ((h, w[:0], y, None), {}), "weight"),  # V = 0: no class to score
        (lambda h, w, y, b: ((h, w[:0], y, b[:0]), {}), "weight"),
    ],
)
def test_bad_input_names_the_argument(backend, make_args, name):
    tensors, _ = head_case(torch.float32)
    hidden, weight, target, bias = tensors
    args, kwargs = make_args(hidden, weight, target.clamp_min(0), bias)
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        linear_masked_cross_entropy(*args, **kwargs)


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    (hidden, _, target, _), options = head_case(torch.float32, seed=6)
    module = LinearMaskedCrossEntropyLoss(12, 37, reduction="mean", **options)
    assert_compiled_module_matches(module, hidden, target)


@fuzz(25, seq_len=st.integers(1, 6), n_inner=st.integers(1, 9), n_classes=st.integers(1, 30), chunk=st.integers(1, 8))
def test_fuzz_shapes_thresholds_and_chunks(data, backend_name, batch, seq_len, n_inner, n_classes, reduction, chunk):
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    hidden = torch.randn(batch, seq_len, n_inner, generator=generator)
    weight = torch.randn(n_classes, n_inner, generator=generator)
    bias = data.draw(st.sampled_from([None, torch.randn(n_classes, generator=generator)]))
    target = torch.randint(0, n_classes, (batch, seq_len), generator=generator)
    target[torch.rand(batch, seq_len, generator=generator) < 0.15] = -100
    options = dict(draw_gates(data, seq_len, -0.5, 4.0, 10.0), reduction=reduction)
    assume_clear_of_gates(expected(hidden, weight, target, bias, **options), options)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EARKIT_BACKEND", backend_name)
        patch.setattr(linear_cross_entropy, "force_chunk_rows", chunk)
        check(hidden, weight, target, bias, torch.randn(target.shape, generator=generator)
              if reduction == "none" else None, **options)
