"""Deployment benchmark: real-time factor and WER of sherpa-onnx on the exported model (fp32 and
int8) against zipasr's own PyTorch decoding, side by side, batch 1, one thread.

Every configuration transcribes the same utterances from their audio (held in memory: no file
I/O is timed), one at a time, as a deployed recognizer would:

* ``zipasr``: lhotse Fbank (the training features), ``forward_encoder`` and
  ``zipasr.decode.search`` in PyTorch (what ``zipasr transcribe`` runs);
* ``sherpa fp32`` / ``sherpa int8``: sherpa-onnx 2.0.1's ``OfflineRecognizer`` on
  ``{onnx_dir}/{encoder,decoder,joiner}[.int8].onnx`` (its own fbank, onnxruntime).

With ``--streaming`` (a causal model exported with ``zipasr export-onnx --streaming``): zipasr
decodes chunk by chunk (``zipasr decode --streaming``'s ``ChunkwiseDecoder``, one stream) at the
export's chunk size and left context, and sherpa-onnx's ``OnlineRecognizer`` is fed the audio
in 0.1 s pieces, then (2 x chunk + 13) x 10 ms + 50 ms of silence (sherpa decodes only whole
chunks) and ``input_finished()``.

Greedy search and modified beam search (beam / max_active_paths ``--beam``). Configurations run
round-robin ``--reps`` times, so load from other processes hits all of them alike; medians are
reported with the load average before and after. WER is against the cuts' transcripts; the
"same as zipasr" column counts utterances whose words equal the PyTorch hypothesis.

    .venv/bin/python benchmarks/deploy.py \\
        --model exp/synth-demo/epoch-2_avg-1_use-averaged-model.pt \\
        --bpe-model data/lang_bpe_1000/bpe.model --onnx-dir exp/synth-demo/onnx \\
        --cuts data/fbank/synth_cuts_test.jsonl.gz [--limit 100] [--reps 3] [--out results.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

METHODS = ("greedy_search", "modified_beam_search")


def pytorch_transcriber(model_path: Path, bpe_model: Path, method: str, beam: int,
                        streaming: tuple[int, int] | None = None
                        ) -> Callable[[np.ndarray], list[str]]:
    import sentencepiece as spm
    from lhotse import Fbank, FbankConfig

    from zipasr.decode.model import load_model
    from zipasr.decode.search import search

    sp = spm.SentencePieceProcessor(model_file=str(bpe_model))
    model = load_model(model_path, vocab_size=sp.get_piece_size())
    fbank = Fbank(FbankConfig(num_mel_bins=80, frame_shift=0.01, dither=0.0))

    if streaming is not None:
        from zipasr.decode.streaming import ChunkwiseDecoder

        decoder = ChunkwiseDecoder(model, *streaming, method=method, beam=beam, num_streams=1)

        def transcribe_chunkwise(wave: np.ndarray) -> list[str]:
            x = torch.from_numpy(fbank.extract(wave, 16000))
            ((_, hyp),) = decoder.decode([(0, x)])
            return sp.decode(hyp.tokens).split()

        return transcribe_chunkwise

    @torch.inference_mode()
    def transcribe(wave: np.ndarray) -> list[str]:
        x = torch.from_numpy(fbank.extract(wave, 16000)).unsqueeze(0)
        out, lens = model.forward_encoder(x, torch.tensor([x.shape[1]]))
        (hyp,) = search(model, out, lens, method, beam=beam)
        return sp.decode(hyp.tokens).split()

    return transcribe


def sherpa_transcriber(onnx_dir: Path, method: str, beam: int, int8: bool,
                       streaming: tuple[int, int] | None = None
                       ) -> Callable[[np.ndarray], list[str]]:
    import sherpa_onnx

    suffix = ".int8" if int8 else ""
    cls = sherpa_onnx.OnlineRecognizer if streaming else sherpa_onnx.OfflineRecognizer
    rec = cls.from_transducer(
        encoder=str(onnx_dir / f"encoder{suffix}.onnx"),
        decoder=str(onnx_dir / f"decoder{suffix}.onnx"),
        joiner=str(onnx_dir / f"joiner{suffix}.onnx"), tokens=str(onnx_dir / "tokens.txt"),
        num_threads=1, decoding_method=method, max_active_paths=beam)

    if streaming is not None:
        silence = np.zeros(round(((2 * streaming[0] + 13) * 0.01 + 0.05) * 16000), np.float32)
        piece = 1600  # 0.1 s

        def transcribe_online(wave: np.ndarray) -> list[str]:
            s = rec.create_stream()
            audio = np.concatenate([wave, silence])
            for start in range(0, len(audio), piece):
                s.accept_waveform(16000, audio[start:start + piece])
                while rec.is_ready(s):
                    rec.decode_stream(s)
            s.input_finished()
            while rec.is_ready(s):
                rec.decode_stream(s)
            return rec.get_result(s).split()

        return transcribe_online

    def transcribe(wave: np.ndarray) -> list[str]:
        s = rec.create_stream()
        s.accept_waveform(16000, wave)
        rec.decode_stream(s)
        return s.result.text.split()

    return transcribe


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True, help="averaged model or checkpoint")
    ap.add_argument("--bpe-model", type=Path, required=True)
    ap.add_argument("--onnx-dir", type=Path, required=True, help="zipasr export-onnx output")
    ap.add_argument("--cuts", type=Path, required=True, help="cuts with recordings (16 kHz)")
    ap.add_argument("--limit", type=int, default=0, help="first N cuts (0: all)")
    ap.add_argument("--beam", type=int, default=4)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None, help="also write the table here")
    ap.add_argument("--streaming", action="store_true",
                    help="a streaming export: chunk-wise zipasr vs sherpa's OnlineRecognizer")
    args = ap.parse_args()
    streaming = None
    if args.streaming:
        from zipasr.deploy.onnx_export import read_metadata

        meta = read_metadata(args.onnx_dir / "encoder.onnx")
        # metadata: feature frames per chunk, and the first stack's (50 Hz) left context
        streaming = (int(meta["decode_chunk_len"]) // 2,
                     int(meta["left_context_len"].split(",")[0]))

    from lhotse import CutSet

    from zipasr.decode.scoring import error_stats

    torch.set_num_threads(1)  # batch 1, one thread for all (sherpa: num_threads=1)
    cuts = CutSet.from_file(args.cuts).to_eager()
    if args.limit:
        cuts = cuts.subset(first=args.limit)
    waves = [np.ascontiguousarray(c.load_audio()[0], dtype=np.float32) for c in cuts]
    refs = [" ".join(s.text for s in c.supervisions).split() for c in cuts]
    audio = sum(len(w) for w in waves) / 16000

    configs: dict[tuple[str, str], Callable[[np.ndarray], list[str]]] = {}
    for method in METHODS:
        configs[(method, "zipasr")] = pytorch_transcriber(args.model, args.bpe_model, method,
                                                           args.beam, streaming)
        configs[(method, "sherpa fp32")] = sherpa_transcriber(args.onnx_dir, method,
                                                              args.beam, False, streaming)
        configs[(method, "sherpa int8")] = sherpa_transcriber(args.onnx_dir, method,
                                                              args.beam, True, streaming)
    for transcribe in configs.values():  # warm-up (first-call allocations, lazy inits)
        transcribe(waves[0])

    load_before = os.getloadavg()[0]
    times: dict[tuple[str, str], list[float]] = {k: [] for k in configs}
    hyps: dict[tuple[str, str], list[list[str]]] = {}
    for _ in range(args.reps):
        for key, transcribe in configs.items():
            t0 = time.perf_counter()
            hyps[key] = [transcribe(w) for w in waves]
            times[key].append(time.perf_counter() - t0)
    load_after = os.getloadavg()[0]

    lines = [
        f"Command: `python benchmarks/deploy.py {' '.join(sys.argv[1:])}`",
        "",
        (f"streaming: chunk {streaming[0]}, left context {streaming[1]} (50 Hz frames); "
         if streaming else "")
        + f"{len(waves)} utterances, {audio:.1f} s of audio; batch 1, 1 thread; torch "
        f"{torch.__version__}, {platform.machine()}, {os.cpu_count()} cores; medians of "
        f"{args.reps} round-robin reps; load average (1 min) {load_before:.2f} before, "
        f"{load_after:.2f} after",
        "",
        "| method | decoder | total s | RTF | speed vs zipasr | WER % | same as zipasr |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for method in METHODS:
        base = statistics.median(times[(method, "zipasr")])
        for name in ("zipasr", "sherpa fp32", "sherpa int8"):
            key = (method, name)
            t = statistics.median(times[key])
            wer = error_stats([(str(i), r, h) for i, (r, h) in
                               enumerate(zip(refs, hyps[key], strict=True))]).wer
            same = sum(h == z for h, z in zip(hyps[key], hyps[(method, "zipasr")],
                                              strict=True))
            lines.append(f"| {method} | {name} | {t:.2f} | {t / audio:.4f} | "
                         f"{base / t:.2f}x | {wer:.2f} | {same} / {len(waves)} |")
    table = "\n".join(lines) + "\n"
    print(table, end="")
    if args.out is not None:
        args.out.write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
