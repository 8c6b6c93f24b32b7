"""The installed package: the native twin is built, and no top-level name is squatted."""

import os
import subprocess
import sys
from pathlib import Path


def test_native_twin_is_built():
    from earkit.kernels import backend_name, native

    assert native.available(), native.load_error()
    import torch

    assert backend_name(torch.device("cpu")) in ("native", os.environ.get("EARKIT_BACKEND", "native"))


def test_repository_folders_are_not_top_level_modules(tmp_path):
    # `kernels` is a Hugging Face package that transformers and bitsandbytes import when they
    # find it: away from the checkout our kernels/ folder is only ever earkit.kernels (from the
    # root, see tests/test_tooling.py).
    probe = "import importlib.util as u; print([n for n in ('kernels', 'engine', 'bench', 'ecgvf') if u.find_spec(n)])"
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


REPOSITORY = Path(__file__).resolve().parents[1]


def test_every_extra_the_readme_installs_exists():
    import re
    import tomllib

    extras = tomllib.loads((REPOSITORY / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    named = set(re.findall(r"\.\[([a-z0-9_-]+)\]", (REPOSITORY / "README.md").read_text()))
    assert named and named <= set(extras), named - set(extras)
    assert any(requirement.startswith("scipy") for requirement in extras["test"])  # the FID test needs it


def test_the_readme_examples_outputs_are_ignored_by_git():
    outputs = ["erased/checkpoint/config.json", "samples/grid.png", "report/report.html", "runs/church/metrics.json",
               "circle.jsonl", "circle.summary.json", "circle.kept.decisions.jsonl"]
    result = subprocess.run(["git", "check-ignore", "--no-index", *outputs], cwd=REPOSITORY, capture_output=True,
                            text=True)
    assert sorted(result.stdout.split()) == sorted(outputs), result.stderr
