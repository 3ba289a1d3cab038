"""What DDP costs the CPU training loop: training steps per rank with and without gradient sync.

The default `make run` trains with two DDP ranks of one thread each (gloo). This runs the same
training step (`train_step.py`'s batches: demo model, pruned RNN-T loss, ScaledAdam + Eden) on
every rank, round-robin over the modes, and prints each rank's seconds of audio per second and
the ratio to ``none``:

- ``none``: no gradient sync (what two independent processes reach on this machine),
- ``ddp``: DistributedDataParallel as the trainer builds it (``find_unused_parameters=True``),
- ``ddp-view``: the same with ``gradient_as_bucket_view=True`` (no copy into the buckets),
- ``flat``: no wrapper; after backward one all-reduce of all gradients in one flat tensor.

    OMP_NUM_THREADS=1 .venv/bin/torchrun --standalone --nproc-per-node 2 \\
        benchmarks/ddp_overhead.py --rounds 3 --steps 25
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parent))  # train_step.py beside this file
from train_step import make_batch, one_step, setup  # noqa: E402

MODES = ("none", "ddp", "ddp-view", "flat")


def flat_all_reduce(params: list[torch.nn.Parameter], world_size: int) -> None:
    """Average the gradients over the ranks in one call; a parameter without a gradient on
    this rank contributes zeros (DDP's ``find_unused_parameters`` does the same)."""
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                      for p in params])
    flat.mul_(1.0 / world_size)
    dist.all_reduce(flat)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p)
        offset += n


def run(mode: str, steps: int, batches: list, world_size: int) -> float:
    model, opt, sched = setup("demo", 1000)
    forward = model
    if mode in ("ddp", "ddp-view"):
        forward = DistributedDataParallel(model, find_unused_parameters=True,
                                          gradient_as_bucket_view=mode == "ddp-view")
    params = [p for p in model.parameters() if p.requires_grad]
    dist.barrier()
    elapsed, audio = 0.0, 0.0
    sync = (lambda: flat_all_reduce(params, world_size)) if mode == "flat" else None
    for step in range(steps + 1):
        t0 = time.perf_counter()
        one_step(forward, opt, sched, step, batches[step], sync=sync)
        if step:  # the first step pays one-time costs
            elapsed += time.perf_counter() - t0
            audio += batches[step][3]
    return audio / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--batch-seconds", type=float, default=12.5)
    args = ap.parse_args()
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    logging.disable(logging.WARNING)  # ScaledAdam's clipping reports
    rank, world_size = dist.get_rank(), dist.get_world_size()
    batches = [make_batch(args.batch_seconds, 5.0, 1000, 1000 * rank + i)
               for i in range(args.steps + 1)]
    results: dict[str, list[float]] = {m: [] for m in args.modes}
    for _ in range(args.rounds):
        for mode in args.modes:
            gathered: list = [None] * world_size
            dist.all_gather_object(gathered, run(mode, args.steps, batches, world_size))
            results[mode].append(sum(gathered) / world_size)
    if rank == 0:
        base = sum(results[args.modes[0]]) / args.rounds
        print(f"{world_size} ranks x 1 thread, batch {args.batch_seconds:g} s, {args.steps} "
              f"timed steps; audio s/s per rank, each round, and mean / mean of "
              f"{args.modes[0]}")
        for mode, rs in results.items():
            mean = sum(rs) / len(rs)
            print(f"{mode:9s} " + " ".join(f"{r:6.1f}" for r in rs)
                  + f"   mean {mean:6.1f}  ratio {mean / base:5.2f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
