"""The whole model: parameter counts, icefall state-dict layout, lengths, ragged batches,
training forward/backward, bf16 autocast, the model-info CLI."""

from __future__ import annotations

import argparse

import pytest
import torch

from zipasr.model import Transducer, ZipformerConfig, make_pad_mask, set_batch_count
from zipasr.model.cli import register

torch.set_num_threads(1)


def build_meta(name: str, **kw) -> Transducer:
    with torch.device("meta"):
        return Transducer.from_preset(name, **kw)


@pytest.mark.parametrize(
    "name,causal,use_ctc,expected",
    [
        ("S", False, False, 23_285_615),
        ("M", False, False, 65_549_011),
        ("L", False, False, 148_439_574),
        ("M", True, False, 66_110_931),
        ("M", False, True, 65_805_511),
    ],
)
def test_parameter_counts(name, causal, use_ctc, expected):
    m = build_meta(name, vocab_size=500, causal=causal, use_ctc=use_ctc)
    assert sum(p.numel() for p in m.parameters()) == expected


def test_component_counts_match_icefall():
    counts = build_meta("M", vocab_size=500).num_params_by_component()
    assert counts == {
        "encoder_embed": 611_953, "encoder": 63_382_150, "decoder": 260_096,
        "joiner": 781_812, "simple_am_proj": 256_500, "simple_lm_proj": 256_500,
        "total": 65_549_011,
    }


