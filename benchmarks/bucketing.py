"""Batches per epoch and padding of the training sampler, per number of duration buckets.

The cost of a training step follows the padded batch (N x longest cut), the data an epoch
covers follows the real durations: fewer batches for the same cuts at the same padded size is
training time saved. Runs the trainer's own sampler (``zipasr.train.data.make_train_loader``
with the training defaults but for ``max_duration`` and ``num_buckets``) over a cut manifest,
no model and no feature loading:

    .venv/bin/python benchmarks/bucketing.py data/fbank/synth_cuts_train.jsonl.gz \\
        --max-duration 12.5 --world-size 2 --num-buckets 10 30 50
"""

from __future__ import annotations

import argparse


def epoch_stats(cuts, max_duration: float, num_buckets: int, world_size: int) -> dict:
    from zipasr.train.config import TrainConfig
    from zipasr.train.data import make_train_loader

    cfg = TrainConfig(max_duration=max_duration, num_buckets=num_buckets, num_workers=0)
    _, sampler, _ = make_train_loader(cuts, cfg, world_size=world_size, rank=0)
    sampler.set_epoch(1)
    batches = real = padded = 0.0
    for batch in sampler:
        durations = [c.duration for c in batch]
        batches += 1
        real += sum(durations)
        padded += max(durations) * len(durations)
    return {"num_buckets": num_buckets, "batches": int(batches), "real": real / batches,
            "padded": padded / batches}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cuts", help="a lhotse cut manifest (the training cuts)")
    ap.add_argument("--max-duration", type=float, default=12.5)
    ap.add_argument("--world-size", type=int, default=2, help="rank 0 of this many is shown")
    ap.add_argument("--num-buckets", type=int, nargs="+", default=[10, 30, 50])
    args = ap.parse_args()

    from lhotse import CutSet

    cuts = CutSet.from_file(args.cuts).to_eager()
    rows = [epoch_stats(cuts, args.max_duration, n, args.world_size) for n in args.num_buckets]
    base = rows[0]["batches"]
    print(f"{len(cuts)} cuts, max_duration {args.max_duration} s, rank 0 of {args.world_size}")
    print(f"{'buckets':>7} {'batches':>8} {'ratio':>6} {'real s/batch':>13} "
          f"{'padded s/batch':>15} {'padding':>8}")
    for r in rows:
        print(f"{r['num_buckets']:7d} {r['batches']:8d} {r['batches'] / base:6.3f} "
              f"{r['real']:13.2f} {r['padded']:15.2f} {100 * (r['padded'] / r['real'] - 1):7.1f}%")


if __name__ == "__main__":
    main()
