"""Compiled CPU mutual-information recursion (numba); optionally parallel over the batch.

Per sequence: one α sweep over its box, then one β sweep that writes the arc occupations
``exp(α + w + β_next - score)`` as it goes.  Both sweeps walk the anti-diagonals ``d = s + t``
of the box: the cells of one diagonal are independent, so each diagonal is done in passes

1. gather each cell's two arc scores and the LogAdd's ``max`` and ``min - max`` (plain
   arithmetic on contiguous memory, which LLVM vectorises);
2. one tight loop per libm function (``exp``, ``log1p``) over the diagonal, skipping cells
   whose result is not used: the calls of a diagonal overlap in the CPU instead of forming
   one serial chain per row as in a row-by-row sweep;
3. combine (vectorised again).

α, β and skewed copies of px/py live in ``(diagonal, s)`` buffers, so passes 1 and 3 read
contiguous memory; the occupations are written into the skewed px/py copies (dead by then)
and unskewed at the end.  Indices are cast to unsigned (``_u``) because numba's negative-index
wrap-around on signed ones costs two instructions per access and blocks vectorisation.

Every value is computed by the same float operations, in the same order and with the same libm
``exp``/``log1p`` as the row-by-row kernel this replaced, so results are bit-identical to it
(only the sign/payload of a NaN, which IEEE leaves open, may differ); tests/loss checks this
against a scalar reference.  Works in the input dtype with k2's LogAdd (the smaller term is
skipped once it is below ``log(eps)`` of the larger).  Contract: see ``torch_mi.py``.
"""

from __future__ import annotations

import math
import os

import numba
import numpy as np
import torch
from numba import njit, prange
from torch import Tensor

NEG_INF = -np.inf
# log(machine epsilon), k2's cut-off below which LogAdd returns the larger operand unchanged
_MIN_LOG_DIFF = {torch.float32: math.log(np.finfo(np.float32).eps),
                 torch.float64: math.log(np.finfo(np.float64).eps)}
# exp(x) rounds to +0 below these (ln of half the smallest subnormal is -103.97 / -745.13), so
# the call is skipped there (underflowing arcs are the common case on trained models)
_EXP_ZERO_BELOW = {torch.float32: -104.0, torch.float64: -746.0}


@njit(inline="always", cache=True)
def _u(i):
    """Index as unsigned: numba then emits no negative-index wrap-around (which blocks SIMD)."""
    return np.uint64(i)


@njit(inline="always", cache=True)
def _skew(px, py, b, s0, t0, ns, nt, dx, X, Y):
    """``X[d, s] = px[b, s0 + s, t0 + d - s]`` and ``Y[d, s] = py[b, s0 + s, t0 + d - s]``."""
    pxb = px[b]
    pyb = py[b]
    ntx = nt - dx  # px columns in the box: t0..t1 (regular) or t0..t1-1 (modified)
    for s in range(ns - 1):
        for t in range(ntx):
            X[_u(s + t), _u(s)] = pxb[_u(s0 + s), _u(t0 + t)]
    for s in range(ns):
        for t in range(nt - 1):
            Y[_u(s + t), _u(s)] = pyb[_u(s0 + s), _u(t0 + t)]


@njit(cache=True)
def _alpha(X, Y, A, ns, nt, dx, thr, W1, W2, W3):
    """α of the box into ``A[d, s]``; returns the score ``α[ns - 1, nt - 1]``.

    dx = 0: x-move from (s-1, t) (regular); dx = 1: from (s-1, t-1) (modified).
    """
    A[0, 0] = 0.0
    for t in range(1, nt):  # first row: y-moves only
        A[_u(t), 0] = A[_u(t - 1), 0] + Y[_u(t - 1), 0]
    if ns > 1:
        A[1, 1] = A[0, 0] + X[0, 0] if dx == 0 else NEG_INF
    for d in range(2, ns + nt - 1):
        lo = max(1, d - nt + 1)
        hi = min(ns - 1, d - 1)
        if hi >= lo:
            dp = d - 1 - dx  # diagonal of the x-move's source
            for s in range(lo, hi + 1):
                x = A[_u(dp), _u(s - 1)] + X[_u(dp), _u(s - 1)]
                y = A[_u(d - 1), _u(s)] + Y[_u(d - 1), _u(s)]
                swap = x < y
                top = y if swap else x
                W1[_u(s)] = top
                W2[_u(s)] = (x if swap else y) - top
            for s in range(lo, hi + 1):
                if W2[_u(s)] >= thr:  # False for -inf - -inf = NaN: no call on dead cells
                    W3[_u(s)] = math.exp(W2[_u(s)])
            for s in range(lo, hi + 1):
                if W2[_u(s)] >= thr:
                    W3[_u(s)] = math.log1p(W3[_u(s)])
            for s in range(lo, hi + 1):
                top = W1[_u(s)]
                A[_u(d), _u(s)] = top + W3[_u(s)] if W2[_u(s)] >= thr else top
        if d < ns:  # first column (t = 0): x-moves only (regular), unreachable (modified)
            A[_u(d), _u(d)] = A[_u(d - 1), _u(d - 1)] + X[_u(d - 1), _u(d - 1)] if dx == 0 \
                else NEG_INF
    return A[_u(ns + nt - 2), _u(ns - 1)]


