"""Training data: filtered cuts streamed from lazily read manifests, a resumable bucketing
sampler, and batches whose augmentation is a pure function of (seed, epoch, batch), so a
resumed run sees exactly the same batches. Features are read from storage, or computed from
the audio in the loader (``extractor``: on-the-fly features, as the data stage computes them).
docs/data.md describes how this scales to LibriSpeech 960 h."""

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


def cut_frames(cut, frame_shift: float = 0.01) -> int:
    """A cut's number of feature frames: its features' own, or (features computed on the fly)
    what lhotse's Fbank gives its duration at ``frame_shift`` (``compute_num_frames``)."""
    if cut.has_features:
        return cut.num_frames
    from lhotse.utils import compute_num_frames

    return compute_num_frames(cut.duration, frame_shift, cut.sampling_rate)


def _pieces(cut) -> list:
    """The cut itself when its one supervision spans it, else one cut per supervision, exactly
    its span (ids stay unique and traceable); none without supervisions."""
    sups = cut.supervisions
    if len(sups) == 1 and sups[0].start <= 0.01 and sups[0].end >= cut.duration - 0.01:
        return [cut]
    pieces = []
    for i, sup in enumerate(sups):
        start, end = max(sup.start, 0.0), min(sup.end, cut.duration)
        piece = cut.truncate(offset=start, duration=end - start, preserve_id=True,
                             keep_excessive_supervisions=False)
        pieces.append(piece.with_id(f"{cut.id}-{i}") if len(sups) > 1 else piece)
    return pieces


def token_bound(sp):
    """A function giving an upper bound of ``len(sp.encode(text))`` without encoding, or None
    where it has none. Encoding is the filter's main cost (~60 us for a LibriSpeech
    transcript), and a cut with fewer than ``len(text) + 1`` tokens' worth of encoder frames is
    rare: the bound decides most cuts, exactly as encoding would.

    ASCII text normalizes to itself under sentencepiece's NFKC rules (nothing expands; spaces
    become '▁', one more is prefixed), and each piece covers at least one of those characters:
    at most ``len(text) + 1`` pieces. A piece of one byte (byte fallback) is one ASCII
    character too; only '▁' would take three byte pieces, were it not in the vocabulary. A
    model with its own normalization rules (which may map a character to several) gets no
    bound."""
    try:
        from sentencepiece import sentencepiece_model_pb2

        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(sp.serialized_model_proto())
    except Exception:  # noqa: BLE001 - no protobuf, or not a sentencepiece model: encode all
        return None
    if proto.normalizer_spec.name not in ("nmt_nfkc", "nfkc", "nmt_nfkc_cf", "nfkc_cf",
                                          "identity"):
        return None
    unk = sp.unk_id()
    if sp.piece_to_id("\u2581") == unk and sp.piece_to_id("<0x41>") != unk:
        return None

    def bound(text: str) -> int | None:
        return len(text) + 1 if text.isascii() else None

    return bound


def _kept(cuts, sp, min_duration: float, max_duration: float, frame_shift: float,
          counts: dict[str, int]) -> Iterator:
    """The pieces of ``cuts`` :func:`filter_cuts` keeps, in order; ``counts["dropped"]`` counts
    the others as they go by."""
    bound = token_bound(sp) or (lambda text: None)
    for cut in cuts:
        pieces = _pieces(cut)
        if not pieces:
            counts["dropped"] += 1
        for c in pieces:
            text = (c.supervisions[0].text or "").strip()
            if not text or not (min_duration <= c.duration <= max_duration):
                counts["dropped"] += 1
                continue
            frames = encoder_frames(cut_frames(c, frame_shift)) - 2
            most = bound(text)
            if (most is None or frames < most) and frames < len(sp.encode(text)):
                counts["dropped"] += 1
                continue
            yield c


def filter_cuts(cuts, sp, min_duration: float, max_duration: float, *,
                frame_shift: float = 0.01):
    """Keep cuts icefall's ``remove_short_and_long_utt`` keeps: duration in range and enough
    encoder frames for the tokens (T' - 2 >= tokens: the transducer emits <= 1 token/frame).

    The model reads a cut's features from its start and its transcript as the whole target, so
    a cut whose supervision does not span it (silence or untranscribed speech around the
    segment, or several segments) is first cut down to each of its supervisions. Cuts with no
    supervision or an empty transcript are dropped. Returns ``(kept CutSet, dropped count)``,
    in memory; :class:`LazyCuts` is the same filter as a stream."""
    from lhotse import CutSet

    counts = {"dropped": 0}
    kept = list(_kept(cuts, sp, min_duration, max_duration, frame_shift, counts))
    return CutSet.from_cuts(kept), counts["dropped"]


