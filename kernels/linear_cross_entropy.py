"""The fused linear + loss ops: the head's last Linear and the loss, without the N x V logits.

    linear_masked_cross_entropy(hidden, weight, target, bias=None, ...)
        = masked_cross_entropy(hidden @ weight.T + bias, target, ...)
    linear_guided_cross_entropy(h_student, h_concept, h_anchor, weight, bias=None, ...)
        = guided_cross_entropy(h_s W^T + b, h_c W^T + b, h_a W^T + b, ...)

How, per chunk of C rows (C ~ 512 on a GPU, 256 on a CPU; whole sequences when windowed, so
every window lies in one chunk):
  1. the chunk's logits in fp32 (guided: the student's, and the target's t = (1 + eta) z_a -
     eta z_c from one kernel with both teacher products combined in registers);
  2. the backend's row kernels: online softmax, loss, token threshold, then the window gate;
  3. the gradient of the chunk's rows, a_i (softmax - onehot) (or - p_i), written over the
     logits (or into a half-precision copy for the tensor cores), and multiplied into
     d hidden = G W, and d weight += G^T h, d bias += sum G only when those require grad.
One C x V buffer (two for the guided loss) is reused for the whole call: no N x V tensor is
ever written, and d weight accumulates chunk after chunk in fp32, in a fixed order, with no
atomics: the result is deterministic.

Why the gradient is computed in the forward: it costs 2NHV flops once, whereas waiting for the
backward means computing the logits a second time (another 2NHV, 4NHV for the guided target).
The gradient's only unknown at forward time is the upstream gradient g and the mean's
normaliser, and d hidden row i depends on row i alone, so the forward stores the unscaled
d hidden and the backward multiplies row i by g_i (or g / sum a). d weight sums over rows: for
a scalar upstream ("mean", "sum") it is scaled the same way; for reduction="none" the
backward recomputes it chunk by chunk with the per-row upstream gradient.

The backends are those of the logits-level ops (chosen in _shared.py): Triton (the row kernels of
triton_cross_entropy.py, the logits kernel of triton_linear_cross_entropy.py, cuBLAS for the
gradient products), the native C++ twin (its row kernels, fp32 BLAS through torch for the
products), the pure-torch reference. `inplace_backward` is accepted for the contract's sake and
changes nothing: there is no logits buffer of the caller's to reuse.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Optional

import torch
from torch import Tensor

from ._shared import (backend_module, check_backend, check_common, check_finite, check_float_tensor,
                      check_ignore_index, check_same_layout, check_target, check_target_values, reduce_loss)

# Rows per chunk, from a memory budget: the chunk's fp32 logits (two buffers for the guided loss)
# plus its half-precision gradient must fit in it. 112 MiB on a GPU gives 1152 rows at V = 16384
# for the hard loss (the GEMMs stay wide, N = 9216 is 8 even chunks, and with d hidden's N x H
# the op stays under 200 MB at H = 4096). On a CPU the GEMMs decide too: at N = 1152, H = 512,
# V = 16384 (2 cores, AVX512-BF16) 8 MiB chunks (83-128 rows) made thin GEMMs and the op 1.2-1.7x
# slower than eager; 32 MiB (340-512 rows) runs hard 254 ms and guided 424 ms in bf16 against
# eager's 237-277 and 590-690, and 64-128 MiB gains little more. Tests force tiny chunks.
CHUNK_BYTES = {"cuda": 112 << 20, "cpu": 32 << 20}
force_chunk_rows: int | None = None


def _linear_backend(device: torch.device, backend: Optional[str]) -> SimpleNamespace:
    """The row functions of the logits-level backend plus its three matmul helpers."""
    rows = backend_module(device, backend)
    if rows.__name__.endswith("triton_cross_entropy"):
        from . import triton_linear_cross_entropy as products
    else:
        products = rows  # native re-exports the reference's fp32 torch helpers
    return SimpleNamespace(
        hard_rows=rows.hard_rows, guided_rows=rows.guided_rows, window_weights=rows.window_weights,
        hard_grad=rows.hard_grad, guided_grad=rows.guided_grad,
        linear_weight=products.linear_weight, linear_logits=products.linear_logits,
        linear_target_logits=products.linear_target_logits,
    )


def _chunk_rows(n_rows: int, seq_len: Optional[int], device: torch.device, bytes_per_row: int) -> int:
    """Rows per chunk: as many as the budget holds, then spread evenly over the chunks that takes
    (9216 rows at most 1194 a chunk: 8 chunks of 1152, not 7 of 1194 and a ragged 858)."""
    if force_chunk_rows:
        wanted = force_chunk_rows
    else:
        wanted = max(1, CHUNK_BYTES.get(device.type, CHUNK_BYTES["cuda"]) // max(1, bytes_per_row))
        wanted = -(-n_rows // max(1, -(-n_rows // wanted))) if n_rows else 1
    if seq_len:  # windowed: whole sequences, so the gate sees every window whole (T = 0: no rows at all)
        wanted = seq_len * max(1, wanted // seq_len)
    return max(1, min(wanted, n_rows))


def _mm_into_fp32(accumulator: Tensor, a: Tensor, b: Tensor) -> None:
    """accumulator (fp32) += a @ b with fp32 accumulation and no rounding of the product."""
    if a.dtype == torch.float32 and b.dtype == torch.float32:
        accumulator.addmm_(a, b)
    elif a.is_cuda:
        accumulator.add_(torch.mm(a, b, out_dtype=torch.float32))
    else:
        accumulator.addmm_(a.float(), b.float())


class _GradientSink:
    """Where each chunk's logits gradient G goes: d hidden rows, d weight, d bias.

    In the forward G is unscaled (softmax - target for every row, zero only where ignored): the
    per-row weights a_i are known per window only once the chunk's rows are done, and applying
    them to d hidden (N x H) at the end is cheaper than to G (N x V). d weight and d bias sum over
    rows, so their share of a_i goes in here: G^T (a * h) and G^T a (a_i is 0 or 1, exact in any
    dtype). The backward's recompute (reduction "none") hands in G already scaled: row_weight None.
    """

    def __init__(self, hidden_rows: Tensor, head_weight: Tensor, n_cols: int, need_hidden: bool, need_weight: bool,
                 need_bias: bool):
        n_rows, n_inner = hidden_rows.shape
        device = hidden_rows.device
        self.head_weight = head_weight  # as given: d hidden = G W runs in the head's own dtype
        self.hidden = torch.empty((n_rows, n_inner), dtype=hidden_rows.dtype, device=device) if need_hidden else None
        self.weight = torch.zeros((n_cols, n_inner), dtype=torch.float32, device=device) if need_weight else None
        self.bias = torch.zeros(n_cols, dtype=torch.float32, device=device) if need_bias else None

    @property
    def active(self) -> bool:
        return self.hidden is not None or self.weight is not None or self.bias is not None

    def add(self, grad: Tensor, hidden_chunk: Tensor, start: int, end: int, row_weight: Tensor | None) -> None:
        if self.hidden is not None:
            if self.hidden.dtype == grad.dtype:
                torch.mm(grad, self.head_weight, out=self.hidden[start:end])
            else:
                self.hidden[start:end] = torch.mm(grad, self.head_weight)
        if self.weight is not None:
            rows = hidden_chunk if row_weight is None else hidden_chunk * row_weight[:, None].to(hidden_chunk.dtype)
            _mm_into_fp32(self.weight, grad.t(), rows)
        if self.bias is not None:
            if row_weight is None:
                self.bias += grad.sum(0, dtype=torch.float32)
            else:
                _mm_into_fp32(self.bias[:, None], grad.t(), row_weight[:, None].to(grad.dtype))

    def outputs(self, like: Tensor, hidden_shape) -> tuple[Tensor, Tensor, Tensor]:
        # Custom-op outputs must not alias each other: a fresh empty tensor for each one absent.
        return (
            self.hidden.view(hidden_shape) if self.hidden is not None else like.new_empty(0),
            self.weight if self.weight is not None else like.new_empty(0, dtype=torch.float32),
            self.bias if self.bias is not None else like.new_empty(0, dtype=torch.float32),
        )


def _buffers(rows: int, n_cols: int, hidden: Tensor, head_weight: Tensor, count: int, need_grad: bool):
    """`count` fp32 logits buffers of rows x V, and the buffer the gradient goes into: the first
    logits buffer itself for an fp32 head, else one in the head's half precision, so that d hidden
    = G W runs as a half-precision GEMM (tensor cores on a GPU; on a CPU with AVX512-BF16, 2.7x
    an fp32 GEMM) with fp32 accumulation, G rounded once as torch's own half backward rounds it."""
    logits = [torch.empty((rows, n_cols), dtype=torch.float32, device=hidden.device) for _ in range(count)]
    grad = None
    if need_grad:
        grad = logits[0] if head_weight.dtype == torch.float32 else torch.empty(
            (rows, n_cols), dtype=head_weight.dtype, device=hidden.device)
    return logits, grad


