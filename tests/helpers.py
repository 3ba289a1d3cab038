"""Test helpers: run the real Snakemake on the project's Snakefile in a scratch directory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def tool_env() -> dict[str, str]:
    """The environment rules see: the venv's ``zipasr`` first on PATH, one torch thread."""
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def snakemake(workdir: Path, config: dict | None = None, *args: str,
              check: bool = True) -> subprocess.CompletedProcess:
    """Run ``snakemake`` on the project's Snakefile in ``workdir`` with ``config`` merged over the
    default (through ``--configfile``, as a user would). ``args``: targets first, then options
    (``--configfile`` goes last, so it cannot swallow a target)."""
    cmd = [str(BIN / "snakemake"), "-s", str(ROOT / "Snakefile"), "-d", str(workdir),
           "--cores", "2", *args]
    if config is not None:
        cfg = workdir / "test-config.yaml"
        cfg.write_text(yaml.safe_dump(config))
        cmd += ["--configfile", str(cfg)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=tool_env(), cwd=workdir)
    if check and proc.returncode != 0:
        logs = "\n".join(f"--- {p}\n{p.read_text()[-3000:]}"
                         for p in sorted((workdir / "logs").rglob("*.log")))
        raise AssertionError(
            f"snakemake failed ({proc.returncode}):\n{proc.stderr[-6000:]}\n{logs}"
        )
    return proc


def planned_jobs(workdir: Path, config: dict | None = None, *args: str) -> dict[str, int]:
    """Rule -> job count that a dry run plans (empty when there is nothing to do)."""
    proc = snakemake(workdir, config, *args, "-n", "--quiet", "rules")
    counts: dict[str, int] = {}
    lines = (proc.stdout + proc.stderr).splitlines()
    if "Job stats:" not in lines:
        return counts
    for line in lines[lines.index("Job stats:") + 3:]:
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            break
        if parts[0] != "total":
            counts[parts[0]] = int(parts[1])
    return counts


def write_tone(path: Path, seconds: float, sr: int = 16000, seed: int = 0,
               fmt: str | None = None) -> None:
    """A deterministic speech-like test signal (harmonics + noise) written with soundfile."""
    import soundfile as sf

    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    f0 = 100 + 50 * rng.random()
    x = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in range(1, 6))
    x = 0.3 * x / np.abs(x).max() + 0.01 * rng.standard_normal(t.size)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), x.astype(np.float32), sr, format=fmt, subtype="PCM_16")


TINY_WORDS = "ONE TWO THREE FOUR FIVE SIX SEVEN EIGHT NINE TEN".split()


def build_tiny_corpus(root: Path, num_train: int) -> dict[str, Path]:
    """``num_train`` training and 4 validation utterances (test tones with counting-word
    transcripts) as cut manifests with features, and a 24-token BPE model. Returns the paths
    under keys ``train``, ``dev`` and ``bpe``."""
    from lhotse import Recording, RecordingSet, SupervisionSegment, SupervisionSet

    from zipasr.data.fbank import FbankOptions, compute_fbank
    from zipasr.lang.bpe import train_bpe

    out: dict[str, Path] = {}
    for part, n in (("train", num_train), ("dev", 4)):
        recs, sups, lines = [], [], []
        for i in range(n):
            path = root / "audio" / part / f"{part}{i}.flac"
            write_tone(path, 1.0 + 0.05 * (i % 7), seed=i + (100 if part == "dev" else 0),
                       fmt="FLAC")
            rec = Recording.from_file(path, recording_id=f"{part}{i}")
            text = " ".join(TINY_WORDS[(i + k) % 10] for k in range(2 + i % 3))
            recs.append(rec)
            sups.append(SupervisionSegment(id=rec.id, recording_id=rec.id, start=0,
                                           duration=rec.duration, text=text))
            lines.append(text)
        r, s = root / f"recs_{part}.jsonl.gz", root / f"sups_{part}.jsonl.gz"
        RecordingSet.from_recordings(recs).to_file(r)
        SupervisionSet.from_segments(sups).to_file(s)
        out[part] = root / f"cuts_{part}.jsonl.gz"
        compute_fbank(r, s, out[part], root / f"feats_{part}", FbankOptions(), progress=False)
        if part == "train":
            (root / "text.txt").write_text("\n".join(lines * 5) + "\n")
    train_bpe(root / "text.txt", root / "lang", 24)
    out["bpe"] = root / "lang" / "bpe.model"
    return out


def peaky_xs_model(features, vocab_size: int, causal: bool = False):
    """An untrained xs Transducer (seed 0, eval mode) made peaky (:func:`make_peaky`).
    ``causal``: the streaming variant, left set to whole-utterance attention."""
    import torch

    from zipasr.model import Transducer

    torch.manual_seed(0)
    model = Transducer.from_preset("xs", vocab_size=vocab_size, causal=causal).eval()
    return make_peaky(model, features, quiet_specials=False)


