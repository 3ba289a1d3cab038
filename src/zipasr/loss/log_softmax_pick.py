"""A few log-softmax entries of big logits, with a backward that allocates one gradient.

The pruned loss needs ``log_softmax(logits)[..., c]`` for two classes per (b, t, r) of a
(B, T, R, C) joiner output.  Written as ``gather(logits) - logsumexp(logits)``, autograd builds
two (B, T, R, C) gradients (the logsumexp's dense one and a zero-filled one-hot from the gather)
and adds them.  :class:`LogSoftmaxPick` writes the dense term once and adds the few picked
entries in place: the same float operations in the same order, so the same values (only the
sign of a zero gradient may differ: autograd's ``dense + 0`` turns ``-0.0`` into ``+0.0``).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable


class LogSoftmaxPick(torch.autograd.Function):
    """``(logits, index) -> gather(logits, -1, index) - logsumexp(logits, -1)``."""

    @staticmethod
    def forward(ctx, logits: Tensor, index: Tensor) -> Tensor:
        norm = torch.logsumexp(logits, dim=-1, keepdim=True)
        ctx.save_for_backward(logits, norm, index)
        return torch.gather(logits, -1, index) - norm

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        logits, norm, index = ctx.saved_tensors
        # logsumexp's backward: grad_norm * exp(logits - norm), grad_norm = -sum_k grad_k
        grad_norm = -grad.sum(dim=-1, keepdim=True)
        out = (logits - norm).exp_().mul_(grad_norm)
        # the one-hot part, summed per target entry as a scatter_add into zeros would
        # (ascending k from +0.0) so repeated indices give the same rounding
        hot = torch.zeros_like(grad)
        for j in range(index.shape[-1]):
            same = index == index[..., j : j + 1]
            hot = torch.where(same, hot + grad[..., j : j + 1], hot)
        out.scatter_(-1, index, torch.gather(out, -1, index) + hot)
        return out, None


def log_softmax_pick(logits: Tensor, index: Tensor) -> Tensor:
    """``log_softmax(logits, -1).gather(-1, index)``; logits (..., C), index int64 (..., K)
    -> (..., K)."""
    return LogSoftmaxPick.apply(logits, index)
