"""Zipformer attention: compact relative positional encoding, the shared attention
weights, and the two modules that consume them (SelfAttention, NonlinAttention).

Inside the encoder tensors are time-major: x is (T, N, C); attention weights are
(H, N, T_query, T_key).
"""

from __future__ import annotations

import math
import random

import torch
import torch.nn as nn
from torch import Tensor

from .scaling import (
    Balancer,
    Dropout2,
    FloatLike,
    ScaledLinear,
    ScheduledFloat,
    Whiten,
    penalize_abs_values_gt,
    softmax,
    tracing,
    whitening_schedule,
)

# Masked scores are filled with -1000, not -inf: a fully masked row then gives uniform
# weights instead of NaN, and exp(-1000) is exactly 0.
MASK_VALUE = -1000.0


class CompactRelPositionalEncoding(nn.Module):
    """Relative positional encoding of offsets (key - query), no parameters.

    Offsets x are compressed logarithmically, x_c = L sign(x) (ln(|x| + L) - ln L) with
    L = sqrt(D), mapped to (-pi/2, pi/2) by atan(x_c / (D / 2pi)), and encoded as
    [cos(k a), sin(k a)] for k = 1..D/2; the last column is overwritten by 1 (a bias).

    forward(x (T, N, C), left_context_len) -> (1, left_context_len + 2T - 1, D), rows for
    offsets -(left_context_len + T - 1) ... T - 1 in increasing order.
    """

    def __init__(self, embed_dim: int, dropout_rate: FloatLike, length_factor: float = 1.0):
        super().__init__()
        assert embed_dim % 2 == 0 and length_factor >= 1.0
        self.embed_dim = embed_dim
        self.length_factor = length_factor
        self.dropout = Dropout2(dropout_rate)

    def encode(self, offsets: Tensor) -> Tensor:
        """offsets: (R,) float32 -> (R, D) table, computed in float32 like icefall."""
        x = offsets.to(torch.float32).unsqueeze(1)
        freqs = 1 + torch.arange(self.embed_dim // 2, device=x.device)
        compression_length = self.embed_dim**0.5
        x_compressed = (
            compression_length
            * x.sign()
            * ((x.abs() + compression_length).log() - math.log(compression_length))
        )
        length_scale = self.length_factor * self.embed_dim / (2.0 * math.pi)
        x_atan = (x_compressed / length_scale).atan()
        pe = torch.zeros(x.shape[0], self.embed_dim, device=x.device)
        pe[:, 0::2] = (x_atan * freqs).cos()
        pe[:, 1::2] = (x_atan * freqs).sin()
        pe[:, -1] = 1.0
        return pe

    def forward(self, x: Tensor, left_context_len: int = 0) -> Tensor:
        T = x.shape[0]
        offsets = torch.arange(-(T + left_context_len - 1), T, device=x.device)
        pos_emb = self.encode(offsets).to(x.dtype).unsqueeze(0)
        return self.dropout(pos_emb)


def rel_to_abs(pos_scores: Tensor, key_len: int) -> Tensor:
    """(H, N, T, key_len + T - 1) scores per relative row -> (H, N, T, key_len) per key.

    out[..., i, j] = pos_scores[..., i, (T - 1) - i + j], i.e. relative offset
    (key position - query position).

    While tracing (ONNX export) the same elements are picked with ``gather``: ONNX has no
    ``as_strided``, and the traced strides would freeze the sequence length.
    """
    if torch.jit.is_tracing():
        return rel_to_abs_gather(pos_scores, key_len)
    pos_scores = pos_scores.contiguous()
    H, N, T, _ = pos_scores.shape
    s = pos_scores.stride()
    return pos_scores.as_strided(
        (H, N, T, key_len), (s[0], s[1], s[2] - s[3], s[3]), storage_offset=s[3] * (T - 1)
    )


def rel_to_abs_gather(pos_scores: Tensor, key_len: int) -> Tensor:
    """:func:`rel_to_abs` as an index gather: the same elements (bit-identical result), with
    indices computed from the traced sizes, so an exported graph follows the length."""
    H, N, T, _ = pos_scores.shape
    rows = torch.arange(T, device=pos_scores.device).unsqueeze(1)
    cols = torch.arange(key_len, device=pos_scores.device).unsqueeze(0)
    index = (T - 1) - rows + cols  # (T, key_len)
    return pos_scores.gather(-1, index.expand(H, N, T, key_len))


class RelPositionMultiheadAttentionWeights(nn.Module):
    """Multi-head attention weights with relative positions, shared by a layer's
    NonlinAttention and both SelfAttention modules.

    scores = q_i . k_j + p_i . P(j - i), no 1/sqrt(d): the in_proj init scale
    query_head_dim^-0.25 plays that role. Output (H, N, T, T) after softmax over keys.
    """

    def __init__(
        self,
        embed_dim: int,
        pos_dim: int,
        num_heads: int,
        query_head_dim: int,
        pos_head_dim: int,
        dropout: float = 0.0,
        pos_emb_skip_rate: FloatLike | None = None,
    ):
        super().__init__()
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.query_head_dim = query_head_dim
        self.pos_head_dim = pos_head_dim
        self.dropout = dropout
        if pos_emb_skip_rate is None:
            pos_emb_skip_rate = ScheduledFloat((0.0, 0.5), (4000.0, 0.0))
        self.pos_emb_skip_rate = pos_emb_skip_rate
        in_proj_dim = (2 * query_head_dim + pos_head_dim) * num_heads
        self.in_proj = ScaledLinear(
            embed_dim, in_proj_dim, bias=True, initial_scale=query_head_dim**-0.25
        )
        self.whiten_keys = Whiten(
            num_groups=num_heads,
            whitening_limit=whitening_schedule(3.0),
            prob=(0.025, 0.25),
            grad_scale=0.025,
        )
        # Scores are invariant to a constant on the keys, so nothing else stops a key bias
        # from drifting under Adam; keep key means near zero.
        self.balance_keys = Balancer(
            query_head_dim * num_heads,
            channel_dim=-1,
            min_positive=0.4,
            max_positive=0.6,
            min_abs=0.0,
            max_abs=100.0,
            prob=0.025,
        )
        self.linear_pos = ScaledLinear(
            pos_dim, num_heads * pos_head_dim, bias=False, initial_scale=0.05
        )

    def _split(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        qd = self.query_head_dim * self.num_heads
        return x[..., :qd], x[..., qd : 2 * qd], x[..., 2 * qd :]

    def _pos_scores(self, p: Tensor, pos_emb: Tensor, key_len: int) -> Tensor:
        """p: (H, N, T, Dp); pos_emb: (1, key_len + T - 1, pos_dim) -> (H, N, T, key_len)."""
        H, Dp = self.num_heads, self.pos_head_dim
        pos = self.linear_pos(pos_emb)
        pos = pos.reshape(-1, pos.shape[1], H, Dp).permute(2, 0, 3, 1)  # (H, 1, Dp, R)
        return rel_to_abs(torch.matmul(p, pos), key_len)

    def forward(
        self,
        x: Tensor,
        pos_emb: Tensor,
        key_padding_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
    ) -> Tensor:
        """x: (T, N, C); pos_emb: (1, 2T - 1, pos_dim); key_padding_mask: (N, T) True =
        padding; attn_mask: (T, T) True = masked -> weights (H, N, T, T)."""
        T, N, _ = x.shape
        H = self.num_heads
        q, k, p = self._split(self.in_proj(x))
        k = self.whiten_keys(self.balance_keys(k))
        q = q.reshape(T, N, H, -1).permute(2, 1, 0, 3)  # (H, N, T, Dq)
        p = p.reshape(T, N, H, -1).permute(2, 1, 0, 3)  # (H, N, T, Dp)
        k = k.reshape(T, N, H, -1).permute(2, 1, 3, 0)  # (H, N, Dq, T)
        # The updates below run in place on the fresh product (autograd keeps q and k, not
        # the product): no extra (H, N, T, T) tensors.
        scores = torch.matmul(q, k)
        in_place = not tracing()

        if not self.training or random.random() >= float(self.pos_emb_skip_rate):
            pos_scores = self._pos_scores(p, pos_emb, T)
            scores = scores.add_(pos_scores) if in_place else scores + pos_scores

        if self.training and random.random() < 0.1:
            # Fail-safe against implausibly large scores: gradient penalty above 25.
            scores = penalize_abs_values_gt(scores, limit=25.0, penalty=1.0e-04)
            in_place = False  # its output is a view that autograd will not let change

        if key_padding_mask is not None:
            assert key_padding_mask.shape == (N, T), key_padding_mask.shape
            # Without padding (e.g. a single utterance) the fill is a no-op: skip its pass.
            padded = tracing() or bool(key_padding_mask.any())
            key_padding_mask = key_padding_mask.unsqueeze(1) if padded else None
        for mask in (attn_mask, key_padding_mask):
            if mask is not None:
                if in_place:
                    scores.masked_fill_(mask, MASK_VALUE)
                else:
                    scores, in_place = scores.masked_fill(mask, MASK_VALUE), not tracing()

        weights = softmax(scores, dim=-1)
        return nn.functional.dropout(weights, p=self.dropout, training=self.training)

    def streaming_forward(
        self,
        x: Tensor,
        pos_emb: Tensor,
        cached_key: Tensor,
        left_context_len: int,
        key_padding_mask: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """x: (T, N, C); cached_key: (L, N, H*Dq); key_padding_mask: (N, L + T) ->
        weights (H, N, T, L + T), new cached_key (L, N, H*Dq)."""
        T, N, _ = x.shape
        H = self.num_heads
        q, k, p = self._split(self.in_proj(x))
        assert cached_key.shape[0] == left_context_len
        k = torch.cat([cached_key, k], dim=0)
        cached_key = k[k.shape[0] - left_context_len :]
        k_len = k.shape[0]
        q = q.reshape(T, N, H, -1).permute(2, 1, 0, 3)
        p = p.reshape(T, N, H, -1).permute(2, 1, 0, 3)
        k = k.reshape(k_len, N, H, -1).permute(2, 1, 3, 0)
        scores = torch.matmul(q, k) + self._pos_scores(p, pos_emb, k_len)
        scores = scores.masked_fill(key_padding_mask.unsqueeze(1), MASK_VALUE)
        return scores.softmax(dim=-1), cached_key


class SelfAttention(nn.Module):
    """Value path of attention using precomputed weights: (T, N, C) -> (T, N, C)."""

    def __init__(self, embed_dim: int, num_heads: int, value_head_dim: int):
        super().__init__()
        self.in_proj = nn.Linear(embed_dim, num_heads * value_head_dim, bias=True)
        self.out_proj = ScaledLinear(
            num_heads * value_head_dim, embed_dim, bias=True, initial_scale=0.05
        )
        self.whiten = Whiten(
            num_groups=1,
            whitening_limit=whitening_schedule(7.5, ratio=3.0),
            prob=(0.025, 0.25),
            grad_scale=0.01,
        )

    def _attend(self, v: Tensor, attn_weights: Tensor, T: int) -> Tensor:
        # v: (T_key, N, H*Dv); attn_weights: (H, N, T, T_key) -> (T, N, H*Dv)
        H, N = attn_weights.shape[:2]
        v = v.reshape(v.shape[0], N, H, -1).permute(2, 1, 0, 3)
        out = torch.matmul(attn_weights, v)  # (H, N, T, Dv)
        return out.permute(2, 1, 0, 3).reshape(T, N, -1)

    def forward(self, x: Tensor, attn_weights: Tensor) -> Tensor:
        """x: (T, N, C); attn_weights: (H, N, T, T)."""
        T = x.shape[0]
        out = self.out_proj(self._attend(self.in_proj(x), attn_weights, T))
        return self.whiten(out)

    def streaming_forward(
        self, x: Tensor, attn_weights: Tensor, cached_val: Tensor, left_context_len: int
    ) -> tuple[Tensor, Tensor]:
        """x: (T, N, C); attn_weights (H, N, T, L + T); cached_val (L, N, H*Dv)."""
        T = x.shape[0]
        v = torch.cat([cached_val, self.in_proj(x)], dim=0)
        cached_val = v[v.shape[0] - left_context_len :]
        return self.out_proj(self._attend(v, attn_weights, T)), cached_val


class NonlinAttention(nn.Module):
    """NLA(x) = W_o [ A0 ((W_x x) * tanh(W_s x)) * (W_y x) ], A0 = attention head 0.

    Like the convolution module with the convolution replaced by the (single-head)
    attention weights. hidden_channels = 3C/4. (T, N, C) -> (T, N, C).
    """

    def __init__(self, channels: int, hidden_channels: int):
        super().__init__()
        self.hidden_channels = hidden_channels
        self.in_proj = nn.Linear(channels, hidden_channels * 3, bias=True)
        self.balancer = Balancer(
            hidden_channels,
            channel_dim=-1,
            min_positive=ScheduledFloat((0.0, 0.25), (20000.0, 0.05)),
            max_positive=ScheduledFloat((0.0, 0.75), (20000.0, 0.95)),
            min_abs=0.5,
            max_abs=5.0,
        )
        self.tanh = nn.Tanh()
        self.out_proj = ScaledLinear(hidden_channels, channels, bias=True, initial_scale=0.05)
        self.whiten1 = Whiten(
            num_groups=1, whitening_limit=whitening_schedule(5.0), prob=(0.025, 0.25),
            grad_scale=0.01,
        )
        self.whiten2 = Whiten(
            num_groups=1, whitening_limit=whitening_schedule(5.0, ratio=3.0),
            prob=(0.025, 0.25), grad_scale=0.01,
        )

    def forward(self, x: Tensor, attn_weights: Tensor) -> Tensor:
        """x: (T, N, C); attn_weights: (1, N, T, T)."""
        T, N, _ = x.shape
        s, x, y = self.in_proj(x).chunk(3, dim=-1)
        s = self.tanh(self.balancer(s))
        x = self.whiten1(x) * s
        x = x.reshape(T, N, 1, -1).permute(2, 1, 0, 3)  # (1, N, T, hidden)
        x = torch.matmul(attn_weights, x)
        x = x.permute(2, 1, 0, 3).reshape(T, N, -1)
        return self.whiten2(self.out_proj(x * y))

    def streaming_forward(
        self, x: Tensor, attn_weights: Tensor, cached_x: Tensor, left_context_len: int
    ) -> tuple[Tensor, Tensor]:
        """x: (T, N, C); attn_weights: (1, N, T, L + T); cached_x: (1, N, L, hidden)."""
        T, N, _ = x.shape
        s, x, y = self.in_proj(x).chunk(3, dim=-1)
        x = x * self.tanh(s)
        x = x.reshape(T, N, 1, -1).permute(2, 1, 0, 3)
        x = torch.cat([cached_x, x], dim=2)
        cached_x = x[:, :, x.shape[2] - left_context_len :]
        x = torch.matmul(attn_weights, x).permute(2, 1, 0, 3).reshape(T, N, -1)
        return self.out_proj(x * y), cached_x