@njit(cache=True)
def _beta(X, Y, A, Bt, ns, nt, dx, total, thr, exp_min, gxb, gyb, s0, t0, s1, t1,
          W1, W2, W3, W4, W5):
    """β into ``Bt[d, s]`` and the occupations: interior cells into ``X`` / ``Y`` (skewed, in
    place of the arc scores, which are dead once their diagonal is done); the last row and
    column straight into ``gyb`` / ``gxb`` ((S+1, T) / (S, T1) views of sequence b)."""
    r1 = ns - 1
    Bt[_u(ns + nt - 2), _u(r1)] = 0.0
    for r in range(ns - 2, -1, -1):  # last column: x-moves only (regular), none (modified)
        if dx == 0:
            wx = X[_u(r + nt - 1), _u(r)] + Bt[_u(r + nt), _u(r + 1)]
            Bt[_u(r + nt - 1), _u(r)] = wx
            gxb[_u(s0 + r), _u(t1)] = math.exp(A[_u(r + nt - 1), _u(r)] + wx - total)
        else:
            Bt[_u(r + nt - 1), _u(r)] = NEG_INF
    for d in range(ns + nt - 3, -1, -1):
        t = d - r1
        if t >= 0:  # last row: y-moves only
            w_last = Y[_u(d), _u(r1)] + Bt[_u(d + 1), _u(r1)]
            Bt[_u(d), _u(r1)] = w_last
            gyb[_u(s1), _u(t0 + t)] = math.exp(A[_u(d), _u(r1)] + w_last - total)
        lo = max(0, d - (nt - 2))
        hi = min(ns - 2, d)
        if hi < lo:
            continue
        for s in range(lo, hi + 1):
            wx = X[_u(d), _u(s)] + Bt[_u(d + 1 + dx), _u(s + 1)]
            wy = Y[_u(d), _u(s)] + Bt[_u(d + 1), _u(s)]
            take_x = wx >= wy
            top = wx if take_x else wy
            W1[_u(s)] = wx
            W2[_u(s)] = wy
            W3[_u(s)] = (wy if take_x else wx) - top
            W4[_u(s)] = A[_u(d), _u(s)] + top - total
        for s in range(lo, hi + 1):
            # the larger arc's occupation big = exp(α + top - total), and e = exp(min - max),
            # shared by the smaller arc's occupation (big * e) and the LogAdd
            v = W4[_u(s)]
            big = 0.0 if v < exp_min else math.exp(v)
            W4[_u(s)] = big
            v = W3[_u(s)]
            W5[_u(s)] = 0.0 if (big == 0.0 and v < thr) else math.exp(v)
        for s in range(lo, hi + 1):
            if W3[_u(s)] >= thr:
                W3[_u(s)] = math.log1p(W5[_u(s)])
        for s in range(lo, hi + 1):
            wx = W1[_u(s)]
            wy = W2[_u(s)]
            take_x = wx >= wy
            top = wx if take_x else wy
            big = W4[_u(s)]
            small = big * W5[_u(s)]
            dead = top == NEG_INF
            X[_u(d), _u(s)] = 0.0 if dead else (big if take_x else small)
            Y[_u(d), _u(s)] = 0.0 if dead else (small if take_x else big)
            Bt[_u(d), _u(s)] = top + W3[_u(s)] if (wy if take_x else wx) - top >= thr else top


@njit(inline="always", cache=True)
def _unskew(X, Y, ns, nt, s0, t0, gxb, gyb):
    """Interior occupations from the skewed buffers into the (S, T1) / (S+1, T) outputs."""
    for s in range(ns - 1):
        for t in range(nt - 1):
            gxb[_u(s0 + s), _u(t0 + t)] = X[_u(s + t), _u(s)]
            gyb[_u(s0 + s), _u(t0 + t)] = Y[_u(s + t), _u(s)]


