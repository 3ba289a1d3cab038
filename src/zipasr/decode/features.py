"""Features of cuts, their batches, and the test-set names of cut manifests.

Features: cuts with precomputed features are read from storage; cuts without are computed on
the fly with lhotse's 80-bin ``Fbank`` (the extractor the data stage uses). Batches are padded
with lhotse's ``LOG_EPSILON`` like ``K2SpeechRecognitionDataset``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from zipasr.errors import ZipasrError

SAMPLING_RATE = 16000

MIN_FRAMES = 9  # Conv-Embed needs T >= 7 and gives ((T - 7) // 2 + 1) // 2 output frames


def set_name_from_path(cuts_path: str | Path) -> str:
    """``synth_cuts_test.jsonl.gz`` -> ``test``; ``librispeech_cuts_test-clean.jsonl.gz`` ->
    ``test-clean``; other names: the file name without its manifest extensions."""
    name = Path(cuts_path).name
    name = re.sub(r"(\.jsonl|\.json|\.yaml|\.yml)?(\.gz)?$", "", name)
    if "_cuts_" in name:
        name = name.rsplit("_cuts_", 1)[1]
    elif name.startswith("cuts_"):
        name = name[len("cuts_"):]
    return name or "cuts"


def cut_text(cut: Any) -> str:
    return " ".join(s.text or "" for s in cut.supervisions).strip()


class FeatureLoader:
    """Features of a cut, precomputed (read from storage) or computed from its audio."""

    def __init__(self) -> None:
        self._extractor = None

    def __call__(self, cut: Any) -> Tensor:
        try:
            return self._load(cut)
        except ZipasrError:
            raise
        except Exception as e:  # noqa: BLE001 - storage or codec errors, named with the cut
            # no skipping: a WER over fewer utterances than asked for would be misleading
            what = "features" if cut.has_features else "audio"
            raise ZipasrError(f"cut {cut.id}: cannot read its {what} "
                              f"({type(e).__name__}: {e})") from e

    def _load(self, cut: Any) -> Tensor:
        if cut.has_features:
            return torch.from_numpy(cut.load_features())
        if not cut.has_recording:
            raise ZipasrError(f"cut {cut.id} has neither features nor audio")
        if self._extractor is None:
            from zipasr.data.fbank import fbank_extractor

            self._extractor = fbank_extractor()
        if cut.sampling_rate != SAMPLING_RATE:
            cut = cut.resample(SAMPLING_RATE)
        return torch.from_numpy(cut.compute_features(self._extractor))


def collate_features(feats: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Pad (T_i, 80) features into (N, T_max, 80) with LOG_EPSILON; lengths (N,)."""
    from lhotse.utils import LOG_EPSILON

    lens = torch.tensor([f.shape[0] for f in feats], dtype=torch.int64)
    x = torch.full((len(feats), int(lens.max()), feats[0].shape[1]), LOG_EPSILON,
                   dtype=torch.float32)
    for i, f in enumerate(feats):
        x[i, : f.shape[0]] = f
    return x, lens


def batches(cuts: Any, max_duration: float, loader: FeatureLoader
            ) -> Iterator[tuple[list[Any], Tensor, Tensor]]:
    """(cuts, x (N, T, 80), x_lens (N,)) batches of at most ``max_duration`` seconds.

    Cuts are taken longest first, so a batch holds similar lengths: little padding to
    compute, and little padding to leak into the results (the Zipformer's valid frames are
    not fully independent of the padding, in icefall too: Conv-Embed's receptive field and
    the downsampled stacks' partially padded frames reach into it).
    """
    from lhotse.dataset import SimpleCutSampler

    cuts = cuts.sort_by_duration(ascending=False)
    sampler = SimpleCutSampler(cuts, max_duration=max_duration, shuffle=False)
    for batch in sampler:
        batch = list(batch)
        x, x_lens = collate_features([loader(c) for c in batch])
        yield batch, x, x_lens
