"""ctypes binding of earkit._native, the C++ (OpenMP) CPU twin of the loss kernels.

The same five row-level functions as `earkit.kernels.reference` (the spec), with the same
signatures and semantics: CPU tensors in, fp32 tensors out, `out` written in place.

    hard_rows(logits, target, ignore_index, threshold) -> loss, keep, lse
    guided_rows(student, concept, anchor, eta, threshold) -> loss, keep, lse_student, lse_target
    window_weights(loss, keep, seq_len, window, window_threshold) -> weight
    hard_grad(logits, target, lse, row_scale, out)                 # writes out
    guided_grad(student, concept, anchor, eta, lse_student, lse_target, row_scale, out)

`available()` says whether the library loads; `load_error()` says why not. The library is found
through `import earkit._native` (a Python extension module only so that pip installs it) and
opened with ctypes on first use. Arguments are not validated beyond what memory safety needs:
`earkit.kernels.cross_entropy` validates before it calls (targets in [0, V) or ignore_index...).
Logits-like inputs may have strided rows but are copied when their last dimension is not
contiguous. The calls release the GIL and run on as many OpenMP threads as
`torch.get_num_threads()`.

The linear ops' three matmul helpers (linear_weight, linear_logits, linear_target_logits) are
the reference's fp32 torch ones: the BLAS torch links is faster than any GEMM worth writing
here, and the part of those ops that wants fusing (softmax, masks, gradient over a chunk of
logits) is the five functions above.
"""

from __future__ import annotations

import ctypes
import threading

import torch

from .reference import linear_logits, linear_target_logits, linear_weight  # noqa: F401  (BLAS through torch)

__all__ = [
    "available",
    "load_error",
    "hard_rows",
    "guided_rows",
    "window_weights",
    "hard_grad",
    "guided_grad",
    "linear_weight",
    "linear_logits",
    "linear_target_logits",
]

ABI_VERSION = 1

_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_error: str | None = None
_tried = False

_p = ctypes.c_void_p
_i64 = ctypes.c_int64
_int = ctypes.c_int
_f64 = ctypes.c_double

_SIGNATURES = {
    "earkit_abi_version": ([], _int),
    "earkit_max_threads": ([], _int),
    # logits, n, v, stride, dtype, target, ignore_index, has_threshold, threshold,
    # loss, keep, lse, num_threads
    "earkit_hard_rows": ([_p, _i64, _i64, _i64, _int, _p, _i64, _int, _f64, _p, _p, _p, _int], None),
    # student, s_stride, s_dtype, concept, c_stride, c_dtype, anchor, a_stride, a_dtype, n, v, eta,
    # has_threshold, threshold, loss, keep, lse_student, lse_target, num_threads
    "earkit_guided_rows": (
        [_p, _i64, _int, _p, _i64, _int, _p, _i64, _int, _i64, _i64, _f64, _int, _f64, _p, _p, _p, _p, _int],
        None,
    ),
    # loss, keep, n, seq_len, window, has_threshold, window_threshold, out, num_threads
    "earkit_window_weights": ([_p, _p, _i64, _i64, _i64, _int, _f64, _p, _int], None),
    # logits, stride, dtype, target, n, v, lse, row_scale, out, out_stride, out_dtype, num_threads
    "earkit_hard_grad": ([_p, _i64, _int, _p, _i64, _i64, _p, _p, _p, _i64, _int, _int], None),
    # student, s_stride, s_dtype, concept, c_stride, c_dtype, anchor, a_stride, a_dtype, n, v, eta,
    # lse_student, lse_target, row_scale, out, out_stride, out_dtype, num_threads
    "earkit_guided_grad": (
        [_p, _i64, _int, _p, _i64, _int, _p, _i64, _int, _i64, _i64, _f64, _p, _p, _p, _p, _i64, _int, _int],
        None,
    ),
}


def _load() -> ctypes.CDLL | None:
    global _lib, _error, _tried
    if _tried:
        return _lib
    with _lock:
        if _tried:
            return _lib
        try:
            import earkit._native as module

            path = module.__file__
            if not path:
                raise ImportError("earkit._native has no __file__")
            lib = ctypes.CDLL(path)
            for name, (argtypes, restype) in _SIGNATURES.items():
                fn = getattr(lib, name)  # AttributeError: a stale build without this symbol
                fn.argtypes = argtypes
                fn.restype = restype
            version = lib.earkit_abi_version()
            if version != ABI_VERSION:
                raise ImportError(f"ABI version {version}, expected {ABI_VERSION}: rebuild with `pip install -e .`")
            _lib = lib
        except Exception as exc:  # noqa: BLE001 - any failure means "not available", with the reason
            _error = f"{type(exc).__name__}: {exc}"
            _lib = None
        _tried = True
        return _lib


