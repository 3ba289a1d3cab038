"""The optimised encoder against the previous implementation and against float64.

Oracles: frozen copies of the functions the speed-up replaced (commit 6122159: Swoosh and
its quantised derivative, ActivationDropoutAndLinear, the attention weights' forward, the
convolution module's forward, the Balancer's backward), float64 autograd of the formulas
(BiasNorm, whitening, depthwise convolution), and, end to end, the same xs model run in
float64; a traced encoder must still follow the sequence length (ONNX export). "rel" below
is max |a - b| / max |b| per tensor.
"""

from __future__ import annotations

import copy
import random
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from zipasr.model import scaling
from zipasr.model.attention import MASK_VALUE, RelPositionMultiheadAttentionWeights
from zipasr.model.conv import ConvolutionModule, depthwise_conv1d_time_major
from zipasr.model.scaling import (
    ActivationDropoutAndLinear,
    Balancer,
    BiasNorm,
    SwooshL,
    SwooshR,
    penalize_abs_values_gt,
    softmax,
    whitening_metric,
    whitening_metric_grad,
)
from zipasr.model.subsampling import ConvNeXt
from zipasr.model.transducer import Transducer, make_pad_mask, set_batch_count

torch.set_num_threads(1)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max())


def seeded(seed: int = 1) -> None:
    torch.manual_seed(seed)
    random.seed(seed)


# ---------------------------------------------------------------------------------------
# Frozen copies of the previous code (6122159)
# ---------------------------------------------------------------------------------------

_OLD_SWOOSH = {"SwooshR": (1.0, 0.313261687, 0.925), "SwooshL": (4.0, 0.035, 1.0 - 0.08 + 0.005)}


def old_swoosh(x, kind, deriv):
    offset, const, _ = _OLD_SWOOSH[kind]
    t = x - offset
    d = torch.sigmoid(t).sub_(0.08) if deriv else None
    return F.softplus(t, beta=1.0, threshold=40.0).sub_(x, alpha=0.08).sub_(const), d


def old_quantize(d, kind):
    hi, lo = _OLD_SWOOSH[kind][2], -0.08
    return torch.rand_like(d).add_(d - lo, alpha=255.0 / (hi - lo)).to(torch.uint8)


def old_dequantize(q, kind):
    hi, lo = _OLD_SWOOSH[kind][2], -0.08
    return q.to(torch.float32) * ((hi - lo) / 255.0) + lo


def old_adal(x, weight, bias, kind, p, shared_dim):
    """Old ActivationDropoutAndLinear forward + the backward it defined, via autograd of
    the same operations (old forward values, old derivative)."""
    mask = None
    if p != 0.0:
        shape = list(x.shape)
        shape[shared_dim] = 1
        mask = (torch.rand(*shape) > p).to(x.dtype) * (1.0 / (1.0 - p))
    y, _ = old_swoosh(x.detach(), kind, deriv=False)
    d = old_swoosh(x.detach(), kind, deriv=True)[1]
    # y as a function of x with derivative d (what the old backward used).
    y = y + (x - x.detach()) * d
    if mask is not None:
        y = y * mask
    return F.linear(y, weight, bias)


def old_attention_forward(self, x, pos_emb, key_padding_mask=None, attn_mask=None):
    T, N, _ = x.shape
    H = self.num_heads
    q, k, p = self._split(self.in_proj(x))
    k = self.whiten_keys(self.balance_keys(k))
    q = q.reshape(T, N, H, -1).permute(2, 1, 0, 3)
    p = p.reshape(T, N, H, -1).permute(2, 1, 0, 3)
    k = k.reshape(T, N, H, -1).permute(2, 1, 3, 0)
    scores = torch.matmul(q, k)
    if not self.training or random.random() >= float(self.pos_emb_skip_rate):
        scores = scores + self._pos_scores(p, pos_emb, T)
    if self.training and random.random() < 0.1:
        scores = penalize_abs_values_gt(scores, limit=25.0, penalty=1.0e-04)
    if attn_mask is not None:
        scores = scores.masked_fill(attn_mask, MASK_VALUE)
    if key_padding_mask is not None:
        scores = scores.masked_fill(key_padding_mask.unsqueeze(1), MASK_VALUE)
    weights = softmax(scores, dim=-1)
    return nn.functional.dropout(weights, p=self.dropout, training=self.training)


