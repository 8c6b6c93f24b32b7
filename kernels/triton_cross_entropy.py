"""Triton kernels for the thresholded, windowed cross-entropy (hard labels and guided soft target).

The same five row-level functions as `reference.py`, on CUDA tensors (or CPU tensors when
TRITON_INTERPRET=1). The forward reads each logits row once, with an online softmax; the
backward reads it once more and writes the gradient, optionally into the logits buffer itself.
Writing the gradient during the forward, as Liger-Kernel does, would cost a second read of the
row in the forward and a read-modify-write in the backward to apply the window gate and the
upstream gradient; recomputing softmax from the saved log-sum-exp in the backward reads and
writes the row once, and rows whose weight is zero are only written. Everything is computed in
fp32 after the load; only the final gradient store rounds to the logits dtype.

Layout: one program per row when there are enough rows to fill the GPU, else each row is split
into SPLITS column ranges whose partial (max, sum) are merged by a small combine kernel, so an
N = 1152 batch still occupies every SM. A V = 16384 row is one block (held on chip); larger
vocabularies loop over blocks with the running-max rescaling.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

# Largest block of columns one program holds at a time; beyond it the kernels loop. A whole row
# of 16384 in one block took 98-128 registers a thread at 16 warps under Triton 3.6 (the hard
# backward and the fused forward + gradient): one block, 16 warps, per SM, too few loads in
# flight for kernels that only stream. At 4096 columns and 16 warps they take 32 registers (four
# blocks, 64 warps per SM); the guided kernels, three rows live, 2048 at 8 warps (40-48
# registers). bench/compile_report.py prints the table; bench/RESULTS.md keeps it for 3.6 and 3.8.
MAX_BLOCK_V = 4096
# Columns below which splitting a row no longer pays for the extra combine launch.
MIN_COLUMNS_PER_SPLIT = 2048
# Tests set these to exercise the looping and split-V paths at tiny shapes.
force_splits: int | None = None
force_block_v: int | None = None


def _num_warps(block: int) -> int:
    return 4 if block <= 1024 else 8 if block <= 2048 else 16


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _splits(n_rows: int, n_cols: int, device: torch.device) -> int:
    if force_splits is not None:
        return max(1, min(force_splits, n_cols))
    if device.type != "cuda":
        return 1
    sm_count = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    wanted = triton.cdiv(4 * sm_count, max(n_rows, 1))
    return max(1, min(wanted, n_cols // MIN_COLUMNS_PER_SPLIT))


def _block(n_cols: int, cap: int = MAX_BLOCK_V) -> int:
    if force_block_v is not None:
        cap = force_block_v
    return min(triton.next_power_of_2(max(n_cols, 1)), cap)


@triton.jit
def _shift_of(row_max):
    """The shift a sum of exp(x - shift) is taken against: the max, or 0 where it is infinite,
    as torch.logsumexp does (all -inf gives -inf, any +inf gives +inf, never inf - inf = NaN)."""
    return tl.where((row_max == float("-inf")) | (row_max == float("inf")), 0.0, row_max)


@triton.jit
def _online_logsumexp_step(x, running_max, running_sum):
    """Fold one block (out-of-range lanes are -inf) into a running (max, sum of exp(x - shift))."""
    new_max = tl.maximum(running_max, tl.max(x, axis=0))
    safe_max = _shift_of(new_max)
    running_sum = running_sum * tl.exp(running_max - safe_max) + tl.sum(tl.exp(x - safe_max), axis=0)
    return new_max, running_sum


@triton.jit
def _finish_row(loss, threshold, HAS_THRESHOLD: tl.constexpr):
    keep = tl.where(loss <= threshold, 0.0, 1.0)  # NaN is kept, so it propagates
    if not HAS_THRESHOLD:
        keep = tl.full([], 1.0, tl.float32)
    return keep


# ---------------------------------------------------------------- hard labels, forward


@triton.jit
def _hard_loss(row_max, row_sum, picked):
    """(lse, l) from the row's max and sum of exp(z - shift): l = log sum - (z_y - shift), both
    small; lse - z_y would subtract two numbers of the logits' size (lse rounded ~1e-3 at 1e4)."""
    shift = _shift_of(row_max)
    log_sum = tl.log(row_sum)
    return shift + log_sum, log_sum - (picked - shift)