class LazyCuts:
    """The cuts :func:`filter_cuts` keeps, as a re-iterable stream over manifests read lazily:
    each iteration reads the files again and holds one cut at a time, so a lhotse sampler
    over ``CutSet(LazyCuts(...))`` needs memory for its own buffer only, whatever the size of
    the corpus.

    ``shard=(rank, world_size)`` keeps every world_size-th kept cut from the rank-th on (DDP
    validation: each cut on one rank). A pass that reaches the end of the data records what it
    saw in ``last_pass``: ``{"cuts", "hours", "dropped"}`` (the epoch's size, known after its
    first full read; a sampler's partial reads, such as the duration-bin estimate, leave it
    alone)."""

    def __init__(self, paths: list[Path], sp, min_duration: float, max_duration: float, *,
                 frame_shift: float = 0.01, shard: tuple[int, int] | None = None) -> None:
        self.paths = [Path(p) for p in paths]
        self.source = read_cuts(self.paths)
        self.sp = sp
        self.min_duration, self.max_duration = min_duration, max_duration
        self.frame_shift = frame_shift
        self.shard = shard
        self.last_pass: dict[str, Any] | None = None

    def __iter__(self) -> Iterator:
        counts = {"dropped": 0}
        n = kept = 0
        seconds = 0.0
        rank, world_size = self.shard or (0, 1)
        for cut in _kept(self.source, self.sp, self.min_duration, self.max_duration,
                         self.frame_shift, counts):
            n += 1
            if (n - 1) % world_size != rank:
                continue
            kept += 1
            seconds += cut.duration
            yield cut
        self.last_pass = {"cuts": kept, "hours": seconds / 3600, "dropped": counts["dropped"]}

    def first(self):
        """The first kept cut (reads until one is found), or None."""
        return next(iter(self), None)


def read_cuts(paths: list[Path]):
    """The cuts of ``paths`` in order as one lazy CutSet: JSONL manifests (the DAG's
    ``.jsonl.gz``) are streamed from disk on every iteration; another format is read whole."""
    from lhotse import CutSet
    from lhotse.lazy import LazyIteratorChain
    from lhotse.serialization import extension_contains

    sets = [CutSet.from_jsonl_lazy(p) if extension_contains(".jsonl", p) else
            CutSet.from_file(p) for p in paths]
    if len(sets) == 1:
        return sets[0]
    return CutSet(LazyIteratorChain(*(s.data for s in sets)))


def first_cuts(paths: list[Path]) -> list:
    """The first cut of each manifest (None for an empty one): one line read from each."""
    out = []
    for p in paths:
        out.append(next(iter(read_cuts([p])), None))
    return out


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


def input_strategy(extractor=None):
    """How a batch's features are made: read from storage (lhotse's ``PrecomputedFeatures``), or
    with ``extractor`` computed from each cut's audio (``OnTheFlyFeatures``). One cut at a time
    (``use_batch_extract=False``), as the data stage computes stored features: lhotse's batched
    extraction zero-pads the shorter waveforms, which changes their last frames."""
    from lhotse.dataset import OnTheFlyFeatures, PrecomputedFeatures

    if extractor is None:
        return PrecomputedFeatures()
    return OnTheFlyFeatures(extractor, use_batch_extract=False)


def make_train_loader(cuts, cfg, *, world_size: int = 1, rank: int = 0, noise_cuts=None,
                      extractor=None) -> tuple[torch.utils.data.DataLoader, ResumableSampler,
                                               SeededBatches]:
    """The training DataLoader over ``cuts`` (a lazy CutSet, or one in memory). ``extractor``:
    compute the features from the audio in the loader instead of reading stored ones."""
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
        K2SpeechRecognitionDataset(input_strategy=input_strategy(extractor),
                                   cut_transforms=cut_transforms,
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


def make_valid_loader(cuts, max_duration: float, *, world_size: int = 1, rank: int = 0,
                      extractor=None):
    from lhotse.dataset import K2SpeechRecognitionDataset, SimpleCutSampler

    sampler = SimpleCutSampler(cuts, max_duration=max_duration, shuffle=False,
                               world_size=world_size, rank=rank)
    # SeededBatches for its guard: an unreadable file gives a {"load_error"} batch, not a crash
    dataset = SeededBatches(K2SpeechRecognitionDataset(
        input_strategy=input_strategy(extractor), return_cuts=True), seed=0)
    return torch.utils.data.DataLoader(dataset, sampler=sampler, batch_size=None, num_workers=0)


def load_cuts(paths: list[Path]):
    """All cuts of ``paths`` in memory (the trainer streams them instead: :class:`LazyCuts`)."""
    import warnings

    from lhotse import CutSet

    # lhotse warns that an eager CutSet gains nothing from dynamic bucketing: known, accepted.
    warnings.filterwarnings("ignore", message="You are using DynamicBucketingSampler with an "
                            "eagerly read CutSet")
    return CutSet.from_cuts(c for p in paths for c in CutSet.from_file(p))
