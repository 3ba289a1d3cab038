"""Decoding results into the experiment's MLflow run: WERs, errs/recogs files, the averaged
model (``mlflow.pytorch``, registered). Called after scoring (the ``score`` rule)."""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import Any

from zipasr.io import file_md5
from zipasr.track import lineage
from zipasr.track.client import experiment_run, open_client
from zipasr.track.safe import Guard
from zipasr.track.spec import TrackingSpec

log = logging.getLogger("zipasr.track")


def metric_key(test_set: str, setting: str) -> str:
    """``wer/test/greedy_search-epoch-1_avg-1`` (MLflow keys allow [\\w./ -])."""
    return "wer/" + re.sub(r"[^\w./ -]", "_", f"{test_set}/{setting}")


def wer_metrics(summaries: list[Path]) -> dict[str, float]:
    """The WER table's cells (``zipasr wer-table`` reads the same files the same way)."""
    from zipasr.decode.scoring import read_wer_summaries

    return {metric_key(t, s): w for t, s, w in read_wer_summaries(summaries)}


def result_files(summaries: list[Path]) -> list[Path]:
    """The recogs, errs and wer-summary files of the given wer-summary files (siblings of the
    same name), not every result file of the exp dir: older decodings stay out."""
    from zipasr.decode.names import sibling_result_files

    return [f for p in summaries for name in sibling_result_files(p.name)
            if (f := p.parent / name).is_file()]


def log_results(spec: TrackingSpec, exp_dir: Path, *, summaries: list[Path] | None = None,
                model: Path | None = None, wer_table: Path | None = None,
                log_files: list[Path] | None = None) -> str | None:
    """Log into the exp dir's run (created when training was not tracked) and a nested
    ``decode`` run per call: the WERs of ``summaries`` (the wer-summary files the WER table was
    made from) and their result files. Returns the experiment run id, or None when tracking is
    off or failed (warned)."""
    summaries = [Path(p) for p in summaries or []]
    guard = Guard()
    opened = open_client(spec, guard)
    if opened is None:
        return None
    client, eid = opened
    got = guard(experiment_run, client, eid, spec, exp_dir)
    if got is None:
        return None
    run_id, _ = got
    wers = guard(wer_metrics, summaries) or {}
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    metrics = [Metric(k, v, ts, 0) for k, v in wers.items()]
    guard(client.log_batch, run_id, metrics=metrics)

    # one nested run per scoring: its files, its WERs (the parent keeps the latest WERs)
    suffix = model.stem if model is not None else "results"
    child = guard(client.create_run, eid, run_name=f"decode {suffix}",
                  tags={"mlflow.parentRunId": run_id, "stage": "decode",
                        **spec.tags, **lineage.git_tags()})
    if child is not None:
        cid = child.info.run_id
        guard(client.log_batch, cid, metrics=metrics)
        for f in guard(result_files, summaries) or []:
            guard(client.log_artifact, cid, str(f), f.parent.name)
        guard(client.set_terminated, cid, "FINISHED")
    if wer_table is not None and wer_table.is_file():
        guard(client.log_artifact, run_id, str(wer_table))
    for f in log_files or []:
        if Path(f).is_file():
            guard(client.log_artifact, run_id, str(f), "logs")
    if model is not None and model.is_file() and guard.enabled:
        guard(_log_model, client, run_id, spec, model)
    if guard.enabled:
        log.info("MLflow: %d WER(s) logged into run %s", len(wers), run_id)
    return run_id if guard.enabled else None


def _log_model(client: Any, run_id: str, spec: TrackingSpec, model_path: Path) -> None:
    """The averaged model with ``mlflow.pytorch`` (pickle format: the transducer has no single
    tensor input for the default 'pt2' export), registered under the corpus' model name. The
    same file twice (a re-scoring) is logged once."""
    digest = file_md5(model_path)
    run = client.get_run(run_id)
    if run.data.tags.get("model.md5") == digest:
        log.info("MLflow: %s already logged in run %s", model_path.name, run_id)
        return
    import mlflow
    import mlflow.pytorch
    import torch

    from zipasr.decode.model import load_model

    net = load_model(model_path)
    mlflow.set_tracking_uri(spec.tracking_uri())
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pytorch.log_model(
            net, name="model", serialization_format="pickle",
            # explicit requirements: inferring them starts a slow subprocess
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
            registered_model_name=spec.registered_model if spec.register_model else None,
            await_registration_for=0)
        mlflow.set_tags({"model.md5": digest, "model.file": model_path.name,
                         "model.uri": info.model_uri})
    # start_run(run_id=...) ends the run as FINISHED, which it is: training ended before scoring
