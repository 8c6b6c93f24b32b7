"""Python's tools from the repository root: pytest, python -m pytest, python -c "import earkit" and an
editable install all see the checkout as earkit.*, and the top-level folders never pose as other
packages (Hugging Face's `kernels` above all, which transformers and bitsandbytes probe for)."""

import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[1]
# One quick test file, run by each tool in turn.
QUICK_TESTS = ["tests/kernels/test_modules.py", "-q", "-p", "no:cacheprovider", "-k", "drops_in_for_cross_entropy_loss"]


def run(command, *, cwd=REPOSITORY, timeout=600, env=None):
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, **(env or {})})
    return result


def passed(result) -> bool:
    return result.returncode == 0 and " passed" in result.stdout and " failed" not in result.stdout


def test_pytest_from_the_root():
    result = run([str(Path(sys.executable).with_name("pytest")), *QUICK_TESTS])
    assert passed(result), result.stdout + result.stderr


def test_python_dash_m_pytest_from_the_root_tests_the_checkout():
    result = run([sys.executable, "-m", "pytest", *QUICK_TESTS])
    assert passed(result), result.stdout + result.stderr


def test_import_earkit_from_the_root_is_the_checkout():
    probe = ("import earkit, earkit.kernels, earkit.engine.trainer, earkit.ecgvf.metrics, earkit.bench.memory, "
             "earkit.kernels.native as n; print(earkit.kernels.__file__); print(n.available())")
    result = run([sys.executable, "-c", probe])
    assert result.returncode == 0, result.stderr
    where, native = result.stdout.split()
    assert Path(where).is_relative_to(REPOSITORY / "kernels") and native == "True"


@pytest.mark.parametrize("folder", ["kernels", "engine", "ecgvf", "bench"])
def test_a_top_level_import_of_a_source_folder_fails_saying_why(folder):
    result = run([sys.executable, "-c", f"from {folder} import something"])
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError") and f"earkit.{folder}" in last, result.stderr


def test_transformers_probe_from_the_root_does_not_load_our_kernels_as_its_own():
    # transformers asks whether Hugging Face's `kernels` is installed by finding and importing it;
    # from the root it finds our folder. The answer must be "no", without running our kernels'
    # code a second time under another name (it registers torch ops) and without an error.
    probe = ("import sys; from transformers.utils.import_utils import is_kernels_available as a; print(a()); "
             "import earkit.kernels; print(sorted(m for m in sys.modules if m.startswith('kernels.')))")
    result = run([sys.executable, "-c", probe])
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:2] == ["False", "[]"], result.stdout


def test_editable_install_runs_the_tests_and_the_command(tmp_path):
    environment = tmp_path / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=True).create(environment)
    python = environment / "bin" / "python"
    install = [str(python), "-m", "pip", "install", "-q", "--no-deps", "-e", "."]
    try:
        import scikit_build_core  # noqa: F401

        install.append("--no-build-isolation")  # offline where the build backend is already here
    except ImportError:
        pass
    result = run(install, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    where = run([str(python), "-c", "import earkit.kernels, earkit.kernels.native as n; "
                 "print(earkit.kernels.__file__, n.available())"], cwd=tmp_path)
    assert where.returncode == 0, where.stderr
    path, native = where.stdout.split()
    assert Path(path).is_relative_to(REPOSITORY / "kernels") and native == "True"  # the checkout, from anywhere
    command = run([str(environment / "bin" / "earkit"), "sample", "--help"], cwd=tmp_path)
    assert command.returncode == 0 and "--prompt" in command.stdout, command.stderr
    tests = run([str(python), "-m", "pytest", *QUICK_TESTS])
    assert passed(tests), tests.stdout + tests.stderr
