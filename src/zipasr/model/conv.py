"""The Zipformer convolution module and its chunk-causal depthwise convolution."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .scaling import (
    ActivationDropoutAndLinear,
    Balancer,
    ScheduledFloat,
    Whiten,
    tracing,
    whitening_schedule,
)


def _shifted_taps(x: Tensor, taps: Tensor, out: Tensor, reverse: bool = False) -> Tensor:
    """out[t] += sum_k taps[k] * x[t + k - K//2] over the valid t (zero padding), in place,
    adding the taps in order k = 0..K-1 (``reverse``: K-1..0).

    x, out: (T, N, C), time-major; taps: (K, C) contiguous. Each tap is one multiply-add
    over a contiguous slab of whole frames: on CPU that beats oneDNN's depthwise Conv1d
    several times over at the Zipformer's sizes, and needs no (N, C, T) copy. With the
    taps in oneDNN's order the sums are bit-identical to its forward (and, reversed over
    flipped taps, to its input gradient), so nothing downstream changes.
    """
    T, K = x.shape[0], taps.shape[0]
    pad = K // 2
    rows = taps.unbind(0)
    for k in reversed(range(K)) if reverse else range(K):
        shift = k - pad
        lo, hi = max(0, -shift), min(T, T - shift)
        if lo < hi:
            out[lo:hi].addcmul_(x[lo + shift : hi + shift], rows[k])
    return out


class _DepthwiseConv1dTimeMajor(torch.autograd.Function):
    """Depthwise Conv1d with "same" zero padding on time-major (T, N, C) input.

    Saves only the input and the taps; the input gradient is the convolution of the output
    gradient with the flipped taps, the weight gradient one multiply-reduce per tap (oneDNN's
    depthwise weight gradient is slow on CPU).
    """

    @staticmethod
    def forward(ctx, x: Tensor, taps: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, taps)
        ctx.has_bias = bias is not None
        return _depthwise_time_major(x, taps, bias)

    @staticmethod
    def backward(ctx, y_grad: Tensor):
        x, taps = ctx.saved_tensors
        T, K = x.shape[0], taps.shape[0]
        pad = K // 2
        x_grad = w_grad = b_grad = None
        if ctx.needs_input_grad[0]:
            x_grad = _shifted_taps(y_grad, taps.flip(0), torch.zeros_like(x), reverse=True)
        if ctx.needs_input_grad[1]:
            w_grad = taps.new_zeros(taps.shape)
            for k in range(K):
                shift = k - pad
                lo, hi = max(0, -shift), min(T, T - shift)
                if lo < hi:
                    prod = y_grad[lo:hi] * x[lo + shift : hi + shift]
                    torch.sum(prod, dim=(0, 1), out=w_grad[k])
        if ctx.needs_input_grad[2] and ctx.has_bias:
            b_grad = y_grad.sum(dim=(0, 1))
        return x_grad, w_grad, b_grad


def _depthwise_time_major(x: Tensor, taps: Tensor, bias: Tensor | None) -> Tensor:
    out = _shifted_taps(x, taps, torch.zeros_like(x, memory_format=torch.contiguous_format))
    return out if bias is None else out.add_(bias)


def depthwise_conv1d_time_major(x: Tensor, conv: nn.Conv1d) -> Tensor:
    """``conv`` (a depthwise nn.Conv1d, odd kernel, padding K//2) applied to time-major x:
    (T, N, C) -> (T, N, C), i.e. ``conv(x.permute(1, 2, 0)).permute(2, 0, 1)``: up to float
    rounding in general, bit-identical to oneDNN's result (and input gradient) at the
    Zipformer's sizes on this CPU build. Not for tracing: the tap loop would fix the traced
    sequence length.
    """
    # (K, C): each tap a contiguous row; in x's dtype (under autocast x may be bf16).
    taps = conv.weight[:, 0].t().to(x.dtype).contiguous()
    bias = None if conv.bias is None else conv.bias.to(x.dtype)
    if torch.is_grad_enabled() and (x.requires_grad or conv.weight.requires_grad):
        return _DepthwiseConv1dTimeMajor.apply(x, taps, bias)
    return _depthwise_time_major(x, taps, bias)


class ChunkCausalDepthwiseConv1d(nn.Module):
    """Depthwise Conv1d that is causal chunk-wise, matching a block-triangular attention
    mask: output = causal_conv(x) + chunkwise_conv(x) * scale.

    ``causal_conv`` (kernel (K+1)//2, K//2 frames of left zero padding) sees past and
    current frames; ``chunkwise_conv`` (kernel K, "same" padding) is applied independently
    inside each chunk, scaled per channel and position by 1 + left_edge + right_edge from
    ``chunkwise_conv_scale`` (2, C, K). Shapes: (N, C, T) -> (N, C, T).
    """

    def __init__(self, channels: int, kernel_size: int, initial_scale: float = 1.0,
                 bias: bool = True):
        super().__init__()
        assert kernel_size % 2 == 1
        self.kernel_size = kernel_size
        self.causal_conv = nn.Conv1d(
            channels, channels, (kernel_size + 1) // 2, groups=channels, padding=0, bias=True
        )
        self.chunkwise_conv = nn.Conv1d(
            channels, channels, kernel_size, groups=channels, padding=kernel_size // 2,
            bias=bias,
        )
        self.chunkwise_conv_scale = nn.Parameter(torch.zeros(2, channels, kernel_size))
        with torch.no_grad():
            self.causal_conv.weight.mul_(initial_scale)
            self.chunkwise_conv.weight.mul_(initial_scale)
            if bias:
                nn.init.uniform_(self.causal_conv.bias, -0.1 * initial_scale, 0.1 * initial_scale)

    def _chunk_scale(self, chunk_size: int) -> Tensor:
        """(C, chunk_size) scale for the chunkwise branch."""
        left, right = self.chunkwise_conv_scale[0], self.chunkwise_conv_scale[1]
        K = self.kernel_size
        if chunk_size < K:
            left, right = left[:, :chunk_size], right[:, -chunk_size:]
        else:
            pad = left.new_zeros(left.shape[0], chunk_size - K)
            left, right = torch.cat((left, pad), dim=-1), torch.cat((pad, right), dim=-1)
        return 1.0 + (left + right)

    def forward(self, x: Tensor, chunk_size: int = -1) -> Tensor:
        """x: (N, C, T); chunk_size in frames (-1: the whole sequence is one chunk)."""
        N, C, T = x.shape
        left_pad = self.kernel_size // 2
        if chunk_size < 0 or chunk_size > T:
            chunk_size = T
        right_pad = -T % chunk_size
        x = F.pad(x, (left_pad, right_pad))
        x_causal = self.causal_conv(x[..., : left_pad + T])

        x_chunk = x[..., left_pad:]
        num_chunks = x_chunk.shape[2] // chunk_size
        x_chunk = x_chunk.reshape(N, C, num_chunks, chunk_size).permute(0, 2, 1, 3)
        x_chunk = self.chunkwise_conv(x_chunk.reshape(N * num_chunks, C, chunk_size))
        x_chunk = x_chunk * self._chunk_scale(chunk_size)
        x_chunk = x_chunk.reshape(N, num_chunks, C, chunk_size).permute(0, 2, 1, 3)
        x_chunk = x_chunk.reshape(N, C, num_chunks * chunk_size)[..., :T]
        return x_chunk + x_causal

    def streaming_forward(self, x: Tensor, cache: Tensor) -> tuple[Tensor, Tensor]:
        """One chunk x: (N, C, T) with cache (N, C, K//2) of past frames."""
        left_pad = self.kernel_size // 2
        x = torch.cat([cache, x], dim=2)
        cache = x[..., x.shape[2] - left_pad :]
        x_causal = self.causal_conv(x)
        x_chunk = self.chunkwise_conv(x[..., left_pad:])
        x_chunk = x_chunk * self._chunk_scale(x_chunk.shape[2])
        return x_chunk + x_causal, cache


class ConvolutionModule(nn.Module):
    """y = W_o SwooshR(DepthwiseConv(GLU(W_i x))), no normalisation inside.

    Padding frames are zeroed before the depthwise convolution so they do not leak into
    valid frames. (T, N, C) -> (T, N, C).
    """

    def __init__(self, channels: int, kernel_size: int, causal: bool):
        super().__init__()
        assert kernel_size % 2 == 1
        self.causal = causal
        self.in_proj = nn.Linear(channels, 2 * channels)
        self.balancer1 = Balancer(
            channels,
            channel_dim=-1,
            min_positive=ScheduledFloat((0.0, 0.05), (8000.0, 0.025)),
            max_positive=1.0,
            min_abs=1.5,
            max_abs=ScheduledFloat((0.0, 5.0), (8000.0, 10.0), default=1.0),
        )
        self.sigmoid = nn.Sigmoid()
        if causal:
            self.depthwise_conv = ChunkCausalDepthwiseConv1d(channels, kernel_size)
        else:
            self.depthwise_conv = nn.Conv1d(
                channels, channels, kernel_size, groups=channels, padding=kernel_size // 2
            )
        self.balancer2 = Balancer(
            channels,
            channel_dim=1,
            min_positive=ScheduledFloat((0.0, 0.1), (8000.0, 0.05)),
            max_positive=1.0,
            min_abs=ScheduledFloat((0.0, 0.2), (20000.0, 0.5)),
            max_abs=10.0,
        )
        self.whiten = Whiten(
            num_groups=1, whitening_limit=whitening_schedule(7.5), prob=(0.025, 0.25),
            grad_scale=0.01,
        )
        self.out_proj = ActivationDropoutAndLinear(
            channels, channels, activation="SwooshR", dropout_p=0.0, initial_scale=0.05
        )

    def forward(
        self, x: Tensor, src_key_padding_mask: Tensor | None = None, chunk_size: int = -1
    ) -> Tensor:
        """x: (T, N, C); src_key_padding_mask: (N, T) True = padding."""
        x, s = self.in_proj(x).chunk(2, dim=-1)
        x = x * self.sigmoid(self.balancer1(s))  # GLU
        if chunk_size >= 0:
            assert self.causal, "chunk_size needs a model built with causal=True"
        if self.causal or tracing():
            # (The tap loop below would fix the traced graph's sequence length.)
            x = x.permute(1, 2, 0)  # (N, C, T)
            if src_key_padding_mask is not None:
                x = x.masked_fill(src_key_padding_mask.unsqueeze(1), 0.0)
            if self.causal:
                x = self.depthwise_conv(x, chunk_size=chunk_size)
            else:
                x = self.depthwise_conv(x)
            x = self.balancer2(x).permute(2, 0, 1)  # (T, N, C)
        else:
            # Stays time-major: the balancer sees an (N, C, T) view, no copies. x is the
            # fresh GLU product (autograd keeps its factors), so it can be masked in place;
            # without padding the fill is skipped.
            if src_key_padding_mask is not None and src_key_padding_mask.any():
                x = x.masked_fill_(src_key_padding_mask.t().unsqueeze(-1), 0.0)
            x = depthwise_conv1d_time_major(x, self.depthwise_conv)
            x = self.balancer2(x.permute(1, 2, 0)).permute(2, 0, 1)
        return self.out_proj(self.whiten(x))

    def streaming_forward(
        self, x: Tensor, cache: Tensor, src_key_padding_mask: Tensor
    ) -> tuple[Tensor, Tensor]:
        """One chunk x: (T, N, C); cache (N, C, K//2); src_key_padding_mask (N, T)."""
        x, s = self.in_proj(x).chunk(2, dim=-1)
        x = (x * self.sigmoid(s)).permute(1, 2, 0)
        x = x.masked_fill(src_key_padding_mask.unsqueeze(1), 0.0)
        x, cache = self.depthwise_conv.streaming_forward(x, cache)
        return self.out_proj(x.permute(2, 0, 1)), cache
