"""Triton kernel of the fused linear + loss ops: one chunk of head logits, straight to fp32.

The linear ops (linear_cross_entropy.py) never hold the N x V logits: they walk the rows in
chunks of C rows and, per chunk, (1) compute the chunk's logits here, (2) run the row kernels
of triton_cross_entropy.py on them (online softmax, threshold, window gate, then the gradient
written over the same buffer), (3) multiply the gradient into d hidden (and d weight, d bias)
with cuBLAS. One C x V fp32 buffer (two for the guided loss) lives for the whole call.

Why logits in fp32 and not the input dtype: the loss kernels do fp32 math on whatever they
read; a bf16 logit rounded before the softmax would put 2^-8 relative noise on every gradient
entry, which the fused path has no reason to pay (torch's bf16 head does pay it).

The guided loss's target logits t = (1 + eta) z_a - eta z_c come out of one kernel with two
accumulators (anchor and concept) combined in fp32 in registers: the two teacher logit
tensors are never written, only t.

Layout: a 2-D grid over (row tiles, column tiles) with the row tile varying fastest, so the
programs that run together share one weight tile (read from DRAM once per chunk) and the
chunk's hidden rows (C x H, a few MB) stay in L2. For small N the column tiles alone fill the
GPU (a 512-row chunk x 16384 columns is 4 x 256 tiles of 128 x 64): this is the split-V layout.

Under the Triton interpreter (TRITON_INTERPRET=1, the tests) tl.dot cannot take bf16 or fp16
operands, so tiles are cast to fp32 first (DOT_IN_FP32); on a GPU half-precision tiles go to
the tensor cores as they are, and fp32 tiles use IEEE fp32 products (never TF32, whose 10-bit
mantissa would be coarser than the bf16 path's fp32 accumulation).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Tests set these to exercise ragged tiles and the K loop at tiny shapes.
force_blocks: tuple[int, int, int] | None = None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _dot_tile(acc, h_tile, w_tile, DOT_IN_FP32: tl.constexpr, IEEE: tl.constexpr):
    """acc += h_tile (BM x BK) @ w_tile.T (BK x BN), accumulated in fp32."""
    if DOT_IN_FP32:
        h_tile = h_tile.to(tl.float32)
        w_tile = w_tile.to(tl.float32)
    if IEEE:
        return tl.dot(h_tile, tl.trans(w_tile), acc, input_precision="ieee")
    return tl.dot(h_tile, tl.trans(w_tile), acc)


@triton.jit
def _linear_logits_kernel(
    h_ptr, h_row_stride, h2_ptr, h2_row_stride, w_ptr, w_row_stride, b_ptr, out_ptr, out_row_stride,
    n_rows, n_cols, n_inner, scale, scale2,
    HAS_BIAS: tl.constexpr, TWO_INPUTS: tl.constexpr, DOT_IN_FP32: tl.constexpr, IEEE: tl.constexpr,
    EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out = scale (h W^T + b) [- scale2 (h2 W^T + b)], fp32, one (BLOCK_M x BLOCK_N) tile.

    h, h2 and W have unit stride along H (the launcher makes sure). Out-of-range rows and
    columns are clamped to the last valid one for the loads (no row or column mask in the K
    loop) and masked at the store only; H needs a mask only when BLOCK_K does not divide it.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    load_rows = tl.minimum(rows, n_rows - 1)
    load_cols = tl.minimum(cols, n_cols - 1)
    inner = tl.arange(0, BLOCK_K)
    # 64-bit row offsets (a 9216 x 16384 chunk passes 2^31 elements), advanced by BLOCK_K a step.
    w_ptrs = w_ptr + load_cols.to(tl.int64)[:, None] * w_row_stride + inner[None, :]
    h_ptrs = h_ptr + load_rows.to(tl.int64)[:, None] * h_row_stride + inner[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if TWO_INPUTS:
        h2_ptrs = h2_ptr + load_rows.to(tl.int64)[:, None] * h2_row_stride + inner[None, :]
        acc2 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, n_inner, BLOCK_K):
        if EVEN_K:
            w_tile = tl.load(w_ptrs)
            h_tile = tl.load(h_ptrs)
        else:
            k_ok = (k0 + inner) < n_inner
            w_tile = tl.load(w_ptrs, mask=k_ok[None, :], other=0.0)
            h_tile = tl.load(h_ptrs, mask=k_ok[None, :], other=0.0)
        acc = _dot_tile(acc, h_tile, w_tile, DOT_IN_FP32, IEEE)
        if TWO_INPUTS:
            if EVEN_K:
                h2_tile = tl.load(h2_ptrs)
            else:
                h2_tile = tl.load(h2_ptrs, mask=k_ok[None, :], other=0.0)
            acc2 = _dot_tile(acc2, h2_tile, w_tile, DOT_IN_FP32, IEEE)
            h2_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
        h_ptrs += BLOCK_K
    if HAS_BIAS:
        bias = tl.load(b_ptr + load_cols).to(tl.float32)
        acc += bias[None, :]
        if TWO_INPUTS:
            acc2 += bias[None, :]
    if TWO_INPUTS:
        # The same combination, in the same order, as reference.guided_target.
        acc = scale * acc - scale2 * acc2
    out_ptrs = out_ptr + (pid_m * BLOCK_M).to(tl.int64) * out_row_stride + (
        tl.arange(0, BLOCK_M)[:, None] * out_row_stride + cols[None, :])
    tl.store(out_ptrs, acc, mask=(rows < n_rows)[:, None] & (cols < n_cols)[None, :])


def _blocks(n_rows: int, n_cols: int, n_inner: int, two_inputs: bool,
            half_precision: bool = True) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)."""
    if force_blocks is not None:
        bm, bn, bk = force_blocks
        return bm, bn, bk, 4, 1
    if _interpreting():
        # The interpreter runs each program in numpy: few, large-ish tiles are fastest.
        cap = lambda x, c: min(triton.next_power_of_2(max(x, 1)), c)  # noqa: E731
        return cap(n_rows, 64), cap(n_cols, 128), cap(n_inner, 64), 4, 1
    # The largest tiles that compile for sm_90 without spilling (tests compile them, no GPU
    # needed); picked by ptxas's register report, not yet timed on a GPU.
    if half_precision:
        # tensor cores (wgmma): one 128 x 64 fp32 accumulator over 8 warps; the target's two
        # accumulators fit at 64 x 64 over 4 warps.
        return (64, 64, 32, 4, 2) if two_inputs else (128, 64, 64, 8, 3)
    # fp32 in IEEE precision runs on the FMA units.
    return (32, 32, 32, 4, 2) if two_inputs else (64, 64, 32, 4, 2)


