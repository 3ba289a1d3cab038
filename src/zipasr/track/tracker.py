"""The training run's tracker: the trainer calls start / log_train / log_valid / finish."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from zipasr.track import lineage
from zipasr.track.client import experiment_run, open_client
from zipasr.track.safe import Guard
from zipasr.track.spec import TrackingSpec

log = logging.getLogger("zipasr.track")


class Tracker:
    """Logs one training run to MLflow. With tracking disabled every method is a no-op; with the
    backend failing, the first failure warns once and the rest are skipped."""

    def __init__(self, spec: TrackingSpec | None = None) -> None:
        self.spec = spec or TrackingSpec(enabled=False)
        self.guard = Guard()
        self.client: Any = None
        self.run_id: str | None = None
        self.interval = 0

    @property
    def active(self) -> bool:
        return self.run_id is not None and self.guard.enabled

    def start(self, trainer: Any, resumed: bool) -> None:
        opened = open_client(self.spec, self.guard)
        if opened is None:
            return
        self.client, eid = opened
        self.interval = self.spec.metrics_interval or trainer.cfg.log_interval
        got = self.guard(experiment_run, self.client, eid, self.spec, trainer.exp_dir,
                         trainer.fp)
        if got is None:
            return
        self.run_id, created = got
        if not created:
            # resume (or a rerun of the same configuration): continue the same run
            self.guard(self.client.update_run, self.run_id, status="RUNNING")
            self.guard(self.client.set_tag, self.run_id, "resumed_at_batch",
                       str(trainer.batch_idx_train))
            log.info("MLflow: continuing run %s (resumed=%s)", self.run_id, resumed)
            return
        log.info("MLflow: run %s in experiment %r at %s", self.run_id, self.spec.experiment,
                 self.spec.tracking_uri())
        from dataclasses import asdict

        params = lineage.flatten(self.spec.config) if self.spec.config else {}
        # what the trainer actually resolved (presets expanded, defaults filled in)
        params.update(lineage.flatten({"resolved.train": trainer.cfg.to_dict(),
                                       "resolved.model": asdict(trainer.model_config)}))
        params["num_params"] = str(trainer.num_params)
        tags = {**self.spec.tags, **lineage.git_tags(), **lineage.host_tags(trainer.device),
                **lineage.data_tags(trainer.input_md5),
                **lineage.flatten({"numerics": trainer.numerics}),  # zipasr.train.numerics
                "fingerprint": trainer.fp, "mlflow.note.content":
                    f"zipasr training run of {trainer.exp_dir}"}
        self._log_batch(params=params, tags=tags)
        if self.spec.config:
            self.guard(self.client.log_dict, self.run_id, self.spec.config, "config.yaml")
        for p in (trainer.bpe_model, trainer.bpe_model.parent / "tokens.txt"):
            if p.is_file():
                self.guard(self.client.log_artifact, self.run_id, str(p), "lang")

    def _log_batch(self, metrics: dict[str, float] | None = None, step: int = 0,
                   params: dict[str, str] | None = None,
                   tags: dict[str, str] | None = None) -> None:
        if not self.active:
            return
        from mlflow.entities import Metric, Param, RunTag

        ts = int(time.time() * 1000)
        ms = [Metric(k, float(v), ts, step) for k, v in (metrics or {}).items()]
        ps = [Param(k, v) for k, v in (params or {}).items()]
        ts_ = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
        # MLflow takes at most 100 params per batch call
        for i in range(0, max(len(ps), 1), 100):
            self.guard(self.client.log_batch, self.run_id, metrics=ms if i == 0 else [],
                       params=ps[i:i + 100], tags=ts_ if i == 0 else [])

    def log_train(self, rec: dict[str, Any], optimizer: Any = None) -> None:
        """One metrics.jsonl record (losses, lr, throughput) plus the optimizer's last gradient
        norm and clipping, every ``interval`` batches."""
        if not self.active or rec["batch"] % self.interval:
            return
        m = {k: v for k, v in rec.items() if k != "batch" and isinstance(v, (int, float))}
        clip = getattr(optimizer, "last_clipping", None)
        if clip and clip[0]:
            for k, name in (("tot_norm", "grad_norm"), ("threshold", "grad_clip_threshold"),
                            ("factor", "grad_clip_factor")):
                try:
                    m[name] = float(clip[0][k])
                except (KeyError, TypeError, ValueError, RuntimeError):
                    pass  # not estimated yet (first steps)
        self._log_batch(metrics=m, step=rec["batch"])

    def log_valid(self, batch: int, epoch: int, loss: float, end_of_epoch: bool) -> None:
        m = {"valid_loss": loss}
        if end_of_epoch:
            m["valid_loss_epoch"] = loss
            m["epochs_done"] = epoch
        self._log_batch(metrics=m, step=batch)

    def finish(self, status: str, exp_dir: Path | None = None,
               summary: dict[str, Any] | None = None) -> None:
        if not self.active:
            return
        if summary:
            self._log_batch(metrics={f"final.{k}": v for k, v in summary.items()
                                     if isinstance(v, (int, float)) and not isinstance(v, bool)},
                            step=int(summary.get("batch_idx_train", 0)))
        if exp_dir is not None:
            for name in ("metrics.jsonl", "train-summary.json", "fingerprint"):
                if (exp_dir / name).is_file():
                    self.guard(self.client.log_artifact, self.run_id, str(exp_dir / name),
                               "train")
        self.guard(self.client.set_terminated, self.run_id, status)