@triton.jit
def _picked_logit(row_ptr, target, ignore_index, n_cols):
    """z_y as fp32; NaN for a target outside [0, V) that is not ignore_index (never read out of
    bounds): on CUDA the ops do not check target values on the host (a sync per call), so a bad
    label makes the loss NaN instead of a silent garbage read."""
    in_range = (target >= 0) & (target < n_cols)
    picked = tl.load(row_ptr + tl.where(in_range, target, 0), mask=in_range, other=0.0).to(tl.float32)
    return tl.where(in_range | (target == ignore_index), picked, float("nan"))


@triton.jit
def _hard_forward_kernel(
    logits_ptr, logits_row_stride, target_ptr, partial_max_ptr, partial_sum_ptr,
    loss_ptr, keep_ptr, lse_ptr, grad_ptr, grad_row_stride, n_cols, cols_per_split, ignore_index, threshold,
    HAS_THRESHOLD: tl.constexpr, SPLITS: tl.constexpr, BLOCK_V: tl.constexpr, WRITE_GRAD: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    row_ptr = logits_ptr + row * logits_row_stride
    col_begin = split * cols_per_split
    col_end = tl.minimum(col_begin + cols_per_split, n_cols)
    running_max = -float("inf")
    running_sum = 0.0
    for start in range(col_begin, col_end, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(row_ptr + cols, mask=cols < col_end, other=-float("inf")).to(tl.float32)
        running_max, running_sum = _online_logsumexp_step(x, running_max, running_sum)
    if SPLITS == 1:
        target = tl.load(target_ptr + row)
        ignored = target == ignore_index
        lse, loss = _hard_loss(running_max, running_sum, _picked_logit(row_ptr, target, ignore_index, n_cols))
        loss = tl.where(ignored, 0.0, loss)
        keep = tl.where(ignored, 0.0, _finish_row(loss, threshold, HAS_THRESHOLD))
        tl.store(loss_ptr + row, loss)
        tl.store(keep_ptr + row, keep)
        tl.store(lse_ptr + row, lse)
        if WRITE_GRAD:
            # The unscaled gradient softmax - onehot in the same pass, while the row is hot in
            # L1/L2 (the fused linear ops fold a_i into d hidden, N x H work, not N x V): the
            # chunk's logits are read twice in one kernel instead of once in each of two.
            # Ignored rows get zeros; the buffer may be the logits themselves.
            grad_row = grad_ptr + row * grad_row_stride
            for start in range(0, n_cols, BLOCK_V):
                cols = start + tl.arange(0, BLOCK_V)
                in_range = cols < n_cols
                x = tl.load(row_ptr + cols, mask=in_range, other=0.0).to(tl.float32)
                grad = tl.exp(x - lse) - tl.where(cols == target, 1.0, 0.0)
                grad = tl.where(ignored, 0.0, grad)
                tl.store(grad_row + cols, grad.to(grad_ptr.dtype.element_ty), mask=in_range)
    else:
        tl.store(partial_max_ptr + row * SPLITS + split, running_max)
        tl.store(partial_sum_ptr + row * SPLITS + split, running_sum)


@triton.jit
def _merge_partials(partial_max_ptr, partial_sum_ptr, row, SPLITS: tl.constexpr):
    offsets = tl.arange(0, SPLITS)
    maxes = tl.load(partial_max_ptr + row * SPLITS + offsets)
    sums = tl.load(partial_sum_ptr + row * SPLITS + offsets)
    row_max = tl.max(maxes, axis=0)
    scales = tl.exp(maxes - _shift_of(row_max))
    return row_max, scales, tl.sum(sums * scales, axis=0)


@triton.jit
def _hard_combine_kernel(
    logits_ptr, logits_row_stride, target_ptr, partial_max_ptr, partial_sum_ptr,
    loss_ptr, keep_ptr, lse_ptr, n_cols, ignore_index, threshold,
    HAS_THRESHOLD: tl.constexpr, SPLITS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_max, _, row_sum = _merge_partials(partial_max_ptr, partial_sum_ptr, row, SPLITS)
    target = tl.load(target_ptr + row)
    ignored = target == ignore_index
    picked = _picked_logit(logits_ptr + row * logits_row_stride, target, ignore_index, n_cols)
    lse, loss = _hard_loss(row_max, row_sum, picked)
    loss = tl.where(ignored, 0.0, loss)
    keep = tl.where(ignored, 0.0, _finish_row(loss, threshold, HAS_THRESHOLD))
    tl.store(loss_ptr + row, loss)
    tl.store(keep_ptr + row, keep)
    tl.store(lse_ptr + row, lse)


# ---------------------------------------------------------------- guided soft target, forward


@triton.jit
def _target_block(concept_row, anchor_row, cols, in_range, eta, TARGET_ONLY: tl.constexpr):
    """One block of the target logits t = (1 + eta) z_a - eta z_c in fp32 (or t as stored)."""
    zc = tl.load(concept_row + cols, mask=in_range, other=0.0).to(tl.float32)
    if TARGET_ONLY:
        return zc
    za = tl.load(anchor_row + cols, mask=in_range, other=0.0).to(tl.float32)
    return (1.0 + eta) * za - eta * zc


@triton.jit
def _guided_forward_kernel(
    student_ptr, student_row_stride, concept_ptr, concept_row_stride, anchor_ptr, anchor_row_stride,
    partials_ptr, loss_ptr, keep_ptr, lse_student_ptr, lse_target_ptr, grad_ptr, grad_row_stride,
    n_cols, cols_per_split, eta, threshold,
    HAS_THRESHOLD: tl.constexpr, SPLITS: tl.constexpr, BLOCK_V: tl.constexpr, TARGET_ONLY: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
):
    """TARGET_ONLY: `concept` holds the target logits t themselves (the fused linear op forms t
    from both teachers in its matmul), and `anchor` is not read: one stream of V, not two."""
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    col_begin = split * cols_per_split
    col_end = tl.minimum(col_begin + cols_per_split, n_cols)
    target_max = -float("inf")
    target_sum = 0.0  # sum of exp(t - target shift)
    # sum of exp(t - target shift) ((t - target shift) - (s - student shift)): log-probability
    # differences up to the small log-sums, never numbers of the logits' size (_finish_guided_row).
    cross = 0.0
    student_max = -float("inf")
    student_sum = 0.0
    for start in range(col_begin, col_end, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        in_range = cols < col_end
        s = tl.load(student_ptr + row * student_row_stride + cols, mask=in_range, other=0.0).to(tl.float32)
        t = _target_block(concept_ptr + row * concept_row_stride, anchor_ptr + row * anchor_row_stride, cols,
                          in_range, eta, TARGET_ONLY)
        t = tl.where(in_range, t, -float("inf"))
        s = tl.where(in_range, s, -float("inf"))
        new_target_max = tl.maximum(target_max, tl.max(t, axis=0))
        new_student_max = tl.maximum(student_max, tl.max(s, axis=0))
        target_shift, student_shift = _shift_of(target_max), _shift_of(student_max)
        new_target_shift, new_student_shift = _shift_of(new_target_max), _shift_of(new_student_max)
        rescale = tl.exp(target_max - new_target_shift)  # 0 while no target mass was seen
        # New shifts move every earlier term's log-ratio by the change of the student's shift
        # minus the target's; rescale 0 means the earlier target mass underflows, and its terms
        # (an infinite one too, as p = 0 does in the reference) with it.
        moved = tl.where(target_sum == 0.0, 0.0,
                         ((new_student_shift - student_shift) - (new_target_shift - target_shift)) * target_sum)
        cross = tl.where(rescale == 0.0, 0.0, (cross + moved) * rescale)
        t_shifted = t - new_target_shift
        weights = tl.exp(t_shifted)
        # Classes with no target mass add nothing (not 0 * -inf); a NaN weight (t = +inf) stays.
        terms = tl.where(weights == 0.0, 0.0, weights * (t_shifted - (s - new_student_shift)))
        cross += tl.sum(terms, axis=0)
        target_sum = target_sum * rescale + tl.sum(weights, axis=0)
        target_max = new_target_max
        student_max, student_sum = _online_logsumexp_step(s, student_max, student_sum)
    if SPLITS == 1:
        lse_student, lse_target = _finish_guided_row(row, target_max, target_sum, cross, student_max, student_sum,
                                                     loss_ptr, keep_ptr, lse_student_ptr, lse_target_ptr, threshold,
                                                     HAS_THRESHOLD)
        if WRITE_GRAD:
            # softmax(s) - softmax(t), unscaled, in the same pass (see _hard_forward_kernel).
            grad_row = grad_ptr + row * grad_row_stride
            for start in range(0, n_cols, BLOCK_V):
                cols = start + tl.arange(0, BLOCK_V)
                in_range = cols < n_cols
                s = tl.load(student_ptr + row * student_row_stride + cols, mask=in_range, other=0.0).to(tl.float32)
                t = _target_block(concept_ptr + row * concept_row_stride, anchor_ptr + row * anchor_row_stride,
                                  cols, in_range, eta, TARGET_ONLY)
                grad = tl.exp(s - lse_student) - tl.exp(t - lse_target)
                tl.store(grad_row + cols, grad.to(grad_ptr.dtype.element_ty), mask=in_range)
    else:
        base = partials_ptr + (row * SPLITS + split) * 5
        tl.store(base + 0, target_max)
        tl.store(base + 1, target_sum)
        tl.store(base + 2, cross)
        tl.store(base + 3, student_max)
        tl.store(base + 4, student_sum)


@triton.jit
def _finish_guided_row(row, target_max, target_sum, cross, student_max, student_sum, loss_ptr, keep_ptr,
                       lse_student_ptr, lse_target_ptr, threshold, HAS_THRESHOLD: tl.constexpr):
    """KL = cross / sum_t - log sum_t + log sum_s: every term small whatever the logits' size.
    (The equal sum p (t - s) - lse_t + lse_s subtracts numbers of the logits' size, and at 1e4
    each lse carries a rounding of ~1e-3 that masks and windows then act on.)"""
    log_sum_target = tl.log(target_sum)
    log_sum_student = tl.log(student_sum)
    loss = cross / target_sum - log_sum_target + log_sum_student
    tl.store(loss_ptr + row, loss)
    tl.store(keep_ptr + row, _finish_row(loss, threshold, HAS_THRESHOLD))
    lse_student = _shift_of(student_max) + log_sum_student
    lse_target = _shift_of(target_max) + log_sum_target
    tl.store(lse_student_ptr + row, lse_student)
    tl.store(lse_target_ptr + row, lse_target)
    return lse_student, lse_target


@triton.jit
def _guided_combine_kernel(
    partials_ptr, loss_ptr, keep_ptr, lse_student_ptr, lse_target_ptr, threshold,
    HAS_THRESHOLD: tl.constexpr, SPLITS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = partials_ptr + (row * SPLITS + tl.arange(0, SPLITS)) * 5
    target_maxes = tl.load(base + 0)
    target_sums = tl.load(base + 1)
    crosses = tl.load(base + 2)
    student_maxes = tl.load(base + 3)
    target_max = tl.max(target_maxes, axis=0)
    student_max = tl.max(student_maxes, axis=0)
    target_shift, student_shift = _shift_of(target_max), _shift_of(student_max)
    # Each split's sums are against its own shifts: rescale to the row's, and re-base its cross
    # terms as the forward loop does when a shift moves. A split without target mass (its max
    # -inf, padding included) has scale 0 and sums 0 and adds nothing.
    target_scales = tl.exp(target_maxes - target_shift)
    moved = ((student_shift - _shift_of(student_maxes)) - (target_shift - _shift_of(target_maxes))) * target_sums
    moved = tl.where(target_sums == 0.0, 0.0, moved)
    cross = tl.sum(tl.where(target_scales == 0.0, 0.0, (crosses + moved) * target_scales), axis=0)
    target_sum = tl.sum(target_sums * target_scales, axis=0)
    student_scales = tl.exp(student_maxes - student_shift)
    student_sum = tl.sum(tl.load(base + 4) * student_scales, axis=0)
    _finish_guided_row(row, target_max, target_sum, cross, student_max, student_sum, loss_ptr, keep_ptr,
                       lse_student_ptr, lse_target_ptr, threshold, HAS_THRESHOLD)


# ---------------------------------------------------------------- window gate


@triton.jit
def _window_kernel(
    loss_ptr, keep_ptr, weight_ptr, seq_len, window, window_threshold, BLOCK_W: tl.constexpr,
):
    sequence = tl.program_id(0).to(tl.int64)
    window_start = tl.program_id(1) * window
    window_end = tl.minimum(window_start + window, seq_len)
    total = 0.0
    for start in range(window_start, window_end, BLOCK_W):
        positions = start + tl.arange(0, BLOCK_W)
        rows = sequence * seq_len + positions
        in_window = positions < window_end
        loss = tl.load(loss_ptr + rows, mask=in_window, other=0.0)
        keep = tl.load(keep_ptr + rows, mask=in_window, other=0.0)
        total += tl.sum(tl.where(keep != 0.0, keep * loss, 0.0), axis=0)
    gate = tl.where(total <= window_threshold, 0.0, 1.0)
    for start in range(window_start, window_end, BLOCK_W):
        positions = start + tl.arange(0, BLOCK_W)
        rows = sequence * seq_len + positions
        in_window = positions < window_end
        keep = tl.load(keep_ptr + rows, mask=in_window, other=0.0)
        tl.store(weight_ptr + rows, keep * gate, mask=in_window)


# ---------------------------------------------------------------- backward


@triton.jit
def _backward_row(row_scale_ptr, out_ptr, out_row_stride):
    """This program's row (grid axis 0), its scale a_i / N (or a_i), and where its gradient goes."""
    row = tl.program_id(0).to(tl.int64)
    return row, tl.load(row_scale_ptr + row), out_ptr + row * out_row_stride


@triton.jit
def _split_span(n_cols, cols_per_split):
    """The columns [begin, end) that this program's split (grid axis 1) of its row covers."""
    col_begin = tl.program_id(1) * cols_per_split
    return col_begin, tl.minimum(col_begin + cols_per_split, n_cols)


@triton.jit
def _store_zeros(out_row, col_begin, col_end, BLOCK_V: tl.constexpr):
    """A dropped row's gradient (a_i = 0): zeros, without reading its logits."""
    for start in range(col_begin, col_end, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        zeros = tl.zeros([BLOCK_V], dtype=tl.float32)
        tl.store(out_row + cols, zeros.to(out_row.dtype.element_ty), mask=cols < col_end)


@triton.jit
def _hard_backward_kernel(
    logits_ptr, logits_row_stride, target_ptr, lse_ptr, row_scale_ptr, out_ptr, out_row_stride,
    n_cols, cols_per_split, BLOCK_V: tl.constexpr,
):
    row, scale, out_row = _backward_row(row_scale_ptr, out_ptr, out_row_stride)
    col_begin, col_end = _split_span(n_cols, cols_per_split)
    if scale == 0.0:
        _store_zeros(out_row, col_begin, col_end, BLOCK_V)
    else:
        lse = tl.load(lse_ptr + row)
        target = tl.load(target_ptr + row)
        for start in range(col_begin, col_end, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            in_range = cols < col_end
            x = tl.load(logits_ptr + row * logits_row_stride + cols, mask=in_range, other=0.0).to(tl.float32)
            grad = tl.exp(x - lse) - tl.where(cols == target, 1.0, 0.0)
            tl.store(out_row + cols, (grad * scale).to(out_ptr.dtype.element_ty), mask=in_range)


@triton.jit
def _guided_backward_kernel(
    student_ptr, student_row_stride, concept_ptr, concept_row_stride, anchor_ptr, anchor_row_stride,
    lse_student_ptr, lse_target_ptr, row_scale_ptr, out_ptr, out_row_stride,
    n_cols, cols_per_split, eta, BLOCK_V: tl.constexpr, TARGET_ONLY: tl.constexpr,
):
    row, scale, out_row = _backward_row(row_scale_ptr, out_ptr, out_row_stride)
    col_begin, col_end = _split_span(n_cols, cols_per_split)
    if scale == 0.0:
        _store_zeros(out_row, col_begin, col_end, BLOCK_V)
    else:
        lse_student = tl.load(lse_student_ptr + row)
        lse_target = tl.load(lse_target_ptr + row)
        for start in range(col_begin, col_end, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            in_range = cols < col_end
            s = tl.load(student_ptr + row * student_row_stride + cols, mask=in_range, other=0.0).to(tl.float32)
            t = _target_block(concept_ptr + row * concept_row_stride, anchor_ptr + row * anchor_row_stride, cols,
                              in_range, eta, TARGET_ONLY)
            grad = tl.exp(s - lse_student) - tl.exp(t - lse_target)
            tl.store(out_row + cols, (grad * scale).to(out_ptr.dtype.element_ty), mask=in_range)


# ---------------------------------------------------------------- launchers (reference.py's API)


def _row_vectors(n: int, count: int, device, out=None) -> list[torch.Tensor]:
    """The (N,) fp32 outputs: the caller's `out` slices (the fused linear ops write each chunk's
    rows straight into the call's vectors, no copy), else fresh ones."""
    if out is not None:
        if len(out) != count or any(o.numel() != n or o.dtype != torch.float32 or (n and o.stride(0) != 1)
                                    for o in out):
            raise ValueError(f"out must be {count} contiguous float32 vectors of {n}")
        return list(out)
    return [torch.empty(n, dtype=torch.float32, device=device) for _ in range(count)]


def _split_layout(n_rows: int, n_cols: int, device, cap: int = MAX_BLOCK_V):
    splits = _splits(n_rows, n_cols, device)
    cols_per_split = triton.cdiv(n_cols, splits)
    block = _block(cols_per_split, cap)
    # Whole blocks per split keep every split's loads aligned; recount splits after rounding.
    cols_per_split = triton.cdiv(cols_per_split, block) * block
    splits = triton.cdiv(n_cols, cols_per_split)
    return splits, cols_per_split, block


def hard_rows(logits, target, ignore_index: int, threshold: float | None, out=None, grad=None):
    """loss, keep, lse per row (into `out` when given); with `grad`, also the unscaled gradient
    softmax - onehot (zero rows where ignored) written there, in the same pass when the rows are
    not split (the fused linear ops' path), else by hard_grad right after."""
    n_rows, n_cols = logits.shape
    loss, keep, lse = _row_vectors(n_rows, 3, logits.device, out)
    if n_rows == 0:
        return loss, keep, lse
    splits, cols_per_split, block = _split_layout(n_rows, n_cols, logits.device)
    splits_pow2 = triton.next_power_of_2(splits)
    partial_max = torch.full((n_rows, splits_pow2), -math.inf, device=logits.device) if splits > 1 else loss
    partial_sum = torch.zeros((n_rows, splits_pow2), device=logits.device) if splits > 1 else loss
    has_threshold = threshold is not None
    threshold = float(threshold) if has_threshold else 0.0
    fused_grad = grad is not None and splits == 1
    _hard_forward_kernel[(n_rows, splits)](
        logits, logits.stride(0), target, partial_max, partial_sum, loss, keep, lse,
        grad if fused_grad else loss, grad.stride(0) if fused_grad else 0,
        n_cols, cols_per_split, ignore_index, threshold,
        HAS_THRESHOLD=has_threshold, SPLITS=splits_pow2 if splits > 1 else 1, BLOCK_V=block, WRITE_GRAD=fused_grad,
        num_warps=_num_warps(block),
    )
    if splits > 1:
        _hard_combine_kernel[(n_rows,)](
            logits, logits.stride(0), target, partial_max, partial_sum, loss, keep, lse,
            n_cols, ignore_index, threshold, HAS_THRESHOLD=has_threshold, SPLITS=splits_pow2,
        )
    if grad is not None and not fused_grad:
        hard_grad(logits, target, lse, (target != ignore_index).float(), grad)
    return loss, keep, lse


def guided_rows(student, concept, anchor, eta: float, threshold: float | None, out=None, grad=None):
    """loss, keep, lse_student, lse_target per row. anchor=None: `concept` holds the target
    logits t themselves (eta unused). With `grad`, also softmax(s) - softmax(t), unscaled."""
    n_rows, n_cols = student.shape
    loss, keep, lse_student, lse_target = _row_vectors(n_rows, 4, student.device, out)
    if n_rows == 0:
        return loss, keep, lse_student, lse_target
    target_only = anchor is None
    anchor = concept if target_only else anchor
    # Three rows are live at once: a smaller block keeps them in registers.
    splits, cols_per_split, block = _split_layout(n_rows, n_cols, student.device, MAX_BLOCK_V // 2)
    splits_pow2 = triton.next_power_of_2(splits)
    if splits > 1:
        # Unused padding splits hold the identity of the merge: max -inf, sums 0.
        partials = torch.zeros((n_rows, splits_pow2, 5), device=student.device)
        partials[:, :, 0] = -math.inf
        partials[:, :, 3] = -math.inf
    else:
        partials = loss
    has_threshold = threshold is not None
    threshold = float(threshold) if has_threshold else 0.0
    fused_grad = grad is not None and splits == 1
    _guided_forward_kernel[(n_rows, splits)](
        student, student.stride(0), concept, concept.stride(0), anchor, anchor.stride(0),
        partials, loss, keep, lse_student, lse_target,
        grad if fused_grad else loss, grad.stride(0) if fused_grad else 0,
        n_cols, cols_per_split, float(eta), threshold,
        HAS_THRESHOLD=has_threshold, SPLITS=splits_pow2 if splits > 1 else 1, BLOCK_V=block,
        TARGET_ONLY=target_only, WRITE_GRAD=fused_grad, num_warps=_num_warps(block),
    )
    if splits > 1:
        _guided_combine_kernel[(n_rows,)](
            partials, loss, keep, lse_student, lse_target, threshold,
            HAS_THRESHOLD=has_threshold, SPLITS=splits_pow2,
        )
    if grad is not None and not fused_grad:
        guided_grad(student, concept, None if target_only else anchor, eta, lse_student, lse_target,
                    torch.ones_like(loss), grad)
    return loss, keep, lse_student, lse_target


def window_weights(loss, keep, seq_len: int, window: int, window_threshold: float | None, out=None):
    """a_i = keep_i * G_w(i); into `out` when given, which may be keep itself (each program reads
    its windows whole before it writes them)."""
    if window_threshold is None or loss.numel() == 0:
        if out is not None and out is not keep:
            out.copy_(keep)
        return keep if out is None else out
    n_sequences = loss.numel() // seq_len
    window = min(window, seq_len)
    weight = torch.empty_like(keep) if out is None else out
    block = min(triton.next_power_of_2(window), 1024)
    _window_kernel[(n_sequences, triton.cdiv(seq_len, window))](
        loss, keep, weight, seq_len, window, float(window_threshold), BLOCK_W=block,
    )
    return weight


def hard_grad(logits, target, lse, row_scale, out) -> None:
    n_rows, n_cols = logits.shape
    if n_rows == 0:
        return
    splits, cols_per_split, block = _split_layout(n_rows, n_cols, logits.device)
    _hard_backward_kernel[(n_rows, splits)](
        logits, logits.stride(0), target, lse, row_scale, out, out.stride(0),
        n_cols, cols_per_split, BLOCK_V=block, num_warps=_num_warps(block),
    )


def guided_grad(student, concept, anchor, eta: float, lse_student, lse_target, row_scale, out) -> None:
    """anchor=None: `concept` holds the target logits themselves (see guided_rows)."""
    n_rows, n_cols = student.shape
    if n_rows == 0:
        return
    target_only = anchor is None
    anchor = concept if target_only else anchor
    splits, cols_per_split, block = _split_layout(n_rows, n_cols, student.device, MAX_BLOCK_V // 2)
    _guided_backward_kernel[(n_rows, splits)](
        student, student.stride(0), concept, concept.stride(0), anchor, anchor.stride(0),
        lse_student, lse_target, row_scale, out, out.stride(0),
        n_cols, cols_per_split, float(eta), BLOCK_V=block, TARGET_ONLY=target_only, num_warps=_num_warps(block),
    )
