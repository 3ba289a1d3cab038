"""LM text: sentences from supervision and cut manifests, length-bucketed batches, padding."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from zipasr.errors import ZipasrError
from zipasr.lm.data import collate, make_batches, read_sentences


def _sups(path: Path, texts: list[str | None]) -> Path:
    from lhotse import SupervisionSegment, SupervisionSet

    SupervisionSet.from_segments([
        SupervisionSegment(id=f"{path.stem}-{i}", recording_id=f"r{i}", start=0.0, duration=1.0,
                           text=t) for i, t in enumerate(texts)]).to_file(path)
    return path


def test_sentences_from_supervisions(tmp_path: Path, caplog) -> None:
    path = _sups(tmp_path / "sups.jsonl.gz", ["HELLO  WORLD ", "", None, "GOOD\tBYE"])
    with caplog.at_level(logging.WARNING):
        assert read_sentences([path]) == ["HELLO WORLD", "GOOD BYE"]
    assert "2 segment(s) without text" in caplog.text
    with pytest.raises(ZipasrError, match="without text"):
        read_sentences([path], strict=True)
    with pytest.raises(ZipasrError, match="does not exist"):
        read_sentences([tmp_path / "missing.jsonl.gz"])


def test_sentences_from_cuts_skip_perturbed_copies(tmp_path: Path) -> None:
    from lhotse import AudioSource, CutSet, MonoCut, Recording, SupervisionSegment

    cuts = []
    for i, text in enumerate(["ONE TWO", "THREE"]):
        rec = Recording(id=f"r{i}", sources=[AudioSource(type="file", channels=[0],
                                                         source=f"r{i}.wav")],
                        sampling_rate=16000, num_samples=16000, duration=1.0)
        sup = SupervisionSegment(id=f"s{i}", recording_id=rec.id, start=0.0, duration=1.0,
                                 text=text)
        cuts.append(MonoCut(id=f"c{i}", start=0.0, duration=1.0, channel=0,
                            supervisions=[sup], recording=rec))
    perturbed = cuts[0].perturb_speed(1.1)  # the same text again, as the fbank stage makes
    path = tmp_path / "cuts.jsonl.gz"
    CutSet.from_cuts([cuts[0], perturbed, cuts[1]]).to_file(path)
    assert read_sentences([path]) == ["ONE TWO", "THREE"]
    # a supervision in two manifests is read once
    assert read_sentences([path, path]) == ["ONE TWO", "THREE"]


def test_batches_cover_every_sentence_within_limits() -> None:
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 20, (200,), generator=g).tolist()
    for gen_seed in (None, 3):
        gen = None if gen_seed is None else torch.Generator().manual_seed(gen_seed)
        batches = make_batches(lengths, max_tokens=60, max_sentences=8, generator=gen)
        assert sorted(i for b in batches for i in b) == list(range(200))
        for b in batches:
            longest = max(lengths[i] for i in b) + 1
            assert len(b) <= 8 and (len(b) * longest <= 60 or len(b) == 1)
        if gen is None:
            flat = [lengths[i] for b in batches for i in b]
            assert flat == sorted(flat)
    again = make_batches(lengths, max_tokens=60, max_sentences=8,
                         generator=torch.Generator().manual_seed(3))
    other = make_batches(lengths, max_tokens=60, max_sentences=8,
                         generator=torch.Generator().manual_seed(4))
    assert again == batches and other != batches


def test_collate_pads_with_blank() -> None:
    x, y, lengths = collate([[5, 6, 7], [9]])
    assert x.tolist() == [[1, 5, 6, 7], [1, 9, 0, 0]]
    assert y.tolist() == [[5, 6, 7, 1], [9, 1, 0, 0]]
    assert lengths.tolist() == [4, 2]
