"""ScaledAdam: the optimizer of the Zipformer paper, as icefall's current optim.py runs it.

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

Parameters of equal (dtype, shape) form a bucket updated as one stacked batch, as in icefall; a
bucket's state lives in the optimizer state of its first parameter, with icefall's key names,
so the state_dict layout is the same as icefall's. Results are bit-identical to icefall's
stacked computation (and to this module before its speed-up, kept in the tests as an oracle),
but on CPU a bucket is walked in cache-sized chunks (:mod:`zipasr.optim.buckets`), large rows
in place without stacked copies, and float32/float64 buckets do their elementwise arithmetic
in compiled kernels (:mod:`zipasr.optim.kernels`) between torch's ``sqrt`` and reductions:
about half the previous step time, near torch's Adam (foreach) on Zipformer-M (see
benchmarks/optimizer.py). Attributes ``chunk_elements`` (None: whole buckets) and
``use_kernels`` switch these off, e.g. to compare.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.optim import Optimizer

from zipasr.optim import kernels
from zipasr.optim.buckets import Bucket, RowReducer, StackedView, Workspace

__all__ = ["ScaledAdam"]

logger = logging.getLogger(__name__)

# Steps at which an early clipping threshold is estimated (only those below the period are used).
_EARLY_ESTIMATE_STEPS = (10, 20, 40)
# Parameters without names get this placeholder (icefall uses the same one).
_NO_NAME = "foo"
# Elements per chunk on CPU (1 MB per float32 operand): the passes over one chunk (compiled or a
# dozen torch operations) then read their operands from cache, not main memory, while the Python
# cost per chunk stays small (measured best of 64 K to 1 M with benchmarks/optimizer.py).
CPU_CHUNK_ELEMENTS = 1 << 18


def _state_dtype(dtype: torch.dtype) -> torch.dtype:
    # icefall keeps optimizer state in float32; a float64 parameter keeps float64 state here.
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class _UpdateConstants:
    """Scalars of one bucket's update (``lr`` already scaled for one-element parameters)."""

    factor: float
    beta1: float
    beta2: float
    lr: float
    bias_correction2: float
    eps: float


@dataclass(frozen=True)
class _ScaleTerms:
    """A tensor bucket's RMS factor, scale step and log-scale-gradient reducer for one step."""

    rms: Tensor
    scale_step: Tensor | None
    products: RowReducer | None


def _flat_numpy(t: Tensor) -> np.ndarray:
    """A contiguous CPU tensor as a flat numpy array sharing its memory."""
    a = t.numpy()
    return a if a.ndim == 1 else a.reshape(-1)


def _numpy_scalar(dtype: torch.dtype) -> type:
    """The numpy scalar type of a float32/float64 torch dtype (kernel arguments)."""
    return np.float64 if dtype == torch.float64 else np.float32


