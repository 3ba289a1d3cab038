"""What modified beam search adds to a hypothesis' score besides the transducer: a neural LM
(shallow fusion), a bigram token LM subtracted from it (LODR) and hotword bonuses.

icefall's formulas (``modified_beam_search_lm_shallow_fusion`` and ``modified_beam_search_LODR``
in its ``beam_search.py``): the beam is chosen on the transducer's log-probs plus each
hypothesis' accumulated score; then every kept pair that appends token ``w`` to hypothesis
``y`` adds

    lm_scale * log p_LM(w | y) + lodr_scale * log p_bigram(w | y[-1]) + hotword bonus(y, w)

to its score (``lodr_scale`` is negative: LODR subtracts the bigram, an estimate of the
transducer's internal LM). The LM sees ``<sos/eos>`` first; no end-of-sentence term is added.
A blank leaves the score alone. At the end, an unfinished partial hotword match gives its
bonus back before the best hypothesis is picked.

Every one of these depends on the hypothesis' token sequence only, so each beam keeps one
:class:`HypState` per token sequence, and the LM's steps of all new hypotheses of a frame go
through the LM as one batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass
class HypState:
    """The LM, bigram and hotword state after one hypothesis' tokens.

    ``lm_log_probs``: (V,) the LM's log-probs of the next token; ``lm_state``: the LSTM's
    (h, c), each (num_layers, hidden); ``last``: the bigram history (the last token, or the
    bigram's start state); ``context``: the hotword graph's node."""

    lm_log_probs: Tensor | None = None
    lm_state: tuple[Tensor, Tensor] | None = None
    last: int = 0
    context: int = 0


class Fusion:
    """LM shallow fusion / LODR / hotwords for :func:`zipasr.decode.search.beam_advance`.

    ``lm``: a :class:`zipasr.lm.model.RnnLm` (``start``, ``score_tokens``); ``bigram``: a
    :class:`zipasr.lm.bigram.BigramLm` (``start_state``, ``log_prob``); ``context``: a
    :class:`zipasr.decode.hotwords.ContextGraph` (``hotwords_score``: its default per-token
    score, named in result keys). Any may be None (its term is 0)."""

    def __init__(self, *, lm: Any = None, lm_scale: float = 0.0, bigram: Any = None,
                 lodr_scale: float = 0.0, context: Any = None,
                 hotwords_score: float | None = None) -> None:
        if bigram is not None and lm is None:
            raise ValueError("LODR subtracts a bigram from a neural LM: give the LM too")
        self.lm, self.lm_scale = lm, lm_scale
        self.bigram, self.lodr_scale = bigram, lodr_scale
        self.context = context
        self.hotwords_score = hotwords_score  # the default score, for result names only
        self._start: HypState | None = None

    def start(self, device: torch.device | str = "cpu") -> HypState:
        """The state of the empty hypothesis (the LM after ``<sos/eos>``); computed once."""
        if self._start is None:
            st = HypState()
            if self.lm is not None:
                log_probs, (h, c) = self.lm.start(1, device)
                st.lm_log_probs, st.lm_state = log_probs[0], (h[:, 0], c[:, 0])
            if self.bigram is not None:
                st.last = int(self.bigram.start_state)
            if self.context is not None:
                st.context = self.context.root
            self._start = st
        return self._start

    def extend(self, parents: Sequence[HypState], tokens: Sequence[int]
               ) -> tuple[list[float], list[HypState]]:
        """Append ``tokens[k]`` to the hypothesis of ``parents[k]``, for all k at once.

        Returns the score each pair adds and the new hypotheses' states; the LM runs one
        batched step over all pairs."""
        n = len(tokens)
        assert len(parents) == n
        bonus = [0.0] * n
        children = [HypState(last=p.last, context=p.context) for p in parents]
        if n == 0:
            return bonus, children
        if self.lm is not None:
            tok = torch.tensor(tokens, dtype=torch.int64)
            lm_lp = torch.stack([p.lm_log_probs for p in parents])  # (n, V)
            tok = tok.to(lm_lp.device)
            gained = lm_lp.gather(1, tok.unsqueeze(1)).squeeze(1)  # (n,)
            h = torch.stack([p.lm_state[0] for p in parents], dim=1)  # (L, n, H)
            c = torch.stack([p.lm_state[1] for p in parents], dim=1)
            log_probs, (h, c) = self.lm.score_tokens(tok, (h, c))
            for k, child in enumerate(children):
                child.lm_log_probs, child.lm_state = log_probs[k], (h[:, k], c[:, k])
            for k, g in enumerate(gained.tolist()):
                bonus[k] += self.lm_scale * g
        if self.bigram is not None:
            prev = torch.tensor([p.last for p in parents], dtype=torch.int64)
            tok = torch.tensor(tokens, dtype=torch.int64)
            for k, g in enumerate(self.bigram.log_prob(prev, tok).tolist()):
                bonus[k] += self.lodr_scale * g
            for child, t in zip(children, tokens, strict=True):
                child.last = int(self.bigram.next_state(t))
        if self.context is not None:
            for k, (p, t) in enumerate(zip(parents, tokens, strict=True)):
                delta, children[k].context, _ = self.context.forward_one_step(p.context, t)
                bonus[k] += delta
        return bonus, children

    def final_bonus(self, state: HypState) -> float:
        """What a finished hypothesis adds before the best is picked: an unfinished partial
        hotword match gives its bonus back."""
        if self.context is None:
            return 0.0
        delta, _ = self.context.finalize(state.context)
        return float(delta)
