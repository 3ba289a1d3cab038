"""Checkpoint averaging against hand-computed float64 averages: plain (epochs and
checkpoint-B files, integer buffers floor-divided) and icefall's model_avg formula (rounded
to average_period, overflow-safe form), plus the ``zipasr average`` command."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from zipasr.decode.average import (
    average_checkpoints,
    average_exp_dir,
    average_state_dicts,
    average_with_averaged_model,
)
from zipasr.decode.cli import register
from zipasr.errors import ZipasrError

PERIOD = 3
CONFIG = {"preset": "xs", "vocab_size": 40}


def _snapshot(b: int) -> dict[str, torch.Tensor]:
    """The 'model' after b batches: deterministic, different for every b."""
    g = torch.Generator().manual_seed(1000 + b)
    return {
        "w": torch.randn(3, 4, generator=g, dtype=torch.float64) * (1 + b),
        "b": torch.randn(4, generator=g, dtype=torch.float64),
        "count": torch.tensor(10 * b + 7, dtype=torch.int64),
    }


def _f32(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.float() if v.is_floating_point() else v.clone() for k, v in sd.items()}


def _train(exp: Path, epoch_ends: list[int], iter_saves: list[int] = ()) -> None:
    """Simulate training: icefall's running average every PERIOD batches (float64), and
    epoch-N.pt / checkpoint-B.pt files at the given batch indices."""
    avg = _snapshot(0)
    saves = {b: f"epoch-{i + 1}.pt" for i, b in enumerate(epoch_ends)}
    saves.update({b: f"checkpoint-{b}.pt" for b in iter_saves})
    for b in range(1, max(saves) + 1):
        cur = _snapshot(b)
        if b % PERIOD == 0:
            w = PERIOD / b
            avg = {k: (v * (1 - w) + cur[k] * w) if v.is_floating_point() else cur[k].clone()
                   for k, v in avg.items()}
        if b in saves:
            torch.save({"model": _f32(cur), "model_avg": {k: v.clone() for k, v in avg.items()},
                        "batch_idx_train": b, "average_period": PERIOD, "cur_epoch": 1,
                        "model_config": CONFIG, "optimizer": {"state": {}}},
                       exp / saves[b])


def _uniform(lo: int, hi: int) -> dict[str, torch.Tensor]:
    """Mean (float64) of the snapshots at multiples of PERIOD in (lo, hi]."""
    bs = [b for b in range(lo + 1, hi + 1) if b % PERIOD == 0]
    return {k: sum(_snapshot(b)[k] for b in bs) / len(bs) for k in ("w", "b")}


def _close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    for k, v in want.items():
        assert got[k].dtype == torch.float32
        torch.testing.assert_close(got[k].double(), v, rtol=1e-6, atol=1e-6)


def test_average_state_dicts_by_hand() -> None:
    a = {"x": torch.tensor([1.0, 2.0]), "n": torch.tensor(7)}
    b = {"x": torch.tensor([2.0, 5.0]), "n": torch.tensor(8)}
    c = {"x": torch.tensor([4.0, -1.0]), "n": torch.tensor(9)}
    out = average_state_dicts([a, b, c])
    torch.testing.assert_close(out["x"], torch.tensor([7 / 3, 2.0]))
    assert out["n"].dtype == torch.int64 and int(out["n"]) == (7 + 8 + 9) // 3


def test_plain_epoch_average(tmp_path: Path) -> None:
    _train(tmp_path, [5, 11, 16, 23])
    sd, info = average_exp_dir(tmp_path, epoch=4, avg=3)
    want = {k: sum(_snapshot(b)[k].float().double() for b in (11, 16, 23)) / 3
            for k in ("w", "b")}
    _close(sd, want)
    assert int(sd["count"]) == (117 + 167 + 237) // 3
    assert [Path(f).name for f in info["files"]] == ["epoch-2.pt", "epoch-3.pt", "epoch-4.pt"]
    assert info["model_config"] == CONFIG
    # --avg 1 is the checkpoint itself
    sd1, _ = average_exp_dir(tmp_path, epoch=2, avg=1)
    assert torch.equal(sd1["w"], _snapshot(11)["w"].float())


def test_averaged_model_formula(tmp_path: Path) -> None:
    # epoch ends not on multiples of PERIOD: the formula uses 9 and 21 (rounded down)
    _train(tmp_path, [5, 11, 16, 23])
    sd, info = average_exp_dir(tmp_path, epoch=4, avg=2, use_averaged_model=True)
    _close(sd, _uniform(9, 21))
    assert [Path(f).name for f in info["files"]] == ["epoch-2.pt", "epoch-4.pt"]
    assert int(sd["count"]) == 10 * 21 + 7  # non-float: the end's model_avg entry
    # --epoch E --avg E: everything since the start of training (= epoch-E's model_avg)
    sd_all, info = average_exp_dir(tmp_path, epoch=3, avg=3, use_averaged_model=True)
    _close(sd_all, _uniform(0, 15))
    assert [Path(f).name for f in info["files"]] == ["epoch-3.pt"]
    # the two-file function directly
    _close(average_with_averaged_model(tmp_path / "epoch-1.pt", tmp_path / "epoch-3.pt"),
           _uniform(3, 15))


def test_averaged_model_many_batches_no_overflow(tmp_path: Path) -> None:
    """Large batch indices (w_e = b_e / (b_e - b_s) large): still the uniform average."""
    period, b_s, b_e = 200, 400_000, 400_600
    snaps = {b: _snapshot(b // period % 50) for b in range(period, b_e + 1, period)}
    avg_s = {k: sum(snaps[b][k] for b in snaps if b <= b_s) / (b_s // period)
             for k in ("w", "b")}
    avg_e = {k: sum(snaps[b][k] for b in snaps) / (b_e // period) for k in ("w", "b")}
    for name, b, avg in (("s.pt", b_s, avg_s), ("e.pt", b_e, avg_e)):
        torch.save({"model": _f32(avg), "model_avg": avg, "batch_idx_train": b,
                    "average_period": period}, tmp_path / name)
    want = {k: sum(snaps[b][k] for b in snaps if b > b_s) / 3 for k in ("w", "b")}
    got = average_with_averaged_model(tmp_path / "s.pt", tmp_path / "e.pt")
    for k, v in want.items():
        torch.testing.assert_close(got[k].double(), v, rtol=1e-4, atol=1e-4)


def test_iter_checkpoints(tmp_path: Path) -> None:
    _train(tmp_path, [30], iter_saves=[6, 12, 18, 24])
    sd, info = average_exp_dir(tmp_path, iteration=20, avg=2)  # newest two <= 20: 12, 18
    _close(sd, {k: (_snapshot(12)[k].float().double() + _snapshot(18)[k].float().double()) / 2
                for k in ("w", "b")})
    assert [Path(f).name for f in info["files"]] == ["checkpoint-12.pt", "checkpoint-18.pt"]
    sd, info = average_exp_dir(tmp_path, iteration=24, avg=2, use_averaged_model=True)
    _close(sd, _uniform(12, 24))  # start = the 2nd older one (12), end = 24
    assert [Path(f).name for f in info["files"]] == ["checkpoint-12.pt", "checkpoint-24.pt"]


def test_plain_average_of_files(tmp_path: Path) -> None:
    _train(tmp_path, [4, 8])
    sd = average_checkpoints([tmp_path / "epoch-1.pt", tmp_path / "epoch-2.pt"])
    _close(sd, {k: (_snapshot(4)[k].float().double() + _snapshot(8)[k].float().double()) / 2
                for k in ("w", "b")})


def test_errors(tmp_path: Path) -> None:
    _train(tmp_path, [2, 4])
    with pytest.raises(ZipasrError, match="epoch-3.pt does not exist"):
        average_exp_dir(tmp_path, epoch=3, avg=1)
    with pytest.raises(ZipasrError, match="need epoch >= avg"):
        average_exp_dir(tmp_path, epoch=2, avg=3, use_averaged_model=True)
    # plain averaging takes the epochs that exist, like icefall
    _, info = average_exp_dir(tmp_path, epoch=2, avg=3)
    assert [Path(f).name for f in info["files"]] == ["epoch-1.pt", "epoch-2.pt"]
    # epoch-1.pt is at batch 2, which rounds down to 0: no snapshot has been taken yet
    with pytest.raises(ZipasrError, match="no running-average snapshot"):
        average_exp_dir(tmp_path, epoch=1, avg=1, use_averaged_model=True)
    with pytest.raises(ZipasrError, match="needs 3 checkpoint"):
        average_exp_dir(tmp_path, iteration=10, avg=2, use_averaged_model=True)
    torch.save({"model": {"w": torch.zeros(1)}}, tmp_path / "epoch-9.pt")
    torch.save({"model": {"w": torch.zeros(1)}}, tmp_path / "epoch-8.pt")
    with pytest.raises(ZipasrError, match="no model_avg"):
        average_exp_dir(tmp_path, epoch=9, avg=1, use_averaged_model=True)


def _cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_average_command(tmp_path: Path) -> None:
    _train(tmp_path, [5, 11, 16, 23])
    out = tmp_path / "out" / "averaged.pt"
    assert _cli("average", "--exp-dir", str(tmp_path), "--epoch", "4", "--avg", "2",
                "--use-averaged-model", "--out", str(out)) == 0
    saved = torch.load(out, weights_only=True)
    assert saved["model_config"] == CONFIG
    _close(saved["model"], _uniform(9, 21))
    assert not list(out.parent.glob(".*partial*"))
    assert _cli("average", "--exp-dir", str(tmp_path), "--epoch", "4", "--avg", "2",
                "--no-use-averaged-model", "--out", str(out)) == 0
    saved = torch.load(out, weights_only=True)
    want = {k: (_snapshot(16)[k].float().double() + _snapshot(23)[k].float().double()) / 2
            for k in ("w", "b")}
    _close(saved["model"], want)


def test_last_batches(tmp_path: Path) -> None:
    """--last-batches N: from the newest checkpoint-B.pt with B <= b_end - N to epoch-E.pt,
    the uniform average of the snapshots in between (b_end 40 rounds down to 39)."""
    _train(tmp_path, [20, 40], iter_saves=[6, 12, 18, 24, 30, 36])
    sd, info = average_exp_dir(tmp_path, epoch=2, last_batches=10, use_averaged_model=True)
    _close(sd, _uniform(30, 39))  # 40 - 10 = 30: checkpoint-30 itself qualifies
    assert [Path(f).name for f in info["files"]] == ["checkpoint-30.pt", "epoch-2.pt"]
    assert info["last_batches"] == 10
    sd, info = average_exp_dir(tmp_path, epoch=2, last_batches=11, use_averaged_model=True)
    _close(sd, _uniform(24, 39))  # 29 -> the newest at or before it: 24 (a longer window)
    assert [Path(f).name for f in info["files"]] == ["checkpoint-24.pt", "epoch-2.pt"]
    # an earlier epoch: checkpoints after its end are not candidates
    sd, info = average_exp_dir(tmp_path, epoch=1, last_batches=5, use_averaged_model=True)
    _close(sd, _uniform(12, 18))
    assert [Path(f).name for f in info["files"]] == ["checkpoint-12.pt", "epoch-1.pt"]
    # more batches than were trained: the whole run (epoch-2's own model_avg)
    sd, info = average_exp_dir(tmp_path, epoch=2, last_batches=40, use_averaged_model=True)
    _close(sd, _uniform(0, 39))
    assert [Path(f).name for f in info["files"]] == ["epoch-2.pt"]
    # through the command, and the file records the window
    out = tmp_path / "last.pt"
    assert _cli("average", "--exp-dir", str(tmp_path), "--epoch", "2", "--last-batches", "10",
                "--use-averaged-model", "--out", str(out)) == 0
    saved = torch.load(out, weights_only=True)
    _close(saved["model"], _uniform(30, 39))
    assert saved["average"]["last_batches"] == 10


def test_last_batches_errors(tmp_path: Path) -> None:
    _train(tmp_path, [20, 40], iter_saves=[30, 36])  # older checkpoints pruned
    with pytest.raises(ZipasrError, match=r"needs a checkpoint-B.pt with B <= 25 .*keep_last_k"):
        average_exp_dir(tmp_path, epoch=2, last_batches=15, use_averaged_model=True)
    with pytest.raises(ZipasrError, match="--use-averaged-model"):
        average_exp_dir(tmp_path, epoch=2, last_batches=10)
    with pytest.raises(ZipasrError, match="--epoch"):
        average_exp_dir(tmp_path, iteration=36, last_batches=10, use_averaged_model=True)
    with pytest.raises(ZipasrError, match=">= 1"):
        average_exp_dir(tmp_path, epoch=2, last_batches=0, use_averaged_model=True)
