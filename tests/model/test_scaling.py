"""Scaling blocks against their formulas (float64 re-derivations written here)."""

from __future__ import annotations

import math

import pytest
import torch

from zipasr.model.scaling import (
    ActivationDropoutAndLinear,
    Balancer,
    BiasNorm,
    Dropout3,
    ScaledLinear,
    ScheduledFloat,
    SwooshL,
    SwooshR,
    Whiten,
    convert_num_channels,
    limit_param_value,
    penalize_abs_values_gt,
    softmax,
    whitening_metric,
)
from zipasr.model.transducer import set_batch_count

torch.set_num_threads(1)

SWOOSH = {  # name: (offset, constant, module)
    "SwooshR": (1.0, 0.313261687, SwooshR),
    "SwooshL": (4.0, 0.035, SwooshL),
}


def swoosh64(x: torch.Tensor, offset: float, const: float) -> torch.Tensor:
    x = x.double()
    return torch.log1p(torch.exp(x - offset)) - 0.08 * x - const


@pytest.mark.parametrize("name", list(SWOOSH))
def test_swoosh_value_matches_formula(name):
    offset, const, cls = SWOOSH[name]
    x = torch.linspace(-30, 30, 2001)
    y = cls()(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.double(), swoosh64(x, offset, const), rtol=0, atol=2e-6)
    # No overflow for large inputs: the slope tends to 0.92.
    big = cls()(torch.tensor([200.0, -200.0]))
    assert torch.isfinite(big).all()
    assert abs(big[0].item() - (200 - offset - 0.08 * 200 - const)) < 1e-3


def test_swoosh_r_is_zero_at_zero():
    assert abs(SwooshR()(torch.zeros(1, dtype=torch.float64)).item()) < 1e-9


@pytest.mark.parametrize("name", list(SWOOSH))
def test_swoosh_gradient_is_quantised_derivative(name):
    offset, _, cls = SWOOSH[name]
    torch.manual_seed(0)
    x = (torch.randn(20000) * 4).requires_grad_()
    cls()(x).sum().backward()
    exact = torch.sigmoid(x.detach().double() - offset) - 0.08
    step = (1.005 if name == "SwooshL" else 1.005) / 255  # (hi - lo) / 255
    err = x.grad.double() - exact
    assert err.abs().max() <= step + 1e-6
    # Stochastic rounding preserves the expectation: same input many times.
    x2 = torch.full((200000,), 0.37, requires_grad=True)
    cls()(x2).sum().backward()
    exact2 = 1 / (1 + math.exp(-(0.37 - offset))) - 0.08
    assert abs(x2.grad.double().mean().item() - exact2) < 2e-4


