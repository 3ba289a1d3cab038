"""Subcommand ``train-lm``: the RNN-LM and the bigram token LM of the training transcripts."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

ARPA_FILE = "bigram.arpa"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train-lm", help="train the RNN-LM and the bigram token LM on training transcripts",
        description="Writes OUT_DIR/bigram.arpa (Kneser-Ney token bigram), OUT_DIR/lm.pt "
                    "(RNN-LM) and OUT_DIR/lm-summary.json; the RNN-LM writes epoch-N.pt after "
                    "every epoch and a rerun resumes from the newest. Dev perplexity is "
                    "measured on --valid-supervisions, which never enter training.")
    p.add_argument("--supervisions", type=Path, nargs="+", required=True, metavar="TRAIN",
                   help="training supervision (or cut) manifests: their text is the LM corpus")
    p.add_argument("--valid-supervisions", type=Path, nargs="+", required=True, metavar="DEV",
                   help="validation supervision (or cut) manifests, for perplexity only")
    p.add_argument("--bpe-model", type=Path, required=True)
    p.add_argument("--out-dir", type=Path, required=True)
    p.add_argument("--embedding-dim", type=int, default=256)
    p.add_argument("--hidden-dim", type=int, default=256)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--tie-weights", action=argparse.BooleanOptionalAction, default=True,
                   help="share the input embedding and output matrix (needs embedding dim == "
                        "hidden dim)")
    p.add_argument("--num-epochs", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=500,
                   help="padded token positions per batch")
    p.add_argument("--batch-size", type=int, default=400, help="sentences per batch, at most")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--num-threads", type=int, default=1,
                   help="torch intra-op threads (a resumed run equals an uninterrupted one bit "
                        "for bit with the same count)")
    p.add_argument("--bigram-only", action="store_true", help="only bigram.arpa (and summary)")
    p.add_argument("--strict", action="store_true",
                   help="a segment without text is an error (default: skipped with a warning)")
    p.set_defaults(func=_train_lm)


def _train_lm(args: argparse.Namespace) -> int:
    import sentencepiece as spm
    import torch

    from zipasr.errors import ZipasrError
    from zipasr.lm.data import read_sentences, tokenize
    from zipasr.lm.model import RnnLmConfig
    from zipasr.lm.train import LmTracker, LmTrainConfig
    from zipasr.track.spec import TrackingSpec

    if args.num_threads < 1:
        raise ZipasrError(f"--num-threads must be at least 1, not {args.num_threads}")
    torch.set_num_threads(args.num_threads)
    if not args.bpe_model.is_file():
        raise ZipasrError(f"BPE model {args.bpe_model} does not exist")
    sp = spm.SentencePieceProcessor(model_file=str(args.bpe_model))
    train = tokenize(read_sentences(args.supervisions, strict=args.strict), sp)
    valid = tokenize(read_sentences(args.valid_supervisions, strict=args.strict), sp)
    # options checked before any work (a bad one is a ZipasrError, not a traceback)
    lm_config = RnnLmConfig(vocab_size=sp.get_piece_size(), embedding_dim=args.embedding_dim,
                            hidden_dim=args.hidden_dim, num_layers=args.num_layers,
                            tie_weights=args.tie_weights)
    cfg = LmTrainConfig(num_epochs=args.num_epochs, lr=args.lr, max_tokens=args.max_tokens,
                        max_sentences=args.batch_size, seed=args.seed)
    # MLflow, as zipasr train: when ZIPASR_TRACKING is set; a failing backend only warns
    tracker = LmTracker(TrackingSpec.from_env())
    try:
        summary = _run(args, sp, train, valid, lm_config, cfg, tracker)
    except BaseException:
        tracker.finish("KILLED")  # the run shows as interrupted; a rerun reopens it
        raise
    out = args.out_dir
    tracker.log_artifacts([out / "lm.pt", out / "lm-summary.json", out / ARPA_FILE])
    numbers = {k: v for k, v in summary.items() if isinstance(v, (int, float))}
    numbers.update({f"bigram_{k}": v for k, v in summary["bigram"].items()
                    if isinstance(v, (int, float))})
    tracker.finish("FINISHED", out, numbers)
    return 0


def _run(args: argparse.Namespace, sp: Any, train: list[list[int]], valid: list[list[int]],
         lm_config: Any, cfg: Any, tracker: Any) -> dict[str, Any]:
    import json
    import time

    import torch

    from zipasr.io import file_md5
    from zipasr.lm.train import bigram_perplexity, train_bigram, train_lm, write_summary
    from zipasr.track.tracker import RunInfo
    from zipasr.train.config import fingerprint

    out = args.out_dir
    t0 = time.perf_counter()
    arpa = train_bigram(train, sp, out / ARPA_FILE)
    bigram = {"valid_ppl": bigram_perplexity(arpa, sp, valid),
              "train_ppl": bigram_perplexity(arpa, sp, train),
              "num_unigrams": len(arpa.unigrams), "num_bigrams": len(arpa.bigrams),
              "seconds": round(time.perf_counter() - t0, 2), "file": ARPA_FILE}
    data = {"num_train_sentences": len(train), "num_train_tokens": sum(map(len, train)),
            "num_valid_sentences": len(valid), "num_valid_tokens": sum(map(len, valid))}
    input_md5 = {Path(p): file_md5(p) for p in dict.fromkeys(
        [*args.supervisions, *args.valid_supervisions, args.bpe_model])}
    if args.bigram_only:
        summary = {**data, "bigram": bigram}
        tracker.start(RunInfo(
            exp_dir=out, fingerprint=fingerprint(summary), batch_idx_train=0, log_interval=1,
            train_config={"bigram_only": True}, model_config={"bigram": "interpolated KN"},
            num_params=len(arpa.unigrams) + len(arpa.bigrams), device=torch.device("cpu"),
            input_md5=input_md5, numerics={}, bpe_model=args.bpe_model), resumed=False)
        write_summary(out, summary)
    else:
        summary = train_lm(train, valid, out, lm_config, cfg, tracker=tracker,
                           bpe_model=args.bpe_model, input_md5=input_md5,
                           extra={"bigram": bigram})
    print(json.dumps({k: v for k, v in summary.items() if k != "per_epoch"}, indent=2))
    return summary
