"""Everything a training run changes as it goes, in one place.

:meth:`zipasr.train.trainer.Trainer._new_state` builds a :class:`TrainState` (model, optimizer,
scheduler, data, counters at zero); a resume (:func:`zipasr.train.checkpoint.restore`) fills it
from a checkpoint; :func:`zipasr.train.checkpoint.to_checkpoint` writes it out. The trainer's
other attributes are its inputs (configuration, paths, device, rank), fixed for the run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class TrainState:
    # what is trained
    model: Any  # zipasr.model.Transducer: saved, averaged, validated, given batch counts
    ddp: torch.nn.parallel.DistributedDataParallel | None  # its wrapper, for training forwards
    optimizer: Any  # ScaledAdam
    scheduler: Any  # Eden
    scaler: torch.amp.GradScaler
    model_avg: dict[str, torch.Tensor]  # float64 running average (icefall's model_avg)
    # what it is trained on (zipasr.train.data; None in a state built without data, for
    # driving steps by hand)
    train_set: Any = None  # LazyCuts: counts the training data's size on a full pass
    sampler: Any = None
    train_loader: Any = None
    train_dataset: Any = None
    valid_loader: Any = None
    # where it is
    batch_idx_train: int = 0      # batches of the whole run (icefall's params.batch_idx_train)
    cur_epoch: int = 1            # the epoch being trained
    batches_in_epoch: int = 0     # of cur_epoch, done
    best_valid_loss: float = math.inf
    best_valid_epoch: int = 0
    bad_in_a_row: int = 0         # bad batches skipped since the last good step
    bad_total: int = 0            # in this run
    # the training data's size as the last full pass over it found it: {"cuts", "hours",
    # "dropped", "batches" (this rank's, per epoch)}; None until a pass or a checkpoint says
    train_stats: dict[str, Any] | None = None
    # resumes on other numerics than the checkpoint's (zipasr.train.numerics)
    numerics_changes: list[dict[str, Any]] = field(default_factory=list)

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())
