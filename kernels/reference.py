"""The pure-torch reference of the loss kernels: the readable spec every backend must match.

Every backend (this one, the Triton kernels, the native C++ twin) implements the same five
row-level functions on flattened inputs, and `earkit.kernels.cross_entropy` builds the public
ops on top of them. Shapes: logits-like inputs are (N, V) with unit stride along V; target,
loss, keep, lse and row_scale are (N,). All math is fp32 whatever the input dtype.

    hard_rows(logits, target, ignore_index, threshold[, out, grad]) -> loss, keep, lse
    guided_rows(student, concept, anchor, eta, threshold[, out, grad]) -> loss, keep, lse_student, lse_target
    window_weights(loss, keep, seq_len, window, window_threshold) -> weight
    hard_grad(logits, target, lse, row_scale, out)                 # writes out
    guided_grad(student, concept, anchor, eta, lse_student, lse_target, row_scale, out)

`keep` is the token mask m_i of DESIGN.md step 5 as 0./1. floats; `weight` is a_i = m_i G_w(i).
The fused linear ops pass `out` (the call's own (N,) vectors, sliced per chunk: no copy on the
fast backends) and `grad` (a buffer for the unscaled gradient softmax - onehot, or softmax(s) -
softmax(t), which they then scale by a_i in d hidden); with anchor=None the guided functions
take the target logits t themselves in `concept`.
A NaN loss is kept (a threshold compares with `not (l <= t)`), so NaN reaches the loss instead
of being masked away. `out` may be the logits (or student) buffer itself: the gradient is then
written in place. Rows with row_scale == 0 get an exact zero gradient without looking at the
logits, so masked rows cost a write and nothing else.
"""

from __future__ import annotations

import torch


def _keep_above(loss: torch.Tensor, threshold: float | None) -> torch.Tensor:
    if threshold is None:
        return torch.ones_like(loss)
    return (~(loss <= threshold)).float()  # NaN counts as above: it must propagate


def _log_sum(x: torch.Tensor):
    """(x - shift, log sum exp(x - shift), shift) per row: shift is the row max, or 0 where that
    max is infinite (as torch.logsumexp: all -inf gives -inf, any +inf gives +inf), so that
    logsumexp(x) = shift + the log-sum, and the first two stay small whatever the logits' size."""
    row_max = x.amax(dim=-1)
    shift = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
    shifted = x - shift[:, None]
    return shifted, torch.log(torch.exp(shifted).sum(-1)), shift


def _into(out, values):
    """The row vectors as computed, or copied into the caller's `out` (see hard_rows)."""
    if out is None:
        return values
    for vector, value in zip(out, values):
        vector.copy_(value)
    return tuple(out)


def hard_rows(logits: torch.Tensor, target: torch.Tensor, ignore_index: int, threshold: float | None, out=None,
              grad=None):
    """(loss, keep, lse), into `out` (three (N,) fp32 vectors) when given; with `grad`, the
    unscaled gradient softmax - onehot (zero where ignored) is written there as well."""
    loss, keep, lse = _hard_rows(logits, target, ignore_index, threshold)
    if grad is not None:
        hard_grad(logits, target, lse, (target != ignore_index).float(), grad)
    return _into(out, (loss, keep, lse))


def _hard_rows(logits: torch.Tensor, target: torch.Tensor, ignore_index: int, threshold: float | None):
    shifted, log_sum, shift = _log_sum(logits.float())
    lse = shift + log_sum
    ignored = target == ignore_index
    safe_target = torch.where(ignored, torch.zeros_like(target), target)
    picked = shifted.gather(-1, safe_target[:, None]).squeeze(-1)
    # l = log_sum - (z_y - shift): both small. lse - z_y, equal in exact arithmetic, subtracts
    # two numbers of the logits' size, and at 1e4 lse is rounded to ~1e-3.
    loss = torch.where(ignored, torch.zeros_like(lse), log_sum - picked)
    keep = torch.where(ignored, torch.zeros_like(loss), _keep_above(loss, threshold))
    return loss, keep, lse


def guided_target(concept: torch.Tensor, anchor: torch.Tensor | None, eta: float) -> torch.Tensor:
    """Logits of the target distribution p = softmax((1 + eta) z_a - eta z_c), in fp32 (anchor
    None: concept already holds them)."""
    if anchor is None:
        return concept.float()
    return (1.0 + eta) * anchor.float() - eta * concept.float()


def guided_rows(student, concept, anchor, eta: float, threshold: float | None, out=None, grad=None):
    """(loss, keep, lse_student, lse_target). anchor=None: `concept` holds the target logits t
    themselves (the fused linear op forms them in its matmul). `out`, `grad` as in hard_rows."""
    values = _guided_rows(student, concept, anchor, eta, threshold)
    if grad is not None:
        guided_grad(student, concept, anchor, eta, values[2], values[3], torch.ones_like(values[0]), grad)
    return _into(out, values)


