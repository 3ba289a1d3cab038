"""Streaming benchmark: chunk latency and real-time factor of chunk-wise decoding of a causal
model, per (chunk, left context), side by side with its whole-utterance simulation.

Per setting, over the same utterances (features loaded into memory first: no I/O is timed):

* ``1 stream``: utterances decoded one at a time, chunk by chunk (``zipasr decode --streaming
  --num-streams 1``): the compute time of each chunk step (median / 95th percentile / max)
  against the audio a chunk carries, and the real-time factor (compute / audio);
* ``N streams``: ``--num-streams N`` utterances advanced together, as a server batches
  streams: the time of one step (every stream's next chunk) and the RTF;
* ``simulated``: the whole utterance in one forward with the chunk mask (``zipasr decode
  --chunk-size``), batched like offline decoding: the RTF a non-live use would see.

The latency a user hears is the chunk's audio (the decoder waits for it) plus the look-ahead
(13 feature frames: 130 ms) plus the compute time of a step. Settings run round-robin
``--reps`` times so other load hits them alike; medians are reported with the load average.

    .venv/bin/python benchmarks/streaming.py \\
        --model exp/synth-streaming/epoch-2_avg-1_use-averaged-model.pt \\
        --cuts data/fbank/synth_cuts_test.jsonl.gz --settings 16:128 32:256 \\
        [--streams 50] [--method greedy_search] [--limit 100] [--reps 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

FRAME_SECONDS = 0.01  # feature frame shift


def load(args: argparse.Namespace) -> tuple[object, list[torch.Tensor], float]:
    from lhotse import CutSet

    from zipasr.decode.features import FeatureLoader
    from zipasr.decode.model import load_model

    model = load_model(args.model)
    cuts = CutSet.from_file(args.cuts).to_eager()
    if args.limit:
        cuts = cuts.subset(first=args.limit)
    loader = FeatureLoader()
    feats = [loader(c) for c in cuts]
    return model, feats, sum(c.duration for c in cuts)


def chunkwise(model: object, feats: list[torch.Tensor], chunk: int, left: int, method: str,
              streams: int) -> tuple[float, list[float]]:
    """(wall seconds, per-step seconds) of decoding every utterance chunk-wise."""
    from zipasr.decode.streaming import ChunkwiseDecoder

    dec = ChunkwiseDecoder(model, chunk, left, method=method, num_streams=streams)
    t0 = time.perf_counter()
    for _ in dec.decode(enumerate(feats)):
        pass
    return time.perf_counter() - t0, dec.stats.seconds


@torch.inference_mode()
def simulated(model: object, feats: list[torch.Tensor], chunk: int, left: int, method: str,
              batch: int) -> float:
    from zipasr.decode.search import search
    from zipasr.decode.streaming import configure, simulated_encoder

    configure(model, chunk, left)
    order = sorted(range(len(feats)), key=lambda i: -feats[i].shape[0])  # as decode batches
    t0 = time.perf_counter()
    for start in range(0, len(order), batch):
        enc, lens = simulated_encoder(model, [feats[i] for i in order[start:start + batch]],
                                      chunk)
        search(model, enc, lens, method)
    return time.perf_counter() - t0


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="a causal model (.pt)")
    p.add_argument("--cuts", type=Path, required=True)
    p.add_argument("--settings", nargs="+", default=["16:128", "32:256"],
                   help="chunk:left-context pairs in 50 Hz frames")
    p.add_argument("--streams", type=int, default=50)
    p.add_argument("--method", default="greedy_search")
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, feats, audio = load(args)
    settings = [tuple(int(v) for v in s.split(":")) for s in args.settings]
    load_before = os.getloadavg()[0]
    runs: dict[tuple[int, int, str], list[float]] = {}
    steps: dict[tuple[int, int, str], list[float]] = {}
    with torch.inference_mode():
        for _ in range(args.reps):
            for chunk, left in settings:
                for name, n in (("1 stream", 1), (f"{args.streams} streams", args.streams)):
                    wall, step = chunkwise(model, feats, chunk, left, args.method, n)
                    runs.setdefault((chunk, left, name), []).append(wall)
                    steps.setdefault((chunk, left, name), []).extend(step)
                wall = simulated(model, feats, chunk, left, args.method, args.streams)
                runs.setdefault((chunk, left, "simulated"), []).append(wall)
    print(f"{len(feats)} utterances, {audio:.1f} s of audio, {args.method}, "
          f"{args.threads} thread(s), medians of {args.reps} runs; load average "
          f"{load_before:.2f} -> {os.getloadavg()[0]:.2f}")
    print("| chunk / left context | decoding | step median / p95 / max | RTF | vs simulated |")
    print("|---|---|---|---|---|")
    for chunk, left in settings:
        sim = statistics.median(runs[(chunk, left, "simulated")])
        for name in ("1 stream", f"{args.streams} streams", "simulated"):
            wall = statistics.median(runs[(chunk, left, name)])
            st = steps.get((chunk, left, name))
            step = (f"{1e3 * statistics.median(st):.1f} / {1e3 * pct(st, 0.95):.1f} / "
                    f"{1e3 * max(st):.1f} ms" if st else "-")
            print(f"| {chunk} / {left} ({2 * chunk * FRAME_SECONDS * 1e3:.0f} ms) | {name} "
                  f"| {step} | {wall / audio:.4f} | {wall / sim:.2f}x |")


if __name__ == "__main__":
    main()
