"""Batched transducer search: greedy and modified beam search (icefall's ``beam_search.py``
semantics, max one symbol per frame).

Both take the encoder output of ``model.forward_encoder`` and use the model's stateless
``decoder`` and its ``joiner``:

* every hypothesis starts with the context ``[-1] * (context_size - 1) + [blank]`` (a negative
  id embeds to zeros), and the decoder sees the last ``context_size`` entries;
* the encoder output is projected once by ``joiner.encoder_proj``, decoder outputs by
  ``joiner.decoder_proj``, and ``joiner(enc, dec, project_input=False)`` gives logits.

Utterances are processed sorted by length (longest first), so at frame t the utterances still
running are a prefix of the batch and the rest are finished (icefall packs the sequence for
the same effect).

Each search keeps its state per utterance (:class:`GreedyStream`, :class:`BeamStream`) and
advances it over a block of encoder frames: the offline searches advance once over the whole
utterance, streaming decoding (:mod:`zipasr.decode.streaming`) once per chunk, so both are
the same search.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch import Tensor

from zipasr.decode.fusion import Fusion, HypState
from zipasr.decode.names import BEAM_METHODS, CTC_METHODS, LM_METHODS, METHODS
from zipasr.errors import ZipasrError


@dataclass
class SearchResult:
    """One utterance's result: token ids (no blanks, no context) and the log-probability the
    search assigned to them (greedy: the one path; beam: the merged hypothesis score).

    ``frames[k]`` is the encoder frame (index into encoder_out's time axis) at which
    ``tokens[k]`` was emitted: greedy search's one path; for beam search, where pairs reaching
    the same token sequence merge, the frames of the highest-scoring pair of each merge.
    Left out of ``==`` (results compare by tokens and score)."""

    tokens: list[int]
    log_prob: float
    frames: list[int] = field(default_factory=list, compare=False)


def _decoder_out(model: nn.Module, contexts: list[list[int]], device: torch.device) -> Tensor:
    """Projected decoder output for each context: (len(contexts), joiner_dim)."""
    y = torch.tensor(contexts, dtype=torch.int64, device=device)  # (N, context_size)
    dec = model.decoder(y, need_pad=False)  # (N, 1, decoder_dim)
    return model.joiner.decoder_proj(dec.squeeze(1))


def _decoder_outputs(model: nn.Module, cache: dict[tuple[int, ...], Tensor],
                     hyps: Sequence[Sequence[int]], device: torch.device) -> Tensor:
    """Projected decoder output for each hypothesis' last context_size tokens:
    (len(hyps), joiner_dim). The stateless decoder depends on those tokens only, so outputs are
    cached per context, and contexts not yet in ``cache`` go through one batched decoder call."""
    context_size: int = model.decoder.context_size
    ctxs = [tuple(h[-context_size:]) for h in hyps]
    new = list(dict.fromkeys(c for c in ctxs if c not in cache))
    if new:
        out = _decoder_out(model, [list(c) for c in new], device)
        cache.update(zip(new, out, strict=True))
    return torch.stack([cache[c] for c in ctxs])


def _sort_by_length(encoder_out_lens: Tensor) -> tuple[list[int], list[int]]:
    """(order longest first, lengths in that order); stable so ties keep input order."""
    lens = encoder_out_lens.tolist()
    order = sorted(range(len(lens)), key=lambda i: -lens[i])
    return order, [lens[i] for i in order]


@dataclass
class GreedyStream:
    """Greedy search of one utterance so far, carried from chunk to chunk in streaming.

    ``hyp`` holds the context prefix and the emitted tokens, ``frames`` their emitting
    encoder frames (counted from the utterance's start), ``num_frames`` the frames seen."""

    hyp: list[int]
    frames: list[int] = field(default_factory=list)
    score: float = 0.0
    num_frames: int = 0

    @classmethod
    def start(cls, model: nn.Module) -> GreedyStream:
        return cls([-1] * (model.decoder.context_size - 1) + [model.decoder.blank_id])

    def result(self, context_size: int) -> SearchResult:
        return SearchResult(self.hyp[context_size:], self.score, list(self.frames))


def greedy_advance(model: nn.Module, streams: Sequence[GreedyStream], encoder_out: Tensor,
                   encoder_out_lens: Tensor) -> None:
    """Run each stream over its next ``encoder_out_lens[i]`` frames (at most one symbol per
    frame), in place. encoder_out: (N, T, C) from the encoder; one stream per row."""
    assert encoder_out.ndim == 3 and encoder_out.shape[0] == encoder_out_lens.shape[0]
    assert len(streams) == encoder_out.shape[0]
    blank_id: int = model.decoder.blank_id
    device = encoder_out.device
    order, lens = _sort_by_length(encoder_out_lens)
    running = [streams[i] for i in order]
    enc = model.joiner.encoder_proj(encoder_out[order])  # (N, T, J)
    dec_cache: dict[tuple[int, ...], Tensor] = {}  # context -> projected decoder output (J,)
    dec = _decoder_outputs(model, dec_cache, [s.hyp for s in running], device)  # (N, J)
    for t in range(max(lens, default=0)):
        n = sum(1 for length in lens if length > t)  # running utterances: a prefix
        logits = model.joiner(enc[:n, t], dec[:n], project_input=False)  # (n, V)
        best = logits.argmax(dim=-1)
        logp = logits.log_softmax(dim=-1).gather(1, best.unsqueeze(1)).squeeze(1)
        emitted = []
        for i, (tok, lp) in enumerate(zip(best.tolist(), logp.tolist(), strict=True)):
            s = running[i]
            s.score += lp
            if tok != blank_id:
                s.hyp.append(tok)
                s.frames.append(s.num_frames + t)
                emitted.append(i)
        if emitted:
            # Only hypotheses that changed need a new decoder output, and only contexts not
            # seen before in this batch need the decoder.
            dec = dec.clone()
            dec[emitted] = _decoder_outputs(model, dec_cache, [running[i].hyp for i in emitted],
                                            device)
    for s, length in zip(running, lens, strict=True):
        s.num_frames += length


def greedy_search_batch(model: nn.Module, encoder_out: Tensor, encoder_out_lens: Tensor
                        ) -> list[SearchResult]:
    """Greedy search, at most one symbol per frame, for a padded batch.

    encoder_out: (N, T, C) as returned by ``forward_encoder``; encoder_out_lens: (N,).
    Returns N results in input order.
    """
    streams = [GreedyStream.start(model) for _ in range(encoder_out.shape[0])]
    greedy_advance(model, streams, encoder_out, encoder_out_lens)
    return [s.result(model.decoder.context_size) for s in streams]


@dataclass
class BeamStream:
    """Modified beam search of one utterance so far, carried from chunk to chunk.

    ``beams``: token sequence (with the context prefix) -> log-prob (float64); ``frames``:
    token sequence -> emitting frame of each of its tokens (timestamps only, they never
    influence the search); ``num_frames``: encoder frames seen; ``states``: token sequence ->
    its LM / bigram / hotword state, with a :class:`~zipasr.decode.fusion.Fusion` only."""

    beams: dict[tuple[int, ...], float]
    frames: dict[tuple[int, ...], tuple[int, ...]]
    num_frames: int = 0
    states: dict[tuple[int, ...], HypState] = field(default_factory=dict)

    @classmethod
    def start(cls, model: nn.Module, fusion: Fusion | None = None) -> BeamStream:
        ys = tuple([-1] * (model.decoder.context_size - 1) + [model.decoder.blank_id])
        states = {} if fusion is None else {ys: fusion.start(_device(model))}
        return cls({ys: 0.0}, {ys: ()}, states=states)

    def result(self, context_size: int, fusion: Fusion | None = None) -> SearchResult:
        """The best hypothesis by ``log_prob / len(ys)`` (ys with its context prefix), after
        the fusion's final bonus (an unfinished hotword match gives its bonus back)."""
        scores = self.beams
        if fusion is not None:
            scores = {ys: s + fusion.final_bonus(self.states[ys]) for ys, s in scores.items()}
        ys, score = max(scores.items(), key=lambda kv: kv[1] / len(kv[0]))
        return SearchResult(list(ys[context_size:]), score, list(self.frames[ys]))


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def beam_advance(model: nn.Module, streams: Sequence[BeamStream], encoder_out: Tensor,
                 encoder_out_lens: Tensor, beam: int = 4, fusion: Fusion | None = None
                 ) -> None:
    """Run each stream's modified beam search over its next ``encoder_out_lens[i]`` frames,
    in place. encoder_out: (N, T, C); one stream per row. ``fusion``: LM shallow fusion,
    LODR and hotword bonuses (:mod:`zipasr.decode.fusion`), added to the pairs the beam
    keeps, as icefall does; the streams must have been started with the same fusion."""
    assert encoder_out.ndim == 3 and encoder_out.shape[0] == encoder_out_lens.shape[0]
    assert len(streams) == encoder_out.shape[0] and beam >= 1
    blank_id: int = model.decoder.blank_id
    device = encoder_out.device
    order, lens = _sort_by_length(encoder_out_lens)
    running = [streams[i] for i in order]
    enc = model.joiner.encoder_proj(encoder_out[order])  # (N, T, J)
    dec_cache: dict[tuple[int, ...], Tensor] = {}  # context -> projected decoder output (J,)
    for t in range(max(lens, default=0)):
        n = sum(1 for length in lens if length > t)
        hyp_lists = [list(running[i].beams.items()) for i in range(n)]
        counts = [len(h) for h in hyp_lists]
        flat = [ys for h in hyp_lists for ys, _ in h]
        row = torch.repeat_interleave(torch.arange(n, device=device),
                                      torch.tensor(counts, device=device))
        # Most hypotheses keep their context from one frame to the next (blank): the cache
        # computes new contexts only.
        dec = _decoder_outputs(model, dec_cache, flat, device)  # (H, J)
        logits = model.joiner(enc[row, t], dec, project_input=False)  # (H, V)
        V = logits.shape[-1]
        hyp_scores = torch.tensor([s for h in hyp_lists for _, s in h], dtype=torch.float64,
                                  device=device)
        log_probs = logits.log_softmax(dim=-1).to(torch.float64) + hyp_scores.unsqueeze(1)
        # Lay each utterance's hypotheses out in a (n, max_hyps * V) table (-inf padding) so
        # one topk serves the whole batch.
        max_h = max(counts)
        slot = torch.tensor([k for c in counts for k in range(c)], device=device)
        table = torch.full((n, max_h, V), -math.inf, dtype=torch.float64, device=device)
        table[row, slot] = log_probs
        k = min(beam, max_h * V)
        top_scores, top_idx = table.view(n, -1).topk(k, dim=1)
        top_scores, top_idx = top_scores.tolist(), top_idx.tolist()
        # the kept pairs: (utterance, score, hypothesis, token), best first per utterance
        kept = [(i, score, hyp_lists[i][idx // V][0], idx % V)
                for i in range(n) for score, idx in zip(top_scores[i], top_idx[i], strict=True)
                if score != -math.inf]  # -inf: fewer than k real pairs
        bonus: dict[int, float] = {}
        children: dict[int, HypState] = {}
        if fusion is not None:  # one batched LM step for every appended token of the frame
            appended = [j for j, (_, _, _, tok) in enumerate(kept) if tok != blank_id]
            gains, states = fusion.extend([running[kept[j][0]].states[kept[j][2]]
                                           for j in appended],
                                          [kept[j][3] for j in appended])
            bonus, children = dict(zip(appended, gains, strict=True)), dict(
                zip(appended, states, strict=True))
        merged: list[dict[tuple[int, ...], float]] = [{} for _ in range(n)]
        merged_frames: list[dict[tuple[int, ...], tuple[int, ...]]] = [{} for _ in range(n)]
        merged_states: list[dict[tuple[int, ...], HypState]] = [{} for _ in range(n)]
        for j, (i, score, prev, tok) in enumerate(kept):
            s = running[i]
            ys = prev if tok == blank_id else prev + (tok,)
            score += bonus.get(j, 0.0)
            old = merged[i].get(ys)
            merged[i][ys] = score if old is None else _log_add(old, score)
            if old is None:
                # topk is sorted, best first: the first pair reaching ys is its best
                # alignment, whose frames the merged hypothesis keeps
                f = s.frames[prev]
                merged_frames[i][ys] = f + (s.num_frames + t,) if tok != blank_id else f
            if fusion is not None and ys not in merged_states[i]:
                # the state of a token sequence does not depend on the pair that reached it
                merged_states[i][ys] = s.states[ys] if tok == blank_id else children[j]
        for i in range(n):
            s = running[i]
            s.beams, s.frames = merged[i], merged_frames[i]
            if fusion is not None:
                s.states = merged_states[i]
    for s, length in zip(running, lens, strict=True):
        s.num_frames += length


def modified_beam_search(model: nn.Module, encoder_out: Tensor, encoder_out_lens: Tensor,
                         beam: int = 4, fusion: Fusion | None = None) -> list[SearchResult]:
    """Modified beam search (at most one symbol per frame) for a padded batch.

    Per frame and utterance, every (hypothesis, token) pair is scored as hypothesis log-prob +
    log_softmax(joiner logits) and the best ``beam`` pairs over all of the utterance's
    hypotheses are kept; blank keeps the token sequence, a non-blank token appends to it (and
    with ``fusion`` adds its LM / LODR / hotword terms). Pairs that yield the same token
    sequence are merged by log-add-exp (so a hypothesis' score sums over the kept
    alignments). The final choice maximises ``log_prob / len(ys)``, where ys includes the
    ``context_size`` initial entries.

    encoder_out: (N, T, C); encoder_out_lens: (N,). Returns N results in input order.
    """
    streams = [BeamStream.start(model, fusion) for _ in range(encoder_out.shape[0])]
    beam_advance(model, streams, encoder_out, encoder_out_lens, beam=beam, fusion=fusion)
    return [s.result(model.decoder.context_size, fusion) for s in streams]


def _log_add(a: float, b: float) -> float:
    m = max(a, b)
    return m + math.log1p(math.exp(-abs(a - b)))


def search(model: nn.Module, encoder_out: Tensor, encoder_out_lens: Tensor, method: str,
           beam: int = 4, fusion: Fusion | None = None) -> list[SearchResult]:
    """Dispatch on the method name (one of :data:`METHODS`). The CTC methods decode the
    model's CTC head; the LM methods need ``fusion`` with the LM (and for LODR the bigram),
    which :func:`check_method` checks."""
    check_method(method, fusion, model)
    if method == "greedy_search":
        return greedy_search_batch(model, encoder_out, encoder_out_lens)
    if method in BEAM_METHODS:
        return modified_beam_search(model, encoder_out, encoder_out_lens, beam=beam,
                                    fusion=fusion)
    from zipasr.decode import ctc

    log_probs = model.ctc_output(encoder_out)  # (N, T, V)
    # the CTC blank is token 0, as the transducer's (<blk> of the BPE)
    if method == "ctc_greedy_search":
        return ctc.ctc_greedy_search(log_probs, encoder_out_lens, blank_id=0)
    return ctc.ctc_prefix_beam_search(log_probs, encoder_out_lens, beam=beam, blank_id=0)


def check_method(method: str, fusion: Fusion | None, model: nn.Module | None = None) -> None:
    """ZipasrError unless ``method`` is known and ``fusion`` has what it needs: the LM
    methods an LM (LODR also the bigram); the LM is not used by any other method. With
    ``model``: it has the head the method decodes (transducer or CTC)."""
    if method not in METHODS:
        raise ZipasrError(f"unknown decoding method {method!r} (one of {', '.join(METHODS)})")
    if model is not None and method in CTC_METHODS and not getattr(model, "use_ctc", False):
        raise ZipasrError(f"{method} decodes the CTC head: this model has none "
                          "(trained with model.use_ctc false)")
    if model is not None and method not in CTC_METHODS and not getattr(
            model, "use_transducer", True):
        raise ZipasrError(f"{method} needs the transducer's decoder and joiner: this model is "
                          f"CTC-only (decode it with {' or '.join(CTC_METHODS)})")
    lm = fusion is not None and fusion.lm is not None
    bigram = fusion is not None and fusion.bigram is not None
    if method in LM_METHODS and not lm:
        raise ZipasrError(f"{method} needs a neural LM (--lm)")
    if method == "modified_beam_search_LODR" and not bigram:
        raise ZipasrError(f"{method} needs the bigram token LM (--bigram)")
    if method == "modified_beam_search_lm_shallow_fusion" and bigram:
        raise ZipasrError(f"{method} does not use a bigram: use modified_beam_search_LODR")
    if method not in LM_METHODS and lm:
        raise ZipasrError(f"{method} does not use an LM: the LM methods are "
                          f"{', '.join(LM_METHODS)}")
    if method not in BEAM_METHODS and fusion is not None and fusion.context is not None:
        raise ZipasrError(f"hotwords bias modified beam search ({', '.join(BEAM_METHODS)}), "
                          f"not {method}")
