"""Launching ``zipasr train`` as a DDP job: one process per GPU (or N gloo processes on a CPU),
on one node or on every node of a Slurm allocation.

``zipasr train --nproc-per-node N`` with N > 1, or inside a Slurm job that spans nodes, replaces
itself by ``torchrun ... --no-python zipasr train ...``; torchrun sets RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT for every worker, and the workers (which see LOCAL_RANK
and so never launch again) read them through :func:`dist_env`.

One node: ``torchrun --standalone --nnodes 1 --nproc-per-node N`` (a private rendezvous on a free
local port). Several nodes: ``srun --nodes M --ntasks-per-node 1 torchrun --nnodes M
--nproc-per-node N --rdzv-backend c10d --rdzv-endpoint HEAD:PORT --rdzv-id JOB``, HEAD being the
first host of the job's node list: each node's torchrun starts its N workers and they meet at
HEAD (node ranks are assigned by the rendezvous; Slurm's SLURM_NODEID is logged only).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping

log = logging.getLogger(__name__)

RDZV_PORT = 29400  # default c10d rendezvous port; ZIPASR_RDZV_PORT overrides it

# Thread-count variables of the math libraries torch may use. Snakemake sets them all to the
# job's threads; each of N workers on a node must get its share, or N x threads busy threads
# fight for the cores (measured: MKL_NUM_THREADS=2 left in two 1-thread workers on 2 cores
# made training 10x slower).
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
               "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS", "GOTO_NUM_THREADS")


def dist_env(env: Mapping[str, str] | None = None) -> tuple[int, int, int]:
    """``(world_size, rank, local_rank)`` as torchrun sets them; ``(1, 0, 0)`` outside it."""
    env = os.environ if env is None else env
    ws = int(env.get("WORLD_SIZE", "1"))
    return ws, int(env.get("RANK", "0")), int(env.get("LOCAL_RANK", "0"))


def under_launcher(env: Mapping[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    return "LOCAL_RANK" in env and "WORLD_SIZE" in env


def expand_nodelist(nodelist: str) -> list[str]:
    """Slurm's compressed host list (``gpu[01-03,07],login1``) as host names, in order; the
    pure-Python fallback of ``scontrol show hostnames``."""
    hosts: list[str] = []
    for m in re.finditer(r"([^,\[]+)(?:\[([^\]]+)\])?(?:,|$)", nodelist):
        prefix, ranges = m.group(1), m.group(2)
        if not prefix:
            continue
        if ranges is None:
            hosts.append(prefix)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            for i in range(int(lo), int(hi or lo) + 1):
                hosts.append(f"{prefix}{i:0{len(lo)}d}")
    return hosts


def _scontrol_job(job_id: str) -> dict[str, str]:
    """``scontrol show job -o`` as key=value pairs (empty when scontrol is not there)."""
    if not shutil.which("scontrol"):
        return {}
    proc = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True,
                          text=True)
    return dict(kv.split("=", 1) for kv in proc.stdout.split() if "=" in kv)


def slurm_nodes(env: Mapping[str, str] | None = None) -> list[str]:
    """The hosts of the Slurm job this process runs in (``[]`` outside Slurm).

    SLURM_JOB_NODELIST (or SLURM_NODELIST) when present. Snakemake's slurm-jobstep plugin removes
    every SLURM_* variable but SLURM_JOB_ID before it runs the rule, so the list is then asked
    from ``scontrol show job $SLURM_JOB_ID``."""
    env = os.environ if env is None else env
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist and env.get("SLURM_JOB_ID"):
        nodelist = _scontrol_job(env["SLURM_JOB_ID"]).get("NodeList")
    if not nodelist or nodelist == "(null)":
        return []
    if shutil.which("scontrol"):
        proc = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                              text=True)
        if proc.returncode == 0 and proc.stdout.split():
            return proc.stdout.split()
    return expand_nodelist(nodelist)


def worker_env(nproc_per_node: int, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """``env`` with the node's CPU threads split among its ``nproc_per_node`` workers.

    The node's budget is OMP_NUM_THREADS when set (Snakemake sets it to the job's threads),
    else the CPUs this process may run on; every variable of :data:`THREAD_VARS` becomes
    ``max(1, budget // nproc_per_node)``."""
    env = dict(os.environ if env is None else env)
    try:
        budget = int(env.get("OMP_NUM_THREADS", ""))
    except ValueError:
        budget = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
            os.cpu_count() or 1)
    share = str(max(1, budget // max(1, nproc_per_node)))
    env.update({k: share for k in THREAD_VARS})
    return env


def launch_command(nproc_per_node: int, train_args: list[str],
                   env: Mapping[str, str] | None = None) -> list[str] | None:
    """The command that runs ``zipasr train train_args`` as a DDP job, or None when this process
    should train by itself (one process on one node, or already a torchrun worker)."""
    env = os.environ if env is None else env
    if under_launcher(env):
        return None
    nodes = slurm_nodes(env) if int(env.get("SLURM_JOB_NUM_NODES")
                                    or env.get("SLURM_NNODES") or "0") != 1 else []
    if nproc_per_node <= 1 and len(nodes) <= 1:
        return None
    exe = shutil.which("zipasr") or os.path.join(os.path.dirname(sys.executable), "zipasr")
    torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable),
                                                        "torchrun")
    worker = ["--no-python", exe, "train", *train_args]
    if len(nodes) <= 1:
        return [torchrun, "--standalone", "--nnodes", "1", "--nproc-per-node",
                str(nproc_per_node), *worker]
    port = env.get("ZIPASR_RDZV_PORT", str(RDZV_PORT))
    job = env.get("SLURM_JOB_ID", "zipasr")
    jobid = [f"--jobid={job}"] if env.get("SLURM_JOB_ID") else []
    log.info("multi-node DDP: %d nodes x %d processes, rendezvous at %s:%s", len(nodes),
             nproc_per_node, nodes[0], port)
    return ["srun", "--overlap", *jobid,
            "--nodes", str(len(nodes)), "--ntasks", str(len(nodes)), "--ntasks-per-node", "1",
            torchrun, "--nnodes", str(len(nodes)), "--nproc-per-node", str(nproc_per_node),
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{nodes[0]}:{port}",
            "--rdzv-id", job, *worker]
