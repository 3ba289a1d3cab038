"""Encoder speed: this tree's Conv-Embed + Zipformer encoder against an earlier commit's.

The earlier ``zipasr.model`` is extracted from git history (``git archive <rev>``) into a
temporary directory and imported as the package ``zipasr_prev_model``; both models get the
same weights (the old state dict loaded strictly into the new model, so names and shapes
must still agree). Three measurements of ``model.forward_encoder`` per preset:

- ``eval fwd``: eval mode under ``torch.inference_mode`` (decoding);
- ``train fwd``: training mode with autograd recording, no backward;
- ``train fwd+bwd``: a training step's encoder part: forward, then backward of
  ``(out * r).sum()`` for a fixed random ``r`` (input features require grad).

Training runs have ``set_batch_count(model, 100000)`` (dropout, layer-skip and balancer
schedules at their late values) and reseed torch and Python's ``random`` before every run, so
both models draw the same dropout masks and skip decisions. Runs are interleaved (old, new,
old, new, ...) so load from other processes hits both alike; medians are reported with the
ratio new / old (wall time, and "cpu r" the same ratio of process CPU time, which
time-slicing by other processes inflates less, and "min r" the ratio of the fastest rounds,
the least disturbed ones). The maximum relative difference
max|new - old| / max|old| is reported for the output and, over all tensors, for the
gradients (input and every parameter).

    .venv/bin/python benchmarks/encoder_speed.py --presets M demo --threads 1 --reps 5

``--noise-floor`` adds the old code against itself at 1 vs 2 threads: float32 rounding alone
moves some gradients (sums that cancel to almost nothing, e.g. attention key biases, whose
exact gradient is 0) by far more than 1e-6 relative, so the gradient figures are to be read
against that floor.
"""

from __future__ import annotations

import argparse
import importlib
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from zipasr.model import Transducer, set_batch_count

REPO = Path(__file__).resolve().parent.parent
PREV_PACKAGE = "zipasr_prev_model"


def import_previous(rev: str, workdir: Path):
    """``zipasr.model`` as of git ``rev``, imported as ``zipasr_prev_model`` (its modules
    import each other relatively, so the renamed copy is self-contained apart from
    ``zipasr.config``/``zipasr.errors``, which come from this tree)."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "src/zipasr/model"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(workdir)], input=archive, check=True)
    (workdir / "src" / "zipasr" / "model").rename(workdir / PREV_PACKAGE)
    sys.path.insert(0, str(workdir))
    return importlib.import_module(f"{PREV_PACKAGE}.transducer")


def make_batch(batch: int, seconds: float) -> tuple[Tensor, Tensor]:
    frames = int(seconds * 100)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, frames, 80, generator=g)
    return x, torch.full((batch,), frames, dtype=torch.int64)


def run(model: nn.Module, mode: str, x: Tensor, x_lens: Tensor, r: Tensor | None
        ) -> tuple[float, float, dict[str, Tensor]]:
    """One timed forward_encoder (plus backward for ``train fwd+bwd``); returns the wall
    time, the process CPU time and the output/gradients to compare."""
    train = mode != "eval fwd"
    model.train(train)
    if train:
        torch.manual_seed(1)
        random.seed(1)
        x = x.clone().requires_grad_(mode == "train fwd+bwd")
        model.zero_grad(set_to_none=True)
    t0, c0 = time.perf_counter(), time.process_time()
    if mode == "eval fwd":
        with torch.inference_mode():
            out, _ = model.forward_encoder(x, x_lens)
    else:
        out, _ = model.forward_encoder(x, x_lens)
        if mode == "train fwd+bwd":
            (out * r).sum().backward()
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    tensors = {"out": out.detach()}
    if mode == "train fwd+bwd":
        tensors["grad:input"] = x.grad
        for name, p in model.named_parameters():
            if p.grad is not None:
                tensors[f"grad:{name}"] = p.grad.clone()
    return elapsed, cpu, tensors


def max_rel_diff(new: dict[str, Tensor], old: dict[str, Tensor]) -> tuple[float, float, str]:
    """(output's max|new - old| / max|old|, the largest such figure over gradients, its
    tensor's name)."""
    assert new.keys() == old.keys(), set(new) ^ set(old)

    def rel(a: Tensor, b: Tensor) -> float:
        return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))

    grads = [(rel(new[k], old[k]), k) for k in new if k.startswith("grad:")]
    worst = max(grads) if grads else (0.0, "-")
    return rel(new["out"], old["out"]), worst[0], worst[1]


def print_worst(new: dict[str, Tensor], old: dict[str, Tensor], n: int = 8) -> None:
    rows = sorted(((float((new[k] - old[k]).abs().max() / old[k].abs().max().clamp(min=1e-30)),
                    k, old[k].numel()) for k in new), reverse=True)
    above = sum(r[0] > 1e-6 for r in rows)
    print(f"      {above} of {len(rows)} tensors differ by more than 1e-6; the worst:")
    for d, k, numel in rows[:n]:
        print(f"      {d:9.1e} {k} ({numel} elements)")
    embed = [r for r in rows if "encoder_embed" in r[1] or r[1] == "grad:input"]
    print("      input and Conv-Embed gradients, worst: "
          + ", ".join(f"{d:.1e} {k}" for d, k, _ in embed[:3]))


