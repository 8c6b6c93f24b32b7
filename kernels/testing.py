"""Float64 oracles of the four loss ops, for tests (as torch.testing is for torch).

    from earkit.kernels import testing
    want = testing.masked_cross_entropy(logits, target, threshold=0.1, window=3, window_threshold=0.5)
    want.loss, want.grads[0], want.weights   # float64: the loss, d logits, the per-token a_i

Written from DESIGN.md ("Kernels: the contract") and independent of the kernels' code paths: plain
torch on float64 copies of the inputs, autograd for every gradient, and explicit loops over
sequences and windows for the window gate. The ops' tests (tests/kernels) and the GPU check
(bench/gpu_check.py) compare against these; nothing in earkit.kernels imports this module.

Every oracle takes the op's arguments (plus grad_output, the upstream gradient: ones when None)
and returns an Expected. The inputs may be of any float dtype and on any device: the oracle sees
the same rounded values the op sees.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Expected:
    """What an op should give, in float64."""

    loss: Tensor  # the op's output: per token for reduction="none" (the rows' shape), else a scalar
    grads: list  # d logits / d student; linear ops: d hidden (d h_student), then d weight and d bias when asked
    token_loss: Tensor  # (N,) l_i before any masking (0 on ignored rows)
    weights: Tensor  # (N,) a_i = m_i G_w(i)
    window_sums: Tensor  # L_w = sum of m_i l_i over each window, sequence after sequence (empty: no gate)
    row_scale: Tensor  # (N,) d loss / d l_i: a_i times the upstream gradient (over the mean's count)


# ---------------------------------------------------------------- the pieces, DESIGN.md step 5


def hard_token_loss(logits: Tensor, target: Tensor, ignore_index: int = -100) -> Tensor:
    """l_i = logsumexp(z_i) - z_i[y_i] over rows of logits (..., V), 0 where y_i = ignore_index: (N,)."""
    n_classes = logits.shape[-1]
    labels = target.reshape(-1)
    valid = labels != ignore_index
    log_probs = torch.log_softmax(logits.reshape(-1, n_classes), dim=-1)
    picked = log_probs.gather(1, torch.where(valid, labels, 0)[:, None]).squeeze(1)
    return torch.where(valid, -picked, torch.zeros_like(picked))


def guided_token_loss(student: Tensor, target_logits: Tensor) -> Tensor:
    """l_i = KL(p_i || softmax(s_i)), p_i = softmax(t_i), over rows (..., V): (N,). A class with p = 0
    adds nothing (its t is -inf); a NaN p stays NaN."""
    n_classes = student.shape[-1]
    log_p = torch.log_softmax(target_logits.reshape(-1, n_classes), dim=-1)
    log_q = torch.log_softmax(student.reshape(-1, n_classes), dim=-1)
    p = log_p.exp()
    return torch.where(p == 0, torch.zeros_like(p), p * (log_p - log_q)).sum(-1)


def guided_target(concept: Tensor, anchor: Tensor, eta: float) -> Tensor:
    """t = (1 + eta) z_a - eta z_c."""
    return (1 + eta) * anchor - eta * concept


def token_mask(token_loss: Tensor, threshold, valid: Tensor | None = None) -> Tensor:
    """m_i = [l_i > threshold] (NaN kept: never silently masked) on valid rows; all rows when threshold is None."""
    keep = torch.ones_like(token_loss, dtype=torch.bool) if threshold is None else ~(token_loss <= threshold)
    return keep if valid is None else keep & valid


def window_weights(token_loss: Tensor, keep: Tensor, rows_shape, window, window_threshold):
    """a_i = m_i G_w(i) with explicit loops over sequences and windows of `window` positions along T
    (the last may be short): a window whose kept loss sum is <= window_threshold is dropped.
    Returns (a (N,) float64, the window sums L_w (float64), sequence after sequence)."""
    weight = keep.double().clone()
    sums = []
    if window is None or window_threshold is None:
        return weight, torch.zeros(0, dtype=torch.float64, device=weight.device)
    batch, seq_len = rows_shape
    weight_2d = weight.view(batch, seq_len)
    loss_2d = token_loss.detach().double().view(batch, seq_len)
    for b in range(batch):
        for start in range(0, seq_len, window):
            span = slice(start, start + window)
            total = (weight_2d[b, span] * loss_2d[b, span]).sum()
            sums.append(total)
            if total <= window_threshold:  # NaN fails this test and keeps its window
                weight_2d[b, span] = 0.0
    return weight, torch.stack(sums) if sums else torch.zeros(0, dtype=torch.float64, device=weight.device)


def reduce(weights: Tensor, token_loss: Tensor, reduction: str, rows_shape):
    """"none": a_i l_i in the rows' shape; "sum": sum a_i l_i; "mean": sum a_i l_i / max(1, sum a_i)."""
    weighted = weights * token_loss
    if reduction == "none":
        return weighted.view(rows_shape)
    if reduction == "sum":
        return weighted.sum()
    return weighted.sum() / weights.sum().clamp_min(1.0)


