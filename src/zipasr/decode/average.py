"""Checkpoint averaging, icefall's two methods (``icefall/checkpoint.py`` semantics).

* Plain averaging: the arithmetic mean of the ``model`` state dicts of several checkpoints
  (integer tensors are summed and floor-divided, as icefall does).
* Averaged-model averaging (``--use-averaged-model``, what icefall's published WERs use):
  every checkpoint carries ``model_avg``, the uniform average of the snapshots taken every
  ``average_period`` batches since the start of training. From two checkpoints with batch
  indices b_s < b_e the uniform average of the snapshots in (b_s, b_e] is
  ``(avg_e * b_e - avg_s * b_s) / (b_e - b_s)``.

Both return a state dict in the dtype of the end checkpoint's ``model`` (float32), computed in
float64.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from zipasr.errors import ZipasrError

# the one reader of checkpoint files (train and decode alike)
from zipasr.train.checkpoint import load_checkpoint

__all__ = ["average_checkpoints", "average_exp_dir", "average_state_dicts",
           "average_with_averaged_model", "strip_ddp_prefix"]

log = logging.getLogger(__name__)

_CKPT = re.compile(r"^checkpoint-(\d+)\.pt$")


def strip_ddp_prefix(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Remove the ``module.`` prefix a DDP-wrapped model puts on every key."""
    if state_dict and all(k.startswith("module.") for k in state_dict):
        return {k[len("module."):]: v for k, v in state_dict.items()}
    return state_dict


