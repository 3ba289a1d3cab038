"""Training data: filtered cuts, a resumable bucketing sampler, and batches whose augmentation
is a pure function of (seed, epoch, batch), so a resumed run sees exactly the same batches."""

from __future__ import annotations

import logging
import random
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)


def encoder_frames(num_frames: int) -> int:
    """Frames after Conv-Embed (T-7)//2 and the final 2x downsampling: ((T-7)//2+1)//2."""
    return ((num_frames - 7) // 2 + 1) // 2


def filter_cuts(cuts, sp, min_duration: float, max_duration: float):
    """Keep cuts icefall's ``remove_short_and_long_utt`` keeps: duration in range and enough
    encoder frames for the tokens (T' - 2 >= tokens: the transducer emits <= 1 token/frame).

    The model reads a cut's features from its start and its transcript as the whole target, so
    a cut whose supervision does not span it (silence or untranscribed speech around the
    segment, or several segments) is first cut down to each of its supervisions. Cuts with no
    supervision or an empty transcript are dropped. Returns ``(kept CutSet, dropped count)``."""
    from lhotse import CutSet

    kept, dropped = [], 0
    for cut in cuts:
        sups = cut.supervisions
        if not sups:
            dropped += 1
            continue
        if len(sups) == 1 and sups[0].start <= 0.01 and sups[0].end >= cut.duration - 0.01:
            pieces = [cut]
        else:  # one cut per supervision, exactly its span (ids stay unique and traceable)
            pieces = []
            for i, sup in enumerate(sups):
                start, end = max(sup.start, 0.0), min(sup.end, cut.duration)
                piece = cut.truncate(offset=start, duration=end - start, preserve_id=True,
                                     keep_excessive_supervisions=False)
                pieces.append(piece.with_id(f"{cut.id}-{i}") if len(sups) > 1 else piece)
        for c in pieces:
            text = (c.supervisions[0].text or "").strip()
            if not text or not (min_duration <= c.duration <= max_duration):
                dropped += 1
                continue
            if encoder_frames(c.num_frames) - 2 < len(sp.encode(text)):
                dropped += 1
                continue
            kept.append(c)
    return CutSet.from_cuts(kept), dropped


class ResumableSampler(torch.utils.data.Sampler):
    """Wraps a lhotse sampler: epoch-seeded order, and the first ``skip`` batches of an epoch
    dropped without loading any audio or features (mid-epoch resume).

    lhotse's own sampler state runs ahead of training by the DataLoader's prefetch; counting
    consumed batches here is what makes resume exact.
    """

    def __init__(self, sampler) -> None:
        self.sampler = sampler
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch = epoch
        self.skip = skip
        self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator:
        for i, batch in enumerate(self.sampler):
            if i >= self.skip:
                yield batch

    def __len__(self) -> int:  # pragma: no cover - lhotse samplers are lengthless streams
        raise TypeError("the number of batches is not known in advance")


class SeededBatches(torch.utils.data.Dataset):
    """Wraps lhotse's K2SpeechRecognitionDataset; seeds python, numpy and torch RNGs from the
    batch's cut ids and the epoch before augmenting, in whichever worker process runs it.
    A batch that cannot be loaded comes back as ``{"load_error": str, "cut_ids": [...]}``."""

    def __init__(self, dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed
        self.epoch = 0

    def __getitem__(self, cuts) -> dict[str, Any]:
        key = f"{self.seed}:{self.epoch}:{cuts[0].id}:{len(cuts)}".encode()
        s = zlib.crc32(key)
        in_main = torch.utils.data.get_worker_info() is None
        if in_main:  # don't disturb the training process's own RNG streams (dropout etc.)
            saved = (random.getstate(), np.random.get_state(), torch.get_rng_state())
        random.seed(s)
        np.random.seed(s)
        torch.manual_seed(s)
        for t in self.dataset.cut_transforms or []:
            if hasattr(t, "rng"):
                t.rng = random.Random(s)
        try:
            return self.dataset[cuts]
        except Exception as e:  # noqa: BLE001 - any unreadable input makes a bad batch
            # A corrupt or missing feature/audio file must not kill the run (nor a DataLoader
            # worker): the trainer skips this batch and counts it like a non-finite loss.
            return {"load_error": f"{type(e).__name__}: {e}",
                    "cut_ids": [c.id for c in cuts]}
        finally:
            if in_main:
                random.setstate(saved[0])
                np.random.set_state(saved[1])
                torch.set_rng_state(saved[2])


def make_train_loader(cuts, cfg, *, world_size: int = 1, rank: int = 0,
                      noise_cuts=None) -> tuple[torch.utils.data.DataLoader, ResumableSampler,
                                                SeededBatches]:
    from lhotse.dataset import (
        CutMix,
        DynamicBucketingSampler,
        K2SpeechRecognitionDataset,
        SpecAugment,
    )

    cut_transforms = []
    if noise_cuts is not None:
        cut_transforms.append(CutMix(noise_cuts, p=cfg.noise_prob, snr=cfg.noise_snr,
                                     preserve_id=True, seed=cfg.seed))
    input_transforms = []
    if cfg.spec_augment:
        # icefall's settings (asr_datamodule.py)
        input_transforms.append(SpecAugment(time_warp_factor=cfg.time_warp_factor,
                                            num_frame_masks=10, features_mask_size=27,
                                            num_feature_masks=2, frames_mask_size=100))
    dataset = SeededBatches(
        K2SpeechRecognitionDataset(cut_transforms=cut_transforms,
                                   input_transforms=input_transforms, return_cuts=True),
        seed=cfg.seed,
    )
    sampler = ResumableSampler(DynamicBucketingSampler(
        cuts, max_duration=cfg.max_duration, shuffle=True, num_buckets=cfg.num_buckets,
        buffer_size=cfg.buffer_size, drop_last=True, seed=cfg.seed, world_size=world_size,
        rank=rank))
    # An own generator: creating worker processes must not draw from the global RNG, or a
    # resumed run's dropout stream would shift (augmentation is seeded per batch anyway).
    loader = torch.utils.data.DataLoader(dataset, sampler=sampler, batch_size=None,
                                         num_workers=cfg.num_workers,
                                         persistent_workers=False,
                                         generator=torch.Generator().manual_seed(cfg.seed))
    return loader, sampler, dataset


def make_valid_loader(cuts, max_duration: float, *, world_size: int = 1, rank: int = 0):
    from lhotse.dataset import K2SpeechRecognitionDataset, SimpleCutSampler

    sampler = SimpleCutSampler(cuts, max_duration=max_duration, shuffle=False,
                               world_size=world_size, rank=rank)
    # SeededBatches for its guard: an unreadable file gives a {"load_error"} batch, not a crash
    dataset = SeededBatches(K2SpeechRecognitionDataset(return_cuts=True), seed=0)
    return torch.utils.data.DataLoader(dataset, sampler=sampler, batch_size=None, num_workers=0)


def load_cuts(paths: list[Path]):
    """All cuts of ``paths`` in memory (filtering needs one pass anyway)."""
    import warnings

    from lhotse import CutSet

    # lhotse warns that an eager CutSet gains nothing from dynamic bucketing: known, accepted.
    warnings.filterwarnings("ignore", message="You are using DynamicBucketingSampler with an "
                            "eagerly read CutSet")
    return CutSet.from_cuts(c for p in paths for c in CutSet.from_file(p))
