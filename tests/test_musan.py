"""MUSAN noise through the DAG (corpus.musan.enabled), from a loopback mirror serving a tiny
MUSAN-shaped archive: a download killed partway leaves no completion marker and the rule resumes
it; an archive that cannot be extracted leaves none either and is removed; the rules download,
prepare and compute the noise cut set as icefall's compute_fbank_musan.py does (10 s windows,
those longer than 5 s); the train rule depends on it and hands it to training as noise_cuts; and
`zipasr train` runs with it, its batches mixed with the noise."""

from __future__ import annotations

import gzip
import json
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import BIN, ROOT, build_tiny_corpus, epoch_rows, snakemake, tool_env
from librispeech_mirror import serve
from musan_mirror import WINDOWS, build_musan, make_musan_tarball

from zipasr.data.musan import download_musan
from zipasr.errors import ZipasrError

LAUNCHER = Path(__file__).with_name("kill_at.py")
MUSAN_CUTS = "data/fbank/musan_cuts.jsonl.gz"


def _config(url: str) -> dict:
    cfg = yaml.safe_load((ROOT / "config" / "smoke.yaml").read_text())
    cfg["corpus"]["musan"] = {"enabled": True, "base_url": url}
    return cfg


@pytest.fixture(scope="module")
def musan(tmp_path_factory) -> dict:
    """The mirror, a download of it killed partway, then the DAG's MUSAN rules to the noise cut
    set in the same directory. Returns what each step left."""
    root = tmp_path_factory.mktemp("musan")
    ids = build_musan(root / "src")
    archive = make_musan_tarball(root / "src", root / "mirror")
    work = root / "work"
    work.mkdir()
    download = work / "data" / "download"
    with serve(root / "mirror") as url:
        # SIGKILL once 300 kB of the 1.9 MB archive are written, as the rule runs it
        kill = {"write": "musan.tar.gz", "after": 300_000}
        proc = subprocess.run([sys.executable, str(LAUNCHER), json.dumps(kill), "download-musan",
                               "--target-dir", str(download), "--base-url", url],
                              capture_output=True, text=True, env=tool_env(), timeout=300)
        killed = {"rc": proc.returncode, "marker": (download / ".musan_completed").exists(),
                  "partial": (download / "musan.tar.gz").stat().st_size}
        cfg = _config(url)
        snakemake(work, cfg, MUSAN_CUTS)
        plan = snakemake(work, cfg, "-n", "-p").stdout
    return {"ids": ids, "archive": archive, "src": root / "src", "work": work, "cfg": cfg,
            "killed": killed, "plan": plan}


def _jsonl(path: Path) -> list[dict]:
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f]


def test_killed_download_leaves_no_marker_and_resumes(musan) -> None:
    assert musan["killed"] == {"rc": -signal.SIGKILL, "marker": False, "partial": 300_000}
    # the rule resumed it: the archive is whole (every file as built), then removed
    download = musan["work"] / "data" / "download"
    assert (download / ".musan_completed").is_file()
    assert not (download / "musan.tar.gz").exists()  # keep_archives: false
    for wav in sorted((musan["src"] / "musan").rglob("*.wav")):
        rel = wav.relative_to(musan["src"])
        assert (download / rel).read_bytes() == wav.read_bytes(), rel


