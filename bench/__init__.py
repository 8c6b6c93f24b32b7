"""earkit.bench: kernel and engine benchmarks."""

if __name__ != "earkit.bench":  # imported as a top-level `bench`: see earkit/_source_folder.py
    from earkit._source_folder import refusal

    __getattr__ = refusal(__name__)
