"""Subcommand ``synth``: build the embedded default corpus (espeak-ng speech, lhotse manifests)."""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "synth", help="synthesize the default English corpus offline with espeak-ng",
        description="Synthesize train/dev/test speech with espeak-ng (dev/test voices never "
                    "occur in training) and write lhotse manifests "
                    "{prefix}_{recordings,supervisions}_{split}.jsonl.gz. Deterministic for a "
                    "seed whatever --num-jobs is.")
    p.add_argument("--audio-dir", type=Path, required=True,
                   help="FLAC files go to AUDIO_DIR/{train,dev,test}/")
    p.add_argument("--manifest-dir", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    # not given: synthesize_corpus's defaults, the default corpus' sizes (DEFAULT_SIZES of
    # zipasr.data.synth.corpus, not imported here: every `zipasr` command builds this parser)
    for split in ("train", "dev", "test"):
        p.add_argument(f"--num-{split}", type=int, help=f"{split} utterances (default: the "
                       "default corpus', as in config/config.yaml)")
    p.add_argument("--sample-rate", type=int, default=16000)
    p.add_argument("--num-jobs", type=int, default=1, help="parallel synthesis processes")
    p.add_argument("--prefix", default="synth", help="manifest name prefix")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--summary", type=Path,
                   help="write counts, hours, vocabulary, OOV rates and build time as JSON here")
    p.set_defaults(func=_synth)


def _synth(args: argparse.Namespace) -> int:
    from zipasr.data.synth.corpus import corpus_summary, synthesize_corpus

    start = time.perf_counter()
    sizes = {k: n for k in ("num_train", "num_dev", "num_test")
             if (n := getattr(args, k)) is not None}
    manifests = synthesize_corpus(
        args.audio_dir, args.manifest_dir, seed=args.seed, **sizes,
        sample_rate=args.sample_rate, num_jobs=args.num_jobs, prefix=args.prefix,
        progress=not args.no_progress)
    seconds = time.perf_counter() - start
    summary = corpus_summary(manifests)
    summary["build_seconds"] = round(seconds, 1)
    summary["num_jobs"] = args.num_jobs
    logging.getLogger("zipasr").info(
        "synth: %d utterances, %.2f h in %.0f s", sum(
            v["utterances"] for v in summary.values() if isinstance(v, dict)),
        summary["total_hours"], seconds)
    if args.summary:
        from zipasr.io import write_text_atomic

        write_text_atomic(args.summary, json.dumps(summary, indent=2) + "\n")
    return 0
