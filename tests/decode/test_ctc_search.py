"""CTC greedy and prefix beam search against independent references: every frame path of a
tiny vocabulary enumerated and summed per label sequence in float64, per-frame argmax and
collapse in plain Python, and small examples worked out by hand."""

from __future__ import annotations

import functools
import itertools
import math

import pytest
import torch

from zipasr.decode.ctc import (
    ctc_greedy_search,
    ctc_prefix_beam_search,
    ctc_prefix_beam_search_nbest,
)
from zipasr.errors import ZipasrError

torch.set_num_threads(1)


def _collapse(path: tuple[int, ...], blank: int) -> tuple[int, ...]:
    out, prev = [], None
    for c in path:
        if c != blank and c != prev:
            out.append(c)
        prev = c
    return tuple(out)


@functools.cache
def _paths(V: int, T: int, blank: int) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, ...]]]:
    """All V^T frame paths (P, T), the index of each one's label sequence (P,), the labels."""
    paths = list(itertools.product(range(V), repeat=T))
    labels = list(dict.fromkeys(_collapse(p, blank) for p in paths))
    index = {lab: i for i, lab in enumerate(labels)}
    group = torch.tensor([index[_collapse(p, blank)] for p in paths])
    return torch.tensor(paths, dtype=torch.int64).view(len(paths), T), group, labels


def _exhaustive(lp: torch.Tensor, blank: int) -> dict[tuple[int, ...], float]:
    """log P(label sequence) = log of the sum over its frame paths, for lp (T, V) float64."""
    T, V = lp.shape
    paths, group, labels = _paths(V, T, blank)
    path_lp = lp[torch.arange(T), paths].sum(dim=1)  # (P,)
    top = path_lp.max()
    sums = torch.zeros(len(labels), dtype=torch.float64).index_add_(0, group,
                                                                      (path_lp - top).exp())
    return dict(zip(labels, (sums.log() + top).tolist(), strict=True))


def _random_log_probs(g: torch.Generator, N: int, T: int, V: int, scale: float = 2.0
                      ) -> torch.Tensor:
    return (torch.randn(N, T, V, generator=g, dtype=torch.float64) * scale).log_softmax(-1)


def _num_labellings(V: int, T: int) -> int:
    return sum((V - 1) ** k for k in range(T + 1))


@pytest.mark.parametrize("V,T", [(3, 6), (4, 5)])
def test_prefix_beam_search_unpruned_is_exhaustive_sum(V: int, T: int) -> None:
    """With nothing pruned, the n-best list is every label sequence with its exact total
    probability, best first, for batches of different lengths (garbage in the padding)."""
    g = torch.Generator().manual_seed(V * 10 + T)
    beam = _num_labellings(V, T)
    for trial in range(24):
        blank = trial % V
        lens = torch.randint(0, T + 1, (4,), generator=g)
        lens[trial % 4] = T
        # Sharper distributions in some trials make repeated tokens ('a a' through a blank)
        # and single dominant paths likely.
        lp = _random_log_probs(g, 4, T, V, scale=1.0 + trial % 3 * 2)
        for i, n in enumerate(lens.tolist()):
            lp[i, n:] = 1e3 * (i + 1)
        nbest = ctc_prefix_beam_search_nbest(lp, lens, beam=beam, blank_id=blank,
                                             token_beam=V)
        best = ctc_prefix_beam_search(lp, lens, beam=beam, blank_id=blank, token_beam=V)
        for i, n in enumerate(lens.tolist()):
            ref = _exhaustive(lp[i, :n], blank)
            got = {tuple(r.tokens): r.log_prob for r in nbest[i]}
            assert len(got) == len(nbest[i]) == len(ref)  # no duplicates, none missing
            for lab, score in got.items():
                assert score == pytest.approx(ref[lab], rel=1e-10, abs=1e-10)
            scores = [r.log_prob for r in nbest[i]]
            assert scores == sorted(scores, reverse=True)
            assert best[i] == nbest[i][0]
            assert best[i].log_prob == pytest.approx(max(ref.values()), rel=1e-10, abs=1e-10)
            assert ref[tuple(best[i].tokens)] == pytest.approx(max(ref.values()), abs=1e-10)


