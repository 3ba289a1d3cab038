"""Subcommands ``track-results``, ``ui``, ``dvc-commit`` and ``dvc-restore``."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("track-results", help="log WERs, result files and the averaged model "
                                             "into the experiment's MLflow run")
    p.add_argument("--exp-dir", type=Path, required=True)
    p.add_argument("--summaries", type=Path, nargs="*", default=[], metavar="WER_SUMMARY",
                   help="the wer-summary files of the WER table: their WERs and result files "
                        "are logged (no directory search)")
    p.add_argument("--wer-table", type=Path)
    p.add_argument("--model", type=Path, help="the averaged model to log and register")
    p.add_argument("--log-files", type=Path, nargs="*", default=[])
    p.set_defaults(func=_track_results)

    p = sub.add_parser("ui", help="start the MLflow UI on the tracking backend")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--backend-store-uri", default="",
                   help="default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here")
    p.set_defaults(func=_ui)

    p = sub.add_parser("dvc-commit", help="record the DAG's outputs in dvc.lock and the DVC "
                                          "cache, then dvc push (in a DVC repository)")
    p.add_argument("--no-push", dest="push", action="store_false")
    p.set_defaults(func=_dvc_commit)

    p = sub.add_parser("dvc-restore", help="dvc pull, then order the restored files' times as "
                                           "the DAG's so Snakemake sees them up to date")
    p.add_argument("--no-pull", dest="pull", action="store_false")
    p.add_argument("snakemake_args", nargs=argparse.REMAINDER,
                   help="extra snakemake arguments (e.g. --configfile ...), after --")
    p.set_defaults(func=_dvc_restore)


def _track_results(args: argparse.Namespace) -> int:
    from zipasr.track.results import log_results
    from zipasr.track.spec import TrackingSpec

    spec = TrackingSpec.from_env()
    if not spec.enabled:
        return 0
    # never fails the rule: a tracking problem is a warning (logged by the guard)
    log_results(spec, args.exp_dir, summaries=args.summaries, model=args.model,
                wer_table=args.wer_table, log_files=args.log_files)
    return 0


def _ui(args: argparse.Namespace) -> int:
    from zipasr.track.ui import run_ui

    return run_ui(args.host, args.port, args.backend_store_uri)


def _dvc_commit(args: argparse.Namespace) -> int:
    from zipasr.track.dvc import commit_and_push

    return commit_and_push(Path.cwd(), push=args.push)


def _dvc_restore(args: argparse.Namespace) -> int:
    from zipasr.track.dvc import restore

    extra = [a for a in args.snakemake_args if a != "--"]
    return restore(Path.cwd(), pull=args.pull, snakemake_args=extra)
