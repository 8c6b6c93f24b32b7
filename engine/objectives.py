"""The two erasure objectives, on teacher-forced states at the T image positions (DESIGN.md step 4-6).

    token-kl    KL(p || softmax(s)), p = softmax((1 + eta) z_a - eta z_c): earkit's default, through
                linear_guided_cross_entropy on the generation head's last Linear (threshold,
                windows and gate inside it): neither the student's nor the teachers' B x T x V
                logits are ever held, only their B x T x H' head features
    hidden-mse  mean over H of (h_s - (h_a - eta (h_c - h_a)))^2: the released EAR code's objective,
                with the same token threshold and window gate, computed in torch

Both return (loss, weight): the scalar to backpropagate and the per-token weights a_i (detached),
whose mean is the kept-token fraction the progress bar shows.

The loss is a mean over the batch's kept tokens, sum_i a_i l_i / max(1, sum_i a_i), and a_i
depends on its own row alone (the threshold per token, the gate per window of a row). So a batch
split over the ranks of a torchrun job gives the whole batch's loss as a sum: each rank scales
its own mean by shard_scale(its kept weight sum, the whole batch's), and SumOf carries the sums
the ranks add up to report the whole batch's mean and kept fraction.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from earkit.kernels import guided_cross_entropy, linear_guided_cross_entropy, reference

from .model import generation_features, image_logits

OBJECTIVES = ("token-kl", "hidden-mse")


@dataclass
class TeacherStates:
    """The frozen teacher over the sampled tokens, under the concept and the anchor prompt: for
    token-kl what token_kl_teacher returns (head features, or logits when the head's last layer
    is trained), for hidden-mse its last hidden states (B, T, H)."""

    concept: Tensor
    anchor: Tensor


def _head_layer(model):
    return model.model.generation_head.vision_head


def fused_head(model) -> bool:
    """Whether token-kl runs fused with the head's last Linear: only when that layer is frozen,
    since the fused op puts the student's and the teacher's features through one weight."""
    layer = _head_layer(model)
    return not any(p.requires_grad for p in layer.parameters())


def token_kl_teacher(model, hidden: Tensor) -> Tensor:
    """What token_kl needs of the teacher at these hidden states: the head's features before its
    last Linear (B, T, H') when that Linear is frozen, else the full logits (B, T, V)."""
    return generation_features(model, hidden) if fused_head(model) else image_logits(model, hidden)


def token_kl(model, student_hidden: Tensor, teacher: TeacherStates, *, eta: float, token_threshold, window: int,
             window_threshold) -> tuple[Tensor, Tensor]:
    window = min(window, student_hidden.shape[1])
    if fused_head(model):
        # The head's last Linear is frozen, so only d features is computed (into the rest of the
        # head and the model); return_weights hands back the per-token weights a_i too.
        layer = _head_layer(model)
        features = generation_features(model, student_hidden)
        concept, anchor = (x.to(features.dtype) for x in (teacher.concept, teacher.anchor))
        return linear_guided_cross_entropy(
            features, concept, anchor, layer.weight, layer.bias, eta=float(eta), threshold=token_threshold,
            window=window, window_threshold=window_threshold, reduction="mean", return_weights=True,
        )
    student_logits = image_logits(model, student_hidden)
    # The gradient is written into the student logits in place: one B x T x V buffer for it, not two.
    return guided_cross_entropy(
        student_logits, teacher.concept, teacher.anchor, eta=float(eta), threshold=token_threshold, window=window,
        window_threshold=window_threshold, reduction="mean", inplace_backward=True, return_weights=True,
    )


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


# ---------------------------------------------------------------- a batch split over ranks


@dataclass
class SumOf:
    """A mean loss as the sums behind it, which ranks can add: loss_sum = sum a_i l_i,
    weight_sum = sum a_i (the kept weights), count = the tokens it covers."""

    loss_sum: float = 0.0
    weight_sum: float = 0.0
    count: float = 0.0

    @classmethod
    def of(cls, loss: Tensor, weight: Tensor) -> "SumOf":
        """The sums of one objective's (loss, weight), its loss being reduction="mean"."""
        return cls(*window_sums(loss, weight).tolist())

    def __add__(self, other: "SumOf") -> "SumOf":
        return SumOf(self.loss_sum + other.loss_sum, self.weight_sum + other.weight_sum, self.count + other.count)

    def mean(self) -> float:
        """The objective's reduction="mean" over everything summed: sum a_i l_i / max(1, sum a_i)."""
        return self.loss_sum / max(1.0, self.weight_sum)

    def kept_fraction(self) -> float:
        return self.weight_sum / self.count if self.count else 0.0


def window_sums(loss: Tensor, weight: Tensor) -> Tensor:
    """SumOf's three numbers of one objective's (loss, weight) as a float64 tensor on their device
    (no host sync): loss * max(1, sum a), sum a, the token count."""
    weight_sum = weight.detach().double().sum()
    return torch.stack([loss.detach().double() * weight_sum.clamp_min(1.0), weight_sum,
                        torch.full_like(weight_sum, float(weight.numel()))])


def shard_scale(local_weight_sum: float, total_weight_sum: float) -> float:
    """What one rank multiplies its mean loss by so the ranks' losses (and gradients) add up to
    the whole batch's mean: max(1, local) / max(1, total), 1 when the rank holds the whole batch."""
    return max(1.0, float(local_weight_sum)) / max(1.0, float(total_weight_sum))
