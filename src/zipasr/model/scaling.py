"""Building blocks of the Zipformer: normalisation, activations, schedules and the
gradient-shaping modules (Balancer, Whiten) that are identities in the forward pass.

Everything follows icefall's ``zipformer/scaling.py`` numerically; no k2 is needed.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

# ---------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------


class PiecewiseLinear:
    """Piecewise-linear function given by (x, y) points with increasing x; clamped to the
    first / last y outside the range."""

    def __init__(self, *points: tuple[float, float]):
        assert len(points) >= 1
        self.points = [(float(x), float(y)) for x, y in points]
        for (x0, _), (x1, _) in zip(self.points, self.points[1:], strict=False):
            assert x1 > x0, self.points

    def __call__(self, x: float) -> float:
        pts = self.points
        if x <= pts[0][0]:
            return pts[0][1]
        if x >= pts[-1][0]:
            return pts[-1][1]
        for (x0, y0), (x1, y1) in zip(pts, pts[1:], strict=False):
            if x0 <= x <= x1:
                return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
        raise AssertionError("unreachable")

    def __add__(self, c: float) -> PiecewiseLinear:
        return PiecewiseLinear(*[(x, y + c) for x, y in self.points])

    def max(self, c: float) -> PiecewiseLinear:
        # Only the scalar case is needed; insert crossing points so max() stays exact.
        xs = {x for x, _ in self.points}
        for (x0, y0), (x1, y1) in zip(self.points, self.points[1:], strict=False):
            if (y0 - c) * (y1 - c) < 0:
                xs.add(x0 + (c - y0) * (x1 - x0) / (y1 - y0))
        return PiecewiseLinear(*[(x, max(self(x), c)) for x in sorted(xs)])


class ScheduledFloat(nn.Module):
    """A float that is a piecewise-linear function of the training ``batch_count``.

    Use as ``float(sf)``. The schedule applies only when ``batch_count`` has been set (see
    :func:`zipasr.model.set_batch_count`) and the module is in training mode; otherwise
    ``default`` is returned. It is an ``nn.Module`` (without parameters) only so that
    ``model.modules()`` finds it and ``model.train()/eval()`` reach it.
    """

    def __init__(self, *points: tuple[float, float], default: float = 0.0):
        super().__init__()
        self.schedule = PiecewiseLinear(*points)
        self.default = default
        self.batch_count: float | None = None
        self.name: str | None = None

    def extra_repr(self) -> str:
        return f"batch_count={self.batch_count}, schedule={self.schedule.points}"

    def __float__(self) -> float:
        if self.batch_count is None or not self.training:
            return float(self.default)
        return self.schedule(self.batch_count)

    def __add__(self, c: float) -> ScheduledFloat:
        return ScheduledFloat(*(self.schedule + c).points, default=self.default + c)

    def max(self, c: float) -> ScheduledFloat:
        return ScheduledFloat(*self.schedule.max(c).points, default=max(self.default, c))


FloatLike = float | ScheduledFloat


def whitening_schedule(x: float, ratio: float = 2.0) -> ScheduledFloat:
    """Whitening limit growing from ``x`` to ``ratio * x`` over 20k batches."""
    return ScheduledFloat((0.0, x), (20000.0, ratio * x), default=x)


# ---------------------------------------------------------------------------
# Scaled initialisation (factories returning plain torch layers)
# ---------------------------------------------------------------------------


def _rescale_init(layer: nn.Module, initial_scale: float) -> nn.Module:
    with torch.no_grad():
        layer.weight.mul_(initial_scale)
        if layer.bias is not None:
            nn.init.uniform_(layer.bias, -0.1 * initial_scale, 0.1 * initial_scale)
    return layer


def ScaledLinear(*args, initial_scale: float = 1.0, **kwargs) -> nn.Linear:  # noqa: N802
    """``nn.Linear`` with default init times ``initial_scale``, bias ~ U(-0.1 s, 0.1 s).

    The scale only affects initialisation: at load time it is an ordinary Linear.
    """
    return _rescale_init(nn.Linear(*args, **kwargs), initial_scale)


def ScaledConv1d(*args, initial_scale: float = 1.0, **kwargs) -> nn.Conv1d:  # noqa: N802
    """``nn.Conv1d`` with initial weight scale, see :func:`ScaledLinear`."""
    return _rescale_init(nn.Conv1d(*args, **kwargs), initial_scale)


def ScaledConv2d(*args, initial_scale: float = 1.0, **kwargs) -> nn.Conv2d:  # noqa: N802
    """``nn.Conv2d`` with initial weight scale, see :func:`ScaledLinear`."""
    return _rescale_init(nn.Conv2d(*args, **kwargs), initial_scale)


# ---------------------------------------------------------------------------
# Swoosh activations
# ---------------------------------------------------------------------------

# SwooshR(x) = log(1 + e^(x-1)) - 0.08 x - 0.313261687 ; SwooshR(0) = 0.
# SwooshL(x) = log(1 + e^(x-4)) - 0.08 x - 0.035
_SWOOSH = {
    # name: (offset, constant, derivative upper bound used for uint8 quantisation)
    "SwooshR": (1.0, 0.313261687, 0.925),
    "SwooshL": (4.0, 0.035, 1.0 - 0.08 + 0.005),
}
_SWOOSH_DERIV_MIN = -0.08


def at_least_f32(x: Tensor) -> Tensor:
    """``x`` in float32 if it is a 16-bit float, else unchanged.

    The backward passes and losses compute in float32 under fp16/bf16 autocast, as icefall's
    do; a float64 model stays float64 throughout, so a float64 run carries no float32 rounding
    anywhere (the float64 reference tests depend on it). For float32 tensors it is a no-op."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def tracing() -> bool:
    """Whether a graph is being traced (ONNX export): then the fast paths that loop over
    sizes, skip work by looking at values, or use ``out=`` forms step aside for the plain
    operations, so the graph stays general in the sequence length and exportable."""
    return torch.jit.is_tracing()


