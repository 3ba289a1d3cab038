"""Compiled CPU kernels for ScaledAdam's elementwise work on one chunk (numba).

ScaledAdam's update runs about a dozen elementwise torch operations per element; on a chunk
that fits in cache each one is cheap, but together they cost more than the memory traffic.
These kernels do the same arithmetic in two passes around torch's ``sqrt`` (:func:`moments`,
:func:`finish`), which is left to torch: its float32 ``sqrt`` (MKL) is not the correctly
rounded IEEE one, so nothing else reproduces it. :func:`clip_terms` and :func:`scale_terms`
produce the terms of the clipping norm and of the scale update; their sums stay with torch.

Every value goes through the same IEEE operations, in the same order and precision, as the
torch operations it replaces: Python scalars become scalars of the array's dtype, as torch
converts them, and no multiply-add is contracted (numba's default) except where torch's CPU
kernels fuse one: ``addcmul`` and ``add`` with ``alpha`` are one FMA in torch's AVX2/AVX512
kernels and two roundings in its default one. The caller passes ``fused`` to match, after
checking both against torch on the running machine (:func:`torch_agreement`).

Arrays are flat (1-d, contiguous) numpy views of torch tensors; a chunk is ``rows`` rows of
``row_len`` elements with one ``rms``/``scale_step`` value per row.
"""

from __future__ import annotations

import functools
import logging

import numpy as np
import torch
from llvmlite import ir
from numba import njit
from numba.extending import intrinsic

__all__ = ["clip_terms", "finish", "moments", "scale_terms", "torch_agreement"]

logger = logging.getLogger(__name__)


@intrinsic
def _fma(typingctx, a, b, c):  # noqa: ARG001 (numba's intrinsic signature)
    """``a * b + c`` with one rounding (LLVM's fma intrinsic)."""
    sig = a(a, b, c)

    def codegen(context, builder, signature, args):
        ty = context.get_value_type(signature.return_type)
        fn = builder.module.declare_intrinsic("llvm.fma", [ty], ir.FunctionType(ty, [ty] * 3))
        return builder.call(fn, args)

    return sig, codegen


@njit(inline="always", cache=True)
def _u(i):
    """Index as unsigned: no negative-index wrap-around, which would block SIMD."""
    return np.uint64(i)


@njit(inline="always", cache=True)
def _mul_add(a, b, c, fused):
    """``a * b + c`` as torch's CPU kernel computes it (one FMA or two roundings)."""
    if fused:
        return _fma(a, b, c)
    return c + a * b


@njit(cache=True, boundscheck=False, error_model="numpy")
def clip_terms(g, rms, row_len, out):
    """``out = (g * rms) ** 2`` per row (the clipping norm's squared terms)."""
    for r in range(rms.size):
        w = rms[r]
        base = r * row_len
        for j in range(row_len):
            i = _u(base + j)
            x = g[i] * w
            out[i] = x * x


@njit(cache=True, boundscheck=False, error_model="numpy")
def scale_terms(g, p, factor, scale, prod, sq):
    """``prod = p * G`` and ``sq = p * p`` (log-scale gradient and RMS terms)."""
    for j in range(g.size):
        i = _u(j)
        gj = g[i]
        if scale:
            gj = gj * factor
        pj = p[i]
        prod[i] = pj * gj
        sq[i] = pj * pj


@njit(cache=True, boundscheck=False, error_model="numpy")
def moments(g, p, v, prod, d, factor, scale, b2, c2, inv_bc, correct, want_prod, fused):
    """Second moment, log-scale-gradient terms and the denominator before its ``sqrt``.

    With ``G = g * factor`` if ``scale`` else ``g``: ``prod = p * G`` (if ``want_prod``),
    ``v = addcmul(v * b2, G, G, value=c2)``, ``d = v * inv_bc`` if ``correct`` else ``v``.
    """
    for j in range(g.size):
        i = _u(j)
        gj = g[i]
        if scale:
            gj = gj * factor
        if want_prod:
            prod[i] = p[i] * gj
        vj = _mul_add(c2 * gj, gj, v[i] * b2, fused)
        v[i] = vj
        d[i] = vj * inv_bc if correct else vj


@njit(cache=True, boundscheck=False, error_model="numpy")
def finish(g, p, m, d, factor, scale, eps, neg_lr, rms, steps, has_step, b1, a1, row_len, fused):
    """The update from ``d = sqrt(...)``: delta, RMS scaling, scale step, momentum, ``p += m``.

    ``delta = (G * neg_lr) / (d + eps) * rms [+ p * step]``; ``m = add(m * b1, delta,
    alpha=a1)``; ``p = p + m``.
    """
    for r in range(rms.size):
        w = rms[r]
        s = steps[r] if has_step else w
        base = r * row_len
        for j in range(row_len):
            i = _u(base + j)
            gj = g[i]
            if scale:
                gj = gj * factor
            pj = p[i]
            delta = (gj * neg_lr) / (d[i] + eps) * w
            if has_step:
                delta = delta + pj * s
            mj = _mul_add(a1, delta, m[i] * b1, fused)
            m[i] = mj
            p[i] = pj + mj


