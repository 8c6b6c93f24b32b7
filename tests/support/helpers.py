"""Small pieces shared by the op tests: tolerances per dtype and threshold choice (the float64 oracles
themselves are earkit.kernels.testing)."""

import torch

# Loss values are fp32 whatever the input dtype, and the float64 reference sees the same rounded
# inputs, so they are compared tightly. Gradients are stored in the input dtype: one rounding
# step of it (toward zero under the Triton interpreter, hence a full ulp).
LOSS_TOL = dict(rtol=1e-4, atol=1e-5)
GRAD_TOL = {
    torch.float32: dict(rtol=1e-4, atol=1e-6),
    torch.float16: dict(rtol=2e-3, atol=1e-6),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-6),
}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
REDUCTIONS = ["none", "sum", "mean"]


def threshold_in_gap(values: torch.Tensor, quantile: float) -> float:
    """A threshold near `quantile` of `values` but halfway between two of them, so fp32 rounding
    in a backend can never move a value across it."""
    finite = torch.sort(values[torch.isfinite(values)].double().flatten()).values
    if finite.numel() < 2:
        return float(finite[0] - 1.0) if finite.numel() else 0.0
    index = min(max(int(quantile * (finite.numel() - 1)), 0), finite.numel() - 2)
    return float((finite[index] + finite[index + 1]) / 2)


def far_from(values: torch.Tensor, threshold, margin: float = 1e-4) -> bool:
    if threshold is None:
        return True
    return bool(((values.double() - threshold).abs() > margin).all())


def usage_error(capsys, argv) -> str:
    """Run `earkit ARGV` in-process and return the error it ended with: exit status 2 and exactly
    one line of it, the last on stderr, no traceback (progress bars of model loading may come
    before it)."""
    from earkit.cli import main

    capsys.readouterr()
    assert main(argv) == 2
    stderr = capsys.readouterr().err
    lines = [line for line in stderr.replace("\r", "\n").splitlines() if line.strip()]
    assert "Traceback" not in stderr and lines, stderr
    errors = [line for line in lines if line.startswith("earkit ")]
    assert len(errors) == 1 and errors[0] == lines[-1], lines
    return errors[0]


SHARED_MEMORY_LAYOUTS = ["expanded", "sliding"]


def rows_sharing_memory(layout, shape, generator):
    """(source, make): make(source) is a (..., V) tensor of `shape` whose rows overlap in memory,
    "expanded" (one row, stride 0 along every row dimension, as x.expand gives) or "sliding"
    (row i starts one element after row i - 1). make works on any tensor like source, so
    autograd through it maps a gradient of the rows back to the source."""
    n_classes = shape[-1]
    n_rows = 1
    for size in shape[:-1]:
        n_rows *= size
    if layout == "expanded":
        return 3 * torch.randn(n_classes, generator=generator), lambda source: source.expand(shape)
    row_strides = []
    stride = 1
    for size in reversed(shape[:-1]):
        row_strides.insert(0, stride)
        stride *= size
    source = 3 * torch.randn(n_rows + n_classes - 1, generator=generator)
    return source, lambda source: source.as_strided(shape, tuple(row_strides) + (1,))


def rounding_floors(row_scale, hidden, weight, ulps: float = 16.0):
    """How close a linear + loss op's fp32 gradients can come to float64, from the rounding of the
    probabilities alone: row i of the logits' gradient is a_i (q_i - p_i) (or - onehot), with q and
    p known to about one fp32 ulp of 1 each, so when q ~ p (a student near its target) d hidden,
    d weight and d bias are small sums whose error is set by the size of their terms, not by
    their own size. Returns the floors for (d hidden, d weight, d bias) in their shapes."""
    eps = ulps * torch.finfo(torch.float32).eps
    scale = row_scale.detach().double().abs().reshape(-1)
    rows = hidden.detach().double().abs().reshape(scale.numel(), -1)
    weight = weight.detach().double().abs()
    d_hidden = eps * scale[:, None] * weight.sum(0)[None, :]
    d_weight = eps * (scale @ rows)[None, :].expand(weight.shape[0], -1)
    d_bias = eps * scale.sum().expand(weight.shape[0])
    return [d_hidden.reshape(hidden.shape), d_weight, d_bias]


def empty_cases(last: int) -> list:
    """Inputs with no rows, as (shape, op options) with `last` as the class (or hidden) dimension:
    windowed with and without a gate, no sequences, and unwindowed. Ids: EMPTY_IDS."""
    return [((2, 0, last), dict(window=3, window_threshold=0.5)), ((2, 0, last), dict(window=3)),
            ((0, 4, last), dict(window=3, window_threshold=0.5)), ((0, last), {}), ((2, 0, last), {})]


EMPTY_IDS = ["B0-window", "B0-window-no-gate", "0T-window", "0", "B0"]
