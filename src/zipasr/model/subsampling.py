"""Conv-Embed: the convolutional frontend taking 100 Hz fbank to 50 Hz embeddings.

``Conv2dSubsampling`` = three Conv2d + SwooshR layers, one ConvNeXt block, a Linear
projection, BiasNorm and dropout. Output length (T - 7) // 2. Module indices inside
``conv`` matter: they give the state-dict keys ``conv.0``, ``conv.4``, ``conv.7``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .scaling import (
    Balancer,
    BiasNorm,
    Dropout3,
    FloatLike,
    ScaledConv2d,
    ScaleGrad,
    ScheduledFloat,
    SwooshL,
    SwooshR,
    Whiten,
    tracing,
)


class _DepthwiseConv2d(torch.autograd.Function):
    """Depthwise Conv2d (stride 1, "same" padding) with a faster weight gradient on CPU.

    oneDNN's depthwise weight gradient for the ConvNeXt's 7x7 kernel over (N, C, T, 19) maps
    runs ~8x slower than its forward (measured: 26 ms vs 3 ms for the demo model's batch);
    the same gradient is a grouped conv of the padded input with the output gradient as the
    kernel, one group per (channel, sequence), summed over sequences. Same values up to
    float rounding (tested against autograd of F.conv2d).
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, padding: tuple[int, int]) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.padding = padding
        return F.conv2d(x, weight, bias, padding=padding, groups=x.shape[1])

    @staticmethod
    def backward(ctx, y_grad: Tensor):
        x, weight = ctx.saved_tensors
        (pt, pf), (kt, kf) = ctx.padding, weight.shape[2:]
        n, c, t, f = x.shape
        x_grad = F.conv2d(y_grad, weight.flip(2, 3), padding=(kt - 1 - pt, kf - 1 - pf), groups=c)
        xp = F.pad(x, (pf, pf, pt, pt)).transpose(0, 1).reshape(1, c * n, t + 2 * pt, f + 2 * pf)
        kernel = y_grad.transpose(0, 1).reshape(c * n, 1, t, f)
        w_grad = F.conv2d(xp, kernel, groups=c * n).view(c, n, kt, kf).sum(1, keepdim=True)
        return x_grad, w_grad, y_grad.sum((0, 2, 3)), None


