"""TrainConfig: every training option, defaults as icefall's zipformer/train.py."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from zipasr.config import check_fields
from zipasr.errors import ZipasrError

# Keys of the workflow config's train section that size the job (CPU threads, processes), not
# the training itself: the train rule reads them, TrainConfig never sees them.
JOB_KEYS = ("threads", "num_procs")


def training_options(section: dict[str, Any]) -> dict[str, Any]:
    """The TrainConfig fields of a workflow config's ``train`` section."""
    return {k: v for k, v in section.items() if k not in JOB_KEYS}


@dataclass
class TrainConfig:
    # schedule
    num_epochs: int = 30
    base_lr: float = 0.045
    lr_batches: float = 7500.0
    lr_epochs: float = 3.5
    warmup_batches: float = 500.0
    warmup_start: float = 0.1
    ref_duration: float = 600.0
    seed: int = 42
    # data
    max_duration: float = 1000.0  # seconds of audio per batch (per process)
    num_buckets: int = 30
    buffer_size: int = 150_000
    min_cut_duration: float = 1.0
    max_cut_duration: float = 20.0
    num_workers: int = 2
    spec_augment: bool = True
    time_warp_factor: int = 80
    noise_cuts: str | None = None  # a cut manifest of noise (e.g. MUSAN) to mix in, or None
    noise_snr: tuple[float, float] = (10.0, 20.0)
    noise_prob: float = 0.5
    # loss: pruned RNN-T (simple + pruned, warm-up weighting) and CTC, as icefall's compute_loss
    prune_range: int = 5
    lm_scale: float = 0.25
    am_scale: float = 0.0
    simple_loss_scale: float = 0.5
    ctc_loss_scale: float = 0.2
    warm_step: int = 2000
    # precision: fp32 | bf16 | fp16 (fp16 needs CUDA; it uses a GradScaler)
    precision: str = "fp32"
    # with fp32: the joiner's vocabulary projection alone in bf16: true | false | auto (on
    # where bf16 is native: CUDA, CPUs with AVX512-BF16 or AMX, where the product runs 2.5x
    # faster while full bf16 autocast is slower than fp32; emulated bf16 is 5x slower)
    joiner_bf16: bool | str = False
    # running average model, checkpoints, logging
    average_period: int = 200
    save_every_n: int = 4000
    keep_last_k: int = 30
    log_interval: int = 50
    valid_interval: int = 0  # extra validation every N batches (0: only at epoch ends)
    # bad batches: skipped and saved; this many in a row stops training
    max_consecutive_bad_batches: int = 20
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    rnnt_backend: str = "auto"
    extra: dict[str, Any] = field(default_factory=dict)  # free-form, logged only

    # Options that may change between runs of one experiment without restarting it.
    RESUMABLE_CHANGES = frozenset({
        "num_epochs", "num_workers", "save_every_n", "keep_last_k", "log_interval",
        "valid_interval", "max_consecutive_bad_batches", "device", "rnnt_backend", "extra",
        "buffer_size",
    })

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        check_fields(cls, d, "unknown training option(s)")
        cfg = cls(**d)
        if isinstance(cfg.noise_snr, list):
            cfg.noise_snr = tuple(cfg.noise_snr)
        if cfg.precision not in ("fp32", "bf16", "fp16"):
            raise ZipasrError(f"train.precision must be fp32, bf16 or fp16, not {cfg.precision!r}")
        if cfg.joiner_bf16 not in (True, False, "auto"):
            raise ZipasrError(f"train.joiner_bf16 must be true, false or auto, not "
                              f"{cfg.joiner_bf16!r}")
        if cfg.num_buckets < 2:
            raise ZipasrError(f"train.num_buckets must be at least 2, not {cfg.num_buckets}")
        if cfg.save_every_n and cfg.save_every_n % cfg.average_period:
            raise ZipasrError("train.save_every_n must be a multiple of train.average_period "
                              f"({cfg.save_every_n} vs {cfg.average_period})")
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def fingerprint(obj: Any) -> str:
    """A stable short hash of JSON-able data (config + input identities)."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
