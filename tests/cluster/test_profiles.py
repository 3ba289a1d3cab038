"""The profiles in workflow/profiles (no cluster needed): the Slurm profile turns the site's
environment variables into per-rule Slurm resources, the LibriSpeech 960 h recipe validates and
plans the whole DAG, and a Snakemake run killed during training (SIGKILL, as by an OOM killer or a
lost login node) reruns with the local profile: the incomplete train job resumes from its
checkpoints, none of which is deleted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from helpers import BIN, ROOT, tool_env

from zipasr.config import load_config

PROFILES = ROOT / "workflow" / "profiles"
# a LibriSpeech 960 h recipe: the base, then the model's overlay (Snakemake merges them in order)
BASE = ROOT / "config" / "librispeech-960.yaml"
RECIPE_M = [str(BASE), str(ROOT / "config" / "librispeech-960-M.yaml")]


def _snakemake(workdir: Path, *args: str, env: dict | None = None,
               check: bool = True) -> subprocess.CompletedProcess:
    cmd = [str(BIN / "snakemake"), "-s", str(ROOT / "Snakefile"), "-d", str(workdir), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=workdir,
                          env={**tool_env(), **(env or {})}, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def _planned_resources(out: str) -> dict[str, str]:
    """rule name -> its `resources:` line from a dry run's job listing (the first job of each)."""
    res, rule = {}, None
    for line in out.splitlines():
        if line.startswith("rule ") or line.startswith("localrule "):
            rule = line.split()[1].rstrip(":")
        elif line.strip().startswith("resources:") and rule and rule not in res:
            res[rule] = line.strip()
    return res


def test_librispeech_960_m_plans_on_slurm_with_site_settings(workdir: Path) -> None:
    site = {"ZIPASR_SLURM_PARTITION": "gpu", "ZIPASR_SLURM_ACCOUNT": "asr",
            "ZIPASR_GPU_MODEL": "a100", "ZIPASR_TRAIN_GPUS": "8"}
    proc = _snakemake(workdir, "-n", "--profile", str(PROFILES / "slurm"),
                      "--configfile", *RECIPE_M, env=site)
    out = proc.stdout + proc.stderr
    res = _planned_resources(out)
    for rule in ("download_librispeech", "prepare_librispeech", "fbank", "bpe", "train",
                 "average", "decode", "score"):
        assert "slurm_partition=gpu" in res[rule] and "slurm_account=asr" in res[rule], res[rule]
    assert "gpu=8" in res["train"] and "gpu_model=a100" in res["train"]
    assert "runtime=2880" in res["train"]
    assert "gpu=1" in res["decode"] and "gpu=" not in res["fbank"]
    # the whole recipe: 7 LibriSpeech parts, 2 methods x 4 evaluation sets
    assert "download_librispeech        7" in out and "decode                      8" in out


def test_train_job_launches_one_process_per_gpu(workdir: Path) -> None:
    """The train rule's DDP launch from the profile: GPUs per node -> --nproc-per-node; several
    nodes -> --nodes, a per-node --gres and the `mpi` resource (the rule runs in the batch step,
    from where zipasr train starts one torchrun per node)."""
    for nodes, want in (("1", "gpu=4"), ("2", "nodes=2")):
        env = {"ZIPASR_TRAIN_GPUS": "4", "ZIPASR_TRAIN_NODES": nodes, "ZIPASR_GPU_MODEL": "a100"}
        out = _snakemake(workdir, "-n", "-p", "--profile", str(PROFILES / "slurm"),
                         "--configfile", *RECIPE_M, "--until", "train", env=env).stdout
        res = _planned_resources(out)["train"]
        assert want in res, res
        if nodes == "2":
            assert "gres=gpu:a100:4" in res and "mpi=srun" in res and "tasks_per_node=1" in res
        assert "zipasr train --nproc-per-node 4 " in out


@pytest.mark.parametrize("recipe", sorted((ROOT / "config").glob("librispeech-960-*.yaml")),
                         ids=lambda p: p.stem)
def test_recipe_validates_and_plans(recipe: Path, workdir: Path) -> None:
    # every recipe is an overlay of the base; the streaming one also of the M recipe
    files = [BASE, recipe]
    if recipe.stem.endswith("-streaming"):
        files.insert(1, recipe.with_name(recipe.stem.removesuffix("-streaming") + ".yaml"))
    cfg = load_config(*files)
    out = _snakemake(workdir, "-n", "--profile", str(PROFILES / "local"),
                     "--configfile", *map(str, files)).stdout
    epoch = cfg["average"].get("epoch", cfg["train"]["num_epochs"])
    assert f"epoch-{epoch}_avg-{cfg['average']['avg']}_use-averaged-model.pt" in out
    assert f"preset\": \"{cfg['model']['preset']}\"" in out


def test_killed_run_reruns_with_local_profile_and_keeps_checkpoints(workdir: Path) -> None:
    cfg = yaml.safe_load((ROOT / "config" / "smoke.yaml").read_text())
    cfg["train"].update(num_epochs=2, save_every_n=2, keep_last_k=0)
    (workdir / "c.yaml").write_text(yaml.safe_dump(cfg))
    args = ["--profile", str(PROFILES / "local"), "--cores", "2", "--configfile",
            str(workdir / "c.yaml"), "--until", "train"]
    exp = workdir / cfg["exp_dir"]

    # Kill the whole Snakemake process tree once training has written a checkpoint.
    proc = subprocess.Popen([str(BIN / "snakemake"), "-s", str(ROOT / "Snakefile"), "-d",
                             str(workdir), *args], cwd=workdir, env=tool_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while not list(exp.glob("checkpoint-*.pt")):
            assert proc.poll() is None, "snakemake ended before training wrote a checkpoint"
            assert time.monotonic() < deadline, "no checkpoint after 600 s"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    before = {p.name: p.stat().st_mtime_ns for p in exp.glob("*.pt")
              if not p.name.startswith(".")}
    assert not (exp / "train-summary.json").exists()

    # A SIGKILLed Snakemake leaves its lock behind: `--unlock` is the documented first step.
    _snakemake(workdir, *args, "--unlock")
    _snakemake(workdir, *args)
    assert "resumed from" in (workdir / "logs" / "train" / "exp_smoke.log").read_text()
    for name, mtime in before.items():
        assert (exp / name).stat().st_mtime_ns == mtime, f"{name} deleted or rewritten"
    assert json.loads((exp / "train-summary.json").read_text())["resumed"] is True