def available() -> bool:
    """True when earkit._native is built and loads with the expected C ABI."""
    return _load() is not None


def load_error() -> str | None:
    """Why the library is not available (None when it is)."""
    _load()
    return _error


def _require() -> ctypes.CDLL:
    lib = _load()
    if lib is None:
        raise RuntimeError(f"earkit native library is not available: {_error}")
    return lib


def _threads() -> int:
    return max(1, torch.get_num_threads())


def _rows(x: torch.Tensor, name: str) -> torch.Tensor:
    """x as a 2-D CPU tensor of a supported dtype with unit stride along its last dimension."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a tensor")
    if x.device.type != "cpu":
        raise ValueError(f"{name} must be a CPU tensor for the native backend (got {x.device})")
    if x.dtype not in _DTYPE_CODES:
        raise ValueError(f"{name} has unsupported dtype {x.dtype} (float32, float16 or bfloat16)")
    if x.dim() != 2:
        x = x.reshape(-1, x.shape[-1])
    if x.shape[1] > 1 and x.stride(1) != 1:
        x = x.contiguous()
    return x


def _vec(x: torch.Tensor, n: int, dtype: torch.dtype, name: str) -> torch.Tensor:
    """x as a contiguous 1-D CPU tensor of n elements of dtype."""
    if x.device.type != "cpu":
        raise ValueError(f"{name} must be a CPU tensor for the native backend (got {x.device})")
    x = x.reshape(-1).to(dtype).contiguous()
    if x.numel() != n:
        raise ValueError(f"{name} has {x.numel()} elements, expected {n}")
    return x


def _has(threshold: float | None) -> tuple[int, float]:
    return (0, 0.0) if threshold is None else (1, float(threshold))


def _fp32(n: int) -> torch.Tensor:
    return torch.empty(n, dtype=torch.float32)


def _outputs(out, n: int, count: int) -> list[torch.Tensor]:
    """The caller's (N,) fp32 vectors to write into (each must be contiguous), else fresh ones."""
    if out is None:
        return [_fp32(n) for _ in range(count)]
    if len(out) != count or any(o.device.type != "cpu" or o.dtype != torch.float32 or o.numel() != n
                                or (n and o.stride(0) != 1) for o in out):
        raise ValueError(f"out must be {count} contiguous float32 CPU vectors of {n}")
    return list(out)


def hard_rows(logits: torch.Tensor, target: torch.Tensor, ignore_index: int, threshold: float | None, out=None,
              grad=None):
    """As reference.hard_rows; `grad` is written by a second pass (hard_grad), the CPU has no
    launch to save."""
    lib = _require()
    z = _rows(logits, "logits")
    n, v = z.shape
    t = _vec(target, n, torch.int64, "target")
    loss, keep, lse = _outputs(out, n, 3)
    if n:
        has, thr = _has(threshold)
        lib.earkit_hard_rows(
            z.data_ptr(), n, v, z.stride(0), _DTYPE_CODES[z.dtype], t.data_ptr(), int(ignore_index), has, thr,
            loss.data_ptr(), keep.data_ptr(), lse.data_ptr(), _threads(),
        )
    if grad is not None:
        hard_grad(z, t, lse, (t != ignore_index).float(), grad)
    return loss, keep, lse


def _guided_inputs(student, concept, anchor):
    s = _rows(student, "student")
    c = _rows(concept, "concept")
    a = c if anchor is None else _rows(anchor, "anchor")  # None: concept holds the target logits
    if c.shape != s.shape or a.shape != s.shape:
        raise ValueError(f"student, concept and anchor shapes differ: {tuple(s.shape)}, {tuple(c.shape)}, {tuple(a.shape)}")
    return s, c, a


def guided_rows(student, concept, anchor, eta: float, threshold: float | None, out=None, grad=None):
    """As reference.guided_rows (anchor=None: concept holds t, read as (1 + 0) t - 0 t = t)."""
    lib = _require()
    s, c, a = _guided_inputs(student, concept, anchor)
    eta = 0.0 if anchor is None else eta
    n, v = s.shape
    loss, keep, lse_s, lse_t = _outputs(out, n, 4)
    if n:
        has, thr = _has(threshold)
        lib.earkit_guided_rows(
            s.data_ptr(), s.stride(0), _DTYPE_CODES[s.dtype],
            c.data_ptr(), c.stride(0), _DTYPE_CODES[c.dtype],
            a.data_ptr(), a.stride(0), _DTYPE_CODES[a.dtype],
            n, v, float(eta), has, thr,
            loss.data_ptr(), keep.data_ptr(), lse_s.data_ptr(), lse_t.data_ptr(), _threads(),
        )
    if grad is not None:
        guided_grad(s, c, a, eta, lse_s, lse_t, torch.ones_like(loss), grad)
    return loss, keep, lse_s, lse_t


