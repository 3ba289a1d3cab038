"""Checkpoints in icefall's layout, written atomically, pruned to the newest k.

A checkpoint is a dict: ``model`` (state dict), ``model_avg`` (float64 running average),
``optimizer``, ``scheduler``, ``grad_scaler``, ``sampler``, ``rng``, ``model_config``, and
icefall's params flattened at the top level (``batch_idx_train``, ``cur_epoch``,
``average_period``, ...), so icefall's tools and ours read each other's files.

Every checkpoint file in the project is opened by :func:`load_checkpoint` here: training's
resume, checkpoint averaging and loading a model to decode, transcribe or export (through
``zipasr.decode.model.load_model``). It raises :class:`CheckpointError` (a ZipasrError, so the
CLI prints it as one line) for a missing, unreadable or incomplete file.

Resuming (:func:`resume`) falls back past a truncated, garbled or missing newest file to the
newest usable one with a warning (the trainer then sets the bad file aside as
``<name>.corrupt``); it stops with an error, and touches nothing, when no file is usable.
"""

from __future__ import annotations

import logging
import os
import random
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from zipasr.errors import ZipasrError
from zipasr.io import atomic_path, write_text_atomic

if TYPE_CHECKING:
    from zipasr.train.state import TrainState

log = logging.getLogger(__name__)

_CKPT = re.compile(r"^(epoch|checkpoint)-(\d+)\.pt$")


