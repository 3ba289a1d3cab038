"""Greedy and modified beam search: batching/padding, beam 1 == greedy, scores recomputed
independently from the model, exhaustive enumeration, and a hand-built joiner whose answer
is worked out by hand."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn as nn
from helpers import peaky_search_model as _model

from zipasr.decode.search import SearchResult, greedy_search_batch, modified_beam_search
from zipasr.model import Transducer

torch.set_num_threads(1)


def _encoder_out(lens: list[int], dim: int = 64, seed: int = 1) -> tuple[torch.Tensor,
                                                                          torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(lens), max(lens), dim, generator=g) * 3
    for i, n in enumerate(lens):
        x[i, n:] = 1e3  # garbage in the padding must not leak into results
    return x, torch.tensor(lens)


def _frame_log_probs(model: Transducer, enc: torch.Tensor, ys: list[int]) -> torch.Tensor:
    """log_softmax of the joiner for encoder frames enc (T, C) and context ys (full history
    incl. the initial [-1, 0]): (T, V), computed without the search's shortcuts."""
    c = model.decoder.context_size
    dec = model.decoder(torch.tensor([ys[-c:]]), need_pad=False)  # (1, 1, D)
    logits = model.joiner(enc.unsqueeze(1), dec.expand(enc.shape[0], 1, -1))  # (T, 1, V)
    return logits.squeeze(1).double().log_softmax(-1)


def _path_log_prob(model: Transducer, enc: torch.Tensor, alignment: list[int]) -> float:
    """log P of one alignment (a token or blank per frame) under the model."""
    ys = [-1, 0]
    total = 0.0
    for t, tok in enumerate(alignment):
        total += float(_frame_log_probs(model, enc[t:t + 1], ys)[0, tok])
        if tok != 0:
            ys.append(tok)
    return total


def _sequence_log_prob(model: Transducer, enc: torch.Tensor, tokens: list[int]) -> float:
    """log sum over all alignments (<= 1 symbol per frame) of ``tokens``: forward algorithm."""
    T, U = enc.shape[0], len(tokens)
    # lp[u]: (T, V) log-probs after emitting tokens[:u]
    lp = [_frame_log_probs(model, enc, [-1, 0] + tokens[:u]) for u in range(U + 1)]
    alpha = [0.0] + [-math.inf] * U
    for t in range(T):
        new = [-math.inf] * (U + 1)
        for u in range(U + 1):
            stay = alpha[u] + float(lp[u][t, 0])
            move = alpha[u - 1] + float(lp[u - 1][t, tokens[u - 1]]) if u > 0 else -math.inf
            new[u] = float(torch.logaddexp(torch.tensor(stay), torch.tensor(move)))
        alpha = new
    return alpha[U]


LENS = [40, 31, 17, 5, 31]


@torch.inference_mode()
def test_greedy_batched_equals_one_at_a_time() -> None:
    model = _model()
    enc, lens = _encoder_out(LENS)
    batched = greedy_search_batch(model, enc, lens)
    assert any(r.tokens for r in batched) and any(len(r.tokens) < n for r, n in
                                                     zip(batched, LENS, strict=True))
    for i, n in enumerate(LENS):
        (single,) = greedy_search_batch(model, enc[i:i + 1, :n], lens[i:i + 1])
        assert batched[i].tokens == single.tokens
        assert batched[i].log_prob == pytest.approx(single.log_prob, abs=1e-4)


@torch.inference_mode()
def test_beam_batched_equals_one_at_a_time() -> None:
    model = _model()
    enc, lens = _encoder_out(LENS)
    batched = modified_beam_search(model, enc, lens, beam=4)
    for i, n in enumerate(LENS):
        (single,) = modified_beam_search(model, enc[i:i + 1, :n], lens[i:i + 1], beam=4)
        assert batched[i].tokens == single.tokens
        assert batched[i].log_prob == pytest.approx(single.log_prob, abs=1e-4)


@torch.inference_mode()
def test_beam_1_equals_greedy() -> None:
    for seed in range(3):
        model = _model(vocab_size=12, seed=seed)
        enc, lens = _encoder_out(LENS, seed=seed + 10)
        greedy = greedy_search_batch(model, enc, lens)
        beam1 = modified_beam_search(model, enc, lens, beam=1)
        for g, b in zip(greedy, beam1, strict=True):
            assert g.tokens == b.tokens
            assert g.log_prob == pytest.approx(b.log_prob, abs=1e-4)


