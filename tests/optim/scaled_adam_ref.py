"""Independent float64 re-derivation of ScaledAdam for the tests.

Written from the algorithm description (the ScaledAdam step: the parameter-scale update, then
an Adam-like update scaled by the parameter's rms), one parameter at a time with plain loops
and float64 tensors: no stacking, no shared code with ``zipasr.optim``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


class RefParamState:
    """Optimizer state of one real parameter."""

    def __init__(self, p: Tensor) -> None:
        self.step = 0
        self.v = torch.zeros_like(p)  # second moment of the gradient
        self.m = torch.zeros_like(p)  # momentum of the combined update
        self.rms = math.sqrt(float((p * p).mean())) if p.numel() > 1 else None
        self.h: list[float] = []  # log-scale gradients of the current period
        self.n = 0.0  # second moment of the log-scale gradient


class RefScaledAdam:
    """Reference ScaledAdam over groups of named float64 tensors.

    Args:
        groups: list of lists of parameter names.
        params: name -> float64 tensor (updated in place).
    """

    def __init__(
        self,
        groups: list[list[str]],
        params: dict[str, Tensor],
        clipping_scale: float | None = 2.0,
        betas: tuple[float, float] = (0.9, 0.98),
        scalar_lr_scale: float = 0.1,
        eps: float = 1e-8,
        param_min_rms: float = 1e-5,
        param_max_rms: float = 3.0,
        scalar_max: float = 10.0,
        size_update_period: int = 4,
        clipping_update_period: int = 100,
    ) -> None:
        self.groups = groups
        self.params = params
        self.clipping_scale = clipping_scale
        self.b1, self.b2 = betas
        self.sls = scalar_lr_scale
        self.eps = eps
        self.min_rms = param_min_rms
        self.max_rms = param_max_rms
        self.scalar_max = scalar_max
        self.period = size_update_period
        self.clip_period = clipping_update_period
        self.state: dict[str, RefParamState] = {}
        self.norm_history: list[list[float]] = [[] for _ in groups]
        self.threshold: list[float | None] = [None for _ in groups]
        self.group_step = [0 for _ in groups]
        self.factors: list[list[float]] = [[] for _ in groups]  # clipping factor per step
        # How often each guard of the scale update decided the result (per parameter name).
        self.hits: dict[str, dict[str, int]] = {}

    def _factor(self, gi: int, grads: dict[str, Tensor]) -> float:
        t = self.group_step[gi]
        if self.clipping_scale is None or t == 0:
            return 1.0
        sumsq = 0.0
        for name in self.groups[gi]:
            g = grads[name]
            st = self.state[name]
            if g.numel() == 1:
                sumsq += float((g * self.sls).pow(2).sum())
            else:
                sumsq += float((g * st.rms).pow(2).sum())
        norm = math.sqrt(sumsq)
        hist = self.norm_history[gi]
        hist.append(norm)
        early = [s for s in (10, 20, 40) if s < self.clip_period]
        if t % self.clip_period == 0 or t in early:
            # The norms of the last min(t, period) steps (there is no norm for step 0).
            recent = sorted(hist[-min(t, self.clip_period) :])
            median = recent[min(len(recent) - 1, (len(recent) // 4) * 2)]
            thr = self.clipping_scale * median
            self.threshold[gi] = thr * 2.0 if t in early else thr
        thr = self.threshold[gi]
        if thr is None:
            return 1.0
        return min(1.0, thr / norm) if norm == norm else 1.0

    def step(self, grads: dict[str, Tensor], lrs: list[float]) -> None:
        """One step; ``grads`` are float64 gradients by name, ``lrs`` one lr per group."""
        for gi, names in enumerate(self.groups):
            for name in names:
                if name not in self.state:
                    self.state[name] = RefParamState(self.params[name])
            factor = self._factor(gi, grads)
            self.factors[gi].append(factor)
            for name in names:
                g = grads[name].clone()
                if factor == 0.0:
                    g = torch.zeros_like(g)
                else:
                    g = g * factor
                self._update_one(name, self.params[name], g, self.state[name], lrs[gi])
            self.group_step[gi] += 1

    def _update_one(self, name: str, p: Tensor, g: Tensor, st: RefParamState, lr: float) -> None:
        t = st.step
        scalar = p.numel() == 1
        lr_p = lr * self.sls if scalar else lr
        st.v = self.b2 * st.v + (1.0 - self.b2) * g * g
        bc = 1.0 - self.b2 ** (t + 1)
        v_hat = st.v / bc if bc < 0.99 else st.v
        d = -lr_p * g / (torch.sqrt(v_hat) + self.eps)
        if not scalar:
            if t % self.period == 0:
                st.h = []
            st.h.append(float((p * g).sum()))
            end_of_period = t % self.period == self.period - 1
            if end_of_period:
                st.rms = math.sqrt(float((p * p).mean()))
            d = d * max(st.rms, self.min_rms)
            if end_of_period and t > 0:
                beta = self.b2**self.period
                st.n = beta * st.n + (1.0 - beta) * sum(x * x for x in st.h) / len(st.h)
                bcs = 1.0 - beta ** ((t + 1) // self.period)
                s = -lr * self.sls * math.sqrt(bcs) * sum(st.h) / (math.sqrt(st.n) + self.eps)
                hits = self.hits.setdefault(name, {"min_rms": 0, "clamp": 0, "max_rms": 0})
                if st.rms < self.min_rms:
                    s = 0.0
                    hits["min_rms"] += 1
                if abs(s) > 0.1:
                    s = max(-0.1, min(0.1, s))
                    hits["clamp"] += 1
                limit = (self.max_rms - st.rms) / st.rms
                if s > limit:
                    s = limit
                    hits["max_rms"] += 1
                d = d + p * s
        st.m = self.b1 * st.m + (1.0 - self.b1) * d
        p += st.m
        if scalar:
            p.clamp_(-self.scalar_max, self.scalar_max)
        st.step = t + 1


def eden_lr(
    base_lr: float,
    batch: float,
    epoch: float,
    lr_batches: float,
    lr_epochs: float,
    warmup_batches: float = 500.0,
    warmup_start: float = 0.1,
) -> float:
    """Eden's formula written out directly."""
    fb = ((batch * batch + lr_batches * lr_batches) / (lr_batches * lr_batches)) ** -0.25
    fe = ((epoch * epoch + lr_epochs * lr_epochs) / (lr_epochs * lr_epochs)) ** -0.25
    if batch < warmup_batches:
        w = warmup_start + (1.0 - warmup_start) * batch / warmup_batches
    else:
        w = 1.0
    return base_lr * fb * fe * w