def bench_preset(preset: str, prev, args: argparse.Namespace) -> list[str]:
    torch.manual_seed(0)
    old = prev.Transducer.from_preset(preset, vocab_size=500)
    new = Transducer.from_preset(preset, vocab_size=500)
    new.load_state_dict(old.state_dict(), strict=True)
    for m in (old, new):
        set_batch_count(m, 100000.0)
    x, x_lens = make_batch(args.batch, args.seconds)
    with torch.no_grad():
        old.eval()
        n_out = old.forward_encoder(x, x_lens)[0].shape
    r = torch.randn(n_out, generator=torch.Generator().manual_seed(2))
    lines = []
    for mode in args.modes:
        run(old, mode, x, x_lens, r)  # warm-up
        run(new, mode, x, x_lens, r)
        times: dict[str, list[float]] = {"old": [], "new": []}
        cpu: dict[str, list[float]] = {"old": [], "new": []}
        diffs = None
        for i in range(args.reps):
            pair = [("old", old), ("new", new)]
            if i % 2:  # alternate who goes first
                pair.reverse()
            res = {}
            for name, m in pair:
                t, c, tensors = run(m, mode, x, x_lens, r)
                times[name].append(t)
                cpu[name].append(c)
                res[name] = tensors
            if diffs is None:
                diffs = max_rel_diff(res["new"], res["old"])
                if args.verbose and mode == "train fwd+bwd":
                    print_worst(res["new"], res["old"])
            del res
        t_old, t_new = statistics.median(times["old"]), statistics.median(times["new"])
        c_ratio = statistics.median(cpu["new"]) / statistics.median(cpu["old"])
        m_ratio = min(times["new"]) / min(times["old"])
        out_d, grad_d, grad_name = diffs
        grad_txt = f"{grad_d:9.1e} ({grad_name})" if mode == "train fwd+bwd" else "-"
        lines.append(f"{preset:5} {mode:14} {t_old:8.3f} {t_new:8.3f} {t_new / t_old:6.3f} "
                     f"{c_ratio:6.3f} {m_ratio:6.3f} {out_d:9.1e}  {grad_txt}")
        print(lines[-1], flush=True)
        if args.verbose:
            print("      old " + "/".join(f"{t:.3f}" for t in times["old"])
                  + "  new " + "/".join(f"{t:.3f}" for t in times["new"]), flush=True)
    return lines


def noise_floor(preset: str, prev, args: argparse.Namespace) -> None:
    """The old code against itself at 1 vs 2 threads (train fwd+bwd): how far float32
    rounding alone moves its gradients, the yardstick for the old-vs-new differences."""
    torch.manual_seed(0)
    old = prev.Transducer.from_preset(preset, vocab_size=500)
    set_batch_count(old, 100000.0)
    x, x_lens = make_batch(args.batch, args.seconds)
    with torch.no_grad():
        old.eval()
        shape = old.forward_encoder(x, x_lens)[0].shape
    r = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    res = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        res[threads] = run(old, "train fwd+bwd", x, x_lens, r)[2]
    torch.set_num_threads(args.threads)
    out_d, grad_d, grad_name = max_rel_diff(res[2], res[1])
    print(f"{preset:5} noise floor: old code, 2 vs 1 threads: out diff {out_d:.1e}, grad diff "
          f"{grad_d:.1e} ({grad_name})")
    if args.verbose:
        print_worst(res[2], res[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["M", "demo"])
    ap.add_argument("--rev", default="6122159", help="the earlier commit to compare with")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--modes", nargs="+", default=["eval fwd", "train fwd", "train fwd+bwd"],
                    choices=["eval fwd", "train fwd", "train fwd+bwd"])
    ap.add_argument("-v", "--verbose", action="store_true", help="print every round's times")
    ap.add_argument("--noise-floor", action="store_true",
                    help="also compare the old code's gradients at 1 vs 2 threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        prev = import_previous(args.rev, Path(tmp))
        print(f"old = {args.rev}, new = working tree; {args.threads} thread(s), batch "
              f"{args.batch} x {args.seconds:g} s, torch {torch.__version__}, load avg "
              f"{os.getloadavg()[0]:.2f} at start; medians of {args.reps} interleaved rounds")
        print(f"{'preset':5} {'mode':14} {'old s':>8} {'new s':>8} {'ratio':>6} {'cpu r':>6} "
              f"{'min r':>6} "
              f"{'out diff':>9}  grad diff (worst tensor)")
        for preset in args.presets:
            bench_preset(preset, prev, args)
            if args.noise_floor:
                noise_floor(preset, prev, args)
        print(f"load avg {os.getloadavg()[0]:.2f} at end")


if __name__ == "__main__":
    main()