def make_peaky(model, features, quiet_specials: bool = True):
    """``model`` (in place, returned) with greedy and beam hypotheses that are non-empty and
    depend on the audio: an untrained or barely trained model is nearly uniform and its encoder
    output dominated by a constant, so the joiner is made peaky and its encoder projection
    centred on the mean encoder output of ``features`` (a list of (T, 80) float tensors).
    With ``quiet_specials`` <sos/eos> and <unk> (ids 1, 2) are never emitted, as by a trained
    model (sherpa-onnx takes <unk> for blank). A causal model is left seeing whole utterances.
    Draws from torch's global generator."""
    import torch

    model.eval()
    if model.config.causal:
        model.encoder.chunk_size, model.encoder.left_context_frames = [-1], [-1]
    with torch.no_grad():
        out = model.joiner.output_linear
        out.weight.normal_(0, 1.5)
        out.bias.zero_()
        out.bias[0] = 2.0
        if quiet_specials:
            out.bias[1:3] = -30.0
        enc = torch.cat([model.forward_encoder(x[None], torch.tensor([x.shape[0]]))[0][0]
                         for x in features])
        proj = model.joiner.encoder_proj
        proj.weight.mul_(3.0)
        proj.bias.sub_(proj(enc.mean(0)))  # centre: encoder_proj(mean output) = 0
    return model


def copy_project(root: Path, files: list[str]) -> None:
    """Copy these files and directories of the repository to ``root`` (a project checkout as a
    test needs it, without __pycache__)."""
    import shutil

    for rel in files:
        src, dst = ROOT / rel, root / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dst)


def write_manifests(audio: list[Path], texts: list[str], root: Path) -> tuple[Path, Path]:
    """Recording and supervision manifests (``root/recs.jsonl.gz``, ``root/sups.jsonl.gz``) of
    whole files, one supervision each, ids ``utt{i}``; returns their paths."""
    from lhotse import Recording, RecordingSet, SupervisionSegment, SupervisionSet

    recs = [Recording.from_file(p, recording_id=f"utt{i}") for i, p in enumerate(audio)]
    sups = [SupervisionSegment(id=r.id, recording_id=r.id, start=0.0, duration=r.duration,
                               text=t) for r, t in zip(recs, texts, strict=True)]
    r, s = root / "recs.jsonl.gz", root / "sups.jsonl.gz"
    RecordingSet.from_recordings(recs).to_file(r)
    SupervisionSet.from_segments(sups).to_file(s)
    return r, s


def babble(seconds: float, seed: int, sr: int = 16000) -> np.ndarray:
    """Non-stationary test audio (150 ms harmonic segments of random pitch and loudness), so
    the encoder output, and with it a hypothesis, changes over time (a steady tone gives
    constant features)."""
    rng = np.random.default_rng(seed)
    n, seg = int(seconds * sr), int(0.15 * sr)
    parts = []
    for start in range(0, n, seg):
        t = np.arange(min(seg, n - start)) / sr
        f0 = 80 + 220 * rng.random()
        x = sum(np.sin(2 * np.pi * f0 * k * t) * rng.random() / k for k in range(1, 8))
        parts.append(x * rng.random() + 0.02 * rng.standard_normal(t.size))
    x = np.concatenate(parts)
    return (0.3 * x / np.abs(x).max()).astype(np.float32)


def epoch_rows(train_cuts: Path, train: dict) -> dict:
    """Cut id -> its padded input row, over one epoch of the trainer's batches of ``train_cuts``
    with the TrainConfig options ``train`` (noise mixed in when they name ``noise_cuts``)."""
    from lhotse import CutSet

    from zipasr.train.config import TrainConfig
    from zipasr.train.data import load_cuts, make_train_loader

    cfg = TrainConfig.from_dict(train)
    noise = CutSet.from_file(cfg.noise_cuts) if cfg.noise_cuts else None
    loader, sampler, _ = make_train_loader(load_cuts([train_cuts]), cfg, noise_cuts=noise)
    sampler.set_epoch(0)
    rows = {}
    for batch in loader:
        sup = batch["supervisions"]
        for cut, i in zip(sup["cut"], sup["sequence_idx"].tolist(), strict=True):
            rows[cut.id] = batch["inputs"][i]
    return rows


def peaky_search_model(vocab_size: int = 6, seed: int = 0, causal: bool = False):
    """A random xs model (eval mode) whose joiner is 'peaky' enough that searches emit a mix of
    blanks and tokens and depend on the decoder context (a fresh init is nearly uniform)."""
    import torch

    from zipasr.model import Transducer

    torch.manual_seed(seed)
    m = Transducer.from_preset("xs", vocab_size=vocab_size, causal=causal).eval()
    with torch.no_grad():
        m.joiner.output_linear.weight.normal_(0, 1.5)
        m.joiner.output_linear.bias.zero_()
        m.joiner.output_linear.bias[0] = 1.0
        m.joiner.decoder_proj.weight.mul_(4)
    return m
