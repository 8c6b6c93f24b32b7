"""guided_cross_entropy on every backend against the float64 oracle of earkit.kernels.testing (written from DESIGN.md)."""

import math

import pytest
import torch
from hypothesis import strategies as st

from earkit.kernels import guided_cross_entropy
from earkit.kernels import testing as oracle
from helpers import (DTYPES, EMPTY_IDS, GRAD_TOL, LOSS_TOL, REDUCTIONS, SHARED_MEMORY_LAYOUTS, assert_gates_matter,
                     assert_logits_op_close, assert_zero_loss_without_rows, assume_clear_of_gates,
                     check_inplace_backward_on_rows_sharing_memory, check_inplace_backward_reuses_the_buffer,
                     draw_gates, empty_cases, fuzz, gates_in_gaps, rows_sharing_memory, run_logits_op, threshold_in_gap,
                     upstream_gradient)


def expected_guided(student, concept, anchor, **options):
    """Loss, d loss / d student, token losses and window sums from the float64 oracle."""
    want = oracle.guided_cross_entropy(student, concept, anchor, **options)
    return want.loss, want.grads[0], want.token_loss, want.window_sums


def run_op(student, concept, anchor, grad_output=None, **kwargs):
    return run_logits_op(lambda leaf: guided_cross_entropy(leaf, concept, anchor, **kwargs), student, grad_output)


def check(student, concept, anchor, grad_output=None, **kwargs):
    assert_logits_op_close(run_op(student, concept, anchor, grad_output, **kwargs),
                           expected_guided(student, concept, anchor, grad_output=grad_output, **kwargs), student.dtype)


def teacher_student(dtype, seed=0, batch=2, seq_len=11, n_classes=37):
    """A student near the concept teacher, as at the start of an erasure, and an anchor teacher."""
    generator = torch.Generator().manual_seed(seed)
    concept = 2 * torch.randn(batch, seq_len, n_classes, generator=generator)
    anchor = concept + torch.randn(batch, seq_len, n_classes, generator=generator)
    student = concept + 0.3 * torch.randn(batch, seq_len, n_classes, generator=generator)
    return student.to(dtype), concept.to(dtype), anchor.to(dtype)


def windowed_case(dtype, seed=0, eta=1.0, **shape):
    student, concept, anchor = teacher_student(dtype, seed, **shape)
    gates = gates_in_gaps(lambda **options: expected_guided(student, concept, anchor, eta=eta, **options))
    return (student, concept, anchor), dict(eta=eta, **gates)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference_with_threshold_and_windows(backend, dtype, reduction):
    tensors, options = windowed_case(dtype)
    check(*tensors, upstream_gradient(reduction, tensors[0].shape[:-1], 5), reduction=reduction, **options)
    assert_gates_matter(expected_guided(*tensors, **options), options)


@pytest.mark.parametrize("eta", [0.0, 0.5, 3.0])
def test_eta(backend, eta):
    tensors, options = windowed_case(torch.float32, seed=1, eta=eta)
    check(*tensors, reduction="mean", **options)


def test_triton_layouts(triton_layout, monkeypatch):
    monkeypatch.setenv("EARKIT_BACKEND", "triton")
    for dtype in (torch.float32, torch.bfloat16):
        tensors, options = windowed_case(dtype, seed=3, n_classes=53)
        check(*tensors, reduction="mean", **options)
        check(*tensors, torch.randn(tensors[0].shape[:-1]), reduction="none", threshold=options["threshold"])


def test_loss_is_zero_when_the_student_matches_the_target(backend):
    student, concept, _ = teacher_student(torch.float32, seed=6)
    # With anchor == concept the target is the concept itself, whatever eta.
    loss, grad = run_op(student, student, student, reduction="none", eta=2.0)
    assert loss.abs().max() < 1e-5
    assert grad.abs().max() < 1e-6
    loss, _ = run_op(student, concept, concept, reduction="sum")
    assert loss > 0


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape, options", empty_cases(37), ids=EMPTY_IDS)
def test_no_rows_give_a_zero_loss_and_an_empty_gradient(backend, shape, options, reduction):
    student = torch.randn(shape, requires_grad=True)
    loss = guided_cross_entropy(student, torch.randn(shape), torch.randn(shape), threshold=0.1,
                                reduction=reduction, **options)
    assert_zero_loss_without_rows(loss, reduction, student)


