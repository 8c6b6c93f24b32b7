"""Every Triton kernel of earkit compiled for Hopper (sm_90a), without a GPU: registers, spills,
shared memory, warps, tensor-core use, at the configurations the launchers pick.

    python -m earkit.bench.compile_report            # a markdown table (bench/RESULTS.md keeps them)
    python -m earkit.bench.compile_report --json     # the rows, for tests/kernels/test_triton_compile.py

The interpreter that runs the kernels in the tests accepts code the compiler rejects, and a
kernel that spills or needs 200 registers a thread runs one block per SM: this compiles each
variant to PTX with Triton and asks Triton's bundled ptxas (`-v`) what it costs. Run it under
each Triton the GPUs have (3.6 on the project's H200 image, 3.8 here): registers move between
versions. Must run with TRITON_INTERPRET unset (the test starts it in a subprocess).
"""

from __future__ import annotations

import argparse
import inspect
import json
import re
import subprocess
import sys
import tempfile

# Row kernels: (kernel name, constexprs, num_warps, what it is). BLOCK_V and warps as the
# launchers pick them at V = 16384 (one split: N >= 528 rows, the fused ops' chunks; the hard
# kernels 4096 columns a block at 16 warps, the guided 2048 at 8) and at the split-row layout.
ROW_CASES = [
    ("_hard_forward_kernel", dict(HAS_THRESHOLD=True, SPLITS=1, BLOCK_V=4096, WRITE_GRAD=False), 16, "hard fwd, 1 split"),
    ("_hard_forward_kernel", dict(HAS_THRESHOLD=True, SPLITS=1, BLOCK_V=4096, WRITE_GRAD=True), 16,
     "hard fwd + unscaled grad, 1 split (fused linear)"),
    ("_hard_forward_kernel", dict(HAS_THRESHOLD=False, SPLITS=8, BLOCK_V=2048, WRITE_GRAD=False), 8, "hard fwd, 8 splits"),
    ("_hard_combine_kernel", dict(HAS_THRESHOLD=True, SPLITS=8), 4, "hard combine"),
    ("_guided_forward_kernel", dict(HAS_THRESHOLD=True, SPLITS=1, BLOCK_V=2048, TARGET_ONLY=False, WRITE_GRAD=False),
     8, "guided fwd, 1 split"),
    ("_guided_forward_kernel", dict(HAS_THRESHOLD=True, SPLITS=1, BLOCK_V=2048, TARGET_ONLY=True, WRITE_GRAD=True),
     8, "guided fwd + grad, target given, 1 split (fused linear)"),
    ("_guided_forward_kernel", dict(HAS_THRESHOLD=True, SPLITS=4, BLOCK_V=2048, TARGET_ONLY=False, WRITE_GRAD=False),
     8, "guided fwd, 4 splits"),
    ("_guided_combine_kernel", dict(HAS_THRESHOLD=True, SPLITS=4), 4, "guided combine"),
    ("_window_kernel", dict(BLOCK_W=64), 4, "window gate"),
    ("_hard_backward_kernel", dict(BLOCK_V=4096), 16, "hard bwd"),
    ("_guided_backward_kernel", dict(BLOCK_V=2048, TARGET_ONLY=False), 8, "guided bwd"),
    ("_guided_backward_kernel", dict(BLOCK_V=2048, TARGET_ONLY=True), 8, "guided bwd, target given"),
]
DATA = {"logits_ptr", "student_ptr", "concept_ptr", "anchor_ptr", "out_ptr", "grad_ptr"}


def _ptxas_report(compiled) -> dict:
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as ptx:
        ptx.write(compiled.asm["ptx"])
        ptx.flush()
        info = subprocess.run([get_ptxas(90).path, "-arch=sm_90a", "-v", ptx.name, "-o", "/dev/null"],
                              capture_output=True, text=True, check=True).stderr
    return dict(registers=int(re.search(r"Used (\d+) registers", info).group(1)),
                spill_bytes=sum(int(n) for n in re.findall(r"(\d+) bytes spill", info)),
                shared_bytes=int(getattr(compiled.metadata, "shared", 0) or 0),
                tensor_cores="mma" in compiled.asm["ptx"], cubin_bytes=len(compiled.asm["cubin"]))