def old_conv_module_forward(self, x, src_key_padding_mask=None, chunk_size=-1):
    x, s = self.in_proj(x).chunk(2, dim=-1)
    x = x * self.sigmoid(self.balancer1(s))
    x = x.permute(1, 2, 0)
    if src_key_padding_mask is not None:
        x = x.masked_fill(src_key_padding_mask.unsqueeze(1), 0.0)
    x = self.depthwise_conv(x)
    x = self.balancer2(x).permute(2, 0, 1)
    return self.out_proj(self.whiten(x))


def old_balancer_backward(x, x_grad, config):
    min_mean, max_mean, min_rms, max_rms, grad_scale, channel_dim = config
    dims = [i for i in range(x.ndim) if i != channel_dim]
    n = x.numel() // x.shape[channel_dim]
    mean = x.mean(dim=dims, keepdim=True)
    u = torch.linalg.vector_norm(x, 2, dim=dims, keepdim=True).square_().div_(n)
    v = u - mean * mean
    stddev = v.clamp(min=1.0e-20).sqrt()
    rms = u.clamp(min=1.0e-20).sqrt()
    m = mean / stddev
    dm = (m - m.clamp(min=min_mean, max=max_mean)).sign()
    dr = -(rms.clamp(min=min_rms, max=max_rms) / rms).log().sign() / rms
    d_std = dm * (-mean / (stddev * stddev)) * (v >= 1.0e-20) / (2.0 * stddev)
    d_u = d_std + dr * (u >= 1.0e-20) / (2.0 * rms)
    d_mean = dm / stddev - 2.0 * mean * d_std
    loss_grad = torch.addcmul(d_mean / n, d_u * (2.0 / n), x)
    lg_rms = torch.linalg.vector_norm(loss_grad, 2, dim=dims, keepdim=True)
    lg_rms = lg_rms.div_(n**0.5).clamp_(min=1.0e-20)
    return x_grad.abs().mul_(loss_grad).mul_(grad_scale / lg_rms).add_(x_grad)


# ---------------------------------------------------------------------------------------
# Swoosh, ActivationDropoutAndLinear
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["SwooshR", "SwooshL"])
@pytest.mark.parametrize("shape", [(3, 5, 7), (8, 1 << 16)])  # small; blockwise path
def test_swoosh_bit_identical_to_previous(kind, shape):
    """Value, quantised derivative (same noise stream) and gradient are bit-identical;
    the value is within 1e-6 of the float64 formula."""
    x = torch.randn(shape) * 4
    g = torch.randn(shape)
    module = SwooshR() if kind == "SwooshR" else SwooshL()
    xr = x.clone().requires_grad_()
    seeded(3)
    y = module(xr)
    y.backward(g)
    seeded(3)
    y_old, d = old_swoosh(x, kind, deriv=True)
    x_grad_old = g * old_dequantize(old_quantize(d, kind), kind)
    assert torch.equal(y, y_old)
    assert torch.equal(xr.grad, x_grad_old)
    with torch.no_grad():
        assert torch.equal(module(x), y_old)
    offset, const, _ = _OLD_SWOOSH[kind]
    x64 = x.double()
    assert rel(y, F.softplus(x64 - offset) - 0.08 * x64 - const) < 1e-6


def test_activation_dropout_and_linear_matches_previous():
    m = ActivationDropoutAndLinear(16, 9, activation="SwooshL", dropout_p=0.3,
                                   dropout_shared_dim=0)
    x = torch.randn(11, 3, 16) * 3
    g = torch.randn(11, 3, 9)
    xr = x.clone().requires_grad_()
    seeded()
    m(xr).backward(g)
    new = [xr.grad, m.weight.grad, m.bias.grad]
    m.zero_grad()
    xo = x.clone().requires_grad_()
    seeded()
    old_adal(xo, m.weight, m.bias, "SwooshL", 0.3, 0).backward(g)
    for a, b in zip(new, [xo.grad, m.weight.grad, m.bias.grad], strict=True):
        assert rel(a, b) < 1e-6


# ---------------------------------------------------------------------------------------
# Depthwise convolution, convolution module
# ---------------------------------------------------------------------------------------


