"""The nn.Module drop-ins, and torch.compile(fullgraph=True) through both custom ops."""

import pytest
import torch
from torch import nn

from earkit.kernels import (GuidedCrossEntropyLoss, MaskedCrossEntropyLoss, guided_cross_entropy,
                            linear_guided_cross_entropy, linear_masked_cross_entropy, masked_cross_entropy)


class TinyHead(nn.Module):
    """hidden -> logits -> loss: the shape of an image-token head with its loss, whose other inputs
    (a target, or the concept and anchor logits) follow the hidden states."""

    def __init__(self, loss: nn.Module, hidden: int = 8, n_classes: int = 19):
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(hidden, n_classes)
        self.loss = loss

    def forward(self, hidden, *loss_inputs):
        return self.loss(self.proj(hidden), *loss_inputs)


def inputs(batch=2, seq_len=10, hidden=8, n_classes=19):
    generator = torch.Generator().manual_seed(3)
    h = torch.randn(batch, seq_len, hidden, generator=generator)
    target = torch.randint(0, n_classes, (batch, seq_len), generator=generator)
    target[0, 0] = -100
    concept = torch.randn(batch, seq_len, n_classes, generator=generator)
    anchor = concept + torch.randn(batch, seq_len, n_classes, generator=generator)
    return h, target, concept, anchor


def loss_and_grads(model, *args):
    model.zero_grad()
    loss = model(*args)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def test_masked_module_drops_in_for_cross_entropy_loss(backend):
    h, target, _, _ = inputs()
    ours = TinyHead(MaskedCrossEntropyLoss(ignore_index=-100, reduction="mean"))
    theirs = TinyHead(nn.CrossEntropyLoss(ignore_index=-100, reduction="mean"))
    flat_h, flat_target = h.reshape(-1, 8), target.reshape(-1)
    loss, grads = loss_and_grads(ours, flat_h, flat_target)
    want_loss, want_grads = loss_and_grads(theirs, flat_h, flat_target)
    torch.testing.assert_close(loss, want_loss)
    for grad, want in zip(grads, want_grads):
        torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-6)


def test_guided_module_is_the_functional_op(backend):
    h, _, concept, anchor = inputs()
    options = dict(threshold=0.2, window=4, window_threshold=0.5)
    module = TinyHead(GuidedCrossEntropyLoss(eta=1.5, reduction="sum", **options))
    loss = module(h, concept, anchor)
    torch.testing.assert_close(loss, guided_cross_entropy(module.proj(h), concept, anchor, eta=1.5, reduction="sum",
                                                          **options))
    assert "window=4" in repr(module.loss)


def test_modules_with_inplace_backward_on_an_expanded_input(backend):
    # The modules pass inplace_backward through: an input whose rows share memory (stride 0)
    # must get the same gradient as without it (a fresh buffer, not every row written on one).
    generator = torch.Generator().manual_seed(4)
    shape = (2, 5, 19)
    _, _, concept, anchor = inputs(batch=2, seq_len=5)
    target = torch.randint(0, 19, shape[:-1], generator=generator)
    row = torch.randn(19, generator=generator)
    options = dict(window=2, window_threshold=0.5)
    modules = [
        (MaskedCrossEntropyLoss, lambda loss, x: loss(x, target)),
        (GuidedCrossEntropyLoss, lambda loss, x: loss(x, concept, anchor)),
    ]
    for module, call in modules:
        grads = []
        for inplace_backward in (False, True):
            leaf = row.clone().requires_grad_()
            call(module(inplace_backward=inplace_backward, **options), leaf.expand(shape)).backward()
            grads.append(leaf.grad)
        assert grads[0].abs().sum() > 0
        torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)


@pytest.mark.parametrize("inplace_backward", [False, True])
@pytest.mark.parametrize("op", ["masked", "guided"])
def test_torch_compile_fullgraph(op, inplace_backward):
    torch._dynamo.reset()
    options = dict(threshold=0.1, window=4, window_threshold=0.3, inplace_backward=inplace_backward)
    h, target, concept, anchor = inputs()
    if op == "masked":
        model, args = TinyHead(MaskedCrossEntropyLoss(**options)), (h, target)
    else:
        model, args = TinyHead(GuidedCrossEntropyLoss(**options)), (h, concept, anchor)
    want_loss, want_grads = loss_and_grads(model, *args)
    compiled = torch.compile(model, fullgraph=True)
    loss, grads = loss_and_grads(compiled, *args)
    torch.testing.assert_close(loss, want_loss)
    for grad, want in zip(grads, want_grads):
        torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_ops_with_no_rows_agree_with_their_fake_kernels_and_compile(reduction):
    # (B, 0, V) windowed inputs: the real kernels return what the fake ones promise (opcheck runs
    # both, and the op through AOT autograd), and torch.compile(fullgraph=True) traces all four.
    logits = torch.randn(2, 0, 19, requires_grad=True)
    target = torch.zeros(2, 0, dtype=torch.long)
    hidden = torch.randn(2, 0, 8, requires_grad=True)
    weight = torch.randn(19, 8, requires_grad=True)
    bias = torch.randn(19, requires_grad=True)
    teacher, h_teacher = logits.detach(), hidden.detach()
    window = (3, 0.5)
    ops = torch.ops.earkit
    for op, args in [
        (ops.masked_cross_entropy, (logits, target, 0.1, -100, *window, reduction, True)),
        (ops.guided_cross_entropy, (logits, teacher, teacher, 1.0, 0.1, *window, reduction, True)),
        (ops.linear_masked_cross_entropy, (hidden, weight, bias, target, 0.1, -100, *window, reduction, True, True, True)),
        (ops.linear_guided_cross_entropy,
         (hidden, h_teacher, h_teacher, weight, bias, 1.0, 0.1, *window, reduction, True, True, True)),
    ]:
        torch.library.opcheck(op.default, args)
    if reduction != "mean":
        return

    def all_four(z, y, h, w, b):
        options = dict(threshold=0.1, window=3, window_threshold=0.5)
        return (masked_cross_entropy(z, y, inplace_backward=True, **options)
                + guided_cross_entropy(z, z.detach(), z.detach(), **options)
                + linear_masked_cross_entropy(h, w, y, b, **options)
                + linear_guided_cross_entropy(h, h.detach(), h.detach(), w, b, **options))

    torch._dynamo.reset()
    loss = torch.compile(all_four, fullgraph=True)(logits, target, hidden, weight, bias)
    loss.backward()
    assert loss.item() == 0.0
    assert logits.grad.shape == logits.shape and hidden.grad.shape == hidden.shape
    assert not weight.grad.any() and not bias.grad.any()
