"""Subcommand ``bpe``: training transcripts → sentencepiece model + tokens.txt."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bpe", help="train a sentencepiece BPE model on training transcripts")
    p.add_argument("--supervisions", type=Path, nargs="+", required=True,
                   help="training supervision manifests (their text is the BPE corpus)")
    p.add_argument("--lang-dir", type=Path, required=True)
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--model-type", default="unigram", choices=["unigram", "bpe"])
    p.add_argument("--character-coverage", type=float, default=1.0)
    p.set_defaults(func=_bpe)


def _bpe(args: argparse.Namespace) -> int:
    from zipasr.io import scratch_dir
    from zipasr.lang.bpe import train_bpe, write_transcripts

    # next to the output, not in /tmp: what a killed run leaves, the rerun removes
    with scratch_dir(args.lang_dir) as tmp:
        text = tmp / "transcript_words.txt"
        write_transcripts(args.supervisions, text)
        train_bpe(text, args.lang_dir, args.vocab_size, model_type=args.model_type,
                  character_coverage=args.character_coverage)
    return 0