def _bytes_per_row(n_cols: int, logits_buffers: int, head_weight: Tensor, need_grad: bool) -> int:
    grad_bytes = head_weight.element_size() if need_grad and head_weight.dtype != torch.float32 else 0
    return n_cols * (4 * logits_buffers + grad_bytes)


def _gate(backend, loss_c, weights_c, seq_len, window, window_threshold) -> None:
    """The window gate over a chunk of whole sequences, in place: weights_c holds the token mask
    m_i and leaves holding a_i = m_i G_w(i)."""
    if window is not None and window_threshold is not None:
        backend.window_weights(loss_c, weights_c, seq_len, window, window_threshold, out=weights_c)


def _hard_chunks(hidden, weight, bias, target, ignore_index, threshold, window, window_threshold,
                 need_hidden, need_weight, need_bias, row_scale=None, backend=None):
    """Steps 1-3 over every chunk. With row_scale given (the backward's recompute), the gradient
    uses it instead of the weights a_i and the loss outputs are not wanted."""
    backend = _linear_backend(hidden.device, backend)
    hidden_rows = hidden.reshape(-1, hidden.shape[-1])
    target_rows = target.reshape(-1).contiguous()
    n_rows, n_cols = hidden_rows.shape[0], weight.shape[0]
    check_target_values(target_rows, n_cols, ignore_index)
    weight_mm = backend.linear_weight(weight)
    sink = _GradientSink(hidden_rows, weight, n_cols, need_hidden, need_weight, need_bias)
    loss, weights, lse = (torch.empty(n_rows, dtype=torch.float32, device=hidden.device) for _ in range(3))
    seq_len = hidden.shape[1] if window is not None else None
    chunk = _chunk_rows(n_rows, seq_len, hidden.device, _bytes_per_row(n_cols, 1, weight, sink.active))
    (logits,), grad = _buffers(chunk, n_cols, hidden, weight, 1, sink.active)
    for start in range(0, n_rows, chunk):
        end = min(start + chunk, n_rows)
        h, z, y = hidden_rows[start:end], logits[: end - start], target_rows[start:end]
        g = grad[: end - start] if sink.active else None
        backend.linear_logits(h, weight_mm, bias, z)
        if row_scale is None:
            # loss, keep and lse straight into the call's vectors, the unscaled gradient into g
            outputs = (loss[start:end], weights[start:end], lse[start:end])
            backend.hard_rows(z, y, ignore_index, threshold, out=outputs, grad=g)
            _gate(backend, outputs[0], outputs[1], seq_len, window, window_threshold)
            if sink.active:
                sink.add(g, h, start, end, row_weight=weights[start:end])
        elif sink.active:
            backend.hard_grad(z, y, row_scale[1][start:end], row_scale[0][start:end].contiguous(), g)
            sink.add(g, h, start, end, row_weight=None)
    return loss, weights, lse, sink


