"""ScaledAdam: the implementation before the speed-up, kept only as the bit-exact oracle for tests.

Frozen copy of zipasr/optim/scaled_adam.py at commit e5e9437 (whole buckets stacked, one
operation over each stacked bucket at a time). tests/optim/test_scaled_adam_speedup.py and
benchmarks/optimizer.py check that ``zipasr.optim.ScaledAdam`` reproduces its parameters and
optimizer state bit for bit. Do not edit it.

The algorithm, as it was documented there:

Per parameter tensor ``p`` with gradient ``g`` (after clipping), group learning rate ``lr`` and
0-based step ``t``:

1. Adam second moment ``v <- b2 v + (1 - b2) g^2``; divided by ``1 - b2^(t+1)`` only while that
   bias correction is below 0.99; ``d = -lr' g / (sqrt(v) + eps)`` with
   ``lr' = lr * scalar_lr_scale`` for one-element parameters and ``lr`` otherwise.
2. For every other tensor (biases included): ``d`` is multiplied by the tensor's RMS (refreshed
   every ``size_update_period`` steps, floored at ``param_min_rms``), and every
   ``size_update_period`` steps the tensor's overall scale is learned from the accumulated
   log-scale gradients ``sum(p * g)`` with their own second moment: that scale step is zero
   below ``param_min_rms``, clamped to +-0.1, and never takes the RMS above ``param_max_rms``
   (the Adam part of the update itself is not limited).
3. Momentum on the combined update: ``m <- b1 m + (1 - b1) d`` (no b1 bias correction), then
   ``p <- p + m``; one-element parameters are then clamped to ``[-scalar_max, scalar_max]``.

Before the update all gradients of a group are multiplied by one clipping factor: the norm of
the RMS-weighted gradient is compared with ``clipping_scale`` times the median of the recent
norms (estimated at steps 10, 20 and 40 with a doubled threshold, then every
``clipping_update_period`` steps).

Parameters of equal (dtype, shape) are stacked and updated as one batch; a bucket's state lives
in the optimizer state of its first parameter, with icefall's key names, so the state_dict
layout is the same as icefall's.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

__all__ = ["ScaledAdam"]

logger = logging.getLogger(__name__)

# Steps at which an early clipping threshold is estimated (only those below the period are used).
_EARLY_ESTIMATE_STEPS = (10, 20, 40)
# Parameters without names get this placeholder (icefall uses the same one).
_NO_NAME = "foo"


@dataclass
class _Bucket:
    """Parameters of one group sharing (dtype, shape), in group order."""

    params: list[Tensor]
    names: list[str]

    @property
    def stacked_shape(self) -> tuple[int, ...]:
        return (len(self.params), *self.params[0].shape)

    @property
    def is_scalar(self) -> bool:
        return self.params[0].numel() == 1


def _state_dtype(dtype: torch.dtype) -> torch.dtype:
    # icefall keeps optimizer state in float32; a float64 parameter keeps float64 state here.
    return torch.float64 if dtype == torch.float64 else torch.float32


class _Workspace:
    """Flat scratch buffers reused by every bucket and step, sized to the largest bucket.

    Buckets are updated one after the other, so the stacked copies and temporaries of one bucket
    can live in a few buffers of the largest bucket's size (tens of MB for Zipformer-M) instead
    of fresh model-sized allocations every step, which on CPU cost as much as the arithmetic.
    """

    def __init__(self) -> None:
        self._bufs: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}

    def views(self, like: Tensor, shape: tuple[int, ...], count: int) -> list[Tensor]:
        numel = math.prod(shape)
        key = (like.dtype, like.device)
        bufs = self._bufs.get(key, [])
        if len(bufs) < count or bufs[0].numel() < numel:
            size = max(numel, bufs[0].numel() if bufs else 0)
            bufs = [
                torch.empty(size, dtype=like.dtype, device=like.device)
                for _ in range(max(count, len(bufs)))
            ]
            self._bufs[key] = bufs
        return [b[:numel].view(shape) for b in bufs[:count]]


class ScaledAdam(Optimizer):
    """Scaled Adam with learned parameter scales and median-relative gradient clipping.

    Args:
        params: one of (as icefall's constructor accepts them)
            - an iterable of parameters;
            - an iterable of ``(name, parameter)`` pairs (e.g. ``model.named_parameters()``);
            - a list of dicts ``{"params": [...], "lr": ..., ...}``;
            - a list of dicts ``{"named_params": [(name, p), ...], "lr": ..., ...}``
              (see :func:`zipasr.optim.get_parameter_groups_with_lrs`).
            Names are only used in clipping diagnostics.
        lr: learning rate (Eden overwrites the group lr every batch).
        clipping_scale: threshold factor over the running median of the RMS-weighted gradient
            norm; ``None`` disables clipping. (icefall's constructor defaults to None and its
            train.py passes 2.0; 2.0 is the default here.)
        betas: (momentum on the update, decay of the squared-gradient average).
        scalar_lr_scale: lr factor for one-element parameters and for learning the scales.
        eps: added to square roots in denominators.
        param_min_rms: RMS floor used to scale updates; scales are not shrunk below it.
        param_max_rms: the scale step never grows a tensor's RMS beyond this.
        scalar_max: one-element parameters are clamped to ``[-scalar_max, scalar_max]``.
        size_update_period: steps between RMS refreshes and scale updates.
        clipping_update_period: length of the norm history; the threshold is re-estimated
            every this many steps.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 3e-02,
        clipping_scale: float | None = 2.0,
        betas: tuple[float, float] = (0.9, 0.98),
        scalar_lr_scale: float = 0.1,
        eps: float = 1.0e-08,
        param_min_rms: float = 1.0e-05,
        param_max_rms: float = 3.0,
        scalar_max: float = 10.0,
        size_update_period: int = 4,
        clipping_update_period: int = 100,
    ) -> None:
        if not 0.0 < betas[0] <= betas[1] < 1.0:
            raise ValueError(f"need 0 < beta1 <= beta2 < 1, got betas={betas}")
        if size_update_period < 1 or clipping_update_period < 1:
            raise ValueError("size_update_period and clipping_update_period must be >= 1")
        defaults = dict(
            lr=lr,
            clipping_scale=clipping_scale,
            betas=betas,
            scalar_lr_scale=scalar_lr_scale,
            eps=eps,
            param_min_rms=param_min_rms,
            param_max_rms=param_max_rms,
            scalar_max=scalar_max,
            size_update_period=size_update_period,
            clipping_update_period=clipping_update_period,
        )
        groups, names = self._split_names(params)
        # Dominant-parameter diagnostics only make sense when names were given.
        self.show_dominant_parameters = any(n != _NO_NAME for ns in names for n in ns)
        super().__init__(groups, defaults)
        self.parameters_names: list[list[str]] = names
        self._bucket_cache: dict[int, tuple[tuple[int, ...], list[_Bucket]]] = {}
        self._workspace = _Workspace()
        # Per group, what the last step's clipping did (factor, norm, threshold, dominant name).
        self.last_clipping: list[dict[str, Any]] = [{} for _ in self.param_groups]

    # ------------------------------------------------------------------ construction
    @staticmethod
    def _split_names(params: Iterable[Any]) -> tuple[list[dict[str, Any]], list[list[str]]]:
        """Turn any accepted ``params`` form into torch param groups plus per-group names."""
        items = list(params)
        if not items:
            raise ValueError("optimizer got an empty parameter list")
        if not isinstance(items[0], dict):
            ps: list[Tensor] = []
            ns: list[str] = []
            for item in items:
                if isinstance(item, tuple):
                    name, p = item
                else:
                    name, p = _NO_NAME, item
                if not isinstance(p, Tensor):
                    raise TypeError(f"expected a tensor, got {type(p).__name__}")
                ps.append(p)
                ns.append(name)
            return [{"params": ps}], [ns]
        groups: list[dict[str, Any]] = []
        names: list[list[str]] = []
        for g in items:
            g = dict(g)  # do not mutate the caller's dict
            if "named_params" in g:
                pairs = list(g.pop("named_params"))
                g["params"] = [p for _, p in pairs]
                names.append([n for n, _ in pairs])
            else:
                if "params" not in g:
                    raise ValueError("a parameter group needs 'params' or 'named_params'")
                g["params"] = list(g["params"])
                names.append([_NO_NAME] * len(g["params"]))
            groups.append(g)
        return groups, names

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (``params`` or ``named_params``) after construction."""
        if "named_params" in param_group:
            (group,), (names,) = self._split_names([param_group])
        else:
            group = param_group
            names = None
        super().add_param_group(group)
        # During Optimizer.__init__ the names are set afterwards by our __init__.
        if hasattr(self, "parameters_names"):
            if names is None:
                names = [_NO_NAME] * len(self.param_groups[-1]["params"])
            self.parameters_names.append(names)
            self.last_clipping.append({})

    # ------------------------------------------------------------------ bucketing
    def _buckets(self, index: int, group: dict[str, Any]) -> list[_Bucket]:
        """Buckets of group ``index`` sorted by (dtype string, *shape), cached per param list."""
        params: list[Tensor] = group["params"]
        ident = tuple(id(p) for p in params)
        cached = self._bucket_cache.get(index)
        if cached is not None and cached[0] == ident:
            return cached[1]
        names = self.parameters_names[index]
        if len(names) != len(params):
            raise RuntimeError("parameter names and parameters are out of step")
        by_key: dict[tuple[Any, ...], _Bucket] = {}
        for p, n in zip(params, names, strict=True):
            key = (str(p.dtype), *p.shape)
            by_key.setdefault(key, _Bucket([], [])).params.append(p)
            by_key[key].names.append(n)
        # Sorted order fixes which parameter holds a bucket's state and the order in which
        # squared norms are summed (which matters in float32).
        buckets = [by_key[k] for k in sorted(by_key)]
        self._bucket_cache[index] = (ident, buckets)
        return buckets

    def _stacked_grad(self, bucket: _Bucket, out: Tensor | None = None) -> Tensor:
        grads = []
        for p in bucket.params:
            if p.grad is not None and p.grad.is_sparse:
                raise RuntimeError("ScaledAdam does not support sparse gradients")
            grads.append(torch.zeros_like(p) if p.grad is None else p.grad)
        return torch.stack(grads, out=out) if out is not None else torch.stack(grads)

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One optimization step over all groups; returns ``closure()`` if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for index, group in enumerate(self.param_groups):
            buckets = self._buckets(index, group)
            if not buckets:
                continue
            if len(self.state[buckets[0].params[0]]) == 0:  # first step: nothing to compare to
                factor = 1.0
                self.last_clipping[index] = {"factor": 1.0}
            else:
                factor = self._clipping_factor(index, group, buckets)
            for bucket in buckets:
                self._update_bucket(group, bucket, factor)
        return loss

    def _update_bucket(self, group: dict[str, Any], bucket: _Bucket, factor: float) -> None:
        """Stack one bucket, update it and its state, and copy the result back.

        Every tensor operation is the one icefall performs on its stacked tensors (so results
        are bit-identical); only the destination buffers are reused.
        """
        state = self.state[bucket.params[0]]
        shape = bucket.stacked_shape
        p, grad, tmp1, tmp2 = self._workspace.views(bucket.params[0], shape, 4)
        torch.stack([q.detach() for q in bucket.params], out=p)
        self._stacked_grad(bucket, out=grad)
        if factor == 0.0:
            grad.zero_()  # inf norm: drop this step's gradients entirely
        elif factor != 1.0:
            grad.mul_(factor)
        step = state.setdefault("step", 0)
        beta1, beta2 = group["betas"]
        sdtype = _state_dtype(p.dtype)

        # 1. Adam-normalised gradient (beta2 only).
        lr = group["lr"]
        if bucket.is_scalar:
            lr = lr * group["scalar_lr_scale"]
        v = state.get("exp_avg_sq")
        if v is None:
            v = state["exp_avg_sq"] = torch.zeros(shape, dtype=sdtype, device=p.device)
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias_correction2 = 1 - beta2 ** (step + 1)
        if bias_correction2 < 0.99:
            # The state keeps the raw average; only the denominator is corrected.
            denom = torch.mul(v, 1.0 / bias_correction2, out=tmp1).sqrt_()
        else:
            denom = torch.sqrt(v, out=tmp1)
        denom.add_(group["eps"])
        delta = torch.mul(grad, -lr, out=tmp2).div_(denom)

        # 2. Scale by the parameter RMS and learn the overall scale (tensors only).
        if not bucket.is_scalar:
            self._scale_delta(group, p, grad, state, delta, step, scratch=tmp1)

        # 3. Momentum on the combined update.
        m = state.get("delta")
        if m is None:
            m = state["delta"] = torch.zeros(shape, dtype=sdtype, device=p.device)
        m.mul_(beta1)
        m.add_(delta, alpha=(1 - beta1))
        p += m
        if bucket.is_scalar:
            p.clamp_(min=-group["scalar_max"], max=group["scalar_max"])
        state["step"] = step + 1
        for i, q in enumerate(bucket.params):
            q.copy_(p[i])

    @staticmethod
    def _scale_delta(
        group: dict[str, Any],
        p: Tensor,
        grad: Tensor,
        state: dict[str, Any],
        delta: Tensor,
        step: int,
        scratch: Tensor,
    ) -> None:
        """Multiply ``delta`` by the RMS and add the scale step, in place."""
        period = group["size_update_period"]
        dims = list(range(1, p.ndim))
        param_rms = state.get("param_rms")
        if param_rms is None:
            sdtype = _state_dtype(p.dtype)
            sq = torch.mul(p, p, out=scratch)  # == p**2 bit for bit
            param_rms = sq.mean(dim=dims, keepdim=True).sqrt().to(sdtype)
            state["param_rms"] = param_rms
            state["scale_grads"] = torch.zeros(
                period, *param_rms.shape, dtype=sdtype, device=p.device
            )
            state["scale_exp_avg_sq"] = torch.zeros_like(param_rms)
        scale_grads = state["scale_grads"]
        # Gradient w.r.t. the log of the tensor's scale, gathered over `period` steps.
        scale_grads[step % period] = torch.mul(p, grad, out=scratch).sum(dim=dims, keepdim=True)
        last_of_period = step % period == period - 1
        if last_of_period:
            sq = torch.mul(p, p, out=scratch)
            param_rms.copy_(sq.mean(dim=dims, keepdim=True).sqrt())

        param_min_rms = group["param_min_rms"]
        delta.mul_(param_rms.clamp(min=param_min_rms))

        if last_of_period and step > 0:
            beta2 = group["betas"][1]
            size_lr = group["lr"] * group["scalar_lr_scale"]
            # One scale update per period, so its moving average decays per period.
            beta2_corr = beta2**period
            sq_avg = state["scale_exp_avg_sq"]
            sq_avg.mul_(beta2_corr).add_((scale_grads**2).mean(dim=0), alpha=1 - beta2_corr)
            size_step = (step + 1) // period
            bias_correction2 = 1 - beta2_corr**size_step
            denom = sq_avg.sqrt() + group["eps"]
            scale_step = -size_lr * (bias_correction2**0.5) * scale_grads.sum(dim=0) / denom
            # Do not shrink tensors that are already tiny; never move the scale by more
            # than 10% at once; never grow the RMS past param_max_rms.
            scale_step.masked_fill_(param_rms < param_min_rms, 0.0)
            scale_step.clamp_(min=-0.1, max=0.1)
            scale_step = torch.minimum(scale_step, (group["param_max_rms"] - param_rms) / param_rms)
            delta.add_(torch.mul(p, scale_step, out=scratch))

    # ------------------------------------------------------------------ clipping
    def _clipping_factor(self, index: int, group: dict[str, Any], buckets: list[_Bucket]) -> float:
        """Factor (<= 1) all gradients of the group are multiplied by before the update."""
        clipping_scale = group["clipping_scale"]
        first = self.state[buckets[0].params[0]]
        step = first["step"]
        info: dict[str, Any] = {"factor": 1.0}
        self.last_clipping[index] = info
        if clipping_scale is None or step == 0:
            return 1.0
        period = group["clipping_update_period"]
        scalar_lr_scale = group["scalar_lr_scale"]

        f64 = any(b.params[0].dtype == torch.float64 for b in buckets)
        acc_dtype = torch.float64 if f64 else torch.float32
        device = buckets[0].params[0].device
        tot_sumsq = torch.tensor(0.0, dtype=acc_dtype, device=device)
        for b in buckets:
            grad, tmp = self._workspace.views(b.params[0], b.stacked_shape, 2)
            self._stacked_grad(b, out=grad)
            if b.is_scalar:
                # Scalars move at lr * scalar_lr_scale, so weight their gradient alike.
                tot_sumsq += (grad**2).sum() * (scalar_lr_scale**2)
            else:
                # ((g * rms) ** 2).sum() over the stacked bucket, as icefall sums it.
                weighted = torch.mul(grad, self.state[b.params[0]]["param_rms"], out=tmp)
                tot_sumsq += weighted.mul_(weighted).sum()
        tot_norm = tot_sumsq.sqrt()
        norms = first.get("model_norms")
        if norms is None:
            norms = first["model_norms"] = torch.zeros(period, dtype=acc_dtype, device=device)
        norms[step % period] = tot_norm

        early = [s for s in _EARLY_ESTIMATE_STEPS if s < period]
        if step % period == 0 or step in early:
            self._estimate_threshold(first, norms, step, early, clipping_scale)

        threshold = first.get("model_norm_threshold")
        info["tot_norm"] = tot_norm.item()
        if threshold is None:
            return 1.0
        info["threshold"] = threshold
        # As in icefall: an inf norm gives factor 0 (gradients zeroed below), but a NaN norm
        # gives min(1.0, nan) == 1.0, i.e. no clipping, so the NaN reaches the update (under
        # AMP the grad scaler skips such steps first). icefall's NaN check below cannot fire.
        factor = min(1.0, (threshold / (tot_norm + 1.0e-20)).item())
        if factor != factor:
            factor = 0.0
        info["factor"] = factor
        if factor < 1.0:
            first["num_clipped"] += 1
        if factor < 0.5:
            logger.warning("Scaling gradients by %s, model_norm_threshold=%s", factor, threshold)
            if self.show_dominant_parameters:
                info["dominant"] = self._log_dominant_parameter(buckets, tot_sumsq, group)
        return factor

    @staticmethod
    def _estimate_threshold(
        first: dict[str, Any], norms: Tensor, step: int, early: list[int], clipping_scale: float
    ) -> None:
        sorted_norms = norms.sort()[0].to("cpu")
        if step in early:
            # Only `step` norms exist yet (slots 1..step); unused slots are zeros at the front.
            sorted_norms = sorted_norms[-step:]
        n = sorted_norms.numel()
        quartiles = [sorted_norms[min(n - 1, (n // 4) * k)].item() for k in range(5)]
        median = quartiles[2]
        if median - median != 0:
            raise RuntimeError("Too many grads were not finite")
        threshold = clipping_scale * median
        if step in early:
            threshold = threshold * 2.0  # norms change fast early on: be lenient
        first["model_norm_threshold"] = threshold
        percent = first["num_clipped"] * 100.0 / n if "num_clipped" in first else 0.0
        first["num_clipped"] = 0
        logger.warning(
            "Clipping_scale=%s, grad-norm quartiles %s, threshold=%.3e, percent-clipped=%.1f",
            clipping_scale,
            " ".join(f"{q:.3e}" for q in quartiles),
            threshold,
            percent,
        )

    def _log_dominant_parameter(
        self, buckets: list[_Bucket], tot_sumsq: Tensor, group: dict[str, Any]
    ) -> str:
        """Log (and return) the parameter holding the largest share of the clipped norm."""
        scalar_lr_scale = group["scalar_lr_scale"]
        best: tuple[float, str, float, float, float] | None = None
        unusual: list[tuple[float, str]] = []
        total = tot_sumsq.item()
        for b in buckets:
            grad = self._stacked_grad(b)
            state = self.state[b.params[0]]
            dims = list(range(1, grad.ndim))
            if b.is_scalar:
                weight = torch.full(
                    grad.shape, scalar_lr_scale, dtype=grad.dtype, device=grad.device
                )
            else:
                weight = state["param_rms"]
            sumsq = (grad * weight) ** 2
            grad_sumsq = grad**2
            if dims:
                sumsq = sumsq.sum(dim=dims)
                grad_sumsq = grad_sumsq.sum(dim=dims)
                mean_g2 = grad.pow(2).mean(dim=dims)
                mean_v = state["exp_avg_sq"].mean(dim=dims)
            else:
                mean_g2 = grad**2
                mean_v = state["exp_avg_sq"]
            ratios = (mean_g2 / mean_v).sqrt()
            w = weight.reshape(weight.shape[0], -1)[:, 0]
            for i, name in enumerate(b.names):
                s = sumsq[i].item()
                share = s / total if total else float("nan")
                if best is None or share > best[0]:
                    best = (share, name, s, grad_sumsq[i].item(), w[i].item() ** 2)
                unusual.append((ratios[i].item(), name))
        assert best is not None
        share, name, s, g2, rms2 = best
        logger.warning(
            "Parameter dominating tot_sumsq %s with proportion %.2f, where "
            "dominant_sumsq=(grad_sumsq*orig_rms_sq)=%.3e, grad_sumsq=%.3e, orig_rms_sq=%.3e",
            name,
            share,
            s,
            g2,
            rms2,
        )
        unusual.sort(reverse=True)
        logger.debug("Parameters with most larger-than-usual grads, with ratios: %s", unusual[:10])
        return name