def swoosh_forward(x: Tensor, kind: str) -> Tensor:
    """SwooshR/SwooshL value, computed in float32 at least (softplus is exact to fp32)."""
    return _swoosh(x, kind, deriv=False)[0].to(x.dtype)


def _swoosh(x: Tensor, kind: str, deriv: bool) -> tuple[Tensor, Tensor | None]:
    """(value, derivative sigmoid(x - offset) - 0.08 or None) in float32 at least, sharing
    t = x - offset. Everything after t runs in place, softplus included (its ``out=`` form
    writes over t): on CPU the activation is bound by memory traffic and by the page faults
    of fresh large tensors, so each temporary saved is a pass saved. The same operations in
    the same order as the out-of-place formula, so bit-identical values."""
    offset, const, _ = _SWOOSH[kind]
    xf = at_least_f32(x)
    t = xf - offset
    d = torch.sigmoid(t).sub_(0.08) if deriv else None
    if tracing():  # the out= form has no ONNX translation
        return F.softplus(t, beta=1.0, threshold=40.0) - 0.08 * xf - const, d
    y = torch.ops.aten.softplus.out(t, 1.0, 40.0, out=t)
    return y.sub_(xf, alpha=0.08).sub_(const), d


def quantize_deriv(d: Tensor, kind: str) -> Tensor:
    """Store a Swoosh derivative as uint8 with stochastic (expectation-preserving) rounding:
    floor((d - lo) * 255 / (hi - lo) + U[0, 1)). Overwrites ``d``."""
    hi, lo = _SWOOSH[kind][2], _SWOOSH_DERIV_MIN
    return torch.rand_like(d).add_(d.sub_(lo), alpha=255.0 / (hi - lo)).to(torch.uint8)


def dequantize_deriv(q: Tensor, kind: str, dtype: torch.dtype = torch.float32) -> Tensor:
    hi, lo = _SWOOSH[kind][2], _SWOOSH_DERIV_MIN
    return q.to(dtype).mul_((hi - lo) / 255.0).add_(lo)


# Elements per block of the blocked Swoosh passes below: 256 KiB of float32, cache-sized.
_BLOCK = 1 << 16


def _blockwise(*tensors: Tensor) -> bool:
    """Whether to run elementwise work block by block over the flat storage: large dense
    float32 tensors only (for small ones the per-block overhead would not pay)."""
    return all(t.dtype == torch.float32 and t.is_contiguous() for t in tensors) and (
        tensors[0].numel() >= 8 * _BLOCK)


def _swoosh_quantized_blockwise(x: Tensor, kind: str) -> tuple[Tensor, Tensor]:
    """(value, quantised derivative) as :func:`_swoosh` + :func:`quantize_deriv` compute
    them, bit for bit, one cache-sized block at a time: no full-size temporaries besides
    the two results. The uniform noise is drawn block by block in storage order, which is
    the order ``rand_like`` draws it in for a contiguous tensor (the same stream; tested)."""
    offset, const, hi = _SWOOSH[kind]
    lo = _SWOOSH_DERIV_MIN
    y = torch.empty_like(x)
    q = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
    xs, ys, qs = x.view(-1), y.view(-1), q.view(-1)
    for i in range(0, xs.numel(), _BLOCK):
        xb, yb = xs[i : i + _BLOCK], ys[i : i + _BLOCK]
        torch.sub(xb, offset, out=yb)
        d = torch.sigmoid(yb).sub_(0.08).sub_(lo)
        noise = torch.empty_like(d).uniform_()
        qs[i : i + _BLOCK].copy_(noise.add_(d, alpha=255.0 / (hi - lo)))
        torch.ops.aten.softplus.out(yb, 1.0, 40.0, out=yb)
        yb.sub_(xb, alpha=0.08).sub_(const)
    return y, q