def _expected(token_loss, leaves, rows_shape, keep, window, window_threshold, reduction, grad_output) -> Expected:
    """The weights, the reduction and one backward to every leaf and to the token losses."""
    with torch.no_grad():
        weights, sums = window_weights(token_loss, keep, rows_shape, window, window_threshold)
    loss = reduce(weights, token_loss, reduction, rows_shape)
    upstream = torch.ones_like(loss) if grad_output is None else grad_output.to(loss)
    row_scale, *grads = torch.autograd.grad(loss, [token_loss, *leaves], upstream)
    return Expected(loss.detach(), list(grads), token_loss.detach(), weights, sums, row_scale)


def _leaf(tensor: Tensor, requires_grad: bool = True) -> Tensor:
    return tensor.detach().double().requires_grad_(requires_grad)


# ---------------------------------------------------------------- the four ops


def masked_cross_entropy(logits, target, *, threshold=None, ignore_index=-100, window=None, window_threshold=None,
                         reduction="mean", grad_output=None) -> Expected:
    """grads: [d logits]."""
    z = _leaf(logits)
    token_loss = hard_token_loss(z, target, ignore_index)
    keep = token_mask(token_loss, threshold, target.reshape(-1) != ignore_index)
    return _expected(token_loss, [z], target.shape, keep, window, window_threshold, reduction, grad_output)


def guided_cross_entropy(student, concept, anchor, *, eta=1.0, threshold=None, window=None, window_threshold=None,
                         reduction="mean", grad_output=None) -> Expected:
    """grads: [d student]; the teachers are constants."""
    s = _leaf(student)
    token_loss = guided_token_loss(s, guided_target(concept.double(), anchor.double(), eta))
    keep = token_mask(token_loss, threshold)
    return _expected(token_loss, [s], student.shape[:-1], keep, window, window_threshold, reduction, grad_output)


def _head(weight, bias, head_grads):
    """(x -> x W^T + b in float64, the head's leaves that get a gradient)."""
    w = _leaf(weight, head_grads)
    b = _leaf(bias, head_grads) if bias is not None else None
    leaves = ([w] + ([b] if b is not None else [])) if head_grads else []
    return (lambda x: x @ w.t() + (b if b is not None else 0.0)), leaves


def linear_masked_cross_entropy(hidden, weight, target, bias=None, *, threshold=None, ignore_index=-100, window=None,
                                window_threshold=None, reduction="mean", grad_output=None,
                                head_grads=True) -> Expected:
    """grads: [d hidden] and, with head_grads, d weight and d bias (when there is a bias)."""
    h = _leaf(hidden)
    head, head_leaves = _head(weight, bias, head_grads)
    token_loss = hard_token_loss(head(h), target, ignore_index)
    keep = token_mask(token_loss, threshold, target.reshape(-1) != ignore_index)
    return _expected(token_loss, [h, *head_leaves], target.shape, keep, window, window_threshold, reduction,
                     grad_output)


def linear_guided_cross_entropy(h_student, h_concept, h_anchor, weight, bias=None, *, eta=1.0, threshold=None,
                                window=None, window_threshold=None, reduction="mean", grad_output=None,
                                head_grads=True) -> Expected:
    """grads: [d h_student] and, with head_grads, d weight and d bias; the teachers' logits are constants."""
    h = _leaf(h_student)
    head, head_leaves = _head(weight, bias, head_grads)
    with torch.no_grad():
        target_logits = guided_target(head(h_concept.double()), head(h_anchor.double()), eta)
    token_loss = guided_token_loss(head(h), target_logits)
    keep = token_mask(token_loss, threshold)
    return _expected(token_loss, [h, *head_leaves], h_student.shape[:-1], keep, window, window_threshold,
                     reduction, grad_output)


__all__ = [
    "Expected", "masked_cross_entropy", "guided_cross_entropy", "linear_masked_cross_entropy",
    "linear_guided_cross_entropy", "hard_token_loss", "guided_token_loss", "guided_target", "token_mask",
    "window_weights", "reduce",
]