def _compile(fn, signature: dict, constexprs: dict, warps: int, stages: int | None = None):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    options = {"num_warps": warps} | ({"num_stages": stages} if stages else {})
    return triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                          target=GPUTarget("cuda", 90, 32), options=options)


def _row_signature(fn, data_type: str) -> dict:
    types = {}
    for name in inspect.signature(fn.fn).parameters:
        if name.isupper():
            types[name] = "constexpr"
        elif name in DATA:
            types[name] = "*" + data_type
        elif name == "target_ptr":
            types[name] = "*i64"
        elif name.endswith("_ptr"):
            types[name] = "*fp32"
        elif name in ("threshold", "window_threshold", "eta"):
            types[name] = "fp32"
        else:
            types[name] = "i64" if name.endswith("stride") else "i32"
    return types


def row_kernel_rows() -> list[dict]:
    from earkit.kernels import triton_cross_entropy as kernels

    rows = []
    for data_type in ("fp32", "bf16"):
        for name, constexprs, warps, what in ROW_CASES:
            fn = getattr(kernels, name)
            compiled = _compile(fn, _row_signature(fn, data_type), constexprs, warps)
            rows.append(dict(kernel=name, what=what, dtype=data_type, warps=warps, stages=None,
                             **_ptxas_report(compiled)))
    return rows


def logits_kernel_rows() -> list[dict]:
    """The fused linear ops' Triton logits kernel at the launcher's tiles (one and two inputs; the
    two-input one makes the guided target), and 128 x 256 x 64 (the tile the issue proposes)."""
    from earkit.kernels import triton_linear_cross_entropy as kernels

    fn = kernels._linear_logits_kernel
    cases = [(dtype, two, kernels._blocks(4096, 16384, 4096, two, dtype != "fp32"))
             for dtype, two in (("bf16", False), ("bf16", True), ("fp16", False), ("fp32", False), ("fp32", True))]
    cases.append(("bf16", False, (128, 256, 64, 8, 3)))
    rows = []
    for dtype, two, (bm, bn, bk, warps, stages) in cases:
        signature = {}
        for name in fn.arg_names:
            if name in ("h_ptr", "h2_ptr", "w_ptr", "b_ptr"):
                signature[name] = "*" + dtype
            elif name == "out_ptr":
                signature[name] = "*fp32"
            elif name in ("scale", "scale2"):
                signature[name] = "fp32"
            elif name.isupper():
                signature[name] = "constexpr"
            else:
                signature[name] = "i64" if "stride" in name else "i32"
        constexprs = dict(HAS_BIAS=True, TWO_INPUTS=two, DOT_IN_FP32=False, IEEE=dtype == "fp32", EVEN_K=True,
                          BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
        compiled = _compile(fn, signature, constexprs, warps, stages)
        what = f"logits {bm}x{bn}x{bk}" + (", target (2 inputs)" if two else "")
        rows.append(dict(kernel=fn.__name__, what=what, dtype=dtype, warps=warps, stages=stages,
                         **_ptxas_report(compiled)))
    return rows


def markdown(rows: list[dict]) -> str:
    import triton

    lines = [f"triton {triton.__version__}, sm_90a, ptxas -v of the PTX Triton makes (no GPU needed)", "",
             "| kernel | config | dtype | warps | stages | registers | spill B | shared B | tensor cores |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for row in rows:
        lines.append(f"| {row['kernel']} | {row['what']} | {row['dtype']} | {row['warps']} | {row['stages'] or '-'} | "
                     f"{row['registers']} | {row['spill_bytes']} | {row['shared_bytes']} | "
                     f"{'yes' if row['tensor_cores'] else 'no'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m earkit.bench.compile_report", description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print the rows as JSON (one line)")
    args = parser.parse_args(argv)
    rows = row_kernel_rows() + logits_kernel_rows()
    print(json.dumps(rows) if args.json else markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