@njit(cache=True)
def _sequence(px, py, b, s0, t0, s1, t1, modified, need_grad, thr, exp_min, px_grad, py_grad,
              X, Y, A, Bt, W):
    """α, score and (optionally) occupations of one sequence; returns the score.

    X, Y, A, Bt: scratch of at least (ns + nt - 1, ns); W: at least (5, ns).
    """
    ns = s1 - s0 + 1
    nt = t1 - t0 + 1
    dx = 1 if modified else 0
    _skew(px, py, b, s0, t0, ns, nt, dx, X, Y)
    total = _alpha(X, Y, A, ns, nt, dx, thr, W[0], W[1], W[2])
    if not need_grad or not math.isfinite(total):
        return total  # occupations stay 0 for a sequence without a path
    gxb = px_grad[b]
    gyb = py_grad[b]
    _beta(X, Y, A, Bt, ns, nt, dx, total, thr, exp_min, gxb, gyb, s0, t0, s1, t1,
          W[0], W[1], W[2], W[3], W[4])
    _unskew(X, Y, ns, nt, s0, t0, gxb, gyb)
    return total


@njit(inline="always", cache=True)
def _scratch_shape(bnd):
    """(diagonals, s positions) of the largest box of the batch."""
    rows = 1
    lanes = 1
    for b in range(bnd.shape[0]):
        ns = bnd[b, 2] - bnd[b, 0] + 1
        rows = max(rows, ns + bnd[b, 3] - bnd[b, 1])
        lanes = max(lanes, ns)
    return rows, lanes


@njit(cache=True)
def _batch_serial(px, py, bnd, modified, need_grad, thr, exp_min, score, px_grad, py_grad):
    rows, lanes = _scratch_shape(bnd)
    X = np.empty((rows, lanes), px.dtype)
    Y = np.empty((rows, lanes), px.dtype)
    A = np.empty((rows, lanes), px.dtype)
    Bt = np.empty((rows, lanes), px.dtype)
    W = np.empty((5, lanes), px.dtype)
    for b in range(px.shape[0]):
        score[b] = _sequence(px, py, b, bnd[b, 0], bnd[b, 1], bnd[b, 2], bnd[b, 3], modified,
                             need_grad, thr, exp_min, px_grad, py_grad, X, Y, A, Bt, W)


@njit(parallel=True, cache=True)
def _batch_parallel(px, py, bnd, modified, need_grad, thr, exp_min, score, px_grad, py_grad):
    rows, lanes = _scratch_shape(bnd)
    for b in prange(px.shape[0]):
        score[b] = _sequence(px, py, b, bnd[b, 0], bnd[b, 1], bnd[b, 2], bnd[b, 3], modified,
                             need_grad, thr, exp_min, px_grad, py_grad,
                             np.empty((rows, lanes), px.dtype), np.empty((rows, lanes), px.dtype),
                             np.empty((rows, lanes), px.dtype), np.empty((rows, lanes), px.dtype),
                             np.empty((5, lanes), px.dtype))


def _num_threads() -> int:
    """Threads for the batch-parallel loop: ``ZIPASR_NUMBA_THREADS`` (default 1).

    Measured on the shared 2-core machine (BENCHMARKS.md): two threads gave
    a best case of 3.5 ms vs 6.9 ms, but a median several times worse than one thread, since
    the parallel region waits for its slowest thread whenever a core is taken by another
    process or by torch's spinning OpenMP workers.  So parallelism is opt-in.
    """
    value = os.environ.get("ZIPASR_NUMBA_THREADS", "1")
    return max(1, min(int(value), numba.config.NUMBA_NUM_THREADS))


def mi_forward(
    px: Tensor, py: Tensor, boundary: Tensor, bounds: list[list[int]], need_grad: bool
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Contract of ``torch_mi.mi_forward``; CPU tensors only."""
    B = px.shape[0]
    pxn = px.numpy()
    pyn = py.numpy()
    bnd = np.asarray(bounds, dtype=np.int64).reshape(B, 4)
    # numpy allocations (calloc) rather than torch ones: a torch fill of this size runs on
    # torch's OpenMP pool, whose spinning workers then compete with the kernel's threads
    score = np.empty(B, dtype=pxn.dtype)
    # empty 3-D stand-ins (never touched) keep one compiled signature per dtype
    gx = np.zeros(pxn.shape if need_grad else (0, 0, 0), dtype=pxn.dtype)
    gy = np.zeros(pyn.shape if need_grad else (0, 0, 0), dtype=pyn.dtype)
    args = (pxn, pyn, bnd, px.shape[2] == py.shape[2], need_grad, _MIN_LOG_DIFF[px.dtype],
            _EXP_ZERO_BELOW[px.dtype], score, gx, gy)
    n_threads = min(B, _num_threads())
    if n_threads == 1:
        _batch_serial(*args)  # no OpenMP region at all (compiled only when used)
    else:
        previous = numba.get_num_threads()
        numba.set_num_threads(n_threads)  # applies to regions launched from this thread
        try:
            _batch_parallel(*args)
        finally:
            numba.set_num_threads(previous)
    if not need_grad:
        return torch.from_numpy(score), None, None
    return torch.from_numpy(score), torch.from_numpy(gx), torch.from_numpy(gy)
