"""Every Triton kernel compiles for a real GPU (sm_90, Hopper), without one, without spills.

The interpreter that runs the kernels in the other tests accepts code that the compiler
rejects; bench/compile_report.py compiles each kernel variant the launchers use to PTX and asks
Triton's bundled ptxas for registers and spills, in a subprocess where TRITON_INTERPRET is unset.
"""

import json
import os
import subprocess
import sys

import pytest


@pytest.fixture(scope="module")
def report():
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "EARKIT_BACKEND")}
    # cwd: not the repository root, whose earkit/ source folder would take the place of the install
    result = subprocess.run([sys.executable, "-m", "earkit.bench.compile_report", "--json"], env=env,
                            capture_output=True, text=True, timeout=900, cwd=os.path.dirname(__file__))
    if result.returncode != 0 and "ptxas" in result.stderr and "not found" in result.stderr:
        pytest.skip("this triton install has no bundled ptxas")
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_every_row_kernel_compiles_without_spilling(report):
    rows = [row for row in report if row["kernel"] != "_linear_logits_kernel"]
    assert len(rows) == 2 * 12  # fp32 and bf16, every variant the launchers pick
    for row in rows:
        assert row["cubin_bytes"] > 0 and row["spill_bytes"] == 0, row


def test_the_logits_kernel_compiles_on_the_tensor_cores(report):
    """At the launcher's tiles: no spill, and half precision on the tensor cores (fp32 is IEEE
    on purpose, hence FMA). The 128 x 256 x 64 candidate is compiled for the report only."""
    rows = [row for row in report if row["kernel"] == "_linear_logits_kernel" and "128x256" not in row["what"]]
    assert len(rows) == 5
    for row in rows:
        assert row["cubin_bytes"] > 0 and row["spill_bytes"] == 0, row
        assert row["tensor_cores"] == (row["dtype"] != "fp32"), row
