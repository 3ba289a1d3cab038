"""Subcommands ``average``, ``decode`` and ``wer-table``: the DAG's last three stages."""

from __future__ import annotations

import argparse
from pathlib import Path

from zipasr.decode.names import METHODS


def add_model_arguments(p: argparse.ArgumentParser,
                        vocab_default: str = "the BPE model's") -> None:
    """``--model`` and what a file without its own model_config needs (what
    ``model.load_model`` takes); shared by decode, transcribe and export-onnx."""
    p.add_argument("--model", type=Path, required=True,
                   help="training checkpoint (epoch-N.pt), averaged model (zipasr average), "
                        "or icefall pretrained.pt (with --preset/--model-config)")
    p.add_argument("--model-config", default=None,
                   help="for files without model_config: JSON object, JSON/YAML file, or preset")
    p.add_argument("--preset", default=None,
                   help="model preset (S, M, L, demo, xs) for files without model_config")
    p.add_argument("--vocab-size", type=int, default=None,
                   help=f"vocab size for --preset (default: {vocab_default})")


def model_config_of(args: argparse.Namespace) -> dict | None:
    """The model configuration ``add_model_arguments``' options give, for ``load_model``."""
    from zipasr.decode.model import parse_model_config

    cfg = parse_model_config(args.model_config)
    if args.preset is not None:
        cfg = {**(cfg or {}), "preset": args.preset}
    return cfg


def add_streaming_arguments(p: argparse.ArgumentParser) -> None:
    """How a causal model decodes (decode and transcribe); ``streaming_of`` reads them."""
    g = p.add_argument_group(
        "causal (streaming) models",
        "Without these a causal model sees whole utterances. --chunk-size alone simulates "
        "streaming (one forward with the chunk mask); --streaming decodes chunk by chunk "
        "with cached states, as a live stream is decoded. Both decode the same frames and "
        "give the same tokens (to rounding).")
    g.add_argument("--streaming", action="store_true", help="chunk-wise streaming decoding")
    g.add_argument("--chunk-size", type=int, default=None,
                   help="chunk in 50 Hz frames (16 = 320 ms; default with --streaming: 16)")
    g.add_argument("--left-context-frames", type=int, default=None,
                   help="left context in 50 Hz frames, whole chunks (default: 8 chunks)")
    g.add_argument("--num-streams", type=int, default=50,
                   help="utterances decoded together chunk-wise (icefall's "
                        "--num-decode-streams)")


def add_fusion_arguments(p: argparse.ArgumentParser) -> None:
    """LMs and hotwords of modified beam search (decode and transcribe); ``fusion_of``
    reads them."""
    g = p.add_argument_group(
        "language models and hotwords (modified beam search)",
        "modified_beam_search_lm_shallow_fusion adds lm_scale * log p_LM(token) for every "
        "token a hypothesis appends; modified_beam_search_LODR also adds lodr_scale * log "
        "p_bigram(token) (negative: it subtracts the bigram, an estimate of the transducer's "
        "internal LM). Hotwords bias every modified_beam_search* method.")
    g.add_argument("--lm", type=Path, default=None,
                   help="neural LM: lm.pt of `zipasr train-lm` (its lm_config inside)")
    g.add_argument("--lm-scale", type=float, default=0.3, help="weight of the neural LM")
    g.add_argument("--bigram", type=Path, default=None,
                   help="bigram token LM for LODR: an ARPA file over the BPE pieces "
                        "(`zipasr train-lm` writes bigram.arpa; kenlm's `lmplz -o 2` also fits)")
    g.add_argument("--lodr-scale", type=float, default=-0.24,
                   help="weight of the bigram in LODR (icefall's convention: negative)")
    g.add_argument("--hotwords-file", type=Path, default=None,
                   help="hotwords, one phrase per line, optionally ending in ' :SCORE' "
                        "(sherpa-onnx's hotwords_file format)")
    g.add_argument("--hotwords-score", type=float, default=1.5,
                   help="bonus per matched token of a phrase without its own score")


