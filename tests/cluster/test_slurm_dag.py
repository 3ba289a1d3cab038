"""The smoke DAG on a real single-node Slurm (scripts/slurm.sh), through the project's Slurm
profile, training included; and the fault path: the train job hits its time limit after its
first checkpoint (slurmctld kills it: TIMEOUT), Snakemake resubmits it (`retries`), training
resumes, and the checkpoints survive.

Marked `slurm`: deselected by `make test`, run by `.ci/run` as `pytest -m slurm`. Bringing Slurm
up needs root (apt-get and the daemons). Where that is impossible the tests skip, unless
ZIPASR_REQUIRE_SLURM=1 (set by CI), where they fail.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest
import yaml
from helpers import BIN, ROOT, tool_env

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(1800)]

SCRIPT = ROOT / "scripts" / "slurm.sh"
DAG_TIMEOUT = 1200  # seconds; the run takes ~5-8 min on 2 loaded cores
RULES = ("synth", "fbank", "bpe", "train", "average", "decode", "score")


def _slurm_possible() -> str | None:
    """Why Slurm cannot be brought up here, or None."""
    if shutil.which("slurmctld") and shutil.which("sbatch"):
        return None if os.geteuid() == 0 else "the daemons need root"
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "Slurm is not installed and cannot be installed (needs root and apt-get)"
    return None


@pytest.fixture(scope="module")
def cluster() -> dict[str, str]:
    why = _slurm_possible()
    if why:
        if os.environ.get("ZIPASR_REQUIRE_SLURM") == "1":
            pytest.fail(f"ZIPASR_REQUIRE_SLURM=1 but {why}")
        pytest.skip(why)
    # Not under pytest's 0700 tmp dirs: munged wants every parent of its socket world-executable.
    # .ci/run passes its own prefix, to clean up even if this process is killed.
    given = os.environ.get("ZIPASR_SLURM_PREFIX")
    prefix = Path(given) if given else Path(tempfile.mkdtemp(prefix="zipasr-slurm-", dir="/tmp"))
    env = {**os.environ, "ZIPASR_SLURM_PREFIX": str(prefix), "ZIPASR_SLURM_FAKE_GPUS": "2"}
    try:
        t0 = time.monotonic()
        up = subprocess.run([str(SCRIPT), "start"], env=env, capture_output=True, text=True,
                            timeout=900)
        assert up.returncode == 0, f"slurm.sh start failed:\n{up.stderr[-4000:]}"
        print(f"Slurm up in {time.monotonic() - t0:.1f}s")
        yield {**env, "SLURM_CONF": str(prefix / "etc" / "slurm.conf")}
    finally:
        down = subprocess.run([str(SCRIPT), "clean"], env=env, capture_output=True, text=True,
                              timeout=300)
        assert down.returncode == 0, down.stderr[-2000:]


def _slurm(env: dict[str, str], *cmd: str) -> str:
    return subprocess.run(list(cmd), env=env, capture_output=True, text=True, check=True,
                          timeout=60).stdout


def _train_job_ids(env: dict[str, str]) -> list[str]:
    """Running train jobs. The plugin names jobs by run uuid and puts the rule in the comment."""
    out = _slurm(env, "squeue", "-h", "-t", "R", "-o", "%i|%k")
    return [i for i, _, k in (line.partition("|") for line in out.splitlines())
            if k.startswith("rule_train")]


class Killer(threading.Thread):
    """Once the train job has written a checkpoint, lower its time limit to 1 minute (Slurm's
    smallest), so slurmctld kills it (TIMEOUT) within ~1.5 min of its start; then snapshot the
    checkpoint files that exist after it is gone.

    Not `scancel`: sacct reports a cancelled job as "CANCELLED by 0", which the plugin (2.8.0)
    does not recognise as failed, so Snakemake would wait for it forever."""

    def __init__(self, env: dict[str, str], exp: Path, deadline: float) -> None:
        super().__init__(daemon=True)
        self.env, self.exp, self.deadline = env, exp, deadline
        self.killed: str | None = None
        self.snapshot: dict[str, tuple[int, int]] = {}
        self.error: str | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            while not self.stop.is_set() and time.monotonic() < self.deadline:
                jobs = _train_job_ids(self.env)
                if jobs and list(self.exp.glob("checkpoint-*.pt")):
                    self.killed = jobs[0]
                    _slurm(self.env, "scontrol", "update", f"JobId={self.killed}",
                           "TimeLimit=1")
                    while self.killed in _slurm(self.env, "squeue", "-h", "-o", "%i").split():
                        time.sleep(0.5)
                    self.snapshot = {p.name: (p.stat().st_size, p.stat().st_mtime_ns)
                                     for p in self.exp.glob("*.pt")
                                     if not p.name.startswith(".")}  # not a partial write
                    return
                time.sleep(0.5)
        except Exception as e:  # reported by the test, not lost in a thread
            self.error = repr(e)


@pytest.fixture(scope="module")
def dag_run(cluster, tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("work")
    cfg = yaml.safe_load((ROOT / "config" / "smoke.yaml").read_text())
    # A checkpoint every 2 batches, and 15 epochs: ~11 s each in the two DDP processes on a
    # quiet machine (measured: 3 epochs in a 40 s job), ~3 min in all, so the 1-minute time
    # limit (enforced up to ~30 s late) lands mid-run even on a quiet machine; keep_last_k 0
    # keeps every checkpoint, so "survives" is exact.
    cfg["train"].update(num_epochs=15, save_every_n=2, keep_last_k=0)
    (work / "config.yaml").write_text(yaml.safe_dump(cfg))
    env = {**tool_env(), **cluster,
           # site settings, as a user sets them for the profile (see its header)
           "ZIPASR_SLURM_PARTITION": "debug", "ZIPASR_SLURM_ACCOUNT": "ci",
           "ZIPASR_TRAIN_GPUS": "2", "ZIPASR_DECODE_GPUS": "1", "ZIPASR_TRAIN_RUNTIME": "30",
           "ZIPASR_RETRIES": "1"}
    cmd = [str(BIN / "snakemake"), "-s", str(ROOT / "Snakefile"), "-d", str(work),
           "--profile", str(ROOT / "workflow" / "profiles" / "slurm"),
           "--configfile", str(work / "config.yaml"),
           "--slurm-init-seconds-before-status-checks", "2", "--latency-wait", "10",
           "--slurm-keep-successful-logs"]
    killer = Killer(cluster, work / cfg["exp_dir"], time.monotonic() + DAG_TIMEOUT)
    killer.start()
    t0 = time.monotonic()
    # Own session: on timeout the whole snakemake tree is killed (it may ignore SIGTERM and
    # wait for jobs forever); the cluster fixture then cancels whatever is still queued.
    proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=DAG_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"snakemake --executor slurm timed out after {DAG_TIMEOUT}s:\n{out[-6000:]}")
    except BaseException:  # e.g. Ctrl-C: leave no snakemake behind
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    finally:
        killer.stop.set()
        killer.join(timeout=30)
    elapsed = time.monotonic() - t0
    print(f"DAG through Slurm: {elapsed:.0f}s")
    if proc.returncode != 0:
        logs = "\n".join(f"--- {p}\n{p.read_text()[-2000:]}"
                         for p in sorted(work.rglob("*.log")))
        pytest.fail(f"snakemake failed ({proc.returncode}):\n{out[-6000:]}\n{logs}")
    acct = _slurm(cluster, "sacct", "-X", "-n", "-P", "-S", "2020-01-01",
                  "--format=JobIDRaw,Comment,State,AllocTRES")
    jobs = [dict(zip(("id", "comment", "state", "tres"), line.split("|"), strict=True))
            for line in acct.splitlines()]
    return {"work": work, "exp": work / cfg["exp_dir"], "out": out, "jobs": jobs,
            "killer": killer}


def test_smoke_dag_runs_through_slurm(dag_run) -> None:
    work, exp, jobs = dag_run["work"], dag_run["exp"], dag_run["jobs"]
    table = (exp / "wer.tsv").read_text().splitlines()
    assert table[0].startswith("test_set") and len(table) == 3

    # Every rule but `all` ran as a Slurm job, recorded by slurmdbd: not a local fallback.
    by_rule: dict[str, list[dict]] = {}
    for j in jobs:
        by_rule.setdefault(j["comment"].removeprefix("rule_").split("_wildcards_")[0],
                           []).append(j)
    for rule in RULES:
        assert any(j["state"] == "COMPLETED" for j in by_rule.get(rule, [])), (rule, jobs)
    assert len(by_rule["fbank"]) == 3 and len(by_rule["decode"]) == 4
    # The profile's GPU requests reached Slurm (2 fake GPUs for train, 1 per decoding job).
    assert all("gres/gpu=2" in j["tres"] for j in by_rule["train"]), by_rule["train"]
    assert all("gres/gpu=1" in j["tres"] for j in by_rule["decode"]), by_rule["decode"]
    assert not any("gres/gpu" in j["tres"] for j in by_rule["fbank"])
    # and each job's Slurm log is where the plugin puts it
    assert list((work / ".snakemake" / "slurm_logs" / "rule_train").glob("*.log"))


def test_timed_out_train_job_is_resubmitted_and_resumes(dag_run) -> None:
    killer, exp, jobs = dag_run["killer"], dag_run["exp"], dag_run["jobs"]
    assert killer.error is None, killer.error
    assert killer.killed, "no running train job with a checkpoint was seen"
    train = {j["id"]: j["state"] for j in jobs if j["comment"] == "rule_train"}
    assert train[killer.killed] == "TIMEOUT", train
    assert sorted(train.values()) == ["COMPLETED", "TIMEOUT"], train

    # The resubmitted job resumed from the checkpoint the cancelled one left ...
    log = (dag_run["work"] / "logs" / "train" / "exp_smoke.log").read_text()
    assert "resumed from" in log, log[-3000:]
    # ... and nothing deleted or rewrote the checkpoints that existed when it was killed
    # (incomplete-output cleanup only touches declared outputs; checkpoints are not outputs).
    assert any(n.startswith("checkpoint-") for n in killer.snapshot), killer.snapshot
    for name, (size, mtime) in killer.snapshot.items():
        p = exp / name
        assert p.is_file(), f"{name} was deleted"
        assert (p.stat().st_size, p.stat().st_mtime_ns) == (size, mtime), f"{name} rewritten"
    assert (exp / "epoch-3.pt").is_file() and (exp / "train-summary.json").is_file()
