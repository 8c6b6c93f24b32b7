"""earkit: erase concepts from unified autoregressive image models (EAR for Janus-Pro)."""

__version__ = "0.1.0"
