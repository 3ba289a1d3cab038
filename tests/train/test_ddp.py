"""DDP training on the CPU: two gloo processes started by torchrun, as the train rule starts them.

* ``test_zipasr_train_two_ranks``: ``zipasr train --nproc-per-node 2`` (the rule's command; it
  relaunches itself through ``torchrun --standalone``) trains the xs model for one epoch on the
  tiny corpus. Rank 0's checkpoint holds the plain model (no ``module.`` prefix: it loads
  strictly into a single-process Transducer) and the running average; the validation loss it
  logged, summed over the two ranks' halves of the dev set, equals a single process's
  validation loss over the whole dev set with the checkpoint's weights. A second run with one
  more epoch resumes (every rank from rank 0's checkpoint) instead of starting afresh.
* ``test_ddp_steps_match_single_process``: this file run as a torchrun worker (``__main__``
  below) drives the real ``Trainer`` (its process group, DDP wrapper, ``_train_step``,
  ScaledAdam, Eden) over fixed batches. What is compared, and why:

  - DDP vs one process, bit for bit. Step s uses 8 fixed cuts; rank r trains on cuts r, r+2,
    ... of them. The model is in float64 and in eval mode for these steps: dropout, layer
    skipping, the balancers' and whitening's random gradient edits and SpecAugment (not applied:
    the batches are built without augmentation) are then off, and the Swoosh derivative is
    rounded to its 8 bits to nearest instead of at random, so every step is a deterministic
    function of its batch. icefall's losses are sums over utterances and DDP averages gradients
    over ranks: DDP's gradient is (g_A + g_B) / 2. The single-process reference accumulates the
    same two shares as two micro-batches with the loss halved: 0.5 g_A + 0.5 g_B. Halving is
    exact in binary floating point and every backward op is linear in its incoming gradient, so
    each half is exactly half of what the rank computed (same shapes, same kernels, one thread
    in both processes), and a sum of two numbers does not depend on order: the two gradients,
    and so the parameters after three ScaledAdam steps, are equal bit for bit, on any CPU.
  - One process, one batch of 8 vs two micro-batches of 4: the gradient of a sum of
    per-utterance losses is the sum of the gradients (``test_gradient_adds_over_utterances``).
    This one is equal only up to float64 rounding (different batch shapes sum in a different
    order); the bound is derived in that test.
  - Ranks vs each other: after those steps and two more in train mode (stochastic; each rank
    draws its own dropout masks), the two ranks' parameters are bit-identical, because every
    rank applies the same all-reduced gradient.
  - A non-finite loss on rank 1 only: both ranks skip the step (no deadlock, parameters
    unchanged), and the next step trains again.
  - The validation loss reduced over ranks equals the single-process one at the start.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

STEPS, PER_STEP = 3, 8
TRAIN = {"num_epochs": 1, "max_duration": 5, "num_buckets": 2, "num_workers": 0,
         "log_interval": 1, "save_every_n": 2, "average_period": 2, "keep_last_k": 3,
         "lr_batches": 20, "lr_epochs": 1, "warm_step": 10, "min_cut_duration": 0.5,
         "spec_augment": False}


def _trainer(paths: dict[str, Path], exp: Path, loss_scale: float = 1.0, **train):
    from zipasr.train.config import TrainConfig
    from zipasr.train.trainer import Trainer

    class Scaled(Trainer):
        def _losses(self, batch):
            if "micro" in batch:  # gradient accumulation: all but the last micro-batch here,
                *first, last = batch["micro"]  # the last by _train_step's own backward
                for b in first:
                    self._losses(b)[0].backward()
                return self._losses(last)
            dtype = next(self.state.model.parameters()).dtype
            batch = dict(batch, inputs=batch["inputs"].to(dtype))
            loss, info = super()._losses(batch)
            return loss * loss_scale, info

    t = Scaled(TrainConfig.from_dict(dict(TRAIN, **train)), {"preset": "xs"},
               train_cuts=[paths["train"]], valid_cuts=[paths["dev"]], bpe_model=paths["bpe"],
               exp_dir=exp, progress=False)
    torch.manual_seed(0)
    t._setup()
    t.state = t._new_state(data=False)  # counters at 0
    return t


@contextlib.contextmanager
def _deterministic(model):
    """The model in eval mode with no random gradient edits: Balancer and Whiten off (they act
    whenever gradients flow, at random, from the batch's statistics, so they are not additive
    over utterances), and the Swoosh derivatives' stochastic rounding to 8 bits made
    round-to-nearest (elementwise, so additive over utterances)."""
    from zipasr.model import scaling

    for m in model.modules():
        if isinstance(m, (scaling.Balancer, scaling.Whiten)):
            if isinstance(m.prob, scaling.ScheduledFloat):
                m.prob.default = 0.0  # what a ScheduledFloat gives in eval mode
            else:
                m.prob = 0.0
    model.eval()
    stochastic = scaling.quantize_deriv

    def nearest(d, kind):
        hi, lo = scaling._SWOOSH[kind][2], scaling._SWOOSH_DERIV_MIN
        return ((d - lo) * (255.0 / (hi - lo)) + 0.5).to(torch.uint8)

    scaling.quantize_deriv = nearest
    try:
        yield
    finally:
        scaling.quantize_deriv = stochastic


def _batches(paths: dict[str, Path], world_size: int, rank: int) -> list[dict]:
    """STEPS fixed batches: the cuts of step s are PER_STEP consecutive training cuts (by id);
    this rank's share is every world_size-th of them."""
    from lhotse import CutSet
    from lhotse.dataset import K2SpeechRecognitionDataset

    cuts = sorted(CutSet.from_file(paths["train"]), key=lambda c: c.id)
    ds = K2SpeechRecognitionDataset(return_cuts=True)
    return [ds[CutSet.from_cuts(cuts[s * PER_STEP:(s + 1) * PER_STEP][rank::world_size])]
            for s in range(STEPS)]