def test_repeated_token_needs_a_blank() -> None:
    """V = 2 (blank 0, token 1), T = 3: 'a a' has exactly one path, a _ a; 'a' all paths with
    one run of a's."""
    p = torch.tensor([[0.3, 0.7], [0.6, 0.4], [0.2, 0.8]], dtype=torch.float64)
    nbest = ctc_prefix_beam_search_nbest(p.log().unsqueeze(0), torch.tensor([3]), beam=8)[0]
    got = {tuple(r.tokens): math.exp(r.log_prob) for r in nbest}
    assert set(got) == {(), (1,), (1, 1)}
    assert got[(1, 1)] == pytest.approx(0.7 * 0.6 * 0.8, rel=1e-12)
    assert got[()] == pytest.approx(0.3 * 0.6 * 0.2, rel=1e-12)
    one_a = [(1, 0, 0), (1, 1, 0), (1, 1, 1), (0, 1, 0), (0, 1, 1), (0, 0, 1)]
    assert got[(1,)] == pytest.approx(
        sum(math.prod(p[t, c].item() for t, c in enumerate(path)) for path in one_a),
        rel=1e-12)


def test_prefix_beam_search_beats_greedy_when_best_path_is_not_best_labelling() -> None:
    """P(a) = 0.4 on both frames: the best path is _ _ (0.36), but 'a' totals 0.64."""
    lp = torch.tensor([[[0.6, 0.4], [0.6, 0.4]]]).log()
    lens = torch.tensor([2])
    assert ctc_greedy_search(lp, lens)[0].tokens == []
    best = ctc_prefix_beam_search(lp, lens, beam=2)[0]
    assert best.tokens == [1]
    assert best.log_prob == pytest.approx(math.log(0.64), rel=1e-6)


def test_pruned_search_scores_are_lower_bounds_and_batch_independent() -> None:
    """With pruning a prefix's score sums only the paths through kept prefixes: never above
    the exhaustive sum; and an utterance decodes the same alone as in a padded batch."""
    g = torch.Generator().manual_seed(7)
    V, T = 5, 6
    lp = _random_log_probs(g, 6, T, V, scale=1.5)
    lens = torch.tensor([6, 3, 5, 6, 1, 4])
    for beam, token_beam in [(1, 1), (2, 2), (3, 1), (4, None)]:
        nbest = ctc_prefix_beam_search_nbest(lp, lens, beam=beam, token_beam=token_beam)
        for i, n in enumerate(lens.tolist()):
            ref = _exhaustive(lp[i, :n], 0)
            assert 1 <= len(nbest[i]) <= beam
            for r in nbest[i]:
                assert r.log_prob <= ref[tuple(r.tokens)] + 1e-12
            alone = ctc_prefix_beam_search_nbest(lp[i:i + 1, :n], lens[i:i + 1], beam=beam,
                                                 token_beam=token_beam)[0]
            assert [r.tokens for r in alone] == [r.tokens for r in nbest[i]]
            assert [r.frames for r in alone] == [r.frames for r in nbest[i]]
            # The same sums, but torch's vector kernels may split a batch's rows and one
            # row differently into vector body and tail: the last bit can differ (it does
            # with ATEN_CPU_CAPABILITY=avx2), so the scores agree to float64 rounding.
            assert [r.log_prob for r in alone] == pytest.approx(
                [r.log_prob for r in nbest[i]], rel=1e-13, abs=1e-13)


def _log_add(a: float, b: float) -> float:
    if a == -math.inf:
        return b
    m = max(a, b)
    return m + math.log1p(math.exp(-abs(a - b)))


def _prefix_beam_reference(lp: list[list[float]], beam: int, token_beam: int, blank: int
                           ) -> list[tuple[tuple[int, ...], float]]:
    """The pruned search written the plain way: a dict prefix -> [log P ending in blank,
    log P ending in its last token], one utterance, one candidate at a time."""
    beams: dict[tuple[int, ...], list[float]] = {(): [0.0, -math.inf]}
    for row in lp:
        top = sorted((c for c in range(len(row)) if c != blank), key=lambda c: -row[c])
        nxt: dict[tuple[int, ...], list[float]] = {}
        for prefix, (pb, pnb) in beams.items():
            total = _log_add(pb, pnb)
            entry = nxt.setdefault(prefix, [-math.inf, -math.inf])
            entry[0] = _log_add(entry[0], total + row[blank])
            if prefix:
                entry[1] = _log_add(entry[1], pnb + row[prefix[-1]])
            for c in top[:token_beam]:
                before = pb if prefix and prefix[-1] == c else total
                entry = nxt.setdefault(prefix + (c,), [-math.inf, -math.inf])
                entry[1] = _log_add(entry[1], before + row[c])
        ranked = sorted(nxt.items(), key=lambda kv: -_log_add(*kv[1]))
        beams = dict(ranked[:beam])
    return [(prefix, _log_add(*parts)) for prefix, parts in beams.items()]