def _dequantized_times_blockwise(q: Tensor, g: Tensor, kind: str) -> Tensor:
    """``dequantize_deriv(q) * g`` block by block (bit-identical)."""
    hi, lo = _SWOOSH[kind][2], _SWOOSH_DERIV_MIN
    out = torch.empty_like(g)
    qs, gs, outs = q.view(-1), g.view(-1), out.view(-1)
    for i in range(0, qs.numel(), _BLOCK):
        ob = outs[i : i + _BLOCK]
        ob.copy_(qs[i : i + _BLOCK]).mul_((hi - lo) / 255.0).add_(lo).mul_(gs[i : i + _BLOCK])
    return out


class _SwooshFunction(torch.autograd.Function):
    """Swoosh with a memory-lean backward: only a uint8 derivative is kept."""

    @staticmethod
    def forward(ctx, x: Tensor, kind: str) -> Tensor:
        ctx.kind = kind
        ctx.x_dtype = x.dtype
        if _blockwise(x):
            y, q = _swoosh_quantized_blockwise(x, kind)
        else:
            y, d = _swoosh(x, kind, deriv=True)
            q = quantize_deriv(d, kind)
        ctx.save_for_backward(q)
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, y_grad: Tensor):
        (q,) = ctx.saved_tensors
        g = at_least_f32(y_grad)
        if _blockwise(g) and q.is_contiguous():
            return _dequantized_times_blockwise(q, g, ctx.kind).to(ctx.x_dtype), None
        return dequantize_deriv(q, ctx.kind, g.dtype).mul_(g).to(ctx.x_dtype), None


class SwooshR(nn.Module):
    """SwooshR(x) = log(1 + exp(x - 1)) - 0.08 x - 0.313261687, elementwise, any shape."""

    def forward(self, x: Tensor) -> Tensor:
        if not (x.requires_grad and torch.is_grad_enabled()):
            return swoosh_forward(x, "SwooshR")
        return _SwooshFunction.apply(x, "SwooshR")


class SwooshL(nn.Module):
    """SwooshL(x) = log(1 + exp(x - 4)) - 0.08 x - 0.035, elementwise, any shape."""

    def forward(self, x: Tensor) -> Tensor:
        if not (x.requires_grad and torch.is_grad_enabled()):
            return swoosh_forward(x, "SwooshL")
        return _SwooshFunction.apply(x, "SwooshL")


# ---------------------------------------------------------------------------
# Dropout variants and ActivationDropoutAndLinear
# ---------------------------------------------------------------------------


class Dropout2(nn.Module):
    """Ordinary dropout whose rate may be a :class:`ScheduledFloat`."""

    def __init__(self, p: FloatLike):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        return F.dropout(x, p=float(self.p), training=self.training)


class _MulForDropout3(torch.autograd.Function):
    # y = x * mask * alpha, storing only y (its zeros give the mask back).
    @staticmethod
    def forward(ctx, x: Tensor, mask: Tensor, alpha: float) -> Tensor:
        ans = x * mask * alpha
        ctx.save_for_backward(ans)
        ctx.alpha = alpha
        return ans

    @staticmethod
    def backward(ctx, ans_grad: Tensor):
        (ans,) = ctx.saved_tensors
        return ctx.alpha * ans_grad * (ans != 0), None, None


class Dropout3(nn.Module):
    """Dropout with one mask shared along ``shared_dim`` (size 1 there), scaled 1/(1-p)."""

    def __init__(self, p: FloatLike, shared_dim: int):
        super().__init__()
        self.p = p
        self.shared_dim = shared_dim

    def forward(self, x: Tensor) -> Tensor:
        p = float(self.p)
        if not self.training or p == 0.0:
            return x
        shape = list(x.shape)
        shape[self.shared_dim] = 1
        mask = torch.rand(*shape, device=x.device) > p
        return _MulForDropout3.apply(x, mask, 1.0 / (1.0 - p))


