"""earkit.kernels: fused cross-entropy with thresholded token masking and windowed reduction,
alone or fused with the head's last Linear layer.

    from earkit.kernels import masked_cross_entropy, guided_cross_entropy
    from earkit.kernels import MaskedCrossEntropyLoss, GuidedCrossEntropyLoss
    from earkit.kernels import linear_masked_cross_entropy, linear_guided_cross_entropy
    from earkit.kernels import LinearMaskedCrossEntropyLoss, LinearGuidedCrossEntropyLoss

The ops are also registered as torch.ops.earkit.* custom ops. See DESIGN.md, "Kernels: the
contract", for the math; `reference.py` is the readable spec.
"""

if __name__ != "earkit.kernels":  # imported as a top-level `kernels`: see earkit/_source_folder.py
    from earkit._source_folder import refusal

    __getattr__ = refusal(__name__)
else:
    from ._shared import backend_name
    from .cross_entropy import guided_cross_entropy, masked_cross_entropy
    from .linear_cross_entropy import linear_guided_cross_entropy, linear_masked_cross_entropy
    from .modules import (
        GuidedCrossEntropyLoss,
        LinearGuidedCrossEntropyLoss,
        LinearMaskedCrossEntropyLoss,
        MaskedCrossEntropyLoss,
    )

    __all__ = [
        "masked_cross_entropy",
        "guided_cross_entropy",
        "MaskedCrossEntropyLoss",
        "GuidedCrossEntropyLoss",
        "linear_masked_cross_entropy",
        "linear_guided_cross_entropy",
        "LinearMaskedCrossEntropyLoss",
        "LinearGuidedCrossEntropyLoss",
        "backend_name",
    ]