def _guided_rows(student, concept, anchor, eta: float, threshold: float | None):
    s_shifted, log_sum_s, shift_s = _log_sum(student.float())
    t_shifted, log_sum_t, shift_t = _log_sum(guided_target(concept, anchor, eta))
    # KL(p || softmax(s)) = sum p (log p - log q), from log-probabilities that never hold the
    # size of the logits: log p = (t - shift_t) - log_sum_t. The equal sum p (t - s) - lse_t +
    # lse_s cancels catastrophically at logits of 1e3-1e4: each lse is rounded to ~1e-3, and
    # p = exp(t - lse_t) sums to 1 only that well, times the offset of thousands that student
    # and target may differ by (softmax ignores it): whole nats of error, flipped masks.
    log_p = t_shifted - log_sum_t[:, None]
    log_q = s_shifted - log_sum_s[:, None]
    p = torch.exp(log_p)
    # Classes the target gives no mass (t = -inf) add nothing, not 0 * -inf = NaN; a NaN p
    # (t = +inf, where softmax is undefined, as log_softmax says) stays NaN, never masked away.
    loss = torch.where(p == 0, torch.zeros_like(p), p * (log_p - log_q)).sum(-1)
    lse_s, lse_t = shift_s + log_sum_s, shift_t + log_sum_t
    return loss, _keep_above(loss, threshold), lse_s, lse_t


def window_weights(loss, keep, seq_len: int, window: int, window_threshold: float | None, out=None):
    """a_i = m_i * G_w(i), where windows of `window` rows run along each sequence of seq_len rows
    (copied into `out` when given, which may be keep itself)."""
    if out is not None:
        return out.copy_(window_weights(loss, keep, seq_len, window, window_threshold))
    n = loss.numel()
    if window_threshold is None or n == 0:  # no rows: no windows (and seq_len may be 0)
        return keep
    position = torch.arange(n, device=loss.device) % seq_len
    sequence = torch.arange(n, device=loss.device) // seq_len
    windows_per_sequence = -(-seq_len // window)
    window_id = sequence * windows_per_sequence + position // window
    window_sum = torch.zeros(n // seq_len * windows_per_sequence, device=loss.device)
    window_sum.index_add_(0, window_id, keep * loss)
    gate = (~(window_sum <= window_threshold)).float()
    return keep * gate[window_id]


def hard_grad(logits, target, lse, row_scale, out) -> None:
    z = logits.float()
    grad = torch.exp(z - lse[:, None])
    valid = (target >= 0) & (target < z.shape[1])
    # minus one at each valid target, by scatter (boolean indexing would read the mask back to the host)
    grad.scatter_add_(1, torch.where(valid, target, 0)[:, None], -valid.to(grad.dtype)[:, None])
    grad *= row_scale[:, None]
    out.copy_(torch.where(row_scale[:, None] == 0, torch.zeros_like(grad), grad))


def guided_grad(student, concept, anchor, eta: float, lse_student, lse_target, row_scale, out) -> None:
    p = torch.exp(guided_target(concept, anchor, eta) - lse_target[:, None])
    grad = (torch.exp(student.float() - lse_student[:, None]) - p) * row_scale[:, None]
    out.copy_(torch.where(row_scale[:, None] == 0, torch.zeros_like(grad), grad))


# ---------------------------------------------------------------- the linear head (fused linear + loss ops)
#
# The linear ops (earkit.kernels.linear_cross_entropy) compute logits = hidden @ weight.T + bias
# one chunk of rows at a time and hand each chunk to the five functions above. Every backend
# supplies these three; here (and in the native twin, which has no matmul of its own: BLAS
# through torch beats any GEMM worth writing in C++) they are plain fp32 torch.


def linear_weight(weight: torch.Tensor) -> torch.Tensor:
    """The weight as the matmuls of this backend want it: fp32, converted once per call."""
    return weight.float()


def linear_logits(hidden, weight, bias, out) -> None:
    """out (M, V) fp32 = hidden (M, H) @ weight.T + bias, in fp32."""
    torch.mm(hidden.float(), weight.float().t(), out=out)
    if bias is not None:
        out += bias.float()


def linear_target_logits(h_concept, h_anchor, weight, bias, eta: float, out, scratch=None) -> None:
    """out = (1 + eta) (h_anchor W^T + b) - eta (h_concept W^T + b), as ((1 + eta) h_a - eta h_c)
    W^T + b with the combination made in fp32: one product instead of two, and on a CPU the
    products are fp32 anyway, so nothing is rounded that two products would keep (never the
    combination rounded to a half-precision input dtype: that moves per-token losses by
    0.7-3%, bench/RESULTS.md). The bias cancels to b. `scratch` is not needed here."""
    combined = torch.mul(h_anchor.float(), 1.0 + eta).sub_(h_concept.float(), alpha=eta)
    linear_logits(combined, weight, bias, out)
