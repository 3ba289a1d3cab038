"""Zipformer modules against float64 re-derivations of their formulas."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from zipasr.model.attention import (
    CompactRelPositionalEncoding,
    NonlinAttention,
    RelPositionMultiheadAttentionWeights,
    SelfAttention,
    rel_to_abs,
)
from zipasr.model.config import ZipformerConfig
from zipasr.model.conv import ChunkCausalDepthwiseConv1d, ConvolutionModule
from zipasr.model.decoder import Decoder
from zipasr.model.joiner import Joiner
from zipasr.model.subsampling import Conv2dSubsampling
from zipasr.model.zipformer import (
    BypassModule,
    FeedforwardModule,
    SimpleDownsample,
    SimpleUpsample,
    Zipformer2,
)

torch.set_num_threads(1)


def swoosh_l64(x):
    return torch.log1p(torch.exp(x - 4)) - 0.08 * x - 0.035


def swoosh_r64(x):
    return torch.log1p(torch.exp(x - 1)) - 0.08 * x - 0.313261687


def randomize(module: torch.nn.Module, scale: float = 0.3, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def test_pos_encoding_formula():
    D = 16
    enc = CompactRelPositionalEncoding(D, dropout_rate=0.15).eval()
    T = 9
    pe = enc(torch.zeros(T, 1, 4))
    assert pe.shape == (1, 2 * T - 1, D)
    L = math.sqrt(D)
    for r in range(2 * T - 1):
        x = r - (T - 1)  # rows in increasing offset
        xc = L * math.copysign(1, x) * (math.log(abs(x) + L) - math.log(L)) if x else 0.0
        a = math.atan(xc / (D / (2 * math.pi)))
        row = [f(k * a) for k in range(1, D // 2 + 1) for f in (math.cos, math.sin)]
        row[-1] = 1.0
        torch.testing.assert_close(pe[0, r].double(), torch.tensor(row, dtype=torch.float64),
                                   rtol=0, atol=2e-6)
    # With a left context the table extends to more negative offsets.
    pe2 = enc(torch.zeros(T, 1, 4), left_context_len=5)
    assert pe2.shape == (1, 5 + 2 * T - 1, D)
    torch.testing.assert_close(pe2[0, 5:], pe[0])


def test_rel_to_abs_indexing():
    H, N, T = 2, 3, 5
    P = torch.randn(H, N, T, 2 * T - 1)
    out = rel_to_abs(P, T)
    for i in range(T):
        for j in range(T):
            assert torch.equal(out[:, :, i, j], P[:, :, i, (T - 1) - i + j])


def attention_weights64(m: RelPositionMultiheadAttentionWeights, x, pos_emb, kpm=None, am=None):
    """(H, N, T, T) from the formula: q_i.k_j + p_i.P(j - i), masked with -1000, softmax."""
    x, pos_emb = x.double(), pos_emb.double()
    H, Dq, Dp = m.num_heads, m.query_head_dim, m.pos_head_dim
    T, N, _ = x.shape
    proj = x @ m.in_proj.weight.double().T + m.in_proj.bias.double()
    q = proj[..., : H * Dq].reshape(T, N, H, Dq)
    k = proj[..., H * Dq : 2 * H * Dq].reshape(T, N, H, Dq)
    p = proj[..., 2 * H * Dq :].reshape(T, N, H, Dp)
    P = (pos_emb[0] @ m.linear_pos.weight.double().T).reshape(2 * T - 1, H, Dp)
    scores = torch.einsum("inhd,jnhd->hnij", q, k)
    offset = torch.arange(T)[None, :] - torch.arange(T)[:, None]  # j - i
    Pij = P[offset + T - 1]  # (T, T, H, Dp)
    scores = scores + torch.einsum("inhd,ijhd->hnij", p, Pij)
    if am is not None:
        scores = scores.masked_fill(am, -1000.0)
    if kpm is not None:
        scores = scores.masked_fill(kpm[None, :, None, :], -1000.0)
    return scores.softmax(-1)


def test_attention_weights_formula_and_masks():
    torch.manual_seed(0)
    C, H, T, N = 16, 3, 7, 2
    m = RelPositionMultiheadAttentionWeights(C, pos_dim=8, num_heads=H, query_head_dim=4,
                                             pos_head_dim=2).eval()
    randomize(m, 0.5)
    x = torch.randn(T, N, C)
    pos_emb = CompactRelPositionalEncoding(8, 0.0)(x)
    w = m(x, pos_emb)
    assert w.shape == (H, N, T, T)
    torch.testing.assert_close(w.double(), attention_weights64(m, x, pos_emb), rtol=1e-5,
                               atol=1e-6)

    kpm = torch.zeros(N, T, dtype=torch.bool)
    kpm[1, 4:] = True
    am = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
    am[0, 0] = True  # a fully masked row
    w = m(x, pos_emb, key_padding_mask=kpm, attn_mask=am)
    torch.testing.assert_close(w.double(), attention_weights64(m, x, pos_emb, kpm, am),
                               rtol=1e-5, atol=1e-6)
    assert torch.all(w[:, 1, :, 4:][:, 1:] == 0)  # padded keys get exactly 0
    torch.testing.assert_close(w[:, :, 0], torch.full_like(w[:, :, 0], 1 / T))  # uniform row


def test_self_attention_and_nonlin_attention_formulas():
    torch.manual_seed(0)
    C, H, T, N = 12, 3, 6, 2
    A = torch.randn(H, N, T, T).softmax(-1)
    x = torch.randn(T, N, C)
    sa = SelfAttention(C, H, value_head_dim=4).eval()
    randomize(sa, 0.4)
    v = (x.double() @ sa.in_proj.weight.double().T + sa.in_proj.bias.double()).reshape(T, N, H, 4)
    o = torch.einsum("hnij,jnhd->inhd", A.double(), v).reshape(T, N, H * 4)
    expected = o @ sa.out_proj.weight.double().T + sa.out_proj.bias.double()
    torch.testing.assert_close(sa(x, A).double(), expected, rtol=1e-5, atol=1e-6)

    nla = NonlinAttention(C, hidden_channels=9).eval()
    randomize(nla, 0.4)
    h = x.double() @ nla.in_proj.weight.double().T + nla.in_proj.bias.double()
    s, xx, y = h[..., :9], h[..., 9:18], h[..., 18:]
    z = torch.einsum("nij,jnc->inc", A[0].double(), xx * torch.tanh(s)) * y
    expected = z @ nla.out_proj.weight.double().T + nla.out_proj.bias.double()
    torch.testing.assert_close(nla(x, A[0:1]).double(), expected, rtol=1e-5, atol=1e-6)


def test_feedforward_formula():
    torch.manual_seed(0)
    ff = FeedforwardModule(10, 24, dropout=0.1).eval()
    randomize(ff, 0.4)
    x = torch.randn(5, 2, 10)
    h = x.double() @ ff.in_proj.weight.double().T + ff.in_proj.bias.double()
    expected = swoosh_l64(h) @ ff.out_proj.weight.double().T + ff.out_proj.bias.double()
    torch.testing.assert_close(ff(x).double(), expected, rtol=1e-5, atol=1e-6)


def conv_module64(m: ConvolutionModule, x, kpm=None):
    C = x.shape[-1]
    h = x.double() @ m.in_proj.weight.double().T + m.in_proj.bias.double()
    z = h[..., :C] * torch.sigmoid(h[..., C:])  # GLU
    if kpm is not None:
        z = z.masked_fill(kpm.T[..., None], 0.0)
    K = m.depthwise_conv.weight.shape[-1]
    zp = F.pad(z.permute(1, 2, 0), (K // 2, K // 2))
    w = m.depthwise_conv.weight.double()[:, 0]
    T = x.shape[0]
    conv = torch.stack([(zp[:, :, t : t + K] * w).sum(-1) for t in range(T)], 0)
    conv = conv + m.depthwise_conv.bias.double()
    return swoosh_r64(conv) @ m.out_proj.weight.double().T + m.out_proj.bias.double()


def test_convolution_module_formula_and_padding():
    torch.manual_seed(0)
    m = ConvolutionModule(6, 5, causal=False).eval()
    randomize(m, 0.5)
    x = torch.randn(9, 2, 6)
    torch.testing.assert_close(m(x).double(), conv_module64(m, x), rtol=1e-5, atol=1e-6)
    kpm = torch.zeros(2, 9, dtype=torch.bool)
    kpm[0, 6:] = True
    y = m(x, src_key_padding_mask=kpm)
    torch.testing.assert_close(y.double(), conv_module64(m, x, kpm), rtol=1e-5, atol=1e-6)
    x2 = x.clone()
    x2[6:, 0] = 1000.0  # garbage in padded frames must not reach valid frames
    y2 = m(x2, src_key_padding_mask=kpm)
    torch.testing.assert_close(y2[:6, 0], y[:6, 0])


def test_chunk_causal_conv_formula_and_causality():
    torch.manual_seed(0)
    C, K, T, chunk = 3, 5, 13, 4
    m = ChunkCausalDepthwiseConv1d(C, K)
    randomize(m, 0.5)
    x = torch.randn(2, C, T)
    y = m(x, chunk_size=chunk)
    # float64 re-derivation
    xd = x.double()
    wc, bc = m.causal_conv.weight.double()[:, 0], m.causal_conv.bias.double()
    wk, bk = m.chunkwise_conv.weight.double()[:, 0], m.chunkwise_conv.bias.double()
    sc = m.chunkwise_conv_scale.double()
    half = (K + 1) // 2
    xp = F.pad(xd, (K // 2, 0))
    expected = torch.zeros(2, C, T, dtype=torch.float64)
    for t in range(T):
        causal = (xp[:, :, t : t + half] * wc).sum(-1) + bc
        c0 = (t // chunk) * chunk
        pos = t - c0
        piece = xd[:, :, c0 : c0 + chunk]  # the last chunk may be short: zero-fill it
        chunk_x = F.pad(piece, (K // 2, K // 2 + chunk - piece.shape[-1]))
        within = (chunk_x[:, :, pos : pos + K] * wk).sum(-1) + bk
        left = sc[0, :, pos] if pos < K else 0.0
        right = sc[1, :, K - chunk + pos] if K - chunk + pos >= 0 else 0.0
        expected[:, :, t] = causal + within * (1.0 + left + right)
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-6)
    # Chunk-causal: changing frames of a later chunk leaves earlier chunks unchanged.
    x2 = x.clone()
    x2[..., 8:] = torch.randn(2, C, T - 8)
    torch.testing.assert_close(m(x2, chunk_size=chunk)[..., :8], y[..., :8])


def test_bypass_module():
    torch.manual_seed(0)
    b = BypassModule(4)
    with torch.no_grad():
        b.bypass_scale.copy_(torch.tensor([0.0, 0.5, 1.2, -0.3]))
    x0, x = torch.randn(3, 2, 4), torch.randn(3, 2, 4)
    b.eval()  # raw scale, no clamping
    torch.testing.assert_close(b(x0, x), x0 + (x - x0) * b.bypass_scale)
    b.train()
    b.skip_rate = 1.0  # every sequence skipped -> the module is bypassed
    torch.testing.assert_close(b(x0, x), x0)


def test_simple_downsample_and_upsample():
    d = SimpleDownsample(3, 4)
    with torch.no_grad():
        d.bias.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
    x = torch.randn(10, 2, 3)
    y = d(x)
    w = torch.softmax(torch.tensor([0.1, -0.2, 0.3, 0.0], dtype=torch.float64), 0)
    xp = torch.cat([x, x[-1:].expand(2, 2, 3)]).double()  # pad by repeating the last frame
    expected = (xp.reshape(3, 4, 2, 3) * w[None, :, None, None]).sum(1)
    torch.testing.assert_close(y.double(), expected)
    up = SimpleUpsample(3, 4)(y)
    assert up.shape == (12, 2, 3) and torch.equal(up[4:8], y[1:2].expand(4, 2, 3))


def test_conv2d_subsampling_lengths_and_flatten_order():
    torch.manual_seed(0)
    m = Conv2dSubsampling(80, 16).eval()
    for T in (9, 10, 11, 100, 101):
        x = torch.randn(1, T, 80)
        y, lens = m(x, torch.tensor([T]))
        assert y.shape == (1, (T - 7) // 2, 16) and lens.item() == (T - 7) // 2
    # Flatten is channel-major: feature index c * 19 + f.
    x = torch.randn(2, 41, 80)
    feats = m.convnext(m.conv(x.unsqueeze(1)))  # (N, 128, 17, 19)
    c, f = 5, 11
    with torch.no_grad():
        m.out.weight.zero_()
        m.out.bias.zero_()
        m.out.weight[0, c * 19 + f] = 1.0
        m.out_norm.bias.zero_()
    flat = torch.zeros(2, 17, 16)
    flat[..., 0] = feats[:, c, :, f]
    y, _ = m(x, torch.tensor([41, 41]))
    rms = flat.pow(2).mean(-1, keepdim=True).sqrt()
    torch.testing.assert_close(y, flat / rms * math.e, rtol=1e-5, atol=1e-5)


def test_stack_output_combination():
    z = Zipformer2(ZipformerConfig(
        downsampling_factor=(1, 2, 4, 8, 4, 2), encoder_dim=(8, 12, 16, 20, 16, 12),
        encoder_unmasked_dim=8, num_encoder_layers=1, num_heads=2, query_head_dim=4,
        value_head_dim=2, feedforward_dim=16, cnn_module_kernel=3, pos_dim=4))
    outputs = [torch.full((3, 1, d), float(i)) for i, d in enumerate(z.encoder_dim)]
    full = z._get_full_dim_output(outputs)[0, 0]
    # channels 0:12 from stack 5, 12:16 from stack 4, 16:20 from stack 3
    assert full.tolist() == [5.0] * 12 + [4.0] * 4 + [3.0] * 4


def test_feature_masks_per_sequence():
    z = Zipformer2(ZipformerConfig(
        downsampling_factor=(1, 2), encoder_dim=(8, 12), encoder_unmasked_dim=(4, 6),
        num_encoder_layers=1, num_heads=2, query_head_dim=4, value_head_dim=2,
        feedforward_dim=16, cnn_module_kernel=3, pos_dim=4))
    z.eval()
    assert z.get_feature_masks(torch.zeros(5, 3, 8)) == [1.0, 1.0]
    z.train()
    torch.manual_seed(0)
    masks = z.get_feature_masks(torch.zeros(5, 4000, 8))
    m0, m1 = masks[0][0], masks[1][0]  # (N, C)
    assert torch.all(m0[:, :4] == 1) and torch.all(m1[:, :6] == 1)
    assert torch.equal(m0[:, 4:6], m0[:, 4:5].expand(-1, 2))  # u1:u2 share mask1
    assert torch.equal(m1[:, 9:], m1[:, 9:10].expand(-1, 3))  # u2:C share mask2
    assert torch.equal(m0[:, 4], m1[:, 6]) and torch.equal(m0[:, 6], m1[:, 9])  # same draws
    assert torch.all(m0[:, 6] <= m0[:, 4])  # mask2 = mask1 AND another draw
    assert abs(1 - m0[:, 4].mean().item() - 0.125) < 0.02
    assert abs(1 - m0[:, 6].mean().item() - (1 - 0.875**2)) < 0.03


def test_decoder_and_joiner_formulas():
    torch.manual_seed(0)
    dec = Decoder(vocab_size=10, decoder_dim=8, blank_id=0, context_size=2).eval()
    y = torch.tensor([[0, 3, 5], [-1, 0, 2]])
    out = dec(y)
    emb = dec.embedding.weight.double()
    e = torch.where((y >= 0)[..., None], emb[y.clamp(min=0)], torch.zeros(1, dtype=torch.float64))
    e_prev = F.pad(e, (0, 0, 1, 0))[:, :-1]
    w = dec.conv.weight.double()  # (8, 4, 2): groups of 4 channels
    expected = torch.zeros(2, 3, 8, dtype=torch.float64)
    for o in range(8):
        g = o // 4
        ins = slice(4 * g, 4 * g + 4)
        expected[..., o] = ((e_prev[..., ins] * w[o, :, 0]).sum(-1)
                            + (e[..., ins] * w[o, :, 1]).sum(-1))
    torch.testing.assert_close(out.double(), expected.relu(), rtol=1e-5, atol=1e-6)
    one = dec(y[:, 1:], need_pad=False)
    torch.testing.assert_close(one, out[:, 2:])

    j = Joiner(6, 8, 5, 10)
    enc, dd = torch.randn(2, 3, 1, 6), torch.randn(2, 1, 4, 8)
    logits = j(enc, dd)
    h = torch.tanh(enc.double() @ j.encoder_proj.weight.double().T + j.encoder_proj.bias.double()
                   + dd.double() @ j.decoder_proj.weight.double().T
                   + j.decoder_proj.bias.double())
    expected = h @ j.output_linear.weight.double().T + j.output_linear.bias.double()
    assert logits.shape == (2, 3, 4, 10)
    torch.testing.assert_close(logits.double(), expected, rtol=1e-5, atol=1e-6)


def test_layer_drop_schedule_per_stack():
    """icefall's layer-skip schedule: layer l of stack i goes 0.5 -> 0.035 sqrt(ds_i) over its
    slice of [4000 (i+1)/7, 4000 (i+2)/7]."""
    from zipasr.model import Transducer

    m = Transducer.from_preset("xs", vocab_size=40).train()
    enc = m.encoder
    for i, stack in enumerate(enc.encoders):
        layers = stack.layers if hasattr(stack, "layers") else stack.encoder.layers
        ds = enc.downsampling_factor[i]
        begin, end = 4000 * (i + 1) / 7, 4000 * (i + 2) / 7
        delta = (end - begin) / len(layers)
        for l_idx, layer in enumerate(layers):
            sf = layer.bypass.skip_rate
            b = begin + l_idx * delta
            sf.batch_count = b - 1
            assert float(sf) == 0.5
            sf.batch_count = b + delta / 2
            assert abs(float(sf) - (0.5 + 0.035 * ds**0.5) / 2) < 1e-9
            sf.batch_count = b + delta
            assert abs(float(sf) - 0.035 * ds**0.5) < 1e-12
            sf.eval()
            assert float(sf) == 0.0
            sf.train()


def test_bypass_scale_limited_through_gradient_in_training():
    import random

    random.seed(1)
    # forward value unchanged, gradient pushes back inside [scale_min, scale_max]
    b = BypassModule(3, scale_min=0.2, scale_max=1.0).train()
    with torch.no_grad():
        b.bypass_scale.copy_(torch.tensor([0.1, 0.5, 1.5]))
    x0, x = torch.zeros(4, 1, 3), torch.ones(4, 1, 3)
    flipped = 0
    for _ in range(50):
        b.bypass_scale.grad = None
        y = b(x0, x)
        torch.testing.assert_close(y[0, 0], torch.tensor([0.1, 0.5, 1.5]))
        y.sum().backward()  # d/dscale = +4 everywhere: descent would lower all three
        g = b.bypass_scale.grad
        if g[0] < 0:
            flipped += 1
            assert g[1] > 0 and g[2] > 0  # inside: unchanged; above max: already inward
    assert 15 < flipped < 45  # limit_param_value applies with probability 0.6


def test_depthwise_conv2d_gradients_match_numerical():
    """The CPU depthwise conv's hand-written backward against finite differences (float64)."""
    from zipasr.model.subsampling import _DepthwiseConv2d

    torch.manual_seed(0)
    x = torch.randn(2, 3, 9, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 1, 7, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(_DepthwiseConv2d.apply(x, w, b, (3, 2)),
                               F.conv2d(x, w, b, padding=(3, 2), groups=3))
    assert torch.autograd.gradcheck(lambda *a: _DepthwiseConv2d.apply(*a, (3, 2)), (x, w, b))


def test_convnext_training_path_matches_formula():
    """ConvNeXt's channels-last training path: y = x + W2 SwooshL(W1 DWConv(x) + b1) + b2,
    computed here in float64 NCHW with plain convolutions and autograd; the balancers and
    the whitening (identity in the forward pass) and the quantized Swoosh derivative are
    replaced so the gradients are exact."""
    from zipasr.model.subsampling import ConvNeXt

    torch.manual_seed(0)
    m = ConvNeXt(6).train()
    m.hidden_balancer, m.out_balancer, m.out_whiten = nn.Identity(), nn.Identity(), nn.Identity()
    m.activation = _ExactSwooshL()
    x = torch.randn(2, 6, 11, 19, requires_grad=True)
    y = m(x)
    g = torch.randn_like(y)
    y.backward(g)

    x64 = x.detach().double().requires_grad_()
    p = {k: v.detach().double().requires_grad_() for k, v in m.named_parameters()}
    h = F.conv2d(x64, p["depthwise_conv.weight"], p["depthwise_conv.bias"], padding=3, groups=6)
    h = F.conv2d(h, p["pointwise_conv1.weight"], p["pointwise_conv1.bias"])
    h = F.softplus(h - 4) - 0.08 * h - 0.035
    ref = x64 + F.conv2d(h, p["pointwise_conv2.weight"], p["pointwise_conv2.bias"])
    ref.backward(g.double())
    assert y.shape == x.shape
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-5)
    for k, v in m.named_parameters():
        torch.testing.assert_close(v.grad.double(), p[k].grad, rtol=1e-4, atol=1e-6, msg=k)


class _ExactSwooshL(nn.Module):
    def forward(self, x):
        return F.softplus(x - 4) - 0.08 * x - 0.035