def average_state_dicts(state_dicts: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Arithmetic mean of state dicts; float tensors averaged in float64 and cast back to
    their own dtype, integer tensors summed and floor-divided (icefall's rule)."""
    if not state_dicts:
        raise ValueError("nothing to average")
    n = len(state_dicts)
    keys = list(state_dicts[0])
    for i, sd in enumerate(state_dicts[1:], 1):
        if set(sd) != set(keys):
            diff = sorted(set(sd) ^ set(keys))[:5]
            raise ZipasrError(f"state dict {i} has different keys than the first: {diff}")
    out: dict[str, Tensor] = {}
    for k in keys:
        first = state_dicts[0][k]
        if first.is_floating_point():
            acc = torch.zeros(first.shape, dtype=torch.float64)
            for sd in state_dicts:
                acc += sd[k].to(torch.float64)
            out[k] = (acc / n).to(first.dtype)
        else:
            acc_i = first.clone()
            for sd in state_dicts[1:]:
                acc_i += sd[k]
            out[k] = acc_i // n
    return out


def average_checkpoints(paths: Sequence[str | Path]) -> dict[str, Tensor]:
    """Plain average of the ``model`` state dicts stored in ``paths``."""
    return _average_checkpoints(paths)[0]


def _average_checkpoints(paths: Sequence[str | Path]) -> tuple[dict[str, Tensor], Any]:
    log.info("averaging %d checkpoint(s): %s", len(paths), ", ".join(str(p) for p in paths))
    sds, config = [], None
    for p in paths:
        ckpt = load_checkpoint(p)
        sds.append(strip_ddp_prefix(ckpt["model"]))
        config = ckpt.get("model_config")  # the last (newest) file's
        del ckpt  # optimizer states can be large: keep only the state dicts
    return average_state_dicts(sds), config


def _avg_batch_idx(ckpt: dict[str, Any], path: Path, average_period: int | None) -> int:
    if "batch_idx_train" not in ckpt:
        raise ZipasrError(f"{path} has no batch_idx_train: cannot use the averaged model")
    b = int(ckpt["batch_idx_train"])
    # model_avg was last updated at the last multiple of average_period (as icefall's
    # average_checkpoints_with_averaged_model assumes): use that index, so the result is exactly
    # the uniform average of the snapshots in the range.
    return b - b % average_period if average_period else b


def average_with_averaged_model(start: str | Path | None, end: str | Path
                                ) -> dict[str, Tensor]:
    """See :func:`_average_with_averaged_model`; returns the state dict only."""
    return _average_with_averaged_model(start, end)[0]


def _average_with_averaged_model(start: str | Path | None, end: str | Path
                                 ) -> tuple[dict[str, Tensor], Any]:
    """Uniform average of the running-average snapshots in (b_start, b_end].

    ``start=None`` means the start of training (b_start = 0): the result is ``model_avg`` of
    ``end`` itself (icefall requires a start file; this covers ``--epoch E --avg E``).
    Float entries: ``(avg_e + avg_s * (w_s / w_e)) * w_e`` with ``w_e = b_e / (b_e - b_s)``,
    ``w_s = 1 - w_e`` (icefall's overflow-safe form of the formula above), in float64; other
    entries are taken from ``end``'s ``model_avg``.
    """
    end = Path(end)
    ckpt_e = load_checkpoint(end)
    if "model_avg" not in ckpt_e or ckpt_e["model_avg"] is None:
        raise ZipasrError(f"{end} has no model_avg (was it written by the trainer?)")
    period = ckpt_e.get("average_period")
    period = int(period) if period else None
    avg_e = strip_ddp_prefix(ckpt_e["model_avg"])
    dtypes = {k: v.dtype for k, v in strip_ddp_prefix(ckpt_e["model"]).items()}
    b_e = _avg_batch_idx(ckpt_e, end, period)
    if start is None:
        avg_s, b_s = None, 0
    else:
        start = Path(start)
        ckpt_s = load_checkpoint(start)
        if "model_avg" not in ckpt_s or ckpt_s["model_avg"] is None:
            raise ZipasrError(f"{start} has no model_avg (was it written by the trainer?)")
        avg_s = strip_ddp_prefix(ckpt_s["model_avg"])
        b_s = _avg_batch_idx(ckpt_s, start, period)
    if b_e - b_s <= 0:
        raise ZipasrError(
            f"no running-average snapshot between {start} (batch {b_s}) and {end} (batch {b_e})"
            f" with average_period {period}: average more epochs, lower average_period, or "
            "use plain averaging (--no-use-averaged-model)"
        )
    log.info("averaged model over batches (%d, %d] from %s and %s", b_s, b_e, start, end)
    w_e = b_e / (b_e - b_s)
    w_s = 1.0 - w_e
    out: dict[str, Tensor] = {}
    for k, v in avg_e.items():
        dtype = dtypes.get(k, v.dtype)
        if not v.is_floating_point():
            out[k] = v.clone()
            continue
        acc = v.to(torch.float64)
        if avg_s is not None:
            acc = (acc + avg_s[k].to(torch.float64) * (w_s / w_e)) * w_e
        out[k] = acc.to(dtype)
    return out, ckpt_e.get("model_config")


def _epoch_file(exp_dir: Path, n: int) -> Path:
    p = exp_dir / f"epoch-{n}.pt"
    if not p.is_file():
        raise ZipasrError(f"{p} does not exist")
    return p


def _iter_files(exp_dir: Path, iteration: int) -> list[Path]:
    """``checkpoint-B.pt`` files with B <= iteration, newest first."""
    found = []
    for p in exp_dir.glob("checkpoint-*.pt"):
        m = _CKPT.match(p.name)
        if m and int(m.group(1)) <= iteration:
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found, reverse=True)]


def _last_batches_start(exp_dir: Path, end: Path, last_batches: int) -> Path | None:
    """The newest ``checkpoint-B.pt`` with B <= b_end - last_batches (the window then holds at
    least ``last_batches`` batches, at most ``save_every_n`` more); None when training had no
    more than ``last_batches`` batches by ``end`` (the window starts at batch 0)."""
    b_end = load_checkpoint(end).get("batch_idx_train")
    if b_end is None:
        raise ZipasrError(f"{end} has no batch_idx_train: cannot average its last batches")
    limit = int(b_end) - last_batches
    if limit <= 0:
        log.warning("%s is at batch %d: --last-batches %d averages the whole run", end, b_end,
                    last_batches)
        return None
    cands = _iter_files(exp_dir, limit)
    if not cands:
        raise ZipasrError(
            f"--last-batches {last_batches} from {end} (batch {b_end}) needs a checkpoint-B.pt "
            f"with B <= {limit} in {exp_dir}, and there is none: train with keep_last_k >= "
            f"last_batches / save_every_n + 1 (older checkpoints are pruned)")
    return cands[0]


