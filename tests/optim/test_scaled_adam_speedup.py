"""The chunked ScaledAdam against the frozen previous implementation, bit for bit.

tests/optim/scaled_adam_previous.py is the implementation before the speed-up (whole buckets
stacked, one torch operation at a time). Both run the same scenario with Eden, and after every
step the parameters, the whole optimizer state and the clipping decisions must be equal
(torch.equal, not approximately), with the compiled kernels and with torch operations only.
The float64 reference tests in test_scaled_adam.py check the algorithm itself.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from scaled_adam_previous import ScaledAdam as PreviousScaledAdam

from zipasr.optim import Eden, ScaledAdam, kernels
from zipasr.optim.buckets import IN_PLACE_FRACTION, plan_chunks

torch.set_num_threads(1)

CHUNK = 256  # tiny chunks, so these small tensors are cut the ways Zipformer-M's are
assert CHUNK // IN_PLACE_FRACTION == 16  # rows of >= 16 elements are used in place
# name -> (shape, init scale); scalars start at the given value. Two groups.
GROUP0 = {
    "w1": ((6, 5), 0.3),
    "w2": ((6, 5), 0.5),  # same shape as w1: one bucket
    "long1": ((20, 13), 0.2),  # 260-element rows: in-place pieces of 192 and 68
    "long2": ((20, 13), 0.2),
    "bias": ((5,), 0.1),  # rows below 16 elements are gathered
    **{f"row{i}": ((3, 5), 0.1) for i in range(18)},  # 18 rows of 15: chunks of 17 and 1
    "conv1d": ((4, 3, 3), 0.2),
    "conv2d": ((3, 2, 3, 3), 0.2),
    "scalar0d": ((), 1.0),
    "scalar1": ((1,), 9.99),  # runs into scalar_max
    "tiny": ((7,), 1e-6),  # below param_min_rms
    "big": ((8, 8), 2.95),  # grows into param_max_rms
    "transposed": ((13, 11), 0.3),  # a non-contiguous parameter: gathered, never in place
}
GROUP1 = {"v": ((6, 5), 0.4), "vb": ((6,), 0.1), "low": ((3, 70), 0.3)}
LOW_PRECISION = "low"  # bfloat16 parameter (float32 state): torch operations, mixed dtypes
BASE_LRS = (0.045, 0.4)  # the large one makes the +-0.1 clamp of the scale step bind
EDEN = dict(lr_batches=30, lr_epochs=1.5, warmup_batches=20)
STEPS, PER_EPOCH = 64, 40  # Eden's epoch boundary at step 40
SPIKES = (15, 33, 47)  # clipped steps (the first threshold exists from step 10)
INF_STEP = 42  # an inf gradient: factor 0
NO_GRAD_STEPS = (5, 6)  # "bias" and "row3" have no gradient: zeros
LATE = 52  # from here the step counters read 1001+: no bias correction of the second moment


def make_params(dtype: torch.dtype) -> dict[str, torch.nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    out = {}
    for name, (shape, scale) in {**GROUP0, **GROUP1}.items():
        if name.startswith("scalar"):
            x = torch.full(shape, scale, dtype=torch.float64)
        else:
            x = torch.randn(shape, generator=g, dtype=torch.float64) * scale
        dt = torch.bfloat16 if name == LOW_PRECISION else dtype
        if name == "transposed":
            out[name] = torch.nn.Parameter(x.to(dt).t().contiguous().t())
        else:
            out[name] = torch.nn.Parameter(x.to(dt))
    assert not out["transposed"].is_contiguous()
    return out


def grad_for(name: str, p: torch.Tensor, t: int) -> torch.Tensor | None:
    if name in ("bias", "row3") and t in NO_GRAD_STEPS:
        return None
    gen = torch.Generator().manual_seed(1000 * t + 7 * len(name) + ord(name[-1]))
    noise = torch.randn(p.shape, generator=gen, dtype=torch.float64)
    x = p.double()
    if name == "big":
        g = -0.5 * x + 0.05 * noise
    elif name.startswith("scalar"):
        g = 0.5 * (x - 20.0) + 0.3 * noise
    else:
        k = torch.arange(p.numel(), dtype=torch.float64).reshape(p.shape)
        g = 0.5 * (x - 0.3 * torch.sin(k + len(name))) + 0.3 * noise
    if t in SPIKES:
        g = g * (3000.0 if name == "w2" else 30.0)
    if t == INF_STEP and name == "conv1d":
        g[0, 0, 0] = float("inf")
    return g.to(p.dtype)


def build(cls, dtype, chunk: int | None = CHUNK, compiled: bool = True, low_precision=True):
    params = make_params(dtype)
    if not low_precision:
        del params[LOW_PRECISION]
    groups = [
        {"named_params": [(n, params[n]) for n in GROUP0], "lr": BASE_LRS[0]},
        {"named_params": [(n, params[n]) for n in GROUP1 if n in params], "lr": BASE_LRS[1]},
    ]
    opt = cls(groups, lr=BASE_LRS[0], clipping_update_period=32)
    if cls is ScaledAdam:
        opt.chunk_elements = chunk
        opt.use_kernels = compiled
    return params, opt, Eden(opt, **EDEN)


def train_step(params, opt, sched, t: int) -> None:
    if t % PER_EPOCH == 0:
        sched.step_epoch(t // PER_EPOCH)
    sched.step_batch(t + 1)
    if t == LATE:
        for st in opt.state.values():
            st["step"] += 1001 - LATE
    for n, p in params.items():
        p.grad = grad_for(n, p.detach(), t)
    opt.step()


def assert_same_state(new: dict, old: dict, where: object) -> None:
    assert new["param_groups"] == old["param_groups"], where
    assert new["state"].keys() == old["state"].keys(), where
    for k, st in old["state"].items():
        assert st.keys() == new["state"][k].keys(), (where, k)
        for key, val in st.items():
            got = new["state"][k][key]
            if isinstance(val, torch.Tensor):
                assert got.dtype == val.dtype and torch.equal(got, val), (where, k, key)
            else:
                assert got == val, (where, k, key)


def run_both(dtype, chunk, compiled, steps=STEPS):
    """Previous and current optimizer side by side; compare after every step."""
    runs = [build(PreviousScaledAdam, dtype), build(ScaledAdam, dtype, chunk, compiled)]
    factors = []
    for t in range(steps):
        for params, opt, sched in runs:
            train_step(params, opt, sched, t)
        (old_p, old, _), (new_p, new, _) = runs
        for n in old_p:
            assert torch.equal(new_p[n], old_p[n]), (t, n)
        assert_same_state(new.state_dict(), old.state_dict(), t)
        assert new.last_clipping == old.last_clipping, t
        factors.append(new.last_clipping[0]["factor"])
    return runs[1], factors


@pytest.mark.parametrize(
    "chunk,compiled",
    [(CHUNK, True), (CHUNK, False), (None, True)],
    ids=["chunks-compiled", "chunks-torch-ops", "whole-buckets-compiled"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_bit_identical_to_previous_implementation(dtype, chunk, compiled):
    (params, opt, _), factors = run_both(dtype, chunk, compiled)

    # The scenario reached what it is meant to cover.
    assert all(factors[t] < 0.5 for t in SPIKES) and factors[INF_STEP] == 0.0
    assert abs(params["scalar1"].item()) == pytest.approx(10.0)
    assert opt.state[params["tiny"]]["param_rms"].max() < 1e-5
    assert all(math.isfinite(p.double().sum().item()) for p in params.values())
    if chunk is not None:
        plans = [b.chunks(chunk) for _, bs in opt._bucket_cache.values() for b in bs]
        assert any(sum(c.rows == 0 and c.row == 0 for c in plan) > 1 for plan in plans)
        assert any(sum(c.rows > 0 for c in plan) > 1 for plan in plans)
    if compiled:
        assert kernels.torch_agreement(dtype) is not None  # the kernels did run


def test_bit_identical_on_two_threads():
    """With several threads the row sums must come from whole-bucket buffers (torch may split
    a row between threads depending on the whole tensor's shape): a bucket past torch's
    parallel grain size shows whether they do."""
    a = torch.randn(2, 200, 200, generator=torch.Generator().manual_seed(1))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        per_row = torch.stack([a[0].sum(), a[1].sum()])
        assert not torch.equal(a.sum(dim=(1, 2)), per_row)  # the case this test is about
        runs = []
        for cls in (PreviousScaledAdam, ScaledAdam):
            ps = [torch.nn.Parameter(x.clone()) for x in a]
            opt = cls([("x", ps[0]), ("y", ps[1])], lr=0.05)
            runs.append((ps, opt))
        gen = torch.Generator().manual_seed(2)
        for _ in range(8):  # two size-update periods (steps 3 and 7)
            grads = torch.randn(2, 200, 200, generator=gen)
            for ps, opt in runs:
                for p, g in zip(ps, grads, strict=True):
                    p.grad = g.clone()
                opt.step()
        (old_ps, old), (new_ps, new) = runs
        assert all(torch.equal(x, y) for x, y in zip(new_ps, old_ps, strict=True))
        assert_same_state(new.state_dict(), old.state_dict(), "2 threads")
    finally:
        torch.set_num_threads(threads)


def test_state_of_previous_implementation_resumes_bit_exact():
    """A checkpoint written by the previous implementation continues identically.

    (Without the bfloat16 parameter: torch's load_state_dict casts its float32 state to
    bfloat16, in either implementation.)
    """
    steps, cut = 30, 13  # cut mid size-update period, after the first threshold
    old_params, old, old_sched = build(PreviousScaledAdam, torch.float32, low_precision=False)
    new_params, new, new_sched = build(ScaledAdam, torch.float32, low_precision=False)
    for t in range(steps):
        if t == cut:  # the new optimizer takes over the old one's checkpoint
            with torch.no_grad():
                for n, p in new_params.items():
                    p.copy_(old_params[n])
            new.load_state_dict(copy.deepcopy(old.state_dict()))  # (not shared tensors)
            new_sched.load_state_dict(old_sched.state_dict())
        runs = [(old_params, old, old_sched)] + ([(new_params, new, new_sched)] if t >= cut else [])
        for params, opt, sched in runs:
            train_step(params, opt, sched, t)
    for n in old_params:
        assert torch.equal(new_params[n], old_params[n]), n
    assert_same_state(new.state_dict(), old.state_dict(), "end")


@pytest.mark.parametrize(
    "n,row,target,in_place",
    [
        (3, 5, 64, False),
        (4, 260, 64, True),
        (5, 130, 100, True),
        (40, 7, 64, False),
        (3, 260, 64, False),
        (2, 1000, None, True),
        (7, 1, 3, False),
        (2, 64, 64, True),
    ],
)
def test_chunk_plan_tiles_the_stacked_layout(n, row, target, in_place):
    plan = plan_chunks(n, row, target, in_place)
    assert plan[0].start == 0 and plan[-1].stop == n * row
    assert all(a.stop == b.start for a, b in zip(plan, plan[1:], strict=False))
    if target is None:
        assert plan == [plan[0]] and plan[0].rows == n
        return
    for c in plan:
        if c.rows:  # whole rows, at least one, no more than fit the target unless one row
            assert not in_place and (c.start, c.stop) == (c.row * row, (c.row + c.rows) * row)
            assert c.rows == 1 or c.stop - c.start <= target
        else:  # a piece of one row starting on a 64-element boundary of that row
            lo = c.start - c.row * row
            assert in_place and 0 <= lo < c.stop - c.row * row <= row and lo % 64 == 0
            assert c.stop - c.start < target + 64
    if in_place:  # every row is cut alike (the view relies on it)
        pieces = [[c.stop - c.start for c in plan if c.row == r] for r in range(n)]
        assert all(p == pieces[0] for p in pieces)
