"""What the four public ops share (kernels/_shared.py and the keywords of every op): the backend
choice (the `backend=` argument, EARKIT_BACKEND over it) and return_weights, on every backend."""

import pytest
import torch

from earkit.kernels import (backend_name, guided_cross_entropy, linear_guided_cross_entropy,
                            linear_masked_cross_entropy, masked_cross_entropy, reference)
from earkit.kernels import testing as oracle
from earkit.kernels._shared import BACKENDS
from helpers import LOSS_TOL, threshold_in_gap


def small_inputs(op):
    """(args, keywords) of one small windowed call of `op`, with a token threshold and a window
    threshold that each drop some but not all, both in gaps between the float64 values."""
    generator = torch.Generator().manual_seed(0)
    randn = lambda *shape: torch.randn(*shape, generator=generator)  # noqa: E731
    target = torch.randint(0, 11, (2, 6), generator=generator)
    if op in ("masked", "guided"):
        concept = 3 * randn(2, 6, 11)
        args = (3 * randn(2, 6, 11), target) if op == "masked" else (concept + randn(2, 6, 11), concept,
                                                                      concept + randn(2, 6, 11))
    else:
        concept = randn(2, 6, 4)
        args = (randn(2, 6, 4), randn(11, 4), target) if op == "linear_masked" else (
            concept + 0.5 * randn(2, 6, 4), concept, concept + 0.5 * randn(2, 6, 4), randn(11, 4))
    threshold = threshold_in_gap(ORACLES[op](*args).token_loss, 0.3)
    sums = ORACLES[op](*args, threshold=threshold, window=2, window_threshold=1e9).window_sums
    return args, dict(threshold=threshold, window=2, window_threshold=threshold_in_gap(sums, 0.4))


OPS = {"masked": masked_cross_entropy, "guided": guided_cross_entropy,
       "linear_masked": linear_masked_cross_entropy, "linear_guided": linear_guided_cross_entropy}
ORACLES = {"masked": oracle.masked_cross_entropy, "guided": oracle.guided_cross_entropy,
           "linear_masked": oracle.linear_masked_cross_entropy, "linear_guided": oracle.linear_guided_cross_entropy}


def test_backend_name_precedence(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("EARKIT_BACKEND", raising=False)
    assert backend_name(cpu) == "native"  # automatic: the C++ twin is built in the test install
    assert backend_name(torch.device("cuda")) == "triton"
    for name in BACKENDS:
        assert backend_name(cpu, name) == name  # the argument, when the environment says nothing
    monkeypatch.setenv("EARKIT_BACKEND", "reference")
    assert backend_name(cpu) == "reference"
    assert backend_name(cpu, "native") == "reference"  # the environment overrides the argument


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("bad", ["cuda", "Triton", "", 1, True])
def test_a_bad_backend_is_a_value_error_naming_it(monkeypatch, op, bad):
    monkeypatch.delenv("EARKIT_BACKEND", raising=False)
    args, options = small_inputs(op)
    with pytest.raises(ValueError, match=r"backend must be one of triton, native, reference"):
        OPS[op](*args, backend=bad, **options)


@pytest.fixture
def reference_calls(monkeypatch):
    """Names of the reference backend's row functions as the ops call them."""
    calls = []
    for name in ("hard_rows", "guided_rows"):
        original = getattr(reference, name)

        def spy(*args, _original=original, _name=name, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(reference, name, spy)
    return calls


@pytest.mark.parametrize("op", OPS)
def test_the_backend_argument_picks_the_backend_and_the_environment_overrides_it(monkeypatch, reference_calls, op):
    args, options = small_inputs(op)
    monkeypatch.delenv("EARKIT_BACKEND", raising=False)
    want = OPS[op](*args, backend="native", **options)
    assert reference_calls == []
    assert torch.allclose(OPS[op](*args, backend="reference", **options), want, rtol=1e-5, atol=1e-6)
    assert len(reference_calls) == 1
    monkeypatch.setenv("EARKIT_BACKEND", "reference")
    OPS[op](*args, backend="native", **options)
    assert len(reference_calls) == 2
    monkeypatch.setenv("EARKIT_BACKEND", "native")
    OPS[op](*args, backend="reference", **options)
    assert len(reference_calls) == 2


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("name", BACKENDS)
def test_each_backend_value_runs_forward_and_backward(monkeypatch, op, name):
    monkeypatch.delenv("EARKIT_BACKEND", raising=False)
    args, options = small_inputs(op)
    leaf = args[0].clone().requires_grad_()
    loss, weights = OPS[op](leaf, *args[1:], backend=name, return_weights=True, **options)
    loss.backward()
    want = OPS[op](*args, backend="reference", **options)
    torch.testing.assert_close(loss.detach(), want, rtol=1e-5, atol=1e-6)
    assert leaf.grad is not None and weights.shape == args[0].shape[:-1]


@pytest.mark.parametrize("op", OPS)
def test_torch_compile_fullgraph_with_backend_and_weights(monkeypatch, op):
    torch._dynamo.reset()  # else the thresholds, new per op, turn into symbolic floats on recompiling
    monkeypatch.delenv("EARKIT_BACKEND", raising=False)
    args, options = small_inputs(op)

    def call(x, *rest):
        loss, weights = OPS[op](x, *rest, backend="reference", return_weights=True, **options)
        return loss * 2, weights

    leaf = args[0].clone().requires_grad_()
    loss, weights = torch.compile(call, fullgraph=True, backend="aot_eager")(leaf, *args[1:])
    loss.backward()
    want_loss, want_weights = call(args[0], *args[1:])
    torch.testing.assert_close(loss.detach(), want_loss)
    assert torch.equal(weights, want_weights) and leaf.grad is not None


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("name", BACKENDS)
def test_return_weights_are_the_oracle_weights_and_leave_the_loss_alone(monkeypatch, op, name):
    monkeypatch.delenv("EARKIT_BACKEND", raising=False)
    args, options = small_inputs(op)
    loss, weights = OPS[op](*args, return_weights=True, backend=name, **options)
    assert torch.equal(loss, OPS[op](*args, backend=name, **options))
    want = ORACLES[op](*args, **options)
    assert weights.shape == args[0].shape[:-1] and weights.dtype == torch.float32 and not weights.requires_grad
    assert torch.equal(weights.double().reshape(-1), want.weights)
    assert 0 < want.weights.sum() < want.weights.numel()  # the thresholds matter: some kept, some dropped
    assert 0 < (want.window_sums <= options["window_threshold"]).sum() < want.window_sums.numel()
    torch.testing.assert_close(loss.double(), want.loss, **LOSS_TOL)
