"""nn.Module drop-ins for the loss ops, where `nn.CrossEntropyLoss` (or a KL loss) stood, and
for a head's last Linear followed by that loss."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .cross_entropy import guided_cross_entropy, masked_cross_entropy
from .linear_cross_entropy import linear_guided_cross_entropy, linear_masked_cross_entropy


class MaskedCrossEntropyLoss(nn.Module):
    """`nn.CrossEntropyLoss(ignore_index=..., reduction=...)` plus token threshold and windows.

    The class dimension is last: input (N, C) as for nn.CrossEntropyLoss, or (..., C); with
    `window`, (B, T, C). With no threshold and no window it computes what nn.CrossEntropyLoss
    computes, except that a batch with every row ignored gives 0 rather than NaN.
    """

    def __init__(self, ignore_index: int = -100, reduction: str = "mean", *, threshold: float | None = None,
                 window: int | None = None, window_threshold: float | None = None,
                 inplace_backward: bool = False):
        super().__init__()
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.threshold = threshold
        self.window = window
        self.window_threshold = window_threshold
        self.inplace_backward = inplace_backward

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return masked_cross_entropy(
            input, target, threshold=self.threshold, ignore_index=self.ignore_index, window=self.window,
            window_threshold=self.window_threshold, reduction=self.reduction,
            inplace_backward=self.inplace_backward,
        )

    def extra_repr(self) -> str:
        return (f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, threshold={self.threshold}, "
                f"window={self.window}, window_threshold={self.window_threshold}")


class GuidedCrossEntropyLoss(nn.Module):
    """KL(softmax((1 + eta) anchor - eta concept) || softmax(student)), thresholded and windowed."""

    def __init__(self, eta: float = 1.0, reduction: str = "mean", *, threshold: float | None = None,
                 window: int | None = None, window_threshold: float | None = None,
                 inplace_backward: bool = False):
        super().__init__()
        self.eta = eta
        self.reduction = reduction
        self.threshold = threshold
        self.window = window
        self.window_threshold = window_threshold
        self.inplace_backward = inplace_backward

    def forward(self, student: Tensor, concept: Tensor, anchor: Tensor) -> Tensor:
        return guided_cross_entropy(
            student, concept, anchor, eta=self.eta, threshold=self.threshold, window=self.window,
            window_threshold=self.window_threshold, reduction=self.reduction,
            inplace_backward=self.inplace_backward,
        )

    def extra_repr(self) -> str:
        return (f"eta={self.eta}, reduction={self.reduction!r}, threshold={self.threshold}, "
                f"window={self.window}, window_threshold={self.window_threshold}")


class _LinearHead(nn.Module):
    """An nn.Linear(in_features, out_features)'s weight and bias, initialised as nn.Linear does,
    so a trained Linear's state_dict loads into it unchanged."""

    def __init__(self, in_features: int, out_features: int, bias: bool, device, dtype):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(in_features) if in_features > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)


class LinearMaskedCrossEntropyLoss(_LinearHead):
    """nn.Linear(in_features, out_features) then MaskedCrossEntropyLoss, without the logits.

    forward(hidden (..., in_features), target (...)) -> loss. The weight and bias are this
    module's parameters (they get gradients unless frozen); thresholds and windows as in
    MaskedCrossEntropyLoss.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, ignore_index: int = -100,
                 reduction: str = "mean", *, threshold: float | None = None, window: int | None = None,
                 window_threshold: float | None = None, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device, dtype)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.threshold = threshold
        self.window = window
        self.window_threshold = window_threshold

    def forward(self, hidden: Tensor, target: Tensor) -> Tensor:
        return linear_masked_cross_entropy(
            hidden, self.weight, target, self.bias, threshold=self.threshold, ignore_index=self.ignore_index,
            window=self.window, window_threshold=self.window_threshold, reduction=self.reduction,
        )

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, threshold={self.threshold}, "
                f"window={self.window}, window_threshold={self.window_threshold}")


class LinearGuidedCrossEntropyLoss(_LinearHead):
    """nn.Linear then GuidedCrossEntropyLoss on the student's and both teachers' hidden states,
    all through this one layer, without any logits."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, eta: float = 1.0,
                 reduction: str = "mean", *, threshold: float | None = None, window: int | None = None,
                 window_threshold: float | None = None, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device, dtype)
        self.eta = eta
        self.reduction = reduction
        self.threshold = threshold
        self.window = window
        self.window_threshold = window_threshold

    def forward(self, h_student: Tensor, h_concept: Tensor, h_anchor: Tensor) -> Tensor:
        return linear_guided_cross_entropy(
            h_student, h_concept, h_anchor, self.weight, self.bias, eta=self.eta, threshold=self.threshold,
            window=self.window, window_threshold=self.window_threshold, reduction=self.reduction,
        )

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"eta={self.eta}, reduction={self.reduction!r}, threshold={self.threshold}, "
                f"window={self.window}, window_threshold={self.window_threshold}")
