"""Resuming past a bad newest checkpoint: a truncated, garbled, key-less or missing newest file
makes training continue from the previous good one, with a warning naming the file, set the bad
file aside as ``<name>.corrupt`` and end bit-identical to an uninterrupted run; when no
checkpoint is usable training stops with an error naming them and changes nothing. Plus the
candidate order of ``checkpoint.resume`` on small hand-made files."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import random
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import build_tiny_corpus

from zipasr.errors import ZipasrError
from zipasr.train import checkpoint as ckpt
from zipasr.train.config import TrainConfig
from zipasr.train.trainer import Trainer, native_bf16

# one epoch, a checkpoint every 2 batches, the 2 newest kept; the joiner's precision follows
# the CPU (auto), as in the default config
TRAIN = {"num_epochs": 1, "max_duration": 5, "num_buckets": 2, "num_workers": 0,
         "log_interval": 1, "save_every_n": 2, "average_period": 2, "keep_last_k": 2,
         "lr_batches": 20, "lr_epochs": 1, "warm_step": 10, "min_cut_duration": 0.5,
         "device": "cpu", "joiner_bf16": "auto"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    return build_tiny_corpus(tmp_path_factory.mktemp("corpus"), 24)


def _trainer(corpus: dict[str, Path], exp: Path) -> Trainer:
    return Trainer(TrainConfig.from_dict(TRAIN), {"preset": "xs"},
                   train_cuts=[corpus["train"]], valid_cuts=[corpus["dev"]],
                   bpe_model=corpus["bpe"], exp_dir=exp, progress=False)


@contextlib.contextmanager
def _log_records() -> Iterator[list[logging.LogRecord]]:
    """zipasr's log records at INFO and above while the block runs."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    logger = logging.getLogger("zipasr")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _batches(exp: Path) -> list[int]:
    return [b for b, _ in ckpt.list_checkpoints(exp, "checkpoint")]


