"""The training loop: icefall's train.py semantics, resumable bit for bit.

One ``Trainer.run()`` trains (or resumes) an experiment directory to ``num_epochs``:
pruned RNN-T loss with icefall's warm-up weighting, ScaledAdam + Eden, the ref_duration
batch-count adjustment for the model's schedules, autocast (bf16 anywhere, fp16 with a
GradScaler on CUDA), a float64 running-average model, atomic checkpoints every N batches and
every epoch, validation each epoch, and bad-batch guards.

Under torchrun (``zipasr train --nproc-per-node N``; zipasr.train.launch) every process is one
DDP rank, as icefall's train.py with ``--world-size N``: NCCL on CUDA (device cuda:LOCAL_RANK),
gloo on CPU; gradients are averaged across ranks, so ScaledAdam's clipping sees the reduced
gradients and every rank stays identical. Rank 0 alone writes checkpoints (the unwrapped model's
state dict: no ``module.`` prefix), the running-average model, metrics and MLflow tracking; the
validation loss is summed over the ranks' shards of the dev set; a bad batch on any rank makes
every rank skip the step. The learning rate follows the raw batch index (Eden, as icefall) and
the model's schedules the total batch duration max_duration x world_size.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from zipasr.errors import ZipasrError
from zipasr.io import atomic_path, file_md5, write_text_atomic
from zipasr.track.tracker import Tracker
from zipasr.train import checkpoint as ckpt
from zipasr.train.config import TrainConfig, fingerprint
from zipasr.train.data import LazyCuts, first_cuts, make_train_loader, make_valid_loader
from zipasr.train.launch import dist_env
from zipasr.train.numerics import differences, numerics_facts

log = logging.getLogger(__name__)


def loss_scales(batch_idx_train: int, warm_step: int, simple_loss_scale: float
                ) -> tuple[float, float]:
    """(simple, pruned) loss weights as icefall's: simple 1 -> s, pruned 0.1 -> 1 over warm_step."""
    if batch_idx_train >= warm_step:
        return simple_loss_scale, 1.0
    frac = batch_idx_train / warm_step
    return 1.0 - frac * (1.0 - simple_loss_scale), 0.1 + 0.9 * frac


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bf16 matrices in hardware: CUDA GPUs with bf16, CPUs with
    AVX512-BF16 or AMX. Elsewhere oneDNN emulates bf16: on AVX2 its products are ~5x slower
    than fp32 (BENCHMARKS.md)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private, so guarded
        return any(getattr(torch.cpu, name, lambda: False)() for name in checks)
    return False