def test_state_dict_layout_m():
    """Names and shapes of icefall's AsrModel (M, non-causal)."""
    m = build_meta("M", vocab_size=500)
    sd = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert len(list(m.buffers())) == 0 and len(sd) == len(list(m.parameters()))
    expected = {
        "encoder_embed.conv.0.weight": (8, 1, 3, 3), "encoder_embed.conv.0.bias": (8,),
        "encoder_embed.conv.4.weight": (32, 8, 3, 3), "encoder_embed.conv.4.bias": (32,),
        "encoder_embed.conv.7.weight": (128, 32, 3, 3), "encoder_embed.conv.7.bias": (128,),
        "encoder_embed.convnext.depthwise_conv.weight": (128, 1, 7, 7),
        "encoder_embed.convnext.depthwise_conv.bias": (128,),
        "encoder_embed.convnext.pointwise_conv1.weight": (384, 128, 1, 1),
        "encoder_embed.convnext.pointwise_conv1.bias": (384,),
        "encoder_embed.convnext.pointwise_conv2.weight": (128, 384, 1, 1),
        "encoder_embed.convnext.pointwise_conv2.bias": (128,),
        "encoder_embed.out.weight": (192, 2432), "encoder_embed.out.bias": (192,),
        "encoder_embed.out_norm.log_scale": (), "encoder_embed.out_norm.bias": (192,),
        "encoder.encoders.1.downsample.bias": (2,),
        "encoder.encoders.3.downsample.bias": (8,),
        "encoder.encoders.1.out_combiner.bypass_scale": (256,),
        "encoder.downsample_output.bias": (2,),
        "decoder.embedding.weight": (500, 512), "decoder.conv.weight": (512, 4, 2),
        "joiner.encoder_proj.weight": (512, 512), "joiner.encoder_proj.bias": (512,),
        "joiner.decoder_proj.weight": (512, 512), "joiner.decoder_proj.bias": (512,),
        "joiner.output_linear.weight": (500, 512), "joiner.output_linear.bias": (500,),
        "simple_am_proj.weight": (500, 512), "simple_am_proj.bias": (500,),
        "simple_lm_proj.weight": (500, 512), "simple_lm_proj.bias": (500,),
        # stack 3 of M: C=512, H=8
        "encoder.encoders.3.encoder.layers.0.self_attn_weights.in_proj.weight": (544, 512),
        "encoder.encoders.3.encoder.layers.0.self_attn_weights.linear_pos.weight": (32, 48),
        "encoder.encoders.3.encoder.layers.0.self_attn1.in_proj.weight": (96, 512),
    }
    for k, shape in expected.items():
        assert sd.get(k) == shape, k
    P = "encoder.encoders.0.layers.0."
    C, F = 192, 512
    layer = {
        "bypass_scale": (C,), "bypass.bypass_scale": (C,), "bypass_mid.bypass_scale": (C,),
        "self_attn_weights.in_proj.weight": (272, C), "self_attn_weights.in_proj.bias": (272,),
        "self_attn_weights.linear_pos.weight": (16, 48),
        "self_attn1.in_proj.weight": (48, C), "self_attn1.in_proj.bias": (48,),
        "self_attn1.out_proj.weight": (C, 48), "self_attn1.out_proj.bias": (C,),
        "self_attn2.in_proj.weight": (48, C), "self_attn2.in_proj.bias": (48,),
        "self_attn2.out_proj.weight": (C, 48), "self_attn2.out_proj.bias": (C,),
        "feed_forward1.in_proj.weight": (3 * F // 4, C), "feed_forward1.in_proj.bias": (384,),
        "feed_forward1.out_proj.weight": (C, 384), "feed_forward1.out_proj.bias": (C,),
        "feed_forward2.in_proj.weight": (F, C), "feed_forward2.in_proj.bias": (F,),
        "feed_forward2.out_proj.weight": (C, F), "feed_forward2.out_proj.bias": (C,),
        "feed_forward3.in_proj.weight": (640, C), "feed_forward3.in_proj.bias": (640,),
        "feed_forward3.out_proj.weight": (C, 640), "feed_forward3.out_proj.bias": (C,),
        "nonlin_attention.in_proj.weight": (432, C), "nonlin_attention.in_proj.bias": (432,),
        "nonlin_attention.out_proj.weight": (C, 144), "nonlin_attention.out_proj.bias": (C,),
        "norm.log_scale": (), "norm.bias": (C,),
    }
    for i in (1, 2):
        layer.update({
            f"conv_module{i}.in_proj.weight": (2 * C, C), f"conv_module{i}.in_proj.bias": (2 * C,),
            f"conv_module{i}.depthwise_conv.weight": (C, 1, 31),
            f"conv_module{i}.depthwise_conv.bias": (C,),
            f"conv_module{i}.out_proj.weight": (C, C), f"conv_module{i}.out_proj.bias": (C,),
        })
    got = {k[len(P):]: v for k, v in sd.items() if k.startswith(P)}
    assert got == layer  # exactly the 44 tensors of a non-causal layer
    assert len(layer) == 44
    n_enc = sum(1 for k in sd if k.startswith(("encoder_embed.", "encoder.")))
    assert n_enc == 731
    # stacks with ds != 1 are wrapped: encoders.{i}.encoder.layers.{l}
    assert "encoder.encoders.5.encoder.layers.1.norm.bias" in sd
    assert not any(k.startswith("encoder.encoders.0.encoder.") for k in sd)


def test_causal_state_dict_conv_keys():
    sd = build_meta("M", vocab_size=500, causal=True).state_dict()
    P = "encoder.encoders.0.layers.0.conv_module1.depthwise_conv."
    assert tuple(sd[P + "causal_conv.weight"].shape) == (192, 1, 16)
    assert tuple(sd[P + "chunkwise_conv.weight"].shape) == (192, 1, 31)
    assert tuple(sd[P + "chunkwise_conv_scale"].shape) == (2, 192, 31)
    assert P + "weight" not in sd


def test_config_from_dict_and_presets():
    cfg = ZipformerConfig.from_dict({"preset": "S", "vocab_size": 256, "num_encoder_layers":
                                     "1,1,1,1,1,1"})
    assert cfg.encoder_dim == (192, 256, 256, 256, 256, 256) and cfg.vocab_size == 256
    assert cfg.num_encoder_layers == (1,) * 6
    with pytest.raises(KeyError):
        ZipformerConfig.from_dict({"preset": "M", "encoder_dims": [1]})
    demo = build_meta("demo", vocab_size=500)
    assert 2_000_000 < sum(p.numel() for p in demo.parameters()) < 5_000_000


@pytest.fixture(scope="module")
def xs_model():
    torch.manual_seed(0)
    m = Transducer.from_preset("xs", vocab_size=40)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # break the identical-at-init layers and trivial scales
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return m


def test_output_lengths(xs_model):
    m = xs_model.eval()
    T = torch.tensor([200, 131, 77, 40])
    x = torch.randn(4, 200, 80)
    with torch.no_grad():
        out, lens = m.forward_encoder(x, T)
    expected = ((T - 7) // 2 + 1) // 2
    assert lens.tolist() == expected.tolist()
    assert out.shape == (4, int(expected.max()), 64)
    assert torch.isfinite(out).all()


def test_ragged_batch_masks_at_encoder(xs_model):
    """A short sequence padded with garbage inside a batch gives the same encoder output
    as alone (lengths multiple of 8 so no low-rate frame mixes valid and padding)."""
    m = xs_model.eval()
    enc = m.encoder
    x = torch.randn(96, 2, 32)
    lens = torch.tensor([96, 64])
    x[64:, 1] = 100.0 * torch.randn(32, 32)
    mask = make_pad_mask(lens)
    with torch.no_grad():
        both, out_lens = enc(x, lens, mask)
        alone, _ = enc(x[:64, 1:], lens[1:], make_pad_mask(lens[1:]))
    assert out_lens.tolist() == [48, 32]
    torch.testing.assert_close(both[:32, 1], alone[:, 0], rtol=1e-5, atol=1e-5)


def test_eval_is_deterministic_and_train_is_not(xs_model):
    m = xs_model
    x, lens = torch.randn(2, 120, 80), torch.tensor([120, 100])
    m.eval()
    with torch.no_grad():
        a, _ = m.forward_encoder(x, lens)
        b, _ = m.forward_encoder(x, lens)
    assert torch.equal(a, b)
    m.train()
    set_batch_count(m, 100.0)
    with torch.no_grad():
        c, _ = m.forward_encoder(x, lens)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize("batch_count", [0.0, 3000.0, 30000.0])
def test_train_forward_backward_finite(xs_model, batch_count):
    torch.manual_seed(int(batch_count))
    m = xs_model.train()
    set_batch_count(m, batch_count)
    x, lens = torch.randn(3, 150, 80), torch.tensor([150, 120, 90])
    out, out_lens = m.forward_encoder(x, lens)
    am = m.simple_am_proj(out)
    dec = m.decoder(torch.randint(0, 40, (3, 5)))
    logits = m.joiner(out[:, :, None], dec[:, None])
    loss = am.logsumexp(-1).sum() + logits.logsumexp(-1).sum()
    m.zero_grad()
    loss.backward()
    grads = {n: p.grad for n, p in m.named_parameters()}
    assert all(torch.isfinite(g).all() for g in grads.values() if g is not None)
    unused = {n for n, g in grads.items() if g is None}
    # Without gradient: icefall's unused per-layer bypass_scale, simple_lm_proj (not in
    # this toy loss) and, early in training, linear_pos (positional scores are skipped for
    # the whole batch with probability 0.5 at batch 0).
    allowed = [n for n in grads if n.endswith("layers.0.bypass_scale")
               or n.endswith("layers.1.bypass_scale") or n.startswith("simple_lm_proj")]
    if batch_count < 4000:
        allowed += [n for n in grads if n.endswith("linear_pos.weight")]
    assert unused <= set(allowed), unused - set(allowed)
    assert any(n.endswith("layers.0.bypass_scale") for n in unused)


def test_loss_forward_backward(xs_model):
    pytest.importorskip("zipasr.loss")
    torch.manual_seed(0)
    m = xs_model.train()
    set_batch_count(m, 500.0)
    x, lens = torch.randn(2, 160, 80), torch.tensor([160, 130])
    y = [[3, 7, 9, 1, 4], [5, 2]]
    simple, pruned, ctc = m(x, lens, y, prune_range=5, am_scale=0.0, lm_scale=0.25)
    assert simple.ndim == 0 and pruned.ndim == 0 and ctc.numel() == 0
    assert torch.isfinite(simple) and torch.isfinite(pruned) and simple > 0 and pruned > 0
    m.zero_grad()
    (0.5 * simple + pruned).backward()
    assert torch.isfinite(m.encoder_embed.out.weight.grad).all()
    assert m.simple_lm_proj.weight.grad.abs().sum() > 0


def test_bf16_autocast_forward(xs_model):
    m = xs_model.eval()
    x, lens = torch.randn(2, 60, 80), torch.tensor([60, 50])
    with torch.no_grad():
        ref, _ = m.forward_encoder(x, lens)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, out_lens = m.forward_encoder(x, lens)
    assert torch.isfinite(out).all()
    assert ((out.float() - ref).norm() / ref.norm()).item() < 0.05
    # and a training step under autocast runs
    m.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = m.forward_encoder(x, lens)
    out.float().square().mean().backward()
    assert torch.isfinite(m.encoder_embed.out.weight.grad).all()
    m.zero_grad()


def test_joiner_bf16_is_close_to_float64(xs_model):
    """train.joiner_bf16: the joiner's product runs in bf16, the losses and gradients stay
    within bf16 rounding of a float64 reference; without it the joiner stays float32."""
    import copy

    m = copy.deepcopy(xs_model).eval()  # eval: no dropout or balancers, so runs are comparable
    x, lens = torch.randn(2, 160, 80), torch.tensor([160, 130])
    y = [[3, 7, 9, 1, 4], [5, 2]]
    dtypes = []
    hook = m.joiner.output_linear.register_forward_hook(lambda mod, i, o: dtypes.append(o.dtype))

    def run(model, x, **kw):
        model.zero_grad()
        # the pruned loss over the whole lattice (a window of S + 1 rows): which window the
        # pruning picks is an argmax that rounding can flip where windows hold equal mass, and
        # a flipped window is another loss, not a precision difference
        simple, pruned, _ = model(x, lens, y, lm_scale=0.25, prune_range=len(y[0]) + 1, **kw)
        (0.5 * simple + pruned).backward()
        # the heads' gradients: the encoder's backward adds Swoosh's randomised derivative
        # rounding, which would hide the joiner's precision
        grads = torch.cat([p.grad.flatten().double() for n, p in model.named_parameters()
                           if n.split(".")[0] in ("joiner", "decoder", "simple_lm_proj")])
        return torch.stack([simple.double(), pruned.double()]), grads

    losses32, grads32 = run(m, x)
    losses16, grads16 = run(m, x, joiner_bf16=True)
    hook.remove()
    assert dtypes == [torch.float32, torch.bfloat16]
    ref = copy.deepcopy(m).double()
    losses64, grads64 = run(ref, x.double())

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    print(f"fp32: losses {rel(losses32, losses64):.1e} grads {rel(grads32, grads64):.1e}; "
          f"bf16 joiner: losses {rel(losses16, losses64):.1e} grads {rel(grads16, grads64):.1e}")
    # Bounds from the formats' unit roundoff u, not from one CPU's kernels (measured on an AMD
    # EPYC with oneDNN/MKL limited to SSE4.1, AVX2, AVX-512, AMX: fp32 losses 3e-8-9e-8,
    # gradients 2e-6-6e-5; bf16 joiner 5e-5 and 1.2e-3-1.5e-3).
    # fp32 (u = 2^-24): a head gradient entry sums N x T x R = 2 x 40 x 6 = 480 products, off
    # by <= 480 u of their magnitudes, x10 for cancellation; a loss is a ~T + S = 45-step
    # log-add recursion of a few roundings each.
    # bf16 joiner (u = 2^-8 for a product of two rounded inputs): the logits carry ~u relative
    # noise of random sign, which the losses average over the lattice (< u / 4) and which the
    # joiner's gradients carry at about u (< 2.5 u).
    u32, u16 = 2.0**-24, 2.0**-8
    assert rel(losses32, losses64) < 45 * 4 * u32 and rel(grads32, grads64) < 480 * 10 * u32
    assert rel(losses16, losses64) < u16 / 4 and rel(grads16, grads64) < 2.5 * u16


def run_cli(argv):
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    register(sub)
    args = parser.parse_args(argv)
    return args.func(args)


def test_model_info_cli_loads_icefall_checkpoint(tmp_path, capsys, xs_model):
    path = tmp_path / "pretrained.pt"
    torch.save({"model": xs_model.state_dict()}, path)
    assert run_cli(["model-info", "--preset", "xs", "--vocab-size", "40",
                    "--checkpoint", str(path)]) == 0
    out = capsys.readouterr().out
    total = sum(p.numel() for p in xs_model.parameters())
    assert f"{total:,}" in out and "encoder_embed" in out and "loaded" in out

    from zipasr.errors import ZipasrError

    sd = xs_model.state_dict()
    sd.pop("encoder.downsample_output.bias")
    torch.save({"model": sd}, path)
    with pytest.raises(ZipasrError, match="downsample_output"):
        run_cli(["model-info", "--preset", "xs", "--vocab-size", "40", "--checkpoint", str(path)])
