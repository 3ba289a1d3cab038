"""CTC decoding of the model's CTC head: greedy search and prefix beam search.

Both take ``log_probs = model.ctc_output(encoder_out)``, (N, T, V) log-probabilities with
``blank_id`` the blank, and the valid lengths (N,); frames at and after ``lens[i]`` are padding
and never read. A label sequence's probability is the sum over all frame paths (one token or
blank per frame) that collapse to it: merge repeats, then drop blanks.

* :func:`ctc_greedy_search` takes the best token of each frame and collapses that one path.
* :func:`ctc_prefix_beam_search` (Graves 2006 / Hannun et al. 2014) keeps, per utterance, the
  ``beam`` most probable label prefixes, each with the log-prob of its paths that end in blank
  and of those that end in its last token, so that at the end a prefix's score is its total
  probability over every path kept, not the best path's. It is vectorised over the batch and
  the beam: one frame of the whole batch is a fixed number of tensor operations.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from zipasr.decode.search import SearchResult
from zipasr.errors import ZipasrError

_NEG_INF = -math.inf


def _check_inputs(log_probs: Tensor, lens: Tensor, blank_id: int) -> None:
    if log_probs.ndim != 3:
        raise ValueError(f"log_probs must be (N, T, V), got shape {tuple(log_probs.shape)}")
    N, T, V = log_probs.shape
    if lens.shape != (N,) or lens.dtype.is_floating_point or lens.dtype == torch.bool:
        raise ValueError(f"lens must be ({N},) integers for log_probs {tuple(log_probs.shape)}, "
                         f"got shape {tuple(lens.shape)} {lens.dtype}")
    if N and (int(lens.min()) < 0 or int(lens.max()) > T):
        raise ValueError(f"lens must lie in [0, {T}], got {lens.tolist()}")
    if V < 2:
        raise ValueError(f"log_probs needs a vocabulary of blank and at least one token, got V={V}")
    if not 0 <= blank_id < V:
        raise ZipasrError(f"CTC blank id {blank_id} is not in the vocabulary (size {V})")


def ctc_greedy_search(log_probs: Tensor, lens: Tensor, blank_id: int = 0
                      ) -> list[SearchResult]:
    """Best token per frame, repeats collapsed, blanks dropped.

    log_probs: (N, T, V); lens: (N,). Returns N results: ``log_prob`` is the chosen path's
    log-prob (sum of every valid frame's best log-prob) and ``frames[k]`` the first frame of
    the run of frames that emitted ``tokens[k]``.
    """
    _check_inputs(log_probs, lens, blank_id)
    N, T, _ = log_probs.shape
    best, idx = log_probs.max(dim=-1)  # (N, T)
    valid = torch.arange(T, device=idx.device) < lens.to(idx.device).unsqueeze(1)  # (N, T)
    prev = torch.cat([idx.new_full((N, 1), blank_id), idx[:, :-1]], dim=1)
    # A token is emitted on the first frame of each run of equal non-blank ids.
    starts = valid & (idx != blank_id) & (idx != prev)
    scores = best.double().masked_fill(~valid, 0.0).sum(dim=1).tolist()
    results = []
    for i in range(N):
        frames = starts[i].nonzero().squeeze(1)
        results.append(SearchResult(idx[i, frames].tolist(), scores[i], frames.tolist()))
    return results


def ctc_prefix_beam_search(log_probs: Tensor, lens: Tensor, beam: int = 4, blank_id: int = 0,
                           token_beam: int | None = None) -> list[SearchResult]:
    """The most probable label sequence found by CTC prefix beam search, per utterance.

    See :func:`ctc_prefix_beam_search_nbest` for the arguments; this returns its first entry
    for each utterance (N results in input order).
    """
    return [nbest[0] for nbest in ctc_prefix_beam_search_nbest(
        log_probs, lens, beam=beam, blank_id=blank_id, token_beam=token_beam)]


def ctc_prefix_beam_search_nbest(log_probs: Tensor, lens: Tensor, beam: int = 4,
                                 blank_id: int = 0, token_beam: int | None = None
                                 ) -> list[list[SearchResult]]:
    """CTC prefix beam search; the final beam of each utterance, best first.

    Per frame, every kept prefix is continued by blank, by a repeat of its last token (both
    leave the prefix unchanged) and by each of the frame's ``token_beam`` most probable
    non-blank tokens (default ``beam``; a repeated token extends the prefix only from its
    paths that end in blank). Continuations that give the same prefix are merged by log-add,
    and the ``beam`` prefixes of highest total probability are kept. Only extensions are
    pruned by ``token_beam``: blank and repeats are always scored, so a kept prefix's
    probability is exact over the paths through kept prefixes. (icefall prunes all tokens,
    blank included, to the frame's top ``beam``.) Scores are accumulated in float64.

    log_probs: (N, T, V) log-probabilities (``model.ctc_output``); lens: (N,) valid frames.
    Returns per utterance at most ``beam`` results sorted by ``log_prob``, the prefix's total
    log-prob (log-add of its blank- and non-blank-ending parts); an utterance with no frames
    gives the empty prefix with log-prob 0. ``frames[k]``: the frame at which ``tokens[k]``
    was appended, taken, where continuations merge, from the most probable one.
    """
    _check_inputs(log_probs, lens, blank_id)
    if beam < 1:
        raise ZipasrError(f"CTC prefix beam search needs beam >= 1, got {beam}")
    if token_beam is None:
        token_beam = beam
    if token_beam < 1:
        raise ZipasrError(f"CTC prefix beam search needs token_beam >= 1, got {token_beam}")
    N, T, V = log_probs.shape
    if N == 0:
        return []
    lens_list = lens.tolist()
    order = sorted(range(N), key=lambda i: -lens_list[i])  # running utterances: a prefix
    sorted_lens = [lens_list[i] for i in order]
    rows = torch.tensor(order, device=log_probs.device)
    # Only the top-k table is reordered: copying all of log_probs would cost as much as the
    # top-k itself, and a frame needs just blank and each prefix's last token besides.
    top_vals, top_idx = _top_non_blank(log_probs, min(token_beam, V - 1), blank_id)
    top_vals, top_idx = top_vals[rows].double(), top_idx[rows]  # (N, T, K)

    state = _BeamState.start(N, beam, max(1, sorted_lens[0]), log_probs.device)
    for t in range(sorted_lens[0]):
        n = sum(1 for length in sorted_lens if length > t)
        frame = log_probs[:, t]  # (N, V), a view
        blank_lp = frame[rows[:n], blank_id].double()  # (n,)
        state.step(n, t, frame, rows[:n], blank_lp, top_vals[:n, t], top_idx[:n, t])
    nbest: list[list[SearchResult]] = [[] for _ in range(N)]
    for i, res in zip(order, state.results(), strict=True):
        nbest[i] = res
    return nbest


def _top_non_blank(lp: Tensor, k: int, blank_id: int) -> tuple[Tensor, Tensor]:
    """The k most probable non-blank tokens of each frame: values and ids, (N, T, k).

    Takes the top k + 1 of all tokens and drops blank (if among them) instead of masking a
    copy of the whole (N, T, V) tensor."""
    vals, idx = lp.topk(min(k + 1, lp.shape[-1]), dim=-1)
    vals = vals.masked_fill(idx == blank_id, _NEG_INF)
    vals, pos = vals.topk(k, dim=-1)
    return vals, idx.gather(-1, pos)


class _BeamState:
    """The beams of a batch as tensors of B = beam slots per utterance.

    ``pb``/``pnb`` (N, B) float64: log-prob of the prefix's paths ending in blank / in its
    last token; a slot with both -inf is empty. ``tokens`` (N, B, L): the prefix's token ids
    (only the first ``length`` (N, B) mean anything); ``last`` (N, B): its last token, -1 for
    the empty prefix. ``is_prefix`` (N, B, B): ``is_prefix[n, x, y]`` iff slot y's tokens
    are a prefix of (or equal to) slot x's.

    Merging needs "is prefix p + c already in the beam?". Comparing token rows would cost
    O(B^2 L) per frame; ``is_prefix`` is instead carried from frame to frame exactly, in
    O(B^2), from where each new slot came from (see :meth:`_select`).

    Token frames are only needed at the end, so each frame records back-pointers instead of
    copying frame rows: ``history[t] = (from_slot, appended)``, (n, B) each, says that slot
    x's frames after frame t are those of slot ``from_slot[x]`` before it, plus t if
    ``appended[x]``.
    """

    def __init__(self, pb: Tensor, pnb: Tensor, tokens: Tensor, length: Tensor, last: Tensor,
                 is_prefix: Tensor) -> None:
        self.pb, self.pnb, self.tokens, self.length, self.last = pb, pnb, tokens, length, last
        self.is_prefix = is_prefix
        self.history: list[tuple[Tensor, Tensor]] = []

    @classmethod
    def start(cls, N: int, B: int, L: int, device: torch.device) -> _BeamState:
        """Slot 0 holds the empty prefix (all paths so far end in blank), the rest are empty."""
        pb = torch.full((N, B), _NEG_INF, dtype=torch.float64, device=device)
        pb[:, 0] = 0.0
        long = dict(dtype=torch.int64, device=device)
        return cls(pb, torch.full_like(pb, _NEG_INF), torch.zeros(N, B, L, **long),
                   torch.zeros(N, B, **long), torch.full((N, B), -1, **long),
                   torch.ones(N, B, B, dtype=torch.bool, device=device))

    def step(self, n: int, t: int, frame: Tensor, rows: Tensor, blank_lp: Tensor,
             ext_lp: Tensor, ext_tok: Tensor) -> None:
        """Advance utterances [:n] by frame t.

        frame: (N, V) frame t's log-probs in input order, rows: (n,) the input row of each
        running utterance, blank_lp: (n,) float64 blank's log-prob; ext_lp (float64),
        ext_tok: (n, K) the log-probs and ids of the non-blank tokens considered for
        extension."""
        pb, pnb, last, length = self.pb[:n], self.pnb[:n], self.last[:n], self.length[:n]
        total = torch.logaddexp(pb, pnb)  # (n, B)
        valid = total > _NEG_INF

        # Continuations that keep the prefix: blank, or the last token again.
        stay_pb = total + blank_lp.unsqueeze(1)
        repeat_lp = frame[rows.unsqueeze(1), last.clamp(min=0)].double()  # (n, B)
        stay_pnb = pnb + repeat_lp.masked_fill(last < 0, _NEG_INF)

        # Extensions by token c: after the same token only from paths ending in blank
        # (otherwise the two frames would collapse into one token).
        same = ext_tok.unsqueeze(1) == last.unsqueeze(2)  # (n, B, K)
        ext = torch.where(same, pb.unsqueeze(2), total.unsqueeze(2)) + ext_lp.unsqueeze(1)

        # Extension (h, c) is slot h2 already in the beam iff h is h2's parent and c is h2's
        # last token: merge it into h2's non-blank part. A slot has at most one parent in the
        # beam and its last token is at most once among the K.
        parent = (self.is_prefix[:n] & (length.unsqueeze(2) == length.unsqueeze(1) + 1)
                  & valid.unsqueeze(2) & valid.unsqueeze(1))  # (n, B h2, B h)
        has_parent, par = parent.max(dim=2)  # (n, B)
        has_tok, k = (last.unsqueeze(2) == ext_tok.unsqueeze(1)).max(dim=2)  # (n, B)
        B, K = ext.shape[1], ext.shape[2]
        merges = has_parent & has_tok
        # Non-merging slots point at an extra dummy column, so the indices written are unique.
        which = torch.where(merges, par * K + k, B * K)  # (n, B)
        ext = torch.cat([ext.flatten(1), ext.new_full((n, 1), _NEG_INF)], dim=1)
        merged_in = ext.gather(1, which)  # (n, B); -inf where nothing merges
        ext = ext.scatter(1, which, _NEG_INF)[:, :-1].view(n, B, K)
        # Where the merged extension outweighs the prefix's own continuations, the prefix
        # takes its frames: the parent's plus t.
        ext_wins = merged_in > torch.logaddexp(stay_pb, stay_pnb)  # (n, B)
        stay_pnb = torch.logaddexp(stay_pnb, merged_in)
        stay_from = torch.where(ext_wins, par, torch.arange(B, device=ext.device))

        self._select(n, t, stay_pb, stay_pnb, stay_from, ext_wins, ext, ext_tok)

    def _select(self, n: int, t: int, stay_pb: Tensor, stay_pnb: Tensor, stay_from: Tensor,
                stay_appended: Tensor, ext: Tensor, ext_tok: Tensor) -> None:
        """Keep the B best of the n x (B stays + B K extensions) candidates as the new
        beams of utterances [:n]."""
        B, K = ext.shape[1], ext.shape[2]
        cand = torch.cat([torch.logaddexp(stay_pb, stay_pnb), ext.flatten(1)], dim=1)
        sel = cand.topk(B, dim=1).indices  # (n, B)
        is_ext = sel >= B
        e = (sel - B).clamp(min=0)  # index among the extensions, for those selected
        src = torch.where(is_ext, e // K, sel)  # the slot each new slot comes from
        tok = ext_tok.gather(1, e % K)

        length = self.length[:n].gather(1, src)
        L = min(t + 1, self.tokens.shape[2])  # no prefix is longer than the frames so far
        tokens = _take(self.tokens[:n, :, :L], src)  # source prefixes, before any new token
        pos = length.unsqueeze(2)
        new_tokens = tokens.scatter(2, pos, torch.where(is_ext.unsqueeze(2), tok.unsqueeze(2),
                                                        tokens.gather(2, pos)))

        # is_prefix between new slots x (from src sx) and y (from src sy): a stay y is sy's
        # prefix, so the relation is the sources' one; an extension y = sy + c is a prefix of
        # x iff sy is a prefix of sx, sx is longer, and sx's token after sy's end is c (x an
        # extension of sx does not change that: x = sx + c' equals y only when x is y).
        src_rel = _take(self.is_prefix[:n], src)  # (n, B x, B old)
        src_rel = src_rel.gather(2, src.unsqueeze(1).expand(-1, B, -1))  # (n, B x, B y)
        next_tok = tokens.gather(2, length.unsqueeze(1).expand(-1, B, -1).clamp(max=L - 1))
        ext_rel = (src_rel & (length.unsqueeze(2) > length.unsqueeze(1))
                   & (next_tok == tok.unsqueeze(1)))
        is_prefix = torch.where(is_ext.unsqueeze(1), ext_rel, src_rel)
        is_prefix |= torch.eye(B, dtype=torch.bool, device=sel.device)

        self.history.append((torch.where(is_ext, src, stay_from.gather(1, src)),
                             is_ext | stay_appended.gather(1, src)))
        self.pb[:n] = torch.where(is_ext, _NEG_INF, stay_pb.gather(1, src))
        self.pnb[:n] = torch.where(is_ext, ext.flatten(1).gather(1, e), stay_pnb.gather(1, src))
        self.tokens[:n, :, :L] = new_tokens
        self.length[:n] = length + is_ext
        self.last[:n] = torch.where(is_ext, tok, self.last[:n].gather(1, src))
        self.is_prefix[:n] = is_prefix

    def _frames(self) -> Tensor:
        """(N, B, T): per slot, the frames at which its tokens were appended, ascending,
        then T (the length of ``history``) as padding."""
        N, B, T = self.pb.shape[0], self.pb.shape[1], len(self.history)
        cur = torch.arange(B, device=self.pb.device).expand(N, B).clone()
        appended = torch.zeros(N, B, max(T, 1), dtype=torch.bool, device=self.pb.device)
        for t in range(T - 1, -1, -1):  # follow the back-pointers from the last frame
            from_slot, app = self.history[t]
            n = from_slot.shape[0]
            appended[:n, :, t] = app.gather(1, cur[:n])
            cur[:n] = from_slot.gather(1, cur[:n])
        t_index = torch.arange(appended.shape[2], device=appended.device)
        return torch.where(appended, t_index, T).sort(dim=2).values

    def results(self) -> list[list[SearchResult]]:
        """Per utterance, its non-empty slots best first (the empty prefix with log-prob
        -inf if every slot is empty, i.e. no path has a finite score)."""
        total = torch.logaddexp(self.pb, self.pnb)
        scores, order = total.sort(dim=1, descending=True)
        scores, order = scores.tolist(), order.tolist()
        length, tokens = self.length.tolist(), self.tokens.tolist()
        frames = self._frames().tolist()
        out = []
        for i, (row_scores, row_order) in enumerate(zip(scores, order, strict=True)):
            res = [SearchResult(tokens[i][b][:length[i][b]], s, frames[i][b][:length[i][b]])
                   for s, b in zip(row_scores, row_order, strict=True) if s > _NEG_INF]
            out.append(res or [SearchResult([], _NEG_INF, [])])
        return out


def _take(x: Tensor, idx: Tensor) -> Tensor:
    """Rows of x (n, B, L) picked per utterance by idx (n, B2): (n, B2, L)."""
    return x.gather(1, idx.unsqueeze(2).expand(-1, -1, x.shape[2]))
