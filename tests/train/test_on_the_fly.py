"""On-the-fly features: ``zipasr fbank --no-features`` writes cuts with their audio only
(speed-perturbed copies included) and the training loader computes their fbank.

* The loader's features equal what the data stage stores, for the same cuts, speed-perturbed
  ones included: exactly when stored losslessly (lhotse's NumpyFilesWriter), and within
  lilcom's quantisation error (half of its step 2^-5) when compared to the DAG's lilcom store.
* The real Trainer trains a few steps of the xs model from such cuts
  (``on_the_fly_features``), validating on cuts with stored features; cuts without features
  and no ``on_the_fly_features`` stop it at once with a message naming the option.
* The DAG (a dry run): with ``features.on_the_fly`` the train part's fbank job writes no
  features and the train job computes them with the config's options; dev and test keep
  theirs; without it the commands are the ones before (no ``--no-features``, no option).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import ROOT, build_tiny_corpus, snakemake

from zipasr.data.fbank import FbankOptions, compute_fbank, fbank_extractor
from zipasr.errors import ZipasrError
from zipasr.train.config import TrainConfig

LILCOM_ERROR = 2.0 ** -6  # LilcomChunkyWriter's default tick_power -5: half a step
TRAIN = {"num_epochs": 1, "max_duration": 5, "num_buckets": 2, "num_workers": 0,
         "log_interval": 1, "save_every_n": 0, "average_period": 2, "lr_batches": 20,
         "lr_epochs": 1, "warm_step": 10, "min_cut_duration": 0.5, "spec_augment": False}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    """The tiny corpus (stored features) and its train part again without features, both with
    speed perturbation 0.9 and 1.1."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        root = tmp_path_factory.mktemp("otf")
        out = build_tiny_corpus(root, 8)
        recs, sups = root / "recs_train.jsonl.gz", root / "sups_train.jsonl.gz"
        sp = [0.9, 1.1]
        for name, features in (("stored", True), ("otf", False)):
            out[name] = root / f"cuts_{name}.jsonl.gz"
            out[f"{name}_summary"] = root / f"summary_{name}.json"
            compute_fbank(recs, sups, out[name], root / f"feats_{name}",
                          FbankOptions(speed_perturb=sp, features=features), progress=False,
                          summary_path=out[f"{name}_summary"])
        return out
    finally:
        torch.set_num_threads(threads)


def test_no_features_writes_audio_only_cuts(corpus) -> None:
    import json

    from lhotse import CutSet

    otf, stored = CutSet.from_file(corpus["otf"]), CutSet.from_file(corpus["stored"])
    assert list(otf.ids) == list(stored.ids)  # same cuts, same order: 8 x (1, 0.9, 1.1)
    assert len(otf) == 24 and sum("_sp0.9" in c.id for c in otf) == 8
    assert not any(c.has_features for c in otf) and all(c.has_recording for c in otf)
    for a, b in zip(otf, stored, strict=True):
        assert a.duration == pytest.approx(b.duration)
    assert list((corpus["otf"].parent / "feats_otf").iterdir()) == []  # the rule's output dir
    summary = json.loads(corpus["otf_summary"].read_text())
    assert summary["features"] == "on the fly" and summary["cuts"] == 24