def test_pruned_search_matches_plain_reference() -> None:
    """Pruned by beam and token_beam (prefixes dropped and found again later), the batched
    search keeps the same prefixes with the same scores as the one-candidate-at-a-time
    reference."""
    g = torch.Generator().manual_seed(13)
    V, T = 6, 14
    lens = torch.tensor([14, 9, 14, 3, 12])
    for blank, scale in [(0, 1.0), (2, 2.5), (5, 4.0)]:
        lp = _random_log_probs(g, len(lens), T, V, scale=scale)
        for beam, token_beam in [(1, 1), (2, 3), (3, 2), (5, 5), (8, 2)]:
            nbest = ctc_prefix_beam_search_nbest(lp, lens, beam=beam, blank_id=blank,
                                                 token_beam=token_beam)
            for i, n in enumerate(lens.tolist()):
                ref = _prefix_beam_reference(lp[i, :n].tolist(), beam, token_beam, blank)
                assert [tuple(r.tokens) for r in nbest[i]] == [p for p, _ in ref]
                assert [r.log_prob for r in nbest[i]] == pytest.approx(
                    [s for _, s in ref], rel=1e-12, abs=1e-12)


def test_token_beam_limits_extensions_to_the_frames_top_tokens() -> None:
    """Every token was appended at a frame where it is among the token_beam most probable
    non-blank tokens (its recorded frame)."""
    g = torch.Generator().manual_seed(3)
    V, T, token_beam = 12, 20, 2
    lp = _random_log_probs(g, 3, T, V, scale=3.0)
    lens = torch.tensor([20, 17, 9])
    nbest = ctc_prefix_beam_search_nbest(lp, lens, beam=6, token_beam=token_beam)
    for i, res in enumerate(nbest):
        assert len(res) == 6
        for r in res:
            assert len(r.frames) == len(r.tokens)
            assert r.frames == sorted(set(r.frames)) and all(f < lens[i] for f in r.frames)
            for tok, f in zip(r.tokens, r.frames, strict=True):
                allowed = lp[i, f, 1:].topk(token_beam).indices + 1  # blank is 0
                assert tok in allowed.tolist()


@pytest.mark.parametrize("p_first,frames", [(0.3, [1]), (0.6, [0])])
def test_frames_follow_the_most_probable_continuation(p_first: float, frames: list[int]
                                                      ) -> None:
    """'a' over two frames with P(a) = p_first, 0.9: reached at frame 1 from '' (P = (1 -
    p_first) 0.9) and carried from frame 0 (P = p_first); the larger one sets its frame."""
    lp = torch.tensor([[[1 - p_first, p_first], [0.1, 0.9]]]).log()
    best = ctc_prefix_beam_search(lp, torch.tensor([2]), beam=3)[0]
    assert best.tokens == [1] and best.frames == frames
    assert best.log_prob == pytest.approx(math.log(1 - 0.1 * (1 - p_first)), rel=1e-6)


def test_peaky_input_beam_agrees_with_greedy() -> None:
    """When one path carries almost all the mass, both searches find it, with its frames."""
    g = torch.Generator().manual_seed(5)
    N, T, V = 4, 30, 9
    best_tok = torch.randint(0, V, (N, T), generator=g)
    best_tok[:, ::2] = 0  # plenty of blanks, so repeated tokens occur too
    logits = torch.randn(N, T, V, generator=g)
    logits.scatter_(2, best_tok.unsqueeze(2), 30.0)
    lp = logits.log_softmax(-1)
    lens = torch.tensor([30, 22, 30, 7])
    greedy = ctc_greedy_search(lp, lens)
    beam = ctc_prefix_beam_search(lp, lens, beam=4)
    for gr, bm in zip(greedy, beam, strict=True):
        assert bm.tokens == gr.tokens and bm.frames == gr.frames and gr.tokens
        assert bm.log_prob == pytest.approx(gr.log_prob, abs=1e-4)


