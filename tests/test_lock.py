"""Two runs in one directory: while a run is executing, a second `snakemake` (what a second
`make run` starts) stops at once with Snakemake's directory-lock message, starts no job and
takes nothing from the first, which completes with all its outputs.

The first run is held mid-DAG deterministically, not by timing: its LibriSpeech download
comes from a loopback mirror that answers only when the test lets it."""

from __future__ import annotations

import functools
import http.server
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import BIN, ROOT, planned_jobs, snakemake, tool_env
from librispeech_mirror import build_part, make_tarball

PART = "train-clean-5"


class _GatedServer(http.server.ThreadingHTTPServer):
    requested: threading.Event  # a download has started: its Snakemake run holds the lock
    release: threading.Event    # set by the test: downloads may proceed
    requests: int


class _GatedHandler(http.server.SimpleHTTPRequestHandler):
    """Static files, but every GET waits for ``server.release`` first."""

    server: _GatedServer

    def log_message(self, *args: Any) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:
        self.server.requests += 1
        self.server.requested.set()
        self.server.release.wait(timeout=300)  # bounded: a failed test must not hang
        super().do_GET()


@pytest.fixture
def gated_mirror(tmp_path: Path) -> Iterator[_GatedServer]:
    """One tiny LibriSpeech part (6 utterances) behind a gate, on a free loopback port."""
    build_part(tmp_path / "src", PART, speakers=2, utts=3, seed=7)
    make_tarball(tmp_path / "src", PART, tmp_path / "mirror")
    handler = functools.partial(_GatedHandler, directory=str(tmp_path / "mirror"))
    server = _GatedServer(("127.0.0.1", 0), handler)
    server.requested, server.release, server.requests = threading.Event(), threading.Event(), 0
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.release.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_second_run_fails_at_once_and_the_first_completes(workdir: Path,
                                                          gated_mirror: _GatedServer) -> None:
    url = f"http://127.0.0.1:{gated_mirror.server_address[1]}"
    # the `data` half of the DAG on one part (train, dev and test alike): download → manifests
    # → fbank, and BPE
    cfg = {"corpus": {"name": "librispeech", "prefix": "librispeech", "train_parts": [PART],
                      "dev_parts": [PART], "test_parts": [PART],
                      "librispeech": {"base_url": url}},
           "features": {"num_jobs": 1}, "bpe": {"vocab_size": 30}}
    cfg_file = workdir / "first-config.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    with open(workdir.parent / "first.log", "w") as out:
        # its own session: the cleanup below can stop it and its jobs by its process group
        first = subprocess.Popen(
            [str(BIN / "snakemake"), "-s", str(ROOT / "Snakefile"), "-d", str(workdir),
             "--cores", "1", "data", "--configfile", str(cfg_file)],
            cwd=workdir, env=tool_env(), stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True)
    try:
        # wait until the first run executes its download job: then it holds the lock
        deadline = time.monotonic() + 180
        while not gated_mirror.requested.wait(timeout=0.5):
            assert first.poll() is None, (workdir.parent / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the first run never started its download"
        assert first.poll() is None
        assert list((workdir / ".snakemake" / "locks").iterdir())

        # the second run (the default target, as `make run`) fails before running anything
        t0 = time.monotonic()
        second = snakemake(workdir, cfg, check=False)
        took = time.monotonic() - t0
        out = second.stdout + second.stderr
        assert second.returncode != 0, out[-3000:]
        assert "Directory cannot be locked" in out and str(workdir) in out, out[-3000:]
        assert "--unlock" in out  # how to clear a lock a killed run left behind
        assert took < 60  # Snakemake's own start-up; it does not wait for the first run
        assert gated_mirror.requests == 1  # no second download started
        assert first.poll() is None  # and the first is untouched, still in its download

        gated_mirror.release.set()
        assert first.wait(timeout=600) == 0, (workdir.parent / "first.log").read_text()[-3000:]
    finally:
        gated_mirror.release.set()
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGTERM)
            first.wait(timeout=60)

    # the first run's outputs are complete, and Snakemake agrees: nothing to redo or resume
    from lhotse import CutSet

    assert len(CutSet.from_file(workdir / f"data/fbank/librispeech_cuts_{PART}.jsonl.gz")) == 6
    tokens = workdir / "data/lang_bpe_30/tokens.txt"
    assert tokens.read_text().count("\n") == 30
    locks = workdir / ".snakemake" / "locks"
    assert not locks.exists() or not list(locks.iterdir())  # released: the next run may start
    assert planned_jobs(workdir, cfg, "data") == {}