def linear_weight(weight: torch.Tensor) -> torch.Tensor:
    """Half-precision weights feed the tensor cores as they are: nothing to convert."""
    return weight


def _launch(hidden, hidden2, weight, bias, out, scale: float, scale2: float) -> None:
    n_rows, n_inner = hidden.shape
    n_cols = weight.shape[0]
    if n_rows == 0:
        return
    two = hidden2 is not None
    unit_stride = lambda x: x if x.stride(-1) == 1 else x.contiguous()  # noqa: E731
    hidden, weight = unit_stride(hidden), unit_stride(weight)
    h2 = unit_stride(hidden2) if two else hidden
    bias = bias.contiguous() if bias is not None else None
    half = hidden.dtype != torch.float32
    bm, bn, bk, warps, stages = _blocks(n_rows, n_cols, n_inner, two, half)
    grid = (triton.cdiv(n_rows, bm), triton.cdiv(n_cols, bn))
    _linear_logits_kernel[grid](
        hidden, hidden.stride(0), h2, h2.stride(0), weight, weight.stride(0),
        bias if bias is not None else out, out, out.stride(0),
        n_rows, n_cols, n_inner, float(scale), float(scale2),
        HAS_BIAS=bias is not None, TWO_INPUTS=two, DOT_IN_FP32=_interpreting(), IEEE=not half,
        EVEN_K=n_inner % bk == 0, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        num_warps=warps, num_stages=stages,
    )


# ---------------------------------------------------------------- which engine computes the logits
#
# On Hopper the logits products decide the ops' time (2NHV flops each, the row kernels stream
# only C x V). cuBLAS runs a bf16 GEMM with fp32 accumulation and an fp32 output (mm's out_dtype,
# as Liger does for its target) at 80-90% of the tensor cores' peak with TMA and warp-specialised
# wgmma; the Triton kernel above (cp.async, 128 x 64 tiles, no TMA) reaches about half, and its
# bigger tiles spill or lose occupancy (bench/RESULTS.md has the compile report). So half
# precision goes to cuBLAS by default; fp32 stays on the Triton kernel, whose IEEE products
# never turn into TF32 whatever torch.backends says. EARKIT_LINEAR_LOGITS=triton|cublas picks
# one (bench/gpu_check.py times both); under the interpreter (CPU tensors) the default is triton.
LOGITS_ENGINES = ("cublas", "triton")


def logits_engine(hidden: torch.Tensor) -> str:
    from ._shared import forced_choice

    forced = forced_choice("EARKIT_LINEAR_LOGITS", LOGITS_ENGINES)
    if forced:
        return forced
    return "cublas" if hidden.is_cuda and hidden.dtype != torch.float32 else "triton"


def _mm_fp32(hidden, weight, out) -> None:
    """out (fp32) = hidden @ weight.T, products accumulated in fp32 and never rounded to the
    input dtype: cuBLAS's mixed-precision GEMM on CUDA, an fp32 matmul of the same values elsewhere."""
    if hidden.is_cuda and hidden.dtype != torch.float32:
        torch.mm(hidden, weight.t(), out_dtype=torch.float32, out=out)
    else:
        torch.mm(hidden.float(), weight.float().t(), out=out)


def linear_logits(hidden, weight, bias, out) -> None:
    """out (M, V) fp32 = hidden (M, H) @ weight.T + bias (reference.linear_logits' API)."""
    if logits_engine(hidden) == "triton":
        _launch(hidden, None, weight, bias, out, 1.0, 0.0)
        return
    _mm_fp32(hidden, weight, out)
    if bias is not None:
        out += bias


def linear_target_logits(h_concept, h_anchor, weight, bias, eta: float, out, scratch=None) -> None:
    """out = (1 + eta) (h_anchor W^T + b) - eta (h_concept W^T + b): with cuBLAS, two GEMMs into
    fp32 and one lerp, c + (1 + eta)(a - c), in place (the bias cancels to b); `scratch`, a buffer
    like out (the student's, not yet written this chunk), holds the concept's product. With Triton,
    one pass over W with both accumulators in registers."""
    if logits_engine(h_anchor) == "triton" or scratch is None:
        _launch(h_anchor, h_concept, weight, bias, out, 1.0 + eta, eta)
        return
    _mm_fp32(h_concept, weight, scratch)
    _mm_fp32(h_anchor, weight, out)
    torch.lerp(scratch, out, 1.0 + eta, out=out)
    if bias is not None:
        out += bias