def test_teacher_inputs_get_no_gradient(backend):
    student, concept, anchor = teacher_student(torch.float32, seed=2)
    concept.requires_grad_()
    anchor.requires_grad_()
    student.requires_grad_()
    guided_cross_entropy(student, concept, anchor).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert concept.grad is None and anchor.grad is None


def test_single_row_and_extremes(backend):
    student, concept, anchor = teacher_student(torch.float32, seed=8, batch=1, seq_len=1, n_classes=5)
    check(student[0], concept[0], anchor[0], reduction="mean", threshold=0.01)
    check(student, concept, anchor, torch.tensor([[-2.0]]), reduction="none")
    check(student, concept, anchor, reduction="sum", window=4, window_threshold=0.001)
    tensors, _ = windowed_case(torch.float32, seed=9)
    check(*tensors, reduction="mean", threshold=-1.0, window=2, window_threshold=-1.0)
    loss, grad = run_op(*tensors, reduction="mean", threshold=1e6)
    assert loss.item() == 0.0 and not grad.any()


def test_target_with_zero_probability_classes(backend):
    # A class the target gives no mass (anchor -inf) adds nothing to the KL, not 0 * -inf = NaN.
    student, concept, anchor = teacher_student(torch.float32, seed=10)
    anchor[..., :3] = -math.inf
    check(student, concept, anchor, reduction="mean", eta=1.0)


def exact_token_kl(student, concept, anchor, eta=1.0):
    """KL(p || softmax(s)) per row in float64 from log-probabilities; classes with p = 0 add
    nothing, and a NaN (log_softmax of a row holding +inf) stays NaN."""
    return expected_guided(student, concept, anchor, eta=eta)[2]


def large_logits_case(dtype, scale, n_classes=127, seed=21, unit=None, ramp=30.0, student_ramp=0.0):
    """Logits of size `scale` (1e3-1e4), spread by a few `unit`s (default scale / 1e3, above the
    fp16 grid at that size, so softmax is not one-hot) and rising by `ramp` units along V (so
    the running max of a chunked pass moves chunk after chunk); the student offset from the
    target by up to `scale`, close to it in some rows, far in others, plus its own ramp."""
    generator = torch.Generator().manual_seed(seed)
    shape = (8, n_classes)
    unit = scale / 1e3 if unit is None else unit
    base = scale * (1 + torch.rand(shape[0], 1, generator=generator)) + torch.linspace(0, ramp * unit, n_classes)
    concept = base + 2 * unit * torch.randn(shape, generator=generator)
    anchor = concept + unit * torch.randn(shape, generator=generator)
    offset = scale * torch.rand(shape[0], 1, generator=generator)
    closeness = torch.rand(shape[0], 1, generator=generator)
    student = 2 * anchor - concept - offset + unit * closeness * torch.randn(shape, generator=generator)
    student = student + torch.linspace(0, student_ramp * unit, n_classes)
    # fp16 logits of this size are whole numbers; fp32 ones go on a grid of 1/64: either way
    # t = 2 z_a - z_c is exact in fp32, so the float64 oracle sees the logits the kernels see.
    student, concept, anchor = ((x * 64).round() / 64 for x in (student, concept, anchor))
    student, concept, anchor = (x.to(dtype) for x in (student, concept, anchor))
    assert torch.isfinite(2 * anchor.float() - concept.float()).all()
    return student, concept, anchor


def check_large_logits(student, concept, anchor):
    want = exact_token_kl(student, concept, anchor)
    assert want.max() > 1e-2
    loss = guided_cross_entropy(student, concept, anchor, reduction="none")
    torch.testing.assert_close(loss.double(), want, **LOSS_TOL)
    # A threshold between two losses splits the tokens as the exact losses do.
    threshold = threshold_in_gap(want, 0.5)
    kept = guided_cross_entropy(student, concept, anchor, threshold=threshold, reduction="none")
    assert torch.equal(kept != 0, want > threshold)