def _micro_batches(paths: dict[str, Path], world_size: int) -> list[dict]:
    """The reference's STEPS batches: each the ranks' shares as micro-batches, in rank order."""
    shares = [_batches(paths, world_size, r) for r in range(world_size)]
    return [{"micro": [share[s] for share in shares]} for s in range(STEPS)]


def _step(t, batch):
    t._set_batch_count(t.state.batch_idx_train)
    t.state.batch_idx_train += 1
    return t._train_step(batch)


def _valid(t, paths):
    from zipasr.train.data import filter_cuts, load_cuts, make_valid_loader

    valid, _ = filter_cuts(load_cuts([paths["dev"]]), t.sp, 0.0, float("inf"))
    if t.world_size > 1:  # the trainer's own sharding (Trainer._data)
        valid = valid.subset(cut_ids=list(valid.ids)[t.rank::t.world_size])
    t.state.valid_loader = make_valid_loader(valid, t.cfg.max_duration)
    return t.validate()


def _f64_trainer(paths: dict[str, Path], exp: Path, loss_scale: float = 1.0,
                 dtype: torch.dtype = torch.float64, **train):
    torch.set_default_dtype(dtype)  # no float32 rounding to amplify (see docstring)
    try:
        return _trainer(paths, exp, loss_scale, **train)
    finally:
        torch.set_default_dtype(torch.float32)


def run_steps(paths: dict[str, Path], out: Path, reference_of: int = 0) -> dict:
    """What a worker does, or with ``reference_of=W`` the single-process reference for W ranks
    (loss / W, the ranks' shares as micro-batches); see the module docstring."""
    t = _f64_trainer(paths, out / "exp", 1.0 / reference_of if reference_of else 1.0)
    # One thread, in the torchrun workers as here: the kernels then sum in the same order.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run_steps(t, paths, out, reference_of)
    finally:
        torch.set_num_threads(threads)


def _run_steps(t, paths: dict[str, Path], out: Path, reference_of: int) -> dict:
    res = {"valid0": _valid(t, paths)}
    batches = (_micro_batches(paths, reference_of) if reference_of
               else _batches(paths, t.world_size, t.rank))
    with _deterministic(t.state.model):  # the comparison with one process
        for batch in batches:
            assert _step(t, batch) is not None
    torch.save(t.state.model.state_dict(), out / f"eval-rank{t.rank}.pt")
    # what the model's schedules were last given (batch 2 of 3), and Eden's learning rate
    from zipasr.model.scaling import ScheduledFloat

    res["batch_count"] = next(m.batch_count for m in t.state.model.modules()
                              if isinstance(m, ScheduledFloat))
    res["lr"] = t.state.scheduler.get_last_lr()[0]
    if t.world_size == 1:
        return res
    t.state.model.train()  # stochastic: ranks must still agree bit for bit
    batches = _batches(paths, t.world_size, t.rank)
    for batch in batches[:2]:
        assert _step(t, batch) is not None
    torch.save(t.state.model.state_dict(), out / f"train-rank{t.rank}.pt")
    before = {k: v.clone() for k, v in t.state.model.state_dict().items()}
    bad = dict(batches[2], inputs=batches[2]["inputs"].clone())
    if t.rank == 1:
        bad["inputs"][:] = float("nan")
    res["bad_step"] = _step(t, bad)
    res["unchanged_after_bad"] = all(torch.equal(v, t.state.model.state_dict()[k])
                                     for k, v in before.items())
    res["after_bad"] = _step(t, batches[2]) is not None
    torch.save(t.state.model.state_dict(), out / f"final-rank{t.rank}.pt")
    return res