def _guided_chunks(h_student, h_concept, h_anchor, weight, bias, eta, threshold, window, window_threshold,
                   need_hidden, need_weight, need_bias, row_scale=None, backend=None):
    backend = _linear_backend(h_student.device, backend)
    n_inner = h_student.shape[-1]
    s_rows, c_rows, a_rows = (x.reshape(-1, n_inner) for x in (h_student, h_concept, h_anchor))
    n_rows, n_cols = s_rows.shape[0], weight.shape[0]
    weight_mm = backend.linear_weight(weight)
    sink = _GradientSink(s_rows, weight, n_cols, need_hidden, need_weight, need_bias)
    loss, weights, lse_student, lse_target = (
        torch.empty(n_rows, dtype=torch.float32, device=h_student.device) for _ in range(4))
    seq_len = h_student.shape[1] if window is not None else None
    chunk = _chunk_rows(n_rows, seq_len, h_student.device, _bytes_per_row(n_cols, 2, weight, sink.active))
    (student, target), grad = _buffers(chunk, n_cols, h_student, weight, 2, sink.active)
    for start in range(0, n_rows, chunk):
        end = min(start + chunk, n_rows)
        s, t = student[: end - start], target[: end - start]
        g = grad[: end - start] if sink.active else None
        # The target first: the student's buffer is free until its own logits go in (cuBLAS
        # puts the concept's product there before the two are combined).
        backend.linear_target_logits(c_rows[start:end], a_rows[start:end], weight_mm, bias, eta, t, scratch=s)
        backend.linear_logits(s_rows[start:end], weight_mm, bias, s)
        # anchor=None: the row kernels read the target logits t as they are (one stream, not two).
        if row_scale is None:
            outputs = (loss[start:end], weights[start:end], lse_student[start:end], lse_target[start:end])
            backend.guided_rows(s, t, None, 0.0, threshold, out=outputs, grad=g)
            _gate(backend, outputs[0], outputs[1], seq_len, window, window_threshold)
            if sink.active:
                sink.add(g, s_rows[start:end], start, end, row_weight=weights[start:end])
        elif sink.active:
            scale_c, lse_s, lse_t = (x[start:end] for x in row_scale)
            backend.guided_grad(s, t, None, 0.0, lse_s, lse_t, scale_c.contiguous(), g)
            sink.add(g, s_rows[start:end], start, end, row_weight=None)
    return loss, weights, lse_student, lse_target, sink