class _ActivationDropoutAndLinearFunction(torch.autograd.Function):
    """linear(dropout(swoosh(x))), saving only x, the small mask and the weights."""

    @staticmethod
    def forward(ctx, x, weight, bias, kind: str, dropout_p: float, shared_dim: int | None):
        mask = None
        if dropout_p != 0.0:
            shape = list(x.shape)
            if shared_dim is not None:
                shape[shared_dim] = 1
            mask = (torch.rand(*shape, device=x.device) > dropout_p).to(x.dtype)
            mask = mask * (1.0 / (1.0 - dropout_p))
        ctx.save_for_backward(x, weight, bias, mask)
        ctx.kind = kind
        y = swoosh_forward(x, kind)
        if mask is not None:
            y = y.mul_(mask)  # fresh tensor: in place
        return F.linear(y, weight, bias)

    @staticmethod
    def backward(ctx, ans_grad: Tensor):
        x, weight, bias, mask = ctx.saved_tensors
        with torch.autocast(device_type=x.device.type, enabled=False):
            y, deriv = _swoosh(x, ctx.kind, deriv=True)
            if mask is not None:
                y.mul_(mask.to(y.dtype))
                deriv.mul_(mask.to(y.dtype))
            g = at_least_f32(ans_grad).reshape(-1, weight.shape[0])
            w = weight.to(g.dtype)
            weight_grad = g.t() @ y.to(g.dtype).reshape(-1, w.shape[1])
            bias_grad = None if bias is None else g.sum(dim=0).to(bias.dtype)
            x_grad = (at_least_f32(ans_grad) @ w).mul_(deriv)
        return x_grad.to(x.dtype), weight_grad.to(weight.dtype), bias_grad, None, None, None


