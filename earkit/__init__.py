"""earkit: erase concepts from unified autoregressive image models (EAR for Janus-Pro)."""

__version__ = "0.1.0"


def _source_tree_path() -> list:
    """Where the subpackages live when this file is the repository's own earkit/ folder.

    An installed earkit holds kernels/, engine/, ecgvf/ and bench/ inside the package (the wheel
    maps the repository's top-level folders there). In a checkout they sit beside earkit/, so
    `python -m earkit.bench` or `python -m pytest` run from the repository root, where this
    folder comes first on sys.path, would find no earkit.kernels. Then the repository root joins
    the package path (the subpackages resolve as earkit.* and never as top-level `kernels`,
    which is a Hugging Face package), and so does the build folder that holds the compiled
    native twin (earkit._native), when `pip install .` has built it there.
    """
    import sys
    from pathlib import Path

    package = Path(__file__).resolve().parent
    root = package.parent
    if (package / "kernels").is_dir() or not (root / "kernels" / "reference.py").is_file():
        return []  # an installed package, or not our checkout
    try:
        if 'name = "earkit"' not in (root / "pyproject.toml").read_text(encoding="utf-8"):
            return []
    except OSError:
        return []
    paths = [str(root)]
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    builds = sorted((root / "build").glob(f"{tag}-*")) if (root / "build").is_dir() else []
    paths += [str(folder) for folder in builds if any(folder.glob("_native*"))]
    return paths


__path__ += _source_tree_path()