# ---------------------------------------------------------------- backward pieces shared by both ops


def _upstream_factor(weight: Tensor, grad_loss: Tensor, reduction: str) -> Tensor:
    """What the forward's unscaled gradient (a_i times softmax - target) still needs: the
    upstream gradient, over the mean's count. Per row for "none", else a scalar."""
    grad_loss = grad_loss.float()
    if reduction == "none":
        return grad_loss.reshape(-1)
    if reduction == "mean":
        return grad_loss / weight.sum().clamp_min(1.0)
    return grad_loss


@torch.library.custom_op("earkit::scale_rows", mutates_args=())
def _scale_rows(rows: Tensor, scale: Tensor) -> Tensor:
    """rows (N, H) times scale (N,), each product in fp32 and written once in the rows' dtype: a
    few thousand rows a launch, no N x H fp32 copy. A custom op so that torch.compile keeps the
    out= writes into slices as they are (traced, they were lost: the result stayed uninitialised)."""
    out = torch.empty_like(rows)
    chunk = 4096
    for start in range(0, rows.shape[0], chunk):
        end = min(start + chunk, rows.shape[0])
        torch.mul(rows[start:end], scale[start:end, None], out=out[start:end])
    return out


@_scale_rows.register_fake
def _(rows, scale):
    return torch.empty_like(rows)


def _scaled_hidden_grad(grad_hidden: Tensor, factor: Tensor, row_weight: Tensor, hidden: Tensor) -> Tensor:
    """d hidden = the forward's unscaled rows times a_i times the upstream factor (per row or
    scalar), in the hidden's dtype."""
    rows = grad_hidden.reshape(-1, grad_hidden.shape[-1])
    scale = (row_weight.reshape(-1) * factor).contiguous()  # (N,) fp32: a_i g_i, or a_i g / sum a
    return torch.ops.earkit.scale_rows(rows, scale).view(hidden.shape)