def fusion_of(args: argparse.Namespace, sp, device) -> object | None:
    """The :class:`~zipasr.decode.fusion.Fusion` of ``add_fusion_arguments``' options for
    ``args.method``, or None (plain search). Options the method does not use are errors,
    not silently ignored."""
    from zipasr.decode.fusion import Fusion
    from zipasr.decode.names import LM_METHODS
    from zipasr.decode.search import check_method
    from zipasr.errors import ZipasrError

    method = args.method
    lm = bigram = context = None
    if method not in LM_METHODS and args.lm is not None:
        raise ZipasrError(f"--lm is used by {' and '.join(LM_METHODS)} only, not {method}")
    if method != "modified_beam_search_LODR" and args.bigram is not None:
        raise ZipasrError(f"--bigram is used by modified_beam_search_LODR only, not {method}")
    if args.lm is not None:
        from zipasr.lm.model import load_rnn_lm

        lm = load_rnn_lm(args.lm, device=device)
        if lm.config.vocab_size != sp.get_piece_size():
            raise ZipasrError(f"LM vocab size {lm.config.vocab_size} != BPE model's "
                              f"{sp.get_piece_size()} ({args.lm})")
    if args.bigram is not None:
        from zipasr.lm.bigram import read_arpa

        bigram = read_arpa(args.bigram, sp)
    if args.hotwords_file is not None:
        from zipasr.decode.hotwords import ContextGraph, parse_hotwords

        context = ContextGraph(parse_hotwords(args.hotwords_file, sp, args.hotwords_score))
    if lm is None and bigram is None and context is None:
        check_method(method, None)
        return None
    fusion = Fusion(lm=lm, lm_scale=args.lm_scale, bigram=bigram, lodr_scale=args.lodr_scale,
                    context=context,
                    hotwords_score=args.hotwords_score if context is not None else None)
    check_method(method, fusion)
    return fusion


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("average", help="average checkpoints of a training run into one model")
    p.add_argument("--exp-dir", type=Path, required=True)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--epoch", type=int, help="end epoch E (uses epoch-*.pt)")
    g.add_argument("--iter", type=int, help="end batch index I (uses checkpoint-*.pt <= I)")
    p.add_argument("--avg", type=int, default=1, help="number of epochs/checkpoints averaged")
    p.add_argument("--last-batches", type=int, default=None, metavar="N",
                   help="instead of --avg: the running average over the last N batches of "
                        "epoch E (from the newest checkpoint-B.pt at least N batches older; "
                        "needs --epoch and --use-averaged-model)")
    p.add_argument("--use-averaged-model", action=argparse.BooleanOptionalAction, default=False,
                   help="icefall's model_avg formula between epoch-(E-avg) and epoch-E "
                        "(what its published WERs use); default: plain averaging")
    p.add_argument("--out", type=Path, required=True, help="output .pt file")
    p.set_defaults(func=_average)

    p = sub.add_parser("decode", help="decode cut manifests and write WER result files")
    add_model_arguments(p)
    p.add_argument("--bpe-model", type=Path, required=True)
    p.add_argument("--cuts", type=Path, nargs="+", action="extend", required=True,
                   help="lhotse cut manifests (features precomputed or computed on the fly)")
    p.add_argument("--test-set", nargs="+", action="extend", default=None,
                   help="names of the test sets (default: from the manifest file names)")
    p.add_argument("--method", default="greedy_search", choices=METHODS,
                   help="transducer searches, their LM variants, and the CTC head's searches")
    p.add_argument("--beam", "--beam-size", dest="beam", type=int, default=4,
                   help="hypotheses kept per frame (modified beam and CTC prefix beam search)")
    p.add_argument("--max-duration", type=float, default=300.0,
                   help="seconds of audio per batch")
    add_fusion_arguments(p)
    add_streaming_arguments(p)
    p.add_argument("--result-dir", type=Path, required=True)
    p.add_argument("--suffix", default=None, help="appended to the result file names")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if any)")
    p.add_argument("--num-threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--progress", action="store_true", help="show a progress bar")
    p.set_defaults(func=_decode)

    p = sub.add_parser("wer-table", help="collect wer-summary files into one WER table")
    # the files themselves, not a directory to search: results of an older configuration
    # (another beam, another averaged model) left on disk must not reappear in the table
    p.add_argument("summaries", type=Path, nargs="+", metavar="WER_SUMMARY",
                   help="wer-summary-*.txt files (rows: test sets, columns: settings, both in "
                        "the order given)")
    p.add_argument("--out", type=Path, default=None, help="write the table (TSV) here too")
    p.set_defaults(func=_wer_table)


