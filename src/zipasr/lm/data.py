"""LM training text: sentences from lhotse manifests, token ids, length-sorted padded batches.

Only the manifests given are read: supervision manifests (the ``text`` of each segment, as the
BPE rule reads them) or cut manifests (the text of each cut's supervisions, each supervision
once; speed- or tempo-perturbed copies are skipped, their text is the original's).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from zipasr.errors import ZipasrError
from zipasr.lm.model import BLANK_ID, SOS_EOS_ID

log = logging.getLogger(__name__)

_PERTURBATIONS = {"Speed", "Tempo"}  # lhotse transforms that copy a cut with the same text


def _perturbed(cut: Any) -> bool:
    rec = getattr(cut, "recording", None)
    for t in (getattr(rec, "transforms", None) or []):
        name = t.get("name") if isinstance(t, dict) else type(t).__name__
        if name in _PERTURBATIONS:
            return True
    return False


def _segments(path: Path) -> Iterator[tuple[str, str | None]]:
    """(supervision id, text) of a supervision or cut manifest."""
    from lhotse import CutSet, SupervisionSet, load_manifest_lazy

    try:
        manifest = load_manifest_lazy(path)
    except Exception as e:  # lhotse raises bare ValueErrors/JSON errors for foreign files
        raise ZipasrError(f"cannot read manifest {path}: {type(e).__name__}: {e}") from e
    if manifest is None or not isinstance(manifest, (SupervisionSet, CutSet)):
        raise ZipasrError(f"{path} is not a supervision or cut manifest "
                          f"({type(manifest).__name__})")
    if isinstance(manifest, SupervisionSet):
        for sup in manifest:
            yield sup.id, sup.text
        return
    for cut in manifest:
        if _perturbed(cut):
            continue
        for sup in cut.supervisions:
            yield sup.id, sup.text


def read_sentences(paths: Sequence[Path], *, strict: bool = False) -> list[str]:
    """The sentences of the manifests ``paths`` in order, whitespace normalised.

    A segment without text is skipped with one warning (``strict``: an error); a supervision id
    seen before (the same segment in two cuts or manifests) is read once.
    """
    out: list[str] = []
    seen: set[str] = set()
    empty: list[str] = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise ZipasrError(f"manifest {path} does not exist")
        for sid, text in _segments(path):
            if sid in seen:
                continue
            seen.add(sid)
            text = " ".join((text or "").split())
            if text:
                out.append(text)
            else:
                empty.append(sid)
    if empty:
        msg = (f"{len(empty)} segment(s) without text in {', '.join(map(str, paths))}, "
               f"e.g. {empty[:3]}")
        if strict:
            raise ZipasrError(msg)
        log.warning("%s: skipped", msg)
    if not out:
        raise ZipasrError(f"no sentence with text in {', '.join(map(str, paths))}")
    return out


def tokenize(sentences: Sequence[str], sp: Any) -> list[list[int]]:
    """Token ids of each sentence (``sp.encode``); checks the icefall BPE layout first."""
    check_layout(sp)
    return [list(ids) for ids in sp.encode(list(sentences))]


def check_layout(sp: Any) -> None:
    """The LM's id conventions need ``<blk>`` at id 0 and ``<sos/eos>`` at id 1."""
    got = (sp.id_to_piece(BLANK_ID), sp.id_to_piece(SOS_EOS_ID))
    if got != ("<blk>", "<sos/eos>"):
        raise ZipasrError(f"the BPE model has {got[0]!r}, {got[1]!r} at ids 0, 1; the LM needs "
                          "'<blk>', '<sos/eos>' (zipasr bpe / icefall's lang_bpe layout)")


def make_batches(lengths: Sequence[int], *, max_tokens: int, max_sentences: int,
                 generator: torch.Generator | None = None) -> list[list[int]]:
    """Sentence indices grouped into batches of similar length.

    Sentences are sorted by length (after a shuffle with ``generator``, so equal-length
    sentences meet different neighbours each epoch) and cut greedily into batches of at most
    ``max_sentences`` sentences and ``max_tokens`` padded positions (rows x (longest + 1)); the
    batch order is then shuffled with ``generator``. Without a generator: sorted, unshuffled.
    """
    if max_tokens < 1 or max_sentences < 1:
        raise ZipasrError(f"max_tokens ({max_tokens}) and max_sentences ({max_sentences}) must "
                          "be positive")
    order = list(range(len(lengths)))
    if generator is not None:
        order = torch.randperm(len(lengths), generator=generator).tolist()
    order.sort(key=lambda i: lengths[i])  # stable: ties keep the shuffled order
    batches: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        width = lengths[i] + 1  # + <sos/eos>; sorted, so the newest is the longest
        if cur and (len(cur) + 1 > max_sentences or (len(cur) + 1) * width > max_tokens):
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    if generator is not None:
        perm = torch.randperm(len(batches), generator=generator).tolist()
        batches = [batches[i] for i in perm]
    return batches


def collate(sentences: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor,
                                                         torch.Tensor]:
    """Padded model inputs of token-id sentences.

    Returns:
      x (N, L) ``<sos/eos>`` + tokens, y (N, L) tokens + ``<sos/eos>``, both padded with
      ``<blk>`` (0), and lengths (N,) = tokens + 1; L = max(lengths).
    """
    lengths = torch.tensor([len(s) + 1 for s in sentences], dtype=torch.long)
    width = int(lengths.max()) if len(sentences) else 0
    x = torch.full((len(sentences), width), BLANK_ID, dtype=torch.long)
    y = torch.full((len(sentences), width), BLANK_ID, dtype=torch.long)
    for i, s in enumerate(sentences):
        t = torch.as_tensor(list(s), dtype=torch.long)
        x[i, 0] = SOS_EOS_ID
        x[i, 1:len(s) + 1] = t
        y[i, :len(s)] = t
        y[i, len(s)] = SOS_EOS_ID
    return x, y, lengths
