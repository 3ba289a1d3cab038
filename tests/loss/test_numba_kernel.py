"""The numba kernel is bit-identical to the plain per-cell recursion it implements.

The reference below walks each box row by row with scalar arithmetic in the input dtype (numpy
float32/float64 scalars round like the hardware) and calls libm's ``exp``/``log1p`` (``expf``/
``log1pf`` for float32) through ctypes, i.e. the functions numba's ``math.exp``/``math.log1p``
compile to.  Its per-cell formulas are those of the row-by-row kernel the wavefront kernel
replaced, so equality here is the "same bits as before" claim (NaN payloads aside: IEEE leaves
which NaN propagates open, so NaNs are compared by position only).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import random

import numpy as np
import pytest
import torch
from loss_testutil import random_boundary

pytest.importorskip("numba")
from zipasr.loss.backends import numba_mi  # noqa: E402

_LIBM = ctypes.CDLL(ctypes.util.find_library("m"))
for _name, _c in (("expf", ctypes.c_float), ("log1pf", ctypes.c_float),
                  ("exp", ctypes.c_double), ("log1p", ctypes.c_double)):
    getattr(_LIBM, _name).argtypes = [_c]
    getattr(_LIBM, _name).restype = _c
NEG_INF = float("-inf")


def _libm(dtype):
    """exp, log1p in the dtype's precision, as numba calls them."""
    t = np.dtype(dtype).type
    exp, log1p = (_LIBM.expf, _LIBM.log1pf) if t == np.float32 else (_LIBM.exp, _LIBM.log1p)
    return (lambda v: t(exp(v))), (lambda v: t(log1p(v)))


def scalar_reference(px: np.ndarray, py: np.ndarray, bounds, modified: bool):
    """score (B,), px_grad, py_grad of the recursion, one scalar operation at a time."""
    exp, log1p = _libm(px.dtype)
    thr = math.log(np.finfo(px.dtype).eps)
    dx = 1 if modified else 0
    score = np.zeros(px.shape[0], px.dtype)
    gx = np.zeros_like(px)
    gy = np.zeros_like(py)

    def lae(x, y):
        if x < y:
            x, y = y, x
        diff = y - x
        return x + log1p(exp(diff)) if diff >= thr else x

    for b, (s0, t0, s1, t1) in enumerate(bounds):
        ns, nt = s1 - s0 + 1, t1 - t0 + 1
        a = np.empty((ns, nt), px.dtype)
        a[0, 0] = 0
        for t in range(1, nt):
            a[0, t] = a[0, t - 1] + py[b, s0, t0 + t - 1]
        for r in range(1, ns):
            a[r, 0] = a[r - 1, 0] + px[b, s0 + r - 1, t0] if dx == 0 else NEG_INF
            for t in range(1, nt):
                a[r, t] = lae(a[r - 1, t - dx] + px[b, s0 + r - 1, t0 + t - dx],
                              a[r, t - 1] + py[b, s0 + r, t0 + t - 1])
        total = a[ns - 1, nt - 1]
        score[b] = total
        if not math.isfinite(total):
            continue
        be = np.empty((ns, nt), px.dtype)
        be[ns - 1, nt - 1] = 0
        for t in range(nt - 2, -1, -1):
            be[ns - 1, t] = w = py[b, s1, t0 + t] + be[ns - 1, t + 1]
            gy[b, s1, t0 + t] = exp(a[ns - 1, t] + w - total)
        for r in range(ns - 2, -1, -1):
            if dx == 0:
                be[r, nt - 1] = w = px[b, s0 + r, t1] + be[r + 1, nt - 1]
                gx[b, s0 + r, t1] = exp(a[r, nt - 1] + w - total)
            else:
                be[r, nt - 1] = NEG_INF
            for t in range(nt - 2, -1, -1):
                wx = px[b, s0 + r, t0 + t] + be[r + 1, t + dx]
                wy = py[b, s0 + r, t0 + t] + be[r, t + 1]
                hi, lo = (wx, wy) if wx >= wy else (wy, wx)
                if hi == NEG_INF:
                    be[r, t] = hi
                    continue
                e = exp(lo - hi)
                big = exp(a[r, t] + hi - total)
                gx[b, s0 + r, t0 + t], gy[b, s0 + r, t0 + t] = \
                    (big, big * e) if wx >= wy else (big * e, big)
                be[r, t] = hi + log1p(e) if lo - hi >= thr else hi
    return score, gx, gy