def _average(args: argparse.Namespace) -> int:
    import logging

    import torch

    from zipasr.decode.average import average_exp_dir
    from zipasr.io import atomic_path

    sd, info = average_exp_dir(args.exp_dir, epoch=args.epoch, iteration=args.iter,
                               avg=args.avg, use_averaged_model=args.use_averaged_model,
                               last_batches=args.last_batches)
    model_config = info.pop("model_config")
    out = {"model": sd, "model_config": model_config, "average": info}
    with atomic_path(args.out) as tmp:
        torch.save(out, tmp)
    logging.getLogger("zipasr.decode").info("wrote %s (from %s)", args.out,
                                            ", ".join(info["files"]))
    return 0


def _decode(args: argparse.Namespace) -> int:
    import logging

    import sentencepiece as spm
    import torch

    from zipasr.decode.driver import decode_and_score
    from zipasr.decode.model import load_model
    from zipasr.errors import ZipasrError

    log = logging.getLogger("zipasr.decode")
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if not args.bpe_model.is_file():
        raise ZipasrError(f"BPE model {args.bpe_model} does not exist")
    sp = spm.SentencePieceProcessor(model_file=str(args.bpe_model))
    cfg = model_config_of(args)
    vocab = args.vocab_size or sp.get_piece_size()
    model = load_model(args.model, cfg, vocab_size=vocab, device=device)
    if model.config.vocab_size != sp.get_piece_size():
        raise ZipasrError(f"model vocab size {model.config.vocab_size} != BPE model's "
                          f"{sp.get_piece_size()} ({args.bpe_model})")
    summaries = decode_and_score(
        model, sp, args.cuts, args.result_dir, method=args.method, beam=args.beam,
        max_duration=args.max_duration, suffix=args.suffix, test_sets=args.test_set,
        device=device, progress=args.progress, streaming=streaming_of(args),
        fusion=fusion_of(args, sp, device),
    )
    for s in summaries:
        line = (f"{s.test_set}\t{s.key}\tWER {s.stats.wer:.2f}% [{s.stats.errors} / "
                f"{s.stats.ref_len}, {s.stats.ins} ins, {s.stats.dels} del, {s.stats.subs} sub]"
                f"\tRTF {s.rtf:.4f} ({s.audio_seconds:.1f} s audio, {s.wall_seconds:.1f} s)")
        print(line)
        log.info("%s", line)
    return 0


def streaming_of(args: argparse.Namespace):
    """The ``Streaming`` settings of decode's options, or None (whole utterances)."""
    from zipasr.decode.driver import Streaming
    from zipasr.errors import ZipasrError

    if args.chunk_size is None and not args.streaming:
        if args.left_context_frames is not None:
            raise ZipasrError("--left-context-frames needs --chunk-size or --streaming")
        return None
    chunk = 16 if args.chunk_size is None else args.chunk_size  # icefall's default
    left = 8 * chunk if args.left_context_frames is None else args.left_context_frames
    return Streaming(chunk, left, simulated=not args.streaming, num_streams=args.num_streams)


def _wer_table(args: argparse.Namespace) -> int:
    from zipasr.decode.scoring import format_wer_table, read_wer_summaries
    from zipasr.errors import ZipasrError
    from zipasr.io import write_text_atomic

    rows = read_wer_summaries(args.summaries)
    if not rows:
        raise ZipasrError(f"no WER in {', '.join(map(str, args.summaries))}")
    table = format_wer_table(rows)
    print(table, end="")
    if args.out is not None:
        write_text_atomic(args.out, table)
    return 0
