"""nn.Module drop-ins for the loss ops, where `nn.CrossEntropyLoss` (or a KL loss) stood."""

from __future__ import annotations

from torch import Tensor, nn

from .cross_entropy import guided_cross_entropy, masked_cross_entropy


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
