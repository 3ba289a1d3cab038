"""Optimizer benchmark: ScaledAdam vs torch Adam/AdamW on Zipformer-M, plus a toy convergence race.

Part 1 times one optimizer step over the parameters of Zipformer-M (65.5 M parameters, 743
tensors; from ``zipasr.model`` if it builds, else from icefall's Zipformer-M parameter shapes
listed here), for ScaledAdam (clipping active; also with its compiled kernels switched off),
the implementation before its speed-up (tests/optim/scaled_adam_previous.py, kept as the
bit-exact oracle) and torch.optim.Adam / AdamW in their for-loop, foreach and fused CPU
implementations. Steps are interleaved round-robin so that load from other processes on a
shared machine hits all optimizers alike; median, mean and min wall time and the median CPU
time of the process are reported (CPU time leaves out the time the process waits for a core,
but not the memory bandwidth others take; the mean includes ScaledAdam's scale update every
4th step, which the median may skip). After the timed steps each current ScaledAdam must have
parameters and optimizer state bit-identical to the previous one's (asserted). Ratios depend
on the machine's load and on how many optimizers share the rotation (each holds about 1 GB),
so compare rows of one run; e.g. the three that matter:

    .venv/bin/python benchmarks/optimizer.py --reps 12 --skip-toy --only \
        "ScaledAdam (clipping on)" "ScaledAdam previous (clipping on)" "Adam (foreach)"

Part 2 trains a small conv + transformer frame classifier on a fixed synthetic task (labels from
a frozen random conv teacher) with ScaledAdam + Eden and with Adam + the Conformer (Noam)
schedule, a few learning rates each, and prints validation loss/accuracy along the way.

    .venv/bin/python benchmarks/optimizer.py [--threads 1] [--reps 7] [--toy-steps 600]
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from zipasr.optim import Eden, ScaledAdam

# The implementation before the chunked speed-up lives with the tests as their oracle.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "optim"))
from scaled_adam_previous import ScaledAdam as PreviousScaledAdam  # noqa: E402

# ----------------------------------------------------------------------------- Zipformer-M


def zipformer_m_shapes(vocab_size: int = 500) -> list[tuple[str, tuple[int, ...]]]:
    """Parameter names and shapes of icefall's Zipformer-M transducer (its state dict)."""
    out: list[tuple[str, tuple[int, ...]]] = []
    e = "encoder_embed."
    for name, shape in [
        ("conv.0", (8, 1, 3, 3)),
        ("conv.4", (32, 8, 3, 3)),
        ("conv.7", (128, 32, 3, 3)),
        ("convnext.depthwise_conv", (128, 1, 7, 7)),
        ("convnext.pointwise_conv1", (384, 128, 1, 1)),
        ("convnext.pointwise_conv2", (128, 384, 1, 1)),
        ("out", (192, 2432)),
    ]:
        out += [(f"{e}{name}.weight", shape), (f"{e}{name}.bias", (shape[0],))]
    out += [(f"{e}out_norm.log_scale", ()), (f"{e}out_norm.bias", (192,))]

    layers, dims = (2, 2, 3, 4, 3, 2), (192, 256, 384, 512, 384, 256)
    heads, ffs = (4, 4, 4, 8, 4, 4), (512, 768, 1024, 1536, 1024, 768)
    kernels, ds = (31, 31, 15, 15, 15, 31), (1, 2, 4, 8, 4, 2)
    for i in range(6):
        c, h, f, k = dims[i], heads[i], ffs[i], kernels[i]
        stack = f"encoder.encoders.{i}." + ("" if i == 0 else "encoder.")
        for li in range(layers[i]):
            p = f"{stack}layers.{li}."
            s: list[tuple[str, tuple[int, ...]]] = [
                ("bypass_scale", (c,)),
                ("bypass.bypass_scale", (c,)),
                ("bypass_mid.bypass_scale", (c,)),
                ("self_attn_weights.in_proj.weight", ((2 * 32 + 4) * h, c)),
                ("self_attn_weights.in_proj.bias", ((2 * 32 + 4) * h,)),
                ("self_attn_weights.linear_pos.weight", (h * 4, 48)),
            ]
            for a in ("self_attn1", "self_attn2"):
                s += [
                    (f"{a}.in_proj.weight", (h * 12, c)),
                    (f"{a}.in_proj.bias", (h * 12,)),
                    (f"{a}.out_proj.weight", (c, h * 12)),
                    (f"{a}.out_proj.bias", (c,)),
                ]
            for j, hid in enumerate((3 * f // 4, f, 5 * f // 4)):
                s += [
                    (f"feed_forward{j + 1}.in_proj.weight", (hid, c)),
                    (f"feed_forward{j + 1}.in_proj.bias", (hid,)),
                    (f"feed_forward{j + 1}.out_proj.weight", (c, hid)),
                    (f"feed_forward{j + 1}.out_proj.bias", (c,)),
                ]
            nla = 3 * c // 4
            s += [
                ("nonlin_attention.in_proj.weight", (3 * nla, c)),
                ("nonlin_attention.in_proj.bias", (3 * nla,)),
                ("nonlin_attention.out_proj.weight", (c, nla)),
                ("nonlin_attention.out_proj.bias", (c,)),
            ]
            for cm in ("conv_module1", "conv_module2"):
                s += [
                    (f"{cm}.in_proj.weight", (2 * c, c)),
                    (f"{cm}.in_proj.bias", (2 * c,)),
                    (f"{cm}.depthwise_conv.weight", (c, 1, k)),
                    (f"{cm}.depthwise_conv.bias", (c,)),
                    (f"{cm}.out_proj.weight", (c, c)),
                    (f"{cm}.out_proj.bias", (c,)),
                ]
            s += [("norm.log_scale", ()), ("norm.bias", (c,))]
            out += [(p + n, sh) for n, sh in s]
        if i > 0:
            out += [
                (f"encoder.encoders.{i}.downsample.bias", (ds[i],)),
                (f"encoder.encoders.{i}.out_combiner.bypass_scale", (c,)),
            ]
    out += [("encoder.downsample_output.bias", (2,))]
    out += [("decoder.embedding.weight", (vocab_size, 512)), ("decoder.conv.weight", (512, 4, 2))]
    for j in ("encoder_proj", "decoder_proj"):
        out += [(f"joiner.{j}.weight", (512, 512)), (f"joiner.{j}.bias", (512,))]
    out += [("joiner.output_linear.weight", (vocab_size, 512))]
    out += [("joiner.output_linear.bias", (vocab_size,))]
    for j in ("simple_am_proj", "simple_lm_proj"):
        out += [(f"{j}.weight", (vocab_size, 512)), (f"{j}.bias", (vocab_size,))]
    return out


def zipformer_m_params() -> tuple[list[tuple[str, nn.Parameter]], str]:
    """Zipformer-M's named parameters (the real module if available) and where they came from."""
    try:
        from zipasr.model import Transducer

        torch.manual_seed(0)
        model = Transducer.from_preset("M", vocab_size=500)
        return list(model.named_parameters()), "zipasr.model.Transducer.from_preset('M')"
    except Exception as exc:  # the model package is optional for this benchmark
        g = torch.Generator().manual_seed(0)
        params = [
            (n, nn.Parameter(torch.randn(s, generator=g) * 0.05)) for n, s in zipformer_m_shapes()
        ]
        return params, f"icefall shape list (model unavailable: {type(exc).__name__})"


def previous_of(name: str) -> str | None:
    """The row of the previous implementation a current ScaledAdam row is compared with."""
    if not name.startswith("ScaledAdam ("):
        return None
    return name.replace("ScaledAdam", "ScaledAdam previous").replace(", torch ops only", "")


def assert_same_trajectory(new: torch.optim.Optimizer, old: torch.optim.Optimizer) -> None:
    """Parameters and every optimizer-state entry bit-identical (torch.equal)."""
    for pn, po in zip(new.param_groups[0]["params"], old.param_groups[0]["params"], strict=True):
        assert torch.equal(pn, po), "parameters differ"
    sn, so = new.state_dict()["state"], old.state_dict()["state"]
    assert sn.keys() == so.keys()
    for k, st in so.items():
        assert st.keys() == sn[k].keys()
        for key, val in st.items():
            ok = torch.equal(sn[k][key], val) if torch.is_tensor(val) else sn[k][key] == val
            assert ok, f"optimizer state {k}/{key} differs"


def time_step_benchmark(
    reps: int, warmup: int, only: list[str] | None = None
) -> list[tuple[str, float, float, float, float]]:
    """Per optimizer, interleaved: median, mean and min wall seconds and median CPU seconds."""
    named, source = zipformer_m_params()
    n_params = sum(p.numel() for _, p in named)
    print(f"parameters: {source}: {len(named)} tensors, {n_params:,} elements")
    spec_count = sum(math.prod(s) for _, s in zipformer_m_shapes())
    print(f"icefall shape list: {spec_count:,} elements")

    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(p.shape, generator=g) * 1e-3 for _, p in named]

    def clone_params() -> list[tuple[str, nn.Parameter]]:
        out = []
        for (n, p), gr in zip(named, grads, strict=True):
            q = nn.Parameter(p.detach().clone())
            q.grad = gr.clone()
            out.append((n, q))
        return out

    def scaled_adam(ps: list[tuple[str, nn.Parameter]]) -> torch.optim.Optimizer:
        return ScaledAdam([{"named_params": ps, "lr": 0.045}], lr=0.045, clipping_scale=2.0)

    def torch_ops_only(ps: list[tuple[str, nn.Parameter]]) -> torch.optim.Optimizer:
        opt = scaled_adam(ps)
        opt.use_kernels = False  # chunked torch operations (where the kernels do not apply)
        return opt

    def previous(ps: list[tuple[str, nn.Parameter]]) -> torch.optim.Optimizer:
        return PreviousScaledAdam([{"named_params": ps, "lr": 0.045}], lr=0.045, clipping_scale=2.0)

    makers: dict[str, Callable[[list[tuple[str, nn.Parameter]]], torch.optim.Optimizer]] = {
        "ScaledAdam (clipping on)": scaled_adam,
        "ScaledAdam previous (clipping on)": previous,
        "ScaledAdam (clipping on, torch ops only)": torch_ops_only,
        "ScaledAdam (late: step > 1000)": scaled_adam,
        "ScaledAdam previous (late: step > 1000)": previous,
        "Adam (for-loop)": lambda ps: torch.optim.Adam([p for _, p in ps], lr=1e-3, foreach=False),
        "Adam (foreach)": lambda ps: torch.optim.Adam([p for _, p in ps], lr=1e-3, foreach=True),
        "Adam (fused)": lambda ps: torch.optim.Adam([p for _, p in ps], lr=1e-3, fused=True),
        "AdamW (foreach)": lambda ps: torch.optim.AdamW([p for _, p in ps], lr=1e-3, foreach=True),
        "AdamW (fused)": lambda ps: torch.optim.AdamW([p for _, p in ps], lr=1e-3, fused=True),
    }
    if only:
        wanted = {o.lower() for o in only}
        unknown = wanted - {n.lower() for n in makers}
        if unknown:
            raise SystemExit(f"--only: unknown optimizers {sorted(unknown)}; known: {list(makers)}")
        makers = {n: m for n, m in makers.items() if n.lower() in wanted}
    opts: dict[str, torch.optim.Optimizer] = {}
    for name, make in makers.items():
        try:
            opt = make(clone_params())
            opt.step()
            opts[name] = opt
        except (RuntimeError, TypeError, ValueError) as exc:
            print(f"{name}: unavailable ({exc})")
    # Warm-up: ScaledAdam sets its first clipping threshold at step 10; all run `warmup` steps.
    for _ in range(warmup):
        for opt in opts.values():
            opt.step()
    # Late training without running 1000 steps: advance the step counters, so the second-moment
    # bias correction (applied while 1 - 0.98^(t+1) < 0.99, i.e. t < 227) is off. Starting at
    # 1001 keeps the clipping threshold fixed (next re-estimate at 1100) during the timed steps.
    for name, opt in opts.items():
        if "late" in name:
            for st in opt.state.values():
                st["step"] = 1001
    times: dict[str, list[float]] = {n: [] for n in opts}
    cpu: dict[str, list[float]] = {n: [] for n in opts}
    for _ in range(reps):
        for name, opt in opts.items():
            c0, t0 = time.process_time(), time.perf_counter()
            opt.step()
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    for name, opt in opts.items():
        old = opts.get(previous_of(name) or "")
        if old is not None:
            assert_same_trajectory(opt, old)
            print(f"{name}: parameters and optimizer state bit-identical to the previous one")
    return [
        (n, statistics.median(ts), statistics.mean(ts), min(ts), statistics.median(cpu[n]))
        for n, ts in times.items()
    ]


# ----------------------------------------------------------------------------- toy task

D_IN, N_CLASS, T_LEN, BATCH = 40, 16, 40, 16


class Teacher(nn.Module):
    """Frozen random conv net producing frame labels that depend on +-4 frames of context."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1234)
        self.w1 = torch.randn(64, D_IN, 5, generator=g) / math.sqrt(D_IN * 5)
        self.w2 = torch.randn(N_CLASS, 64, 5, generator=g) / math.sqrt(64 * 5) * 3.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (N, T, D) -> labels (N, T)
        h = torch.tanh(nn.functional.conv1d(x.transpose(1, 2), self.w1, padding=2) * 2.0)
        return nn.functional.conv1d(h, self.w2, padding=2).argmax(dim=1)


class Student(nn.Module):
    """Conv front-end, two transformer layers, linear classifier (0.17 M parameters)."""

    def __init__(self, d: int = 96) -> None:
        super().__init__()
        self.conv = nn.Conv1d(D_IN, d, 5, padding=2)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(d, 4, 2 * d, dropout=0.0, batch_first=True) for _ in range(2)
        )
        self.out = nn.Linear(d, N_CLASS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x.transpose(1, 2)).transpose(1, 2).relu()
        for layer in self.layers:
            h = layer(h)
        return self.out(h)


def batch(step: int, teacher: Teacher, valid: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed((10_000_000 if valid else 0) + step)
    x = torch.randn(BATCH, T_LEN, D_IN, generator=g)
    return x, teacher(x)


def noam(step: int, peak: float, warmup: int) -> float:
    """Conformer/Transformer schedule, peak lr at `warmup`, then ~1/sqrt(step)."""
    return peak * min(step / warmup, math.sqrt(warmup / step))


def train_toy(
    kind: str, lr: float, steps: int, seed: int, per_epoch: int, evals: list[int]
) -> dict[int, tuple[float, float]]:
    teacher = Teacher()
    torch.manual_seed(seed)
    model = Student()
    if kind == "scaledadam":
        opt: torch.optim.Optimizer = ScaledAdam(
            [{"named_params": list(model.named_parameters()), "lr": lr}], lr=lr
        )
        # Eden scaled to this run's length (recipe: 7500 batches / 3.5 epochs / 500 warm-up).
        sched = Eden(opt, lr_batches=steps // 8, lr_epochs=3.5, warmup_batches=steps // 20)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.98), eps=1e-9)
    valid = [batch(i, teacher, valid=True) for i in range(8)]
    out: dict[int, tuple[float, float]] = {}
    for step in range(1, steps + 1):
        if kind == "scaledadam":
            if (step - 1) % per_epoch == 0:
                sched.step_epoch((step - 1) // per_epoch)
            sched.step_batch(step)
        else:
            for gr in opt.param_groups:
                gr["lr"] = noam(step, lr, warmup=steps // 10)
        x, y = batch(step + 1000 * seed, teacher)
        loss = nn.functional.cross_entropy(model(x).reshape(-1, N_CLASS), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step in evals:
            with torch.no_grad():
                losses, accs = [], []
                for vx, vy in valid:
                    logits = model(vx)
                    losses.append(
                        nn.functional.cross_entropy(logits.reshape(-1, N_CLASS), vy.reshape(-1))
                    )
                    accs.append((logits.argmax(-1) == vy).float().mean())
                out[step] = (float(torch.stack(losses).mean()), float(torch.stack(accs).mean()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--reps",
        type=int,
        default=7,
        help="timed steps per optimizer (< 99; a multiple of 4 for a fair mean: ScaledAdam "
        "updates the parameter scales every 4th step)",
    )
    ap.add_argument("--warmup", type=int, default=11, help="untimed steps (>= 10: clipping on)")
    ap.add_argument("--toy-steps", type=int, default=600)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--skip-timing", action="store_true")
    ap.add_argument("--skip-toy", action="store_true")
    ap.add_argument(
        "--only", nargs="+", metavar="NAME", help="time only these optimizers (table names)"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for logger_name in ("zipasr.optim", "scaled_adam_previous"):  # no clipping chatter
        logging.getLogger(logger_name).setLevel(logging.ERROR)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, cpus {os.cpu_count()}")
    print(f"load average before: {os.getloadavg()}")

    if not args.skip_timing:
        rows = time_step_benchmark(args.reps, args.warmup, args.only)
        by_name = {n: (med, mean, c) for n, med, mean, _, c in rows}
        ref = by_name.get("Adam (foreach)")

        def vs(x: float, r: float | None) -> str:
            return f"{x / r:.2f}x" if r else "-"

        print(
            "\n| optimizer | median s/step | mean s/step | min s/step | median vs Adam (foreach) "
            "| mean vs Adam (foreach) | median CPU s/step | CPU vs Adam (foreach) |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for name, med, mean, mn, c in rows:
            r = ref or (None, None, None)
            print(
                f"| {name} | {med:.3f} | {mean:.3f} | {mn:.3f} | {vs(med, r[0])} "
                f"| {vs(mean, r[1])} | {c:.3f} | {vs(c, r[2])} |"
            )
        for name, (med, mean, c) in by_name.items():
            old = by_name.get(previous_of(name) or "")
            if old is not None:
                print(
                    f"{name}: {vs(med, old[0])} the previous one's median wall time, "
                    f"{vs(mean, old[1])} its mean, {vs(c, old[2])} its median CPU time"
                )
        print(f"load average after timing: {os.getloadavg()}")

    if not args.skip_toy:
        steps = args.toy_steps
        evals = [steps // 8, steps // 4, steps // 2, steps]
        configs = [("scaledadam", lr) for lr in (0.02, 0.045, 0.1)]
        configs += [("adam", lr) for lr in (1e-3, 2e-3, 4e-3)]
        print(f"\ntoy task: {steps} steps of batch {BATCH}x{T_LEN} frames, {args.seeds} seeds, ")
        print("valid CE loss / frame accuracy (mean over seeds)")
        head = " | ".join(f"step {s}" for s in evals)
        print(f"\n| optimizer + schedule | lr | {head} | time s |")
        print("|---|---|" + "---|" * len(evals) + "---|")
        for kind, lr in configs:
            t0 = time.perf_counter()
            runs = [
                train_toy(kind, lr, steps, seed, per_epoch=steps // 6, evals=evals)
                for seed in range(args.seeds)
            ]
            el = (time.perf_counter() - t0) / args.seeds
            cells = []
            for s in evals:
                loss = statistics.mean(r[s][0] for r in runs)
                acc = statistics.mean(r[s][1] for r in runs)
                cells.append(f"{loss:.3f} / {acc:.3f}")
            label = "ScaledAdam + Eden" if kind == "scaledadam" else "Adam + Noam (Conformer)"
            print(f"| {label} | {lr:g} | " + " | ".join(cells) + f" | {el:.1f} |")
        print(f"load average after toy: {os.getloadavg()}")


if __name__ == "__main__":
    main()
