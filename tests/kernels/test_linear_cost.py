"""What one call of the fused linear + loss ops costs, by proxies a CPU can check (issue 12): no
host sync, a bounded number of kernel launches, and the peak extra memory of the GPU path at the
anchors' shape (N = 9216, H = 4096, V = 16384, bf16, head frozen) on the meta device."""

import math
import weakref
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

from earkit.kernels import linear_cross_entropy, linear_guided_cross_entropy, linear_masked_cross_entropy

# aten ops that wait for the device (or read a value back to the host): none may run in a call.
SYNCING_OPS = {"aten::_local_scalar_dense", "aten::item", "aten::nonzero", "aten::masked_select", "aten::is_nonzero",
               "aten::equal", "aten::allclose", "aten::unique", "aten::_unique2"}
N_ROWS, SEQ_LEN = 9216, 576  # 16 images of 576 tokens: the 7B anchor's N


def anchor_like_inputs(n_inner=32, n_cols=64, dtype=torch.float32, seed=0, n_rows=N_ROWS, seq_len=SEQ_LEN):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n_rows // seq_len, seq_len, n_inner, generator=generator).to(dtype)
    weight = (torch.randn(n_cols, n_inner, generator=generator) / math.sqrt(n_inner)).to(dtype)
    return hidden, weight, torch.randint(0, n_cols, hidden.shape[:-1], generator=generator)


def call(op, hidden, weight, target):
    options = dict(threshold=0.5, window=48, window_threshold=1.0)
    leaf = hidden.clone().requires_grad_()
    if op == "hard":
        loss = linear_masked_cross_entropy(leaf, weight, target, **options)
    else:
        concept = hidden + 0.1
        loss = linear_guided_cross_entropy(leaf, concept, concept + 0.2, weight, **options)
    loss.backward()
    return leaf.grad


@pytest.mark.parametrize("op", ["hard", "guided"])
@pytest.mark.parametrize("backend_name", ["native", "reference"])
def test_no_host_sync_in_a_call(monkeypatch, op, backend_name):
    monkeypatch.setenv("EARKIT_BACKEND", backend_name)
    monkeypatch.setattr(linear_cross_entropy, "force_chunk_rows", 1152)  # the GPU's 8 chunks at this N
    inputs = anchor_like_inputs()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        call(op, *inputs)
    names = Counter(event.name for event in prof.events())
    assert names["earkit::linear_masked_cross_entropy" if op == "hard" else "earkit::linear_guided_cross_entropy"] == 1
    assert not {name: names[name] for name in SYNCING_OPS if names[name]}


def test_out_of_range_targets_are_still_named_on_the_cpu():
    hidden, weight, target = anchor_like_inputs()
    target[3, 7] = 64
    with pytest.raises(ValueError, match="target has value 64 outside"):
        call("hard", hidden, weight, target)


# aten ops that launch no kernel: views, allocations, metadata.
NO_LAUNCH = {"empty", "empty_like", "empty_strided", "view", "reshape", "_reshape_alias", "slice", "select",
             "as_strided", "t", "transpose", "expand", "detach", "alias", "unsqueeze", "squeeze", "_unsafe_view",
             "new_empty", "new_empty_strided", "lift_fresh", "permute", "resolve_conj", "resolve_neg",
             "result_type", "to", "_to_copy_noop", "contiguous", "numpy_T", "set_", "resize_"}


def aten_launches(prof) -> Counter:
    """The aten ops of a profile that would launch a GPU kernel: the outermost aten op of each
    nest (matmul launches through mm, zeros through zero_: one each), minus views and
    allocations, and nothing the Triton interpreter runs to emulate a kernel (under the
    "triton-launch" range). The profiler sees inside the custom ops, where the chunk loop runs."""
    launches = Counter()
    for event in prof.events():
        if not event.name.startswith("aten::") or event.name[6:] in NO_LAUNCH:
            continue
        parent, nested = event.cpu_parent, False
        while parent is not None:
            if parent.name.startswith("aten::") or parent.name == "triton-launch":
                nested = True
                break
            parent = parent.cpu_parent
        if not nested:
            launches[event.name[6:]] += 1
    return launches


def test_the_anchor_shape_runs_in_8_chunks_on_a_gpu():
    bf16 = torch.empty(0, dtype=torch.bfloat16)
    for windowed in (None, SEQ_LEN):
        rows = linear_cross_entropy._chunk_rows(N_ROWS, windowed, torch.device("cuda"),
                                                linear_cross_entropy._bytes_per_row(16384, 1, bf16, True))
        assert rows == 1152 and N_ROWS % rows == 0