def save(path: Path, checkpoint: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save(checkpoint, tmp)
    # The pointer makes "newest checkpoint" a file read, not a load of every checkpoint.
    point_latest(path)
    log.info("saved %s", path)


class CheckpointError(ZipasrError):
    """A checkpoint file that cannot be used: missing, unreadable, or lacking what is needed.

    ``reason`` says what is wrong without the path (for lists of files): "does not exist",
    the reading error as ``Type: first line``, or "missing optimizer, scheduler"."""

    def __init__(self, path: Path, message: str, reason: str):
        super().__init__(message)
        self.path = path
        self.reason = reason


def load_checkpoint(path: str | Path, *, required: Iterable[str] = ("model",),
                    map_location: str | torch.device = "cpu", mmap: bool = False
                    ) -> dict[str, Any]:
    """The checkpoint dict in ``path``, which must hold the ``required`` keys.

    Trainer files hold RNG and sampler states, so this is not a ``weights_only`` load.
    ``mmap=True`` maps the tensors instead of reading them (cheap for a look at the scalars of
    a large file); a file in torch's old, non-zip format is then read whole. Raises
    :class:`CheckpointError` for a missing file, one torch cannot read, one that is not a dict
    and one without a required key; a MemoryError is not the file's fault and propagates."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, f"checkpoint {path} does not exist", "does not exist")
    try:
        try:
            ckpt = torch.load(path, map_location=map_location, weights_only=False, mmap=mmap)
        except RuntimeError as e:
            if not mmap or "mmap" not in str(e):  # only the old format cannot be mapped
                raise
            ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except MemoryError:
        raise
    except Exception as e:
        raise CheckpointError(path, f"cannot read checkpoint {path}: {e}", _why(e)) from e
    if not isinstance(ckpt, dict):
        why = f"holds a {type(ckpt).__name__}, not a checkpoint dict"
        raise CheckpointError(path, f"{path} is not a checkpoint: it {why}", why)
    missing = [k for k in required if k not in ckpt]
    if missing:
        why = f"missing {', '.join(missing)}"
        detail = " (no 'model' state dict)" if "model" in missing else f": {why}"
        raise CheckpointError(path, f"{path} is not a checkpoint{detail}", why)
    return ckpt


def list_checkpoints(exp_dir: Path, kind: str) -> list[tuple[int, Path]]:
    """``[(n, path)]`` for ``{kind}-{n}.pt`` files, ascending."""
    out = []
    for p in Path(exp_dir).glob(f"{kind}-*.pt"):
        m = _CKPT.match(p.name)
        if m and m.group(1) == kind:
            out.append((int(m.group(2)), p))
    return sorted(out)


def _why(e: BaseException) -> str:
    """An exception in one line (torch's unpickling errors run over several); for a
    CheckpointError, its reason (the underlying error's type and first line)."""
    if isinstance(e, CheckpointError):
        return e.reason
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first[:300]}"


def _peek_batch_idx(path: Path) -> int:
    """``batch_idx_train`` of a checkpoint, memory-mapped: the tensors are not read, so ordering
    fifty 1 GB files costs little. A file that fails this would fail a full load too."""
    return int(load_checkpoint(path, required=("batch_idx_train",), mmap=True)["batch_idx_train"])


@dataclass
class Resumed:
    path: Path  # the checkpoint resumed from
    # newer checkpoints skipped, with why (``path`` may not exist: the pointer named it)
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def resume(exp_dir: Path, apply: Callable[[Path, dict[str, Any]], None],
           required: Iterable[str] = ()) -> Resumed | None:
    """Resume from the newest checkpoint in ``exp_dir`` that loads, holds the ``required`` keys
    and that ``apply`` (which restores the trainer's state from it) accepts; older ones are
    fallbacks for a truncated, garbled or missing newest file, each skip a warning naming the
    file and the error. Candidates, newest first: the file the ``latest`` pointer names, then
    ``epoch-N.pt`` / ``checkpoint-B.pt`` by batch index (an epoch file before a batch checkpoint
    of the same batch: it was saved after it). ``apply`` may raise :class:`ZipasrError` to stop
    (e.g. another configuration's file); any other exception counts as an unusable file.

    None when there is nothing to resume from. Raises :class:`ZipasrError`, deleting and moving
    nothing, when checkpoints exist but none is usable (see the comment at the end)."""
    exp_dir = Path(exp_dir)
    required = tuple(required)
    skipped: list[tuple[Path, str]] = []

    def attempt(path: Path) -> bool:
        try:
            apply(path, load_checkpoint(path, required=required))
            return True
        except CheckpointError as e:  # the file: try the next older one
            skipped.append((path, _why(e)))
            log.warning("cannot resume from checkpoint %s (%s); trying an older one", path,
                        skipped[-1][1])
            return False
        except (ZipasrError, MemoryError):
            raise  # a stop, or not the file's fault: an older file would not fare better
        except Exception as e:  # any other failure: try the next older file
            skipped.append((path, _why(e)))
            log.warning("cannot resume from checkpoint %s (%s); trying an older one", path,
                        skipped[-1][1])
            return False

    first = None
    pointer = exp_dir / "latest"
    if pointer.is_file():
        first = exp_dir / pointer.read_text().strip()
        if not first.is_file():
            skipped.append((first, f"does not exist (named by {pointer})"))
            log.warning("checkpoint %s named by %s does not exist; trying the others", first,
                        pointer)
        elif attempt(first):
            return Resumed(first)
    ordered: list[tuple[int, int, Path]] = []
    for kind_rank, kind in ((1, "epoch"), (0, "checkpoint")):
        for _, p in list_checkpoints(exp_dir, kind):
            if first is not None and p == first:
                continue  # tried already
            try:
                ordered.append((_peek_batch_idx(p), kind_rank, p))
            except Exception as e:  # unreadable: it cannot be resumed from
                skipped.append((p, _why(e)))
                log.warning("cannot resume from checkpoint %s (%s)", p, skipped[-1][1])
    for _, _, p in sorted(ordered, key=lambda t: (t[0], t[1]), reverse=True):
        if attempt(p):
            if skipped:
                log.warning("resuming from %s, the newest usable checkpoint", p)
            return Resumed(p, skipped)
    if not skipped:
        return None
    # Checkpoints exist and none is usable. Starting from zero instead would silently throw away
    # the hours of training they hold (and pruning would then mix the new run's files with
    # these); an icefall user whose node crashed would rather be stopped, shown the files and
    # decide: restore one from a backup or fix the environment (an error that is not the files'
    # fault, such as another torch, would hit every file alike, hence nothing is moved here).
    listing = "\n".join(f"  {p.name}: {why}" for p, why in skipped)
    raise ZipasrError(
        f"cannot resume training in {exp_dir}: no checkpoint is usable\n{listing}\n"
        f"Nothing was deleted. Fix or restore one of these files, or move them and "
        f"{pointer.name} out of {exp_dir} to start afresh deliberately.")


def to_checkpoint(state: TrainState, *, world_size: int, model_config: dict[str, Any],
                  train_config: dict[str, Any], fingerprint: str,
                  numerics: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint dict of training ``state`` (what :func:`restore` reads back)."""
    return {
        "model": state.model.state_dict(),
        "model_avg": state.model_avg,
        "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict(),
        "grad_scaler": state.scaler.state_dict(),
        "sampler": {"epoch": state.cur_epoch, "batches_done": state.batches_in_epoch},
        "train_data": state.train_stats,  # the data's size (a resume need not count it)
        "rng": rng_state(),
        "world_size": world_size,
        "model_config": model_config,
        "train_config": train_config,
        # icefall's params, flattened at the top level as icefall does
        "batch_idx_train": state.batch_idx_train,
        "cur_epoch": state.cur_epoch if state.batches_in_epoch else state.cur_epoch - 1,
        "average_period": train_config["average_period"],
        "best_valid_loss": state.best_valid_loss,
        "best_valid_epoch": state.best_valid_epoch,
        "fingerprint": fingerprint,
        "numerics": numerics,
        "numerics_changes": state.numerics_changes,
    }


def restore(state: TrainState, checkpoint: dict[str, Any], *, world_size: int,
            rank: int) -> None:
    """Fill training ``state`` from ``checkpoint`` (a :func:`to_checkpoint` dict), and the RNGs:
    this rank's own stream when the checkpoint holds every rank's (same world size)."""
    state.model.load_state_dict(checkpoint["model"])
    state.model_avg = checkpoint["model_avg"]
    state.optimizer.load_state_dict(checkpoint["optimizer"])
    state.scheduler.load_state_dict(checkpoint["scheduler"])
    state.scaler.load_state_dict(checkpoint["grad_scaler"])
    state.batch_idx_train = checkpoint["batch_idx_train"]
    state.cur_epoch = checkpoint["sampler"]["epoch"]
    state.batches_in_epoch = checkpoint["sampler"]["batches_done"]
    state.best_valid_loss = checkpoint["best_valid_loss"]
    state.best_valid_epoch = checkpoint["best_valid_epoch"]
    state.train_stats = checkpoint.get("train_data")
    ranks_rng = checkpoint.get("rng_ranks")
    if ranks_rng and len(ranks_rng) == world_size:
        set_rng_state(ranks_rng[rank])  # each rank its own dropout stream
    else:
        set_rng_state(checkpoint["rng"])
    state.numerics_changes = list(checkpoint.get("numerics_changes", []))


def set_aside(path: Path) -> Path:
    """Rename an unusable checkpoint to ``<name>.corrupt`` (``.corrupt-2``, ... if taken): kept
    for inspection (a truncated file points at the disk or the network), but out of the
    ``epoch-N.pt`` / ``checkpoint-B.pt`` names that resume, pruning and averaging look at, so a
    later save of the same name and ``keep_last_k`` are unaffected by it."""
    dest = path.with_name(f"{path.name}.corrupt")
    n = 2
    while dest.exists():
        dest = path.with_name(f"{path.name}.corrupt-{n}")
        n += 1
    os.replace(path, dest)
    return dest


def point_latest(path: Path) -> None:
    """Make the ``latest`` pointer name ``path`` (after resuming from an older file than it
    named)."""
    write_text_atomic(Path(path).parent / "latest", f"{Path(path).name}\n")


def prune(exp_dir: Path, keep_last_k: int) -> None:
    """Keep the newest ``keep_last_k`` ``checkpoint-*.pt`` (epoch files are never deleted)."""
    if keep_last_k <= 0:
        return
    for _, p in list_checkpoints(exp_dir, "checkpoint")[:-keep_last_k]:
        p.unlink(missing_ok=True)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def fix_random_seed(seed: int) -> None:
    """Seed python, numpy and torch (all devices) alike."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
