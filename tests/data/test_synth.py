"""The espeak-ng synthetic corpus: determinism, held-out voices, manifests, errors."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from zipasr.data.synth import corpus as synth
from zipasr.data.synth.corpus import (
    ACCENTS,
    PITCH_RANGE,
    RATE_RANGE,
    SPLITS,
    VARIANTS,
    EspeakError,
    VoiceError,
    plan_corpus,
    split_voices,
    synthesize_corpus,
)
from zipasr.errors import ZipasrError

CLEAN = re.compile(r"^[A-Z']+( [A-Z']+)*$")
SIZES = {"num_train": 20, "num_dev": 6, "num_test": 6}


@contextlib.contextmanager
def _cwd(path: Path):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def _build(root: Path, num_jobs: int) -> dict[str, dict[str, Path]]:
    """A tiny corpus under ``root`` with relative paths (as Snakemake rules use them)."""
    root.mkdir(parents=True, exist_ok=True)
    with _cwd(root), pytest.MonkeyPatch.context() as mp:
        mp.setattr(synth, "SHARD_SIZE", 7)  # several shards per split, to test sharding
        return synthesize_corpus(Path("audio"), Path("manifests"), seed=5, num_jobs=num_jobs,
                                 progress=False, **SIZES)


def _md5s(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "a"
    _build(root, num_jobs=1)
    return root


def _load(root: Path, split: str):
    from lhotse import load_manifest

    with _cwd(root):
        recs = load_manifest(f"manifests/synth_recordings_{split}.jsonl.gz")
        sups = load_manifest(f"manifests/synth_supervisions_{split}.jsonl.gz")
    return recs, sups


def test_byte_identical_across_num_jobs(corpus, tmp_path):
    other = tmp_path / "b"
    _build(other, num_jobs=3)
    a, b = _md5s(corpus), _md5s(other)
    assert len([k for k in a if k.endswith(".flac")]) == sum(SIZES.values())
    assert a == b


def test_manifests_load_and_match_audio(corpus):
    from lhotse.qa import validate_recordings_and_supervisions

    for split, n in zip(SPLITS, SIZES.values(), strict=True):
        recs, sups = _load(corpus, split)
        assert len(recs) == len(sups) == n
        validate_recordings_and_supervisions(recs, sups)
        for rec in recs:
            path = corpus / rec.sources[0].source
            info = sf.info(path)
            assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
            assert info.format == "FLAC" and path.parent.name == split
            assert info.frames == rec.num_samples
            assert rec.sampling_rate == 16000
            assert rec.duration == pytest.approx(info.frames / 16000)
            sup = sups[rec.id]
            assert (sup.start, sup.duration) == (0.0, rec.duration)
            x, _ = sf.read(path, dtype="float32")
            assert 0.3 < len(x) / 16000 < 15
            assert np.sqrt(np.mean(x**2)) > 0.01  # not silent


def test_supervisions(corpus):
    seen_text = set()
    for split in SPLITS:
        _, sups = _load(corpus, split)
        for s in sups:
            assert CLEAN.match(s.text), s.text
            assert 3 <= len(s.text.split()) <= 15
            assert s.text not in seen_text  # no sentence repeats across splits
            seen_text.add(s.text)
            assert s.language == "English"
            assert s.speaker == f"{s.custom['accent']}+{s.custom['variant']}"
            assert s.custom["accent"] in ACCENTS and s.custom["variant"] in VARIANTS
            assert RATE_RANGE[0] <= s.custom["rate"] <= RATE_RANGE[1]
            assert PITCH_RANGE[0] <= s.custom["pitch"] <= PITCH_RANGE[1]


def test_heldout_voices_never_in_training(corpus):
    speakers = {split: {s.speaker for s in _load(corpus, split)[1]} for split in SPLITS}
    assert not speakers["train"] & speakers["dev"]
    assert not speakers["train"] & speakers["test"]
    for seed in range(3):
        v = {k: {p.id for p in ps} for k, ps in split_voices(seed).items()}
        assert not v["train"] & v["dev"] and not v["train"] & v["test"]
        assert not v["dev"] & v["test"]
        assert len(v["dev"]) >= 20 and len(v["test"]) >= 20
        train = split_voices(seed)["train"]
        assert {p.accent for p in train} == set(ACCENTS)  # every accent and variant is
        assert {p.variant for p in train} == set(VARIANTS)  # still learned from, in pairs
    plan = plan_corpus(seed=0, num_train=300, num_dev=100, num_test=100)
    used = {split: {u.voice for u in utts} for split, utts in plan.items()}
    assert not used["train"] & (used["dev"] | used["test"])


def test_plan_is_deterministic():
    a = plan_corpus(seed=1, num_train=50, num_dev=10, num_test=10)
    assert a == plan_corpus(seed=1, num_train=50, num_dev=10, num_test=10)
    assert a != plan_corpus(seed=2, num_train=50, num_dev=10, num_test=10)
    assert [u.id for u in a["dev"]][:2] == ["synth-dev-00000", "synth-dev-00001"]


def test_rerun_reuses_complete_shards(corpus, tmp_path):
    before = {p: p.stat().st_mtime_ns for p in (corpus / "audio").rglob("*.flac")}
    md5 = _md5s(corpus)
    _build(corpus, num_jobs=2)
    assert {p: p.stat().st_mtime_ns for p in (corpus / "audio").rglob("*.flac")} == before
    assert _md5s(corpus) == md5


def test_interrupted_build_leaves_no_manifest(tmp_path, monkeypatch):
    stale = tmp_path / "manifests" / "synth_recordings_train.jsonl.gz"
    stale.parent.mkdir()
    stale.write_bytes(b"old")

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(synth, "_run_shard", boom)
    with pytest.raises(KeyboardInterrupt):
        synthesize_corpus(tmp_path / "audio", tmp_path / "manifests", progress=False, **SIZES)
    assert not list((tmp_path / "manifests").iterdir())


def test_unknown_voice_is_named(tmp_path):
    with pytest.raises(VoiceError, match="'nosuchvoice'"):
        synthesize_corpus(tmp_path, tmp_path, variants=["m1", "nosuchvoice"], progress=False)
    with pytest.raises(VoiceError, match="'en-gb'"):  # rejected by espeak-ng 1.52 ("en" is)
        synthesize_corpus(tmp_path, tmp_path, accents=["en-us", "en-gb"], progress=False)
    assert issubclass(VoiceError, ZipasrError)
    assert not list(tmp_path.iterdir())  # nothing written before the check


def test_espeak_load_errors_say_how_to_fix(monkeypatch):
    monkeypatch.setattr(synth, "_espeak_paths", lambda: ("/nonexistent/libespeak-ng.so", "/x"))
    with pytest.raises(EspeakError, match="pip install espeakng-loader"):
        synth.Espeak()
    monkeypatch.undo()
    monkeypatch.setitem(sys.modules, "espeakng_loader", None)  # import fails
    with pytest.raises(EspeakError, match="pip install espeakng-loader"):
        synth.Espeak()


def test_resampling_is_reproducible_for_long_audio():
    # soxr's int16 path dithers, and its tail on inputs over 2**16 samples varied with heap
    # state; the float path must give the same bytes whatever was allocated before.
    t = np.arange(100_000)
    x = (8000 * np.sin(t * 0.05) * np.sin(t * 0.0003)).astype(np.int16)
    rng = np.random.default_rng(0)
    outs = set()
    for _ in range(8):
        junk = [rng.integers(-30000, 30000, size=int(rng.integers(1000, 300_000)),
                             dtype=np.int16).tobytes() for _ in range(10)]
        del junk
        y = synth._resample(np.frombuffer(bytes(x.tobytes()), dtype=np.int16), 16000)
        outs.add(hashlib.md5(y.tobytes()).hexdigest())
    assert len(outs) == 1
    assert y.dtype == np.int16 and abs(len(y) - len(x) * 16000 / 22050) <= 1
