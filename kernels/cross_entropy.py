"""The public loss ops: thresholded, windowed cross-entropy with hard labels or a guided soft target.

    masked_cross_entropy(logits, target, ...)            l_i = logsumexp(z_i) - z_i[y_i]
    guided_cross_entropy(student, concept, anchor, ...)  l_i = KL(p_i || softmax(s_i)),
                                                         p_i = softmax((1 + eta) z_a - eta z_c)

Token mask m_i = [l_i > threshold]; windows of W consecutive positions along T gate on
L_w = sum m_i l_i > window_threshold; a_i = m_i G_w(i) (DESIGN.md, "The method", step 5).
reduction "none" gives a_i l_i, "sum" sum a_i l_i, "mean" sum a_i l_i / max(1, sum a_i).

Each op is a `torch.library.custom_op` (`torch.ops.earkit.*`) with a fake kernel and autograd,
so `torch.compile(fullgraph=True)` traces through it. The op returns the loss plus the per-row
weights and log-sum-exps that the backward needs (non-differentiable). The rows themselves run
on one of three backends with the same API (see reference.py): Triton for CUDA tensors, the
native C++ twin for CPU tensors (the reference where it is not built), or the one the `backend=`
argument names; EARKIT_BACKEND=triton|native|reference, when set, overrides both (_shared.py).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._shared import (backend_module, check_backend, check_common, check_finite, check_float_tensor,
                      check_ignore_index, check_same_layout, check_target, check_target_values, reduce_loss)

# ---------------------------------------------------------------- shared pieces of both ops


def _rows(tensor: Tensor) -> Tensor:
    """(..., V) -> (N, V) with unit stride along V (a view whenever the layout allows it)."""
    rows = tensor.reshape(-1, tensor.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _weights(backend, loss, keep, shape, window, window_threshold) -> Tensor:
    # No rows (B = 0 or T = 0): no window to gate, and seq_len = 0 would divide by zero.
    if window is None or loss.numel() == 0:
        return keep
    return backend.window_weights(loss, keep, shape[1], window, window_threshold)


def _row_scale(weight: Tensor, grad_loss: Tensor, reduction: str) -> Tensor:
    """Per-row factor of the gradient: a_i times the upstream gradient (over the mean's count)."""
    grad_loss = grad_loss.float()
    if reduction == "none":
        return (weight * grad_loss.reshape(-1)).contiguous()
    if reduction == "mean":
        grad_loss = grad_loss / weight.sum().clamp_min(1.0)
    return weight * grad_loss


def _in_place_rows(tensor: Tensor) -> Optional[Tensor]:
    """A (N, V) view sharing `tensor`'s storage that can hold N distinct gradient rows, or None.

    None when no such view exists (the backward then writes a fresh buffer): the layout does not
    flatten to rows, the classes are not contiguous, or the rows overlap in memory. Overlap is
    what x.expand(N, V) gives (row stride 0) or any row stride below V: every row's gradient
    would land on the same elements, so writing in place would give a wrong gradient silently.
    """
    try:
        rows = tensor.view(-1, tensor.shape[-1])
    except RuntimeError:
        return None
    n_rows, n_cols = rows.shape
    if n_cols > 1 and rows.stride(1) != 1:
        return None
    # With unit stride along V, row i covers [i s, i s + V): disjoint from row i + 1 iff s >= V.
    if n_rows > 1 and n_cols > 0 and rows.stride(0) < n_cols:
        return None
    return rows


def _fake_outputs(lead: Tensor, reduction: str, n_row_vectors: int):
    rows_shape = lead.shape[:-1]
    loss = lead.new_empty(rows_shape if reduction == "none" else (), dtype=torch.float32)
    return (loss,) + tuple(lead.new_empty(rows_shape, dtype=torch.float32) for _ in range(n_row_vectors))


# ---------------------------------------------------------------- hard labels


@torch.library.custom_op("earkit::masked_cross_entropy", mutates_args=())
def _masked_cross_entropy_op(
    logits: Tensor, target: Tensor, threshold: Optional[float], ignore_index: int,
    window: Optional[int], window_threshold: Optional[float], reduction: str, inplace_backward: bool,
    backend: Optional[str] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    rows_backend = backend_module(logits.device, backend)
    rows = _rows(logits)
    target_rows = target.reshape(-1).contiguous()
    check_target_values(target_rows, rows.shape[1], ignore_index)
    loss, keep, lse = rows_backend.hard_rows(rows, target_rows, ignore_index, threshold)
    weight = _weights(rows_backend, loss, keep, logits.shape, window, window_threshold)
    rows_shape = logits.shape[:-1]
    return reduce_loss(loss, weight, reduction, rows_shape), weight.reshape(rows_shape), lse.reshape(rows_shape)


@_masked_cross_entropy_op.register_fake
def _(logits, target, threshold, ignore_index, window, window_threshold, reduction, inplace_backward, backend=None):
    return _fake_outputs(logits, reduction, 2)


@torch.library.custom_op("earkit::masked_cross_entropy_backward", mutates_args=())
def _masked_cross_entropy_backward_op(logits: Tensor, target: Tensor, lse: Tensor, row_scale: Tensor,
                                      backend: Optional[str] = None) -> Tensor:
    rows = _rows(logits)
    grad = torch.empty(rows.shape, dtype=logits.dtype, device=logits.device)
    backend_module(logits.device, backend).hard_grad(rows, target.reshape(-1).contiguous(), lse.reshape(-1), row_scale, grad)
    return grad.view(logits.shape)


@_masked_cross_entropy_backward_op.register_fake
def _(logits, target, lse, row_scale, backend=None):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@torch.library.custom_op("earkit::masked_cross_entropy_backward_", mutates_args=("logits",))
def _masked_cross_entropy_backward_inplace_op(logits: Tensor, target: Tensor, lse: Tensor, row_scale: Tensor,
                                              backend: Optional[str] = None) -> None:
    rows = _in_place_rows(logits)
    backend_module(logits.device, backend).hard_grad(rows, target.reshape(-1).contiguous(), lse.reshape(-1), row_scale, rows)


@_masked_cross_entropy_backward_inplace_op.register_fake
def _(logits, target, lse, row_scale, backend=None):
    return None


def _masked_setup_context(ctx, inputs, output):
    logits, target, _, _, _, _, reduction, inplace_backward, backend = inputs
    _, weight, lse = output
    ctx.save_for_backward(logits, target, weight, lse)
    ctx.reduction, ctx.backend = reduction, backend
    ctx.inplace_backward = inplace_backward
    ctx.mark_non_differentiable(weight, lse)


def _masked_backward(ctx, grad_loss, _grad_weight, _grad_lse):
    logits, target, weight, lse = ctx.saved_tensors
    row_scale = _row_scale(weight.reshape(-1), grad_loss, ctx.reduction)
    if ctx.inplace_backward and _in_place_rows(logits) is not None:
        torch.ops.earkit.masked_cross_entropy_backward_(logits, target, lse, row_scale, ctx.backend)
        grad = logits
    else:
        grad = torch.ops.earkit.masked_cross_entropy_backward(logits, target, lse, row_scale, ctx.backend)
    return grad, None, None, None, None, None, None, None, None


_masked_cross_entropy_op.register_autograd(_masked_backward, setup_context=_masked_setup_context)


def masked_cross_entropy(
    logits: Tensor, target: Tensor, *, threshold: float | None = None, ignore_index: int = -100,
    window: int | None = None, window_threshold: float | None = None, reduction: str = "mean",
    inplace_backward: bool = False, return_weights: bool = False, backend: str | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Cross-entropy against hard labels with thresholded token masking and windowed gating.

    logits (..., V) in fp32/fp16/bf16 (with `window`: (B, T, V), windows run along T); target
    (...) integer class ids, `ignore_index` rows count for nothing. Tokens with loss <= threshold
    are dropped; with `window` and `window_threshold`, a window whose kept loss sum is
    <= window_threshold is dropped whole. Returns a float32 loss (shape of target for
    reduction="none", else a scalar); with return_weights=True, (loss, weights): the per-token
    weights a_i = m_i G_w(i) (float32, shape of target, no gradient). With inplace_backward=True
    the backward writes the gradient into the logits buffer, which must not be used afterwards.
    Where that buffer cannot hold one gradient row per row (rows that overlap in memory, as
    x.expand(N, V) gives, or a layout that does not flatten to (N, V) rows with contiguous
    classes) the backward silently writes a fresh buffer instead: the gradient is always right,
    only the memory saving is lost (autograd callers cannot always choose the layout, so this is
    not an error).

    backend: "triton", "native", "reference", or None for automatic (Triton for CUDA tensors,
    the native C++ twin for CPU tensors, the reference where the twin is not built). The
    environment variable EARKIT_BACKEND, when set, overrides this argument.
    """
    check_float_tensor("logits", logits)
    threshold, window_threshold = check_common("logits", logits, threshold, window, window_threshold, reduction)
    check_target(target, "logits", logits, extra=" (soft targets: guided_cross_entropy)")
    ignore_index = check_ignore_index(ignore_index)
    loss, weights, _ = torch.ops.earkit.masked_cross_entropy(
        logits, target.long(), threshold, ignore_index, window, window_threshold, reduction, bool(inplace_backward),
        check_backend(backend),
    )
    return (loss, weights) if return_weights else loss


# ---------------------------------------------------------------- guided soft target


@torch.library.custom_op("earkit::guided_cross_entropy", mutates_args=())
def _guided_cross_entropy_op(
    student: Tensor, concept: Tensor, anchor: Tensor, eta: float, threshold: Optional[float],
    window: Optional[int], window_threshold: Optional[float], reduction: str, inplace_backward: bool,
    backend: Optional[str] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    rows_backend = backend_module(student.device, backend)
    loss, keep, lse_student, lse_target = rows_backend.guided_rows(
        _rows(student), _rows(concept), _rows(anchor), eta, threshold
    )
    weight = _weights(rows_backend, loss, keep, student.shape, window, window_threshold)
    rows_shape = student.shape[:-1]
    return (
        reduce_loss(loss, weight, reduction, rows_shape), weight.reshape(rows_shape),
        lse_student.reshape(rows_shape), lse_target.reshape(rows_shape),
    )


@_guided_cross_entropy_op.register_fake
def _(student, concept, anchor, eta, threshold, window, window_threshold, reduction, inplace_backward,
      backend=None):
    return _fake_outputs(student, reduction, 3)


@torch.library.custom_op("earkit::guided_cross_entropy_backward", mutates_args=())
def _guided_cross_entropy_backward_op(
    student: Tensor, concept: Tensor, anchor: Tensor, eta: float,
    lse_student: Tensor, lse_target: Tensor, row_scale: Tensor, backend: Optional[str] = None,
) -> Tensor:
    rows = _rows(student)
    grad = torch.empty(rows.shape, dtype=student.dtype, device=student.device)
    backend_module(student.device, backend).guided_grad(
        rows, _rows(concept), _rows(anchor), eta, lse_student.reshape(-1), lse_target.reshape(-1), row_scale, grad
    )
    return grad.view(student.shape)


@_guided_cross_entropy_backward_op.register_fake
def _(student, concept, anchor, eta, lse_student, lse_target, row_scale, backend=None):
    return torch.empty_like(student, memory_format=torch.contiguous_format)


@torch.library.custom_op("earkit::guided_cross_entropy_backward_", mutates_args=("student",))
def _guided_cross_entropy_backward_inplace_op(
    student: Tensor, concept: Tensor, anchor: Tensor, eta: float,
    lse_student: Tensor, lse_target: Tensor, row_scale: Tensor, backend: Optional[str] = None,
) -> None:
    rows = _in_place_rows(student)
    backend_module(student.device, backend).guided_grad(
        rows, _rows(concept), _rows(anchor), eta, lse_student.reshape(-1), lse_target.reshape(-1), row_scale, rows
    )


@_guided_cross_entropy_backward_inplace_op.register_fake
def _(student, concept, anchor, eta, lse_student, lse_target, row_scale, backend=None):
    return None


def _guided_setup_context(ctx, inputs, output):
    student, concept, anchor, eta, _, _, _, reduction, inplace_backward, backend = inputs
    _, weight, lse_student, lse_target = output
    ctx.save_for_backward(student, concept, anchor, weight, lse_student, lse_target)
    ctx.eta = eta
    ctx.reduction, ctx.backend = reduction, backend
    ctx.inplace_backward = inplace_backward
    ctx.mark_non_differentiable(weight, lse_student, lse_target)


def _guided_backward(ctx, grad_loss, _grad_weight, _grad_lse_student, _grad_lse_target):
    student, concept, anchor, weight, lse_student, lse_target = ctx.saved_tensors
    row_scale = _row_scale(weight.reshape(-1), grad_loss, ctx.reduction)
    args = (concept, anchor, ctx.eta, lse_student, lse_target, row_scale, ctx.backend)
    if ctx.inplace_backward and _in_place_rows(student) is not None:
        torch.ops.earkit.guided_cross_entropy_backward_(student, *args)
        grad = student
    else:
        grad = torch.ops.earkit.guided_cross_entropy_backward(student, *args)
    # The teacher logits are constants of the objective: they never get a gradient.
    return grad, None, None, None, None, None, None, None, None, None


_guided_cross_entropy_op.register_autograd(_guided_backward, setup_context=_guided_setup_context)


def guided_cross_entropy(
    student: Tensor, concept: Tensor, anchor: Tensor, *, eta: float = 1.0, threshold: float | None = None,
    window: int | None = None, window_threshold: float | None = None, reduction: str = "mean",
    inplace_backward: bool = False, return_weights: bool = False, backend: str | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """KL(p || softmax(student)) with p = softmax((1 + eta) anchor - eta concept), masked and windowed.

    The ESD-style negative-guidance objective of EAR: the student is pulled towards the anchor
    (replacement) prompt's logits pushed away from the concept's. All three are (..., V) logits
    of one dtype (with `window`: (B, T, V)); only the student gets a gradient. Threshold, window
    and reduction as in masked_cross_entropy; the loss is 0 where the student already matches.
    inplace_backward=True writes the gradient into the student buffer, with the same fallback
    to a fresh buffer as masked_cross_entropy where the student's rows overlap in memory.
    A target logit (1 + eta) anchor - eta concept of -inf is a class without target mass; one
    of +inf leaves softmax undefined, and that row's loss is NaN (as log_softmax has it).
    return_weights and backend as in masked_cross_entropy (EARKIT_BACKEND overrides backend).
    """
    check_float_tensor("student", student)
    check_same_layout("concept", concept, "student", student)
    check_same_layout("anchor", anchor, "student", student)
    eta = check_finite("eta", eta, allow_none=False)
    threshold, window_threshold = check_common("student", student, threshold, window, window_threshold, reduction)
    loss, weights, _, _ = torch.ops.earkit.guided_cross_entropy(
        student, concept.detach(), anchor.detach(), eta, threshold, window, window_threshold, reduction,
        bool(inplace_backward), check_backend(backend),
    )
    return (loss, weights) if return_weights else loss
