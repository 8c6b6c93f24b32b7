"""earkit.engine: Janus-Pro loading, sampling and the erasure trainer (not built yet)."""
