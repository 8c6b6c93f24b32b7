"""earkit.bench: kernel and engine benchmarks."""
