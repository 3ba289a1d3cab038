"""``zipasr train-lm`` on tiny manifests: the outputs, training text only (validation text never
enters either LM), MLflow tracking of the run, and a run whose tracking server is away."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from zipasr.cli import main
from zipasr.lm.bigram import parse_arpa, read_arpa
from zipasr.lm.model import load_rnn_lm
from zipasr.track.spec import ENV, TrackingSpec

WORDS = "RED GREEN BLUE CAT DOG BIRD RUNS SLEEPS SINGS THE A BIG SMALL".split()


def _texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6))) for _ in range(n)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    from lhotse import SupervisionSegment, SupervisionSet

    from zipasr.lang.bpe import train_bpe

    root = tmp_path_factory.mktemp("lmcorpus")
    texts = {"train": _texts(40, 0), "dev": _texts(10, 1)}
    paths = {}
    for part, lines in texts.items():
        paths[part] = root / f"sups_{part}.jsonl.gz"
        SupervisionSet.from_segments([
            SupervisionSegment(id=f"{part}-{i}", recording_id=f"{part}-{i}", start=0.0,
                               duration=1.0, text=t) for i, t in enumerate(lines)
        ]).to_file(paths[part])
    (root / "train.txt").write_text("\n".join(texts["train"]) + "\n")
    bpe = train_bpe(root / "train.txt", root / "lang", 30)
    return {"texts": texts, "paths": paths, "bpe": bpe}


def _argv(corpus: dict, out: Path, *extra: str) -> list[str]:
    return ["train-lm", "--supervisions", str(corpus["paths"]["train"]),
            "--valid-supervisions", str(corpus["paths"]["dev"]), "--bpe-model",
            str(corpus["bpe"]), "--out-dir", str(out), "--embedding-dim", "8", "--hidden-dim",
            "8", "--num-layers", "1", "--num-epochs", "2", "--max-tokens", "100", *extra]


def _pairs(sentences: list[list[int]], pieces: list[str]) -> set[tuple[str, str]]:
    out = set()
    for s in sentences:
        words = ["<s>", *(pieces[t] for t in s), "</s>"]
        out |= set(zip(words[:-1], words[1:], strict=False))
    return out


def test_trains_on_training_text_only_and_is_tracked(corpus: dict, tmp_path: Path,
                                                    monkeypatch) -> None:
    import sentencepiece as spm
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)  # local MLflow artifacts go to ./mlruns
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = TrackingSpec(enabled=True, uri=uri, experiment="lm-test", metrics_interval=4)
    monkeypatch.setenv(ENV, spec.to_env())
    out = tmp_path / "lm"
    assert main(_argv(corpus, out)) == 0

    sp = spm.SentencePieceProcessor(model_file=str(corpus["bpe"]))
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    train = [sp.encode(t) for t in corpus["texts"]["train"]]
    dev = [sp.encode(t) for t in corpus["texts"]["dev"]]
    train_pairs, dev_pairs = _pairs(train, pieces), _pairs(dev, pieces)
    assert dev_pairs - train_pairs  # the dev text has bigrams of its own: a leak would show
    summary = json.loads((out / "lm-summary.json").read_text())
    assert summary["num_train_sentences"] == 40 and summary["num_valid_sentences"] == 10
    assert summary["num_train_tokens"] == sum(map(len, train))
    assert summary["num_valid_tokens"] == sum(map(len, dev))
    # the bigram lists exactly the training text's token pairs
    assert set(parse_arpa(out / "bigram.arpa").bigrams) == train_pairs
    assert [r["epoch"] for r in summary["per_epoch"]] == [1, 2]
    assert summary["bigram"]["valid_ppl"] > summary["bigram"]["train_ppl"] > 1

    lm = read_arpa(out / "bigram.arpa", corpus["bpe"])
    assert lm.vocab_size == sp.get_piece_size() and lm.log_probs[:, 2:].isfinite().all()
    model = load_rnn_lm(out / "lm.pt")
    log_probs, _ = model.start(2)
    assert log_probs.shape == (2, sp.get_piece_size())
    assert torch.allclose(log_probs.exp().sum(-1), torch.ones(2))

    # tracked as zipasr train is: params, a record per epoch, the final figures, the files
    run_id = json.loads((out / "mlflow-run.json").read_text())["run_id"]
    c = MlflowClient(tracking_uri=uri)
    run = c.get_run(run_id)
    assert run.info.status == "FINISHED"
    p = run.data.params
    assert p["resolved.model.hidden_dim"] == "8" and p["resolved.train.num_epochs"] == "2"
    for key in ("valid_ppl", "train_ppl", "valid_loss", "train_loss"):
        hist = c.get_metric_history(run_id, key)  # every epoch, whatever metrics_interval says
        assert [(m.step, m.value) for m in hist] == [
            (r["epoch"], pytest.approx(r[key], rel=1e-12)) for r in summary["per_epoch"]]
    assert run.data.metrics["final.bigram_valid_ppl"] == pytest.approx(
        summary["bigram"]["valid_ppl"])
    arts = {a.path for a in c.list_artifacts(run_id, "lm")}
    assert {"lm/lm.pt", "lm/lm-summary.json", "lm/bigram.arpa"} <= arts


def test_unreachable_tracking_does_not_fail_the_run(corpus: dict, tmp_path: Path,
                                                    monkeypatch, capsys) -> None:
    spec = TrackingSpec(enabled=True, uri="http://127.0.0.1:9", experiment="lm-test")
    monkeypatch.setenv(ENV, spec.to_env())
    out = tmp_path / "lm"
    assert main(_argv(corpus, out, "--bigram-only")) == 0
    assert "MLflow tracking disabled, the run continues without it" in capsys.readouterr().err
    assert (out / "bigram.arpa").is_file() and (out / "lm-summary.json").is_file()
    assert not (out / "lm.pt").exists()