def _torch_reference(g, p, v, m, rms, steps, f, correct):
    """What the kernels replace, as ScaledAdam's torch operations on ``(rows, row_len)``.

    Returns ``p, v, m`` after the update and the products, clipping terms and squares.
    """
    p, v, m = (t.clone() for t in (p, v, m))
    squares = torch.mul(p, p)
    grad = torch.mul(g, f["factor"])
    prod = torch.mul(p, grad)
    v.mul_(f["b2"]).addcmul_(grad, grad, value=f["c2"])
    d = torch.mul(v, f["inv_bc"]).sqrt_() if correct else torch.sqrt(v)
    d.add_(f["eps"])
    delta = torch.mul(grad, f["neg_lr"]).div_(d)
    delta.mul_(rms)
    delta.add_(torch.mul(p, steps))
    m.mul_(f["b1"])
    m.add_(delta, alpha=f["a1"])
    p += m
    w = torch.mul(g, rms)
    return p, v, m, prod, w.mul_(w), squares


def _kernel_run(g, p, v, m, rms, steps, f, correct, fused):
    """The same as :func:`_torch_reference` with the kernels (``f``: numpy scalars)."""
    row_len = g.shape[1]
    p, v, m = (t.clone() for t in (p, v, m))
    prod, w, d, prod2, squares = (torch.empty_like(g) for _ in range(5))

    def a(t: torch.Tensor) -> np.ndarray:
        return t.view(-1).numpy()

    scale_terms(a(g), a(p), f["factor"], True, a(prod2), a(squares))
    args = (f["factor"], True, f["b2"], f["c2"], f["inv_bc"], correct, True, fused)
    moments(a(g), a(p), a(v), a(prod), a(d), *args)
    d.sqrt_()
    args = (f["factor"], True, f["eps"], f["neg_lr"], a(rms), a(steps), True, f["b1"], f["a1"])
    finish(a(g), a(p), a(m), a(d), *args, row_len, fused)
    clip_terms(a(g), a(rms), row_len, a(w))
    if not torch.equal(prod, prod2):  # scale_terms and moments write the same products
        return None
    return p, v, m, prod, w, squares


@functools.cache
def torch_agreement(dtype: torch.dtype) -> bool | None:
    """``fused`` with which the kernels reproduce torch's operations on this machine, or None.

    Runs both on random values of ``dtype`` (rows long enough for SIMD bodies and scalar
    tails, magnitudes over many octaves) and compares every output bit for bit. None (use
    torch operations) if neither setting agrees or the kernels cannot be compiled.
    """
    gen = torch.Generator().manual_seed(0)
    shape = (3, 131)

    def rand(lo: float, hi: float, positive: bool = False) -> torch.Tensor:
        x = torch.rand if positive else torch.randn
        octaves = torch.empty(shape, dtype=torch.float64).uniform_(lo, hi, generator=gen)
        return (x(shape, generator=gen, dtype=torch.float64) * torch.exp2(octaves)).to(dtype)

    g, p, v, m = rand(-20, 4), rand(-12, 1), rand(-40, -2, positive=True), rand(-20, -4)
    rms = torch.rand(3, 1, generator=gen, dtype=torch.float64).add(1e-3).to(dtype)
    steps = torch.randn(3, 1, generator=gen, dtype=torch.float64).mul(0.03).to(dtype)
    b1, b2, bc = 0.9, 0.98, 1 - 0.98**3
    values = dict(factor=0.37, b2=b2, c2=1 - b2, inv_bc=1 / bc, eps=1e-8, neg_lr=-0.037)
    values.update(b1=b1, a1=1 - b1)
    x = np.float64 if dtype == torch.float64 else np.float32
    f = {k: x(val) for k, val in values.items()}
    try:
        for fused in (True, False):
            agree = True
            for correct in (True, False):
                ref = _torch_reference(g, p, v, m, rms, steps, values, correct)
                out = _kernel_run(g, p, v, m, rms, steps, f, correct, fused)
                agree = agree and out is not None
                agree = agree and all(torch.equal(a, b) for a, b in zip(ref, out, strict=True))
            if agree:
                return fused
    except Exception:  # no usable compiler for this CPU/dtype: torch operations it is
        logger.debug("ScaledAdam kernels unavailable", exc_info=True)
        return None
    logger.info("ScaledAdam kernels disagree with torch's %s operations: not used", dtype)
    return None
