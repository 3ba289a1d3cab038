"""The training run's tracker: the trainer calls start / log_train / log_valid / finish, each
with a plain record of what to log (:class:`RunInfo`, a metrics dict, numbers); the tracker
never reads the trainer."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zipasr.track import lineage
from zipasr.track.client import experiment_run, open_client
from zipasr.track.safe import RECONNECT_FIRST, RECONNECT_MAX, Guard, probe
from zipasr.track.spec import TrackingSpec

log = logging.getLogger("zipasr.track")

MAX_KEPT = 50_000  # metric values kept in memory during an outage (~12 MB), for a reconnection


@dataclass(frozen=True)
class RunInfo:
    """What the trainer tells the tracker at the start of a run (or a resume)."""

    exp_dir: Path
    fingerprint: str             # zipasr.train.config.fingerprint of the run
    batch_idx_train: int         # where the run starts (> 0: resumed)
    log_interval: int            # train.log_interval: the default metrics interval
    train_config: dict[str, Any]  # the resolved train config (TrainConfig.to_dict())
    model_config: dict[str, Any]  # the resolved model config (asdict(ZipformerConfig))
    num_params: int
    device: Any                  # torch.device trained on
    input_md5: dict[Path, str]   # the input files' md5 sums (data tags)
    numerics: dict[str, Any]     # zipasr.train.numerics facts
    bpe_model: Path


class Tracker:
    """Logs one training run to MLflow. With tracking disabled every method is a no-op; with the
    backend failing, the first failure warns once and tracking pauses: training and validation
    metrics are kept in memory, the server is probed again after ``RECONNECT_FIRST`` s (the
    wait doubles after each failed probe, up to ``RECONNECT_MAX``) and once more at the end of
    training; when it answers, what was kept is sent and logging resumes."""

    def __init__(self, spec: TrackingSpec | None = None) -> None:
        self.spec = spec or TrackingSpec(enabled=False)
        self.guard = Guard(hint=self._outage_hint)
        self.client: Any = None
        self.run_id: str | None = None
        self.interval = 0
        self.exp_dir: Path | None = None
        self.step: int | None = None          # of the metrics being sent
        self.kept: list[Any] = []             # mlflow Metric values not sent (outage)
        self.kept_steps: list[int] = []       # first and last step of those
        self.dropped = 0                      # values beyond MAX_KEPT
        self.probe_wait = RECONNECT_FIRST
        self.last_probe: float | None = None

    @property
    def active(self) -> bool:
        return self.run_id is not None and self.guard.enabled

    def start(self, run: RunInfo, resumed: bool) -> None:
        self.exp_dir = Path(run.exp_dir)
        opened = open_client(self.spec, self.guard)
        if opened is None:
            return
        self.client, eid = opened
        self.interval = self.spec.metrics_interval or run.log_interval
        got = self.guard(experiment_run, self.client, eid, self.spec, run.exp_dir,
                         run.fingerprint)
        if got is None:
            return
        self.run_id, created = got
        if not created:
            # resume (or a rerun of the same configuration): continue the same run
            self.guard(self.client.update_run, self.run_id, status="RUNNING")
            self.guard(self.client.set_tag, self.run_id, "resumed_at_batch",
                       str(run.batch_idx_train))
            log.info("MLflow: continuing run %s (resumed=%s)", self.run_id, resumed)
            return
        log.info("MLflow: run %s in experiment %r at %s", self.run_id, self.spec.experiment,
                 self.spec.tracking_uri())
        params = lineage.flatten(self.spec.config) if self.spec.config else {}
        # what the trainer actually resolved (presets expanded, defaults filled in)
        params.update(lineage.flatten({"resolved.train": run.train_config,
                                       "resolved.model": run.model_config}))
        params["num_params"] = str(run.num_params)
        tags = {**self.spec.tags, **lineage.git_tags(), **lineage.host_tags(run.device),
                **lineage.data_tags(run.input_md5),
                **lineage.flatten({"numerics": run.numerics}),  # zipasr.train.numerics
                "fingerprint": run.fingerprint, "mlflow.note.content":
                    f"zipasr training run of {run.exp_dir}"}
        self._log_batch(params=params, tags=tags)
        if self.spec.config:
            self.guard(self.client.log_dict, self.run_id, self.spec.config, "config.yaml")
        for p in (run.bpe_model, run.bpe_model.parent / "tokens.txt"):
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

    def log_train(self, rec: dict[str, Any]) -> None:
        """One training record: ``batch`` (the step) and numbers (losses, lr, throughput,
        gradient norm and clipping...), logged every ``interval`` batches."""
        if self.run_id is None or rec["batch"] % self.interval:
            return
        m = {k: v for k, v in rec.items() if k != "batch" and isinstance(v, (int, float))}
        self._send(m, rec["batch"])

    def log_valid(self, batch: int, epoch: int, loss: float, end_of_epoch: bool) -> None:
        m = {"valid_loss": loss}
        if end_of_epoch:
            m["valid_loss_epoch"] = loss
            m["epochs_done"] = epoch
        self._send(m, batch)

    def _send(self, metrics: dict[str, float], step: int) -> None:
        """Training/validation metrics: logged now, or kept (with their time) while the server
        is away, and sent first when it answers again."""
        if self.run_id is None:
            return
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        ms = [Metric(k, float(v), ts, step) for k, v in metrics.items()]
        self.step = step
        if self.guard.enabled or self._reconnect():
            self.guard(self.client.log_batch, self.run_id, metrics=ms)
            if self.guard.enabled:
                return
        self._keep(ms, step)

    def _keep(self, ms: list[Any], step: int) -> None:
        room = max(MAX_KEPT - len(self.kept), 0)
        self.kept += ms[:room]
        self.dropped += len(ms[room:])
        self.kept_steps = [self.kept_steps[0] if self.kept_steps else step, step]

    def _reconnect(self, force: bool = False) -> bool:
        """After an outage, when due (or ``force``): probe the server (one short request) and,
        when it answers, send what was kept. True when tracking is on again."""
        now = time.monotonic()
        since = max((t for t in (self.last_probe, self.guard.disabled_at) if t is not None),
                    default=now)
        if not force and now - since < self.probe_wait:
            return False
        self.last_probe = now
        why = probe(self.spec.tracking_uri())
        if why is None:
            self.guard.rearm()
            n, steps = len(self.kept), self.kept_steps
            # MLflow takes at most 1000 metrics per batch call; a resent chunk is deduplicated
            while self.kept and self.guard.enabled:
                self.guard(self.client.log_batch, self.run_id, metrics=self.kept[:1000])
                if self.guard.enabled:
                    del self.kept[:1000]
            if self.guard.enabled:
                log.info("MLflow: %s answers again after %.0f s: %d metric values of batches "
                         "%s kept during the outage sent%s; logging resumed",
                         self.spec.tracking_uri(), now - (self.guard.disabled_at or now), n,
                         "-".join(map(str, steps)) or "(none)",
                         f" ({self.dropped} more did not fit in memory: see metrics.jsonl)"
                         if self.dropped else "")
                self.kept_steps, self.dropped = [], 0
                return True
        # not back: probe less and less often (a frozen server costs a timeout per probe)
        self.guard.lost_seconds += time.monotonic() - now
        self.probe_wait = min(2 * self.probe_wait, RECONNECT_MAX)
        log.debug("MLflow: %s still unreachable (%s); next probe in %.0f s",
                  self.spec.tracking_uri(), why or self.guard.failure, self.probe_wait)
        return False

    def _outage_hint(self) -> str:
        where = f"{self.exp_dir / 'metrics.jsonl'}" if self.exp_dir else "metrics.jsonl"
        if self.run_id is None:  # no run to come back to
            return f"This training is not tracked; its full curve is in {where}"
        return (f"Training metrics from batch {self.step or 0} on are kept in memory (up to "
                f"{MAX_KEPT} values) and sent if the server answers again: it is probed after "
                f"{RECONNECT_FIRST:.0f} s, then less and less often (at most every "
                f"{RECONNECT_MAX:.0f} s), and once more at the end of training. Either way the "
                f"full curve is in {where}")

    def finish(self, status: str, exp_dir: Path | None = None,
               summary: dict[str, Any] | None = None) -> None:
        if self.run_id is None:
            return
        # a finished training tries the server once more (one probe: bounded); an interrupted
        # one does not wait on it
        if not self.guard.enabled and (status != "FINISHED" or not self._reconnect(force=True)):
            if status == "FINISHED":
                self._lost_at_end(exp_dir)
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
        if status == "FINISHED" and not self.guard.enabled:  # it went away during these calls
            self._lost_at_end(exp_dir)

    def _lost_at_end(self, exp_dir: Path | None) -> None:
        """What the run misses in MLflow, and where it is instead."""
        exp = Path(exp_dir or self.exp_dir or ".")
        curve = (f"the training metrics of batches {'-'.join(map(str, self.kept_steps))} "
                 f"({len(self.kept) + self.dropped} values), " if self.kept_steps else "")
        log.warning(
            "MLflow server %s still unreachable at the end of training (%s): run %s lacks %s"
            "the final.* summary, the train/ artifacts and its FINISHED status (it shows "
            "RUNNING). Nothing of the training is lost: the full curve is in %s and the summary "
            "in %s (tracking cost %.1f s in failed calls and probes)", self.spec.tracking_uri(),
            self.guard.failure, self.run_id, curve, exp / "metrics.jsonl",
            exp / "train-summary.json", self.guard.lost_seconds)
