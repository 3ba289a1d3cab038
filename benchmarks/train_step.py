"""Training throughput: seconds of audio per second of wall time, per model preset.

Each step is a full training step of the real loop's pieces (forward with the pruned RNN-T
loss, backward, ScaledAdam + Eden) on a batch of fixed total duration built from random
features and random transcripts. Presets run side by side in one process.

    .venv/bin/python benchmarks/train_step.py --presets demo xs --batch-seconds 100 --steps 5
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch

from zipasr.model import Transducer, set_batch_count
from zipasr.optim import Eden, ScaledAdam, get_parameter_groups_with_lrs


def make_batch(batch_seconds: float, utt_seconds: float, vocab: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    n = max(1, int(batch_seconds // utt_seconds))
    frames = int(utt_seconds * 100)
    x = torch.randn(n, frames, 80, generator=g)
    x_lens = torch.full((n,), frames, dtype=torch.int64)
    tokens = max(1, int(utt_seconds * 3))  # ~3 BPE tokens per second of speech
    y = [torch.randint(1, vocab, (tokens,), generator=g).tolist() for _ in range(n)]
    return x, x_lens, y, n * utt_seconds


def setup(preset: str, vocab: int) -> tuple[Transducer, ScaledAdam, Eden]:
    """The model in training mode past its warm-up (the steady-state cost), its optimizer and
    schedule, as the training loop builds them."""
    torch.manual_seed(0)
    model = Transducer.from_preset(preset, vocab_size=vocab)
    model.train()
    set_batch_count(model, 100000.0)
    opt = ScaledAdam(get_parameter_groups_with_lrs(model, lr=0.045, include_names=True),
                     lr=0.045, clipping_scale=2.0)
    return model, opt, Eden(opt, 7500, 3.5)


def one_step(forward: Callable, opt: ScaledAdam, sched: Eden, step: int, batch: tuple,
             sync: Callable[[], None] | None = None,
             autocast: AbstractContextManager | None = None, **kwargs) -> None:
    """One training step as the loop runs it past warm-up: forward with the pruned RNN-T loss
    (under ``autocast`` if given; ``kwargs`` go to the forward), loss 0.5 simple + pruned,
    backward, ``sync`` (e.g. a gradient all-reduce) if given, then Eden and ScaledAdam."""
    x, x_lens, y, _ = batch
    with autocast or nullcontext():
        simple, pruned, _ = forward(x, x_lens, y, **kwargs)
    (0.5 * simple + pruned).backward()
    if sync is not None:
        sync()
    sched.step_batch(step)
    opt.step()
    opt.zero_grad(set_to_none=True)


def bench(preset: str, batch_seconds: float, utt_seconds: float, steps: int, vocab: int,
          precision: str) -> dict:
    model, opt, sched = setup(preset, vocab)
    dtype = torch.bfloat16 if precision == "bf16" else None
    joiner_bf16 = precision == "fp32-jbf16"  # fp32 with train.joiner_bf16
    times = []
    audio = 0.0
    for step in range(steps + 1):
        batch = make_batch(batch_seconds, utt_seconds, vocab, step)
        t0 = time.perf_counter()
        one_step(model, opt, sched, step, batch, joiner_bf16=joiner_bf16,
                 autocast=torch.autocast("cpu", dtype=dtype or torch.float32,
                                         enabled=dtype is not None))
        secs = batch[3]
        if step:  # the first step pays one-time costs (numba compile, allocations)
            times.append(time.perf_counter() - t0)
            audio += secs
    params = sum(p.numel() for p in model.parameters())
    return {"preset": preset, "params": params, "precision": precision,
            "s_per_step": sum(times) / len(times), "audio_per_s": audio / sum(times)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["demo", "M"])
    ap.add_argument("--batch-seconds", type=float, default=100.0)
    ap.add_argument("--utt-seconds", type=float, default=5.0)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--vocab", type=int, default=500)
    ap.add_argument("--precision", nargs="+", default=["fp32"],
                    choices=["fp32", "bf16", "fp32-jbf16"],
                    help="fp32-jbf16: fp32 with the joiner in bf16 (train.joiner_bf16)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = [bench(p, args.batch_seconds, args.utt_seconds, args.steps, args.vocab, prec)
            for p in args.presets for prec in args.precision]
    base = rows[0]["audio_per_s"]
    print(f"batch {args.batch_seconds:.0f} s of {args.utt_seconds:.0f}-s utterances, "
          f"vocab {args.vocab}, {args.threads} thread(s), {args.steps} timed steps")
    print(f"{'preset':8} {'precision':10} {'params':>12} {'s/step':>8} {'audio s/s':>10} "
          f"{'ratio':>6}")
    for r in rows:
        print(f"{r['preset']:8} {r['precision']:10} {r['params']:12,d} {r['s_per_step']:8.2f} "
              f"{r['audio_per_s']:10.1f} {r['audio_per_s'] / base:6.2f}")


if __name__ == "__main__":
    main()