class Trainer:
    # what _load_state reads: a checkpoint without one of them cannot be resumed from
    RESUME_KEYS = ("model", "model_avg", "optimizer", "scheduler", "grad_scaler", "sampler",
                   "rng", "batch_idx_train", "best_valid_loss", "best_valid_epoch",
                   "fingerprint")

    def __init__(self, cfg: TrainConfig, model_config: dict[str, Any], *,
                 train_cuts: list[Path], valid_cuts: list[Path], bpe_model: Path,
                 exp_dir: Path, progress: bool | None = None,
                 tracker: Tracker | None = None,
                 on_the_fly_features: dict[str, Any] | None = None) -> None:
        """``on_the_fly_features``: compute the training features from the audio in the loader
        with the data stage's extractor and these of its options (``num_mel_bins``,
        ``frame_shift``, ``dither``; ``{}``: its defaults), for cut manifests without stored
        features (``zipasr fbank --no-features``). None: read stored features."""
        from zipasr.data.fbank import extractor_options

        self.cfg = cfg
        self.model_config_in = dict(model_config)
        self.train_cuts = [Path(p) for p in train_cuts]
        self.valid_cuts = [Path(p) for p in valid_cuts]
        self.bpe_model = Path(bpe_model)
        self.exp_dir = Path(exp_dir)
        self.progress = sys.stderr.isatty() if progress is None else progress
        # DDP rank (torchrun's environment); 1, 0, 0 for a single process
        self.world_size, self.rank, self.local_rank = dist_env()
        self.ddp: torch.nn.parallel.DistributedDataParallel | None = None
        self.tracker = tracker or Tracker()  # MLflow hooks (zipasr.track); no-op by default
        self.on_the_fly_features = (None if on_the_fly_features is None
                                    else extractor_options(on_the_fly_features))
        # the training data's size as the last full pass over it found it: {"cuts", "hours",
        # "dropped", "batches" (this rank's, per epoch)}; None until a pass or a checkpoint says
        self.train_stats: dict[str, Any] | None = None

    # -- setup -------------------------------------------------------------------------

    def _device(self) -> torch.device:
        if self.cfg.device == "auto":
            dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        else:
            dev = torch.device(self.cfg.device)
        if dev.type == "cuda" and self.world_size > 1:
            dev = torch.device("cuda", self.local_rank)  # one GPU per rank
        return dev

    def _init_dist(self) -> None:
        """Join the process group torchrun set up (MASTER_ADDR/PORT, RANK, WORLD_SIZE)."""
        import torch.distributed as dist

        if self.world_size == 1 or dist.is_initialized():
            return
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        dist.init_process_group(backend)
        log.info("DDP: rank %d of %d (local rank %d), backend %s, device %s, %d CPU threads "
                 "(MKL_NUM_THREADS=%s)", self.rank, self.world_size, self.local_rank, backend,
                 self.device, torch.get_num_threads(), os.environ.get("MKL_NUM_THREADS", "-"))

    def _barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    def _all_reduce(self, values: list[float], op: str = "sum") -> list[float]:
        """Sum (or max) of ``values`` over the ranks, in float64."""
        if self.world_size == 1:
            return values
        import torch.distributed as dist

        dev = self.device if self.device.type == "cuda" else torch.device("cpu")
        t = torch.tensor(values, dtype=torch.float64, device=dev)
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return t.tolist()

    def _fingerprint(self) -> str:
        """What a run's result depends on: a changed value means a new experiment, not a resume."""
        cfg = {k: v for k, v in self.cfg.to_dict().items()
               if k not in TrainConfig.RESUMABLE_CHANGES}
        inputs = {str(p): self.input_md5[p] for p in self.train_cuts + [self.bpe_model]}
        fp = {"train": cfg, "model": asdict(self.model_config), "inputs": inputs}
        if self.world_size != 1:
            # the result depends on it (total batch, batch-count adjustment, sampler shards);
            # left out at 1 so single-process experiments keep their fingerprints
            fp["world_size"] = self.world_size
        if self.on_the_fly_features is not None:
            # the manifests without features do not change with the extractor's options, the
            # result does (left out otherwise, as world_size)
            fp["features_on_the_fly"] = self.on_the_fly_features
        return fingerprint(fp)

    def _claim_exp_dir(self, fp: str) -> None:
        """Make exp_dir ours. Checkpoints of a different configuration are moved aside, never
        deleted and never resumed from."""
        self.exp_dir.mkdir(parents=True, exist_ok=True)
        fp_file = self.exp_dir / "fingerprint"
        old = fp_file.read_text().strip() if fp_file.is_file() else None
        stale = [p for p in self.exp_dir.iterdir()
                 if p.name.endswith(".pt") or ".pt.corrupt" in p.name  # (set aside by resume)
                 or p.name in ("latest", "metrics.jsonl")]
        if stale and old != fp:
            dest = self.exp_dir / f"superseded-{time.strftime('%Y%m%d-%H%M%S')}"
            dest.mkdir()
            for p in stale:
                shutil.move(str(p), dest / p.name)
            log.warning("configuration or data changed since the last run: moved its "
                        "checkpoints to %s and started afresh", dest)
        write_text_atomic(fp_file, fp + "\n")

    def _build(self) -> None:
        import sentencepiece as spm

        from zipasr import loss as rnnt_loss
        from zipasr.model import Transducer, ZipformerConfig
        from zipasr.optim import Eden, ScaledAdam, get_parameter_groups_with_lrs

        cfg = self.cfg
        self.device = self._device()
        self._init_dist()
        if cfg.precision == "fp16" and self.device.type != "cuda":
            raise ZipasrError("train.precision fp16 needs a CUDA device; use bf16 on CPU")
        rnnt_loss.set_backend(cfg.rnnt_backend)
        self.sp = spm.SentencePieceProcessor(model_file=str(self.bpe_model))
        mc = dict(self.model_config_in)
        # the BPE model's size is the model's output size: a model.vocab_size that disagrees is
        # an error, not silently replaced (the workflow rejects it too when the DAG loads)
        if "vocab_size" in mc and mc["vocab_size"] != self.sp.get_piece_size():
            raise ZipasrError(f"model.vocab_size {mc['vocab_size']} disagrees with the BPE "
                              f"model's vocabulary size {self.sp.get_piece_size()} "
                              f"({self.bpe_model}); drop model.vocab_size")
        mc["vocab_size"] = self.sp.get_piece_size()
        try:
            self.model_config = ZipformerConfig.from_dict(mc)
        except (KeyError, TypeError, ValueError) as e:
            raise ZipasrError(f"model config: {e}") from e
        torch.manual_seed(cfg.seed)
        self.model = Transducer(self.model_config).to(self.device)
        self.num_params = sum(p.numel() for p in self.model.parameters())
        if self.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            # as icefall: layer skipping leaves some parameters unused in a step. The wrapper is
            # used for training forwards only; self.model (what is saved, averaged, validated
            # and given batch counts) stays the plain Transducer.
            self.ddp = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda"
                else None, find_unused_parameters=True)
        self.optimizer = ScaledAdam(
            get_parameter_groups_with_lrs(self.model, lr=cfg.base_lr, include_names=True),
            lr=cfg.base_lr, clipping_scale=2.0)
        self.scheduler = Eden(self.optimizer, cfg.lr_batches, cfg.lr_epochs,
                              warmup_batches=cfg.warmup_batches, warmup_start=cfg.warmup_start)
        self.scaler = torch.amp.GradScaler("cuda", init_scale=1.0,
                                           enabled=cfg.precision == "fp16")
        # float64 running average of the weights (icefall's model_avg), kept in float64 throughout
        self.model_avg = {k: v.detach().to(torch.float64).clone() if v.is_floating_point()
                          else v.detach().clone() for k, v in self.model.state_dict().items()}
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
        # under bf16/fp16 autocast the joiner is in half precision anyway
        self.joiner_bf16 = self.autocast_dtype is None and (
            cfg.joiner_bf16 is True or (cfg.joiner_bf16 == "auto" and native_bf16(self.device)))
        # what the numbers depend on beyond config, data and seed (summary, checkpoints, MLflow)
        self.numerics = numerics_facts(
            self.device, precision=cfg.precision, joiner_bf16=self.joiner_bf16,
            joiner_bf16_setting=cfg.joiner_bf16, native_bf16=native_bf16(self.device),
            world_size=self.world_size)

    def _data(self) -> None:
        """The loaders, over cut manifests read lazily: nothing is read whole at start-up (the
        sampler reads its duration-bin estimate and fills its buffer, lhotse's DynamicBucketing
        way), so start-up time and memory do not grow with the corpus. The training data's size
        is counted by the first full pass (:meth:`_epoch_done`)."""
        from lhotse import CutSet

        cfg = self.cfg
        extractor, frame_shift = None, 0.01
        if self.on_the_fly_features is not None:
            from zipasr.data.fbank import fbank_extractor

            extractor = fbank_extractor(**self.on_the_fly_features)
            frame_shift = extractor.frame_shift
        self._check_cuts(self.train_cuts, "training", extractor)
        self.train_set = LazyCuts(self.train_cuts, self.sp, cfg.min_cut_duration,
                                  cfg.max_cut_duration, frame_shift=frame_shift)
        if self.train_set.first() is None:
            raise ZipasrError("no training cut left after filtering")
        noise = None
        if cfg.noise_cuts:
            noise = CutSet.from_file(cfg.noise_cuts)  # small (MUSAN: ~2k cuts): in memory
        self.train_loader, self.sampler, self.train_dataset = make_train_loader(
            CutSet(self.train_set), cfg, world_size=self.world_size, rank=self.rank,
            noise_cuts=noise, extractor=extractor)
        # validation keeps stored features; a dev manifest without them is computed on the fly
        # too when training is (each rank validates every world_size-th cut: all cuts once)
        stored = self._check_cuts(self.valid_cuts, "validation", extractor)
        valid = LazyCuts(self.valid_cuts, self.sp, 0.0, float("inf"), frame_shift=frame_shift,
                         shard=(self.rank, self.world_size) if self.world_size > 1 else None)
        self.valid_loader = make_valid_loader(CutSet(valid), cfg.max_duration,
                                              extractor=None if stored else extractor)

    def _check_cuts(self, paths: list[Path], what: str, extractor: Any) -> bool:
        """Whether every manifest's first cut has stored features; a manifest without them
        needs ``extractor`` (on-the-fly features) and audio. Reads one line of each."""
        stored = True
        for path, cut in zip(paths, first_cuts(paths), strict=True):
            if cut is None or cut.has_features:
                continue
            stored = False
            if extractor is None:
                raise ZipasrError(
                    f"{what} cuts {path} have no features (cut {cut.id}): compute them "
                    "(zipasr fbank), or compute them in the loader: zipasr train "
                    "--on-the-fly-features (the DAG's features.on_the_fly: true)")
            if not cut.has_recording:
                raise ZipasrError(f"{what} cuts {path} have neither features nor audio "
                                  f"(cut {cut.id})")
        return stored

    def _epoch_done(self) -> None:
        """After an epoch's full pass: the training data's size, logged the first time."""
        seen = self.train_set.last_pass
        if seen is None:
            return
        self.train_set.last_pass = None
        known = self.train_stats
        self.train_stats = dict(seen, batches=self.batches_in_epoch)
        if known is None or known["cuts"] != seen["cuts"]:
            log.info("training data: %d cuts, %.2f h per epoch (%d filtered out: duration or too "
                     "many tokens); %d batches per epoch%s", seen["cuts"], seen["hours"],
                     seen["dropped"], self.batches_in_epoch,
                     " per rank" if self.world_size > 1 else "")

    def _train_data_size(self) -> dict[str, Any]:
        """The training data's size: from this run's or the checkpoint's last full pass, else
        (nothing left to train, an older checkpoint) one pass over the manifests' metadata."""
        if self.train_stats is None:
            for _ in self.train_set:
                pass
            self.train_stats = dict(self.train_set.last_pass, batches=None)
        return self.train_stats

    # -- state -------------------------------------------------------------------------

    def _state(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "model_avg": self.model_avg,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "grad_scaler": self.scaler.state_dict(),
            "sampler": {"epoch": self.cur_epoch, "batches_done": self.batches_in_epoch},
            "train_data": self.train_stats,  # the data's size (a resume need not count it)
            "rng": ckpt.rng_state(),
            "world_size": self.world_size,
            "model_config": asdict(self.model_config),
            "train_config": self.cfg.to_dict(),
            # icefall's params, flattened at the top level as icefall does
            "batch_idx_train": self.batch_idx_train,
            "cur_epoch": self.cur_epoch if self.batches_in_epoch else self.cur_epoch - 1,
            "average_period": self.cfg.average_period,
            "best_valid_loss": self.best_valid_loss,
            "best_valid_epoch": self.best_valid_epoch,
            "fingerprint": self.fp,
            "numerics": self.numerics,
            "numerics_changes": self.numerics_changes,
        }

    def _resume(self) -> bool:
        """Continue from the newest usable checkpoint; unusable newer ones (truncated, garbled,
        missing) are skipped with a warning and set aside as ``<name>.corrupt``."""
        resumed = ckpt.resume(self.exp_dir, self._load_state, self.RESUME_KEYS)
        if self.world_size > 1:
            # each rank chose on its own: a file unreadable on one rank only (a network
            # filesystem's hiccup) would leave the ranks on different states
            names: list[Any] = [None] * self.world_size
            torch.distributed.all_gather_object(names, resumed and resumed.path.name)
            if len(set(names)) > 1:
                raise ZipasrError(f"the ranks resumed from different checkpoints: {names}")
        if resumed is None:
            return False
        path = resumed.path
        if self.rank == 0 and resumed.skipped:  # every rank has loaded (all_gather above)
            for bad, _ in resumed.skipped:
                if bad.is_file():
                    log.warning("moved unusable checkpoint %s to %s", bad, ckpt.set_aside(bad))
            ckpt.point_latest(path)
        log.info("resumed from %s (epoch %d, batch %d)", path, self.cur_epoch,
                 self.batch_idx_train)
        return True

    def _load_state(self, path: Path, state: dict[str, Any]) -> None:
        """Restore the training state from checkpoint ``state`` (read from ``path``)."""
        if state.get("fingerprint") != self.fp:
            raise ZipasrError(f"{path} belongs to another configuration (fingerprint mismatch)")
        self.model.load_state_dict(state["model"])
        self.model_avg = state["model_avg"]
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["grad_scaler"])
        self.batch_idx_train = state["batch_idx_train"]
        self.cur_epoch = state["sampler"]["epoch"]
        self.batches_in_epoch = state["sampler"]["batches_done"]
        self.best_valid_loss = state["best_valid_loss"]
        self.best_valid_epoch = state["best_valid_epoch"]
        self.train_stats = state.get("train_data")
        ranks_rng = state.get("rng_ranks")
        if ranks_rng and len(ranks_rng) == self.world_size:
            ckpt.set_rng_state(ranks_rng[self.rank])  # each rank its own dropout stream
        else:
            ckpt.set_rng_state(state["rng"])
        # resumed on other numerics (another CPU kind, thread count, torch...): the result is no
        # longer bit-identical to an uninterrupted run; say so and keep the record
        self.numerics_changes = list(state.get("numerics_changes", []))
        changed = differences(state.get("numerics"), self.numerics)
        if changed:
            self.numerics_changes.append({"batch": self.batch_idx_train, "changed": changed})
            log.warning("resuming at batch %d with numerics other than %s was written with "
                        "(%s): the result will not be bit-identical to an uninterrupted run",
                        self.batch_idx_train, path.name,
                        "; ".join(f"{k}: {a} -> {b}" for k, (a, b) in changed.items()))

    def _save(self, name: str) -> None:
        """Rank 0 writes; with DDP every rank calls this (it gathers the ranks' RNG states, so a
        resume continues every rank's dropout stream) and waits for the file."""
        rngs = None
        if self.world_size > 1:
            rngs = [None] * self.world_size
            torch.distributed.all_gather_object(rngs, ckpt.rng_state())
        if self.rank == 0:
            state = self._state()
            if rngs is not None:
                state["rng_ranks"] = rngs
            ckpt.save(self.exp_dir / name, state)
            ckpt.prune(self.exp_dir, self.cfg.keep_last_k)
        self._barrier()

    # -- one batch ---------------------------------------------------------------------

    def _set_batch_count(self, batch_idx_train: int) -> None:
        from zipasr.model import set_batch_count
        from zipasr.optim import get_adjusted_batch_count

        set_batch_count(self.model, get_adjusted_batch_count(
            batch_idx_train, self.cfg.max_duration, self.world_size, self.cfg.ref_duration))

    def _losses(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.cfg
        feats = batch["inputs"].to(self.device)
        sup = batch["supervisions"]
        feature_lens = sup["num_frames"].to(self.device)
        y = self.sp.encode(sup["text"])
        with torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype or
                            torch.float32, enabled=self.autocast_dtype is not None):
            # DDP's wrapper only where gradients flow: validation runs the plain model, so the
            # ranks' differing numbers of validation batches need no collective
            model = self.ddp if self.ddp is not None and torch.is_grad_enabled() else self.model
            simple, pruned, ctc = model(feats, feature_lens, y, prune_range=cfg.prune_range,
                                        am_scale=cfg.am_scale, lm_scale=cfg.lm_scale,
                                        joiner_bf16=self.joiner_bf16)
        s_scale, p_scale = loss_scales(self.batch_idx_train, cfg.warm_step,
                                       cfg.simple_loss_scale)
        loss = torch.zeros((), device=self.device)
        info: dict[str, float] = {}
        if simple.numel():
            loss = loss + s_scale * simple + p_scale * pruned
            info["simple_loss"] = simple.item()
            info["pruned_loss"] = pruned.item()
        if ctc.numel():
            # scaled even without a transducer, as icefall's compute_loss does
            loss = loss + cfg.ctc_loss_scale * ctc
            info["ctc_loss"] = ctc.item()
        info["loss"] = loss.item()
        # icefall normalises by frames after 4x subsampling
        info["frames"] = float((feature_lens // 4).sum().item())
        info["audio_seconds"] = float(sup["num_frames"].sum().item()) * 0.01
        return loss, info

    def _update_average(self) -> None:
        """model_avg <- model_avg * (1 - w) + model * w, w = average_period / batch_idx_train."""
        w = self.cfg.average_period / self.batch_idx_train
        with torch.no_grad():
            for k, v in self.model.state_dict().items():
                avg = self.model_avg[k]
                if avg.is_floating_point():
                    avg.mul_(1.0 - w).add_(v.detach().to(avg.device, torch.float64), alpha=w)
                else:
                    avg.copy_(v)

    def _fp16_scale_rules(self) -> None:
        """icefall's manual GradScaler growth and collapse guards (its train.py at HEAD)."""
        b = self.batch_idx_train
        cur = self.scaler.get_scale()
        if (cur < 2.0 and b % 25 == 0) or (cur < 8.0 and b % 100 == 0) or (
                cur < 32.0 and b % 400 == 0):
            self.scaler.update(cur * 2.0)
        if cur < 0.01 and not getattr(self, "_warned_scale", False):
            log.warning("grad scale is small: %g", cur)
            self._warned_scale = True
            self._save("bad-model.pt")
        if cur < 1.0e-05:
            raise ZipasrError(f"grad scale {cur} collapsed: training diverged (fp16)")

    def _bad_batch(self, batch: dict[str, Any], why: str) -> None:
        self.bad_in_a_row += 1
        self.bad_total += 1
        suffix = f"-rank{self.rank}" if self.world_size > 1 else ""
        dest = self.exp_dir / "bad-batches" / f"batch-{self.batch_idx_train}{suffix}.pt"
        if "load_error" in batch:  # nothing was loaded: the cut ids say what to look at
            ids, record = batch["cut_ids"], {"cut_ids": batch["cut_ids"], "why": why}
        else:
            ids = [c.id for c in batch["supervisions"]["cut"]]
            record = {"cut_ids": ids, "inputs": batch["inputs"],
                      "text": batch["supervisions"]["text"], "why": why}
        # every rank saves its own batch (with DDP the culprit may be any of them)
        with atomic_path(dest) as tmp:
            torch.save(record, tmp)
        log.warning("batch %d skipped (%s); cuts %s...; saved to %s", self.batch_idx_train, why,
                    ids[:3], dest)
        self.optimizer.zero_grad(set_to_none=True)
        if self.bad_in_a_row >= self.cfg.max_consecutive_bad_batches:
            raise ZipasrError(f"{self.bad_in_a_row} bad batches in a row (last: {why}); "
                              f"stopped. The batches are in {dest.parent}")

    def _train_step(self, batch: dict[str, Any]) -> dict[str, float] | None:
        try:
            if "load_error" in batch:
                raise ValueError(f"unreadable input: {batch['load_error']}")
            loss, info = self._losses(batch)
            why = None if math.isfinite(info["loss"]) else f"non-finite loss {info['loss']}"
        except (RuntimeError, ValueError, AssertionError) as e:
            if isinstance(e, ZipasrError):
                raise
            why = f"{type(e).__name__}: {e}"
        if self.world_size > 1:
            # every rank skips, or none: one rank alone in backward would wait forever in DDP's
            # gradient all-reduce. Skipping backward after a forward is safe for DDP (no
            # gradient hook has fired, so no reduction is pending).
            if self._all_reduce([0.0 if why is None else 1.0], "max")[0] and why is None:
                why = "a bad batch on another rank"
        if why is not None:
            self._bad_batch(batch, why)
            return None
        try:
            self.scaler.scale(loss).backward()
        except (RuntimeError, ValueError, AssertionError) as e:
            if isinstance(e, ZipasrError) or self.world_size > 1:
                raise  # with DDP the other ranks are inside the all-reduce: fail the job
            self._bad_batch(batch, f"{type(e).__name__}: {e}")
            return None
        self.scheduler.step_batch(self.batch_idx_train)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.cfg.precision == "fp16":
            self._fp16_scale_rules()
        self.bad_in_a_row = 0
        return info

    # -- validation --------------------------------------------------------------------

    def validate(self) -> float:
        self.model.eval()
        tot, frames = 0.0, 0.0
        with torch.no_grad():
            for batch in self.valid_loader:
                if "load_error" in batch:
                    log.warning("validation batch skipped (%s); cuts %s...",
                                batch["load_error"], batch["cut_ids"][:3])
                    continue
                loss, info = self._losses(batch)
                tot += info["loss"]
                frames += info["frames"]
        self.model.train()
        tot, frames = self._all_reduce([tot, frames])  # each rank validated its shard
        return tot / max(frames, 1.0)

    # -- the loop ----------------------------------------------------------------------

    def _log_metrics(self, record: dict[str, Any]) -> None:
        if self.rank != 0:
            return
        with open(self.exp_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def _truncate_metrics(self) -> None:
        """After a resume, drop metric lines the interrupted run wrote past its checkpoint."""
        path = self.exp_dir / "metrics.jsonl"
        if not path.is_file():
            return
        keep = [ln for ln in path.read_text().splitlines()
                if ln.strip() and json.loads(ln).get("batch", 0) <= self.batch_idx_train]
        write_text_atomic(path, "".join(k + "\n" for k in keep))

    def run(self) -> dict[str, Any]:
        from tqdm import tqdm

        cfg = self.cfg
        t_start = time.perf_counter()
        torch.manual_seed(cfg.seed)
        self._build()
        # hashed once: the fingerprint and the tracker's data tags both use these
        self.input_md5 = {p: file_md5(p) for p in
                          dict.fromkeys(self.train_cuts + self.valid_cuts + [self.bpe_model])}
        self.fp = self._fingerprint()
        if self.rank == 0:
            self._claim_exp_dir(self.fp)
        self._barrier()  # every rank resumes from what rank 0 left in exp_dir
        self._data()
        self.batch_idx_train, self.cur_epoch, self.batches_in_epoch = 0, 1, 0
        self.best_valid_loss, self.best_valid_epoch = float("inf"), 0
        self.bad_in_a_row = self.bad_total = 0
        self.numerics_changes: list[dict[str, Any]] = []
        resumed = self._resume()
        if resumed and self.rank == 0:
            self._truncate_metrics()
        log.info("model: %s params; %s; device %s; precision %s%s", f"{self.num_params:,}",
                 f"{self.train_stats['hours']:.2f} h of training audio" if self.train_stats
                 else f"training cuts streamed from {len(self.train_cuts)} manifest(s)",
                 self.device, cfg.precision, " (joiner in bf16)" if self.joiner_bf16 else "")
        if self.on_the_fly_features is not None:
            log.info("training features computed on the fly: %s", self.on_the_fly_features)
        if self.rank == 0:
            self.tracker.start(self, resumed)  # tracking hook
        self.model.train()
        last_valid = None

        while self.cur_epoch <= cfg.num_epochs:
            epoch = self.cur_epoch
            self.scheduler.step_epoch(epoch - 1)
            skip = self.batches_in_epoch
            if skip == 0:
                ckpt.fix_random_seed(cfg.seed + epoch - 1)  # as icefall, per epoch
            else:
                # the batch count the model had when the interrupted run set it last
                self._set_batch_count(self.batch_idx_train - skip % 10)
            self.sampler.set_epoch(epoch - 1, skip=skip)
            self.train_dataset.epoch = epoch - 1
            # the batch count of the last full pass (the first epoch's is not known yet)
            bar = tqdm(total=(self.train_stats or {}).get("batches"), initial=skip,
                       desc=f"epoch {epoch}/{cfg.num_epochs}",
                       disable=not self.progress or self.rank != 0, mininterval=1.0)
            t_win, audio_win = time.perf_counter(), 0.0
            for batch in self.train_loader:
                if self.batches_in_epoch % 10 == 0:
                    self._set_batch_count(self.batch_idx_train)
                self.batch_idx_train += 1
                self.batches_in_epoch += 1
                info = self._train_step(batch)
                if info is not None:
                    audio_win += info["audio_seconds"]
                    if self.rank == 0 and self.batch_idx_train % cfg.average_period == 0:
                        self._update_average()  # rank 0's checkpoints carry it (as icefall)
                    lr = self.scheduler.get_last_lr()[0]
                    bar.update(1)
                    bar.set_postfix(loss=f"{info['loss'] / max(info['frames'], 1):.3f}",
                                    lr=f"{lr:.2e}")
                    if self.batch_idx_train % cfg.log_interval == 0:
                        dt = time.perf_counter() - t_win
                        rec = {"batch": self.batch_idx_train, "epoch": epoch, "lr": lr,
                               "loss": info["loss"] / max(info["frames"], 1),
                               "audio_per_second": audio_win / max(dt, 1e-9)}
                        for k in ("simple_loss", "pruned_loss", "ctc_loss"):
                            if k in info:
                                rec[k] = info[k] / max(info["frames"], 1)
                        if self.scaler.is_enabled():
                            rec["grad_scale"] = self.scaler.get_scale()
                        self._log_metrics(rec)
                        if self.rank == 0:
                            self.tracker.log_train(rec, self.optimizer)  # tracking hook
                        log.info("epoch %d batch %d: loss %.4f lr %.2e, %.1f s audio/s", epoch,
                                 self.batch_idx_train, rec["loss"], lr, rec["audio_per_second"])
                        t_win, audio_win = time.perf_counter(), 0.0
                if cfg.valid_interval and self.batch_idx_train % cfg.valid_interval == 0:
                    v = self.validate()
                    self._log_metrics({"batch": self.batch_idx_train, "epoch": epoch,
                                       "valid_loss": v})
                    if self.rank == 0:
                        self.tracker.log_valid(self.batch_idx_train, epoch, v, False)  # tracking
                # not inside a run of bad batches: the newest checkpoint must be one to trust
                if (cfg.save_every_n and self.batch_idx_train % cfg.save_every_n == 0
                        and self.bad_in_a_row == 0):
                    self._save(f"checkpoint-{self.batch_idx_train}.pt")
            bar.close()
            self._epoch_done()
            if self.batches_in_epoch == 0:
                raise ZipasrError(
                    f"epoch {epoch} produced no training batch: with drop_last, every bucket "
                    f"needs at least train.max_duration ({cfg.max_duration} s) of audio; lower "
                    f"train.num_buckets ({cfg.num_buckets}) or train.max_duration")
            last_valid = self.validate()
            if last_valid < self.best_valid_loss:
                self.best_valid_loss, self.best_valid_epoch = last_valid, epoch
            self._log_metrics({"batch": self.batch_idx_train, "epoch": epoch,
                               "valid_loss": last_valid})
            if self.rank == 0:
                self.tracker.log_valid(self.batch_idx_train, epoch, last_valid, True)  # tracking
            log.info("epoch %d done: valid loss %.4f (best %.4f at epoch %d)", epoch,
                     last_valid, self.best_valid_loss, self.best_valid_epoch)
            self.cur_epoch += 1
            self.batches_in_epoch = 0
            self._save(f"epoch-{epoch}.pt")

        data = self._train_data_size()
        summary = {"epochs": cfg.num_epochs, "batch_idx_train": self.batch_idx_train,
                   "valid_loss": last_valid, "best_valid_loss": self.best_valid_loss,
                   "best_valid_epoch": self.best_valid_epoch, "num_params": self.num_params,
                   "train_hours": round(data["hours"], 4), "train_cuts": data["cuts"],
                   "resumed": resumed,
                   "bad_batches": self.bad_total, "world_size": self.world_size,
                   "seconds_this_run": round(time.perf_counter() - t_start, 1),
                   "numerics": self.numerics, "numerics_changes": self.numerics_changes}
        if self.on_the_fly_features is not None:
            summary["features_on_the_fly"] = self.on_the_fly_features
        return summary