@torch.inference_mode()
def test_scores_recomputed_from_the_model() -> None:
    """Greedy's score is its path's log-prob; each step's token is the argmax; beam's score
    is a sum over a subset of the alignments of its tokens, so at most their total."""
    model = _model()
    enc, lens = _encoder_out(LENS)
    greedy = greedy_search_batch(model, enc, lens)
    beam = modified_beam_search(model, enc, lens, beam=4)
    for i, n in enumerate(LENS):
        e = enc[i, :n]
        # rebuild the greedy alignment step by step with unbatched calls
        ys, alignment = [-1, 0], []
        for t in range(n):
            tok = int(_frame_log_probs(model, e[t:t + 1], ys)[0].argmax())
            alignment.append(tok)
            if tok:
                ys.append(tok)
        assert greedy[i].tokens == ys[2:]
        assert greedy[i].log_prob == pytest.approx(_path_log_prob(model, e, alignment), abs=1e-3)
        total = _sequence_log_prob(model, e, beam[i].tokens)
        assert beam[i].log_prob <= total + 1e-6
        # the greedy path is one alignment of greedy's tokens
        assert _sequence_log_prob(model, e, greedy[i].tokens) >= greedy[i].log_prob - 1e-6


@torch.inference_mode()
def test_wide_beam_is_exhaustive() -> None:
    """With a beam wider than all (hypothesis, token) pairs nothing is pruned: the result
    is the sequence maximising log P(seq) / (len + 2) over all alignments, with its exact
    total log P; that total is >= the greedy path's log-prob."""
    V, T = 3, 4
    for seed in range(3):
        model = _model(vocab_size=V, seed=seed)
        enc, lens = _encoder_out([T], seed=seed + 20)
        seq_scores: dict[tuple[int, ...], float] = {}
        for alignment in itertools.product(range(V), repeat=T):
            seq = tuple(a for a in alignment if a != 0)
            lp = _path_log_prob(model, enc[0], list(alignment))
            old = seq_scores.get(seq, -math.inf)
            seq_scores[seq] = max(old, lp) + math.log1p(math.exp(-abs(old - lp)))
        best = max(seq_scores, key=lambda s: seq_scores[s] / (len(s) + 2))
        (res,) = modified_beam_search(model, enc, lens, beam=V ** T)
        assert tuple(res.tokens) == best
        assert res.log_prob == pytest.approx(seq_scores[best], abs=1e-4)
        (g,) = greedy_search_batch(model, enc, lens)
        assert max(seq_scores.values()) >= g.log_prob - 1e-6


# -- a hand-built model ------------------------------------------------------------------------

# P(token | frame t, last emitted token) for V = 3 (0 = blank), two frames.
PROBS = {
    (0, 0): [0.40, 0.35, 0.25],
    (1, 0): [0.45, 0.30, 0.25],
    (1, 1): [0.60, 0.10, 0.30],
    (1, 2): [0.50, 0.30, 0.20],
}


class _FakeDecoder(nn.Module):
    """Outputs the last context token as a 1-d feature: (N, 2) -> (N, 1, 1)."""

    blank_id = 0
    context_size = 2

    def forward(self, y: torch.Tensor, need_pad: bool = True) -> torch.Tensor:
        assert not need_pad and y.shape[1] == 2
        return y[:, -1:].unsqueeze(-1).float()


