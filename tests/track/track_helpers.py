"""Shared helpers and fixtures of the tracking tests: one tiny tracked pipeline run in a
scratch project (a git + DVC repository holding a copy of the workflow), reused by every test
module; a tiny corpus for direct ``zipasr train`` runs."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import ROOT, build_tiny_corpus, copy_project, snakemake, tool_env

BIN = Path(sys.executable).parent
# What the scratch project holds: the workflow and the DVC setup, as committed in the project.
PROJECT_FILES = ("Snakefile", "workflow", "config", "src/zipasr", "dvc.yaml", ".dvcignore",
                 ".gitignore", ".dvc/config", ".dvc/.gitignore")


def tracking_config() -> dict[str, Any]:
    """The smoke config, greedy search only (faster), metrics every 4 batches."""
    cfg = yaml.safe_load((ROOT / "config" / "smoke.yaml").read_text())
    cfg["decode"]["methods"] = ["greedy_search"]
    cfg["tracking"] = {"metrics_interval": 4}
    return cfg


def git(cwd: Path, *args: str) -> str:
    proc = subprocess.run(["git", "-c", "user.email=test@zipasr", "-c", "user.name=test",
                           *args], cwd=cwd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def clean_env() -> dict[str, str]:
    """The tools' environment without any outer tracking settings."""
    env = tool_env()
    for k in ("MLFLOW_TRACKING_URI", "ZIPASR_TRACKING"):
        env.pop(k, None)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ui(root: Path, log: Path) -> tuple[subprocess.Popen, str]:
    """``zipasr ui`` on a free loopback port, in its own session (its PID is the process group
    of the server and its workers, stopped by :func:`stop_ui`)."""
    port = free_port()
    with open(log, "w") as out:
        proc = subprocess.Popen([str(BIN / "zipasr"), "ui", "--port", str(port)], cwd=root,
                                env=clean_env(), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    return proc, f"http://127.0.0.1:{port}"


def stop_ui(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _time_health(url: str, proc: subprocess.Popen, out: dict[str, float],
                 timeout: float = 400) -> None:
    """Record in ``out["seconds"]`` when ``url``/health first answers (the server's start)."""
    t0 = time.monotonic()
    while proc.poll() is None and time.monotonic() - t0 < timeout:
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as r:
                if r.status == 200:
                    out["seconds"] = time.monotonic() - t0
                    return
        except OSError:
            pass
        time.sleep(0.5)


@pytest.fixture(scope="session")
def tracked_project(tmp_path_factory) -> Iterator[dict[str, Any]]:
    """A scratch project at <tmp>/origin (its DVC remote at <tmp>/zipasr-dvc-remote, the
    project's default: next to the checkout) after one tracked smoke-DAG run; its MLflow UI
    (started before the run: it needs 20-100 s to answer) at ``ui_url``."""
    root = tmp_path_factory.mktemp("tracked") / "origin"
    root.mkdir()
    copy_project(root, PROJECT_FILES)
    cfg = tracking_config()
    (root / "tracking-test.yaml").write_text(yaml.safe_dump(cfg))
    git(root, "init", "-q")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "project")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    from mlflow.tracking import MlflowClient

    # create the database's tables once, so the UI and the training job do not race to
    MlflowClient(tracking_uri=uri).search_experiments()
    ui, ui_url = start_ui(root, root.parent / "ui.log")
    ui_health: dict[str, float] = {}
    threading.Thread(target=_time_health, args=(ui_url, ui, ui_health), daemon=True).start()
    saved = {k: os.environ.pop(k, None) for k in ("MLFLOW_TRACKING_URI", "ZIPASR_TRACKING")}
    try:
        try:
            proc = snakemake(root, None, "-s", str(root / "Snakefile"), "--configfile",
                             str(root / "tracking-test.yaml"))
        finally:
            os.environ.update({k: v for k, v in saved.items() if v is not None})
        exp = root / "exp" / "smoke"
        run = json.loads((exp / "mlflow-run.json").read_text())
        yield {"root": root, "exp": exp, "config": cfg, "run_id": run["run_id"],
               "experiment_id": run["experiment_id"], "uri": uri, "stderr": proc.stderr,
               "ui": ui, "ui_url": ui_url, "ui_health": ui_health}
    finally:
        stop_ui(ui)


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> dict[str, Path]:
    """16 training and 4 validation utterances with features, and a BPE model."""
    return build_tiny_corpus(tmp_path_factory.mktemp("tiny"), 16)


TINY_TRAIN = {"num_epochs": 1, "max_duration": 5, "num_buckets": 2, "num_workers": 0,
              "log_interval": 1, "save_every_n": 0, "average_period": 2, "lr_batches": 20,
              "lr_epochs": 1, "warm_step": 10, "min_cut_duration": 0.5}


def train_cmd(corpus: dict[str, Path], exp: Path, train: dict | None = None) -> list[str]:
    return [str(BIN / "zipasr"), "train", "--train-cuts", str(corpus["train"]),
            "--valid-cuts", str(corpus["dev"]), "--bpe-model", str(corpus["bpe"]),
            "--exp-dir", str(exp), "--model", json.dumps({"preset": "xs"}),
            "--train", json.dumps(train or TINY_TRAIN), "--no-progress"]


def tracking_env(uri: str, **spec: Any) -> dict[str, str]:
    """Tool environment with tracking on (as the workflow sets it) to ``uri``."""
    from zipasr.track.spec import ENV, TrackingSpec

    env = clean_env()
    env[ENV] = TrackingSpec(enabled=True, uri=uri, experiment="zipasr-test",
                            registered_model="zipasr-test", **spec).to_env()
    return env
