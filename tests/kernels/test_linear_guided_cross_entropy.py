"""linear_guided_cross_entropy on every backend against the float64 oracle of earkit.kernels.testing (written from DESIGN.md):
student and teacher logits h W^T + b through one head, then KL(p || softmax(s)) thresholded and windowed."""

import math

import pytest
import torch
from hypothesis import strategies as st

from earkit.kernels import LinearGuidedCrossEntropyLoss, guided_cross_entropy, linear_guided_cross_entropy
from earkit.kernels import linear_cross_entropy, triton_linear_cross_entropy
from earkit.kernels import testing as oracle
from helpers import (DTYPES, EMPTY_IDS, REDUCTIONS, assert_compiled_module_matches, assert_gates_matter,
                     assert_head_op_close, assert_zero_loss_without_rows, assume_clear_of_gates, draw_gates,
                     empty_cases, fuzz, gates_in_gaps, head_without_rows, run_head_op, upstream_gradient,
                     with_rounding_floors)


def expected(h_student, h_concept, h_anchor, weight, bias=None, **options):
    """Loss, (gradient, rounding floor) of h_student, weight and bias, token losses and window sums (float64 oracle)."""
    want = oracle.linear_guided_cross_entropy(h_student, h_concept, h_anchor, weight, bias, **options)
    return with_rounding_floors(want, h_student, weight)


def run_op(h_student, h_concept, h_anchor, weight, bias=None, grad_output=None, train_head=True, **kwargs):
    return run_head_op(lambda h, w, b: linear_guided_cross_entropy(h, h_concept, h_anchor, w, b, **kwargs),
                       h_student, weight, bias, grad_output, train_head)


def check(h_student, h_concept, h_anchor, weight, bias=None, grad_output=None, train_head=True, **kwargs):
    assert_head_op_close(run_op(h_student, h_concept, h_anchor, weight, bias, grad_output, train_head, **kwargs),
                         expected(h_student, h_concept, h_anchor, weight, bias, grad_output=grad_output, **kwargs),
                         h_student.dtype, train_head)


def teacher_student(dtype, seed=0, batch=2, seq_len=7, n_inner=12, n_classes=37):
    """A student's hidden states near the concept teacher's, an anchor teacher's further off, one head."""
    generator = torch.Generator().manual_seed(seed)
    h_concept = torch.randn(batch, seq_len, n_inner, generator=generator)
    h_anchor = h_concept + 0.7 * torch.randn(batch, seq_len, n_inner, generator=generator)
    h_student = h_concept + 0.3 * torch.randn(batch, seq_len, n_inner, generator=generator)
    weight = torch.randn(n_classes, n_inner, generator=generator) / math.sqrt(n_inner) * 3
    bias = torch.randn(n_classes, generator=generator)
    return tuple(x.to(dtype) for x in (h_student, h_concept, h_anchor, weight, bias))


def windowed_case(dtype, seed=0, eta=1.0, **shape):
    tensors = teacher_student(dtype, seed, **shape)
    return tensors, dict(eta=eta, **gates_in_gaps(lambda **options: expected(*tensors, eta=eta, **options)))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference_with_threshold_and_windows(backend, small_chunks, dtype, reduction):
    tensors, options = windowed_case(dtype)
    check(*tensors, upstream_gradient(reduction, tensors[0].shape[:-1], 5), reduction=reduction, **options)
    assert_gates_matter(expected(*tensors, **options), options)


@pytest.mark.parametrize("eta", [0.0, 0.5, 3.0])
def test_eta(backend, eta):
    tensors, options = windowed_case(torch.float32, seed=1, eta=eta)
    check(*tensors, reduction="mean", **options)