def _md5s(exp: Path) -> dict[str, str]:
    return {p.name: hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(exp.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory) -> dict[str, Any]:
    """An uninterrupted one-epoch run (its final state is what every resume must reach) and,
    from its files, the experiment directory of a run killed right after its newest batch
    checkpoint: epoch-1.pt removed, ``latest`` naming checkpoint-<newest>.pt."""
    root = tmp_path_factory.mktemp("fallback")
    ref = root / "ref"
    summary = _trainer(corpus, ref).run()
    prev, newest = _batches(ref)  # keep_last_k 2
    assert 0 < prev < newest <= summary["batch_idx_train"]
    killed = root / "killed"
    shutil.copytree(ref, killed)
    (killed / "epoch-1.pt").unlink()
    ckpt.point_latest(killed / f"checkpoint-{newest}.pt")
    return {"summary": summary, "final": torch.load(ref / "epoch-1.pt", weights_only=False),
            "killed": killed, "prev": prev, "newest": newest}


def _damage(path: Path, how: str) -> None:
    if how == "truncated":  # a partial copy, or a node that died before the data was flushed
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "garbage":
        path.write_bytes(random.Random(0).randbytes(path.stat().st_size))
    elif how == "missing":  # the pointer names a file that is gone
        path.unlink()
    elif how == "no_optimizer":  # loads, but cannot restore the training state
        state = torch.load(path, weights_only=False)
        del state["optimizer"]
        torch.save(state, path)


@pytest.mark.parametrize("how", ["truncated", "garbage", "missing", "no_optimizer"])
def test_bad_newest_checkpoint_falls_back_to_previous(corpus, reference, tmp_path: Path,
                                                      how: str) -> None:
    exp = tmp_path / "exp"
    shutil.copytree(reference["killed"], exp)
    prev, newest = reference["prev"], reference["newest"]
    bad = exp / f"checkpoint-{newest}.pt"
    _damage(bad, how)
    damaged = None if how == "missing" else bad.read_bytes()

    with _log_records() as records:
        summary = _trainer(corpus, exp).run()
    warnings = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    infos = [r.getMessage() for r in records if r.levelno == logging.INFO]

    # the warning names the file and says what is wrong with it
    expected = {"truncated": "cannot resume from checkpoint", "garbage":
                "cannot resume from checkpoint", "missing": "does not exist",
                "no_optimizer": "missing optimizer"}[how]
    assert any(str(bad) in w and expected in w for w in warnings), warnings
    # resumed from the previous good checkpoint, not from zero
    assert f"resumed from {exp / f'checkpoint-{prev}.pt'} (epoch 1, batch {prev})" in infos
    assert summary["resumed"] is True and summary["numerics_changes"] == []
    # and ended where the uninterrupted run ended, bit for bit
    got = torch.load(exp / "epoch-1.pt", weights_only=False)
    ref = reference["final"]
    assert got["batch_idx_train"] == ref["batch_idx_train"] == summary["batch_idx_train"]
    for key in ("model", "model_avg"):
        for name, t in ref[key].items():
            assert torch.equal(t, got[key][name]), f"{key}.{name} differs"

    # the bad file is kept aside (not deleted), outside the names resume and pruning use
    aside = exp / f"checkpoint-{newest}.pt.corrupt"
    if damaged is None:
        assert not aside.exists()
    else:
        assert aside.read_bytes() == damaged
        assert any(str(aside) in w for w in warnings)
    # the same name was saved again, good this time, and keep_last_k=2 kept the two newest
    assert torch.load(bad, weights_only=False)["batch_idx_train"] == newest
    assert _batches(exp) == [prev, newest]
    assert (exp / "latest").read_text().strip() == "epoch-1.pt"


def test_no_usable_checkpoint_stops_and_changes_nothing(corpus, reference,
                                                        tmp_path: Path) -> None:
    exp = tmp_path / "exp"
    shutil.copytree(reference["killed"], exp)
    prev, newest = reference["prev"], reference["newest"]
    _damage(exp / f"checkpoint-{newest}.pt", "truncated")
    _damage(exp / f"checkpoint-{prev}.pt", "garbage")
    before = _md5s(exp)

    with pytest.raises(ZipasrError) as err:
        _trainer(corpus, exp).run()
    msg = str(err.value)
    assert "no checkpoint is usable" in msg and "Nothing was deleted" in msg
    assert f"checkpoint-{newest}.pt: RuntimeError" in msg  # the zip reader's error
    assert f"checkpoint-{prev}.pt: UnpicklingError" in msg
    # nothing deleted, renamed or rewritten, and no fresh start's checkpoint written
    assert _md5s(exp) == before


# -- candidate order, on hand-made files ------------------------------------------------


def _fake(exp: Path, name: str, batch: int) -> Path:
    torch.save({"batch_idx_train": batch, "model": {"w": torch.zeros(2)}}, exp / name)
    return exp / name


def _tried(exp: Path, accept: set[str]) -> tuple[list[str], ckpt.Resumed | None]:
    """Names ``resume`` offers to ``apply`` in order (``apply`` accepts those in ``accept``)."""
    tried: list[str] = []

    def apply(path: Path, state: dict[str, Any]) -> None:
        tried.append(path.name)
        if path.name not in accept:
            raise ValueError("rejected")

    return tried, ckpt.resume(exp, apply, required=("model",))


def test_resume_order_pointer_then_batch_index(tmp_path: Path) -> None:
    for name, batch in (("checkpoint-4.pt", 4), ("checkpoint-6.pt", 6), ("epoch-1.pt", 6),
                        ("checkpoint-2.pt", 2), ("epoch-2.pt", 9)):
        _fake(tmp_path, name, batch)
    ckpt.point_latest(tmp_path / "epoch-2.pt")
    # the pointer's file first; then by batch index, the epoch file before the batch
    # checkpoint of the same batch (it was saved after it)
    tried, got = _tried(tmp_path, {"checkpoint-4.pt"})
    assert tried == ["epoch-2.pt", "epoch-1.pt", "checkpoint-6.pt", "checkpoint-4.pt"]
    assert got is not None and got.path == tmp_path / "checkpoint-4.pt"
    assert [p.name for p, _ in got.skipped] == tried[:3]
    # a pointer to a missing file: the others by batch index, the pointer's name skipped
    (tmp_path / "epoch-2.pt").unlink()
    tried, got = _tried(tmp_path, {"checkpoint-6.pt"})
    assert tried == ["epoch-1.pt", "checkpoint-6.pt"]
    assert got.skipped[0][0] == tmp_path / "epoch-2.pt" and "does not exist" in got.skipped[0][1]
    # an unreadable file is skipped wherever it sorts; nothing at all: None
    (tmp_path / "checkpoint-8.pt").write_bytes(b"not a checkpoint")
    (tmp_path / "latest").unlink()
    tried, got = _tried(tmp_path, {"epoch-1.pt"})
    assert tried == ["epoch-1.pt"] and [p.name for p, _ in got.skipped] == ["checkpoint-8.pt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _tried(empty, set()) == ([], None)


def test_set_aside_never_overwrites(tmp_path: Path) -> None:
    first = ckpt.set_aside(_fake(tmp_path, "checkpoint-8.pt", 8))
    second = ckpt.set_aside(_fake(tmp_path, "checkpoint-8.pt", 80))
    assert (first.name, second.name) == ("checkpoint-8.pt.corrupt", "checkpoint-8.pt.corrupt-2")
    assert torch.load(first, weights_only=False)["batch_idx_train"] == 8
    assert torch.load(second, weights_only=False)["batch_idx_train"] == 80
    assert ckpt.list_checkpoints(tmp_path, "checkpoint") == []
    ckpt.prune(tmp_path, 1)  # pruning leaves them alone
    assert first.exists() and second.exists()


def test_summary_records_the_numerics_that_ran(reference) -> None:
    n = reference["summary"]["numerics"]
    # joiner_bf16 auto resolved as the trainer resolves it on this CPU, and recorded as run
    assert n["joiner_bf16_setting"] == "auto"
    assert n["joiner_bf16"] is native_bf16(torch.device("cpu")) is n["native_bf16"]
    assert n["precision"] == "fp32" and n["device"] == "cpu"
    assert n["threads"] == {"torch": torch.get_num_threads(), "world_size": 1}
    assert n["cpu"]["torch_capability"] == torch.backends.cpu.get_cpu_capability()
    assert n["torch"] == torch.__version__


def test_resume_under_other_numerics_is_recorded(corpus, reference, tmp_path: Path) -> None:
    """Another thread count on resume (as on a node of another kind): warned and recorded."""
    exp = tmp_path / "exp"
    shutil.copytree(reference["killed"], exp)
    before = torch.get_num_threads()
    after = 1 if before > 1 else 2
    torch.set_num_threads(after)
    try:
        with _log_records() as records:
            summary = _trainer(corpus, exp).run()
    finally:
        torch.set_num_threads(before)
    newest = reference["newest"]
    change = {"batch": newest, "changed": {"threads.torch": [before, after]}}
    assert summary["numerics_changes"] == [change]
    assert summary["numerics"]["threads"]["torch"] == after
    assert any(f"checkpoint-{newest}.pt" in r.getMessage() and "threads.torch: "
               f"{before} -> {after}" in r.getMessage() and "not be bit-identical"
               in r.getMessage() for r in records if r.levelno == logging.WARNING)
    # the record travels on in the checkpoints
    assert torch.load(exp / "epoch-1.pt", weights_only=False)["numerics_changes"] == [change]