def _as_operands(dtype: torch.dtype, device: torch.device, *values: float) -> list[Any]:
    """Python floats as 0-d tensors of a float32/float64 CPU bucket's dtype, else unchanged.

    An elementwise op on such a bucket converts a Python scalar to the bucket's dtype anyway;
    a 0-d tensor of that value gives the same result without the per-call cost of wrapping the
    scalar (a few microseconds, paid for every chunk). Other dtypes compute with float
    scalars against lower-precision tensors, and on other devices a tensor would cost a copy,
    so those keep the Python floats.
    """
    if dtype not in (torch.float32, torch.float64) or device.type != "cpu":
        return list(values)
    return [torch.tensor(x, dtype=dtype, device=device) for x in values]


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
        self._bucket_cache: dict[int, tuple[tuple[int, ...], list[Bucket]]] = {}
        # Scratch of the largest bucket's size (reductions) and of the largest chunk's size.
        self._bucket_space = Workspace()
        self._chunk_space = Workspace()
        # Elements per chunk of a bucket on CPU (None: whole buckets); other devices always
        # take whole buckets, where chunks would only add kernel launches.
        self.chunk_elements: int | None = CPU_CHUNK_ELEMENTS
        # Compiled kernels for float32/float64 buckets on CPU (see zipasr.optim.kernels);
        # False: torch operations only.
        self.use_kernels = True
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
    def _buckets(self, index: int, group: dict[str, Any]) -> list[Bucket]:
        """Buckets of group ``index`` sorted by (dtype string, *shape), cached per param list."""
        params: list[Tensor] = group["params"]
        ident = tuple(id(p) for p in params)
        cached = self._bucket_cache.get(index)
        if cached is not None and cached[0] == ident:
            return cached[1]
        names = self.parameters_names[index]
        if len(names) != len(params):
            raise RuntimeError("parameter names and parameters are out of step")
        by_key: dict[tuple[Any, ...], Bucket] = {}
        for p, n in zip(params, names, strict=True):
            key = (str(p.dtype), *p.shape)
            by_key.setdefault(key, Bucket([], [])).params.append(p)
            by_key[key].names.append(n)
        # Sorted order fixes which parameter holds a bucket's state and the order in which
        # squared norms are summed (which matters in float32).
        buckets = [by_key[k] for k in sorted(by_key)]
        self._bucket_cache[index] = (ident, buckets)
        return buckets

    def _stacked_grad(self, bucket: Bucket, out: Tensor | None = None) -> Tensor:
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
            views = [self._view(b) for b in buckets]  # for clipping and update alike
            if len(self.state[buckets[0].params[0]]) == 0:  # first step: nothing to compare to
                factor = 1.0
                self.last_clipping[index] = {"factor": 1.0}
            else:
                factor = self._clipping_factor(index, group, buckets, views)
            for bucket, view in zip(buckets, views, strict=True):
                self._update_bucket(group, bucket, view, factor)
        return loss

    def _view(self, bucket: Bucket) -> StackedView:
        """This step's chunked view of ``bucket`` (whole buckets off the CPU)."""
        on_cpu = bucket.params[0].device.type == "cpu"
        return StackedView(bucket, bucket.chunks(self.chunk_elements if on_cpu else None))

    def _chunk_buffers(self, view: StackedView, count: int) -> list[Tensor]:
        """``count`` flat scratch buffers of the bucket's dtype, as long as its longest chunk."""
        longest = max(c.stop - c.start for c in view.chunks)
        return self._chunk_space.views(view.params[0], (longest,), count)

    def _reducers(self, view: StackedView, means: tuple[bool, ...]) -> list[RowReducer]:
        """Row reducers (sums, or means where ``means``) with their own buffers.

        Their chunk buffers come after the five of :meth:`_update_bucket`.
        """
        like = view.params[0]
        count = len(means)
        stacked = (len(view.params), *view.row_shape)
        wholes = self._bucket_space.views(like, stacked, count)
        # Row buffers share the whole-bucket buffers: only one of the two is used at a time.
        rows = [w.view(-1)[: math.prod(view.row_shape)] for w in wholes]
        chunk_bufs = self._chunk_buffers(view, 5 + count)[5:]
        # Per-row sums equal torch's whole-tensor ones only for its serial CPU reduction.
        per_row = like.device.type == "cpu" and torch.get_num_threads() == 1
        return [
            RowReducer(view, mean, per_row, w, c, r)
            for mean, w, c, r in zip(means, wholes, chunk_bufs, rows, strict=True)
        ]

    def _kernel_mode(self, view: StackedView, *state: Tensor) -> bool | None:
        """``fused`` for :mod:`zipasr.optim.kernels` on this bucket, or None: torch operations.

        The kernels serve float32/float64 tensor buckets on CPU whose gradients and ``state``
        tensors share the parameters' dtype, once they matched torch bit for bit here.
        """
        if not self.use_kernels or view.row_numel == 1 or view.params[0].device.type != "cpu":
            return None
        if view.dtype not in (torch.float32, torch.float64):
            return None
        if any(t.dtype != view.dtype for t in (*view.grads, *state)):
            return None
        return kernels.torch_agreement(view.dtype)

    def _update_bucket(
        self, group: dict[str, Any], bucket: Bucket, view: StackedView, factor: float
    ) -> None:
        """Update one bucket and its stacked state, chunk by chunk.

        Every element goes through the operations icefall performs on its stacked tensors, in
        the same order and dtypes, so results are bit-identical; the reductions (log-scale
        gradient, RMS) give the same results as over the whole stacked bucket there.
        """
        state = self.state[bucket.params[0]]
        shape = bucket.stacked_shape
        device = view.params[0].device
        step = state.setdefault("step", 0)
        sdtype = _state_dtype(view.dtype)
        v = state.get("exp_avg_sq")
        if v is None:
            v = state["exp_avg_sq"] = torch.zeros(shape, dtype=sdtype, device=device)
        m = state.get("delta")
        if m is None:
            m = state["delta"] = torch.zeros(shape, dtype=sdtype, device=device)
        beta2 = group["betas"][1]
        lr = group["lr"]
        if bucket.is_scalar:
            lr = lr * group["scalar_lr_scale"]
        consts = _UpdateConstants(
            factor=factor,
            beta1=group["betas"][0],
            beta2=beta2,
            lr=lr,
            bias_correction2=1 - beta2 ** (step + 1),
            eps=group["eps"],
        )
        if bucket.is_scalar:
            self._update_chunks(view, v, m, consts, None, group["scalar_max"])
            state["step"] = step + 1
            return
        terms = _ScaleTerms(*self._scale_terms(group, view, state, step, factor))
        fused = self._kernel_mode(view, v, m, terms.rms)
        if fused is None:
            self._update_chunks(view, v, m, consts, terms)
        else:
            self._update_chunks_compiled(view, v, m, consts, terms, fused)
        if terms.products is not None:
            period = group["size_update_period"]
            state["scale_grads"][step % period] = terms.products.result()
        state["step"] = step + 1

    def _update_chunks(
        self,
        view: StackedView,
        v: Tensor,
        m: Tensor,
        c: _UpdateConstants,
        terms: _ScaleTerms | None,
        scalar_max: float | None = None,
    ) -> None:
        """The update with torch operations, chunk by chunk.

        ``terms`` is None for one-element parameters, which are clamped to ``scalar_max``.
        """
        b1, b2, inv_bc, eps, neg_lr = _as_operands(
            view.dtype,
            view.params[0].device,
            c.beta1,
            c.beta2,
            1.0 / c.bias_correction2,
            c.eps,
            -c.lr,
        )
        correct = c.bias_correction2 < 0.99
        g_buf, p_buf, d_buf, e_buf, s_buf = self._chunk_buffers(view, 5)
        gs, ps, ds, es = (view.scratches(b) for b in (g_buf, p_buf, d_buf, e_buf))
        vs, ms = view.parts(v), view.parts(m)
        if terms is not None:
            rmss = view.row_parts(terms.rms)
            if terms.scale_step is not None:
                steps, ss = view.row_parts(terms.scale_step), view.scratches(s_buf)
        for i in range(len(view.chunks)):
            grad = view.grad(i, gs[i], c.factor)
            p = view.param(i, ps[i])
            # 1. Adam-normalised gradient (beta2 only).
            vc = vs[i]
            vc.mul_(b2).addcmul_(grad, grad, value=1 - c.beta2)
            denom = ds[i]
            if correct:
                # The state keeps the raw average; only the denominator is corrected.
                torch.mul(vc, inv_bc, out=denom).sqrt_()
            else:
                torch.sqrt(vc, out=denom)
            denom.add_(eps)
            delta = torch.mul(grad, neg_lr, out=es[i]).div_(denom)

            # 2. Scale by the parameter RMS and add the scale step (tensors only).
            if terms is not None:
                if terms.products is not None:  # log-scale gradient terms, p not moved yet
                    torch.mul(p, grad, out=terms.products.targets[i])
                    terms.products.finish(i)
                delta.mul_(rmss[i])
                if terms.scale_step is not None:
                    delta.add_(torch.mul(p, steps[i], out=ss[i]))

            # 3. Momentum on the combined update.
            mc = ms[i]
            mc.mul_(b1)
            mc.add_(delta, alpha=(1 - c.beta1))
            p += mc
            if scalar_max is not None:
                p.clamp_(min=-scalar_max, max=scalar_max)
            view.write_back(i, p)

    def _update_chunks_compiled(
        self,
        view: StackedView,
        v: Tensor,
        m: Tensor,
        c: _UpdateConstants,
        terms: _ScaleTerms,
        fused: bool,
    ) -> None:
        """The same update as :meth:`_update_chunks` with the compiled kernels (tensors only).

        Per chunk: :func:`kernels.moments`, torch's ``sqrt_``, :func:`kernels.finish`.
        """
        x = _numpy_scalar(view.dtype)
        factor = x(c.factor)
        correct = c.bias_correction2 < 0.99
        b2, c2, inv_bc = x(c.beta2), x(1 - c.beta2), x(1.0 / c.bias_correction2)
        b1, a1, eps, neg_lr = x(c.beta1), x(1 - c.beta1), x(c.eps), x(-c.lr)
        g_buf, p_buf, d_buf = self._chunk_buffers(view, 3)
        gs, ps, ds = (view.scratches(b) for b in (g_buf, p_buf, d_buf))
        # numpy views of flat tensors, sliced per chunk (cheaper than torch views).
        v_np, m_np, d_np = v.view(-1).numpy(), m.view(-1).numpy(), d_buf.numpy()
        rms = terms.rms.view(-1).numpy()
        has_step = terms.scale_step is not None
        steps = terms.scale_step.view(-1).numpy() if has_step else rms
        products = terms.products
        want = products is not None
        for i, chunk in enumerate(view.chunks):
            grad, scale = view.grad_for_kernel(i, gs[i], c.factor)
            p = view.param(i, ps[i])
            g, pn = _flat_numpy(grad), _flat_numpy(p)
            lo, hi, size = chunk.start, chunk.stop, chunk.stop - chunk.start
            d = d_np[:size]
            prod = _flat_numpy(products.targets[i]) if want else d
            kernels.moments(
                g, pn, v_np[lo:hi], prod, d, factor, scale, b2, c2, inv_bc, correct, want, fused
            )
            ds[i].sqrt_()
            if want:
                products.finish(i)
            rows = chunk.rows or 1
            r0, r1 = chunk.row, chunk.row + rows
            per_row = (rms[r0:r1], steps[r0:r1], has_step, b1, a1, size // rows, fused)
            kernels.finish(g, pn, m_np[lo:hi], d, factor, scale, eps, neg_lr, *per_row)
            view.write_back(i, p)

    def _scale_terms(
        self,
        group: dict[str, Any],
        view: StackedView,
        state: dict[str, Any],
        step: int,
        factor: float,
    ) -> tuple[Tensor, Tensor | None, RowReducer | None]:
        """What a tensor bucket's update needs from its scale: ``(rms, scale_step, products)``.

        ``rms``: the RMS floored at ``param_min_rms``, shape ``(n, 1, ..., 1)``; ``scale_step``:
        the learned scale change of the same shape, or None when no scale update is due;
        ``products``: a reducer for the update to fill with ``p * grad`` (summed into this step's
        log-scale gradient afterwards), or None when that was done here. At the end of a
        size-update period the log-scale gradients and the new RMS must exist before the
        update, which costs one extra pass over the bucket.
        """
        period = group["size_update_period"]
        param_min_rms = group["param_min_rms"]
        g_buf, p_buf = self._chunk_buffers(view, 2)
        param_rms = state.get("param_rms")
        if param_rms is None:
            sdtype = _state_dtype(view.dtype)
            (squares,) = self._reducers(view, (True,))
            for i, p_scratch in enumerate(view.scratches(p_buf)):
                p = view.param(i, p_scratch)
                torch.mul(p, p, out=squares.targets[i])  # == p**2 bit for bit
                squares.finish(i)
            param_rms = squares.result().sqrt().to(sdtype)
            state["param_rms"] = param_rms
            state["scale_grads"] = torch.zeros(
                period, *param_rms.shape, dtype=sdtype, device=param_rms.device
            )
            state["scale_exp_avg_sq"] = torch.zeros_like(param_rms)
        if step % period != period - 1:
            (products,) = self._reducers(view, (False,))
            return param_rms.clamp(min=param_min_rms), None, products

        scale_grads = state["scale_grads"]
        products, squares = self._reducers(view, (False, True))
        gs, ps = view.scratches(g_buf), view.scratches(p_buf)
        compiled = self._kernel_mode(view, state["param_rms"]) is not None
        x = _numpy_scalar(view.dtype) if compiled else float
        for i in range(len(view.chunks)):
            if compiled:
                grad, scale = view.grad_for_kernel(i, gs[i], factor)
                p = view.param(i, ps[i])
                kernels.scale_terms(
                    _flat_numpy(grad),
                    _flat_numpy(p),
                    x(factor),
                    scale,
                    _flat_numpy(products.targets[i]),
                    _flat_numpy(squares.targets[i]),
                )
            else:
                grad = view.grad(i, gs[i], factor)
                p = view.param(i, ps[i])
                torch.mul(p, grad, out=products.targets[i])
                torch.mul(p, p, out=squares.targets[i])
            products.finish(i)
            squares.finish(i)
        # Gradient w.r.t. the log of the tensor's scale, gathered over `period` steps.
        scale_grads[step % period] = products.result()
        param_rms.copy_(squares.result().sqrt())
        rms = param_rms.clamp(min=param_min_rms)
        if step == 0:
            return rms, None, None

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
        # Do not shrink tensors that are already tiny; never move the scale by more than 10% at
        # once; never grow the RMS past param_max_rms.
        scale_step.masked_fill_(param_rms < param_min_rms, 0.0)
        scale_step.clamp_(min=-0.1, max=0.1)
        scale_step = torch.minimum(scale_step, (group["param_max_rms"] - param_rms) / param_rms)
        return rms, scale_step, None

    # ------------------------------------------------------------------ clipping
    def _clipping_factor(
        self, index: int, group: dict[str, Any], buckets: list[Bucket], views: list[StackedView]
    ) -> float:
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
        for b, view in zip(buckets, views, strict=True):
            (weighted,) = self._bucket_space.views(view.params[0], b.stacked_shape, 1)
            (g_buf,) = self._chunk_buffers(view, 1)
            if b.is_scalar:
                # Scalars move at lr * scalar_lr_scale, so weight their gradient alike.
                self._stacked_grad(b, out=weighted)
                tot_sumsq += (weighted**2).sum() * (scalar_lr_scale**2)
                continue
            # ((g * rms) ** 2).sum() over the stacked bucket, as icefall sums it.
            param_rms = self.state[b.params[0]]["param_rms"]
            gs = view.scratches(g_buf)
            if self._kernel_mode(view, param_rms) is not None:
                rms, w = param_rms.view(-1).numpy(), weighted.view(-1).numpy()
                for i, chunk in enumerate(view.chunks):
                    grad, _ = view.grad_for_kernel(i, gs[i], 1.0)
                    rows = chunk.rows or 1
                    kernels.clip_terms(
                        _flat_numpy(grad),
                        rms[chunk.row : chunk.row + rows],
                        (chunk.stop - chunk.start) // rows,
                        w[chunk.start : chunk.stop],
                    )
            else:
                ws = view.parts(weighted)
                for i, (w, rms_part) in enumerate(zip(ws, view.row_parts(param_rms), strict=True)):
                    torch.mul(view.grad(i, gs[i], 1.0), rms_part, out=w)
                    w.mul_(w)
            tot_sumsq += weighted.sum()
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
        self, buckets: list[Bucket], tot_sumsq: Tensor, group: dict[str, Any]
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
