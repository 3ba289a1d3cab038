"""The DDP collectives a training worker uses: joining the process group, barrier, all-reduce,
all-gather.

zipasr.train.launch starts the workers (torchrun) and reads their rank from the environment
(:func:`zipasr.train.launch.dist_env`); this module is what runs inside them once they train.
Every helper is a no-op for a single process (``world_size == 1``), so the trainer calls them
unconditionally.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

log = logging.getLogger("zipasr.train.trainer")  # the trainer's log lines, as before the move


def init_process_group(device: torch.device, world_size: int, rank: int,
                       local_rank: int) -> None:
    """Join the process group torchrun set up (MASTER_ADDR/PORT, RANK, WORLD_SIZE): NCCL on
    CUDA (after selecting ``device``), gloo on CPU."""
    import torch.distributed as dist

    if world_size == 1 or dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend)
    log.info("DDP: rank %d of %d (local rank %d), backend %s, device %s, %d CPU threads "
             "(MKL_NUM_THREADS=%s)", rank, world_size, local_rank, backend,
             device, torch.get_num_threads(), os.environ.get("MKL_NUM_THREADS", "-"))


def barrier(world_size: int) -> None:
    if world_size > 1:
        torch.distributed.barrier()


def all_reduce(values: list[float], world_size: int, device: torch.device,
               op: str = "sum") -> list[float]:
    """Sum (or max) of ``values`` over the ranks, in float64."""
    if world_size == 1:
        return values
    import torch.distributed as dist

    dev = device if device.type == "cuda" else torch.device("cpu")
    t = torch.tensor(values, dtype=torch.float64, device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t.tolist()


def all_gather(obj: Any, world_size: int) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` for a single process)."""
    if world_size == 1:
        return [obj]
    out: list[Any] = [None] * world_size
    torch.distributed.all_gather_object(out, obj)
    return out
