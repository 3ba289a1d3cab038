"""Subcommand ``train``: train or resume a Zipformer transducer in an experiment directory."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train (or resume) a Zipformer transducer",
                       description="Trains to --train's num_epochs in EXP_DIR, resuming from "
                                   "its newest checkpoint when one of the same configuration "
                                   "exists. Writes epoch-N.pt, checkpoint-B.pt, metrics.jsonl.")
    p.add_argument("--train-cuts", type=Path, nargs="+", required=True)
    p.add_argument("--valid-cuts", type=Path, nargs="+", required=True)
    p.add_argument("--bpe-model", type=Path, required=True)
    p.add_argument("--exp-dir", type=Path, required=True)
    p.add_argument("--model", type=json.loads, default={"preset": "demo"},
                   help='model config as JSON, e.g. \'{"preset": "M"}\' (ZipformerConfig fields)')
    p.add_argument("--train", type=json.loads, default={},
                   help="training options as JSON (TrainConfig fields)")
    p.add_argument("--summary", type=Path, help="write the run summary as JSON here (atomic)")
    p.add_argument("--on-the-fly-features", type=json.loads, nargs="?", const={}, default=None,
                   metavar="JSON",
                   help="compute the training features from the audio in the loader (cuts made "
                        "by zipasr fbank --no-features), with the data stage's fbank and these "
                        'of its options, e.g. \'{"num_mel_bins": 80, "frame_shift": 0.01, '
                        '"dither": 0.0}\' (default: its defaults). Validation cuts with stored '
                        "features keep them")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar (default: when stderr is a terminal)")
    p.add_argument("--nproc-per-node", type=int, default=1, metavar="N",
                   help="DDP processes per node (one per GPU; gloo processes on a CPU). Above 1, "
                        "or in a Slurm job spanning nodes, the command relaunches itself "
                        "through torchrun (and srun on several nodes); see zipasr.train.launch")
    p.set_defaults(func=_train)


def _train(args: argparse.Namespace) -> int:
    import logging
    import os
    import sys

    from zipasr.train.launch import dist_env, launch_command, worker_env

    if args.nproc_per_node < 1:
        from zipasr.errors import ZipasrError

        raise ZipasrError(f"--nproc-per-node must be at least 1, not {args.nproc_per_node}")
    cmd = launch_command(args.nproc_per_node, _worker_argv(args))
    if cmd is not None:
        logging.getLogger(__name__).info("launching: %s", " ".join(cmd))
        sys.stdout.flush()
        sys.stderr.flush()
        # torchrun (or srun) takes this process's place; each worker gets its share of threads
        os.execvpe(cmd[0], cmd, worker_env(args.nproc_per_node))
    _, rank, _ = dist_env()
    if rank != 0:  # one log, rank 0's; the other ranks still report warnings and errors
        logging.getLogger("zipasr").setLevel(logging.WARNING)
    try:
        return _train_here(args, rank)
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def _worker_argv(args: argparse.Namespace) -> list[str]:
    """This command's options, for the workers torchrun starts."""
    argv = ["--train-cuts", *map(str, args.train_cuts), "--valid-cuts",
            *map(str, args.valid_cuts), "--bpe-model", str(args.bpe_model),
            "--exp-dir", str(args.exp_dir), "--model", json.dumps(args.model),
            "--train", json.dumps(args.train), "--nproc-per-node", str(args.nproc_per_node)]
    if args.summary:
        argv += ["--summary", str(args.summary)]
    if args.on_the_fly_features is not None:
        argv += ["--on-the-fly-features", json.dumps(args.on_the_fly_features)]
    if args.progress is not None:
        argv.append("--progress" if args.progress else "--no-progress")
    return argv


def _train_here(args: argparse.Namespace, rank: int) -> int:
    from zipasr.io import write_text_atomic
    from zipasr.track.spec import TrackingSpec
    from zipasr.track.tracker import Tracker
    from zipasr.train.config import TrainConfig
    from zipasr.train.trainer import Trainer

    cfg = TrainConfig.from_dict(args.train)
    # MLflow tracking when the workflow (or the user) sets ZIPASR_TRACKING; see zipasr.track
    tracker = Tracker(TrackingSpec.from_env() if rank == 0 else None)  # rank 0 tracks
    trainer = Trainer(cfg, args.model, train_cuts=args.train_cuts, valid_cuts=args.valid_cuts,
                      bpe_model=args.bpe_model, exp_dir=args.exp_dir, progress=args.progress,
                      tracker=tracker, on_the_fly_features=args.on_the_fly_features)
    try:
        summary = trainer.run()
    except BaseException:
        tracker.finish("KILLED")  # tracking hook: the run shows as interrupted; resume reopens it
        raise
    if rank != 0:
        return 0
    print(json.dumps(summary, indent=2))
    if args.summary:
        write_text_atomic(args.summary, json.dumps(summary, indent=2) + "\n")
    tracker.finish("FINISHED", args.exp_dir, summary)  # tracking hook
    return 0