@pytest.mark.parametrize("scale", [1e3, 1e4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_large_logits_do_not_cancel(backend, dtype, scale):
    # KL as sum p (t - s) - lse_t + lse_s subtracts numbers of the size of the logits: at 1e3-1e4
    # each lse carries an fp32 rounding of ~1e-3, and p = exp(t - lse_t) sums to 1 only that
    # well, times a student-target offset of thousands (softmax does not see offsets). Losses
    # were off by whole nats, flipping token masks. From log-probabilities the error stays ~1e-6.
    tensors = large_logits_case(dtype, scale)
    assert exact_token_kl(*tensors).min() < 1.0  # small losses too, where masks decide
    check_large_logits(*tensors)


def test_large_logits_over_several_chunks(backend):
    # V = 4500: the native twin's rows run in chunks of 2048 (and Triton's split layout below in
    # blocks of 8), so the KL's accumulator is re-based on each new running max: the target's
    # rises by a few nats a chunk while the student's falls, so the re-basing shows.
    check_large_logits(*large_logits_case(torch.float32, 1e4, n_classes=4500, seed=23, unit=1.0, ramp=8.0,
                                          student_ramp=-16.0))


def test_large_logits_triton_layouts(triton_layout, monkeypatch):
    monkeypatch.setenv("EARKIT_BACKEND", "triton")
    for dtype in (torch.float16, torch.float32):
        check_large_logits(*large_logits_case(dtype, 1e4, seed=24))


def test_infinite_teacher_logits(backend):
    # t = (1 + eta) z_a - eta z_c = +inf (an anchor at +inf, or a concept at -inf) has no
    # softmax: the row's loss is NaN on every backend, as log_softmax makes it, never -inf (the
    # old reference) and never a number the threshold could mask. t = -inf (a concept at +inf,
    # an anchor at -inf) is a class without target mass: finite, as the float64 oracle says.
    student, concept, anchor = teacher_student(torch.float32, seed=22, batch=1, seq_len=7, n_classes=11)
    student, concept, anchor = student[0], concept[0], anchor[0]
    anchor[0, 3] = math.inf
    anchor[1, [2, 5]] = math.inf
    concept[2, 4] = -math.inf
    concept[3, 4] = math.inf
    anchor[4, 1] = -math.inf
    anchor[5, 6] = math.inf  # and a student at +inf on another class, and on the same class
    student[5, 0] = math.inf
    student[6, 6] = math.inf
    anchor[6, 6] = math.inf
    target_is_inf = (2 * anchor - concept) == math.inf
    want = exact_token_kl(student, concept, anchor)
    assert want[[0, 1, 2, 5, 6]].isnan().all() and want[[3, 4]].isfinite().all()
    leaf = student.clone().requires_grad_()
    loss = guided_cross_entropy(leaf, concept, anchor, reduction="none", threshold=0.01)
    loss.backward(torch.ones_like(loss))
    torch.testing.assert_close(loss.double(), want, equal_nan=True, **LOSS_TOL)
    # The gradient softmax(s) - p of a finite row is the oracle's; in a row with t = +inf, p is
    # 0 on the finite classes and NaN (undefined) on the infinite ones.
    _, want_grad, _, _ = expected_guided(student[3:5], concept[3:5], anchor[3:5], reduction="none",
                                         grad_output=torch.ones(2))
    torch.testing.assert_close(leaf.grad[3:5].double(), want_grad, **GRAD_TOL[torch.float32])
    for row in (0, 1, 2):
        assert torch.equal(leaf.grad[row].isnan(), target_is_inf[row])
        finite = ~target_is_inf[row]
        torch.testing.assert_close(leaf.grad[row][finite], torch.softmax(student[row], -1)[finite])


def test_bf16_gradient_when_student_is_close_to_the_target(backend):
    # d s = softmax(s) - p cancels as the student converges: it must be formed in fp32.
    student, concept, anchor = teacher_student(torch.float32, seed=12, n_classes=300)
    target_logits = 2 * anchor - concept
    student = (target_logits + 0.05 * torch.randn_like(target_logits)).bfloat16()
    _, grad = run_op(student, concept.bfloat16(), anchor.bfloat16(), reduction="sum")
    _, want_grad, _, _ = expected_guided(student, concept.bfloat16(), anchor.bfloat16(), reduction="sum")
    torch.testing.assert_close(grad.double(), want_grad, **GRAD_TOL[torch.bfloat16])


def test_inplace_backward_reuses_the_student_buffer(backend):
    (student, concept, anchor), options = windowed_case(torch.bfloat16, seed=2)
    check_inplace_backward_reuses_the_buffer(
        lambda logits, **inplace: guided_cross_entropy(logits, concept, anchor, reduction="mean", **inplace, **options),
        student)


@pytest.mark.parametrize("windowed", [False, True], ids=["rows", "windows"])
@pytest.mark.parametrize("layout", SHARED_MEMORY_LAYOUTS)
def test_inplace_backward_on_student_rows_sharing_memory(backend, layout, windowed):
    # As for masked_cross_entropy: an expanded student (stride 0 along rows) cannot take the
    # gradient in place, so the op falls back to a fresh buffer instead of summing rows into one.
    generator = torch.Generator().manual_seed(14)
    shape = (2, 6, 37) if windowed else (9, 37)
    source, make = rows_sharing_memory(layout, shape, generator)
    concept = make(source) + torch.randn(shape, generator=generator)
    anchor = concept + torch.randn(shape, generator=generator)
    check_inplace_backward_on_rows_sharing_memory(
        lambda student, **options: guided_cross_entropy(student, concept, anchor, **options),
        lambda student, **options: expected_guided(student, concept, anchor, **options), source, make, windowed)


def test_nan_logits_propagate_through_the_threshold(backend):
    (student, concept, anchor), options = windowed_case(torch.float32, seed=4)
    concept[0, 3, 1] = math.nan
    loss, grad = run_op(student, concept, anchor, reduction="mean", **options)
    assert math.isnan(loss.item())
    assert grad[0, 3].isnan().all()


@pytest.mark.parametrize(
    "make_args, name",
    [
        (lambda s, c, a: ((s.double(), c, a), {}), "student"),
        (lambda s, c, a: ((s, c[:, :-1], a), {}), "concept"),
        (lambda s, c, a: ((s, c, a.half()), {}), "anchor"),
        (lambda s, c, a: ((s, c, a.to("meta")), {}), "anchor"),
        (lambda s, c, a: ((s, c, [1.0]), {}), "anchor"),
        (lambda s, c, a: ((s, c, a), {"eta": math.nan}), "eta"),
        (lambda s, c, a: ((s, c, a), {"eta": math.inf}), "eta"),
        (lambda s, c, a: ((s, c, a), {"threshold": -math.inf}), "threshold"),
        (lambda s, c, a: ((s, c, a), {"window": -1}), "window"),
        (lambda s, c, a: ((s.flatten(0, 1), c.flatten(0, 1), a.flatten(0, 1)), {"window": 2}), "student"),
        (lambda s, c, a: ((s, c, a), {"window": 2, "window_threshold": math.nan}), "window_threshold"),
        (lambda s, c, a: ((s, c, a), {"reduction": None}), "reduction"),
    ],
)
def test_bad_input_names_the_argument(backend, make_args, name):
    tensors, _ = windowed_case(torch.float32)
    args, kwargs = make_args(*tensors)
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        guided_cross_entropy(*args, **kwargs)


@fuzz(40, seq_len=st.integers(1, 9), n_classes=st.integers(1, 40))
def test_fuzz_shapes_and_thresholds(data, backend_name, batch, seq_len, n_classes, reduction):
    student, concept, anchor = teacher_student(torch.float32, data.draw(st.integers(0, 2**16)), batch, seq_len,
                                               n_classes)
    eta = data.draw(st.floats(0.0, 3.0))
    options = dict(eta=eta, **draw_gates(data, seq_len, -0.1, 2.0, 5.0), reduction=reduction)
    assume_clear_of_gates(expected_guided(student, concept, anchor, **options), options)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EARKIT_BACKEND", backend_name)
        check(student, concept, anchor, torch.randn(student.shape[:-1]) if reduction == "none" else None, **options)