class _FakeJoiner(nn.Module):
    """Encoder frames carry their frame index; logits = log PROBS[t, last token]."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder_proj = nn.Identity()
        self.decoder_proj = nn.Identity()

    def forward(self, enc: torch.Tensor, dec: torch.Tensor, project_input: bool = True
                ) -> torch.Tensor:
        assert not project_input
        rows = [PROBS[(int(t), int(last))] for t, last in zip(enc[:, 0], dec[:, 0], strict=True)]
        return torch.tensor(rows).log()


class _FakeModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.decoder = _FakeDecoder()
        self.joiner = _FakeJoiner()


def test_hand_built_joiner() -> None:
    """Alignments over 2 frames (b = blank):
        ""  : b b = .40 * .45 = .18
        "1" : 1 b = .35 * .60 = .21  and  b 1 = .40 * .30 = .12  -> merged .33
        "2" : 2 b = .25 * .50 = .125 and  b 2 = .40 * .25 = .10
    Greedy takes b (.40) then b (.45): "" with log .18. Beam 4 keeps, at frame 2, the pairs
    .21 ("1"), .18 (""), .125 ("2"), .12 ("1"): "1" merges to .33 and wins after length
    normalisation: log(.33)/3 = -0.370 > log(.125)/3 = -0.693 > log(.18)/2 = -0.857.
    Beam 2 keeps .21 and .18 only: "1" with .21."""
    model = _FakeModel()
    enc = torch.tensor([[[0.0], [1.0]]])  # (1, T=2, 1): the frame index
    lens = torch.tensor([2])
    assert greedy_search_batch(model, enc, lens)[0] == SearchResult([], pytest.approx(
        math.log(0.18)))
    (b4,) = modified_beam_search(model, enc, lens, beam=4)
    assert b4.tokens == [1] and b4.log_prob == pytest.approx(math.log(0.33))
    (b2,) = modified_beam_search(model, enc, lens, beam=2)
    assert b2.tokens == [1] and b2.log_prob == pytest.approx(math.log(0.21))
    # a beam wider than the 3 pairs of the first frame is fine
    (b9,) = modified_beam_search(model, enc, lens, beam=9)
    assert b9.tokens == [1] and b9.log_prob == pytest.approx(math.log(0.33))


def test_length_normalisation_picks_longer_hypothesis(monkeypatch) -> None:
    """With P(. | frame 2, after "1") = [.05, .45, .50] the beam-4 survivors at frame 2 are
    "" (.18), "1 2" (.35 * .50 = .175), "1 1" (.35 * .45 = .1575), "2" (.25 * .50 = .125;
    its other alignment, .10, is pruned). Un-normalised, "" is the best; normalised by
    len(ys) (tokens + 2 context entries): log(.175)/4 = -0.436 beats log(.1575)/4 = -0.462,
    log(.125)/3 = -0.693 and log(.18)/2 = -0.857."""
    monkeypatch.setitem(PROBS, (1, 1), [0.05, 0.45, 0.50])
    model = _FakeModel()
    enc = torch.tensor([[[0.0], [1.0]]])
    (b,) = modified_beam_search(model, enc, torch.tensor([2]), beam=4)
    assert b.tokens == [1, 2] and b.log_prob == pytest.approx(math.log(0.175))


@torch.inference_mode()
def test_emitting_frames(monkeypatch) -> None:
    """``frames`` (the timestamps of ``zipasr transcribe``): greedy's are the frames where an
    unbatched rebuild of its alignment emits; beam 1 reports greedy's; a merged beam
    hypothesis keeps the frames of the highest-scoring pair at the merge."""
    model = _model(vocab_size=12)
    enc, lens = _encoder_out(LENS)
    greedy = greedy_search_batch(model, enc, lens)
    beam1 = modified_beam_search(model, enc, lens, beam=1)
    beam4 = modified_beam_search(model, enc, lens, beam=4)
    for i, n in enumerate(LENS):
        ys, frames = [-1, 0], []
        for t in range(n):
            tok = int(_frame_log_probs(model, enc[i, t:t + 1], ys)[0].argmax())
            if tok:
                ys.append(tok)
                frames.append(t)
        assert greedy[i].frames == frames and len(frames) == len(greedy[i].tokens)
        assert beam1[i].frames == frames
        f4 = beam4[i].frames
        assert len(f4) == len(beam4[i].tokens) and all(0 <= f < n for f in f4)
        assert all(a < b for a, b in zip(f4, f4[1:], strict=False))  # <= 1 symbol per frame
    assert sum(len(r.frames) for r in greedy) > len(LENS)  # not vacuous

    # Hand-built joiner (see test_hand_built_joiner): "1" = "1 b" (.21, emitted at frame 0)
    # merged with "b 1" (.12, frame 1): the better alignment's frame, 0.
    fake, fenc, flens = _FakeModel(), torch.tensor([[[0.0], [1.0]]]), torch.tensor([2])
    assert modified_beam_search(fake, fenc, flens, beam=4)[0].frames == [0]
    # With P(. | frame 2, after blank) = [.2, .7, .1], "b 1" (.40 * .70 = .28) beats "1 b"
    # (.21): the merged "1" (.49) is reported at frame 1.
    monkeypatch.setitem(PROBS, (1, 0), [0.2, 0.7, 0.1])
    (b,) = modified_beam_search(fake, fenc, flens, beam=4)
    assert b.tokens == [1] and b.log_prob == pytest.approx(math.log(0.49))
    assert b.frames == [1]
    # greedy: b (.40) at frame 0, then "1" (.70) at frame 1
    assert greedy_search_batch(fake, fenc, flens)[0].frames == [1]


@torch.inference_mode()
def test_dispatch_of_the_ctc_methods() -> None:
    """search() decodes the CTC head for the CTC methods (what the CTC functions give on
    ``ctc_output``), a CTC-only model decodes with them alone, and a model without the head
    says so."""
    from zipasr.decode import ctc
    from zipasr.decode.search import search
    from zipasr.deploy.transcribe import Transcriber
    from zipasr.errors import ZipasrError

    torch.manual_seed(0)
    ctc_only = Transducer.from_preset("xs", vocab_size=6, use_transducer=False,
                                      use_ctc=True).eval()
    (proj,) = [m for m in ctc_only.ctc_output if isinstance(m, nn.Linear)]
    enc, lens = _encoder_out(LENS, dim=proj.in_features)
    want = ctc.ctc_prefix_beam_search(ctc_only.ctc_output(enc), lens, beam=3)
    assert search(ctc_only, enc, lens, "ctc_prefix_beam_search", beam=3) == want
    assert search(ctc_only, enc, lens, "ctc_greedy_search") == ctc.ctc_greedy_search(
        ctc_only.ctc_output(enc), lens)
    with pytest.raises(ZipasrError, match="CTC-only"):
        search(ctc_only, enc, lens, "greedy_search")
    with pytest.raises(ZipasrError, match="CTC-only"):  # before any audio is read
        Transcriber(ctc_only, None, method="modified_beam_search")
    no_head = Transducer.from_preset("xs", vocab_size=6, use_ctc=False).eval()
    with pytest.raises(ZipasrError, match="has none"):
        search(no_head, enc, lens, "ctc_greedy_search")