def _greedy_reference(lp: torch.Tensor, blank: int) -> tuple[list[int], float, list[int]]:
    tokens, frames, score, prev = [], [], 0.0, None
    for t, row in enumerate(lp.tolist()):
        c = max(range(len(row)), key=row.__getitem__)
        score += row[c]
        if c != blank and c != prev:
            tokens.append(c)
            frames.append(t)
        prev = c
    return tokens, score, frames


def test_greedy_matches_argmax_and_collapse() -> None:
    g = torch.Generator().manual_seed(11)
    for blank in (0, 4):
        lp = _random_log_probs(g, 5, 40, 6, scale=1.5)
        lens = torch.tensor([40, 0, 13, 40, 1])
        lp[2, 13:] = 1e3
        for i, r in enumerate(ctc_greedy_search(lp, lens, blank_id=blank)):
            tokens, score, frames = _greedy_reference(lp[i, :lens[i]], blank)
            assert r.tokens == tokens and r.frames == frames
            assert r.log_prob == pytest.approx(score, rel=1e-12, abs=1e-12)


def test_greedy_hand_worked() -> None:
    # argmax per frame: 1 1 0 1 2 2 0 0 -> runs 1,1 | _ | 1 | 2,2 | _ _ -> tokens 1 1 2
    ids = [1, 1, 0, 1, 2, 2, 0, 0]
    p = torch.full((1, len(ids), 3), 0.1)
    p[0, torch.arange(len(ids)), torch.tensor(ids)] = 0.8
    r = ctc_greedy_search(p.log(), torch.tensor([8]))[0]
    assert r.tokens == [1, 1, 2] and r.frames == [0, 3, 4]
    assert r.log_prob == pytest.approx(8 * math.log(0.8), rel=1e-6)


def test_all_blank_and_zero_length() -> None:
    lp = torch.tensor([[0.9, 0.05, 0.05]]).log().expand(2, 4, 3).contiguous()
    lens = torch.tensor([4, 0])
    g_all, g_zero = ctc_greedy_search(lp, lens)
    assert g_all.tokens == [] and g_all.frames == []
    assert g_all.log_prob == pytest.approx(4 * math.log(0.9), rel=1e-6)
    assert (g_zero.tokens, g_zero.log_prob, g_zero.frames) == ([], 0.0, [])
    b_all, b_zero = ctc_prefix_beam_search(lp, lens, beam=3)
    assert b_all.tokens == [] and b_all.log_prob == pytest.approx(4 * math.log(0.9), rel=1e-6)
    assert (b_zero.tokens, b_zero.log_prob, b_zero.frames) == ([], 0.0, [])
    empty = torch.zeros(0, 5, 3)
    none = torch.zeros(0, dtype=torch.int64)
    assert ctc_greedy_search(empty, none) == [] and ctc_prefix_beam_search(empty, none) == []
    zero_t = torch.zeros(2, 0, 3)
    assert [r.tokens for r in ctc_prefix_beam_search(zero_t, torch.tensor([0, 0]))] == [[], []]


def test_float32_input() -> None:
    g = torch.Generator().manual_seed(2)
    lp = _random_log_probs(g, 3, 5, 3)
    lens = torch.tensor([5, 4, 2])
    ref = ctc_prefix_beam_search_nbest(lp, lens, beam=50, token_beam=3)
    got = ctc_prefix_beam_search_nbest(lp.float(), lens, beam=50, token_beam=3)
    for a, b in zip(ref, got, strict=True):
        assert [r.tokens for r in a] == [r.tokens for r in b]
        assert [r.log_prob for r in b] == pytest.approx([r.log_prob for r in a], abs=1e-5)


def test_bad_input() -> None:
    lp = torch.zeros(2, 4, 3)
    lens = torch.tensor([4, 2])
    with pytest.raises(ZipasrError, match="beam"):
        ctc_prefix_beam_search(lp, lens, beam=0)
    with pytest.raises(ZipasrError, match="token_beam"):
        ctc_prefix_beam_search(lp, lens, token_beam=0)
    with pytest.raises(ZipasrError, match="blank"):
        ctc_greedy_search(lp, lens, blank_id=3)
    with pytest.raises(ValueError, match="lens"):
        ctc_prefix_beam_search(lp, torch.tensor([4, 5]))
    with pytest.raises(ValueError, match="lens"):
        ctc_greedy_search(lp, torch.tensor([4]))
    with pytest.raises(ValueError, match="N, T, V"):
        ctc_greedy_search(lp[0], lens)