def _torchrun_worker() -> None:
    paths = {k: Path(v) for k, v in json.loads(sys.argv[1]).items()}
    out = Path(sys.argv[2])
    res = run_steps(paths, out)
    (out / f"result-rank{os.environ['RANK']}.json").write_text(json.dumps(res))
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    """The tiny corpus, plus copies of its cuts cut to 1 s each (``train_eq``, ``dev_eq``): with
    equal lengths a batch has no padding, so how cuts are grouped into batches (one process vs
    two shards) cannot change the losses (the Zipformer's convolutions see the padding)."""
    from helpers import build_tiny_corpus
    from lhotse import CutSet

    root = tmp_path_factory.mktemp("corpus")
    paths = build_tiny_corpus(root, 24)
    for part in ("train", "dev"):
        cuts = []
        for c in CutSet.from_file(paths[part]):
            c = c.truncate(duration=1.0, preserve_id=True)
            c.supervisions = [dataclasses.replace(s, duration=1.0) for s in c.supervisions]
            cuts.append(c)
        paths[f"{part}_eq"] = root / f"cuts_{part}_eq.jsonl.gz"
        CutSet.from_cuts(cuts).to_file(paths[f"{part}_eq"])
    return paths


def test_ddp_steps_match_single_process(corpus, tmp_path: Path) -> None:
    from helpers import BIN, tool_env

    corpus = dict(corpus, train=corpus["train_eq"], dev=corpus["dev_eq"])
    ddp, ref = tmp_path / "ddp", tmp_path / "ref"
    ddp.mkdir()
    ref.mkdir()
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [str(BIN / "torchrun"), "--standalone", "--nnodes", "1", "--nproc-per-node", "2",
         __file__, json.dumps({k: str(v) for k, v in corpus.items()}), str(ddp)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=tool_env())
    # the single-process reference meanwhile, here: the ranks' shares as micro-batches, loss / 2
    want = run_steps(corpus, ref, reference_of=2)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out[-5000:]
    print(f"torchrun worker pair: {time.perf_counter() - t0:.1f} s")
    res = [json.loads((ddp / f"result-rank{r}.json").read_text()) for r in (0, 1)]

    # validation: summed over the ranks' shards == one process over the whole dev set, up to
    # float64 rounding: sums of positive per-utterance losses, batched differently (see
    # test_gradient_adds_over_utterances for the size of such differences)
    assert res[0]["valid0"] == res[1]["valid0"]
    print(f"validation loss, relative difference: {res[0]['valid0'] / want['valid0'] - 1:.1e}")
    assert res[0]["valid0"] == pytest.approx(want["valid0"], rel=1e-10)

    # ranks bit-identical, in eval mode, after stochastic steps and after the skipped batch
    for stage in ("eval", "train", "final"):
        a, b = (torch.load(ddp / f"{stage}-rank{r}.pt") for r in (0, 1))
        for k in a:
            assert torch.equal(a[k], b[k]), f"{stage}: {k} differs between ranks"

    # DDP over 2 x 4 cuts == one process accumulating the same 2 x 4 cuts: bit for bit (see the
    # module docstring for why this is exact and not a matter of tolerance)
    got = torch.load(ddp / "eval-rank0.pt")
    exp = torch.load(ref / "eval-rank0.pt")
    init = _f64_trainer(corpus, tmp_path / "init").state.model.state_dict()
    assert got.keys() == exp.keys()
    for k, v in exp.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), f"{k} differs"
    moved = [k for k, v in exp.items() if v.is_floating_point() and not torch.equal(v, init[k])]
    assert len(moved) > len(exp) // 2, "the steps changed (almost) nothing"
    # as icefall: the model's schedules count batches of the total duration (x world size),
    # Eden the raw batch index
    assert res[0]["batch_count"] == pytest.approx(2 * want["batch_count"])
    assert want["batch_count"] == pytest.approx(2 * TRAIN["max_duration"] / 600)
    assert res[0]["lr"] == want["lr"]

    # a non-finite loss on rank 1 alone: both skipped, nothing changed, training went on
    for r in res:
        assert r["bad_step"] is None and r["unchanged_after_bad"] and r["after_bad"]
    assert sorted(p.name for p in (ddp / "exp" / "bad-batches").iterdir()) == [
        "batch-6-rank0.pt", "batch-6-rank1.pt"]