def test_bias_norm_formula_and_backward():
    torch.manual_seed(0)
    C = 24
    m = BiasNorm(C)
    with torch.no_grad():
        m.bias.copy_(torch.randn(C))
        m.log_scale.fill_(0.3)
    x = torch.randn(5, 3, C) * 3 + 1
    rms = ((x.double() - m.bias.double()) ** 2).mean(-1, keepdim=True).sqrt()
    expected = x.double() / rms * math.exp(0.3)  # bias only inside the RMS, no epsilon
    m.eval()
    torch.testing.assert_close(m(x).double(), expected, rtol=1e-6, atol=1e-6)

    # Training: the memory-lean backward equals autograd of the float64 formula.
    m.train()
    x1 = x.clone().requires_grad_()
    g = torch.randn_like(x)
    m(x1).backward(g)
    x64 = x.double().requires_grad_()
    b64 = m.bias.detach().double().requires_grad_()
    s64 = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    y64 = x64 / ((x64 - b64) ** 2).mean(-1, keepdim=True).sqrt() * s64.exp()
    y64.backward(g.double())
    torch.testing.assert_close(x1.grad.double(), x64.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m.bias.grad.double(), b64.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(m.log_scale.grad.double(), s64.grad, rtol=1e-5, atol=1e-6)


def test_bias_norm_channel_dim_1():
    m = BiasNorm(6, channel_dim=1).eval()
    x = torch.randn(2, 6, 5)
    y = m(x)
    rms = ((x.double() - m.bias.double()[:, None]) ** 2).mean(1, keepdim=True).sqrt()
    torch.testing.assert_close(y.double(), x.double() / rms * math.e, rtol=1e-6, atol=1e-6)


def test_scheduled_float_schedule_default_and_batch_count():
    sf = ScheduledFloat((0.0, 0.3), (20000.0, 0.1), default=0.7)
    assert float(sf) == 0.7  # batch_count unset
    sf.batch_count = 10000
    assert float(sf) == pytest.approx(0.2)
    sf.batch_count = -5
    assert float(sf) == pytest.approx(0.3)
    sf.batch_count = 1e9
    assert float(sf) == pytest.approx(0.1)
    sf.eval()
    assert float(sf) == 0.7  # eval uses the default
    sf.train()
    shifted = sf + 1.0
    assert float(shifted) == pytest.approx(1.7)  # a new schedule: batch_count unset
    shifted.batch_count = 1e9
    assert float(shifted) == pytest.approx(1.1)
    sf3 = ScheduledFloat((0.0, 0.2), (4000.0, 0.05), (16000, 0.0))
    sf3.batch_count = 10000
    assert float(sf3) == pytest.approx(0.05 * (6000 / 12000))
    m = sf3.max(0.03)
    m.batch_count = 10000
    assert float(m) == pytest.approx(0.03)
    m.batch_count = 2000
    assert float(m) == pytest.approx(0.125)


def test_set_batch_count_reaches_every_scheduled_float():
    from zipasr.model import Transducer

    model = Transducer.from_preset("xs", vocab_size=40)
    set_batch_count(model, 1234.0)
    sfs = [m for m in model.modules() if isinstance(m, ScheduledFloat)]
    assert len(sfs) > 50
    assert all(sf.batch_count == 1234.0 for sf in sfs)


def test_scaled_linear_initial_scale():
    torch.manual_seed(0)
    ref = torch.nn.Linear(256, 256)
    torch.manual_seed(0)
    lin = ScaledLinear(256, 256, initial_scale=0.25)
    torch.testing.assert_close(lin.weight, ref.weight * 0.25)
    assert lin.bias.abs().max() <= 0.025 and lin.bias.abs().max() > 0.02


def _balancer_grad64(x, g, channel_dim, min_pos, max_pos, min_abs, max_abs, grad_scale):
    """Float64 re-derivation of the Balancer's gradient modification."""
    def to_mean(p):
        return 0.8139535143 * math.atanh(2 * p - 1) if 0 < p < 1 else (
            0.8139535143 * 0.5 * (math.log(2 * p + 1e-10) - math.log(2 - 2 * p + 1e-10)))

    x = x.double().requires_grad_()
    dims = [d for d in range(x.ndim) if d != channel_dim]
    mean = x.mean(dims, keepdim=True)
    rms = (x**2).mean(dims, keepdim=True).sqrt()
    std = (rms**2 - mean**2).clamp(min=1e-20).sqrt()
    m = mean / std
    lo, hi = to_mean(min_pos), to_mean(max_pos)
    loss = (m - m.clamp(lo, hi)).abs() + (
        rms.clamp(1.25331413732 * min_abs, 1.25331413732 * max_abs) / rms).log().abs()
    (lg,) = torch.autograd.grad(loss.sum(), x)
    lg = lg * grad_scale / (lg**2).mean(dims, keepdim=True).sqrt().clamp(min=1e-20)
    g = g.double()
    return g + g.abs() * lg


def test_balancer_gradient_effect():
    torch.manual_seed(0)
    C, T = 4, 2000
    x = torch.randn(T, C)
    x[:, 0] = x[:, 0].abs() + 0.1          # always positive: violates max_positive
    x[:, 1] = x[:, 1] * 20                  # too large: violates max_abs
    x[:, 2] = x[:, 2] * 0.01                # too small: violates min_abs
    # channel 3: zero-mean unit Gaussian, within all limits
    bal = Balancer(C, channel_dim=-1, min_positive=0.05, max_positive=0.95, min_abs=0.2,
                   max_abs=10.0, prob=1.0)
    xr = x.clone().requires_grad_()
    g = torch.randn(T, C)
    bal(xr).backward(g)
    assert torch.equal(bal(x), x)  # identity forward
    expected = _balancer_grad64(x, g, 1, 0.05, 0.95, 0.2, 10.0, 0.04)
    torch.testing.assert_close(xr.grad.double(), expected, rtol=1e-4, atol=1e-6)
    corr = (xr.grad - g) / g.abs()
    assert torch.equal(xr.grad[:, 3], g[:, 3])  # compliant channel untouched
    # Descent lowers the always-positive channel's mean (relative to its spread).
    assert corr[:, 0].mean() > 0.02
    assert (corr[:, 1] * x[:, 1].sign() > 0).all()  # shrink the too-large channel
    assert (corr[:, 2] * x[:, 2].sign() < 0).all()  # grow the too-small channel
    assert torch.allclose(corr.pow(2).mean(0)[:3].sqrt(), torch.tensor(0.04), rtol=1e-3)


def test_balancer_inactive_in_eval_and_with_prob_zero():
    x = (torch.randn(100, 3).abs() + 1).requires_grad_()
    bal = Balancer(3, channel_dim=-1, prob=0.0)
    g = torch.randn(100, 3)
    bal(x).backward(g)
    assert torch.equal(x.grad, g)


def test_whitening_metric_matches_eigenvalues():
    torch.manual_seed(0)
    x = torch.randn(500, 12) @ torch.randn(12, 12)
    for groups in (1, 3):
        metric = whitening_metric(x.double(), groups).item()
        xg = x.double().reshape(500, groups, -1).transpose(0, 1)
        xg = xg - xg.mean(1, keepdim=True)
        eig = torch.cat([torch.linalg.eigvalsh(g.T @ g) for g in xg])
        assert metric == pytest.approx((eig**2).mean().item() / eig.mean().item() ** 2, rel=1e-9)
    assert whitening_metric(torch.randn(100000, 8), 1).item() == pytest.approx(1.0, abs=0.01)


def test_whiten_gradient_effect():
    torch.manual_seed(0)
    T, C = 1000, 16
    white = torch.randn(T, C)
    correlated = torch.randn(T, 1) * torch.randn(1, C) * 5 + 0.1 * torch.randn(T, C)
    g = torch.randn(T, C)
    w = Whiten(num_groups=1, whitening_limit=2.0, prob=1.0, grad_scale=0.1)
    xw = white.clone().requires_grad_()
    w(xw).backward(g)
    assert torch.equal(xw.grad, g)  # metric ~1 < limit: unchanged

    xc = correlated.clone().requires_grad_()
    w(xc).backward(g)
    extra = (xc.grad - g).double()
    assert extra.norm().item() == pytest.approx(0.1 * g.norm().item(), rel=1e-4)
    x64 = correlated.double().requires_grad_()
    (mg,) = torch.autograd.grad(whitening_metric(x64, 1), x64)
    cos = (extra * mg).sum() / (extra.norm() * mg.norm())
    assert cos.item() > 0.9999  # the added gradient is the metric's gradient
    # Descending along it makes the data whiter.
    assert whitening_metric(correlated - 10 * extra.float(), 1) < whitening_metric(correlated, 1)


def test_activation_dropout_and_linear_eval_and_train():
    torch.manual_seed(0)
    for act, (offset, const, _) in SWOOSH.items():
        m = ActivationDropoutAndLinear(8, 5, activation=act, dropout_p=0.5,
                                       dropout_shared_dim=0, initial_scale=0.5)
        x = torch.randn(7, 3, 8) * 3
        m.eval()
        expected = swoosh64(x, offset, const) @ m.weight.double().T + m.bias.double()
        torch.testing.assert_close(m(x).double(), expected, rtol=1e-5, atol=1e-6)

        # Training: dropout mask shared along dim 0, scaled by 1/(1-p) = 2.
        m.train()
        with torch.no_grad():
            m.weight.zero_()
            m.weight[:5, :5] = torch.eye(5)
            m.bias.zero_()
        xr = x.clone().requires_grad_()
        y = m(xr)
        ratio = y / swoosh64(x[..., :5], offset, const).float()
        mask = torch.round(ratio[0]).double()  # (3, 5), one mask for all 7 frames
        assert set(mask.unique().tolist()) <= {0.0, 2.0}
        torch.testing.assert_close(y.double(), swoosh64(x[..., :5], offset, const) * mask,
                                   rtol=1e-5, atol=1e-6)
        g = torch.randn_like(y)
        y.backward(g)
        deriv = torch.sigmoid(x[..., :5].double() - offset) - 0.08
        torch.testing.assert_close(xr.grad[..., :5].double(), g.double() * mask * deriv,
                                   rtol=1e-5, atol=1e-6)
        assert torch.equal(xr.grad[..., 5:], torch.zeros_like(xr.grad[..., 5:]))


def test_dropout3_shares_mask():
    d = Dropout3(0.5, shared_dim=1)
    x = torch.ones(4, 50, 6)
    y = d(x)
    assert set(y.unique().tolist()) <= {0.0, 2.0}
    assert torch.equal(y, y[:, :1].expand_as(y))
    d.eval()
    assert torch.equal(d(x), x)


def test_limit_param_value_flips_outward_gradients():
    x = torch.tensor([-2.0, 0.0, 2.0], requires_grad=True)
    y = limit_param_value(x, min=-1.0, max=1.0, prob=1.0)
    torch.testing.assert_close(y, x)
    y.backward(torch.tensor([1.0, 1.0, -1.0]))
    # below min with positive grad -> negated; above max with negative grad -> negated
    assert x.grad.tolist() == [-1.0, 1.0, 1.0]


def test_penalize_abs_values_gt_adds_sign_penalty():
    x = torch.tensor([-30.0, -5.0, 5.0, 40.0], requires_grad=True)
    y = penalize_abs_values_gt(x, limit=25.0, penalty=0.5)
    torch.testing.assert_close(y, x)
    y.sum().backward()
    assert x.grad.tolist() == [0.5, 1.0, 1.0, 1.5]


def test_softmax_backward_matches_autograd():
    x = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    g = torch.randn(3, 7, dtype=torch.float64)
    softmax(x, -1).backward(g)
    x2.softmax(-1).backward(g)
    torch.testing.assert_close(x.grad, x2.grad)


def test_convert_num_channels():
    x = torch.randn(2, 3, 5)
    assert torch.equal(convert_num_channels(x, 3), x[..., :3])
    y = convert_num_channels(x, 8)
    assert torch.equal(y[..., :5], x) and torch.equal(y[..., 5:], torch.zeros(2, 3, 3))


def test_whiten_probability_switches_with_metric():
    torch.manual_seed(0)
    w = Whiten(num_groups=1, whitening_limit=2.0, prob=(0.025, 0.25), grad_scale=0.1)
    assert w.prob == 0.25
    white = torch.randn(2000, 8, requires_grad=True)
    while True:  # applied with probability 0.25 per call
        y = w(white)
        if y.grad_fn is not None and "Whitening" in type(y.grad_fn).__name__:
            break
    y.sum().backward()
    assert w.prob == 0.025  # under the limit: check less often
    correlated = (torch.randn(2000, 1) * torch.ones(1, 8)).requires_grad_()
    hits = 0
    for _ in range(400):
        y = w(correlated)
        if "Whitening" in type(y.grad_fn).__name__:
            hits += 1
            y.sum().backward()
    assert w.prob == 0.25 and hits > 40  # over the limit: back to max_prob


def test_balancer_applied_with_its_probability():
    import random

    random.seed(0)
    bal = Balancer(3, channel_dim=-1, prob=0.3)
    x = torch.randn(10, 3, requires_grad=True)
    hits = sum("Balancer" in type(bal(x).grad_fn).__name__ for _ in range(2000))
    assert abs(hits / 2000 - 0.3) < 0.04


@pytest.mark.parametrize("shape,channel_dim", [((3, 50, 6), 2), ((2, 6, 40, 5), 1), ((400, 6), 1)])
def test_balancer_loss_grad_closed_form_matches_autograd(shape, channel_dim):
    """The closed-form gradient of the balancer loss against float64 autograd, with every
    kind of violation: rms too high and too low, mean too high and too low (channels 1-4),
    and two compliant channels."""
    from zipasr.model.scaling import balancer_loss, balancer_loss_grad

    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64)
    scale = torch.tensor([1.0, 30.0, 0.01, 1.0, 1.0, 1.0], dtype=torch.float64)
    shift = torch.tensor([0.0, 0.0, 0.0, 3.0, -3.0, 0.0], dtype=torch.float64)
    view = [1] * len(shape)
    view[channel_dim] = 6
    x = x * scale.view(view) + shift.view(view)
    limits = (-1.0, 1.0, 0.25, 12.5)
    xr = x.clone().requires_grad_()
    (expected,) = torch.autograd.grad(balancer_loss(xr, channel_dim, *limits).sum(), xr)
    got = balancer_loss_grad(x, channel_dim, *limits)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-14)
    per_channel = expected.abs().sum(dim=[i for i in range(x.ndim) if i != channel_dim])
    assert per_channel[0] == per_channel[5] == 0 and (per_channel[1:5] > 0).all()