@pytest.mark.parametrize("engine", ["cublas", "triton"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_logits_engines(monkeypatch, small_chunks, engine, dtype, reduction):
    """Both ways the Triton backend makes the logits (EARKIT_LINEAR_LOGITS): cuBLAS's two GEMMs
    and a lerp for the target, with the student's buffer as scratch, or the two-accumulator
    kernel. On CPU tensors cuBLAS's mixed-precision GEMM is an fp32 matmul of the same values."""
    monkeypatch.setenv("EARKIT_BACKEND", "triton")
    monkeypatch.setenv("EARKIT_LINEAR_LOGITS", engine)
    tensors, options = windowed_case(dtype, eta=1.5)
    check(*tensors, upstream_gradient(reduction, tensors[0].shape[:-1], 8), reduction=reduction, **options)


def test_triton_tiles_and_layouts(triton_layout, small_chunks, monkeypatch):
    monkeypatch.setenv("EARKIT_BACKEND", "triton")
    monkeypatch.setattr(triton_linear_cross_entropy, "force_blocks", (8, 8, 4))
    for dtype in (torch.float32, torch.bfloat16):
        tensors, options = windowed_case(dtype, seed=3)
        check(*tensors, reduction="mean", **options)
        check(*tensors, torch.randn(tensors[0].shape[:-1]), reduction="none", threshold=options["threshold"])


def test_is_the_logits_op_on_the_head_outputs(backend):
    # Same numbers as guided_cross_entropy given the three logit tensors (fp32: identical math).
    (h_s, h_c, h_a, weight, bias), options = windowed_case(torch.float32, seed=2)
    head = lambda x: x @ weight.t() + bias  # noqa: E731
    loss = linear_guided_cross_entropy(h_s, h_c, h_a, weight, bias, reduction="none", **options)
    want = guided_cross_entropy(head(h_s), head(h_c), head(h_a), reduction="none", **options)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)


def test_frozen_head_teachers_without_gradient_and_no_bias(backend):
    (h_s, h_c, h_a, weight, bias), options = windowed_case(torch.float32, seed=4)
    check(h_s, h_c, h_a, weight, bias, train_head=False, reduction="mean", **options)
    check(h_s, h_c, h_a, weight, None, reduction="sum", **options)
    h_c, h_a = h_c.clone().requires_grad_(), h_a.clone().requires_grad_()
    student = h_s.clone().requires_grad_()
    linear_guided_cross_entropy(student, h_c, h_a, weight, bias).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert h_c.grad is None and h_a.grad is None


def test_loss_is_zero_when_the_student_matches_the_target(backend):
    h_s, _, _, weight, bias = teacher_student(torch.float32, seed=6)
    loss, grads = run_op(h_s, h_s, h_s, weight, bias, reduction="none", eta=2.0)
    assert loss.abs().max() < 1e-5
    assert all(g.abs().max() < 1e-5 for g in grads)


def test_everything_masked(backend):
    tensors, _ = windowed_case(torch.float32, seed=9)
    loss, grads = run_op(*tensors, reduction="mean", threshold=1e6)
    assert loss.item() == 0.0 and not any(g.any() for g in grads)
    loss, grads = run_op(*tensors, reduction="mean", window=2, window_threshold=1e6)
    assert loss.item() == 0.0 and not any(g.any() for g in grads)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape, options", empty_cases(12), ids=EMPTY_IDS)
def test_no_rows_give_a_zero_loss_and_zero_gradients(backend, shape, options, reduction):
    h_student, weight, bias = head_without_rows(shape)
    loss = linear_guided_cross_entropy(h_student, torch.randn(shape), torch.randn(shape), weight, bias, threshold=0.1,
                                       reduction=reduction, **options)
    assert_zero_loss_without_rows(loss, reduction, h_student, weight, bias)


def test_nan_propagates_through_the_threshold(backend):
    (h_s, h_c, h_a, weight, bias), options = windowed_case(torch.float32, seed=4)
    h_c[0, 3, 1] = math.nan
    loss, grads = run_op(h_s, h_c, h_a, weight, bias, reduction="mean", **options)
    assert math.isnan(loss.item())
    assert grads[0][0, 3].isnan().all()


def test_module_and_torch_compile_fullgraph():
    torch._dynamo.reset()
    (h_s, h_c, h_a, _, _), options = windowed_case(torch.float32, seed=5, eta=1.5)
    options.pop("eta")
    module = LinearGuidedCrossEntropyLoss(12, 37, eta=1.5, reduction="sum", **options)
    assert "eta=1.5" in repr(module)
    assert_compiled_module_matches(module, h_s, h_c, h_a)


@pytest.mark.parametrize(
    "make_args, name",
    [
        (lambda s, c, a, w, b: ((s.double(), c, a, w, b), {}), "h_student"),
        (lambda s, c, a, w, b: ((s, c[:, :-1], a, w, b), {}), "h_concept"),
        (lambda s, c, a, w, b: ((s, c, a.half(), w, b), {}), "h_anchor"),
        (lambda s, c, a, w, b: ((s, c, a.to("meta"), w, b), {}), "h_anchor"),
        (lambda s, c, a, w, b: ((s, c, [1.0], w, b), {}), "h_anchor"),
        (lambda s, c, a, w, b: ((s, c, a, w[:, :-1], b), {}), "weight"),
        (lambda s, c, a, w, b: ((s, c, a, w.half(), b), {}), "weight"),
        (lambda s, c, a, w, b: ((s, c, a, w, b[None]), {}), "bias"),
        (lambda s, c, a, w, b: ((s, c, a, w[:0], None), {}), "weight"),  # V = 0: no class to score
        (lambda s, c, a, w, b: ((s, c, a, w[:0], b[:0]), {}), "weight"),
        (lambda s, c, a, w, b: ((s, c, a, w, b), {"eta": math.nan}), "eta"),
        (lambda s, c, a, w, b: ((s, c, a, w, b), {"threshold": -math.inf}), "threshold"),
        (lambda s, c, a, w, b: ((s, c, a, w, b), {"window": -1}), "window"),
        (lambda s, c, a, w, b: ((s.flatten(0, 1), c.flatten(0, 1), a.flatten(0, 1), w, b), {"window": 2}),
         "h_student"),
        (lambda s, c, a, w, b: ((s, c, a, w, b), {"window": 2, "window_threshold": math.nan}), "window_threshold"),
        (lambda s, c, a, w, b: ((s, c, a, w, b), {"reduction": None}), "reduction"),
    ],
)
def test_bad_input_names_the_argument(backend, make_args, name):
    tensors, _ = windowed_case(torch.float32)
    args, kwargs = make_args(*tensors)
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        linear_guided_cross_entropy(*args, **kwargs)


@fuzz(25, seq_len=st.integers(1, 6), n_inner=st.integers(1, 9), n_classes=st.integers(1, 30), chunk=st.integers(1, 8))
def test_fuzz_shapes_thresholds_and_chunks(data, backend_name, batch, seq_len, n_inner, n_classes, reduction, chunk):
    h_s, h_c, h_a, weight, bias = teacher_student(torch.float32, data.draw(st.integers(0, 2**16)), batch, seq_len,
                                                  n_inner, n_classes)
    bias = data.draw(st.sampled_from([None, bias]))
    eta = data.draw(st.floats(0.0, 3.0))
    options = dict(eta=eta, **draw_gates(data, seq_len, -0.1, 2.0, 5.0), reduction=reduction)
    assume_clear_of_gates(expected(h_s, h_c, h_a, weight, bias, **options), options)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EARKIT_BACKEND", backend_name)
        patch.setattr(linear_cross_entropy, "force_chunk_rows", chunk)
        check(h_s, h_c, h_a, weight, bias, torch.randn(h_s.shape[:-1]) if reduction == "none" else None, **options)


def test_engine_token_kl_runs_fused_on_a_frozen_head_and_matches_the_logits_path():
    """The erasure objective on a tiny Janus: with the head's last Linear frozen the teacher hands
    over head features and the loss runs fused; it equals the loss on the full logits."""
    from earkit.engine import objectives
    from earkit.engine.model import image_logits
    from earkit.engine.tiny import build_tiny_janus

    built = build_tiny_janus(["red", "circle"], seed=0)
    model = built[0] if isinstance(built, tuple) else built
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    generator = torch.Generator().manual_seed(0)
    hidden_size = model.config.text_config.hidden_size
    student, concept, anchor = (torch.randn(2, 6, hidden_size, generator=generator) for _ in range(3))
    options = dict(eta=1.0, token_threshold=0.01, window=4, window_threshold=0.02)
    assert objectives.fused_head(model)
    teacher = objectives.TeacherStates(objectives.token_kl_teacher(model, concept),
                                       objectives.token_kl_teacher(model, anchor))
    assert teacher.concept.shape[-1] == model.model.generation_head.vision_head.in_features
    student_leaf = student.clone().requires_grad_()
    loss, weight = objectives.token_kl(model, student_leaf, teacher, **options)
    loss.backward()

    for parameter in model.model.generation_head.vision_head.parameters():
        parameter.requires_grad_(True)  # a trained head: the logits path
    assert not objectives.fused_head(model)
    teacher = objectives.TeacherStates(image_logits(model, concept), image_logits(model, anchor))
    assert objectives.token_kl_teacher(model, concept).shape == teacher.concept.shape
    reference_leaf = student.clone().requires_grad_()
    want_loss, want_weight = objectives.token_kl(model, reference_leaf, teacher, **options)
    want_loss.backward()
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weight, want_weight)
    torch.testing.assert_close(student_leaf.grad, reference_leaf.grad, rtol=1e-4, atol=1e-7)
