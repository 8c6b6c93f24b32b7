"""earkit.kernels: fused cross-entropy with thresholded token masking and windowed reduction.

    from earkit.kernels import masked_cross_entropy, guided_cross_entropy
    from earkit.kernels import MaskedCrossEntropyLoss, GuidedCrossEntropyLoss

The ops are also registered as torch.ops.earkit.* custom ops. See DESIGN.md, "Kernels: the
contract", for the math; `reference.py` is the readable spec.
"""

from .cross_entropy import backend_name, guided_cross_entropy, masked_cross_entropy
from .modules import GuidedCrossEntropyLoss, MaskedCrossEntropyLoss

__all__ = [
    "masked_cross_entropy",
    "guided_cross_entropy",
    "MaskedCrossEntropyLoss",
    "GuidedCrossEntropyLoss",
    "backend_name",
]
