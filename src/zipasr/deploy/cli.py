"""Subcommands ``transcribe`` and ``export-onnx``: what a user does with a trained model.

Registration is argparse only; the handlers import torch, onnx and the rest lazily.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from zipasr.decode.cli import (
    add_fusion_arguments,
    add_model_arguments,
    add_streaming_arguments,
    fusion_of,
    model_config_of,
    streaming_of,
)
from zipasr.decode.names import METHODS


def register(sub: argparse._SubParsersAction) -> None:
    _register_transcribe(sub)
    _register_export_onnx(sub)


# -- transcribe ---------------------------------------------------------------------------


_TRANSCRIBE_EPILOG = """\
output (stdout, one line per file, in the order given):
  default   PATH<TAB>TEXT (the path as given; `cut -f2` gives the text)
  --json    one JSON object per line: {"file", "duration", "text", "tokens" (BPE pieces),
            "token_ids", "timestamps" (start of each token, s), "words": [{"word", "start"}]}
            A token's start is the encoder frame at which the search emitted it times the
            model's output frame shift (40 ms for 10 ms features subsampled 4x); a word
            starts at its first piece. modified_beam_search: the frames of its best
            hypothesis' path (where paths to one token sequence merge, the best one's).

audio: WAV, FLAC, OGG, MP3 (libsndfile) and what else lhotse's backends read, any sample
rate (resampled to 16 kHz) and channel count (averaged to mono). Features are the training
features: lhotse Fbank, 10 ms shift, no dither, the model's number of mel bins. Each file
is decoded whole (no chunking; attention memory grows with the square of its length): split
recordings longer than a few minutes first. A causal (streaming) model decodes any length
chunk by chunk with --streaming (docs/streaming.md).

errors: a missing, empty or undecodable file is named on stderr and skipped; the others are
still transcribed. Exit status: 0 if every file was transcribed, 2 if any failed (or the
model, BPE model or options are unusable). A file shorter than ~0.1 s gets an empty
transcript and a warning.
"""


def _register_transcribe(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "transcribe", help="transcribe audio files with a trained model",
        description="Transcribe audio files with a trained Zipformer transducer.",
        epilog=_TRANSCRIBE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("audio", nargs="+", metavar="AUDIO", help="audio files")
    add_model_arguments(p)
    p.add_argument("--bpe-model", type=Path, required=True,
                   help="the sentencepiece model the model was trained with (lang_bpe_N/bpe.model)")
    p.add_argument("--method", default="greedy_search", choices=METHODS,
                   help="as `zipasr decode --method`")
    p.add_argument("--beam", "--beam-size", dest="beam", type=int, default=4,
                   help="beam of the beam searches (default 4)")
    p.add_argument("--json", action="store_true",
                   help="JSON Lines with tokens and token/word start times")
    p.add_argument("--max-duration", type=float, default=0.0,
                   help="batch consecutive files while (files x longest) <= this many seconds; "
                        "default 0: one file at a time, so a file's transcript does not depend "
                        "on the other files (padding in a batch can shift near-ties)")
    add_fusion_arguments(p)
    add_streaming_arguments(p)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if any)")
    p.add_argument("--num-threads", type=int, default=None, help="torch intra-op threads")
    p.set_defaults(func=_transcribe)


def _transcribe(args: argparse.Namespace) -> int:
    import sys

    import torch

    from zipasr.deploy.transcribe import (
        Transcript,
        format_json,
        load_transcriber,
        transcribe_files,
    )
    from zipasr.errors import ZipasrError

    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    if args.beam < 1:
        raise ZipasrError(f"--beam must be >= 1, not {args.beam}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    transcriber = load_transcriber(args.model, args.bpe_model, model_config=model_config_of(args),
                                   vocab_size=args.vocab_size, method=args.method,
                                   beam=args.beam, device=device, streaming=streaming_of(args),
                                   fusion=lambda sp: fusion_of(args, sp, device))

    def on_result(t: Transcript) -> None:
        print(format_json(t) if args.json else t.line(), flush=True)

    def on_error(path: str, reason: str) -> None:
        print(f"zipasr transcribe: error: {path}: {reason}", file=sys.stderr, flush=True)

    failed = transcribe_files(transcriber, args.audio, max_duration=args.max_duration,
                              on_result=on_result, on_error=on_error)
    if failed:
        print(f"zipasr transcribe: {failed} of {len(args.audio)} files failed",
              file=sys.stderr, flush=True)
        return 2
    return 0


# -- export-onnx --------------------------------------------------------------------------


_EXPORT_EPILOG = """\
writes into OUT_DIR (replaced whole, never left half-written):
  encoder.onnx decoder.onnx joiner.onnx tokens.txt       for sherpa-onnx's transducer recognizer
  encoder.int8.onnx decoder.int8.onnx joiner.int8.onnx   dynamic int8 (unless --no-int8)