def test_depthwise_conv1d_time_major_matches_conv1d_in_float64():
    conv = nn.Conv1d(6, 6, 7, groups=6, padding=3).double()
    x = torch.randn(9, 2, 6, dtype=torch.float64, requires_grad=True)
    y = depthwise_conv1d_time_major(x, conv)
    g = torch.randn_like(y)
    y.backward(g)
    grads = [x.grad, conv.weight.grad, conv.bias.grad]
    conv.zero_grad()
    x2 = x.detach().clone().requires_grad_()
    ref = conv(x2.permute(1, 2, 0)).permute(2, 0, 1)
    ref.backward(g)
    assert rel(y, ref) < 1e-12
    for a, b in zip(grads, [x2.grad, conv.weight.grad, conv.bias.grad], strict=True):
        assert rel(a, b) < 1e-12
    with torch.no_grad():  # the no-autograd path
        assert rel(depthwise_conv1d_time_major(x, conv), ref) < 1e-12
    # Shorter than the kernel: every output sees the zero padding on both sides.
    x3 = torch.randn(2, 1, 6, dtype=torch.float64)
    assert rel(depthwise_conv1d_time_major(x3, conv),
               conv(x3.permute(1, 2, 0)).permute(2, 0, 1)) < 1e-12


@pytest.mark.parametrize("training", [False, True])
def test_convolution_module_matches_previous(training):
    m = ConvolutionModule(16, 7, causal=False).train(training)
    x = torch.randn(13, 3, 16)
    mask = torch.zeros(3, 13, dtype=torch.bool)
    mask[1, 9:] = True
    g = torch.randn(13, 3, 16)

    def run(forward):
        xr = x.clone().requires_grad_()
        m.zero_grad()
        seeded()
        y = forward(m, xr, src_key_padding_mask=mask)
        y.backward(g)
        return [y, xr.grad] + [p.grad for p in m.parameters()]

    for a, b in zip(run(ConvolutionModule.forward), run(old_conv_module_forward), strict=True):
        assert rel(a, b) < 1e-6


# ---------------------------------------------------------------------------------------
# Attention weights
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("draw", [0.0, 0.5])  # 0.0: the penalty branch is taken
@pytest.mark.parametrize("padding", [False, True])
def test_attention_weights_match_previous(monkeypatch, draw, padding):
    T, N, C = 10, 2, 16
    m = RelPositionMultiheadAttentionWeights(C, pos_dim=8, num_heads=2, query_head_dim=4,
                                             pos_head_dim=2).train()
    with torch.no_grad():
        m.in_proj.weight.mul_(8.0)  # scores beyond the penalty's limit of 25
    x = torch.randn(T, N, C)
    pos = torch.randn(1, 2 * T - 1, 8)
    kpm = torch.zeros(N, T, dtype=torch.bool)
    if padding:
        kpm[1, 7:] = True
    attn_mask = torch.zeros(T, T, dtype=torch.bool)
    attn_mask[:, 8:] = True
    attn_mask[8:, 8:] = False
    g = torch.randn(2, N, T, T)
    monkeypatch.setattr(random, "random", lambda: draw)

    def run(forward):
        xr = x.clone().requires_grad_()
        m.zero_grad()
        y = forward(m, xr, pos, key_padding_mask=kpm, attn_mask=attn_mask)
        y.backward(g)
        return [y, xr.grad, m.in_proj.weight.grad, m.in_proj.bias.grad, m.linear_pos.weight.grad]

    new, old = run(RelPositionMultiheadAttentionWeights.forward), run(old_attention_forward)
    for a, b in zip(new, old, strict=True):
        assert rel(a, b) < 1e-6
    m.eval()
    with torch.no_grad():
        old = old_attention_forward(m, x, pos, kpm, attn_mask)
        assert rel(m(x, pos, kpm, attn_mask), old) < 1e-6


def test_softmax_backward_matches_float64_formula():
    x = torch.randn(3, 4, 9, requires_grad=True)
    g = torch.randn(3, 4, 9)
    softmax(x * 3, dim=-1).backward(g)
    a = torch.softmax(x.detach().double() * 3, -1)
    expected = 3 * a * (g.double() - (g.double() * a).sum(-1, keepdim=True))
    assert rel(x.grad, expected) < 1e-6


