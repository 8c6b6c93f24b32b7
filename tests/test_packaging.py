"""The installed package: the native twin is built, and no top-level name is squatted."""

import os
import subprocess
import sys


def test_native_twin_is_built():
    from earkit.kernels import backend_name, native

    assert native.available(), native.load_error()
    import torch

    assert backend_name(torch.device("cpu")) in ("native", os.environ.get("EARKIT_BACKEND", "native"))


def test_repository_folders_are_not_top_level_modules(tmp_path):
    # `kernels` is a Hugging Face package that transformers and bitsandbytes import when they
    # find it: our kernels/ folder must only ever be importable as earkit.kernels.
    probe = "import importlib.util as u; print([n for n in ('kernels', 'engine', 'bench', 'ecgvf') if u.find_spec(n)])"
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
