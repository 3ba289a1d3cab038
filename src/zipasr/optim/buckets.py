"""Equal-shape parameters as one stacked array, walked in cache-sized chunks (for ScaledAdam).

ScaledAdam treats the parameters of a group that share (dtype, shape) as one "stacked" array of
shape ``(n, *shape)`` (``n`` rows of ``k`` elements) and keeps their optimizer state stacked, as
icefall does. Copying a whole bucket into stacked scratch tensors and running each of the
update's dozen elementwise operations over all of it costs one trip through main memory per
operation (a bucket of Zipformer-M is up to 21 MB). A :class:`Chunk` is instead a range of the
stacked layout small enough that all operations on it run in the CPU cache.

Each chunk is either whole rows (small rows, gathered into a buffer with ``torch.stack`` and
copied back) or a piece of one row (the parameter and its gradient used in place as flat
views), so a per-row factor is one broadcast multiply. Elementwise results do not depend on how
an array is cut (each element sees the same operations; torch's CPU kernels give the same bits
in their vectorised body and scalar tail; checked against the previous whole-bucket
implementation in tests/optim). Reductions must not change their summation order: a
:class:`RowReducer` gives exactly the per-row sums torch computes over the whole stacked array.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = [
    "IN_PLACE_FRACTION",
    "Bucket",
    "Chunk",
    "RowReducer",
    "StackedView",
    "Workspace",
    "plan_chunks",
]

# Pieces of a row start at multiples of this many elements (whole SIMD vectors and cache lines).
_ALIGN = 64
# Rows of at least 1/IN_PLACE_FRACTION of a chunk are updated in place, smaller ones gathered.
IN_PLACE_FRACTION = 16


@dataclass(frozen=True)
class Chunk:
    """Elements ``[start, stop)`` of a bucket's flattened stacked layout.

    ``rows >= 1``: whole rows ``row .. row + rows - 1`` (gathered; viewed as ``(rows, *shape)``);
    ``rows == 0``: a piece of row ``row`` only (used in place; viewed as ``(stop - start,)``).
    """

    start: int
    stop: int
    row: int
    rows: int


def plan_chunks(n: int, row_numel: int, target: int | None, in_place: bool) -> list[Chunk]:
    """Cut ``n`` rows of ``row_numel`` elements into chunks of about ``target`` elements.

    ``target=None`` gives one chunk of all rows (the whole bucket). With ``in_place`` every
    row is cut alike into pieces of at most about ``target`` elements (used in place), else as
    many whole rows as fit the target, at least one, make a chunk (gathered).
    """
    total = n * row_numel
    if target is None:
        return [Chunk(0, total, 0, n)]
    if target < 1:
        raise ValueError(f"chunk target must be >= 1 element, got {target}")
    if in_place:
        pieces = math.ceil(row_numel / target)
        length = math.ceil(math.ceil(row_numel / pieces) / _ALIGN) * _ALIGN
        return [
            Chunk(r * row_numel + lo, r * row_numel + min(lo + length, row_numel), r, 0)
            for r in range(n)
            for lo in range(0, row_numel, length)
        ]
    k = max(1, target // max(row_numel, 1))
    return [
        Chunk(r * row_numel, min(r + k, n) * row_numel, r, min(k, n - r)) for r in range(0, n, k)
    ]


@dataclass
class Bucket:
    """Parameters of one group sharing (dtype, shape), in group order (the rows)."""

    params: list[Tensor]
    names: list[str]
    _plans: dict[tuple[int | None, bool], list[Chunk]] = field(default_factory=dict, repr=False)

    @property
    def stacked_shape(self) -> tuple[int, ...]:
        return (len(self.params), *self.params[0].shape)

    @property
    def is_scalar(self) -> bool:
        return self.params[0].numel() == 1

    def chunks(self, target: int | None) -> list[Chunk]:
        """The chunk plan for ``target`` elements per chunk (cached).

        Rows of at least ``target / IN_PLACE_FRACTION`` elements of contiguous parameters are
        used in place; smaller rows are gathered (a per-row pass would cost more in calls than
        copying them into a stacked chunk and back).
        """
        in_place = (
            target is not None
            and self.params[0].numel() * IN_PLACE_FRACTION >= target
            and all(p.is_contiguous() for p in self.params)
        )
        key = (target, in_place)
        plan = self._plans.get(key)
        if plan is None:
            plan = plan_chunks(len(self.params), self.params[0].numel(), target, in_place)
            self._plans[key] = plan
        return plan


class StackedView:
    """One step's chunk-by-chunk access to a bucket's parameters and gradients, stacked.

    Chunk ``i`` is ``chunks[i]``; the per-chunk views of a tensor are made once per bucket and
    step (one ``split``) rather than sliced chunk by chunk, since the Python cost of a slice is
    comparable to an operation on a cached chunk. A missing gradient (``None``) reads as zeros.
    Scratch arguments are views from :meth:`scratches` of flat buffers of the parameters' dtype.
    """

    def __init__(self, bucket: Bucket, chunks: list[Chunk]) -> None:
        self.chunks = chunks
        self.row_shape = tuple(bucket.params[0].shape)
        self.row_numel = bucket.params[0].numel()
        self.dtype = bucket.params[0].dtype
        self.params = [p.detach() for p in bucket.params]
        grads = []
        for p in bucket.params:
            if p.grad is not None and p.grad.is_sparse:
                raise RuntimeError("ScaledAdam does not support sparse gradients")
            grads.append(torch.zeros_like(p) if p.grad is None else p.grad)
        self.grads = grads
        # A plan is either all whole rows or all pieces of rows, every row cut alike.
        self.gathered = chunks[0].rows > 0
        self.chunk_rows = [c.rows for c in chunks]
        self.row_pieces = [c.stop - c.start for c in chunks if c.row == 0]
        self._param_pieces: list[Tensor] = []
        self._grad_pieces: list[Tensor] = []
        if not self.gathered:
            for p, g in zip(self.params, grads, strict=True):
                # In-place chunks need contiguous params; a gradient is copied if it is not.
                self._param_pieces += p.view(-1).split(self.row_pieces)
                self._grad_pieces += g.reshape(-1).split(self.row_pieces)

    def parts(self, stacked: Tensor) -> list[Tensor]:
        """Per-chunk views of a contiguous tensor of the stacked shape."""
        if self.gathered:
            return list(stacked.split(self.chunk_rows))
        return list(stacked.view(-1).split(self.row_pieces * len(self.params)))

    def scratches(self, buf: Tensor) -> list[Tensor]:
        """Per chunk, the start of flat scratch ``buf`` shaped like the chunk."""
        shaped: dict[int, Tensor] = {}
        out = []
        for c in self.chunks:
            size = c.stop - c.start
            view = shaped.get(size)
            if view is None:
                view = buf[:size].view(c.rows, *self.row_shape) if c.rows else buf[:size]
                shaped[size] = view
            out.append(view)
        return out

    def row_parts(self, per_row: Tensor) -> list[Tensor]:
        """Per chunk, the rows of a ``(n, 1, ..., 1)`` tensor broadcastable against it.

        A piece of one row gets a one-element 1-d view (not 0-d, which would change type
        promotion for low-precision parameters).
        """
        if self.gathered:
            return list(per_row.split(self.chunk_rows))
        rows = per_row.view(-1).split(1)
        return [rows[c.row] for c in self.chunks]

    def grad(self, i: int, scratch: Tensor, factor: float) -> Tensor:
        """Chunk ``i`` of the stacked gradient times ``factor`` (0: zeros); do not modify it.

        Same values as stacking the gradients into the parameters' dtype and then multiplying
        by ``factor``; a view of the gradient itself when nothing needs to change.
        """
        if self.gathered:
            c = self.chunks[i]
            torch.stack(self.grads[c.row : c.row + c.rows], out=scratch)
            if factor == 0.0:
                scratch.zero_()
            elif factor != 1.0:
                scratch.mul_(factor)
            return scratch
        if factor == 0.0:
            return scratch.zero_()
        g = self._grad_pieces[i]
        if g.dtype != self.dtype:
            g = scratch.copy_(g)
        if factor == 1.0:
            return g
        return torch.mul(g, factor, out=scratch)

    def grad_for_kernel(self, i: int, scratch: Tensor, factor: float) -> tuple[Tensor, bool]:
        """Chunk ``i`` of the gradient and whether a kernel still has to apply ``factor``.

        Like :meth:`grad`, but a piece of one row is returned unscaled (the kernel multiplies
        as it reads, saving a pass). Only for gradients of the parameters' dtype.
        """
        if self.gathered or factor == 0.0:
            return self.grad(i, scratch, factor), False
        return self._grad_pieces[i], factor != 1.0

    def param(self, i: int, scratch: Tensor) -> Tensor:
        """Chunk ``i`` of the stacked parameters: a gathered copy, or a view of the parameter.

        Changes reach the parameters once :meth:`write_back` is called with the result.
        """
        if self.gathered:
            c = self.chunks[i]
            return torch.stack(self.params[c.row : c.row + c.rows], out=scratch)
        return self._param_pieces[i]

    def write_back(self, i: int, values: Tensor) -> None:
        """Copy a gathered chunk from :meth:`param` back into its parameters."""
        if self.gathered:
            c = self.chunks[i]
            torch._foreach_copy_(self.params[c.row : c.row + c.rows], list(values.unbind(0)))


class RowReducer:
    """Per-row sums (or means) of a stacked-shape quantity that is written chunk by chunk.

    The result equals ``x.sum(dim=(1, ...), keepdim=True)`` (or ``mean``) of the whole stacked
    ``x``, shape ``(n, 1, ..., 1)``, bit for bit. On one thread torch reduces each row of a
    contiguous tensor on its own, so a row only has to be complete in a chunk- or row-sized
    buffer that stays in cache (``per_row``). On several threads torch may split a row between
    threads in a way that depends on the whole tensor's shape, so the values then go to a
    whole-bucket buffer of the stacked shape that is reduced at once.

    Use: write chunk ``i``'s values into ``targets[i]``, then call :meth:`finish` with ``i``;
    after all chunks, :meth:`result`.
    """

    def __init__(
        self,
        view: StackedView,
        mean: bool,
        per_row: bool,
        whole: Tensor,
        chunk_buf: Tensor,
        row_buf: Tensor,
    ) -> None:
        self.view = view
        self.reduce = torch.mean if mean else torch.sum
        self.dims = list(range(1, len(view.row_shape) + 1))
        self.whole = None if per_row else whole
        self.out: Tensor | None = None
        if not per_row:
            self.targets = view.parts(whole)
            return
        n = len(view.params)
        self.out = torch.empty(n, dtype=whole.dtype, device=whole.device)
        if view.gathered:
            self.targets = view.scratches(chunk_buf)
            self._outs = list(self.out.split(view.chunk_rows))
        else:
            self.row_buf = row_buf[: view.row_numel]
            pieces = self.row_buf.split(view.row_pieces)
            self.targets = [pieces[i % len(pieces)] for i in range(len(view.chunks))]

    def finish(self, i: int) -> None:
        """Reduce the rows chunk ``i`` completes (per-row mode)."""
        if self.out is None:
            return
        view = self.view
        if view.gathered:
            self.reduce(self.targets[i], dim=self.dims, out=self._outs[i])
            return
        c = view.chunks[i]
        if c.stop == (c.row + 1) * view.row_numel:
            self.reduce(self.row_buf, dim=0, out=self.out[c.row])

    def result(self) -> Tensor:
        """The per-row reductions, shape ``(n, 1, ..., 1)``."""
        if self.out is None:
            assert self.whole is not None
            return self.reduce(self.whole, dim=self.dims, keepdim=True)
        return self.out.view(-1, *([1] * len(self.view.row_shape)))


class Workspace:
    """Flat scratch buffers reused by every bucket and step, sized to the largest request.

    Fresh model-sized temporaries every step cost as much as the arithmetic on CPU, so the
    stacked temporaries of one bucket (or chunk) live in a few reused buffers instead.
    """

    def __init__(self) -> None:
        self._bufs: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
        # Views handed out, by (dtype, device, shape); dropped when the buffers are replaced.
        self._views: dict[tuple[torch.dtype, torch.device, tuple[int, ...]], list[Tensor]] = {}

    def views(self, like: Tensor, shape: tuple[int, ...], count: int) -> list[Tensor]:
        """``count`` distinct buffers of ``like``'s dtype and device viewed as ``shape``."""
        key = (like.dtype, like.device)
        cached = self._views.get((*key, shape))
        if cached is not None and len(cached) >= count:
            return cached[:count]
        numel = math.prod(shape)
        bufs = self._bufs.get(key, [])
        if len(bufs) < count or bufs[0].numel() < numel:
            size = max(numel, bufs[0].numel() if bufs else 0)
            bufs = [
                torch.empty(size, dtype=like.dtype, device=like.device)
                for _ in range(max(count, len(bufs)))
            ]
            self._bufs[key] = bufs
            self._views = {k: v for k, v in self._views.items() if k[:2] != key}
        views = [b[:numel].view(shape) for b in bufs]
        self._views[(*key, shape)] = views
        return views[:count]