def _fake_linear_outputs(hidden, weight, reduction, n_row_vectors, need_hidden, need_weight, need_bias):
    rows_shape = hidden.shape[:-1]
    n_cols, n_inner = weight.shape
    loss = hidden.new_empty(rows_shape if reduction == "none" else (), dtype=torch.float32)
    vectors = tuple(hidden.new_empty(rows_shape, dtype=torch.float32) for _ in range(n_row_vectors))
    forward_weight = reduction != "none"
    return (loss,) + vectors + (
        hidden.new_empty(hidden.shape) if need_hidden else hidden.new_empty(0),
        hidden.new_empty((n_cols, n_inner), dtype=torch.float32) if need_weight and forward_weight
        else hidden.new_empty(0, dtype=torch.float32),
        hidden.new_empty(n_cols, dtype=torch.float32) if need_bias and forward_weight
        else hidden.new_empty(0, dtype=torch.float32),
    )


def _weight_grads(ctx, grad_weight, grad_bias, factor):
    """The final d weight and d bias from the forward's fp32 sums (scalar upstream)."""
    weight_dtype = ctx.weight_dtype
    dw = (grad_weight * factor).to(weight_dtype) if ctx.need_weight_grad else None
    db = (grad_bias * factor).to(ctx.bias_dtype) if ctx.need_bias_grad else None
    return dw, db


# ---------------------------------------------------------------- hard labels


