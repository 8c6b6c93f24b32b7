"""What the loss ops of cross_entropy.py and linear_cross_entropy.py share: the backend choice, the
argument checks of their public functions, and the reduction of weighted per-token losses.

Private to earkit.kernels; `backend_name` is public as earkit.kernels.backend_name.
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


def check_backend(backend) -> Optional[str]:
    """The `backend=` argument of the public ops: None (automatic) or one of BACKENDS."""
    if backend is not None and (not isinstance(backend, str) or backend not in BACKENDS):
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)} or None (automatic), got {backend!r}")
    return backend


def backend_name(device: torch.device, backend: Optional[str] = None) -> str:
    """Which backend runs tensors on `device`. Precedence: EARKIT_BACKEND when set (it overrides
    everything, the `backend=` argument included), then `backend` when given, then automatic:
    triton for CUDA tensors, native for CPU tensors where earkit._native is built, else reference."""
    forced = forced_choice("EARKIT_BACKEND", BACKENDS)
    if forced:
        return forced
    if check_backend(backend):
        return backend
    if device.type == "cuda":
        return "triton"
    return "native" if _native_backend() is not None else "reference"


def backend_module(device: torch.device, backend: Optional[str] = None) -> ModuleType:
    """The module whose row functions run tensors on `device` (see backend_name)."""
    global _warned_native_missing
    name = backend_name(device, backend)
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
            raise RuntimeError(f"the native backend was asked for but earkit._native is not usable: "
                               f"{native.load_error()}")
        return native
    automatic = backend is None and not os.environ.get("EARKIT_BACKEND")
    if device.type == "cpu" and automatic and not _warned_native_missing:
        from . import native

        warnings.warn(f"earkit._native is not built ({native.load_error()}); using the slow torch reference")
        _warned_native_missing = True
    return reference


# ---------------------------------------------------------------- validation


def check_float_tensor(name: str, tensor) -> None:
    if not isinstance(tensor, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{name} has unsupported dtype {tensor.dtype}; expected float32, float16 or bfloat16")
    if tensor.dim() < 1 or tensor.shape[-1] < 1:
        raise ValueError(f"{name} must have a non-empty class dimension last, got shape {tuple(tensor.shape)}")


def check_finite(name: str, value, allow_none: bool = True) -> Optional[float]:
    if value is None:
        if allow_none:
            return None
        raise ValueError(f"{name} must be a number, got None")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


def check_common(lead_name: str, lead: Tensor, threshold, window, window_threshold, reduction):
    threshold = check_finite("threshold", threshold)
    window_threshold = check_finite("window_threshold", window_threshold)
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


def check_same_layout(name: str, tensor, lead_name: str, lead: Tensor) -> None:
    check_float_tensor(name, tensor)
    if tensor.shape != lead.shape:
        raise ValueError(f"{name} has shape {tuple(tensor.shape)} but {lead_name} has {tuple(lead.shape)}")
    if tensor.device != lead.device:
        raise ValueError(f"{name} is on {tensor.device} but {lead_name} is on {lead.device}")
    if tensor.dtype != lead.dtype:
        raise ValueError(f"{name} has dtype {tensor.dtype} but {lead_name} has {lead.dtype}")


def check_ignore_index(ignore_index) -> int:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    # Compared with int64 targets inside the op: a Python int beyond int64 cannot even be passed.
    if not -(2**63) <= ignore_index < 2**63:
        raise ValueError(f"ignore_index must fit in int64 (targets are int64), got {ignore_index}")
    return ignore_index


def check_target(target, lead_name: str, lead: Tensor, extra: str = "") -> None:
    """target: integer class ids of lead's shape without its last dimension, on lead's device."""
    if not isinstance(target, Tensor):
        raise ValueError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        raise ValueError(f"target must hold integer class ids, got dtype {target.dtype}{extra}")
    if target.shape != lead.shape[:-1]:
        raise ValueError(f"target has shape {tuple(target.shape)}; expected {tuple(lead.shape[:-1])} "
                         f"({lead_name} without its last dimension)")
    if target.device != lead.device:
        raise ValueError(f"target is on {target.device} but {lead_name} is on {lead.device}")


def check_target_values(target2d: Tensor, n_classes: int, ignore_index: int) -> None:
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



# ---------------------------------------------------------------- reduction


def reduce_loss(loss: Tensor, weight: Tensor, reduction: str, shape) -> Tensor:
    weighted = torch.where(weight != 0, weight * loss, torch.zeros_like(loss))
    if reduction == "none":
        return weighted.reshape(shape)
    total = weighted.sum()
    if reduction == "sum":
        return total
    return total / weight.sum().clamp_min(1.0)