# ---------------------------------------------------------------------------------------
# BiasNorm, whitening, Balancer
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("channel_dim", [-1, 1])
def test_bias_norm_backward_matches_float64_autograd(channel_dim):
    m = BiasNorm(12, channel_dim=channel_dim).train()
    with torch.no_grad():
        m.bias.normal_()
        m.log_scale.fill_(0.4)
    x = torch.randn(5, 12, 7) if channel_dim == 1 else torch.randn(5, 7, 12)
    x = x * 2 + 0.5
    g = torch.randn_like(x)
    xr = x.clone().requires_grad_()
    m(xr).backward(g)
    x64 = x.double().requires_grad_()
    b64 = m.bias.detach().double().requires_grad_()
    s64 = m.log_scale.detach().double().requires_grad_()
    cd = channel_dim % 3
    b_shape = [-1] + [1] * (2 - cd)
    y64 = x64 / ((x64 - b64.reshape(b_shape)) ** 2).mean(cd, keepdim=True).sqrt() * s64.exp()
    y64.backward(g.double())
    assert rel(xr.grad, x64.grad) < 1e-6
    # The log_scale gradient is sum(g * y) over all 420 elements, terms of either sign: when
    # they nearly cancel, float32 rounding of the same sum is large against the result (up
    # to 8.6e-5 relative over random inputs) but not against the terms, which is what a
    # float32 sum can promise. (The bias gradient, a sum over positions, keeps 1e-5 of its
    # result: 3.4e-7 at most over the same inputs.)
    terms = (g.double() * y64).detach()
    assert abs(float(m.log_scale.grad) - float(s64.grad)) < 1e-6 * float(terms.abs().sum())
    assert rel(m.bias.grad, b64.grad) < 1e-5


@pytest.mark.parametrize("groups,frames", [(1, 300), (4, 300), (1, 10), (2, 5)])
def test_whitening_metric_grad_matches_float64_autograd(groups, frames):
    """Covariance route (more frames than channels per group) and Gram-matrix route."""
    x = torch.randn(frames, 16, dtype=torch.float64) @ torch.randn(16, 16, dtype=torch.float64)
    x = (x + 0.7).reshape(frames, 1, 16).requires_grad_()
    (expected,) = torch.autograd.grad(whitening_metric(x, groups), x)
    metric, grad = whitening_metric_grad(x.detach(), groups)
    assert float(metric) == pytest.approx(float(whitening_metric(x, groups)), rel=1e-12)
    assert grad.shape == x.shape
    assert rel(grad, expected) < 1e-10


@pytest.mark.parametrize("shape,channel_dim", [((6, 40, 24), -1), ((2, 24, 7, 9), 1),
                                               ((4, 1 << 14, 48), -1)])  # blockwise path
def test_balancer_backward_matches_previous(shape, channel_dim):
    C = shape[channel_dim]
    bal = Balancer(C, channel_dim=channel_dim, min_positive=0.3, max_positive=0.7,
                   min_abs=0.5, max_abs=1.0, prob=1.0)
    # Channels off-centre (a mean much larger than the spread: the variance must not be
    # taken as a difference of large numbers) and out of range both ways.
    scale_shape = [1] * len(shape)
    scale_shape[channel_dim] = C
    scale = torch.linspace(0.05, 4.0, C).reshape(scale_shape)
    shift = torch.linspace(-6.0, 6.0, C).reshape(scale_shape)
    x = torch.randn(shape) * scale + shift
    g = torch.randn(shape)
    xr = x.clone().requires_grad_()
    bal(xr).backward(g)
    config = (scaling._proportion_positive_to_mean(0.3), scaling._proportion_positive_to_mean(0.7),
              scaling._abs_to_rms(0.5), scaling._abs_to_rms(1.0), 0.04, channel_dim % len(shape))
    expected = old_balancer_backward(x.double(), g.double(), config)
    assert not torch.equal(xr.grad, g)  # the constraint did act
    # float32 statistics of off-centre channels against float64: up to 8.6e-7 over 40 random
    # inputs per shape (median 3e-7); a wrong term would be off by 1e-3 or more
    assert rel(xr.grad, expected) < 2e-6


# ---------------------------------------------------------------------------------------
# ConvNeXt without autograd
# ---------------------------------------------------------------------------------------


def test_convnext_no_grad_path_matches_autograd_path():
    m = ConvNeXt(8).eval()
    x = torch.randn(2, 8, 150, 19)  # 5700 rows: several blocks of the no-grad path
    with torch.no_grad():
        fast = m(x)
    xr = x.clone().requires_grad_()  # the autograd path
    assert rel(fast, m(xr)) < 1e-6