def average_exp_dir(exp_dir: str | Path, *, epoch: int | None = None, iteration: int | None = None,
                    avg: int = 1, use_averaged_model: bool = False,
                    last_batches: int | None = None
                    ) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """icefall's ``decode.py`` model selection from an experiment dir.

    ``epoch=E``: plain averaging of epoch-(E-A+1)..E, or with ``use_averaged_model`` the
    running average between epoch-(E-A).pt (excluded) and epoch-E.pt.
    ``iteration=I``: the same over ``checkpoint-B.pt`` files with B <= I (the A newest, or
    the newest and the A-th older one).
    ``last_batches=N`` (with ``epoch`` and ``use_averaged_model``, instead of ``avg``): the
    running average over the last N batches (or up to ``save_every_n`` more) before the end of
    epoch E, between the newest ``checkpoint-B.pt`` at least N batches older and epoch-E.pt.
    A short run's best weights are its last ones: whole epochs would reach back too far.
    Returns (state dict, info) where info names the files and the end checkpoint's
    ``model_config`` (None if absent).
    """
    exp_dir = Path(exp_dir)
    if (epoch is None) == (iteration is None):
        raise ZipasrError("give exactly one of --epoch and --iter")
    if avg < 1:
        raise ZipasrError(f"--avg must be >= 1, got {avg}")
    if last_batches is not None:
        if epoch is None or not use_averaged_model:
            raise ZipasrError("--last-batches goes with --epoch and --use-averaged-model (the "
                              "running average is what makes any window exact)")
        if last_batches < 1:
            raise ZipasrError(f"--last-batches must be >= 1, got {last_batches}")
        end = _epoch_file(exp_dir, epoch)
        start = _last_batches_start(exp_dir, end, last_batches)
        files = [p for p in (start, end) if p is not None]
        sd, model_config = _average_with_averaged_model(start, end)
    elif epoch is not None:
        if use_averaged_model:
            if epoch - avg < 0:
                raise ZipasrError(f"--epoch {epoch} --avg {avg}: need epoch >= avg")
            end = _epoch_file(exp_dir, epoch)
            start = _epoch_file(exp_dir, epoch - avg) if epoch - avg >= 1 else None
            files = [p for p in (start, end) if p is not None]
            sd, model_config = _average_with_averaged_model(start, end)
        else:
            if epoch < 1:
                raise ZipasrError(f"--epoch must be >= 1, got {epoch}")
            if epoch - avg + 1 < 1:  # icefall silently averages the epochs that exist
                log.warning("--epoch %d --avg %d: averaging epochs 1..%d only", epoch, avg,
                            epoch)
            files = [_epoch_file(exp_dir, e) for e in range(max(1, epoch - avg + 1), epoch + 1)]
            sd, model_config = _average_checkpoints(files)
    else:
        assert iteration is not None
        cands = _iter_files(exp_dir, iteration)
        need = avg + 1 if use_averaged_model else avg
        if len(cands) < need:
            raise ZipasrError(f"--iter {iteration} --avg {avg} needs {need} checkpoint-*.pt files"
                              f" with index <= {iteration} in {exp_dir}, found {len(cands)}")
        if use_averaged_model:
            end, start = cands[0], cands[avg]
            files = [start, end]
            sd, model_config = _average_with_averaged_model(start, end)
        else:
            files = cands[:avg][::-1]
            sd, model_config = _average_checkpoints(files)
    info = {"files": [str(p) for p in files], "use_averaged_model": use_averaged_model,
            "epoch": epoch, "iter": iteration, "avg": avg, "last_batches": last_batches,
            "model_config": model_config}
    return sd, info