# Per chunk: logits (guided: + target), the fused row kernel, the window gate, d hidden; per call,
# about 16 more (the reduction, the backward's scaling, the test's own clone and seed gradient).
@pytest.mark.parametrize("op, most", [("hard", 4 * 8 + 16), ("guided", 5 * 8 + 18)])
def test_launches_per_call_in_8_chunks(monkeypatch, op, most, capsys):
    """The Triton backend's kernels plus the aten ops that launch one, fwd + bwd, in the 8 chunks
    the GPU makes of the anchor's N = 9216 (here 8 chunks of 48 rows, the interpreter being slow).
    The previous design (512-row chunks: 18 of them, slice copies, per-chunk fills of partial
    buffers, a combine kernel, a sync) made about 220."""
    from triton.runtime.interpreter import InterpretedFunction

    monkeypatch.setenv("EARKIT_BACKEND", "triton")
    monkeypatch.setattr(linear_cross_entropy, "force_chunk_rows", 48)
    triton_launches = Counter()
    run = InterpretedFunction.run

    def counted(self, *args, **kwargs):
        triton_launches[self.fn.__name__] += 1
        with torch.profiler.record_function("triton-launch"):
            return run(self, *args, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", counted)
    inputs = anchor_like_inputs(n_inner=16, n_cols=32, n_rows=8 * 48, seq_len=48)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        call(op, *inputs)
    launches = aten_launches(prof)
    total = sum(launches.values()) + sum(triton_launches.values())
    with capsys.disabled():
        print(f"\n{op}: {total} launches: {dict(launches)} + Triton {dict(triton_launches)}")
    assert total <= most, (total, dict(launches), dict(triton_launches))


# ---------------------------------------------------------------- peak memory on the meta device


class LiveBytes(TorchDispatchMode):
    """Bytes of tensor storage alive at once, over the ops run inside: each op output that owns
    fresh storage (not a view, not an in-place or out= result) counts from its creation until
    its Python object is collected. On the meta device nothing is computed, only allocated."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0

    def _free(self, size):
        self.live -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if any(ret.alias_info is not None for ret in func._schema.returns):
            return result
        for tensor in (result if isinstance(result, (tuple, list)) else [result]):
            if isinstance(tensor, torch.Tensor):
                size = tensor.untyped_storage().nbytes()
                self.live += size
                self.peak = max(self.peak, self.live)
                weakref.finalize(tensor, self._free, size)
        return result


def meta_backend():
    """The Triton backend's launchers as they allocate on a GPU (outputs passed in, no scratch at
    this N: the rows are not split), with the kernels themselves left out."""
    def rows(*args, out=None, grad=None):
        return out

    def window_weights(loss, keep, seq_len, window, window_threshold, out=None):
        return keep if out is None else out  # the Triton launcher writes the gate into out

    def linear_logits(hidden, weight, bias, out):
        torch.mm(hidden, weight.t(), out_dtype=torch.float32, out=out)  # cuBLAS into the fp32 buffer

    def nothing(*args, **kwargs):
        return None

    return SimpleNamespace(hard_rows=rows, guided_rows=rows, window_weights=window_weights, hard_grad=nothing,
                           guided_grad=nothing, linear_weight=lambda w: w, linear_logits=linear_logits,
                           linear_target_logits=nothing)


def test_peak_extra_memory_of_the_hard_op_at_the_anchor_shape(monkeypatch):
    """<= 200 MB beside its inputs (Liger: 200 MB, torch.compile: 360 MB): d hidden (N x H bf16,
    75.5 MB) plus one chunk's fp32 logits and bf16 gradient (1152 x 16384 x 6 B, 113 MB)."""
    monkeypatch.setattr(linear_cross_entropy, "_linear_backend", lambda device, backend: meta_backend())
    with torch.device("meta"):
        hidden = torch.empty(N_ROWS // SEQ_LEN, SEQ_LEN, 4096, dtype=torch.bfloat16)
        weight = torch.empty(16384, 4096, dtype=torch.bfloat16)
        target = torch.zeros(hidden.shape[:-1], dtype=torch.long)
    tracker = LiveBytes()
    with tracker:
        loss, weights, lse, sink = linear_cross_entropy._hard_chunks(
            hidden, weight, None, target, -100, 0.5, 48, 1.0, True, False, False)
        grad_hidden = sink.outputs(hidden, hidden.shape)[0]
        dh = linear_cross_entropy._scaled_hidden_grad(grad_hidden, torch.ones((), device="meta"), weights, hidden)
        del loss, lse, sink, grad_hidden
    assert dh.shape == hidden.shape
    peak_mb = tracker.peak / 2**20
    assert peak_mb <= 200, peak_mb
    assert peak_mb >= 2 * N_ROWS * 4096 * 2 / 2**20  # d hidden, unscaled then scaled: the count is real
