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
native C++ twin for CPU tensors (the reference where it is not built), or whatever
EARKIT_BACKEND=triton|native|reference names.
"""

from __future__ import annotations

import math
import os
import warnings
from types import ModuleType
from typing import Optional

import torch
from torch import Tensor

from . import reference

BACKENDS = ("triton", "native", "reference")
REDUCTIONS = ("none", "sum", "mean")
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_warned_native_missing = False


def _triton_backend() -> ModuleType:
    from . import triton_cross_entropy

    return triton_cross_entropy


def _native_backend() -> ModuleType | None:
    from . import native

    return native if native.available() else None


def forced_choice(variable: str, choices) -> str | None:
    """The choice an environment variable forces (lower case), None when unset; ValueError naming
    the variable for anything else than the choices."""
    forced = os.environ.get(variable, "").strip().lower()
    if forced and forced not in choices:
        raise ValueError(f"{variable}={forced!r}: expected one of {', '.join(choices)}")
    return forced or None


def backend_name(device: torch.device) -> str:
    """Which backend runs tensors on `device`, after EARKIT_BACKEND is taken into account."""
    forced = forced_choice("EARKIT_BACKEND", BACKENDS)
    if forced:
        return forced
    if device.type == "cuda":
        return "triton"
    return "native" if _native_backend() is not None else "reference"


def _backend(device: torch.device) -> ModuleType:
    global _warned_native_missing
    name = backend_name(device)
    if name == "triton":
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(
                f"the triton backend needs CUDA tensors (got {device}) or TRITON_INTERPRET=1 set before import"
            )
        return _triton_backend()
    if name == "native":
        if device.type != "cpu":
            raise RuntimeError(f"the native backend runs on CPU tensors only (got {device})")
        from . import native

        if not native.available():
            raise RuntimeError(f"EARKIT_BACKEND=native but earkit._native is not usable: {native.load_error()}")
        return native
    if device.type == "cpu" and not os.environ.get("EARKIT_BACKEND") and not _warned_native_missing:
        from . import native

        warnings.warn(f"earkit._native is not built ({native.load_error()}); using the slow torch reference")
        _warned_native_missing = True
    return reference


# ---------------------------------------------------------------- validation


def _check_float_tensor(name: str, tensor) -> None:
    if not isinstance(tensor, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{name} has unsupported dtype {tensor.dtype}; expected float32, float16 or bfloat16")
    if tensor.dim() < 1 or tensor.shape[-1] < 1:
        raise ValueError(f"{name} must have a non-empty class dimension last, got shape {tuple(tensor.shape)}")


def _check_finite(name: str, value, allow_none: bool = True) -> Optional[float]:
    if value is None:
        if allow_none:
            return None
        raise ValueError(f"{name} must be a number, got None")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


def _check_common(lead_name: str, lead: Tensor, threshold, window, window_threshold, reduction):
    threshold = _check_finite("threshold", threshold)
    window_threshold = _check_finite("window_threshold", window_threshold)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if window is not None:
        if isinstance(window, bool) or not isinstance(window, int):
            raise ValueError(f"window must be an int, got {type(window).__name__}")
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        if lead.dim() != 3:
            raise ValueError(f"{lead_name} must be (B, T, V) when window is given, got shape {tuple(lead.shape)}")
    elif window_threshold is not None:
        raise ValueError("window_threshold needs window (the number of positions per window)")
    return threshold, window_threshold


def _check_same_layout(name: str, tensor, lead_name: str, lead: Tensor) -> None:
    _check_float_tensor(name, tensor)
    if tensor.shape != lead.shape:
        raise ValueError(f"{name} has shape {tuple(tensor.shape)} but {lead_name} has {tuple(lead.shape)}")
    if tensor.device != lead.device:
        raise ValueError(f"{name} is on {tensor.device} but {lead_name} is on {lead.device}")
    if tensor.dtype != lead.dtype:
        raise ValueError(f"{name} has dtype {tensor.dtype} but {lead_name} has {lead.dtype}")


def _check_ignore_index(ignore_index) -> int:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    # Compared with int64 targets inside the op: a Python int beyond int64 cannot even be passed.
    if not -(2**63) <= ignore_index < 2**63:
        raise ValueError(f"ignore_index must fit in int64 (targets are int64), got {ignore_index}")
    return ignore_index


def _check_target_values(target2d: Tensor, n_classes: int, ignore_index: int) -> None:
    """ValueError naming the first target outside [0, V) that is not ignore_index.

    A data-dependent check, so it lives inside the op, where torch.compile does not trace. CPU
    targets are read through numpy, straight from host memory: no device to wait for, and no
    syncing aten op in the call. CUDA targets are not read on the host by default, since that
    waits for the device on every call (the fused ops' one host sync); there the kernels give a
    bad row a NaN loss instead of reading out of bounds, so the mistake still shows, and
    EARKIT_CHECK_TARGETS=1 turns this synchronous check on for debugging.
    """
    if target2d.device.type == "cpu":
        values = target2d.detach().numpy()
        bad = (values != ignore_index) & ((values < 0) | (values >= n_classes))
        if bad.any():
            raise ValueError(f"target has value {int(values[bad][0])} outside [0, {n_classes}) that is not "
                             f"ignore_index ({ignore_index})")
    elif target2d.device.type == "cuda" and os.environ.get("EARKIT_CHECK_TARGETS") == "1":
        bad = (target2d != ignore_index) & ((target2d < 0) | (target2d >= n_classes))
        if bool(bad.any()):
            raise ValueError(f"target has value {int(target2d[bad][0])} outside [0, {n_classes}) that is not "
                             f"ignore_index ({ignore_index})")


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


def _reduce(loss: Tensor, weight: Tensor, reduction: str, shape) -> Tensor:
    weighted = torch.where(weight != 0, weight * loss, torch.zeros_like(loss))
    if reduction == "none":
        return weighted.reshape(shape)
    total = weighted.sum()
    if reduction == "sum":
        return total
    return total / weight.sum().clamp_min(1.0)


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
) -> tuple[Tensor, Tensor, Tensor]:
    backend = _backend(logits.device)
    rows = _rows(logits)
    target_rows = target.reshape(-1).contiguous()
    _check_target_values(target_rows, rows.shape[1], ignore_index)
    loss, keep, lse = backend.hard_rows(rows, target_rows, ignore_index, threshold)
    weight = _weights(backend, loss, keep, logits.shape, window, window_threshold)
    rows_shape = logits.shape[:-1]
    return _reduce(loss, weight, reduction, rows_shape), weight.reshape(rows_shape), lse.reshape(rows_shape)


@_masked_cross_entropy_op.register_fake
def _(logits, target, threshold, ignore_index, window, window_threshold, reduction, inplace_backward):
    return _fake_outputs(logits, reduction, 2)


@torch.library.custom_op("earkit::masked_cross_entropy_backward", mutates_args=())
def _masked_cross_entropy_backward_op(logits: Tensor, target: Tensor, lse: Tensor, row_scale: Tensor) -> Tensor:
    rows = _rows(logits)
    grad = torch.empty(rows.shape, dtype=logits.dtype, device=logits.device)
    _backend(logits.device).hard_grad(rows, target.reshape(-1).contiguous(), lse.reshape(-1), row_scale, grad)
    return grad.view(logits.shape)


@_masked_cross_entropy_backward_op.register_fake
def _(logits, target, lse, row_scale):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@torch.library.custom_op("earkit::masked_cross_entropy_backward_", mutates_args=("logits",))
def _masked_cross_entropy_backward_inplace_op(logits: Tensor, target: Tensor, lse: Tensor, row_scale: Tensor) -> None:
    rows = _in_place_rows(logits)
    _backend(logits.device).hard_grad(rows, target.reshape(-1).contiguous(), lse.reshape(-1), row_scale, rows)


@_masked_cross_entropy_backward_inplace_op.register_fake
def _(logits, target, lse, row_scale):
    return None


def _masked_setup_context(ctx, inputs, output):
    logits, target, _, _, _, _, reduction, inplace_backward = inputs
    _, weight, lse = output
    ctx.save_for_backward(logits, target, weight, lse)
    ctx.reduction = reduction
    ctx.inplace_backward = inplace_backward
    ctx.mark_non_differentiable(weight, lse)


def _masked_backward(ctx, grad_loss, _grad_weight, _grad_lse):
    logits, target, weight, lse = ctx.saved_tensors
    row_scale = _row_scale(weight.reshape(-1), grad_loss, ctx.reduction)
    if ctx.inplace_backward and _in_place_rows(logits) is not None:
        torch.ops.earkit.masked_cross_entropy_backward_(logits, target, lse, row_scale)
        grad = logits
    else:
        grad = torch.ops.earkit.masked_cross_entropy_backward(logits, target, lse, row_scale)
    return grad, None, None, None, None, None, None, None


_masked_cross_entropy_op.register_autograd(_masked_backward, setup_context=_masked_setup_context)


def masked_cross_entropy(
    logits: Tensor, target: Tensor, *, threshold: float | None = None, ignore_index: int = -100,
    window: int | None = None, window_threshold: float | None = None, reduction: str = "mean",
    inplace_backward: bool = False,
) -> Tensor:
    """Cross-entropy against hard labels with thresholded token masking and windowed gating.

    logits (..., V) in fp32/fp16/bf16 (with `window`: (B, T, V), windows run along T); target
    (...) integer class ids, `ignore_index` rows count for nothing. Tokens with loss <= threshold
    are dropped; with `window` and `window_threshold`, a window whose kept loss sum is
    <= window_threshold is dropped whole. Returns a float32 loss (shape of target for
    reduction="none", else a scalar). With inplace_backward=True the backward writes the
    gradient into the logits buffer, which must not be used afterwards. Where that buffer
    cannot hold one gradient row per row (rows that overlap in memory, as x.expand(N, V) gives,
    or a layout that does not flatten to (N, V) rows with contiguous classes) the backward
    silently writes a fresh buffer instead: the gradient is always right, only the memory
    saving is lost (autograd callers cannot always choose the layout, so this is not an error).
    """
    _check_float_tensor("logits", logits)
    threshold, window_threshold = _check_common("logits", logits, threshold, window, window_threshold, reduction)
    if not isinstance(target, Tensor):
        raise ValueError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        raise ValueError(
            f"target must hold integer class ids, got dtype {target.dtype} (soft targets: guided_cross_entropy)"
        )
    if target.shape != logits.shape[:-1]:
        raise ValueError(f"target has shape {tuple(target.shape)}; expected {tuple(logits.shape[:-1])} (logits without V)")
    if target.device != logits.device:
        raise ValueError(f"target is on {target.device} but logits is on {logits.device}")
    ignore_index = _check_ignore_index(ignore_index)
    loss, _, _ = torch.ops.earkit.masked_cross_entropy(
        logits, target.long(), threshold, ignore_index, window, window_threshold, reduction, bool(inplace_backward)
    )
    return loss


# ---------------------------------------------------------------- guided soft target


@torch.library.custom_op("earkit::guided_cross_entropy", mutates_args=())
def _guided_cross_entropy_op(
    student: Tensor, concept: Tensor, anchor: Tensor, eta: float, threshold: Optional[float],
    window: Optional[int], window_threshold: Optional[float], reduction: str, inplace_backward: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    backend = _backend(student.device)
    loss, keep, lse_student, lse_target = backend.guided_rows(
        _rows(student), _rows(concept), _rows(anchor), eta, threshold
    )
    weight = _weights(backend, loss, keep, student.shape, window, window_threshold)
    rows_shape = student.shape[:-1]
    return (
        _reduce(loss, weight, reduction, rows_shape), weight.reshape(rows_shape),
        lse_student.reshape(rows_shape), lse_target.reshape(rows_shape),
    )


@_guided_cross_entropy_op.register_fake
def _(student, concept, anchor, eta, threshold, window, window_threshold, reduction, inplace_backward):
    return _fake_outputs(student, reduction, 3)


@torch.library.custom_op("earkit::guided_cross_entropy_backward", mutates_args=())
def _guided_cross_entropy_backward_op(
    student: Tensor, concept: Tensor, anchor: Tensor, eta: float,
    lse_student: Tensor, lse_target: Tensor, row_scale: Tensor,
) -> Tensor:
    rows = _rows(student)
    grad = torch.empty(rows.shape, dtype=student.dtype, device=student.device)
    _backend(student.device).guided_grad(
        rows, _rows(concept), _rows(anchor), eta, lse_student.reshape(-1), lse_target.reshape(-1), row_scale, grad
    )
    return grad.view(student.shape)


@_guided_cross_entropy_backward_op.register_fake
def _(student, concept, anchor, eta, lse_student, lse_target, row_scale):
    return torch.empty_like(student, memory_format=torch.contiguous_format)


@torch.library.custom_op("earkit::guided_cross_entropy_backward_", mutates_args=("student",))
def _guided_cross_entropy_backward_inplace_op(
    student: Tensor, concept: Tensor, anchor: Tensor, eta: float,
    lse_student: Tensor, lse_target: Tensor, row_scale: Tensor,
) -> None:
    rows = _in_place_rows(student)
    _backend(student.device).guided_grad(
        rows, _rows(concept), _rows(anchor), eta, lse_student.reshape(-1), lse_target.reshape(-1), row_scale, rows
    )


@_guided_cross_entropy_backward_inplace_op.register_fake
def _(student, concept, anchor, eta, lse_student, lse_target, row_scale):
    return None


def _guided_setup_context(ctx, inputs, output):
    student, concept, anchor, eta, _, _, _, reduction, inplace_backward = inputs
    _, weight, lse_student, lse_target = output
    ctx.save_for_backward(student, concept, anchor, weight, lse_student, lse_target)
    ctx.eta = eta
    ctx.reduction = reduction
    ctx.inplace_backward = inplace_backward
    ctx.mark_non_differentiable(weight, lse_student, lse_target)


def _guided_backward(ctx, grad_loss, _grad_weight, _grad_lse_student, _grad_lse_target):
    student, concept, anchor, weight, lse_student, lse_target = ctx.saved_tensors
    row_scale = _row_scale(weight.reshape(-1), grad_loss, ctx.reduction)
    args = (concept, anchor, ctx.eta, lse_student, lse_target, row_scale)
    if ctx.inplace_backward and _in_place_rows(student) is not None:
        torch.ops.earkit.guided_cross_entropy_backward_(student, *args)
        grad = student
    else:
        grad = torch.ops.earkit.guided_cross_entropy_backward(student, *args)
    # The teacher logits are constants of the objective: they never get a gradient.
    return grad, None, None, None, None, None, None, None, None


_guided_cross_entropy_op.register_autograd(_guided_backward, setup_context=_guided_setup_context)


def guided_cross_entropy(
    student: Tensor, concept: Tensor, anchor: Tensor, *, eta: float = 1.0, threshold: float | None = None,
    window: int | None = None, window_threshold: float | None = None, reduction: str = "mean",
    inplace_backward: bool = False,
) -> Tensor:
    """KL(p || softmax(student)) with p = softmax((1 + eta) anchor - eta concept), masked and windowed.

    The ESD-style negative-guidance objective of EAR: the student is pulled towards the anchor
    (replacement) prompt's logits pushed away from the concept's. All three are (..., V) logits
    of one dtype (with `window`: (B, T, V)); only the student gets a gradient. Threshold, window
    and reduction as in masked_cross_entropy; the loss is 0 where the student already matches.
    inplace_backward=True writes the gradient into the student buffer, with the same fallback
    to a fresh buffer as masked_cross_entropy where the student's rows overlap in memory.
    A target logit (1 + eta) anchor - eta concept of -inf is a class without target mass; one
    of +inf leaves softmax undefined, and that row's loss is NaN (as log_softmax has it).
    """
    _check_float_tensor("student", student)
    _check_same_layout("concept", concept, "student", student)
    _check_same_layout("anchor", anchor, "student", student)
    eta = _check_finite("eta", eta, allow_none=False)
    threshold, window_threshold = _check_common("student", student, threshold, window, window_threshold, reduction)
    loss, _, _, _ = torch.ops.earkit.guided_cross_entropy(
        student, concept.detach(), anchor.detach(), eta, threshold, window, window_threshold, reduction,
        bool(inplace_backward),
    )
    return loss