def _same_bits(u: np.ndarray, v: np.ndarray) -> bool:
    nan = np.isnan(u)
    return bool(np.array_equal(nan, np.isnan(v))
                and np.array_equal(np.where(nan, 0, u).view(np.uint8),
                                   np.where(nan, 0, v).view(np.uint8)))


def _case(rng: random.Random, S: int, T: int, B: int, modified: bool, dtype, scale: float,
          holes: bool, nans: bool):
    g = np.random.default_rng(rng.randrange(10**6))
    px = (g.standard_normal((B, S, T if modified else T + 1)) * scale).astype(dtype)
    py = (g.standard_normal((B, S + 1, T)) * scale).astype(dtype)
    if holes:  # -inf arcs, as in the pruned loss
        px[g.random(px.shape) < 0.3] = -np.inf
        py[g.random(py.shape) < 0.3] = -np.inf
    if nans:
        px[g.random(px.shape) < 0.05] = np.nan
        py[g.random(py.shape) < 0.05] = np.inf
    bnd = random_boundary(B, S, T, rng, offsets=rng.random() < 0.5).tolist()
    if rng.random() < 0.5:  # degenerate box: one row and/or one column
        s0, t0 = rng.randint(0, S), rng.randint(0, T)
        bnd[-1] = [s0, t0, rng.choice([s0, rng.randint(s0, S)]), rng.choice([t0, T])]
    return px, py, bnd


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("modified", [False, True])
def test_kernel_bit_identical_to_scalar_recursion(dtype, modified):
    rng = random.Random(10 * (dtype == np.float32) + modified)
    # (S, T): below one 16-lane chunk, and S > 16 so diagonals span several chunks
    for (S, T), scale, holes, nans in [((3, 5), 2.0, False, False), ((7, 9), 30.0, True, False),
                                       ((20, 23), 2.0, False, False), ((18, 26), 30.0, True, False),
                                       ((5, 6), 2.0, True, True), ((0, 4), 1.0, False, False)]:
        px, py, bnd = _case(rng, S, T, 3, modified, dtype, scale, holes, nans)
        with np.errstate(all="ignore"):
            ref = scalar_reference(px, py, bnd, modified)
        for need_grad in (True, False):
            out = numba_mi.mi_forward(torch.from_numpy(px), torch.from_numpy(py),
                                      torch.tensor(bnd), bnd, need_grad)
            assert _same_bits(out[0].numpy(), ref[0]), (S, T, scale, out[0], ref[0])
            if need_grad:
                assert _same_bits(out[1].numpy(), ref[1]), (S, T, scale, "px_grad")
                assert _same_bits(out[2].numpy(), ref[2]), (S, T, scale, "py_grad")


def test_scalar_reference_matches_float64_loop_reference():
    """The bit-level reference is itself the recursion (against the float64 loop reference)."""
    from rnnt_reference import ref_mi

    rng = random.Random(5)
    for modified in (False, True):
        px, py, bnd = _case(rng, 4, 6, 3, modified, np.float64, 2.0, False, False)
        with np.errstate(all="ignore"):
            s, gx, gy = scalar_reference(px, py, bnd, modified)
        rs, rgx, rgy = ref_mi(px, py, bnd)
        np.testing.assert_allclose(s, rs, atol=1e-12)
        np.testing.assert_allclose(gx, rgx, atol=1e-12)
        np.testing.assert_allclose(gy, rgy, atol=1e-12)