class ActivationDropoutAndLinear(nn.Module):
    """``Linear(Dropout(Swoosh(x)))`` with a memory-lean backward.

    Args:
        in_channels, out_channels: Linear sizes.
        activation: "SwooshL" or "SwooshR".
        dropout_p: dropout rate (float or ScheduledFloat), mask scaled by 1/(1-p).
        dropout_shared_dim: axis along which the dropout mask is shared (None: no sharing).
        initial_scale: ScaledLinear init scale.
    Shapes: (..., in_channels) -> (..., out_channels). Parameters are named ``weight`` and
    ``bias`` directly, as in icefall.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        bias: bool = True,
        activation: str = "SwooshL",
        dropout_p: FloatLike = 0.0,
        dropout_shared_dim: int | None = -1,
        initial_scale: float = 1.0,
    ):
        super().__init__()
        assert activation in _SWOOSH, activation
        lin = ScaledLinear(in_channels, out_channels, bias=bias, initial_scale=initial_scale)
        self.weight = lin.weight
        self.register_parameter("bias", lin.bias)
        self.activation = activation
        self.dropout_p = dropout_p
        self.dropout_shared_dim = dropout_shared_dim

    def forward(self, x: Tensor) -> Tensor:
        p = float(self.dropout_p) if self.training else 0.0
        if not torch.is_grad_enabled() and p == 0.0:
            return F.linear(swoosh_forward(x, self.activation), self.weight, self.bias)
        return _ActivationDropoutAndLinearFunction.apply(
            x, self.weight, self.bias, self.activation, p, self.dropout_shared_dim
        )


# ---------------------------------------------------------------------------
# BiasNorm
# ---------------------------------------------------------------------------


class _BiasNormFunction(torch.autograd.Function):
    """Stores only x (plus the tiny bias/log_scale); the backward is in closed form.

    With d = x - bias, s = mean_c(d^2)^-1/2, e = exp(log_scale) and A = sum_c(g x) per
    position, y = x s e gives dy/dx . g = s e g - (A e s^3 / C) d, the bias gradient
    sum over positions of (A e s^3 / C) d, and the log_scale gradient sum(A s e).
    """

    @staticmethod
    def forward(ctx, x: Tensor, bias: Tensor, log_scale: Tensor, channel_dim: int) -> Tensor:
        ctx.channel_dim = channel_dim
        ctx.save_for_backward(x, bias, log_scale)
        return _bias_norm(x, bias, log_scale, channel_dim)

    @staticmethod
    def backward(ctx, ans_grad: Tensor):
        x, bias, log_scale = ctx.saved_tensors
        dim = ctx.channel_dim
        with torch.autocast(device_type=x.device.type, enabled=False):
            xf, g = at_least_f32(x), at_least_f32(ans_grad)
            e = log_scale.to(xf.dtype).exp()
            d = xf - bias.to(xf.dtype).reshape([-1] + [1] * (x.ndim - dim - 1))
            s = (d * d).mean(dim=dim, keepdim=True) ** -0.5
            a = (g * xf).sum(dim=dim, keepdim=True)
            coef = a * e * s**3 / x.shape[dim]
            x_grad = (g * (s * e)).addcmul_(d, coef, value=-1.0)
            other = [i for i in range(x.ndim) if i != dim]
            b_grad = (d * coef).sum(dim=other)
            s_grad = (a * s).sum() * e
        return x_grad.to(ans_grad.dtype), b_grad.to(bias.dtype), s_grad.to(log_scale.dtype), None


def _bias_norm(x: Tensor, bias: Tensor, log_scale: Tensor, channel_dim: int) -> Tensor:
    # (x - bias)^2 squared in place: one (..., C) temporary instead of two.
    bias_b = bias.reshape([-1] + [1] * (x.ndim - channel_dim - 1))
    scales = torch.mean((x - bias_b).square_(), dim=channel_dim, keepdim=True) ** -0.5
    return x * (scales * log_scale.exp())


class BiasNorm(nn.Module):
    """BiasNorm(x) = x * exp(log_scale) / sqrt(mean_c((x - bias)^2)).

    A cheaper LayerNorm replacement: the learnable per-channel ``bias`` is used only inside
    the RMS (it is not subtracted from the output) and ``log_scale`` is a learnable scalar
    (init 1.0). There is deliberately no epsilon. In training, ``log_scale`` is kept in
    [log_scale_min, log_scale_max] by :func:`limit_param_value`.

    Shape: any, normalised over ``channel_dim`` (default last), e.g. (T, N, C).
    """

    def __init__(
        self,
        num_channels: int,
        channel_dim: int = -1,
        log_scale: float = 1.0,
        log_scale_min: float = -1.5,
        log_scale_max: float = 1.5,
    ):
        super().__init__()
        self.num_channels = num_channels
        self.channel_dim = channel_dim
        self.log_scale = nn.Parameter(torch.tensor(log_scale))
        # icefall HEAD initialises the bias with N(0, 1e-4) (the 2023 runs used zeros).
        self.bias = nn.Parameter(torch.empty(num_channels).normal_(mean=0.0, std=1e-4))
        self.log_scale_min = log_scale_min
        self.log_scale_max = log_scale_max

    def forward(self, x: Tensor) -> Tensor:
        assert x.shape[self.channel_dim] == self.num_channels
        channel_dim = self.channel_dim % x.ndim
        if not self.training or not torch.is_grad_enabled():
            return _bias_norm(x, self.bias, self.log_scale, channel_dim)
        log_scale = limit_param_value(
            self.log_scale, min=self.log_scale_min, max=self.log_scale_max
        )
        return _BiasNormFunction.apply(x, self.bias, log_scale, channel_dim)


# ---------------------------------------------------------------------------
# Gradient-only tricks: limit_param_value, penalize_abs_values_gt, ScaleGrad, softmax
# ---------------------------------------------------------------------------


class _LimitParamValue(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, min: float, max: float) -> Tensor:  # noqa: A002
        assert max >= min
        ctx.save_for_backward(x)
        ctx.min, ctx.max = min, max
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: Tensor):
        (x,) = ctx.saved_tensors
        # Flip gradient signs that would push x further outside [min, max].
        g = g * torch.where((g > 0) & (x < ctx.min), -1.0, 1.0)
        g = g * torch.where((g < 0) & (x > ctx.max), -1.0, 1.0)
        return g, None, None


def limit_param_value(
    x: Tensor, min: float, max: float, prob: float = 0.6, training: bool = True  # noqa: A002
) -> Tensor:
    """Identity forward; with probability ``prob`` the backward flips gradient elements
    that would move ``x`` further outside ``[min, max]``."""
    if training and random.random() < prob:
        return _LimitParamValue.apply(x, min, max)
    return x


class _WithLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor) -> Tensor:
        ctx.y_shape = y.shape
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: Tensor):
        return g, torch.ones(ctx.y_shape, dtype=g.dtype, device=g.device)


def with_loss(x: Tensor, y: Tensor) -> Tensor:
    """Return x, adding ``y.sum()`` to the loss implicitly (through the backward)."""
    return _WithLoss.apply(x, y)


def penalize_abs_values_gt(x: Tensor, limit: float, penalty: float) -> Tensor:
    """Identity forward; backward adds ``penalty * sign(x)`` where ``|x| > limit``."""
    over = (x.abs() - limit) > 0
    aux_loss = penalty * ((x.sign() * over).to(torch.int8) * x)
    return with_loss(x, aux_loss)


class _ScaleGradFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, alpha: float) -> Tensor:
        ctx.alpha = alpha
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: Tensor):
        return g * ctx.alpha, None


class ScaleGrad(nn.Module):
    """Identity forward, gradient times ``alpha`` (training only; fp16 safety)."""

    def __init__(self, alpha: float):
        super().__init__()
        self.alpha = alpha

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or not x.requires_grad:
            return x
        return _ScaleGradFunction.apply(x, self.alpha)


class _SoftmaxFunction(torch.autograd.Function):
    # Keeps only the output for the backward (computed in float32).
    @staticmethod
    def forward(ctx, x: Tensor, dim: int) -> Tensor:
        ans = x.softmax(dim=dim)
        ctx.save_for_backward(ans)
        ctx.x_dtype = x.dtype
        ctx.dim = dim
        return ans

    @staticmethod
    def backward(ctx, ans_grad: Tensor):
        (ans,) = ctx.saved_tensors
        with torch.autocast(device_type=ans.device.type, enabled=False):
            a, g = at_least_f32(ans), at_least_f32(ans_grad)
            # a * (g - sum(g * a)) in one fused pass (torch's own softmax backward).
            x_grad = torch._softmax_backward_data(g, a, ctx.dim, a.dtype)
        return x_grad.to(ctx.x_dtype), None


def softmax(x: Tensor, dim: int) -> Tensor:
    """Softmax whose backward stores only the output."""
    if not x.requires_grad:
        return x.softmax(dim=dim)
    return _SoftmaxFunction.apply(x, dim)


# ---------------------------------------------------------------------------
# Balancer
# ---------------------------------------------------------------------------


def _abs_to_rms(x: float) -> float:
    # For a Gaussian, E|x| = a implies rms = sqrt(pi/2) * a.
    return 1.25331413732 * x


def _proportion_positive_to_mean(p: float) -> float:
    # Crude inverse-erf: a proportion p of positive values <-> mean/stddev bound.
    x = 2.0 * p - 1.0
    eps = 1.0e-10
    atanh = (math.log(1 + x + eps) - math.log(1 - x + eps)) / 2.0
    return 0.8139535143 * atanh


def balancer_loss(
    x: Tensor, channel_dim: int, min_mean: float, max_mean: float, min_rms: float, max_rms: float
) -> Tensor:
    """Per-channel constraint violation (shape: x with non-channel dims reduced to 1)."""
    dims = [i for i in range(x.ndim) if i != channel_dim]
    uncentered_var = (x**2).mean(dim=dims, keepdim=True)
    mean = x.mean(dim=dims, keepdim=True)
    stddev = (uncentered_var - mean * mean).clamp(min=1.0e-20).sqrt()
    rms = uncentered_var.clamp(min=1.0e-20).sqrt()
    m = mean / stddev
    m_loss = (m - m.clamp(min=min_mean, max=max_mean)).abs()
    r_loss = (rms.clamp(min=min_rms, max=max_rms) / rms).log().abs()
    return m_loss + r_loss


def balancer_loss_grad(x: Tensor, channel_dim: int, min_mean: float, max_mean: float,
                       min_rms: float, max_rms: float) -> Tensor:
    """d sum(balancer_loss) / dx in closed form.

    The loss depends on x only through each channel's mean mu and uncentred variance u, so
    its gradient is affine in x per channel: dL/dx = dL/dmu / n + dL/du * 2 x / n (n =
    elements per channel). Computing the two per-channel coefficients on the reduced
    statistics replaces a nested autograd pass over the whole tensor (the same values as
    autograd of :func:`balancer_loss` up to rounding; tested in float64).
    """
    a, b, _, _ = _balancer_loss_grad_coefs(x, channel_dim, min_mean, max_mean, min_rms, max_rms)
    return torch.addcmul(a, b, x)


def _balancer_loss_grad_coefs(x: Tensor, channel_dim: int, min_mean: float, max_mean: float,
                              min_rms: float, max_rms: float
                              ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(a, b, c, centred variance) per channel (keepdim shapes): the loss gradient is
    a + b x = c + b (x - mean), see :func:`balancer_loss_grad`; c = a + b mean is computed
    from its own formula, where the d_std terms of a and b mean cancel exactly."""
    dims = [i for i in range(x.ndim) if i != channel_dim]
    n = x.numel() // x.shape[channel_dim]
    # The centred variance in two passes, not u - mean^2, which cancels when a channel's
    # mean dominates its spread. (Also faster on CPU than var_mean or vector_norm, whose
    # reductions over the leading dims are not vectorised.)
    mean = x.mean(dim=dims, keepdim=True)
    v = (x - mean).square_().mean(dim=dims, keepdim=True)
    u = v + mean * mean
    stddev = v.clamp(min=1.0e-20).sqrt()
    rms = u.clamp(min=1.0e-20).sqrt()
    m = mean / stddev
    # d|m - clamp(m)|/dm and d|log(clamp(r) / r)|/dr: zero inside the limits (as autograd).
    dm = (m - m.clamp(min=min_mean, max=max_mean)).sign()
    dr = -(rms.clamp(min=min_rms, max=max_rms) / rms).log().sign() / rms
    d_std = dm * (-mean / (stddev * stddev)) * (v >= 1.0e-20) / (2.0 * stddev)
    d_u = d_std + dr * (u >= 1.0e-20) / (2.0 * rms)
    d_mean = dm / stddev - 2.0 * mean * d_std
    return d_mean / n, d_u * (2.0 / n), (dm / stddev + mean * dr * (u >= 1.0e-20) / rms) / n, v