def test_loader_features_equal_stored_features(corpus, tmp_path: Path) -> None:
    """The training loader's inputs (padded batch rows) for the audio-only cuts vs the same
    cuts' features computed by the data stage, stored losslessly and with lilcom."""
    from lhotse import CutSet
    from lhotse.features.io import NumpyFilesWriter

    from zipasr.train.data import make_train_loader

    torch.set_num_threads(1)
    otf = CutSet.from_file(corpus["otf"])
    extractor = fbank_extractor()
    with NumpyFilesWriter(tmp_path / "exact") as writer:  # the data stage's computation
        exact = {c.id: torch.from_numpy(c.compute_and_store_features(extractor, writer)
                                        .load_features()) for c in otf}
    lilcom = {c.id: torch.from_numpy(c.load_features())
              for c in CutSet.from_file(corpus["stored"])}

    cfg = TrainConfig.from_dict(dict(TRAIN, max_duration=3.5))
    loader, sampler, _ = make_train_loader(otf, cfg, extractor=extractor)
    sampler.set_epoch(0)
    seen = set()
    for batch in loader:
        sup = batch["supervisions"]
        for cut, i, n in zip(sup["cut"], sup["sequence_idx"].tolist(),
                             sup["num_frames"].tolist(), strict=True):
            row = batch["inputs"][i]
            assert n == exact[cut.id].shape[0] == lilcom[cut.id].shape[0]
            assert torch.equal(row[:n], exact[cut.id]), cut.id
            assert (row[:n] - lilcom[cut.id]).abs().max() <= LILCOM_ERROR * (1 + 1e-4), cut.id
            seen.add(cut.id)
    assert any("_sp0.9" in c for c in seen) and any("_sp1.1" in c for c in seen)
    assert len(seen) >= 12  # drop_last leaves some out; most are compared


def test_trainer_trains_from_on_the_fly_cuts(corpus, tmp_path: Path) -> None:
    from zipasr.train.trainer import Trainer

    def trainer(exp: Path, **kw) -> Trainer:
        return Trainer(TrainConfig.from_dict(TRAIN), {"preset": "xs"},
                       train_cuts=[corpus["otf"]], valid_cuts=[corpus["dev"]],
                       bpe_model=corpus["bpe"], exp_dir=exp, progress=False, **kw)

    torch.set_num_threads(1)
    with pytest.raises(ZipasrError, match="have no features.*--on-the-fly-features"):
        trainer(tmp_path / "refused").run()
    t = trainer(tmp_path / "exp", on_the_fly_features={"num_mel_bins": 80})
    summary = t.run()
    assert summary["batch_idx_train"] >= 3 and summary["bad_batches"] == 0
    assert summary["features_on_the_fly"] == {"num_mel_bins": 80, "frame_shift": 0.01,
                                              "dither": 0.0}
    assert summary["train_cuts"] == 24 and summary["valid_loss"] > 0
    # the loss was finite on every step, from features the loader computed
    import json

    losses = [json.loads(x)["loss"] for x in (tmp_path / "exp" / "metrics.jsonl").read_text()
              .splitlines() if "loss" in json.loads(x)]
    assert len(losses) == summary["batch_idx_train"] and all(map(torch.isfinite,
                                                                 torch.tensor(losses)))


def test_dag_wiring(workdir: Path) -> None:
    import yaml

    smoke = yaml.safe_load((ROOT / "config" / "smoke.yaml").read_text())
    smoke["tracking"] = {"enabled": False}

    def commands(features: dict) -> dict[str, str]:
        cfg = dict(smoke, features={**smoke["features"], **features})
        out = snakemake(workdir, cfg, "-n", "-p")
        lines = [ln.split("Shell command: ", 1)[1] for ln in out.stdout.splitlines()
                 if "Shell command: " in ln and ("zipasr fbank" in ln or "zipasr train" in ln)]
        return {("train" if " train " in ln else ln.split("--out-cuts ")[1].split()[0]): ln
                for ln in lines}

    otf = commands({"on_the_fly": True, "num_mel_bins": 80, "dither": 0.0})
    assert "--no-features" in otf["data/fbank/synth_cuts_train.jsonl.gz"]
    assert "--speed-perturb 0.9 1.1" in otf["data/fbank/synth_cuts_train.jsonl.gz"]
    for part in ("dev", "test"):
        assert "--no-features" not in otf[f"data/fbank/synth_cuts_{part}.jsonl.gz"]
    assert ("""--on-the-fly-features '{"dither": 0.0, "frame_shift": 0.01, "num_mel_bins": 80}'"""
            in otf["train"])
    stored = commands({})
    assert len(stored) == 4 and not any("--no-features" in c or "--on-the-fly" in c
                                        for c in stored.values())