class ConvNeXt(nn.Module):
    """One ConvNeXt block on (N, C, T, F): depthwise 7x7 -> 1x1 (C -> 3C) -> SwooshL ->
    1x1 (3C -> C), residual. In training the whole block is skipped per sequence with a
    scheduled layer-drop rate.

    The 1x1 convolutions run as Linear layers on a channels-last view (N, T, F, C): on CPU
    that is a plain matrix product instead of a slow 1x1 convolution (weights keep their
    Conv2d shapes and names). The balancers and the whitening act per channel, so the
    layout does not change what they compute.
    """

    def __init__(
        self,
        channels: int,
        hidden_ratio: int = 3,
        kernel_size: tuple[int, int] = (7, 7),
        layerdrop_rate: FloatLike | None = None,
    ):
        super().__init__()
        self.padding = ((kernel_size[0] - 1) // 2, (kernel_size[1] - 1) // 2)
        hidden = channels * hidden_ratio
        if layerdrop_rate is None:
            layerdrop_rate = ScheduledFloat((0.0, 0.2), (20000.0, 0.015))
        self.layerdrop_rate = layerdrop_rate
        self.depthwise_conv = nn.Conv2d(
            channels, channels, kernel_size, groups=channels, padding=self.padding
        )
        self.pointwise_conv1 = nn.Conv2d(channels, hidden, kernel_size=1)
        self.hidden_balancer = Balancer(
            hidden, channel_dim=-1, min_positive=0.3, max_positive=1.0, min_abs=0.75, max_abs=5.0
        )
        self.activation = SwooshL()
        self.pointwise_conv2 = ScaledConv2d(hidden, channels, kernel_size=1, initial_scale=0.01)
        self.out_balancer = Balancer(
            channels, channel_dim=-1, min_positive=0.4, max_positive=0.6, min_abs=1.0, max_abs=6.0
        )
        self.out_whiten = Whiten(
            num_groups=1, whitening_limit=5.0, prob=(0.025, 0.25), grad_scale=0.01
        )

    def forward(self, x: Tensor) -> Tensor:
        """x: (N, C, T, F) -> (N, C, T, F)."""
        mask = None
        if self.training:
            rate = float(self.layerdrop_rate)
            if rate != 0.0:
                mask = torch.rand((x.shape[0], 1, 1, 1), dtype=x.dtype, device=x.device) > rate
        plain_cpu = x.device.type == "cpu" and not torch.is_autocast_enabled("cpu")
        if plain_cpu and mask is None and not torch.is_grad_enabled() and not tracing():
            return self._forward_no_grad(x)
        bypass = x
        dw = self.depthwise_conv
        if plain_cpu and torch.is_grad_enabled():
            x = _DepthwiseConv2d.apply(x, dw.weight, dw.bias, self.padding)
        else:
            x = dw(x)
        x = x.permute(0, 2, 3, 1)  # (N, T, F, C)
        x = F.linear(x, self.pointwise_conv1.weight.flatten(1), self.pointwise_conv1.bias)
        x = self.hidden_balancer(x)
        x = self.activation(x)
        x = F.linear(x, self.pointwise_conv2.weight.flatten(1), self.pointwise_conv2.bias)
        if mask is not None:
            x = x * mask
        x = bypass.permute(0, 2, 3, 1) + x
        x = self.out_balancer(x)
        return self.out_whiten(x).permute(0, 3, 1, 2)

    def _forward_no_grad(self, x: Tensor, rows_per_block: int = 1024) -> Tensor:
        """:meth:`forward` without autograd (balancers and whitening are identities then):
        the pointwise part (C -> 3C -> SwooshL -> C, per position) runs on blocks of rows,
        so the (N, T, F, 3C) hidden activation, the largest tensor of the whole model at
        this layer's 50 Hz x 19 positions, never exists in full: each block's hidden stays
        in cache and no large temporaries are allocated. x: (N, C, T, F) -> (N, C, T, F)."""
        N, C, T, F_ = x.shape
        w1 = self.pointwise_conv1.weight.flatten(1).t()
        w2 = self.pointwise_conv2.weight.flatten(1).t()
        h = self.depthwise_conv(x).permute(0, 2, 3, 1).reshape(-1, C)  # (rows, C)
        # out = bypass + bias + hidden @ w2, accumulated block by block into the residual.
        out = torch.empty(N, T, F_, C, dtype=x.dtype, device=x.device)
        torch.add(x.permute(0, 2, 3, 1), self.pointwise_conv2.bias, out=out)
        out = out.view(-1, C)
        for i in range(0, h.shape[0], rows_per_block):
            hidden = torch.addmm(self.pointwise_conv1.bias, h[i : i + rows_per_block], w1)
            out[i : i + rows_per_block].addmm_(self.activation(hidden), w2)
        return out.view(N, T, F_, C).permute(0, 3, 1, 2)

    def streaming_forward(self, x: Tensor, cached_left_pad: Tensor) -> tuple[Tensor, Tensor]:
        """Chunk of (N, C, T + 3, F) including 3 frames of right context ->
        ((N, C, T, F), new cache (N, C, 3, F) of the last 3 frames of this chunk)."""
        pad_t = self.padding[0]
        T = x.shape[2] - pad_t
        bypass = x[:, :, :T]
        x = torch.cat([cached_left_pad, x], dim=2)
        cached_left_pad = x[:, :, T : T + pad_t]
        conv = self.depthwise_conv
        x = F.conv2d(x, conv.weight, conv.bias, padding=(0, self.padding[1]), groups=conv.groups)
        x = self.pointwise_conv2(self.activation(self.pointwise_conv1(x)))
        return bypass + x, cached_left_pad


class Conv2dSubsampling(nn.Module):
    """Conv-Embed: (N, T, F) fbank -> (N, (T - 7) // 2, out_channels).

    Time: conv0 (k3, no time pad) T-2; conv4 (k3, stride 2) (T-3)//2; conv7 (k3, stride
    (1, 2)) (T-7)//2. Frequency 80 -> 80 -> 39 -> 19. The (N, 128, T', 19) map is flattened
    channel-major (feature index = c * 19 + f) before the Linear.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        layer1_channels: int = 8,
        layer2_channels: int = 32,
        layer3_channels: int = 128,
        dropout: FloatLike = 0.1,
    ):
        super().__init__()
        assert in_channels >= 7
        self.conv = nn.Sequential(
            nn.Conv2d(1, layer1_channels, kernel_size=3, padding=(0, 1)),
            ScaleGrad(0.2),  # keeps conv0's weight gradients within fp16 range
            Balancer(layer1_channels, channel_dim=1, max_abs=1.0),
            SwooshR(),
            nn.Conv2d(layer1_channels, layer2_channels, kernel_size=3, stride=2, padding=0),
            Balancer(layer2_channels, channel_dim=1, max_abs=4.0),
            SwooshR(),
            nn.Conv2d(layer2_channels, layer3_channels, kernel_size=3, stride=(1, 2)),
            Balancer(layer3_channels, channel_dim=1, max_abs=4.0),
            SwooshR(),
        )
        self.convnext = ConvNeXt(layer3_channels, kernel_size=(7, 7))
        self.out_width = (((in_channels - 1) // 2) - 1) // 2
        self.layer3_channels = layer3_channels
        self.out = nn.Linear(self.out_width * layer3_channels, out_channels)
        self.out_whiten = Whiten(
            num_groups=1,
            whitening_limit=ScheduledFloat((0.0, 4.0), (20000.0, 8.0), default=4.0),
            prob=(0.025, 0.25),
            grad_scale=0.02,
        )
        self.out_norm = BiasNorm(out_channels)
        self.dropout = Dropout3(dropout, shared_dim=1)

    def forward(self, x: Tensor, x_lens: Tensor) -> tuple[Tensor, Tensor]:
        """x: (N, T, F), x_lens: (N,) -> (N, (T-7)//2, C), lengths (x_lens - 7) // 2."""
        x = self.conv(x.unsqueeze(1))  # (N, 128, T', 19)
        x = self.convnext(x)
        b, c, t, f = x.shape
        x = x.transpose(1, 2).reshape(b, t, c * f)
        x = self.out(x)
        x = self.out_whiten(x)
        x = self.out_norm(x)
        x = self.dropout(x)
        x_lens = torch.div(x_lens - 7, 2, rounding_mode="floor")
        assert x.shape[1] == int(x_lens.max()), (x.shape, x_lens)
        return x, x_lens

    def streaming_forward(
        self, x: Tensor, x_lens: Tensor, cached_left_pad: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Streaming chunk (N, T, F) -> (N, (T-7)//2 - 3, C): ConvNeXt's 3 frames of right
        context are consumed here and supplied again at the start of the next chunk."""
        x = self.conv(x.unsqueeze(1))
        x, cached_left_pad = self.convnext.streaming_forward(x, cached_left_pad)
        b, c, t, f = x.shape
        x = self.out_norm(self.out(x.transpose(1, 2).reshape(b, t, c * f)))
        x_lens = torch.div(x_lens - 7, 2, rounding_mode="floor") - self.convnext.padding[0]
        return x, x_lens, cached_left_pad

    def get_init_states(self, batch_size: int = 1, device: torch.device | None = None) -> Tensor:
        """ConvNeXt left-padding cache, zeros of shape (N, 128, 3, out_width)."""
        return torch.zeros(
            batch_size, self.layer3_channels, self.convnext.padding[0], self.out_width,
            device=device,
        )
