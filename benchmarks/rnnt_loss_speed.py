"""Pruned RNN-T loss on CPU: the previous implementation vs the current one, in one run.

The previous ``zipasr.loss`` package is read from git (``--prev-ref``, default 6122159: the
row-by-row numba kernel, gather-based pruning) into a temporary package ``zipasr_loss_prev``;
both run the numba backend.  Calls alternate (previous, current, previous, ...) so that load
from other processes hits both alike; times are wall-clock min and median over the reps, and the
ratio is previous / current.  Rows:

* the numba kernel alone (α, β, occupations) and ``mutual_information_recursion`` + backward
  on the benchmark problem of benchmarks/rnnt_loss.py (B=8, T=250, S=60, random log-probs), and
  on the px/py that the icefall sequence really feeds it (smoothed simple loss: dense; pruned
  loss: -inf outside the windows);
* each stage of icefall's loss sequence alone, forward + backward where it has one (inputs as
  leaves, random upstream gradients), then the whole sequence;
* whether the outputs are bit-identical (kernel) / equal (``torch.equal``: sequence losses and
  parameter gradients).

    .venv/bin/python benchmarks/rnnt_loss_speed.py [--reps 60] [--stage-reps 20] [--threads 1]
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

import torch

import zipasr.loss as L

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rnnt_loss import PRUNE_RANGE, B, S, T, V, _params, make_inputs  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PREV_NAME = "zipasr_loss_prev"


def load_previous(ref: str, into: Path) -> ModuleType:
    """The ``zipasr.loss`` package at git ``ref``, importable as ``zipasr_loss_prev``."""
    files = subprocess.run(["git", "-C", str(REPO), "ls-tree", "-r", "--name-only", ref,
                            "src/zipasr/loss/"], capture_output=True, text=True, check=True)
    for path in files.stdout.split():
        if not path.endswith(".py"):
            continue
        text = subprocess.run(["git", "-C", str(REPO), "show", f"{ref}:{path}"],
                              capture_output=True, text=True, check=True).stdout
        dest = into / PREV_NAME / Path(path).relative_to("src/zipasr/loss")
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(text.replace("zipasr.loss", PREV_NAME))
    sys.path.insert(0, str(into))
    return importlib.import_module(PREV_NAME)


def bench_pair(fns: tuple, reps: int, warmup: int = 2) -> list[tuple[float, float]]:
    """Alternate the callables rep by rep; (min, median) ms of each."""
    for f in fns:
        for _ in range(warmup):
            f()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for f, ts in zip(fns, times, strict=True):
            t0 = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t0)
    out = []
    for ts in times:
        ts.sort()
        out.append((ts[0] * 1e3, ts[len(ts) // 2] * 1e3))
    return out


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit patterns, NaNs compared by position."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    na, nb = torch.isnan(a), torch.isnan(b)
    view = torch.int32 if a.dtype == torch.float32 else torch.int64
    return bool(torch.equal(na, nb) and torch.equal(torch.where(na, 0, a).view(view),
                                                    torch.where(nb, 0, b).view(view)))


# ----------------------------------------------------------------------------------------------
# the pieces, written once against a loss package ``Lx`` (previous or current)


def recursion(Lx, px, py, boundary) -> None:
    a = px.detach().requires_grad_()
    b = py.detach().requires_grad_()
    Lx.mutual_information_recursion(a, b, boundary).sum().backward()


def stage_inputs(x: dict, params: dict) -> dict:
    """Detached inputs of every stage, computed once with the current package."""
    with torch.no_grad():
        lm = params["dec"] @ params["w_lm"]
        am = params["enc"] @ params["w_am"]
    _, (pxg, pyg) = L.rnnt_loss_smoothed(lm, am, x["symbols"], 0, lm_only_scale=0.25,
                                         am_only_scale=0.0, boundary=x["boundary"],
                                         reduction="sum", return_grad=True)
    ranges = L.get_rnnt_prune_ranges(pxg, pyg, x["boundary"], PRUNE_RANGE)
    am_p, lm_p = L.do_rnnt_pruning(params["enc"].detach(), params["dec"].detach(), ranges)
    with torch.no_grad():
        logits = torch.tanh(am_p + lm_p) @ params["w_out"]
    g = torch.Generator().manual_seed(1)
    R = ranges.shape[2]
    return {"lm": lm, "am": am, "px_grad": pxg, "py_grad": pyg, "ranges": ranges,
            "logits": logits, "up_am": torch.randn(B, T, R, params["enc"].shape[2], generator=g),
            "up_lm": torch.randn(B, T, R, params["dec"].shape[2], generator=g)}


def stages(Lx, x: dict, si: dict, params: dict) -> dict:
    """name -> callable running that stage (forward + backward) with package Lx."""
    sym, bnd = x["symbols"], x["boundary"]

    def simple():
        lm = si["lm"].clone().requires_grad_()
        am = si["am"].clone().requires_grad_()
        loss, _ = Lx.rnnt_loss_smoothed(lm, am, sym, 0, lm_only_scale=0.25, am_only_scale=0.0,
                                        boundary=bnd, reduction="sum", return_grad=True)
        (0.5 * loss).backward()

    def prune_ranges():
        Lx.get_rnnt_prune_ranges(si["px_grad"], si["py_grad"], bnd, PRUNE_RANGE)

    def pruning():
        enc = params["enc"].detach().requires_grad_()
        dec = params["dec"].detach().requires_grad_()
        am_p, lm_p = Lx.do_rnnt_pruning(enc, dec, si["ranges"])
        torch.autograd.backward([am_p, lm_p], [si["up_am"], si["up_lm"]])

    def pruned_loss():
        logits = si["logits"].clone().requires_grad_()
        Lx.rnnt_loss_pruned(logits, sym, si["ranges"], 0, bnd, reduction="sum").backward()

    def sequence():
        p = {k: v.detach().requires_grad_() for k, v in params.items()}
        run_sequence(Lx, x, p)

    return {"smoothed simple loss (fwd+bwd)": simple, "get_rnnt_prune_ranges": prune_ranges,
            "do_rnnt_pruning (fwd+bwd)": pruning, "rnnt_loss_pruned (fwd+bwd)": pruned_loss,
            "whole icefall sequence (fwd+bwd, incl. joiner)": sequence}


def run_sequence(Lx, x: dict, p: dict) -> tuple[torch.Tensor, torch.Tensor]:
    lm = p["dec"] @ p["w_lm"]
    am = p["enc"] @ p["w_am"]
    simple, (pxg, pyg) = Lx.rnnt_loss_smoothed(
        lm, am, x["symbols"], 0, lm_only_scale=0.25, am_only_scale=0.0, boundary=x["boundary"],
        reduction="sum", return_grad=True)
    ranges = Lx.get_rnnt_prune_ranges(pxg, pyg, x["boundary"], PRUNE_RANGE)
    am_p, lm_p = Lx.do_rnnt_pruning(p["enc"], p["dec"], ranges)
    logits = torch.tanh(am_p + lm_p) @ p["w_out"]
    pruned = Lx.rnnt_loss_pruned(logits, x["symbols"], ranges, 0, x["boundary"],
                                 reduction="sum")
    (0.5 * simple + pruned).backward()
    return simple.detach(), pruned.detach()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=60, help="reps of the recursion rows")
    ap.add_argument("--stage-reps", type=int, default=20)
    ap.add_argument("--seq-reps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    ap.add_argument("--prev-ref", default="6122159", help="git ref of the previous package")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="zipasr_prev_"))
    try:
        prev = load_previous(args.prev_ref, tmp)
        report(prev, args)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def report(prev: ModuleType, args) -> None:
    prev.set_backend("numba")
    L.set_backend("numba")
    from zipasr.loss.backends import numba_mi as cur_k
    prev_k = importlib.import_module(f"{PREV_NAME}.backends.numba_mi")

    x = make_inputs("cpu")
    params = _params(x)
    si = stage_inputs(x, params)
    bounds = x["boundary"].tolist()
    with torch.no_grad():
        px_s, py_s = L.get_rnnt_logprobs_smoothed(si["lm"], si["am"], x["symbols"], 0, 0.25, 0.0,
                                                  x["boundary"])
        px_p, py_p = L.get_rnnt_logprobs_pruned(si["logits"], x["symbols"], si["ranges"], 0,
                                                x["boundary"])
    problems = {"random px/py": (x["px"], x["py"]), "simple-loss px/py": (px_s, py_s),
                "pruned-loss px/py": (px_p, py_p)}

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"cores {os.cpu_count()}, previous = git {args.prev_ref}; "
          f"load avg (1 min) before: {os.getloadavg()[0]:.2f}")
    print(f"B={B} T={T} S={S} V={V} prune_range={PRUNE_RANGE}, float32, ragged "
          f"y_lens={x['boundary'][:, 2].tolist()} t_lens={x['boundary'][:, 3].tolist()}\n")
    rows = []
    identical = []
    bnd = x["boundary"]
    for name, (px, py) in problems.items():
        px, py = px.contiguous(), py.contiguous()
        outs = [k.mi_forward(px, py, bnd, bounds, True) for k in (prev_k, cur_k)]
        identical.append((f"kernel on {name}: score, px_grad, py_grad",
                          all(same_bits(a, b) for a, b in zip(*outs, strict=True))))
        kernels = tuple(lambda k=k, px=px, py=py: k.mi_forward(px, py, bnd, bounds, True)
                        for k in (prev_k, cur_k))
        rows.append((f"numba kernel (α+β+occupations), {name}", *bench_pair(kernels, args.reps)))
        recs = tuple(lambda Lx=Lx, px=px, py=py: recursion(Lx, px, py, bnd) for Lx in (prev, L))
        rows.append((f"mutual_information_recursion fwd+bwd, {name}",
                     *bench_pair(recs, args.reps)))
    st_prev, st_cur = stages(prev, x, si, params), stages(L, x, si, params)
    for name in st_cur:
        reps = args.seq_reps if name.startswith("whole") else args.stage_reps
        rows.append((name, *bench_pair((st_prev[name], st_cur[name]), reps, warmup=1)))

    outs = []
    for Lx in (prev, L):
        p = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
        losses = run_sequence(Lx, x, p)
        outs.append((losses, {k: v.grad for k, v in p.items()}))
    (l0, g0), (l1, g1) = outs
    identical.append(("sequence: simple and pruned loss values (torch.equal)",
                      all(torch.equal(a, b) for a, b in zip(l0, l1, strict=True))))
    identical.append(("sequence: gradients of all 5 parameters (torch.equal)",
                      all(torch.equal(g0[k], g1[k]) for k in g0)))

    print(f"load avg (1 min) after: {os.getloadavg()[0]:.2f}\n")
    print("| what | previous, ms: min / median | current, ms: min / median | "
          "ratio (prev/cur): min / median |")
    print("| --- | --- | --- | --- |")
    for name, (pmin, pmed), (cmin, cmed) in rows:
        print(f"| {name} | {pmin:.2f} / {pmed:.2f} | {cmin:.2f} / {cmed:.2f} | "
              f"{pmin / cmin:.2f}x / {pmed / cmed:.2f}x |")
    print()
    for what, ok in identical:
        print(f"{'identical' if ok else 'DIFFERENT'}: {what}")


if __name__ == "__main__":
    main()
