"""RNN-LM training: it learns, a rerun resumes (and ends bit for bit where an uninterrupted run
ends), a directory of another configuration starts afresh, lm.pt loads back."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch

from zipasr.errors import ZipasrError
from zipasr.lm.model import RnnLmConfig, load_rnn_lm
from zipasr.lm.train import LmTrainConfig, evaluate, train_lm

LM = RnnLmConfig(vocab_size=12, embedding_dim=8, hidden_dim=8, num_layers=1, tie_weights=True)


def _corpus(n: int, seed: int) -> list[list[int]]:
    """Counting runs ``k, k+1, ...`` over tokens 2..11: easy to learn, hard to guess."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        start = int(torch.randint(2, 8, (1,), generator=g))
        length = int(torch.randint(2, 5, (1,), generator=g))
        out.append([start + k for k in range(length)])
    return out


TRAIN, VALID = _corpus(48, 0), _corpus(12, 1)


def _cfg(epochs: int, **kw) -> LmTrainConfig:
    return LmTrainConfig(num_epochs=epochs, lr=0.02, max_tokens=60, **kw)


def _md5(p: Path) -> str:
    return hashlib.md5(p.read_bytes()).hexdigest()


def test_resume_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    first = train_lm(TRAIN, VALID, a, LM, _cfg(1))
    assert first["resumed_after_epoch"] == 0 and (a / "epoch-1.pt").is_file()
    epoch1 = _md5(a / "epoch-1.pt")
    resumed = train_lm(TRAIN, VALID, a, LM, _cfg(2))
    assert resumed["resumed_after_epoch"] == 1  # resumed, not restarted
    assert _md5(a / "epoch-1.pt") == epoch1
    straight = train_lm(TRAIN, VALID, b, LM, _cfg(2))
    sa = torch.load(a / "lm.pt", weights_only=True)
    sb = torch.load(b / "lm.pt", weights_only=True)
    assert sa["model"].keys() == sb["model"].keys()
    for k in sa["model"]:
        assert torch.equal(sa["model"][k], sb["model"][k]), k
    opt_a = torch.load(a / "epoch-2.pt", weights_only=False)["optimizer"]["state"]
    opt_b = torch.load(b / "epoch-2.pt", weights_only=False)["optimizer"]["state"]
    assert all(torch.equal(opt_a[i]["exp_avg_sq"], opt_b[i]["exp_avg_sq"]) for i in opt_b)
    strip = ("seconds",)
    assert [{k: v for k, v in r.items() if k not in strip} for r in resumed["per_epoch"]] == \
        [{k: v for k, v in r.items() if k not in strip} for r in straight["per_epoch"]]
    # a different training would differ (the comparison above can fail)
    other = train_lm(TRAIN, VALID, tmp_path / "c", LM, _cfg(2, seed=7))
    assert other["valid_ppl"] != straight["valid_ppl"]

    summary = json.loads((a / "lm-summary.json").read_text())
    assert summary["epochs"] == 2 and len(summary["per_epoch"]) == 2
    assert summary["num_train_sentences"] == 48
    assert summary["num_train_tokens"] == sum(map(len, TRAIN))
    assert summary["num_params"] == 12 * 8 + 2 * 4 * 8 * 8 + 2 * 4 * 8 + 12  # tied
    ckpt = torch.load(a / "epoch-2.pt", weights_only=False)
    assert {"model", "optimizer", "epoch", "rng", "lm_config", "metrics"} <= set(ckpt)
    # asking for the same number of epochs again only rewrites the outputs
    again = train_lm(TRAIN, VALID, a, LM, _cfg(2))
    assert again["resumed_after_epoch"] == 2 and again["valid_ppl"] == resumed["valid_ppl"]


def test_it_learns_and_loads_back(tmp_path: Path) -> None:
    summary = train_lm(TRAIN, VALID, tmp_path, LM, LmTrainConfig(num_epochs=8, lr=0.05,
                                                                  max_tokens=60))
    ppl = [r["valid_ppl"] for r in summary["per_epoch"]]
    # counting runs: after a token the next is nearly certain (the best possible is ~2.1: the
    # first token and the length are random); a unigram model scores ~7, uniform guessing 11
    assert ppl[-1] < ppl[0] and ppl[-1] < 3.5, ppl
    model = load_rnn_lm(tmp_path / "lm.pt")
    total, count = evaluate(model, VALID)
    assert count == sum(len(s) + 1 for s in VALID)
    assert math.exp(total / count) == pytest.approx(ppl[-1], rel=1e-5)


def test_another_configuration_starts_afresh_an_asr_directory_is_refused(tmp_path: Path
                                                                         ) -> None:
    """Another configuration or text never resumes the old checkpoints: they move to
    superseded-*/ and the run equals one in an empty directory."""
    a, fresh = tmp_path / "a", tmp_path / "fresh"
    train_lm(TRAIN, VALID, a, LM, _cfg(1))
    first = (a / "epoch-1.pt").read_bytes()
    other = LmTrainConfig(num_epochs=1, lr=0.5, max_tokens=60)
    train_lm(TRAIN, VALID, a, LM, other)
    (moved,) = a.glob("superseded-*/epoch-1.pt")
    assert moved.read_bytes() == first
    train_lm(TRAIN, VALID, fresh, LM, other)
    want = torch.load(fresh / "lm.pt")["model"]
    got = torch.load(a / "lm.pt")["model"]
    assert all(torch.equal(got[k], want[k]) for k in want)
    asr = tmp_path / "asr"
    asr.mkdir()
    torch.save({"model": {}, "optimizer": {}, "epoch": 1, "batch_idx_train": 9},
               asr / "epoch-1.pt")
    with pytest.raises(ZipasrError, match="not an LM checkpoint"):
        train_lm(TRAIN, VALID, asr, LM, _cfg(1))
    with pytest.raises(ZipasrError, match="outside the tokens"):
        train_lm([[3, 1, 4]], VALID, tmp_path / "b", LM, _cfg(1))
