"""pytest-benchmark of the loss ops on CPU: earkit's CPU backend vs the torch eager chain, fwd+bwd.

    pytest bench/test_kernels_cpu.py --benchmark-only
    pytest bench/test_kernels_cpu.py --benchmark-only --benchmark-group-by=param:op,param:dtype

Not part of the default test run (pyproject's testpaths is tests/). The same shape and the same
losses as `python -m earkit.bench kernels` (bench/loss_ops.py): N = 2304 tokens, V = 16384,
fp32 and bf16, threshold = the median fp32 loss; each round gets a fresh clone of the logits,
made in setup, outside the timed region (the in-place backward consumes it). Peak memory is
not measured here: that is what `python -m earkit.bench kernels` adds. The last cases are the
fused linear + loss ops (bf16, N = 576, H = 256, V = 16384) against F.linear + the eager chain.
"""

import pytest
import torch

from earkit.bench.baselines import guided_eager, hard_eager
from earkit.bench.loss_ops import DTYPES, fwd_bwd, guided_earkit, hard_earkit, make_inputs, median_thresholds

N, V = 2304, 16384
ROUNDS = 5


@pytest.fixture(scope="module")
def inputs():
    fp32 = make_inputs(N, V)
    return fp32, median_thresholds(fp32)


def loss_and_leaf(op, impl, dtype, inputs):
    """(the tensor that gets the gradient, loss_fn(leaf))."""
    fp32, thresholds = inputs
    threshold = thresholds[op]
    if op == "hard":
        target = fp32["target"]
        fns = {
            "torch_eager": lambda z: hard_eager(z, target, threshold),
            "earkit": lambda z: hard_earkit(z, target, threshold),
            "earkit_inplace": lambda z: hard_earkit(z, target, threshold, inplace=True),
        }
        return fp32["logits"].to(dtype), fns[impl]
    concept, anchor = fp32["concept"].to(dtype), fp32["anchor"].to(dtype)
    fns = {
        "torch_eager": lambda s: guided_eager(s, concept, anchor, threshold),
        "earkit": lambda s: guided_earkit(s, concept, anchor, threshold),
        "earkit_inplace": lambda s: guided_earkit(s, concept, anchor, threshold, inplace=True),
    }
    return fp32["student"].to(dtype), fns[impl]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("impl", ["torch_eager", "earkit", "earkit_inplace"])
@pytest.mark.parametrize("op", ["hard", "guided"])
def test_fwd_bwd(benchmark, inputs, op, impl, dtype):
    base, loss_fn = loss_and_leaf(op, impl, DTYPES[dtype], inputs)
    benchmark.group = f"{op} {dtype} N={N} V={V}"

    def fresh_leaf():
        return (base.clone().requires_grad_(True),), {}

    grad = benchmark.pedantic(lambda leaf: fwd_bwd(loss_fn, leaf), setup=fresh_leaf, rounds=ROUNDS,
                              warmup_rounds=1)
    assert grad.shape == base.shape and torch.isfinite(grad).all()


# ---------------------------------------------------------------- fused linear + loss (bench/linear.py)

LINEAR_SHAPE = (576, 256, 16384)  # N = one image of 576 tokens, a small H, Janus-Pro's V


@pytest.fixture(scope="module")
def linear_inputs():
    from earkit.bench.linear import make_inputs, token_losses

    n, h, v = LINEAR_SHAPE
    x = make_inputs(n, h, v, torch.bfloat16, torch.device("cpu"), seed=0)
    thresholds = {op: float(token_losses(op, x).median()) for op in ("hard", "guided")}
    return x, thresholds


@pytest.mark.parametrize("impl", ["torch_eager", "earkit"])
@pytest.mark.parametrize("op", ["hard", "guided"])
def test_linear_fwd_bwd(benchmark, linear_inputs, op, impl):
    from earkit.bench.linear import implementations

    x, thresholds = linear_inputs
    kept = torch.ones(LINEAR_SHAPE[0], dtype=torch.bool)
    rows = {name.split(" (")[0]: fn for name, _, fn in implementations(op, x, thresholds[op], kept, compile_=False)}
    fn = rows["torch eager" if impl == "torch_eager" else "earkit"]
    base = x["hidden" if op == "hard" else "student"]
    benchmark.group = f"linear {op} bf16 N,H,V={LINEAR_SHAPE}"

    def fresh_leaf():
        return (base.clone().requires_grad_(True),), {}

    grad = benchmark.pedantic(lambda leaf: fwd_bwd(fn, leaf), setup=fresh_leaf, rounds=ROUNDS, warmup_rounds=1)
    assert grad.shape == base.shape and torch.isfinite(grad).all()