def test_unextractable_archive_leaves_no_marker(tmp_path: Path, musan) -> None:
    mirror = tmp_path / "mirror" / "17"
    mirror.mkdir(parents=True)
    data = musan["archive"].read_bytes()
    (mirror / "musan.tar.gz").write_bytes(data[: len(data) // 2])  # a cut-off archive
    with serve(tmp_path / "mirror") as url, pytest.raises(ZipasrError, match="cannot be extracted"):
        download_musan(tmp_path / "dl", url)
    assert not (tmp_path / "dl" / ".musan_completed").exists()
    assert not (tmp_path / "dl" / "musan.tar.gz").exists()  # removed: the next run starts anew


def test_noise_cuts_are_icefalls(musan) -> None:
    from lhotse import CutSet, RecordingSet, combine

    work = musan["work"]
    manifests = [work / f"data/manifests/musan_recordings_{p}.jsonl.gz"
                 for p in ("music", "speech", "noise")]
    for path, part in zip(manifests, ("music", "speech", "noise"), strict=True):
        assert [r["id"] for r in _jsonl(path)] == musan["ids"][part]
    cuts = _jsonl(work / MUSAN_CUTS)
    got = {}
    for c in cuts:
        got.setdefault(c["recording"]["id"], []).append((c["start"], c["duration"]))
    assert got == WINDOWS  # 10 s windows, those longer than 5 s; the rest dropped
    assert all(5.0 < c["duration"] <= 10.0 and not c["supervisions"] for c in cuts)

    # icefall's steps on the same manifests (compute_fbank_musan.py) give these cuts, in order
    recs = combine(RecordingSet.from_file(p) for p in manifests)
    want = CutSet.from_manifests(recordings=recs).cut_into_windows(10.0).filter(
        lambda c: c.duration > 5)
    assert [(c.id, c.recording_id, c.start, c.duration) for c in want] == [
        (c["id"], c["recording"]["id"], c["start"], c["duration"]) for c in cuts]

    loaded = CutSet.from_file(work / MUSAN_CUTS).with_features_path_prefix(work)
    for c in loaded:  # the training features' options: 80 bins, 10 ms
        feats = c.load_features()
        assert feats.shape == (round(c.duration * 100), 80) and np.isfinite(feats).all()
    summary = json.loads((work / "data/fbank/musan_summary.json").read_text())
    assert summary["cuts"] == len(cuts) == 5
    for stage in ("download", "manifests", "fbank"):
        assert (work / "logs" / stage / "musan.benchmark.tsv").is_file(), stage


def test_train_rule_takes_the_noise_cuts(musan) -> None:
    plan = musan["plan"]  # the whole smoke DAG planned after the MUSAN rules ran
    for rule in ("download_musan", "prepare_musan", "fbank_musan"):
        assert f"rule {rule}:" not in plan  # done: the noise cut set is up to date
    train = next(block for block in plan.split("\n\n") if "rule train:" in block)
    inputs = next(line for line in train.splitlines() if line.strip().startswith("input:"))
    assert MUSAN_CUTS in inputs
    cmd = shlex.split(next(line.split("Shell command: ", 1)[1] for line in plan.splitlines()
                           if " zipasr train " in line))
    assert json.loads(cmd[cmd.index("--train") + 1])["noise_cuts"] == MUSAN_CUTS


def test_training_mixes_the_noise(musan, tmp_path: Path, monkeypatch) -> None:
    corpus = build_tiny_corpus(tmp_path / "corpus", 16)
    work = musan["work"]
    monkeypatch.chdir(work)  # the noise cuts' paths are relative to the DAG's directory
    train = {"num_epochs": 1, "max_duration": 5, "num_buckets": 2, "num_workers": 0,
             "log_interval": 1, "save_every_n": 0, "average_period": 2, "lr_batches": 20,
             "lr_epochs": 1, "warm_step": 10, "min_cut_duration": 0.5, "spec_augment": False,
             "device": "cpu"}

    def rows(**options) -> dict[str, torch.Tensor]:
        return epoch_rows(corpus["train"], {**train, **options})

    clean, noisy = rows(), rows(noise_cuts=MUSAN_CUTS)  # same seed; icefall's prob 0.5
    assert noisy.keys() == clean.keys()
    mixed = [k for k in clean if not torch.equal(noisy[k], clean[k])]
    assert 0 < len(mixed) < len(clean), len(mixed)
    assert all((noisy[k] >= clean[k] - 1e-3).all() for k in mixed)  # noise only adds energy

    exp = tmp_path / "exp"
    proc = subprocess.run(
        [str(BIN / "zipasr"), "train", "--train-cuts", str(corpus["train"]), "--valid-cuts",
         str(corpus["dev"]), "--bpe-model", str(corpus["bpe"]), "--exp-dir", str(exp),
         "--model", json.dumps({"preset": "xs"}),
         "--train", json.dumps({**train, "noise_cuts": MUSAN_CUTS}), "--no-progress"],
        capture_output=True, text=True, env=tool_env(), cwd=work, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert summary["batch_idx_train"] >= 3 and summary["bad_batches"] == 0
    saved = torch.load(exp / "epoch-1.pt", map_location="cpu", weights_only=False)
    assert saved["train_config"]["noise_cuts"] == MUSAN_CUTS