@torch.library.custom_op("earkit::linear_masked_cross_entropy", mutates_args=())
def _linear_masked_op(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, threshold: Optional[float],
    ignore_index: int, window: Optional[int], window_threshold: Optional[float], reduction: str,
    need_hidden_grad: bool, need_weight_grad: bool, need_bias_grad: bool, backend: Optional[str] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    # d weight needs the per-row upstream gradient for reduction="none": the backward does it.
    forward_weight = reduction != "none"
    loss, weights, lse, sink = _hard_chunks(
        hidden, weight, bias, target, ignore_index, threshold, window, window_threshold,
        need_hidden_grad, need_weight_grad and forward_weight, need_bias_grad and forward_weight, backend=backend,
    )
    rows_shape = hidden.shape[:-1]
    return (reduce_loss(loss, weights, reduction, rows_shape), weights.reshape(rows_shape), lse.reshape(rows_shape),
            *sink.outputs(hidden, hidden.shape))


@_linear_masked_op.register_fake
def _(hidden, weight, bias, target, threshold, ignore_index, window, window_threshold, reduction,
      need_hidden_grad, need_weight_grad, need_bias_grad, backend=None):
    return _fake_linear_outputs(hidden, weight, reduction, 2, need_hidden_grad, need_weight_grad, need_bias_grad)


@torch.library.custom_op("earkit::linear_masked_cross_entropy_weight_backward", mutates_args=())
def _linear_masked_weight_backward_op(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, ignore_index: int, lse: Tensor,
    row_scale: Tensor, need_weight_grad: bool, need_bias_grad: bool, backend: Optional[str] = None,
) -> tuple[Tensor, Tensor]:
    _, _, _, sink = _hard_chunks(hidden, weight, bias, target, ignore_index, None, None, None, False,
                                 need_weight_grad, need_bias_grad, row_scale=(row_scale, lse.reshape(-1)),
                                 backend=backend)
    _, dw, db = sink.outputs(hidden, hidden.shape)
    return dw, db


@_linear_masked_weight_backward_op.register_fake
def _(hidden, weight, bias, target, ignore_index, lse, row_scale, need_weight_grad, need_bias_grad, backend=None):
    n_cols, n_inner = weight.shape
    return (hidden.new_empty((n_cols, n_inner) if need_weight_grad else 0, dtype=torch.float32),
            hidden.new_empty(n_cols if need_bias_grad else 0, dtype=torch.float32))


def _linear_masked_setup_context(ctx, inputs, output):
    (hidden, weight, bias, target, _, ignore_index, _, _, reduction, need_hidden_grad, need_weight_grad,
     need_bias_grad, backend) = inputs
    _, weights, lse, grad_hidden, grad_weight, grad_bias = output
    ctx.save_for_backward(hidden, weight, bias, target, weights, lse, grad_hidden, grad_weight, grad_bias)
    ctx.ignore_index, ctx.reduction, ctx.backend = ignore_index, reduction, backend
    ctx.need_hidden_grad, ctx.need_weight_grad, ctx.need_bias_grad = need_hidden_grad, need_weight_grad, need_bias_grad
    ctx.weight_dtype = weight.dtype
    ctx.bias_dtype = bias.dtype if bias is not None else weight.dtype
    ctx.mark_non_differentiable(weights, lse, grad_hidden, grad_weight, grad_bias)
    # No zero gradients made for the outputs no one differentiates (d hidden's N x H among them).
    ctx.set_materialize_grads(False)


def _linear_masked_backward(ctx, grad_loss, *_unused):
    if grad_loss is None:
        return (None,) * 13
    hidden, weight, bias, target, weights, lse, grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
    factor = _upstream_factor(weights.reshape(-1), grad_loss, ctx.reduction)
    dh = _scaled_hidden_grad(grad_hidden, factor, weights, hidden) if ctx.need_hidden_grad else None
    if ctx.reduction == "none" and (ctx.need_weight_grad or ctx.need_bias_grad):
        grad_weight, grad_bias = torch.ops.earkit.linear_masked_cross_entropy_weight_backward(
            hidden, weight, bias, target, ctx.ignore_index, lse, (weights.reshape(-1) * factor).contiguous(),
            ctx.need_weight_grad, ctx.need_bias_grad, ctx.backend)
        factor = torch.ones((), device=hidden.device)
    dw, db = _weight_grads(ctx, grad_weight, grad_bias, factor)
    return dh, dw, db, None, None, None, None, None, None, None, None, None, None


_linear_masked_op.register_autograd(_linear_masked_backward, setup_context=_linear_masked_setup_context)


# ---------------------------------------------------------------- guided soft target


@torch.library.custom_op("earkit::linear_guided_cross_entropy", mutates_args=())
def _linear_guided_op(
    h_student: Tensor, h_concept: Tensor, h_anchor: Tensor, weight: Tensor, bias: Optional[Tensor], eta: float,
    threshold: Optional[float], window: Optional[int], window_threshold: Optional[float], reduction: str,
    need_hidden_grad: bool, need_weight_grad: bool, need_bias_grad: bool, backend: Optional[str] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    forward_weight = reduction != "none"
    loss, weights, lse_student, lse_target, sink = _guided_chunks(
        h_student, h_concept, h_anchor, weight, bias, eta, threshold, window, window_threshold,
        need_hidden_grad, need_weight_grad and forward_weight, need_bias_grad and forward_weight, backend=backend,
    )
    rows_shape = h_student.shape[:-1]
    return (reduce_loss(loss, weights, reduction, rows_shape), weights.reshape(rows_shape),
            lse_student.reshape(rows_shape), lse_target.reshape(rows_shape), *sink.outputs(h_student, h_student.shape))


@_linear_guided_op.register_fake
def _(h_student, h_concept, h_anchor, weight, bias, eta, threshold, window, window_threshold, reduction,
      need_hidden_grad, need_weight_grad, need_bias_grad, backend=None):
    return _fake_linear_outputs(h_student, weight, reduction, 3, need_hidden_grad, need_weight_grad, need_bias_grad)


@torch.library.custom_op("earkit::linear_guided_cross_entropy_weight_backward", mutates_args=())
def _linear_guided_weight_backward_op(
    h_student: Tensor, h_concept: Tensor, h_anchor: Tensor, weight: Tensor, bias: Optional[Tensor], eta: float,
    lse_student: Tensor, lse_target: Tensor, row_scale: Tensor, need_weight_grad: bool, need_bias_grad: bool,
    backend: Optional[str] = None,
) -> tuple[Tensor, Tensor]:
    *_, sink = _guided_chunks(h_student, h_concept, h_anchor, weight, bias, eta, None, None, None, False,
                              need_weight_grad, need_bias_grad,
                              row_scale=(row_scale, lse_student.reshape(-1), lse_target.reshape(-1)), backend=backend)
    _, dw, db = sink.outputs(h_student, h_student.shape)
    return dw, db


@_linear_guided_weight_backward_op.register_fake
def _(h_student, h_concept, h_anchor, weight, bias, eta, lse_student, lse_target, row_scale, need_weight_grad,
      need_bias_grad, backend=None):
    n_cols, n_inner = weight.shape
    return (h_student.new_empty((n_cols, n_inner) if need_weight_grad else 0, dtype=torch.float32),
            h_student.new_empty(n_cols if need_bias_grad else 0, dtype=torch.float32))


def _linear_guided_setup_context(ctx, inputs, output):
    (h_student, h_concept, h_anchor, weight, bias, eta, _, _, _, reduction, need_hidden_grad, need_weight_grad,
     need_bias_grad, backend) = inputs
    _, weights, lse_student, lse_target, grad_hidden, grad_weight, grad_bias = output
    ctx.save_for_backward(h_student, h_concept, h_anchor, weight, bias, weights, lse_student, lse_target,
                          grad_hidden, grad_weight, grad_bias)
    ctx.eta, ctx.reduction, ctx.backend = eta, reduction, backend
    ctx.need_hidden_grad, ctx.need_weight_grad, ctx.need_bias_grad = need_hidden_grad, need_weight_grad, need_bias_grad
    ctx.weight_dtype = weight.dtype
    ctx.bias_dtype = bias.dtype if bias is not None else weight.dtype
    ctx.mark_non_differentiable(weights, lse_student, lse_target, grad_hidden, grad_weight, grad_bias)
    # No zero gradients made for the outputs no one differentiates (d hidden's N x H among them).
    ctx.set_materialize_grads(False)


def _linear_guided_backward(ctx, grad_loss, *_unused):
    if grad_loss is None:
        return (None,) * 14
    (h_student, h_concept, h_anchor, weight, bias, weights, lse_student, lse_target, grad_hidden, grad_weight,
     grad_bias) = ctx.saved_tensors
    factor = _upstream_factor(weights.reshape(-1), grad_loss, ctx.reduction)
    dh = _scaled_hidden_grad(grad_hidden, factor, weights, h_student) if ctx.need_hidden_grad else None
    if ctx.reduction == "none" and (ctx.need_weight_grad or ctx.need_bias_grad):
        grad_weight, grad_bias = torch.ops.earkit.linear_guided_cross_entropy_weight_backward(
            h_student, h_concept, h_anchor, weight, bias, ctx.eta, lse_student, lse_target,
            (weights.reshape(-1) * factor).contiguous(), ctx.need_weight_grad, ctx.need_bias_grad, ctx.backend)
        factor = torch.ones((), device=h_student.device)
    dw, db = _weight_grads(ctx, grad_weight, grad_bias, factor)
    # The teachers' hidden states are constants of the objective: they never get a gradient.
    return dh, None, None, dw, db, None, None, None, None, None, None, None, None, None


_linear_guided_op.register_autograd(_linear_guided_backward, setup_context=_linear_guided_setup_context)


# ---------------------------------------------------------------- validation and the public functions


def _check_head(hidden_name: str, hidden: Tensor, weight, bias) -> None:
    check_float_tensor(hidden_name, hidden)
    check_float_tensor("weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"weight must be (V, H), got shape {tuple(weight.shape)}")
    if weight.shape[0] < 1:
        raise ValueError(f"weight must have at least one row (V, the class dimension, must be non-empty), "
                         f"got shape {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight has shape {tuple(weight.shape)}: its H ({weight.shape[1]}) must be "
                         f"{hidden_name}'s last dimension ({hidden.shape[-1]})")
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device} but {hidden_name} is on {hidden.device}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight has dtype {weight.dtype} but {hidden_name} has {hidden.dtype}")
    if bias is not None:
        check_float_tensor("bias", bias)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias has shape {tuple(bias.shape)}; expected ({weight.shape[0]},) (weight's V)")
        if bias.device != hidden.device:
            raise ValueError(f"bias is on {bias.device} but {hidden_name} is on {hidden.device}")
        if bias.dtype != hidden.dtype:
            raise ValueError(f"bias has dtype {bias.dtype} but {hidden_name} has {hidden.dtype}")


def _wants_grad(tensor: Optional[Tensor]) -> bool:
    return tensor is not None and torch.is_grad_enabled() and tensor.requires_grad


def linear_masked_cross_entropy(
    hidden: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None = None, *, threshold: float | None = None,
    ignore_index: int = -100, window: int | None = None, window_threshold: float | None = None,
    reduction: str = "mean", inplace_backward: bool = False, return_weights: bool = False,
    backend: str | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """masked_cross_entropy(hidden @ weight.T + bias, target, ...) without the N x V logits.

    hidden (..., H) (with `window`: (B, T, H)), weight (V, H), bias (V,) or None, all of one
    float dtype; target (...) integer class ids. Threshold, ignore_index, windows and reduction
    as in masked_cross_entropy. hidden gets a gradient; weight and bias get one only when they
    require grad. inplace_backward is accepted and changes nothing (there is no logits buffer).
    return_weights=True returns (loss, weights), the per-token a_i; backend as in
    masked_cross_entropy (EARKIT_BACKEND, when set, overrides it).
    """
    _check_head("hidden", hidden, weight, bias)
    threshold, window_threshold = check_common("hidden", hidden, threshold, window, window_threshold, reduction)
    check_target(target, "hidden", hidden)
    ignore_index = check_ignore_index(ignore_index)
    loss, weights, *_ = torch.ops.earkit.linear_masked_cross_entropy(
        hidden, weight, bias, target.long(), threshold, ignore_index, window, window_threshold, reduction,
        _wants_grad(hidden), _wants_grad(weight), _wants_grad(bias), check_backend(backend),
    )
    return (loss, weights) if return_weights else loss


def linear_guided_cross_entropy(
    h_student: Tensor, h_concept: Tensor, h_anchor: Tensor, weight: Tensor, bias: Tensor | None = None, *,
    eta: float = 1.0, threshold: float | None = None, window: int | None = None,
    window_threshold: float | None = None, reduction: str = "mean", inplace_backward: bool = False,
    return_weights: bool = False, backend: str | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """guided_cross_entropy(h_s W^T + b, h_c W^T + b, h_a W^T + b, ...) without any N x V logits.

    The three hidden states (..., H) (with `window`: (B, T, H)) share the head weight (V, H) and
    bias (V,): the student's and both teachers' logits come from the same layer. Only h_student
    (and weight, bias when they require grad) get a gradient. return_weights and backend as in
    linear_masked_cross_entropy.
    """
    _check_head("h_student", h_student, weight, bias)
    check_same_layout("h_concept", h_concept, "h_student", h_student)
    check_same_layout("h_anchor", h_anchor, "h_student", h_student)
    eta = check_finite("eta", eta, allow_none=False)
    threshold, window_threshold = check_common("h_student", h_student, threshold, window, window_threshold,
                                                reduction)
    loss, weights, *_ = torch.ops.earkit.linear_guided_cross_entropy(
        h_student, h_concept.detach(), h_anchor.detach(), weight, bias, eta, threshold, window, window_threshold,
        reduction, _wants_grad(h_student), _wants_grad(weight), _wants_grad(bias), check_backend(backend),
    )
    return (loss, weights) if return_weights else loss


def flops(n_rows: int, n_inner: int, n_cols: int, op: str, weight_grad: bool = False) -> int:
    """Matmul flops of one fwd+bwd: 2NHV per product (logits, target's two, d hidden, d weight)."""
    products = {"hard": 2, "guided": 4}[op] + (1 if weight_grad else 0)
    return 2 * n_rows * n_inner * n_cols * products


__all__ = ["linear_masked_cross_entropy", "linear_guided_cross_entropy", "flops"]