def _gradients(t, batch: dict) -> dict[str, torch.Tensor]:
    t.state.optimizer.zero_grad(set_to_none=True)
    with _deterministic(t.state.model):
        t._losses(batch)[0].backward()
    return {n: p.grad.clone() for n, p in t.state.model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gradient_adds_over_utterances(corpus, tmp_path: Path, dtype: torch.dtype) -> None:
    """One process: the gradient of one batch of 8 cuts == the gradients of its two shares of 4
    accumulated (what the DDP test's reference computes), up to rounding.

    The error bound, for float64: every gradient entry is a sum of products along the graph; the
    two computations differ only in the order of their sums (batch shapes 8 vs 4 give other
    blockings in the matrix kernels and other reduction trees), and a sum of m rounded terms is
    off by at most ~m u times the sum of the terms' magnitudes (u = 2^-53). Here m is at most
    the frames summed into a weight gradient times the ops along a path (8 cuts x 100 frames x
    ~50 layers deep ~ 4e4), so a tensor's gradient is off by less than 4e4 u ~ 5e-12 of its
    size where terms do not cancel; ``BOUND`` allows 10x that for cancellation. One float32
    step anywhere (the losses, a backward pass) would show as ~2^-24 ~ 6e-8, which the float32
    case checks the test can see: the same comparison in float32 is off by far more than the
    bound, so passing in float64 is not a matter of a loose tolerance. The bound depends on no
    CPU: it holds for any correctly rounded kernels, in any summation order.

    The pruned loss's window covers the whole lattice here (``prune_range`` above any target
    length): choosing the window is an argmax over occupation sums, which rounding can flip
    where two windows hold the same mass, and a flip is a different loss, not a rounding error.
    (The DDP test keeps the default window: its comparison is exact, so nothing flips.)"""
    bound = 4e4 * 2.0**-53 * 10
    corpus = dict(corpus, train=corpus["train_eq"], dev=corpus["dev_eq"])
    t = _f64_trainer(corpus, tmp_path / "exp", dtype=dtype, prune_range=1000)
    whole = _batches(corpus, 1, 0)[0]
    shares = [_batches(corpus, 2, r)[0] for r in (0, 1)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        g8, g44 = _gradients(t, whole), _gradients(t, {"micro": shares})
    finally:
        torch.set_num_threads(threads)
    assert g8.keys() == g44.keys() and len(g8) > 100
    assert all(g.dtype == dtype for g in g8.values())
    total = torch.sqrt(sum(g.square().sum() for g in g8.values()))
    worst = 0.0
    for k, g in g8.items():
        # relative to the tensor's own norm, or to 1e-6 of the whole gradient's for a tensor
        # whose gradient is (nearly) zero at this point
        err = (g44[k] - g).norm() / max(g.norm(), 1e-6 * total)
        worst = max(worst, err.item())
    print(f"{dtype}: largest relative difference {worst:.1e} (float64 bound {bound:.1e})")
    if dtype == torch.float64:
        assert worst < bound
    else:
        assert worst > 100 * bound  # the comparison is sensitive to rounding at all


def test_zipasr_train_two_ranks(corpus, tmp_path: Path) -> None:
    from helpers import BIN, tool_env

    from zipasr.model import Transducer, ZipformerConfig

    exp = tmp_path / "exp"
    cmd = [str(BIN / "zipasr"), "train", "--nproc-per-node", "2",
           "--train-cuts", str(corpus["train"]), "--valid-cuts", str(corpus["dev_eq"]),
           "--bpe-model", str(corpus["bpe"]), "--exp-dir", str(exp),
           "--model", json.dumps({"preset": "xs"}), "--train", json.dumps(TRAIN),
           "--summary", str(exp / "summary.json"), "--no-progress"]
    t0 = time.perf_counter()
    # as Snakemake starts a 2-thread job: every math library told 2 threads, which the two
    # workers must split (2 x 2 busy threads on 2 cores made training 10x slower)
    env = dict(tool_env(), OMP_NUM_THREADS="2", MKL_NUM_THREADS="2", OPENBLAS_NUM_THREADS="2")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    print(f"zipasr train --nproc-per-node 2: {time.perf_counter() - t0:.1f} s")
    assert "torchrun --standalone --nnodes 1 --nproc-per-node 2" in proc.stderr
    assert "rank 0 of 2" in proc.stderr and "backend gloo" in proc.stderr
    assert "1 CPU threads (MKL_NUM_THREADS=1)" in proc.stderr
    summary = json.loads((exp / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["batch_idx_train"] >= 1

    ck = torch.load(exp / "epoch-1.pt", weights_only=False)
    assert not any(k.startswith("module.") for k in ck["model"])
    assert ck["model_avg"].keys() == ck["model"].keys() and len(ck["rng_ranks"]) == 2
    model = Transducer(ZipformerConfig.from_dict(ck["model_config"]))
    model.load_state_dict(ck["model"], strict=True)

    # the logged validation loss (two shards, all-reduced) == one process over the whole dev set
    logged = [json.loads(x) for x in (exp / "metrics.jsonl").read_text().splitlines()]
    valid = [r["valid_loss"] for r in logged if "valid_loss" in r]
    t = _trainer(dict(corpus, dev=corpus["dev_eq"]), tmp_path / "single")
    t.state.model.load_state_dict(ck["model"])
    t.state.batch_idx_train = ck["batch_idx_train"]
    assert valid == [summary["valid_loss"]]
    assert _valid(t, dict(corpus, dev=corpus["dev_eq"])) == pytest.approx(valid[-1], rel=1e-6)

    # one more epoch: both ranks resume from rank 0's epoch-1.pt (same world size: a resume)
    i = cmd.index("--train") + 1
    cmd[i] = json.dumps(dict(TRAIN, num_epochs=2))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=tool_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    again = json.loads((exp / "summary.json").read_text())
    assert again["resumed"] and again["batch_idx_train"] > summary["batch_idx_train"]
    assert "resumed from" in proc.stderr and not list(exp.glob("superseded-*"))


if __name__ == "__main__":
    _torchrun_worker()


def test_launch_commands() -> None:
    """The command zipasr train replaces itself with: none for one process, torchrun on one
    node, srun + one torchrun per node with a c10d rendezvous on the first host otherwise."""
    from zipasr.train.launch import THREAD_VARS, expand_nodelist, launch_command, worker_env

    assert expand_nodelist("gpu[01-03,07],login1") == ["gpu01", "gpu02", "gpu03", "gpu07",
                                                       "login1"]
    assert launch_command(1, ["--x"], env={}) is None
    assert launch_command(4, ["--x"], env={"LOCAL_RANK": "0", "WORLD_SIZE": "4"}) is None
    one = launch_command(4, ["--x"], env={"SLURM_JOB_NUM_NODES": "1"})
    assert one[1:6] == ["--standalone", "--nnodes", "1", "--nproc-per-node", "4"]
    assert one[-4] == "--no-python" and one[-2:] == ["train", "--x"]
    two = launch_command(4, ["--x"], env={"SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_ID": "77",
                                          "SLURM_JOB_NODELIST": "n[3-4]"})
    assert two[:3] == ["srun", "--overlap", "--jobid=77"]
    assert "--ntasks-per-node" in two and two[two.index("--nnodes") + 1] == "2"
    assert two[two.index("--rdzv-endpoint") + 1] == "n3:29400"
    assert two[two.index("--nproc-per-node") + 1] == "4" and two[-2:] == ["train", "--x"]

    # each worker's share of the node's threads, from OMP_NUM_THREADS (Snakemake's job threads)
    env = worker_env(4, {"OMP_NUM_THREADS": "8", "MKL_NUM_THREADS": "8", "PATH": "/bin"})
    assert env["PATH"] == "/bin" and all(env[k] == "2" for k in THREAD_VARS)
    assert worker_env(4, {"OMP_NUM_THREADS": "2"})["MKL_NUM_THREADS"] == "1"  # never 0
    cpus = len(os.sched_getaffinity(0))
    assert worker_env(1, {})["OMP_NUM_THREADS"] == str(cpus)  # unset: the usable CPUs