# ---------------------------------------------------------------------------------------
# End to end: the xs model against itself in float64
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def xs_pair():
    torch.manual_seed(0)
    model = Transducer.from_preset("xs")
    set_batch_count(model, 100000.0)  # late schedules, as in a long training run
    for module in model.modules():  # its rate-0.15 dropout draws dtype-dependent noise
        if hasattr(module, "encoder_pos"):
            module.encoder_pos.dropout.p = 0.0
    x = torch.randn(2, 160, 80, generator=torch.Generator().manual_seed(0))
    return model, copy.deepcopy(model).double(), x, torch.tensor([160, 131])


def test_xs_inference_matches_float64(xs_pair):
    model, model64, x, x_lens = xs_pair
    outs = []
    for m, dtype in ((model, torch.float32), (model64, torch.float64)):
        m.eval()
        with torch.inference_mode():
            outs.append(m.forward_encoder(x.to(dtype), x_lens)[0])
    # float32 rounding through the encoder: 5-7e-7 of the largest output over 16 inputs and
    # four CPU kernel choices (AVX-512, AVX2, default, oneDNN limited to AVX2)
    assert rel(*outs) < 2e-6


@pytest.mark.parametrize("draws", [1, 2, 3])
def test_xs_training_step_matches_float64(xs_pair, draws):
    """Encoder training forward + backward (dropout, layer skipping, balancers, whitening,
    the penalty draws) in float32 vs float64 with the same random draws (seeded by
    ``draws``). The Conv-Embed runs in eval mode without autograd: its stochastically
    rounded derivatives and its noise draws depend on the dtype, so float32 and float64
    would not be the same computation there."""
    model, model64, x, x_lens = xs_pair
    results = []
    for m, dtype in ((model, torch.float32), (model64, torch.float64)):
        m.train()
        m.encoder_embed.eval()
        m.zero_grad()
        seeded(draws)
        with torch.no_grad():
            e, e_lens = m.encoder_embed(x.to(dtype), x_lens)
        e = e.clone().requires_grad_()
        out, _ = m.encoder(e.permute(1, 0, 2), e_lens, make_pad_mask(e_lens, e.shape[1]))
        r = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
        (out * r).sum().backward()
        grads = {n: p.grad for n, p in m.encoder.named_parameters() if p.grad is not None}
        results.append((out, e.grad, grads))
    (out, e_grad, grads), (out64, e_grad64, grads64) = results
    # Bounds ~2.5x the largest float32-vs-float64 differences measured over 12 draw seeds
    # and four CPU kernel choices (AVX-512, AVX2, default, oneDNN limited to AVX2): output
    # 6.6e-7, input gradient 2.0e-6, worst parameter gradient 7.6e-6 of the largest
    # gradient, typical tensor 1.4e-6. The worst parameter gradient varies most with the
    # draws (median over seeds 1.0-1.6e-6); a wrong formula anywhere is off by 1e-4 or more.
    assert rel(out, out64) < 2e-6
    assert rel(e_grad, e_grad64) < 5e-6
    assert grads.keys() == grads64.keys() and len(grads) > 100
    # Parameter gradients: against the largest gradient, and per tensor for the typical
    # tensor. A few are sums that cancel to almost nothing (a key bias, which attention is
    # invariant to, has an exact gradient of 0), where float32 rounding of the same
    # computation is far above these bounds relative to the tensor itself.
    scale = max(float(g.abs().max()) for g in grads64.values())
    assert max(float((grads[k].double() - grads64[k]).abs().max()) for k in grads) < 2e-5 * scale
    per_tensor = sorted(rel(grads[k], grads64[k]) for k in grads)
    assert per_tensor[len(per_tensor) // 2] < 4e-6


def test_traced_encoder_follows_the_sequence_length(xs_pair):
    """The fast paths step aside while tracing (ONNX export): a graph traced at one length
    computes the eager result at another, padding included."""
    model = xs_pair[0].eval()

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, x, x_lens):
            return self.model.forward_encoder(x, x_lens)[0]

    torch.manual_seed(0)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(Encoder(), (torch.randn(2, 100, 80), torch.tensor([100, 100])),
                                 check_trace=False)
        x, x_lens = torch.randn(2, 140, 80), torch.tensor([140, 97])
        assert rel(traced(x, x_lens), model.forward_encoder(x, x_lens)[0]) < 1e-6