def window_weights(loss, keep, seq_len: int, window: int, window_threshold: float | None, out=None):
    """a_i = m_i * G_w(i), where windows of `window` rows run along each sequence of seq_len rows;
    into `out` when given (contiguous fp32; may be keep itself: each window is summed before it
    is written)."""
    n = loss.numel()
    if window_threshold is None or n == 0:
        if out is not None and out is not keep:
            out.copy_(keep)
        return keep if out is None else out  # the token mask is the weight (no rows: seq_len may be 0)
    lib = _require()
    l = _vec(loss, n, torch.float32, "loss")
    k = _vec(keep, n, torch.float32, "keep")
    if int(seq_len) < 1 or int(window) < 1:
        raise ValueError(f"seq_len and window must be >= 1 (got {seq_len}, {window})")
    if out is None:
        out = torch.empty_like(k)
    elif out.dtype != torch.float32 or out.numel() != n or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous float32 vector of {n}")
    if n:
        lib.earkit_window_weights(
            l.data_ptr(), k.data_ptr(), n, int(seq_len), int(window), 1, float(window_threshold), out.data_ptr(),
            _threads(),
        )
    return out


def _out_target(out: torch.Tensor, shape: torch.Size) -> tuple[torch.Tensor, bool]:
    """The (N, V) tensor the C code writes into, and whether it is a temporary to copy into out."""
    if not isinstance(out, torch.Tensor):
        raise TypeError("out must be a tensor")
    if out.device.type != "cpu":
        raise ValueError(f"out must be a CPU tensor for the native backend (got {out.device})")
    n, v = shape
    if out.numel() != n * v or (out.dim() == 2 and tuple(out.shape) != (n, v)):
        raise ValueError(f"out has shape {tuple(out.shape)}, expected {(n, v)}")
    o = out
    if out.dim() != 2:
        try:
            o = out.view(n, v)
        except RuntimeError:
            o = None
    if o is None or o.dtype not in _DTYPE_CODES or (v > 1 and o.stride(1) != 1):
        dtype = out.dtype if out.dtype in _DTYPE_CODES else torch.float32
        return torch.empty((n, v), dtype=dtype), True
    return o, False


def hard_grad(logits, target, lse, row_scale, out) -> None:
    lib = _require()
    z = _rows(logits, "logits")
    n, v = z.shape
    t = _vec(target, n, torch.int64, "target")
    l = _vec(lse, n, torch.float32, "lse")
    r = _vec(row_scale, n, torch.float32, "row_scale")
    o, temporary = _out_target(out, z.shape)
    if n:
        lib.earkit_hard_grad(
            z.data_ptr(), z.stride(0), _DTYPE_CODES[z.dtype], t.data_ptr(), n, v, l.data_ptr(), r.data_ptr(),
            o.data_ptr(), o.stride(0), _DTYPE_CODES[o.dtype], _threads(),
        )
    if temporary:
        out.copy_(o.view(out.shape))


def guided_grad(student, concept, anchor, eta: float, lse_student, lse_target, row_scale, out) -> None:
    lib = _require()
    s, c, a = _guided_inputs(student, concept, anchor)
    eta = 0.0 if anchor is None else eta
    n, v = s.shape
    ls = _vec(lse_student, n, torch.float32, "lse_student")
    lt = _vec(lse_target, n, torch.float32, "lse_target")
    r = _vec(row_scale, n, torch.float32, "row_scale")
    o, temporary = _out_target(out, s.shape)
    if n:
        lib.earkit_guided_grad(
            s.data_ptr(), s.stride(0), _DTYPE_CODES[s.dtype],
            c.data_ptr(), c.stride(0), _DTYPE_CODES[c.dtype],
            a.data_ptr(), a.stride(0), _DTYPE_CODES[a.dtype],
            n, v, float(eta), ls.data_ptr(), lt.data_ptr(), r.data_ptr(),
            o.data_ptr(), o.stride(0), _DTYPE_CODES[o.dtype], _threads(),
        )
    if temporary:
        out.copy_(o.view(out.shape))
