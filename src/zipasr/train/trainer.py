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

How it is laid out: the Trainer's attributes are the run's inputs (config, paths, device, rank,
set by ``__init__`` and :meth:`Trainer._setup`); everything training changes is one
:class:`~zipasr.train.state.TrainState` (``self.state``), built by :meth:`Trainer._new_state`
and filled by a resume (:func:`zipasr.train.checkpoint.restore`). The DDP collectives are in
zipasr.train.distributed. :meth:`Trainer.run` reads: for each epoch, for each batch: step,
maybe log, maybe validate, maybe checkpoint; end of epoch: validate, save. The tracker is handed
plain records (:class:`~zipasr.track.tracker.RunInfo`, metric dicts), never the trainer.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from zipasr.errors import ZipasrError
from zipasr.io import atomic_path, file_md5, write_text_atomic
from zipasr.track.tracker import RunInfo, Tracker
from zipasr.train import checkpoint as ckpt
from zipasr.train import distributed as dist
from zipasr.train.config import TrainConfig, fingerprint
from zipasr.train.data import LazyCuts, first_cuts, make_train_loader, make_valid_loader
from zipasr.train.launch import dist_env
from zipasr.train.numerics import differences, numerics_facts
from zipasr.train.state import TrainState

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
        self.tracker = tracker or Tracker()  # MLflow hooks (zipasr.track); no-op by default
        self.on_the_fly_features = (None if on_the_fly_features is None
                                    else extractor_options(on_the_fly_features))
        # what the run changes as it goes: built by _new_state (after _setup), filled by a resume
        self.state: TrainState

    # -- setup -------------------------------------------------------------------------

    def _device(self) -> torch.device:
        if self.cfg.device == "auto":
            dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        else:
            dev = torch.device(self.cfg.device)
        if dev.type == "cuda" and self.world_size > 1:
            dev = torch.device("cuda", self.local_rank)  # one GPU per rank
        return dev

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

    def _setup(self) -> None:
        """What the run's state is built with, fixed for the run: device (and the DDP process
        group), the BPE model, the resolved model config, precision and numerics."""
        import sentencepiece as spm

        from zipasr import loss as rnnt_loss
        from zipasr.model import ZipformerConfig

        cfg = self.cfg
        self.device = self._device()
        dist.init_process_group(self.device, self.world_size, self.rank, self.local_rank)
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
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
        # under bf16/fp16 autocast the joiner is in half precision anyway
        self.joiner_bf16 = self.autocast_dtype is None and (
            cfg.joiner_bf16 is True or (cfg.joiner_bf16 == "auto" and native_bf16(self.device)))
        # what the numbers depend on beyond config, data and seed (summary, checkpoints, MLflow)
        self.numerics = numerics_facts(
            self.device, precision=cfg.precision, joiner_bf16=self.joiner_bf16,
            joiner_bf16_setting=cfg.joiner_bf16, native_bf16=native_bf16(self.device),
            world_size=self.world_size)

    def _new_state(self, data: bool = True) -> TrainState:
        """The training state at batch 0, the one place it is built: model (seeded), its DDP
        wrapper, optimizer, scheduler, grad scaler, running average, loaders (``data=False``:
        none, for steps on batches made by hand), counters."""
        from zipasr.model import Transducer
        from zipasr.optim import Eden, ScaledAdam, get_parameter_groups_with_lrs

        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        model = Transducer(self.model_config).to(self.device)
        ddp = None
        if self.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            # as icefall: layer skipping leaves some parameters unused in a step. The wrapper is
            # used for training forwards only; state.model (what is saved, averaged, validated
            # and given batch counts) stays the plain Transducer.
            ddp = DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda"
                else None, find_unused_parameters=True)
        optimizer = ScaledAdam(
            get_parameter_groups_with_lrs(model, lr=cfg.base_lr, include_names=True),
            lr=cfg.base_lr, clipping_scale=2.0)
        scheduler = Eden(optimizer, cfg.lr_batches, cfg.lr_epochs,
                         warmup_batches=cfg.warmup_batches, warmup_start=cfg.warmup_start)
        scaler = torch.amp.GradScaler("cuda", init_scale=1.0, enabled=cfg.precision == "fp16")
        # float64 running average of the weights (icefall's model_avg), kept in float64 throughout
        model_avg = {k: v.detach().to(torch.float64).clone() if v.is_floating_point()
                     else v.detach().clone() for k, v in model.state_dict().items()}
        return TrainState(model=model, ddp=ddp, optimizer=optimizer, scheduler=scheduler,
                          scaler=scaler, model_avg=model_avg, **(self._data() if data else {}))

    def _data(self) -> dict[str, Any]:
        """The loaders (TrainState's data fields), over cut manifests read lazily: nothing is
        read whole at start-up (the sampler reads its duration-bin estimate and fills its
        buffer, lhotse's DynamicBucketing way), so start-up time and memory do not grow with the
        corpus. The training data's size is counted by the first full pass
        (:meth:`_epoch_done`)."""
        from lhotse import CutSet

        cfg = self.cfg
        extractor, frame_shift = None, 0.01
        if self.on_the_fly_features is not None:
            from zipasr.data.fbank import fbank_extractor

            extractor = fbank_extractor(**self.on_the_fly_features)
            frame_shift = extractor.frame_shift
        self._check_cuts(self.train_cuts, "training", extractor)
        train_set = LazyCuts(self.train_cuts, self.sp, cfg.min_cut_duration,
                             cfg.max_cut_duration, frame_shift=frame_shift)
        if train_set.first() is None:
            raise ZipasrError("no training cut left after filtering")
        noise = None
        if cfg.noise_cuts:
            noise = CutSet.from_file(cfg.noise_cuts)  # small (MUSAN: ~2k cuts): in memory
        train_loader, sampler, train_dataset = make_train_loader(
            CutSet(train_set), cfg, world_size=self.world_size, rank=self.rank,
            noise_cuts=noise, extractor=extractor)
        # validation keeps stored features; a dev manifest without them is computed on the fly
        # too when training is (each rank validates every world_size-th cut: all cuts once)
        stored = self._check_cuts(self.valid_cuts, "validation", extractor)
        valid = LazyCuts(self.valid_cuts, self.sp, 0.0, float("inf"), frame_shift=frame_shift,
                         shard=(self.rank, self.world_size) if self.world_size > 1 else None)
        valid_loader = make_valid_loader(CutSet(valid), cfg.max_duration,
                                         extractor=None if stored else extractor)
        return {"train_set": train_set, "sampler": sampler, "train_loader": train_loader,
                "train_dataset": train_dataset, "valid_loader": valid_loader}

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
        s = self.state
        seen = s.train_set.last_pass
        if seen is None:
            return
        s.train_set.last_pass = None
        known = s.train_stats
        s.train_stats = dict(seen, batches=s.batches_in_epoch)
        if known is None or known["cuts"] != seen["cuts"]:
            log.info("training data: %d cuts, %.2f h per epoch (%d filtered out: duration or too "
                     "many tokens); %d batches per epoch%s", seen["cuts"], seen["hours"],
                     seen["dropped"], s.batches_in_epoch,
                     " per rank" if self.world_size > 1 else "")

    def _train_data_size(self) -> dict[str, Any]:
        """The training data's size: from this run's or the checkpoint's last full pass, else
        (nothing left to train, an older checkpoint) one pass over the manifests' metadata."""
        s = self.state
        if s.train_stats is None:
            for _ in s.train_set:
                pass
            s.train_stats = dict(s.train_set.last_pass, batches=None)
        return s.train_stats

    # -- checkpoints -------------------------------------------------------------------

    def _resume(self) -> bool:
        """Continue from the newest usable checkpoint; unusable newer ones (truncated, garbled,
        missing) are skipped with a warning and set aside as ``<name>.corrupt``."""
        resumed = ckpt.resume(self.exp_dir, self._load_state, self.RESUME_KEYS)
        if self.world_size > 1:
            # each rank chose on its own: a file unreadable on one rank only (a network
            # filesystem's hiccup) would leave the ranks on different states
            names = dist.all_gather(resumed and resumed.path.name, self.world_size)
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
        log.info("resumed from %s (epoch %d, batch %d)", path, self.state.cur_epoch,
                 self.state.batch_idx_train)
        return True

    def _load_state(self, path: Path, checkpoint: dict[str, Any]) -> None:
        """Restore the training state from ``checkpoint`` (read from ``path``)."""
        if checkpoint.get("fingerprint") != self.fp:
            raise ZipasrError(f"{path} belongs to another configuration (fingerprint mismatch)")
        ckpt.restore(self.state, checkpoint, world_size=self.world_size, rank=self.rank)
        # resumed on other numerics (another CPU kind, thread count, torch...): the result is no
        # longer bit-identical to an uninterrupted run; say so and keep the record
        changed = differences(checkpoint.get("numerics"), self.numerics)
        if changed:
            batch = self.state.batch_idx_train
            self.state.numerics_changes.append({"batch": batch, "changed": changed})
            log.warning("resuming at batch %d with numerics other than %s was written with "
                        "(%s): the result will not be bit-identical to an uninterrupted run",
                        batch, path.name,
                        "; ".join(f"{k}: {a} -> {b}" for k, (a, b) in changed.items()))

    def _save(self, name: str) -> None:
        """Rank 0 writes; with DDP every rank calls this (it gathers the ranks' RNG states, so a
        resume continues every rank's dropout stream) and waits for the file."""
        rngs = None
        if self.world_size > 1:
            rngs = dist.all_gather(ckpt.rng_state(), self.world_size)
        if self.rank == 0:
            state = ckpt.to_checkpoint(
                self.state, world_size=self.world_size, model_config=asdict(self.model_config),
                train_config=self.cfg.to_dict(), fingerprint=self.fp, numerics=self.numerics)
            if rngs is not None:
                state["rng_ranks"] = rngs
            ckpt.save(self.exp_dir / name, state)
            ckpt.prune(self.exp_dir, self.cfg.keep_last_k)
        dist.barrier(self.world_size)

    # -- one batch ---------------------------------------------------------------------

    def _set_batch_count(self, batch_idx_train: int) -> None:
        from zipasr.model import set_batch_count
        from zipasr.optim import get_adjusted_batch_count

        set_batch_count(self.state.model, get_adjusted_batch_count(
            batch_idx_train, self.cfg.max_duration, self.world_size, self.cfg.ref_duration))

    def _losses(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        cfg, s = self.cfg, self.state
        feats = batch["inputs"].to(self.device)
        sup = batch["supervisions"]
        feature_lens = sup["num_frames"].to(self.device)
        y = self.sp.encode(sup["text"])
        with torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype or
                            torch.float32, enabled=self.autocast_dtype is not None):
            # DDP's wrapper only where gradients flow: validation runs the plain model, so the
            # ranks' differing numbers of validation batches need no collective
            model = s.ddp if s.ddp is not None and torch.is_grad_enabled() else s.model
            simple, pruned, ctc = model(feats, feature_lens, y, prune_range=cfg.prune_range,
                                        am_scale=cfg.am_scale, lm_scale=cfg.lm_scale,
                                        joiner_bf16=self.joiner_bf16)
        s_scale, p_scale = loss_scales(s.batch_idx_train, cfg.warm_step,
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
        s = self.state
        w = self.cfg.average_period / s.batch_idx_train
        with torch.no_grad():
            for k, v in s.model.state_dict().items():
                avg = s.model_avg[k]
                if avg.is_floating_point():
                    avg.mul_(1.0 - w).add_(v.detach().to(avg.device, torch.float64), alpha=w)
                else:
                    avg.copy_(v)

    def _fp16_scale_rules(self) -> None:
        """icefall's manual GradScaler growth and collapse guards (its train.py at HEAD)."""
        b, scaler = self.state.batch_idx_train, self.state.scaler
        cur = scaler.get_scale()
        if (cur < 2.0 and b % 25 == 0) or (cur < 8.0 and b % 100 == 0) or (
                cur < 32.0 and b % 400 == 0):
            scaler.update(cur * 2.0)
        if cur < 0.01 and not getattr(self, "_warned_scale", False):
            log.warning("grad scale is small: %g", cur)
            self._warned_scale = True
            self._save("bad-model.pt")
        if cur < 1.0e-05:
            raise ZipasrError(f"grad scale {cur} collapsed: training diverged (fp16)")

    def _bad_batch(self, batch: dict[str, Any], why: str) -> None:
        s = self.state
        s.bad_in_a_row += 1
        s.bad_total += 1
        suffix = f"-rank{self.rank}" if self.world_size > 1 else ""
        dest = self.exp_dir / "bad-batches" / f"batch-{s.batch_idx_train}{suffix}.pt"
        if "load_error" in batch:  # nothing was loaded: the cut ids say what to look at
            ids, record = batch["cut_ids"], {"cut_ids": batch["cut_ids"], "why": why}
        else:
            ids = [c.id for c in batch["supervisions"]["cut"]]
            record = {"cut_ids": ids, "inputs": batch["inputs"],
                      "text": batch["supervisions"]["text"], "why": why}
        # every rank saves its own batch (with DDP the culprit may be any of them)
        with atomic_path(dest) as tmp:
            torch.save(record, tmp)
        log.warning("batch %d skipped (%s); cuts %s...; saved to %s", s.batch_idx_train, why,
                    ids[:3], dest)
        s.optimizer.zero_grad(set_to_none=True)
        if s.bad_in_a_row >= self.cfg.max_consecutive_bad_batches:
            raise ZipasrError(f"{s.bad_in_a_row} bad batches in a row (last: {why}); "
                              f"stopped. The batches are in {dest.parent}")

    def _train_step(self, batch: dict[str, Any]) -> dict[str, float] | None:
        """Forward, backward and optimizer step on ``batch`` at the current batch index; its
        loss info, or None for a bad batch (skipped on every rank)."""
        s = self.state
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
            bad = dist.all_reduce([0.0 if why is None else 1.0], self.world_size, self.device,
                                  "max")[0]
            if bad and why is None:
                why = "a bad batch on another rank"
        if why is not None:
            self._bad_batch(batch, why)
            return None
        try:
            s.scaler.scale(loss).backward()
        except (RuntimeError, ValueError, AssertionError) as e:
            if isinstance(e, ZipasrError) or self.world_size > 1:
                raise  # with DDP the other ranks are inside the all-reduce: fail the job
            self._bad_batch(batch, f"{type(e).__name__}: {e}")
            return None
        s.scheduler.step_batch(s.batch_idx_train)
        s.scaler.step(s.optimizer)
        s.scaler.update()
        s.optimizer.zero_grad(set_to_none=True)
        if self.cfg.precision == "fp16":
            self._fp16_scale_rules()
        s.bad_in_a_row = 0
        return info

    def _step(self, batch: dict[str, Any]) -> dict[str, float] | None:
        """The next batch of the epoch: the model's batch count (every 10 batches, as icefall),
        the counters, then :meth:`_train_step`."""
        s = self.state
        if s.batches_in_epoch % 10 == 0:
            self._set_batch_count(s.batch_idx_train)
        s.batch_idx_train += 1
        s.batches_in_epoch += 1
        return self._train_step(batch)

    # -- validation --------------------------------------------------------------------

    def validate(self) -> float:
        s = self.state
        s.model.eval()
        tot, frames = 0.0, 0.0
        with torch.no_grad():
            for batch in s.valid_loader:
                if "load_error" in batch:
                    log.warning("validation batch skipped (%s); cuts %s...",
                                batch["load_error"], batch["cut_ids"][:3])
                    continue
                loss, info = self._losses(batch)
                tot += info["loss"]
                frames += info["frames"]
        s.model.train()
        # each rank validated its shard
        tot, frames = dist.all_reduce([tot, frames], self.world_size, self.device)
        return tot / max(frames, 1.0)

    # -- metrics: metrics.jsonl, the log, the progress bar, the tracker ----------------

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
                if ln.strip() and json.loads(ln).get("batch", 0) <= self.state.batch_idx_train]
        write_text_atomic(path, "".join(k + "\n" for k in keep))

    def _run_info(self) -> RunInfo:
        """What the tracker is told at the start of the run."""
        s = self.state
        return RunInfo(exp_dir=self.exp_dir, fingerprint=self.fp,
                       batch_idx_train=s.batch_idx_train, log_interval=self.cfg.log_interval,
                       train_config=self.cfg.to_dict(), model_config=asdict(self.model_config),
                       num_params=s.num_params, device=self.device, input_md5=self.input_md5,
                       numerics=self.numerics, bpe_model=self.bpe_model)

    def _after_step(self, info: dict[str, float], bar: Any, window: _Window) -> None:
        """After a good step: the running average, the progress bar, every log_interval
        batches a metrics record."""
        s = self.state
        window.audio += info["audio_seconds"]
        if self.rank == 0 and s.batch_idx_train % self.cfg.average_period == 0:
            self._update_average()  # rank 0's checkpoints carry it (as icefall)
        lr = s.scheduler.get_last_lr()[0]
        bar.update(1)
        bar.set_postfix(loss=f"{info['loss'] / max(info['frames'], 1):.3f}", lr=f"{lr:.2e}")
        if s.batch_idx_train % self.cfg.log_interval == 0:
            self._log_train(info, lr, window)

    def _log_train(self, info: dict[str, float], lr: float, window: _Window) -> None:
        """One training record: metrics.jsonl, the tracker (with the gradient clipping), a log
        line; then a new throughput window."""
        s = self.state
        frames = max(info["frames"], 1)
        rec = {"batch": s.batch_idx_train, "epoch": s.cur_epoch, "lr": lr,
               "loss": info["loss"] / frames,
               "audio_per_second": window.audio / max(time.perf_counter() - window.t0, 1e-9)}
        for k in ("simple_loss", "pruned_loss", "ctc_loss"):
            if k in info:
                rec[k] = info[k] / frames
        if s.scaler.is_enabled():
            rec["grad_scale"] = s.scaler.get_scale()
        self._log_metrics(rec)
        if self.rank == 0:
            self.tracker.log_train({**rec, **_grad_clipping(s.optimizer)})  # tracking hook
        log.info("epoch %d batch %d: loss %.4f lr %.2e, %.1f s audio/s", s.cur_epoch,
                 s.batch_idx_train, rec["loss"], lr, rec["audio_per_second"])
        window.reset()

    def _log_valid(self, loss: float, end_of_epoch: bool) -> None:
        s = self.state
        self._log_metrics({"batch": s.batch_idx_train, "epoch": s.cur_epoch,
                           "valid_loss": loss})
        if self.rank == 0:
            self.tracker.log_valid(s.batch_idx_train, s.cur_epoch, loss,
                                   end_of_epoch)  # tracking hook

    # -- the loop ----------------------------------------------------------------------

    def _start(self) -> bool:
        """Set up, claim exp_dir, build the state and resume it; whether it resumed."""
        self._setup()
        # hashed once: the fingerprint and the tracker's data tags both use these
        self.input_md5 = {p: file_md5(p) for p in
                          dict.fromkeys(self.train_cuts + self.valid_cuts + [self.bpe_model])}
        self.fp = self._fingerprint()
        if self.rank == 0:
            self._claim_exp_dir(self.fp)
        dist.barrier(self.world_size)  # every rank resumes from what rank 0 left in exp_dir
        self.state = self._new_state()
        resumed = self._resume()
        if resumed and self.rank == 0:
            self._truncate_metrics()
        s = self.state
        log.info("model: %s params; %s; device %s; precision %s%s", f"{s.num_params:,}",
                 f"{s.train_stats['hours']:.2f} h of training audio" if s.train_stats
                 else f"training cuts streamed from {len(self.train_cuts)} manifest(s)",
                 self.device, self.cfg.precision, " (joiner in bf16)" if self.joiner_bf16 else "")
        if self.on_the_fly_features is not None:
            log.info("training features computed on the fly: %s", self.on_the_fly_features)
        if self.rank == 0:
            self.tracker.start(self._run_info(), resumed)  # tracking hook
        return resumed

    def _start_epoch(self) -> Any:
        """Scheduler, seeds (or the interrupted run's batch count), sampler position; the
        epoch's progress bar."""
        from tqdm import tqdm

        cfg, s = self.cfg, self.state
        epoch = s.cur_epoch
        s.scheduler.step_epoch(epoch - 1)
        skip = s.batches_in_epoch
        if skip == 0:
            ckpt.fix_random_seed(cfg.seed + epoch - 1)  # as icefall, per epoch
        else:
            # the batch count the model had when the interrupted run set it last
            self._set_batch_count(s.batch_idx_train - skip % 10)
        s.sampler.set_epoch(epoch - 1, skip=skip)
        s.train_dataset.epoch = epoch - 1
        # the batch count of the last full pass (the first epoch's is not known yet)
        return tqdm(total=(s.train_stats or {}).get("batches"), initial=skip,
                    desc=f"epoch {epoch}/{cfg.num_epochs}",
                    disable=not self.progress or self.rank != 0, mininterval=1.0)

    def _maybe_validate(self) -> None:
        every = self.cfg.valid_interval
        if every and self.state.batch_idx_train % every == 0:
            self._log_valid(self.validate(), end_of_epoch=False)

    def _maybe_checkpoint(self) -> None:
        # not inside a run of bad batches: the newest checkpoint must be one to trust
        s, every = self.state, self.cfg.save_every_n
        if every and s.batch_idx_train % every == 0 and s.bad_in_a_row == 0:
            self._save(f"checkpoint-{s.batch_idx_train}.pt")

    def _end_epoch(self) -> float:
        """The data's size, validation, the best loss, the epoch's checkpoint; the valid loss."""
        cfg, s = self.cfg, self.state
        epoch = s.cur_epoch
        self._epoch_done()
        if s.batches_in_epoch == 0:
            raise ZipasrError(
                f"epoch {epoch} produced no training batch: with drop_last, every bucket "
                f"needs at least train.max_duration ({cfg.max_duration} s) of audio; lower "
                f"train.num_buckets ({cfg.num_buckets}) or train.max_duration")
        valid = self.validate()
        if valid < s.best_valid_loss:
            s.best_valid_loss, s.best_valid_epoch = valid, epoch
        self._log_valid(valid, end_of_epoch=True)
        log.info("epoch %d done: valid loss %.4f (best %.4f at epoch %d)", epoch,
                 valid, s.best_valid_loss, s.best_valid_epoch)
        s.cur_epoch += 1
        s.batches_in_epoch = 0
        self._save(f"epoch-{epoch}.pt")
        return valid

    def run(self) -> dict[str, Any]:
        """Train (or resume) to num_epochs; the run's summary."""
        t_start = time.perf_counter()
        torch.manual_seed(self.cfg.seed)
        resumed = self._start()
        s = self.state
        s.model.train()
        last_valid = None
        while s.cur_epoch <= self.cfg.num_epochs:
            bar, window = self._start_epoch(), _Window()
            for batch in s.train_loader:
                info = self._step(batch)
                if info is not None:
                    self._after_step(info, bar, window)
                self._maybe_validate()
                self._maybe_checkpoint()
            bar.close()
            last_valid = self._end_epoch()
        return self._summary(resumed, last_valid, time.perf_counter() - t_start)

    def _summary(self, resumed: bool, last_valid: float | None, seconds: float
                 ) -> dict[str, Any]:
        cfg, s = self.cfg, self.state
        data = self._train_data_size()
        summary = {"epochs": cfg.num_epochs, "batch_idx_train": s.batch_idx_train,
                   "valid_loss": last_valid, "best_valid_loss": s.best_valid_loss,
                   "best_valid_epoch": s.best_valid_epoch, "num_params": s.num_params,
                   "train_hours": round(data["hours"], 4), "train_cuts": data["cuts"],
                   "resumed": resumed,
                   "bad_batches": s.bad_total, "world_size": self.world_size,
                   "seconds_this_run": round(seconds, 1),
                   "numerics": self.numerics, "numerics_changes": s.numerics_changes}
        if self.on_the_fly_features is not None:
            summary["features_on_the_fly"] = self.on_the_fly_features
        return summary


class _Window:
    """The audio trained on since the last training record, for its throughput."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.t0, self.audio = time.perf_counter(), 0.0


def _grad_clipping(optimizer: Any) -> dict[str, float]:
    """ScaledAdam's last gradient norm and clipping, as tracker metrics (none in the first
    steps, before it has estimated them)."""
    out: dict[str, float] = {}
    clip = getattr(optimizer, "last_clipping", None)
    if clip and clip[0]:
        for k, name in (("tot_norm", "grad_norm"), ("threshold", "grad_clip_threshold"),
                        ("factor", "grad_clip_factor")):
            try:
                out[name] = float(clip[0][k])
            except (KeyError, TypeError, ValueError, RuntimeError):
                pass  # not estimated yet (first steps)
    return out