class _BalancerFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, config: tuple) -> Tensor:
        ctx.save_for_backward(x)
        ctx.config = config
        return x.view_as(x)

    @staticmethod
    def backward(ctx, x_grad: Tensor):
        (x,) = ctx.saved_tensors
        min_mean, max_mean, min_rms, max_rms, grad_scale, channel_dim = ctx.config
        with torch.autocast(device_type=x.device.type, enabled=False):
            xf = at_least_f32(x)
            a, b, c, v = _balancer_loss_grad_coefs(xf, channel_dim, min_mean, max_mean,
                                                   min_rms, max_rms)
            # Per-channel rms of the loss gradient a + b x from the statistics already at
            # hand: mean((a + b x)^2) = c^2 + b^2 var. No (.., C) temporary.
            rms = (c.square() + b * b * v).sqrt().clamp_(min=1e-20)
            scale = grad_scale / rms
            g = at_least_f32(x_grad).to(xf.dtype)
            # The correction on each element is proportional to that element's |gradient|.
            new_grad = _balanced_grad(a * scale, b * scale, xf, g)
        return new_grad.to(x_grad.dtype), None


def _balanced_grad(a: Tensor, b: Tensor, x: Tensor, g: Tensor) -> Tensor:
    """g + |g| (a + b x) with per-channel a, b (keepdim shapes); for large channels-last
    tensors block by block over rows, so that |g| never exists in full (bit-identical)."""
    C = x.shape[-1]
    if not (a.shape[-1] == C and a.numel() == C and _blockwise(x, g)):
        return torch.addcmul(a, b, x).mul_(g.abs()).add_(g)
    a, b = a.reshape(C), b.reshape(C)
    out = torch.empty_like(x)
    x2, g2, out2 = x.view(-1, C), g.view(-1, C), out.view(-1, C)
    rows = max(1, _BLOCK // C)
    for i in range(0, x2.shape[0], rows):
        ob, gb = out2[i : i + rows], g2[i : i + rows]
        torch.addcmul(a, b, x2[i : i + rows], out=ob).mul_(gb.abs()).add_(gb)
    return out


class Balancer(nn.Module):
    """Identity in the forward pass; in training, with probability ``prob``, modifies the
    gradient so that each channel's proportion of positive values stays in
    [min_positive, max_positive] and its mean absolute value in [min_abs, max_abs].

    Shape: any, channels on ``channel_dim``. Limits may be ScheduledFloats.
    """

    def __init__(
        self,
        num_channels: int,
        channel_dim: int,
        min_positive: FloatLike = 0.05,
        max_positive: FloatLike = 0.95,
        min_abs: FloatLike = 0.2,
        max_abs: FloatLike = 100.0,
        grad_scale: FloatLike = 0.04,
        prob: FloatLike | None = None,
    ):
        super().__init__()
        if prob is None:
            prob = ScheduledFloat((0.0, 0.5), (8000.0, 0.125), default=0.4)
        self.prob = prob
        self.num_channels = num_channels
        self.channel_dim = channel_dim
        self.min_positive = min_positive
        self.max_positive = max_positive
        self.min_abs = min_abs
        self.max_abs = max_abs
        self.grad_scale = grad_scale

    def forward(self, x: Tensor) -> Tensor:
        if not x.requires_grad or random.random() >= float(self.prob):
            return x
        assert x.shape[self.channel_dim] == self.num_channels
        config = (
            _proportion_positive_to_mean(float(self.min_positive)),
            _proportion_positive_to_mean(float(self.max_positive)),
            _abs_to_rms(float(self.min_abs)),
            _abs_to_rms(float(self.max_abs)),
            float(self.grad_scale),
            self.channel_dim % x.ndim,
        )
        return _BalancerFunction.apply(x, config)


# ---------------------------------------------------------------------------
# Whiten
# ---------------------------------------------------------------------------


def whitening_metric(x: Tensor, num_groups: int) -> Tensor:
    """Scalar >= 1 that equals 1 iff, per group, the centred covariance is a multiple of I
    with the same trace across groups. x: (..., C)."""
    return _whitening_stats(x, num_groups)[0]


def _whitening_stats(x: Tensor, num_groups: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(metric, centred x (G, F, c), second moments, mean diagonal of the covariances).

    The second moments are the covariances X_g^T X_g (G, c, c), or with fewer frames than
    channels (the low-rate stacks) the Gram matrices X_g X_g^T (G, F, F): same squared
    Frobenius norms and traces, F^2 c instead of F c^2 flops."""
    x = x.reshape(-1, x.shape[-1])
    num_frames, num_channels = x.shape
    assert num_channels % num_groups == 0
    cpg = num_channels // num_groups
    x = x.reshape(num_frames, num_groups, cpg).transpose(0, 1)
    x = x - x.mean(dim=1, keepdim=True)
    if num_frames < cpg:
        moments = x @ x.transpose(1, 2)  # (G, F, F)
        mean_diag = torch.diagonal(moments, dim1=1, dim2=2).sum() / (num_groups * cpg)
    else:
        moments = x.transpose(1, 2) @ x  # (G, c, c)
        mean_diag = torch.diagonal(moments, dim1=1, dim2=2).mean()
    covarsq_mean_diag = (moments**2).sum() / (num_groups * cpg)
    return covarsq_mean_diag / (mean_diag**2 + 1.0e-20), x, moments, mean_diag


def whitening_metric_grad(x: Tensor, num_groups: int) -> tuple[Tensor, Tensor]:
    """(metric, d metric / dx) for x (..., C), the gradient in closed form.

    With centred group data X_g (F, c), covariances S_g = X_g^T X_g, n = G c, Q = sum
    ||S_g||^2 / n and D = sum tr(S_g) / n, metric = Q / (D^2 + eps), so
    d metric / dX_g = X_g (4 S_g / (n (D^2 + eps)) - 4 Q D / (n (D^2 + eps)^2) I), or
    equally (4 K_g / (n (D^2 + eps)) - ... I) X_g with the Gram matrix K_g = X_g X_g^T; the
    centring then subtracts the gradient's mean over frames. One product instead of
    autograd's two, and no graph (tested against autograd in float64).
    """
    stats = _whitening_stats(x, num_groups)
    return stats[0], _whitening_grad(stats, x.shape)


def _whitening_grad(stats: tuple[Tensor, Tensor, Tensor, Tensor], shape: torch.Size
                    ) -> Tensor:
    metric, xc, moments, mean_diag = stats
    G, num_frames, cpg = xc.shape
    n = G * cpg
    denom = mean_diag**2 + 1.0e-20
    q = metric * denom
    m = moments * (4.0 / (n * denom))
    m.diagonal(dim1=1, dim2=2).sub_(4.0 * q * mean_diag / (n * denom * denom))
    grad = m @ xc if num_frames < cpg else xc @ m  # (G, F, c)
    grad = grad - grad.mean(dim=1, keepdim=True)
    return grad.transpose(0, 1).reshape(shape)


class _WhiteningPenaltyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, module: Whiten) -> Tensor:
        ctx.save_for_backward(x)
        ctx.module = module
        return x.view_as(x)

    @staticmethod
    def backward(ctx, x_grad: Tensor):
        (x,) = ctx.saved_tensors
        w = ctx.module
        with torch.autocast(device_type=x.device.type, enabled=False):
            xf = at_least_f32(x.detach())
            stats = _whitening_stats(xf, w.num_groups)
            if stats[0] < float(w.whitening_limit):
                # Under the limit: leave the gradient alone and check less often.
                w.prob = w.min_prob
                return x_grad, None
            w.prob = w.max_prob
            penalty_grad = _whitening_grad(stats, xf.shape)
            scale = float(w.grad_scale) * (
                at_least_f32(x_grad).norm() / (penalty_grad.norm() + 1.0e-20)
            )
        return x_grad + (penalty_grad * scale).to(x_grad.dtype), None


class Whiten(nn.Module):
    """Identity in the forward pass; in training (probability ``prob``), if the whitening
    metric of x exceeds ``whitening_limit``, adds to the gradient the gradient of the
    metric scaled to norm ``grad_scale * ||grad||``. The probability switches between
    min_prob (metric under the limit) and max_prob (over it). Shape: (..., C)."""

    def __init__(
        self,
        num_groups: int,
        whitening_limit: FloatLike,
        prob: float | Sequence[float],
        grad_scale: FloatLike,
    ):
        super().__init__()
        assert num_groups >= 1 and float(whitening_limit) >= 1
        self.num_groups = num_groups
        self.whitening_limit = whitening_limit
        self.grad_scale = grad_scale
        if isinstance(prob, float):
            prob = (prob, prob)
        self.min_prob, self.max_prob = prob
        assert 0 < self.min_prob <= self.max_prob <= 1
        self.prob = self.max_prob

    def forward(self, x: Tensor) -> Tensor:
        if not x.requires_grad or random.random() > self.prob or float(self.grad_scale) == 0:
            return x
        return _WhiteningPenaltyFunction.apply(x, self)


# ---------------------------------------------------------------------------
# Misc
# ---------------------------------------------------------------------------


def convert_num_channels(x: Tensor, num_channels: int) -> Tensor:
    """Truncate (..., C) to the first ``num_channels`` channels, or zero-pad at the end."""
    if num_channels <= x.shape[-1]:
        return x[..., :num_channels]
    pad = torch.zeros(*x.shape[:-1], num_channels - x.shape[-1], dtype=x.dtype, device=x.device)
    return torch.cat((x, pad), dim=-1)


__all__ = [
    "ActivationDropoutAndLinear",
    "Balancer",
    "BiasNorm",
    "Dropout2",
    "Dropout3",
    "FloatLike",
    "PiecewiseLinear",
    "ScaleGrad",
    "ScaledConv1d",
    "ScaledConv2d",
    "ScaledLinear",
    "ScheduledFloat",
    "SwooshL",
    "SwooshR",
    "Whiten",
    "convert_num_channels",
    "limit_param_value",
    "penalize_abs_values_gt",
    "softmax",
    "whitening_metric",
    "whitening_schedule",
]