Each export is checked against the PyTorch model in onnxruntime before it is written.

A non-causal (offline) model: sherpa_onnx.OfflineRecognizer.from_transducer(...).
A causal (streaming) model needs --streaming: the encoder then runs one chunk of
--chunk-size 50 Hz frames (2 x chunk feature frames, 13 more of look-ahead) with
--left-context-frames of attention history, carrying its caches between calls, for
sherpa_onnx.OnlineRecognizer.from_transducer(...). sherpa-onnx decodes a chunk only once
the features reach one frame past it: append about (2 x chunk + 13) x 10 ms of silence
(0.45 s for chunk 16) before input_finished() so the end of the audio is decoded.
docs/deploy.md has the contract (inputs, outputs, states, metadata).
"""


def _register_export_onnx(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export-onnx", help="export a trained model to ONNX for sherpa-onnx",
        description="Export a Zipformer transducer to ONNX (encoder, decoder, joiner, tokens) "
                    "for sherpa-onnx's offline recognizer, or with --streaming (causal "
                    "models) for its online (streaming) recognizer.",
        epilog=_EXPORT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p, vocab_default="the BPE model's or tokens.txt's")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--bpe-model", type=Path,
                     help="the sentencepiece model the model was trained with (tokens.txt is "
                          "written from it)")
    src.add_argument("--tokens", type=Path, help="a tokens.txt (symbol id per line) to copy")
    p.add_argument("--out-dir", type=Path, required=True, help="output directory")
    p.add_argument("--int8", action=argparse.BooleanOptionalAction, default=True,
                   help="also write the int8 models (default: yes)")
    p.add_argument("--opset", type=int, default=13, help="ONNX opset (default 13, as icefall)")
    stream = p.add_argument_group("streaming (causal models)")
    stream.add_argument("--streaming", action="store_true",
                        help="export the chunk-wise streaming encoder for sherpa-onnx's "
                             "OnlineRecognizer (required for a causal model, refused for a "
                             "non-causal one)")
    stream.add_argument("--chunk-size", type=int, default=16,
                        help="50 Hz frames per chunk: a positive multiple of every "
                             "downsampling factor (default 16, icefall's; latency grows with it)")
    stream.add_argument("--left-context-frames", type=int, default=128,
                        help="50 Hz frames of attention history: a positive multiple of "
                             "--chunk-size, at least the convolutions' left context (default "
                             "128, icefall's)")
    p.set_defaults(func=_export_onnx)


def _export_onnx(args: argparse.Namespace) -> int:
    import logging

    from zipasr.decode.model import load_model
    from zipasr.deploy.onnx_export import export_onnx
    from zipasr.errors import ZipasrError
    from zipasr.lang.bpe import read_tokens

    if args.bpe_model is not None:
        import sentencepiece as spm

        if not args.bpe_model.is_file():
            raise ZipasrError(f"BPE model {args.bpe_model} does not exist")
        num_tokens = spm.SentencePieceProcessor(model_file=str(args.bpe_model)).get_piece_size()
    else:
        if not args.tokens.is_file():
            raise ZipasrError(f"tokens file {args.tokens} does not exist")
        num_tokens = len(read_tokens(args.tokens))
    model = load_model(args.model, model_config_of(args),
                       vocab_size=args.vocab_size or num_tokens)
    if model.config.vocab_size != num_tokens:
        raise ZipasrError(f"model vocab size {model.config.vocab_size} != "
                          f"{num_tokens} tokens in {args.bpe_model or args.tokens}")
    kind = "streaming" if args.streaming else "non-streaming"
    common = dict(bpe_model=args.bpe_model, tokens=args.tokens, int8=args.int8, opset=args.opset,
                  comment=f"{kind} zipformer2 from {args.model.name} (zipasr export-onnx)")
    if args.streaming:
        from zipasr.deploy.onnx_streaming import export_onnx_streaming

        report = export_onnx_streaming(model, args.out_dir, chunk_size=args.chunk_size,
                                       left_context_frames=args.left_context_frames, **common)
    else:
        report = export_onnx(model, args.out_dir, **common)
    logging.getLogger("zipasr.deploy").info(
        "exported %s to %s: %s", args.model, report.out_dir, " ".join(report.files))
    print(report.out_dir)
    return 0
