"""The torch eager chains every benchmark table measures earkit's loss ops against (bench/loss_ops.py
for the loss given the logits, bench/linear.py after F.linear, bench/gpu_check.py on a GPU), and
the name of the CPU the tables ran on.

    hard    F.cross_entropy(reduction="none") -> keep loss > threshold -> mean over kept
    guided  p = softmax((1 + eta) z_a - eta z_c), KL(p || softmax(s)) per token via log_softmax,
            keep > threshold, mean over kept

With upcast=True the chain runs after .float() (what earkit computes: fp32 math).
"""

from __future__ import annotations

import platform

import torch
import torch.nn.functional as F

ETA = 1.0


def hard_eager(logits, target, threshold, upcast=False):
    z = logits.float() if upcast else logits
    token_loss = F.cross_entropy(z.flatten(0, -2), target.flatten(), reduction="none")
    keep = (token_loss.detach() > threshold).to(token_loss.dtype)
    return (token_loss * keep).sum() / keep.sum().clamp_min(1)


def guided_eager(student, concept, anchor, threshold, upcast=False, eta=ETA):
    s, zc, za = (x.float() for x in (student, concept, anchor)) if upcast else (student, concept, anchor)
    with torch.no_grad():  # the teachers are constants
        log_p = F.log_softmax((1 + eta) * za - eta * zc, dim=-1)
    log_q = F.log_softmax(s, dim=-1)
    token_loss = F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)
    keep = (token_loss.detach() > threshold).to(token_loss.dtype)
    return (token_loss * keep).sum() / keep.sum().clamp_min(1)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
