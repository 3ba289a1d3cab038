"""Modified beam search with LM shallow fusion and LODR against an unbatched re-implementation
of icefall's formulas written here: per utterance, per frame, every (hypothesis, token) pair
scored from the model directly, the beam picked on transducer scores, then the kept pairs
that append a token get ``lm_scale * log p_LM(token | all tokens so far)`` (the LM run over
the whole sentence from ``<sos/eos>``, not step by step as the search does) plus
``lodr_scale * log p_bigram(token | last token)``; merging by log-add; best by score / len."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from helpers import peaky_search_model

from zipasr.decode.fusion import Fusion
from zipasr.decode.hotwords import ContextGraph
from zipasr.decode.search import BeamStream, beam_advance, modified_beam_search

torch.set_num_threads(1)

V = 6
SOS = 1
LENS = [23, 17, 9, 23, 4]


class TinyLm(nn.Module):
    """A random LSTM LM with the interface the search uses (``start``, ``score_tokens``) and
    a whole-sentence scorer for the reference."""

    def __init__(self, seed: int = 3, dim: int = 8) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(V, dim)
        self.rnn = nn.LSTM(dim, dim, num_layers=2, batch_first=True)
        self.out = nn.Linear(dim, V)
        with torch.no_grad():
            self.out.weight.mul_(6)  # opinions strong enough to change the search

    def score_tokens(self, tokens: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]):
        y, state = self.rnn(self.emb(tokens).unsqueeze(1), state)
        return self.out(y[:, 0]).log_softmax(-1), state

    def start(self, n: int, device):
        zeros = torch.zeros(2, n, self.rnn.hidden_size, device=device)
        return self.score_tokens(torch.full((n,), SOS, device=device), (zeros, zeros.clone()))

    def sentence_log_probs(self, tokens: list[int]) -> torch.Tensor:
        """(V,) log-probs of the token after ``tokens``, in float64, one forward."""
        m = self.double()
        y, _ = m.rnn(m.emb(torch.tensor([[SOS] + tokens])))
        out = m.out(y[0, -1]).log_softmax(-1)
        self.float()
        return out


class TableBigram:
    """A dense random bigram over token ids; row V is the start state."""

    def __init__(self, seed: int = 5) -> None:
        g = torch.Generator().manual_seed(seed)
        self.table = (torch.randn(V + 1, V, generator=g) * 2).log_softmax(-1)
        self.start_state = V

    def log_prob(self, prev: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
        return self.table[prev, token]

    def next_state(self, token: int) -> int:
        return token


def _encoder_out(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(LENS), max(LENS), 64, generator=g) * 3
    for i, n in enumerate(LENS):
        x[i, n:] = 1e3  # padding must not leak into results
    return x, torch.tensor(LENS)


def _reference(model, enc: torch.Tensor, beam: int, lm: TinyLm | None, lm_scale: float,
               bigram: TableBigram | None = None, lodr_scale: float = 0.0,
               graph: ContextGraph | None = None) -> tuple[list[int], float]:
    """icefall's shallow fusion / LODR / hotwords for one utterance enc (T, C), without
    shortcuts (the hotword graph's state is recomputed from the root for every sequence)."""

    def walk(tokens: list[int]) -> tuple[float, int]:
        total, state = 0.0, graph.root
        for tok in tokens:
            delta, state, _ = graph.forward_one_step(state, tok)
            total += delta
        return total, state

    hyps: dict[tuple[int, ...], float] = {(-1, 0): 0.0}
    for t in range(enc.shape[0]):
        pairs = []
        for ys, score in hyps.items():
            dec = model.decoder(torch.tensor([list(ys[-2:])]), need_pad=False)
            lp = model.joiner(enc[t:t + 1].unsqueeze(1), dec).reshape(-1).double().log_softmax(-1)
            pairs += [(score + float(lp[v]), ys, v) for v in range(V)]
        pairs.sort(key=lambda p: -p[0])
        new: dict[tuple[int, ...], float] = {}
        for score, ys, v in pairs[:beam]:
            if v != 0:
                tokens = list(ys[2:])
                if lm is not None:
                    score += lm_scale * float(lm.sentence_log_probs(tokens)[v])
                if bigram is not None:
                    prev = tokens[-1] if tokens else bigram.start_state
                    score += lodr_scale * float(bigram.table[prev, v])
                if graph is not None:
                    score += walk(tokens + [v])[0] - walk(tokens)[0]
                ys = ys + (v,)
            old = new.get(ys)
            new[ys] = score if old is None else float(torch.logaddexp(torch.tensor(old),
                                                                      torch.tensor(score)))
        hyps = new
    if graph is not None:  # an unfinished partial match gives its bonus back
        hyps = {ys: s + graph.finalize(walk(list(ys[2:]))[1])[0] for ys, s in hyps.items()}
    ys, score = max(hyps.items(), key=lambda kv: kv[1] / len(kv[0]))
    return list(ys[2:]), score


@pytest.mark.parametrize("lodr", [False, True], ids=["shallow-fusion", "LODR"])
@torch.inference_mode()
def test_fused_search_equals_reference(lodr: bool) -> None:
    model, lm = peaky_search_model(V), TinyLm()
    bigram = TableBigram() if lodr else None
    fusion = Fusion(lm=lm, lm_scale=0.5, bigram=bigram, lodr_scale=-0.3)
    enc, lens = _encoder_out()
    fused = modified_beam_search(model, enc, lens, beam=4, fusion=fusion)
    plain = modified_beam_search(model, enc, lens, beam=4)
    # the LM must matter here, or the comparison below proves nothing about it
    assert any(f.tokens != p.tokens for f, p in zip(fused, plain, strict=True))
    for i, n in enumerate(LENS):
        tokens, score = _reference(model, enc[i, :n], 4, lm, 0.5, bigram, -0.3)
        assert fused[i].tokens == tokens
        assert fused[i].log_prob == pytest.approx(score, abs=1e-4)


@torch.inference_mode()
def test_zero_scales_are_plain_beam_search() -> None:
    model = peaky_search_model(V)
    enc, lens = _encoder_out(seed=2)
    fusion = Fusion(lm=TinyLm(), lm_scale=0.0, bigram=TableBigram(), lodr_scale=0.0)
    fused = modified_beam_search(model, enc, lens, beam=3, fusion=fusion)
    plain = modified_beam_search(model, enc, lens, beam=3)
    assert [r.tokens for r in fused] == [r.tokens for r in plain]
    assert [r.log_prob for r in fused] == pytest.approx([r.log_prob for r in plain], abs=1e-9)


@torch.inference_mode()
def test_fusion_carries_across_blocks() -> None:
    """Streaming advances the search chunk by chunk: the LM states must carry over."""
    model = peaky_search_model(V)
    fusion = Fusion(lm=TinyLm(), lm_scale=0.5, bigram=TableBigram(), lodr_scale=-0.3)
    enc, lens = _encoder_out(seed=3)
    whole = modified_beam_search(model, enc, lens, beam=4, fusion=fusion)
    streams = [BeamStream.start(model, fusion) for _ in LENS]
    for lo, hi in ((0, 7), (7, 15), (15, max(LENS))):
        block = enc[:, lo:hi]
        block_lens = (lens - lo).clamp(0, hi - lo)
        keep = [i for i, n in enumerate(block_lens.tolist()) if n > 0]
        beam_advance(model, [streams[i] for i in keep], block[keep], block_lens[keep], beam=4,
                     fusion=fusion)
    chunked = [s.result(model.decoder.context_size, fusion) for s in streams]
    assert [r.tokens for r in chunked] == [r.tokens for r in whole]
    assert [r.log_prob for r in chunked] == pytest.approx([r.log_prob for r in whole],
                                                          abs=1e-6)


@pytest.mark.parametrize("with_lm", [False, True], ids=["hotwords", "hotwords+LODR"])
@torch.inference_mode()
def test_hotwords_equal_reference_and_bias_the_search(with_lm: bool) -> None:
    """Hotwords built from sequences the plain search does not output: boosted, they appear;
    the search equals the reference (bonuses per appended token, partial matches given back
    at the end), alone and together with LODR."""
    model = peaky_search_model(V)
    enc, lens = _encoder_out(seed=4)
    plain = modified_beam_search(model, enc, lens, beam=4)
    graph = ContextGraph([((2, 3), 2.0), ((4, 4, 5), 1.0), ((5,), 1.5)])
    lm_kw = dict(lm=TinyLm(), lm_scale=0.4, bigram=TableBigram(), lodr_scale=-0.2) if with_lm \
        else {}
    fusion = Fusion(context=graph, hotwords_score=2.0, **lm_kw)
    biased = modified_beam_search(model, enc, lens, beam=4, fusion=fusion)

    def count(tokens: list[int], phrase: tuple[int, ...]) -> int:
        return sum(tuple(tokens[i:i + len(phrase)]) == phrase for i in range(len(tokens)))

    assert sum(count(r.tokens, (2, 3)) for r in biased) > sum(count(r.tokens, (2, 3))
                                                              for r in plain)
    for i, n in enumerate(LENS):
        tokens, score = _reference(model, enc[i, :n], 4, lm_kw.get("lm"), 0.4,
                                   lm_kw.get("bigram"), -0.2, graph=graph)
        assert biased[i].tokens == tokens
        assert biased[i].log_prob == pytest.approx(score, abs=1e-4)


def test_fusion_needs_an_lm_for_lodr() -> None:
    with pytest.raises(ValueError, match="LM"):
        Fusion(bigram=TableBigram(), lodr_scale=-0.3)
    assert math.isfinite(Fusion(lm=TinyLm(), lm_scale=0.2).start().lm_log_probs.sum().item())


@pytest.mark.parametrize(("method", "fusion", "error"), [
    ("modified_beam_search_lm_shallow_fusion", None, "needs a neural LM"),
    ("modified_beam_search_LODR", "lm", "needs the bigram"),
    ("modified_beam_search_lm_shallow_fusion", "lm+bigram", "does not use a bigram"),
    ("modified_beam_search", "lm", "does not use an LM"),
    ("greedy_search", "hotwords", "hotwords bias modified beam search"),
    ("ctc_prefix_beam_search", "hotwords", "hotwords bias modified beam search"),
    ("beam_search", None, "unknown decoding method"),
])
def test_methods_get_what_they_use_and_nothing_else(method: str, fusion: str | None,
                                                     error: str) -> None:
    from zipasr.decode.search import check_method
    from zipasr.errors import ZipasrError

    parts = {
        None: None,
        "lm": Fusion(lm=TinyLm(), lm_scale=0.3),
        "lm+bigram": Fusion(lm=TinyLm(), lm_scale=0.3, bigram=TableBigram()),
        "hotwords": Fusion(context=ContextGraph([((2, 3), 1.0)])),
    }
    with pytest.raises(ZipasrError, match=error):
        check_method(method, parts[fusion])
    check_method("modified_beam_search_LODR", parts["lm+bigram"])  # what it needs: fine
