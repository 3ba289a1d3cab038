"""The loss sequence's faster formulations give the values of the plain autograd ones.

``log_softmax_pick`` vs ``gather - logsumexp`` and ``do_rnnt_pruning``'s row ``index_select`` vs
a per-element ``gather``: forward bit for bit, gradients equal (``torch.equal``; a zero's
sign may differ, see ``log_softmax_pick.py``).
"""

from __future__ import annotations

import pytest
import torch

import zipasr.loss as L
from zipasr.loss.log_softmax_pick import log_softmax_pick


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.detach().contiguous().view(torch.int32 if x.dtype == torch.float32 else torch.int64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_log_softmax_pick_matches_autograd_formulation(dtype):
    g = torch.Generator().manual_seed(0)
    B, T, R, C = 2, 7, 3, 40
    logits = torch.randn(B, T, R, C, generator=g, dtype=dtype) * 4
    index = torch.randint(0, C, (B, T, R, 2), generator=g)
    index[0, :3, :, 1] = index[0, :3, :, 0]  # repeated targets (padded symbols == blank)
    index[1, 0, 0, :] = 5
    up = torch.randn(B, T, R, 2, generator=g, dtype=dtype)

    ref_in = logits.clone().requires_grad_()
    picked = torch.gather(ref_in, 3, index)
    norm = torch.logsumexp(ref_in, dim=3)
    ref = torch.stack([picked[..., 0] - norm, picked[..., 1] - norm], dim=-1)
    (ref * up).sum().backward()

    x = logits.clone().requires_grad_()
    out = log_softmax_pick(x, index)
    (out * up).sum().backward()
    assert torch.equal(_bits(out), _bits(ref))
    assert torch.equal(x.grad, ref_in.grad)
    nonzero = ref_in.grad != 0
    assert torch.equal(_bits(x.grad)[nonzero], _bits(ref_in.grad)[nonzero])
    # and it is d/dlogits of log_softmax: rows sum to zero up to rounding
    assert x.grad.sum(-1).abs().max() < (1e-5 if dtype == torch.float32 else 1e-12)


def test_do_rnnt_pruning_matches_gather():
    g = torch.Generator().manual_seed(1)
    B, T, S, R, D = 3, 9, 6, 3, 8
    lm = torch.randn(B, S + 1, D, generator=g)
    am = torch.randn(B, T, D, generator=g)
    ranges = torch.randint(0, S + 2 - R, (B, T, 1), generator=g) + torch.arange(R)
    up = torch.randn(B, T, R, D, generator=g)

    ref_lm = lm.clone().requires_grad_()
    ref = torch.gather(ref_lm, 1, ranges.reshape(B, T * R, 1).expand(B, T * R, D))
    (ref.reshape(B, T, R, D) * up).sum().backward()

    x = lm.clone().requires_grad_()
    _, lm_p = L.do_rnnt_pruning(am, x, ranges)
    (lm_p * up).sum().backward()
    assert torch.equal(_bits(lm_p), _bits(ref.reshape(B, T, R, D)))
    assert torch.equal(_bits(x.grad), _bits(ref_lm.grad))


def test_do_rnnt_pruning_rejects_out_of_range():
    am = torch.zeros(2, 4, 3)
    lm = torch.zeros(2, 5, 3)
    ranges = torch.arange(2).expand(2, 4, 2).clone()
    ranges[1, 2, 1] = 5  # row S+1 does not exist; as a flat index it is the next sequence's row
    with pytest.raises(ValueError, match="ranges"):
        L.do_rnnt_pruning(am, lm, ranges)
