import os
import tempfile

# Triton decides at import time whether kernels are interpreted: set it before earkit imports
# triton, so the Triton backend runs on CPU tensors in tests.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.pop("EARKIT_BACKEND", None)
# torch.compile's on-disk caches key a compiled backward on the forward graph, not on the custom
# ops' autograd formulas: a cache left by another version of earkit replays its old backward
# (seen: stale d hidden after the formula changed). Every test session compiles afresh.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="earkit-test-inductor-"))

import pytest  # noqa: E402

from earkit.kernels import triton_cross_entropy  # noqa: E402

BACKENDS = ["reference", "native", "triton"]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """Run the test once per backend, forcing it through EARKIT_BACKEND."""
    monkeypatch.setenv("EARKIT_BACKEND", request.param)
    return request.param


@pytest.fixture(params=["one-block", "split-v"])
def triton_layout(request, monkeypatch):
    """The Triton kernels' two layouts: whole rows per program, or rows split across programs
    (forced at tiny shapes with tiny blocks, so the looping path runs too)."""
    if request.param == "split-v":
        monkeypatch.setattr(triton_cross_entropy, "force_splits", 3)
        monkeypatch.setattr(triton_cross_entropy, "force_block_v", 8)
    return request.param
