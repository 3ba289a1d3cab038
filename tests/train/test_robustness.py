"""Training's robustness paths, driven by real bad data and real noise:

- bad batches: NaN frames in a real lhotse feature file (non-finite loss) and a truncated
  feature file (unreadable) are skipped, logged, saved with their cut ids and counted, and
  training goes on; a supervision shorter than its cut trains on its own span; features
  corrupted on disk mid-experiment give ``max_consecutive_bad_batches`` in a row, which stops
  the run with an error naming the saved batches while every file of the experiment directory
  survives and no checkpoint is written inside the streak;
- noise mixing (lhotse CutMix over a real fbank noise manifest): probability 0 changes nothing,
  1 changes every utterance, 0.5 some, each mixed utterance at an SNR inside the configured
  range (measured from the features' energies), and a short training run with noise works;
- bf16 autocast on CPU trains with finite losses, keeps float32 weights and resumes; fp16 on
  CPU is refused with a clear error.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import build_tiny_corpus, epoch_rows, write_tone

from zipasr.errors import ZipasrError
from zipasr.train.config import TrainConfig
from zipasr.train.data import load_cuts
from zipasr.train.trainer import Trainer

TRAIN = {"num_epochs": 1, "max_duration": 5, "num_buckets": 2, "num_workers": 0,
         "log_interval": 1, "save_every_n": 2, "average_period": 2, "keep_last_k": 3,
         "lr_batches": 20, "lr_epochs": 1, "warm_step": 10, "min_cut_duration": 0.5,
         "device": "cpu"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    return build_tiny_corpus(tmp_path_factory.mktemp("corpus"), 24)


def _trainer(corpus: dict[str, Path], exp: Path, train_cuts: Path | None = None,
             cls: type[Trainer] = Trainer, **train) -> Trainer:
    return cls(TrainConfig.from_dict({**TRAIN, **train}), {"preset": "xs"},
               train_cuts=[train_cuts or corpus["train"]], valid_cuts=[corpus["dev"]],
               bpe_model=corpus["bpe"], exp_dir=exp, progress=False)


def _metrics(exp: Path) -> list[dict]:
    return [json.loads(x) for x in (exp / "metrics.jsonl").read_text().splitlines()]


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _all_finite(state: dict[str, torch.Tensor]) -> bool:
    return all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())


# -- bad batches -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_run(corpus, tmp_path_factory) -> dict:
    """One epoch over the tiny corpus plus three odd cuts, all features in numpy files (one file
    per cut, so a test can corrupt them on disk later): ``nan0`` is train0 with a NaN frame
    (lilcom refuses NaN, a numpy-files or HDF5 feature store keeps it), ``trunc0`` train1 with
    its feature file cut short on disk (a partial copy), ``long0`` a 2 s recording whose
    supervision covers its first second only (speech followed by silence outside the
    transcript), which is not bad: training cuts it down to its supervision."""
    from lhotse import CutSet, Fbank, Recording, SupervisionSegment
    from lhotse.features.io import NumpyFilesWriter
    from lhotse.utils import fastcopy

    root = tmp_path_factory.mktemp("bad")
    cuts = []
    with NumpyFilesWriter(root / "feats") as w:
        def store(cut, feats, cut_id=None):
            key = w.write(cut_id or cut.id, feats)
            return fastcopy(cut, id=cut_id or cut.id, features=fastcopy(
                cut.features, storage_type=w.name, storage_path=str(w.storage_path),
                storage_key=key))

        for c in CutSet.from_file(corpus["train"]):
            cuts.append(store(c, c.load_features()))
        nan = cuts[0].load_features().copy()
        nan[10] = np.nan
        cuts.append(store(cuts[0], nan, "nan0"))
        cuts.append(store(cuts[1], cuts[1].load_features(), "trunc0"))
        trunc = Path(cuts[-1].features.storage_path) / cuts[-1].features.storage_key
        write_tone(root / "long0.flac", 2.0, seed=77, fmt="FLAC")
        long0 = Recording.from_file(root / "long0.flac", recording_id="long0").to_cut()
        long0 = long0.compute_and_store_features(Fbank(), w)
        cuts.append(fastcopy(long0, id="long0", supervisions=[SupervisionSegment(
            id="long0", recording_id="long0", start=0.0, duration=1.0, text="ONE TWO")]))
    trunc.write_bytes(trunc.read_bytes()[: trunc.stat().st_size // 2])
    manifest = root / "cuts_bad.jsonl.gz"
    CutSet.from_cuts(cuts).to_file(manifest)

    exp = root / "exp"
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("zipasr.train.trainer")
    logger.addHandler(handler)
    try:
        summary = _trainer(corpus, exp, manifest).run()
    finally:
        logger.removeHandler(handler)
    return {"exp": exp, "manifest": manifest, "feats": root / "feats", "summary": summary,
            "trunc": trunc,
            "warnings": [r.getMessage() for r in records if r.levelno == logging.WARNING]}


def test_bad_batches_are_skipped_saved_and_counted(bad_run) -> None:
    exp, summary = bad_run["exp"], bad_run["summary"]
    saved = {int(p.stem.split("-")[1]): torch.load(p, weights_only=False)
             for p in (exp / "bad-batches").glob("batch-*.pt")}
    assert summary["bad_batches"] == len(saved) >= 2
    whys = [b["why"] for b in saved.values()]
    assert any(w.startswith("non-finite loss") for w in whys), whys
    assert any(w.startswith("ValueError: unreadable input") for w in whys), whys
    for n, b in saved.items():
        # each saved batch holds a bad cut, and what is needed to replay it (an unreadable
        # batch: its cut ids)
        assert {"nan0", "trunc0"} & set(b["cut_ids"]), (n, b["cut_ids"])
        assert "long0" not in b["cut_ids"]
        if "trunc0" in b["cut_ids"]:
            assert "inputs" not in b and "unreadable" in b["why"]
        else:
            assert b["inputs"].shape[0] == len(b["cut_ids"]) == len(b["text"])
            assert ("nan0" in b["cut_ids"]) == bool(torch.isnan(b["inputs"]).any())
        assert any(f"batch {n} skipped" in m and f"batch-{n}.pt" in m
                   for m in bad_run["warnings"]), bad_run["warnings"]
    # training went on past them: every other batch trained (log_interval 1), up to the end
    trained = [r["batch"] for r in _metrics(exp) if "loss" in r]
    assert sorted(trained + list(saved)) == list(range(1, summary["batch_idx_train"] + 1))
    assert max(trained) > min(saved)
    assert all(math.isfinite(r["loss"]) for r in _metrics(exp) if "loss" in r)
    final = torch.load(exp / "epoch-1.pt", weights_only=False)
    assert _all_finite(final["model"]) and _all_finite(final["model_avg"])
    assert math.isfinite(summary["valid_loss"])


def test_bad_batches_in_a_row_stop_the_run_and_lose_nothing(corpus, bad_run, tmp_path) -> None:
    import shutil

    exp = tmp_path / "exp"
    shutil.copytree(bad_run["exp"], exp)
    before = {p.relative_to(exp): _md5(p) for p in exp.rglob("*") if p.is_file()}
    # The disk under the feature store goes bad between epochs: every stored matrix is now NaN.
    # The manifest is unchanged, so the run resumes from epoch-1.pt, then finds nothing usable.
    for f in bad_run["feats"].rglob("*.npy"):
        if f == bad_run["trunc"]:
            continue
        np.save(f, np.full_like(np.load(f), np.nan))
    with pytest.raises(ZipasrError, match="3 bad batches in a row") as err:
        _trainer(corpus, exp, bad_run["manifest"], num_epochs=2,
                 max_consecutive_bad_batches=3).run()
    assert str(exp / "bad-batches") in str(err.value)
    after = {p.relative_to(exp): _md5(p) for p in exp.rglob("*") if p.is_file()}
    # Every file of the first run is still there, unchanged: epoch checkpoint, metrics, the
    # earlier bad batches, fingerprint. No batch checkpoint is written inside the streak (one
    # falls due at every second batch): the newest checkpoint is one to trust.
    kept = {k: v for k, v in before.items()
            if not k.name.startswith("checkpoint-") and k.name != "latest"}
    assert {k: after.get(k) for k in kept} == kept
    assert not (exp / "epoch-2.pt").exists()
    b1 = torch.load(exp / "epoch-1.pt", weights_only=False)
    new = sorted(int(p.stem.split("-")[1]) for p in after if p not in before
                 and p.parent.name == "bad-batches")
    assert new == [b1["batch_idx_train"] + i for i in (1, 2, 3)]  # three in a row, then stop
    for p in exp.glob("checkpoint-*.pt"):
        ck = torch.load(p, weights_only=False)
        assert _all_finite(ck["model"]) and _all_finite(ck["model_avg"]), p
        assert ck["batch_idx_train"] <= b1["batch_idx_train"], p
    assert len(list(exp.glob("checkpoint-*.pt"))) <= TRAIN["keep_last_k"]


# -- noise mixing ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def noise_cuts(tmp_path_factory) -> Path:
    """Three 3 s noise recordings (white, and two coloured) with 80-bin fbank, as a MUSAN
    cut manifest is: recordings with features, no supervisions."""
    import soundfile as sf
    from lhotse import CutSet, Fbank, Recording
    from lhotse.features.io import LilcomChunkyWriter

    root = tmp_path_factory.mktemp("noise")
    rng = np.random.default_rng(5)
    recs = []
    for i, colour in enumerate((0.0, 0.6, 0.95)):
        x = rng.standard_normal(48000)
        for t in range(1, x.size):  # one-pole low-pass: white, pinkish, brown-ish
            x[t] += colour * x[t - 1]
        sf.write(str(root / f"noise{i}.wav"), (0.1 * x / np.abs(x).max()).astype(np.float32),
                 16000, subtype="PCM_16")
        recs.append(Recording.from_file(root / f"noise{i}.wav", recording_id=f"noise{i}"))
    cuts = CutSet.from_cuts(r.to_cut() for r in recs).compute_and_store_features(
        Fbank(), root / "feats", storage_type=LilcomChunkyWriter)
    cuts.to_file(root / "noise_cuts.jsonl.gz")
    return root / "noise_cuts.jsonl.gz"


def _rows(corpus, **train) -> dict[str, torch.Tensor]:
    """Cut id -> its padded input row, over one epoch of training batches (no SpecAugment, so
    noise is the only augmentation)."""
    return epoch_rows(corpus["train"], {**TRAIN, "spec_augment": False, **train})


def _snr_db(clean: torch.Tensor, mixed: torch.Tensor) -> float:
    """SNR from fbank energies, as lhotse defines it for mixing features: the clean cut's energy
    (sum of exp(log-mel)) over the energy the mix added (its whole row: CutMix pads every mixed
    cut with noise to the batch's longest cut)."""
    e_clean = clean.double().exp().sum()
    e_added = mixed.double().exp().sum() - e_clean
    return float(10 * torch.log10(e_clean / e_added))


def test_noise_mixing_probability_and_snr(corpus, noise_cuts) -> None:
    clean = _rows(corpus)
    assert len(clean) >= 16
    noise = {"noise_cuts": str(noise_cuts), "noise_snr": [5.0, 15.0]}
    never = _rows(corpus, **noise, noise_prob=0.0)
    assert never.keys() == clean.keys()
    assert all(torch.equal(never[k], clean[k]) for k in clean)

    always = _rows(corpus, **noise, noise_prob=1.0)
    assert always.keys() == clean.keys()
    snrs = []
    for k, row in always.items():
        assert not torch.equal(row, clean[k]), f"{k} was not mixed at noise_prob 1"
        snrs.append(_snr_db(clean[k], row))
    assert all(5.0 - 0.05 <= s <= 15.0 + 0.05 for s in snrs), snrs
    assert max(snrs) - min(snrs) > 3.0, snrs  # drawn per utterance from the range
    # mixing only adds energy: no feature of a mixed row is below the clean one
    assert all((always[k] >= clean[k] - 1e-3).all() for k in clean)

    half = _rows(corpus, **noise, noise_prob=0.5)
    mixed = [k for k in clean if not torch.equal(half[k], clean[k])]
    assert 0.2 * len(clean) <= len(mixed) <= 0.8 * len(clean), len(mixed)
    assert all(5.0 - 0.05 <= _snr_db(clean[k], half[k]) <= 15.0 + 0.05 for k in mixed)


def test_training_with_noise(corpus, noise_cuts, tmp_path: Path) -> None:
    # one DataLoader worker: the noise manifest and CutMix travel to the worker process
    summary = _trainer(corpus, tmp_path / "exp", noise_cuts=str(noise_cuts), noise_prob=0.5,
                       num_workers=1).run()
    assert summary["bad_batches"] == 0 and summary["batch_idx_train"] >= 4
    losses = [r["loss"] for r in _metrics(tmp_path / "exp") if "loss" in r]
    assert len(losses) == summary["batch_idx_train"]
    assert all(math.isfinite(x) for x in losses) and math.isfinite(summary["valid_loss"])


# -- precision ---------------------------------------------------------------------------


class _DtypeProbe(Trainer):
    """Records the output dtypes of a Conv-Embed matmul and of the joiner (forward hooks)."""

    def _new_state(self):
        state = super()._new_state()
        self.seen: set[tuple[str, torch.dtype]] = set()
        for name, mod in (("embed.out", state.model.encoder_embed.out),
                          ("joiner", state.model.joiner)):
            mod.register_forward_hook(
                lambda m, args, out, name=name: self.seen.add((name, out.dtype)))
        return state


@pytest.mark.parametrize("setting,native,expected", [
    (True, False, torch.bfloat16), ("auto", True, torch.bfloat16), ("auto", False, torch.float32),
    (False, True, torch.float32)])
def test_joiner_bf16_setting(corpus, tmp_path: Path, monkeypatch, setting, native,
                             expected) -> None:
    """train.joiner_bf16: only the joiner in bf16; "auto" follows the CPU's bf16 support."""
    from lhotse import CutSet

    from zipasr.train import trainer as trainer_mod

    monkeypatch.setattr(trainer_mod, "native_bf16", lambda device: native)
    small = tmp_path / "cuts_small.jsonl.gz"
    CutSet.from_file(corpus["train"]).subset(first=6).to_file(small)
    t = _trainer(corpus, tmp_path / "exp", small, cls=_DtypeProbe, joiner_bf16=setting,
                 save_every_n=0)
    summary = t.run()
    assert summary["batch_idx_train"] > 0
    assert t.seen == {("embed.out", torch.float32), ("joiner", expected)}
    # the summary records what ran, not the setting (zipasr.train.numerics)
    assert summary["numerics"]["joiner_bf16"] is (expected == torch.bfloat16)
    assert summary["numerics"]["joiner_bf16_setting"] == str(setting)
    assert all(math.isfinite(r["loss"]) for r in _metrics(tmp_path / "exp") if "loss" in r)


def test_joiner_bf16_typo_is_refused() -> None:
    with pytest.raises(ZipasrError, match="joiner_bf16 must be true, false or auto"):
        TrainConfig.from_dict({**TRAIN, "joiner_bf16": "yes"})


def test_bf16_on_cpu_trains_and_resumes(corpus, tmp_path: Path) -> None:
    from lhotse import CutSet

    # half the corpus: bf16 matmuls are slow on CPUs without bf16 units
    half = tmp_path / "cuts_half.jsonl.gz"
    CutSet.from_file(corpus["train"]).subset(first=12).to_file(half)
    exp = tmp_path / "exp"
    first = _trainer(corpus, exp, half, cls=_DtypeProbe, precision="bf16", save_every_n=0)
    s1 = first.run()
    assert first.seen == {("embed.out", torch.bfloat16), ("joiner", torch.bfloat16)}
    ck = torch.load(exp / "epoch-1.pt", weights_only=False)
    assert {t.dtype for t in ck["model"].values() if t.is_floating_point()} == {torch.float32}
    assert {t.dtype for t in ck["model_avg"].values() if t.is_floating_point()} == {
        torch.float64}
    s2 = _trainer(corpus, exp, half, precision="bf16", save_every_n=0, num_epochs=2).run()
    assert s2["resumed"] and s2["batch_idx_train"] > s1["batch_idx_train"]
    losses = [r["loss"] for r in _metrics(exp) if "loss" in r]
    assert len(losses) == s2["batch_idx_train"]
    assert all(math.isfinite(x) for x in losses)
    assert all(math.isfinite(r["valid_loss"]) for r in _metrics(exp) if "valid_loss" in r)
    ck2 = torch.load(exp / "epoch-2.pt", weights_only=False)
    assert {t.dtype for t in ck2["model"].values() if t.is_floating_point()} == {torch.float32}
    assert _all_finite(ck2["model"])


def test_fp16_on_cpu_is_refused(corpus, tmp_path: Path) -> None:
    with pytest.raises(ZipasrError, match="fp16 needs a CUDA device; use bf16 on CPU"):
        _trainer(corpus, tmp_path / "exp", precision="fp16").run()
    assert not (tmp_path / "exp").exists()


# -- cuts whose supervision is not the whole cut -------------------------------------------


def test_cuts_are_cut_down_to_their_supervisions(corpus) -> None:
    """A cut's transcript must describe exactly the features the model reads: a supervision
    inside a longer cut gives a cut of its span, several give one cut each, and a cut with no
    supervision or an empty transcript is dropped (checked against slices of the full cut's
    own features)."""
    import sentencepiece as spm
    from lhotse import SupervisionSegment
    from lhotse.utils import fastcopy

    from zipasr.train.data import filter_cuts

    sp = spm.SentencePieceProcessor(model_file=str(corpus["bpe"]))
    base = max(load_cuts([corpus["train"]]), key=lambda c: c.duration)
    full, d = base.load_features(), base.duration

    def sup(i, start, dur, text="ONE TWO"):
        return SupervisionSegment(id=f"s{i}", recording_id=base.recording_id,
                                  start=start, duration=dur, text=text)

    # on whole frames (10 ms), so the expected slice does not depend on rounding rules
    spans = {k: (round(a * d, 2), round(b * d, 2))
             for k, (a, b) in {"inner": (0.25, 0.5), "two-0": (0.0, 0.4),
                               "two-1": (0.5, 0.45)}.items()}
    inner = fastcopy(base, id="inner", supervisions=[sup(0, *spans["inner"])])
    two = fastcopy(base, id="two", supervisions=[sup(1, *spans["two-0"]), sup(2, *spans["two-1"])])
    bare = fastcopy(base, id="bare", supervisions=[])
    empty = fastcopy(base, id="empty", supervisions=[sup(3, 0.0, base.duration, " ")])
    kept, dropped = filter_cuts([base, inner, two, bare, empty], sp, 0.0, 20.0)
    by_id = {c.id: c for c in kept}
    assert sorted(by_id) == sorted([base.id, "inner", "two-0", "two-1"])
    assert dropped == 2
    assert by_id[base.id] is base  # a cut its supervision spans is kept as it is
    for cid, (start, dur) in spans.items():
        c = by_id[cid]
        assert c.duration == pytest.approx(dur)
        assert len(c.supervisions) == 1 and c.supervisions[0].start == pytest.approx(0.0)
        assert c.supervisions[0].duration == pytest.approx(dur)
        i0 = round(start / base.frame_shift)
        np.testing.assert_array_equal(c.load_features(), full[i0:i0 + c.num_frames])
