"""Fixtures of the linear ops' tests."""

import pytest

from earkit.kernels import linear_cross_entropy


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of a few rows, so every test crosses chunk boundaries (windowed: one sequence each)."""
    monkeypatch.setattr(linear_cross_entropy, "force_chunk_rows", 4)
