"""Training data read lazily: the trainer streams its cut manifests instead of reading them whole.

* ``LazyCuts`` keeps exactly the cuts ``filter_cuts`` keeps, in the same order, over several
  manifests (cut down to their supervisions, too short/long/many-token/bare ones dropped), and
  counts a pass only when it reaches the end; its DDP shard is every world_size-th cut.
* The bucketing sampler draws the same batches from the stream as from the cuts in memory, for
  every DDP rank and epoch, and a mid-epoch skip gives the rest of the same epoch: what resume
  relies on (tests/train/test_resume.py checks resume end to end).
* Start-up reads the head of the manifest only: a manifest garbled near its end still gives
  the trainer its loaders and first batch (an eager reader fails on it).
* The training set's size (cuts, hours) is counted by the first epoch's pass, kept in the
  checkpoints, and reported in the summary from the checkpoint when a resumed run has nothing
  left to train.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch
from helpers import build_tiny_corpus

from zipasr.train.config import TrainConfig
from zipasr.train.data import LazyCuts, filter_cuts, load_cuts, make_train_loader

TRAIN = {"num_epochs": 1, "max_duration": 5, "num_buckets": 2, "num_workers": 0,
         "log_interval": 1, "save_every_n": 0, "average_period": 2, "lr_batches": 20,
         "lr_epochs": 1, "warm_step": 10, "min_cut_duration": 0.5, "spec_augment": False}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    """The tiny corpus, plus ``extra``: a manifest of cuts the filter cuts down or drops."""
    from lhotse import CutSet
    from lhotse.utils import fastcopy

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        root = tmp_path_factory.mktemp("lazy")
        out = build_tiny_corpus(root, 24)
    finally:
        torch.set_num_threads(threads)
    cuts = list(CutSet.from_file(out["train"]))
    long = max(cuts, key=lambda c: c.duration)
    sup = long.supervisions[0]
    extra = [
        fastcopy(long, id="two", supervisions=[  # two segments: two pieces
            fastcopy(sup, id="two-a", start=0.0, duration=0.55, text="ONE"),
            fastcopy(sup, id="two-b", start=0.55, duration=long.duration - 0.55)]),
        fastcopy(long, id="inner", supervisions=[fastcopy(sup, id="inner", start=0.2,
                                                          duration=0.7)]),
        fastcopy(long, id="bare", supervisions=[]),
        fastcopy(long, id="empty", supervisions=[fastcopy(sup, id="empty", text=" ")]),
        fastcopy(long, id="wordy", supervisions=[fastcopy(sup, id="wordy",
                                                          text="ONE TWO " * 40)]),
    ]
    out["extra"] = root / "cuts_extra.jsonl.gz"
    CutSet.from_cuts(extra).to_file(out["extra"])
    return out


def _sp(corpus):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(corpus["bpe"]))


def test_lazy_cuts_keep_what_filter_cuts_keeps(corpus) -> None:
    sp = _sp(corpus)
    paths = [corpus["train"], corpus["extra"]]
    eager, dropped = filter_cuts(load_cuts(paths), sp, 0.5, 20.0)
    lazy = LazyCuts(paths, sp, 0.5, 20.0)
    assert lazy.first().id == next(iter(eager)).id
    assert lazy.last_pass is None  # a partial read is not a pass
    got = list(lazy)
    assert [c.id for c in got] == [c.id for c in eager]
    assert [c.duration for c in got] == [c.duration for c in eager]
    assert {"two-0", "two-1", "inner"} <= {c.id for c in got}
    assert dropped == 3  # bare, empty, wordy
    assert lazy.last_pass == {"cuts": len(eager), "dropped": 3,
                              "hours": pytest.approx(sum(c.duration for c in eager) / 3600)}
    shards = [list(LazyCuts(paths, sp, 0.5, 20.0, shard=(r, 2))) for r in range(2)]
    assert [c.id for c in shards[1]] == [c.id for c in eager][1::2]
    assert len(shards[0]) + len(shards[1]) == len(eager)


def test_sampler_draws_the_same_batches_from_the_stream(corpus) -> None:
    from lhotse import CutSet

    sp = _sp(corpus)
    cfg = TrainConfig.from_dict(dict(TRAIN, max_duration=3.0))
    eager, _ = filter_cuts(load_cuts([corpus["train"]]), sp, 0.5, 20.0)

    def epochs(cuts, rank: int, skip: int = 0) -> list[list[list[str]]]:
        _, sampler, _ = make_train_loader(cuts, cfg, world_size=2, rank=rank)
        out = []
        for epoch in range(2):
            sampler.set_epoch(epoch, skip=skip)
            out.append([[c.id for c in batch] for batch in sampler])
        return out

    for rank in range(2):
        lazy = epochs(CutSet(LazyCuts([corpus["train"]], sp, 0.5, 20.0)), rank)
        assert lazy == epochs(eager, rank)
        assert len(lazy[0]) >= 3 and lazy[0] != lazy[1]
        resumed = epochs(CutSet(LazyCuts([corpus["train"]], sp, 0.5, 20.0)), rank, skip=2)
        assert resumed == [e[2:] for e in lazy]


def _trainer(corpus, exp: Path, train: list[Path] | None = None, **cfg):
    from zipasr.train.trainer import Trainer

    return Trainer(TrainConfig.from_dict(dict(TRAIN, **cfg)), {"preset": "xs"},
                   train_cuts=train or [corpus["train"]], valid_cuts=[corpus["dev"]],
                   bpe_model=corpus["bpe"], exp_dir=exp, progress=False)


def test_start_up_reads_the_head_of_the_manifest(corpus, tmp_path: Path) -> None:
    """12,000 cuts (the tiny corpus' cuts again and again) and a garbled line after 11,000:
    the sampler's duration-bin estimate reads 10,000 cuts, its buffer fills with 500."""
    with gzip.open(corpus["train"], "rt") as f:
        lines = [json.loads(x) for x in f]
    big = tmp_path / "cuts_big.jsonl.gz"
    with gzip.open(big, "wt") as f:
        for i in range(12_000):
            if i == 11_000:
                f.write('{"id": "garbled", "start": \n')
            f.write(json.dumps(dict(lines[i % len(lines)], id=f"c{i}")) + "\n")
    with pytest.raises(Exception):  # noqa: B017 - whatever an eager reader raises
        load_cuts([big])

    torch.set_num_threads(1)
    t = _trainer(corpus, tmp_path / "exp", train=[big], buffer_size=500)
    t._setup()
    t.state = t._new_state()
    t.state.sampler.set_epoch(0)
    batch = next(iter(t.state.train_loader))
    assert "load_error" not in batch and batch["inputs"].shape[0] >= 3
    assert t.state.train_set.last_pass is None and t.state.train_stats is None  # not counted yet


def test_data_size_counted_by_the_first_pass_and_kept(corpus, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    eager, dropped = filter_cuts(load_cuts([corpus["train"]]), _sp(corpus), 0.5, 20.0)
    hours = sum(c.duration for c in eager) / 3600
    t = _trainer(corpus, tmp_path / "exp")
    summary = t.run()
    assert summary["train_cuts"] == len(eager) and summary["train_hours"] == round(hours, 4)
    ckpt = torch.load(tmp_path / "exp" / "epoch-1.pt", weights_only=False)
    assert ckpt["train_data"] == {"cuts": len(eager), "hours": pytest.approx(hours),
                                  "dropped": dropped, "batches": summary["batch_idx_train"]}
    # nothing left to train: the size comes from the checkpoint (marked here to tell)
    ckpt["train_data"]["cuts"] = 999
    torch.save(ckpt, tmp_path / "exp" / "epoch-1.pt")
    resumed = _trainer(corpus, tmp_path / "exp").run()
    assert resumed["resumed"] and resumed["batch_idx_train"] == summary["batch_idx_train"]
    assert (resumed["train_cuts"], resumed["train_hours"]) == (999, round(hours, 4))


def test_token_bound_is_never_below_the_encoding(corpus) -> None:
    """The filter's shortcut (``token_bound``): for ASCII text, at least as many as sentencepiece
    gives, whatever the characters (pieces unknown to the model, punctuation, odd spacing)."""
    import random

    from zipasr.train.data import token_bound

    sp = _sp(corpus)
    bound = token_bound(sp)
    rng = random.Random(0)
    alphabet = "ONETWHRFIVSXG" * 3 + "abcxyz0123456789'.,;:-!?()\t  "
    texts = ["ONE", " ONE  TWO ", "~" * 30, "\t", "A B C D E F G H"]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60)))
              for _ in range(2000)]
    assert all(len(sp.encode(t)) <= bound(t) for t in texts)
    assert max(bound(t) - len(sp.encode(t)) for t in texts) > 0
    assert bound("ÉTÉ") is None  # not ASCII: encoded
