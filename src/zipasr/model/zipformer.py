"""Zipformer2: the encoder of the paper, as icefall's ``zipformer/zipformer.py`` defines it.

Six stacks of Zipformer blocks run at 50, 25, 12.5, 6.25, 12.5 and 25 Hz (relative to the
50 Hz Conv-Embed output); their outputs are combined and downsampled once more to 25 Hz.
Tensors inside are time-major: (T, N, C).
"""

from __future__ import annotations

import copy
import random
from collections.abc import Sequence

import torch
import torch.nn as nn
from torch import Tensor

from .attention import (
    CompactRelPositionalEncoding,
    NonlinAttention,
    RelPositionMultiheadAttentionWeights,
    SelfAttention,
)
from .config import ZipformerConfig
from .conv import ConvolutionModule
from .scaling import (
    ActivationDropoutAndLinear,
    Balancer,
    BiasNorm,
    FloatLike,
    ScheduledFloat,
    Whiten,
    convert_num_channels,
    limit_param_value,
    whitening_schedule,
)


class FeedforwardModule(nn.Module):
    """y = W2 dropout(SwooshL(W1 x + b1)) + b2, dropout mask shared over time.
    (T, N, C) -> (T, N, C)."""

    def __init__(self, embed_dim: int, feedforward_dim: int, dropout: FloatLike):
        super().__init__()
        self.in_proj = nn.Linear(embed_dim, feedforward_dim)
        self.hidden_balancer = Balancer(
            feedforward_dim, channel_dim=-1, min_positive=0.3, max_positive=1.0,
            min_abs=0.75, max_abs=5.0,
        )
        self.out_proj = ActivationDropoutAndLinear(
            feedforward_dim, embed_dim, activation="SwooshL", dropout_p=dropout,
            dropout_shared_dim=0, bias=True, initial_scale=0.1,
        )
        self.out_whiten = Whiten(
            num_groups=1, whitening_limit=whitening_schedule(7.5), prob=(0.025, 0.25),
            grad_scale=0.01,
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.out_whiten(self.out_proj(self.hidden_balancer(self.in_proj(x))))


class BypassModule(nn.Module):
    """Bypass: out = x_orig + (x - x_orig) * c, c a learnable per-channel scale (init 0.5).

    In training c is kept in [scale_min, scale_max] through its gradient
    (:func:`limit_param_value`; the forward value is unchanged) and, with probability
    ``skip_rate`` per sequence, set to 0 (the whole module/layer is skipped). Eval uses
    the raw ``bypass_scale``.
    """

    def __init__(
        self,
        embed_dim: int,
        skip_rate: FloatLike = 0.0,
        straight_through_rate: FloatLike = 0.0,
        scale_min: FloatLike | None = None,
        scale_max: FloatLike = 1.0,
    ):
        super().__init__()
        self.bypass_scale = nn.Parameter(torch.full((embed_dim,), 0.5))
        self.skip_rate = skip_rate
        self.straight_through_rate = straight_through_rate
        if scale_min is None:
            scale_min = ScheduledFloat((0.0, 0.9), (20000.0, 0.2), default=0)
        self.scale_min = scale_min
        self.scale_max = scale_max

    def _get_bypass_scale(self, batch_size: int) -> Tensor:
        """(C,) in eval, or (N, C) with skipped sequences zeroed in training."""
        if not self.training:
            return self.bypass_scale
        ans = limit_param_value(
            self.bypass_scale, min=float(self.scale_min), max=float(self.scale_max)
        )
        skip_rate = float(self.skip_rate)
        if skip_rate != 0.0:
            ans = ans * (torch.rand((batch_size, 1), device=ans.device) > skip_rate)
        st_rate = float(self.straight_through_rate)
        if st_rate != 0.0:
            mask = torch.rand((batch_size, 1), device=ans.device) < st_rate
            ans = torch.maximum(ans, mask.to(ans.dtype))
        return ans

    def forward(self, src_orig: Tensor, src: Tensor) -> Tensor:
        """src_orig, src: (T, N, C)."""
        # addcmul: the same sum and product as src_orig + (src - src_orig) * scale, one
        # temporary fewer.
        return torch.addcmul(src_orig, src - src_orig, self._get_bypass_scale(src.shape[1]))


class Zipformer2EncoderLayer(nn.Module):
    """The Zipformer block: FF1, NLA, SA1, Conv1, FF2, mid Bypass, SA2, Conv2, FF3,
    BiasNorm, Bypass; one set of attention weights (computed from the block input) is
    shared by NLA (head 0) and both self-attention modules. (T, N, C) -> (T, N, C).
    """

    def __init__(
        self,
        embed_dim: int,
        pos_dim: int,
        num_heads: int,
        query_head_dim: int,
        pos_head_dim: int,
        value_head_dim: int,
        feedforward_dim: int,
        dropout: FloatLike = 0.1,
        cnn_module_kernel: int = 31,
        causal: bool = False,
    ):
        super().__init__()
        self.embed_dim = embed_dim
        # Overridden per layer by Zipformer2Encoder (layer-drop warm-up schedule).
        self.bypass = BypassModule(
            embed_dim, skip_rate=ScheduledFloat((0.0, 0.5), (4000.0, 0.02), default=0)
        )
        self.bypass_mid = BypassModule(embed_dim)
        self.attention_skip_rate = ScheduledFloat(
            (0.0, 0.2), (4000.0, 0.05), (16000, 0.0), default=0
        )
        self.conv_skip_rate = ScheduledFloat((0.0, 0.2), (4000.0, 0.05), (16000, 0.0), default=0)
        self.ff2_skip_rate = ScheduledFloat((0.0, 0.1), (4000.0, 0.01), (50000.0, 0.0))
        self.ff3_skip_rate = ScheduledFloat((0.0, 0.1), (4000.0, 0.01), (50000.0, 0.0))
        self.const_attention_rate = ScheduledFloat((0.0, 0.25), (4000.0, 0.025), default=0)

        self.self_attn_weights = RelPositionMultiheadAttentionWeights(
            embed_dim, pos_dim=pos_dim, num_heads=num_heads, query_head_dim=query_head_dim,
            pos_head_dim=pos_head_dim, dropout=0.0,
        )
        self.self_attn1 = SelfAttention(embed_dim, num_heads, value_head_dim)
        self.self_attn2 = SelfAttention(embed_dim, num_heads, value_head_dim)
        self.feed_forward1 = FeedforwardModule(embed_dim, (feedforward_dim * 3) // 4, dropout)
        self.feed_forward2 = FeedforwardModule(embed_dim, feedforward_dim, dropout)
        self.feed_forward3 = FeedforwardModule(embed_dim, (feedforward_dim * 5) // 4, dropout)
        self.nonlin_attention = NonlinAttention(embed_dim, hidden_channels=3 * embed_dim // 4)
        self.conv_module1 = ConvolutionModule(embed_dim, cnn_module_kernel, causal=causal)
        self.conv_module2 = ConvolutionModule(embed_dim, cnn_module_kernel, causal=causal)
        # Unused, kept because icefall's checkpoints contain it.
        self.bypass_scale = nn.Parameter(torch.full((embed_dim,), 0.5))
        self.norm = BiasNorm(embed_dim)

        self.balancer1 = Balancer(
            embed_dim, channel_dim=-1, min_positive=0.45, max_positive=0.55,
            min_abs=0.2, max_abs=4.0,
        )
        self.balancer_na = Balancer(
            embed_dim, channel_dim=-1, min_positive=0.3, max_positive=0.7,
            min_abs=ScheduledFloat((0.0, 0.004), (4000.0, 0.02)), prob=0.05,
        )
        self.balancer_ff2 = Balancer(
            embed_dim, channel_dim=-1, min_positive=0.3, max_positive=0.7,
            min_abs=ScheduledFloat((0.0, 0.0), (4000.0, 0.1), default=0.0), max_abs=2.0,
            prob=0.05,
        )
        self.balancer_ff3 = Balancer(
            embed_dim, channel_dim=-1, min_positive=0.3, max_positive=0.7,
            min_abs=ScheduledFloat((0.0, 0.0), (4000.0, 0.2), default=0.0), max_abs=4.0,
            prob=0.05,
        )
        self.whiten = Whiten(
            num_groups=1, whitening_limit=whitening_schedule(4.0, ratio=3.0),
            prob=(0.025, 0.25), grad_scale=0.01,
        )
        self.balancer2 = Balancer(
            embed_dim, channel_dim=-1, min_positive=0.45, max_positive=0.55,
            min_abs=0.1, max_abs=4.0,
        )

    def _sequence_mask(self, x: Tensor, rate: float) -> Tensor | None:
        """(N, 1) 0/1 mask dropping whole sequences with probability ``rate`` (no rescale)."""
        if rate == 0.0 or not self.training:
            return None
        return (torch.rand(x.shape[1], 1, device=x.device) > rate).to(x.dtype)

    def _sequence_dropout(self, x: Tensor, rate: float) -> Tensor:
        mask = self._sequence_mask(x, rate)
        return x if mask is None else x * mask

    def _rate(self, sf: ScheduledFloat) -> float:
        return float(sf) if self.training else 0.0

    def forward(
        self,
        src: Tensor,
        pos_emb: Tensor,
        chunk_size: int = -1,
        attn_mask: Tensor | None = None,
        src_key_padding_mask: Tensor | None = None,
    ) -> Tensor:
        """src: (T, N, C); pos_emb: (1, 2T - 1, pos_dim); attn_mask: (T, T) True = masked;
        src_key_padding_mask: (N, T) True = padding."""
        src_orig = src
        attn_weights = self.self_attn_weights(
            src, pos_emb=pos_emb, attn_mask=attn_mask, key_padding_mask=src_key_padding_mask
        )  # (H, N, T, T)

        src = src + self.feed_forward1(src)

        # One mask for the three attention-type updates of this layer.
        attn_mask_seq = self._sequence_mask(src, self._rate(self.attention_skip_rate))

        selected = attn_weights[0:1]
        if self.training and random.random() < float(self.const_attention_rate):
            # Replace head 0 by a uniform average over the unmasked keys, to encourage an
            # averaging-over-time behaviour of NLA. (icefall's current code guards this
            # with `not self.training`, which makes it dead code; its rate is a schedule of
            # the training batch count, 0.25 falling to 0.025 by batch 4000, so it is drawn
            # in training here: a deliberate departure, listed in the design notes in docs/.)
            selected = (selected > 0.0).to(selected.dtype)
            selected = selected * (1.0 / selected.sum(dim=-1, keepdim=True))

        na = self.balancer_na(self.nonlin_attention(src, selected))
        src = src + (na if attn_mask_seq is None else na * attn_mask_seq)

        sa = self.self_attn1(src, attn_weights)
        src = src + (sa if attn_mask_seq is None else sa * attn_mask_seq)

        conv_rate = self._rate(self.conv_skip_rate)
        src = src + self._sequence_dropout(
            self.conv_module1(src, chunk_size=chunk_size,
                              src_key_padding_mask=src_key_padding_mask),
            conv_rate,
        )
        src = src + self._sequence_dropout(
            self.balancer_ff2(self.feed_forward2(src)), self._rate(self.ff2_skip_rate)
        )

        src = self.bypass_mid(src_orig, src)

        sa = self.self_attn2(src, attn_weights)
        src = src + (sa if attn_mask_seq is None else sa * attn_mask_seq)
        src = src + self._sequence_dropout(
            self.conv_module2(src, chunk_size=chunk_size,
                              src_key_padding_mask=src_key_padding_mask),
            conv_rate,
        )
        src = src + self._sequence_dropout(
            self.balancer_ff3(self.feed_forward3(src)), self._rate(self.ff3_skip_rate)
        )

        src = self.norm(self.balancer1(src))
        src = self.bypass(src_orig, src)
        return self.whiten(self.balancer2(src))

    def streaming_forward(
        self,
        src: Tensor,
        pos_emb: Tensor,
        cached_key: Tensor,
        cached_nonlin_attn: Tensor,
        cached_val1: Tensor,
        cached_val2: Tensor,
        cached_conv1: Tensor,
        cached_conv2: Tensor,
        left_context_len: int,
        src_key_padding_mask: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """One chunk src: (T, N, C) with the layer's six caches; src_key_padding_mask is
        (N, L + T). Returns the output and the updated caches (same order)."""
        src_orig = src
        attn_weights, cached_key = self.self_attn_weights.streaming_forward(
            src, pos_emb=pos_emb, cached_key=cached_key, left_context_len=left_context_len,
            key_padding_mask=src_key_padding_mask,
        )
        src = src + self.feed_forward1(src)
        na, cached_nonlin_attn = self.nonlin_attention.streaming_forward(
            src, attn_weights[0:1], cached_x=cached_nonlin_attn,
            left_context_len=left_context_len,
        )
        src = src + na
        sa, cached_val1 = self.self_attn1.streaming_forward(
            src, attn_weights, cached_val=cached_val1, left_context_len=left_context_len
        )
        src = src + sa
        chunk_mask = src_key_padding_mask[:, left_context_len:]
        conv, cached_conv1 = self.conv_module1.streaming_forward(
            src, cache=cached_conv1, src_key_padding_mask=chunk_mask
        )
        src = src + conv
        src = src + self.feed_forward2(src)
        src = self.bypass_mid(src_orig, src)
        sa, cached_val2 = self.self_attn2.streaming_forward(
            src, attn_weights, cached_val=cached_val2, left_context_len=left_context_len
        )
        src = src + sa
        conv, cached_conv2 = self.conv_module2.streaming_forward(
            src, cache=cached_conv2, src_key_padding_mask=chunk_mask
        )
        src = src + conv
        src = src + self.feed_forward3(src)
        src = self.bypass(src_orig, self.norm(src))
        return (src, cached_key, cached_nonlin_attn, cached_val1, cached_val2,
                cached_conv1, cached_conv2)


class Zipformer2Encoder(nn.Module):
    """A stack of ``num_layers`` identical-at-init Zipformer blocks sharing one positional
    encoding. Each layer's layer-drop rate goes from 0.5 to ``final_layerdrop_rate`` over
    its own slice of [warmup_begin, warmup_end]. (T, N, C) -> (T, N, C)."""

    def __init__(
        self,
        encoder_layer: nn.Module,
        num_layers: int,
        pos_dim: int,
        dropout: FloatLike,
        warmup_begin: float,
        warmup_end: float,
        initial_layerdrop_rate: float = 0.5,
        final_layerdrop_rate: float = 0.05,
    ):
        super().__init__()
        self.encoder_pos = CompactRelPositionalEncoding(pos_dim, dropout_rate=0.15,
                                                        length_factor=1.0)
        # icefall deep-copies one layer, so all layers of a stack start identical.
        self.layers = nn.ModuleList([copy.deepcopy(encoder_layer) for _ in range(num_layers)])
        self.num_layers = num_layers
        assert 0 <= warmup_begin <= warmup_end
        delta = (warmup_end - warmup_begin) / num_layers
        begin = warmup_begin
        for layer in self.layers:
            layer.bypass.skip_rate = ScheduledFloat(
                (begin, initial_layerdrop_rate), (begin + delta, final_layerdrop_rate),
                default=0.0,
            )
            begin += delta

    def forward(
        self,
        src: Tensor,
        chunk_size: int = -1,
        feature_mask: Tensor | float = 1.0,
        attn_mask: Tensor | None = None,
        src_key_padding_mask: Tensor | None = None,
    ) -> Tensor:
        """src: (T, N, C); feature_mask broadcasts with src (1.0 in eval)."""
        pos_emb = self.encoder_pos(src)
        # In eval the mask is the number 1.0: multiplying by it would only copy.
        masked = not (isinstance(feature_mask, float) and feature_mask == 1.0)
        output = src * feature_mask if masked else src
        for layer in self.layers:
            output = layer(output, pos_emb, chunk_size=chunk_size, attn_mask=attn_mask,
                           src_key_padding_mask=src_key_padding_mask)
            if masked:
                output = output * feature_mask
        return output

    def streaming_forward(
        self, src: Tensor, states: list[Tensor], left_context_len: int,
        src_key_padding_mask: Tensor,
    ) -> tuple[Tensor, list[Tensor]]:
        """One chunk; states holds 6 caches per layer."""
        pos_emb = self.encoder_pos(src, left_context_len)
        output = src
        new_states: list[Tensor] = []
        for i, layer in enumerate(self.layers):
            output, *layer_states = layer.streaming_forward(
                output, pos_emb, *states[6 * i : 6 * (i + 1)],
                left_context_len=left_context_len, src_key_padding_mask=src_key_padding_mask,
            )
            new_states += layer_states
        return output, new_states


class SimpleDownsample(nn.Module):
    """(T, N, C) -> (ceil(T / ds), N, C): pad by repeating the last frame, then a weighted
    sum of each group of ds frames with weights softmax(bias)."""

    def __init__(self, channels: int, downsample: int, dropout: FloatLike = 0.0):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(downsample))
        self.downsample = downsample
        self.dropout = dropout  # stored by icefall, unused

    def forward(self, src: Tensor) -> Tensor:
        T, N, C = src.shape
        ds = self.downsample
        d_len = (T + ds - 1) // ds
        pad = d_len * ds - T
        src = torch.cat((src, src[T - 1 :].expand(pad, N, C)), dim=0)
        src = src.reshape(d_len, ds, N, C)
        weights = self.bias.softmax(dim=0).unsqueeze(-1).unsqueeze(-1)  # (ds, 1, 1)
        return (src * weights).sum(dim=1)


class SimpleUpsample(nn.Module):
    """(T, N, C) -> (T * up, N, C) by repeating every frame."""

    def __init__(self, num_channels: int, upsample: int):
        super().__init__()
        self.upsample = upsample

    def forward(self, src: Tensor) -> Tensor:
        T, N, C = src.shape
        return src.unsqueeze(1).expand(T, self.upsample, N, C).reshape(T * self.upsample, N, C)


class DownsampledZipformer2Encoder(nn.Module):
    """Run a Zipformer2Encoder at 1/ds of the frame rate: downsample, encode, upsample,
    truncate, and combine with the input through a Bypass (``out_combiner``).
    (T, N, C) -> (T, N, C)."""

    def __init__(self, encoder: Zipformer2Encoder, dim: int, downsample: int,
                 dropout: FloatLike):
        super().__init__()
        self.downsample_factor = downsample
        self.downsample = SimpleDownsample(dim, downsample, dropout)
        self.num_layers = encoder.num_layers
        self.encoder = encoder
        self.upsample = SimpleUpsample(dim, downsample)
        self.out_combiner = BypassModule(dim)

    def forward(
        self,
        src: Tensor,
        chunk_size: int = -1,
        feature_mask: Tensor | float = 1.0,
        attn_mask: Tensor | None = None,
        src_key_padding_mask: Tensor | None = None,
    ) -> Tensor:
        """src_key_padding_mask must already be at the low rate (mask[..., ::ds]);
        attn_mask is at the full rate and subsampled here."""
        src_orig = src
        ds = self.downsample_factor
        src = self.downsample(src)
        if attn_mask is not None:
            attn_mask = attn_mask[::ds, ::ds]
        src = self.encoder(src, chunk_size=chunk_size // ds, feature_mask=feature_mask,
                           attn_mask=attn_mask, src_key_padding_mask=src_key_padding_mask)
        src = self.upsample(src)[: src_orig.shape[0]]
        return self.out_combiner(src_orig, src)

    def streaming_forward(
        self, src: Tensor, states: list[Tensor], left_context_len: int,
        src_key_padding_mask: Tensor,
    ) -> tuple[Tensor, list[Tensor]]:
        src_orig = src
        src, new_states = self.encoder.streaming_forward(
            self.downsample(src), states=states, left_context_len=left_context_len,
            src_key_padding_mask=src_key_padding_mask,
        )
        src = self.upsample(src)[: src_orig.shape[0]]
        return self.out_combiner(src_orig, src), new_states


def _to_tuple(x: Sequence[int], n: int) -> tuple[int, ...]:
    """A per-stack field of the config (one entry, or one per stack) as one entry per stack."""
    x = tuple(x)
    if len(x) == 1:
        return x * n
    assert len(x) == n, (x, n)
    return x


class Zipformer2(nn.Module):
    """The Zipformer encoder: (T, N, encoder_dim[0]) at 50 Hz -> ((T + 1) // 2, N,
    max(encoder_dim)) at 25 Hz.

    Built from a :class:`~zipasr.model.config.ZipformerConfig`, the one place the dimensions
    and their defaults live; per-stack fields with one entry apply to every stack.
    With ``config.causal`` each training forward picks a chunk size from ``chunk_size`` and a
    left context from ``left_context_frames`` (both in 50 Hz frames; -1 = unlimited) and uses
    a chunk-wise causal attention mask and chunk-causal convolutions. Those two lists are
    copied to attributes of the same names, which streaming decoding and the ONNX export set
    to the one chunk they run with.
    """

    # icefall's fixed final downsampling (50 Hz -> 25 Hz); forward relies on it
    output_downsampling_factor = 2

    def __init__(self, config: ZipformerConfig, dropout: FloatLike | None = None):
        """``dropout``: of every layer; default icefall's schedule, 0.3 falling to 0.1 over
        the first 20,000 (ref-duration-adjusted) batches."""
        super().__init__()
        if dropout is None:
            dropout = ScheduledFloat((0.0, 0.3), (20000.0, 0.1))
        c = config
        n = len(c.downsampling_factor)
        self.downsampling_factor = downsampling_factor = tuple(c.downsampling_factor)
        self.encoder_dim = encoder_dim = _to_tuple(c.encoder_dim, n)
        self.encoder_unmasked_dim = encoder_unmasked_dim = _to_tuple(c.encoder_unmasked_dim, n)
        self.num_encoder_layers = num_encoder_layers = _to_tuple(c.num_encoder_layers, n)
        self.query_head_dim = query_head_dim = _to_tuple(c.query_head_dim, n)
        self.value_head_dim = value_head_dim = _to_tuple(c.value_head_dim, n)
        pos_head_dim = _to_tuple(c.pos_head_dim, n)
        self.num_heads = num_heads = _to_tuple(c.num_heads, n)
        feedforward_dim = _to_tuple(c.feedforward_dim, n)
        self.cnn_module_kernel = cnn_module_kernel = _to_tuple(c.cnn_module_kernel, n)
        self.causal = causal = c.causal
        self.chunk_size = list(c.chunk_size)
        self.left_context_frames = list(c.left_context_frames)
        pos_dim, warmup_batches = c.pos_dim, c.warmup_batches
        for u, d in zip(encoder_unmasked_dim, encoder_dim, strict=True):
            assert u <= d

        encoders = []
        for i in range(n):
            layer = Zipformer2EncoderLayer(
                embed_dim=encoder_dim[i], pos_dim=pos_dim, num_heads=num_heads[i],
                query_head_dim=query_head_dim[i], pos_head_dim=pos_head_dim[i],
                value_head_dim=value_head_dim[i], feedforward_dim=feedforward_dim[i],
                dropout=dropout, cnn_module_kernel=cnn_module_kernel[i], causal=causal,
            )
            # Stack i warms up (layer-drop 0.5 -> final) after the stacks before it.
            encoder: nn.Module = Zipformer2Encoder(
                layer, num_encoder_layers[i], pos_dim=pos_dim, dropout=dropout,
                warmup_begin=warmup_batches * (i + 1) / (n + 1),
                warmup_end=warmup_batches * (i + 2) / (n + 1),
                final_layerdrop_rate=0.035 * (downsampling_factor[i] ** 0.5),
            )
            if downsampling_factor[i] != 1:
                encoder = DownsampledZipformer2Encoder(
                    encoder, dim=encoder_dim[i], downsample=downsampling_factor[i],
                    dropout=dropout,
                )
            encoders.append(encoder)
        self.encoders = nn.ModuleList(encoders)
        self.downsample_output = SimpleDownsample(
            max(encoder_dim), downsample=self.output_downsampling_factor, dropout=dropout
        )

    def get_feature_masks(self, x: Tensor) -> list[Tensor] | list[float]:
        """Per-sequence masks of the channels above encoder_unmasked_dim (training only).

        Channels [u1:u2] are dropped with mask1, [u2:C] with mask2 = mask1 AND another
        draw, u2 = u1 + (C - u1) // 2; the same draws serve all stacks. Each mask is
        (1, N, C_i)."""
        n = len(self.encoder_dim)
        if not self.training:
            return [1.0] * n
        _, N, C0 = x.shape
        assert self.encoder_dim[0] == C0
        p = 0.125
        mask1 = (torch.rand(1, N, 1, device=x.device) > p).to(x.dtype)
        mask2 = torch.logical_and(
            mask1, (torch.rand(1, N, 1, device=x.device) > p).to(x.dtype)
        ).to(x.dtype)
        masks = []
        for i in range(n):
            C = self.encoder_dim[i]
            m = torch.ones(1, N, C, dtype=x.dtype, device=x.device)
            u1 = self.encoder_unmasked_dim[i]
            u2 = u1 + (C - u1) // 2
            m[:, :, u1:u2] *= mask1
            m[:, :, u2:] *= mask2
            masks.append(m)
        return masks

    def get_chunk_info(self) -> tuple[int, int]:
        """(chunk_size, left_context_chunks) for this forward; (-1, -1) if not causal."""
        if not self.causal:
            return -1, -1
        chunk_size = random.choice(self.chunk_size)
        if chunk_size == -1:
            return -1, -1
        left_context_chunks = random.choice(self.left_context_frames) // chunk_size
        if left_context_chunks == 0:
            left_context_chunks = 1
        return chunk_size, left_context_chunks

    def _get_attn_mask(self, x: Tensor, chunk_size: int, left_context_chunks: int
                       ) -> Tensor | None:
        """(T, T) bool, True = masked: query i sees key j iff
        c(i) - left_context_chunks <= c(j) <= c(i), c(t) = t // chunk_size."""
        if chunk_size <= 0:
            return None
        assert all(chunk_size % d == 0 for d in self.downsampling_factor)
        if left_context_chunks >= 0:
            assert all(
                chunk_size * left_context_chunks >= (k // 2) * d
                for k, d in zip(self.cnn_module_kernel, self.downsampling_factor, strict=True)
            )
        else:
            left_context_chunks = 1000000
        c = torch.arange(x.shape[0], device=x.device) // chunk_size
        src_c, tgt_c = c, c.unsqueeze(-1)
        return (src_c > tgt_c) | (src_c < tgt_c - left_context_chunks)

    def _get_full_dim_output(self, outputs: list[Tensor]) -> Tensor:
        """Concatenate channels, each taken from the most recent stack that has it."""
        pieces = [outputs[-1]]
        cur = self.encoder_dim[-1]
        for i in range(len(self.encoder_dim) - 2, -1, -1):
            d = self.encoder_dim[i]
            if d > cur:
                pieces.append(outputs[i][..., cur:d])
                cur = d
        assert cur == max(self.encoder_dim)
        return torch.cat(pieces, dim=-1)

    def forward(
        self, x: Tensor, x_lens: Tensor, src_key_padding_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """x: (T, N, encoder_dim[0]); x_lens: (N,); src_key_padding_mask: (N, T) True =
        padding -> ((T + 1) // 2, N, max(encoder_dim)), lengths (x_lens + 1) // 2."""
        feature_masks = self.get_feature_masks(x)
        chunk_size, left_context_chunks = self.get_chunk_info()
        attn_mask = self._get_attn_mask(x, chunk_size, left_context_chunks)
        outputs = []
        for i, module in enumerate(self.encoders):
            ds = self.downsampling_factor[i]
            x = convert_num_channels(x, self.encoder_dim[i])
            x = module(
                x,
                chunk_size=chunk_size,
                feature_mask=feature_masks[i],
                src_key_padding_mask=(
                    None if src_key_padding_mask is None else src_key_padding_mask[..., ::ds]
                ),
                attn_mask=attn_mask,
            )
            outputs.append(x)
        x = self.downsample_output(self._get_full_dim_output(outputs))
        assert self.output_downsampling_factor == 2
        lengths = torch.div(x_lens + 1, 2, rounding_mode="floor")
        return x, lengths

    def streaming_forward(
        self, x: Tensor, x_lens: Tensor, states: list[Tensor], src_key_padding_mask: Tensor
    ) -> tuple[Tensor, Tensor, list[Tensor]]:
        """One chunk x: (T, N, C0) with per-layer caches (6 per layer, in layer order);
        src_key_padding_mask: (N, left_context_frames + T)."""
        outputs = []
        new_states: list[Tensor] = []
        offset = 0
        for i, module in enumerate(self.encoders):
            num_layers = module.num_layers
            ds = self.downsampling_factor[i]
            x = convert_num_channels(x, self.encoder_dim[i])
            x, layer_states = module.streaming_forward(
                x,
                states=states[offset * 6 : (offset + num_layers) * 6],
                left_context_len=self.left_context_frames[0] // ds,
                src_key_padding_mask=src_key_padding_mask[..., ::ds],
            )
            offset += num_layers
            outputs.append(x)
            new_states += layer_states
        x = self.downsample_output(self._get_full_dim_output(outputs))
        lengths = torch.div(x_lens + 1, 2, rounding_mode="floor")
        return x, lengths, new_states

    def get_init_states(self, batch_size: int = 1, device: torch.device | None = None
                        ) -> list[Tensor]:
        """Zero caches, per layer: cached_key (L, N, H*Dq), cached_nonlin_attn
        (1, N, L, 3C/4), cached_val1/2 (L, N, H*Dv), cached_conv1/2 (N, C, K//2), with
        L = left_context_frames[0] // ds of the layer's stack."""
        states = []
        for i, module in enumerate(self.encoders):
            C = self.encoder_dim[i]
            L = self.left_context_frames[0] // self.downsampling_factor[i]
            H = self.num_heads[i]
            kw = dict(device=device)
            for _ in range(module.num_layers):
                states += [
                    torch.zeros(L, batch_size, self.query_head_dim[i] * H, **kw),
                    torch.zeros(1, batch_size, L, 3 * C // 4, **kw),
                    torch.zeros(L, batch_size, self.value_head_dim[i] * H, **kw),
                    torch.zeros(L, batch_size, self.value_head_dim[i] * H, **kw),
                    torch.zeros(batch_size, C, self.cnn_module_kernel[i] // 2, **kw),
                    torch.zeros(batch_size, C, self.cnn_module_kernel[i] // 2, **kw),
                ]
        return states
