"""The two erasure objectives, on teacher-forced states at the T image positions (DESIGN.md step 4-6).

    token-kl    KL(p || softmax(s)), p = softmax((1 + eta) z_a - eta z_c): earkit's default, through
                the fused guided_cross_entropy kernel (threshold, windows and gate inside it)
    hidden-mse  mean over H of (h_s - (h_a - eta (h_c - h_a)))^2: the released EAR code's objective,
                with the same token threshold and window gate, computed in torch

Both return (loss, weight): the scalar to backpropagate and the per-token weights a_i (detached),
whose mean is the kept-token fraction the progress bar shows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

import earkit.kernels  # noqa: F401  (registers torch.ops.earkit.*)
from earkit.kernels import reference

from .model import image_logits

OBJECTIVES = ("token-kl", "hidden-mse")


@dataclass
class TeacherStates:
    """The frozen teacher over the sampled tokens, under the concept and the anchor prompt: its
    image logits (B, T, V) for token-kl, its last hidden states (B, T, H) for hidden-mse."""

    concept: Tensor
    anchor: Tensor


def token_kl(model, student_hidden: Tensor, teacher: TeacherStates, *, eta: float, token_threshold, window: int,
             window_threshold) -> tuple[Tensor, Tensor]:
    student_logits = image_logits(model, student_hidden)
    # The op itself (not the public wrapper) also hands back the per-token weights; the trainer
    # validated every argument when it read its config. The gradient is written into the
    # student logits in place: one B x T x V buffer for it, not two.
    loss, weight, _, _ = torch.ops.earkit.guided_cross_entropy(
        student_logits, teacher.concept, teacher.anchor, float(eta), token_threshold,
        min(window, student_logits.shape[1]), window_threshold, "mean", True,
    )
    return loss, weight


def hidden_mse(student_hidden: Tensor, teacher: TeacherStates, *, eta: float, token_threshold, window: int,
               window_threshold) -> tuple[Tensor, Tensor]:
    target = teacher.anchor - eta * (teacher.concept - teacher.anchor)
    token_loss = (student_hidden.float() - target.float()).pow(2).mean(-1)  # (B, T)
    with torch.no_grad():
        flat = token_loss.detach().reshape(-1)
        keep = torch.ones_like(flat) if token_threshold is None else (~(flat <= token_threshold)).float()
        seq_len = token_loss.shape[1]
        weight = reference.window_weights(flat, keep, seq_len, min(window, seq_len), window_threshold)
        weight = weight.reshape(token_loss.shape)
    loss = (weight * token_loss).sum() / weight.sum().clamp_min(1.0)
    return loss, weight
