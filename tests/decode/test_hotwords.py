"""Hotwords: the Aho-Corasick context graph against a brute-force string-matching scorer, icefall's
own expected totals, and the sherpa-onnx hotwords file reader on a tiny BPE model.

The brute-force definition, written from the semantics and not from the tree:

* A prefix ``p`` of some hotword has token bonuses ``b(p[:i])`` = the largest score among the
  hotwords that start with ``p[:i]``; its value is ``V(p) = sum_i b(p[:i])`` (a hotword's value
  is V of itself).
* Non-strict: scan the tokens keeping a start index. After token t, let ``s = seq[start:t+1]``.
  If some hotwords are suffixes of ``s``, the longest one is matched, its V is kept and
  ``start = t + 1``. The running bonus is the kept values plus V of the longest suffix of
  ``seq[start:t+1]`` that is a hotword prefix (0 if none).
* Strict: never reset; every hotword that is a suffix of ``seq[:t+1]`` adds its V (each
  occurrence counts), and the partial term is V of the longest suffix of ``seq[:t+1]`` that is
  a hotword prefix.
* ``finalize`` leaves exactly the kept values: the partial term is given back.

Each step's ``forward_one_step`` delta must equal the change of that running bonus, and its
matched hotword the longest one ending at that token.
"""

from __future__ import annotations

import math
import random
import re
from pathlib import Path

import pytest

from zipasr.decode.hotwords import DEFAULT_HOTWORDS_SCORE, ContextGraph, Hotword, parse_hotwords
from zipasr.errors import ZipasrError

A, B, C, D, X = 1, 2, 3, 4, 5


# ---------------------------------------------------------------------------------------------
# Brute force
# ---------------------------------------------------------------------------------------------


def prefix_values(hotwords) -> dict[tuple[int, ...], float]:
    """V(p) for every non-empty prefix p of every hotword."""
    best: dict[tuple[int, ...], float] = {}
    for tokens, score in hotwords:
        tokens = tuple(tokens)
        for i in range(1, len(tokens) + 1):
            best[tokens[:i]] = max(best.get(tokens[:i], -math.inf), score)
    return {p: sum(best[p[:i]] for i in range(1, len(p) + 1)) for p in best}


def brute_force(hotwords, seq, strict: bool):
    """Running bonus and matched hotword after each token, and the kept total at the end."""
    value = prefix_values(hotwords)
    phrases = {tuple(t) for t, _ in hotwords}
    start, kept, steps = 0, 0.0, []
    for t in range(1, len(seq) + 1):
        text = tuple(seq[start:t])
        ending = [p for p in phrases if len(p) <= len(text) and text[len(text) - len(p):] == p]
        matched = max(ending, key=len) if ending else None
        if strict:
            kept += sum(value[p] for p in ending)
        elif matched is not None:
            kept += value[matched]
            start = t
        rest = tuple(seq[start:t])
        longest = next((rest[i:] for i in range(len(rest)) if rest[i:] in value), None)
        partial = value[longest] if longest is not None else 0.0
        steps.append((kept + partial, matched))
    return steps, kept


def run_graph(graph: ContextGraph, seq, strict: bool):
    state, running, steps = graph.root, 0.0, []
    for token in seq:
        delta, state, matched = graph.forward_one_step(state, token, strict=strict)
        assert isinstance(state, int)
        running += delta
        steps.append((running, matched))
    delta, state = graph.finalize(state)
    assert state == graph.root
    return steps, running + delta


def assert_same(hotwords, seq, strict: bool, graph: ContextGraph | None = None) -> None:
    graph = graph or ContextGraph(hotwords)
    got_steps, got_total = run_graph(graph, seq, strict)
    want_steps, want_total = brute_force(hotwords, seq, strict)
    ctx = (hotwords, seq, strict)
    assert [m for _, m in got_steps] == [m for _, m in want_steps], ctx
    assert [r for r, _ in got_steps] == pytest.approx([r for r, _ in want_steps]), ctx
    assert got_total == pytest.approx(want_total), ctx


# ---------------------------------------------------------------------------------------------
# Constructed cases, worked by hand
# ---------------------------------------------------------------------------------------------

# Shared prefix "a b" and "b c" a suffix of "a b c". Token bonuses: a = max(1, 2) = 2, a b = 2,
# a b c = 1, a b d = 2, b = 3, b c = 3; values: a b c = 5, a b d = 6, b c = 6.
SHARED = [((A, B, C), 1.0), ((A, B, D), 2.0), ((B, C), 3.0)]


def steps_of(graph, seq, strict=False):
    state, out = graph.root, []
    for t in seq:
        delta, state, matched = graph.forward_one_step(state, t, strict=strict)
        out.append((delta, matched))
    return out, state


def test_shared_prefix_partial_bonus_and_longest_match() -> None:
    g = ContextGraph(SHARED)
    steps, state = steps_of(g, [A, B, C])
    assert steps == [(2.0, None), (2.0, None), (1.0, (A, B, C))]  # a b c (5) beats b c (6)
    assert state == g.root
    steps, state = steps_of(g, [A, B, D])
    assert steps == [(2.0, None), (2.0, None), (2.0, (A, B, D))]
    steps, state = steps_of(g, [A, B])
    assert g.finalize(state) == (-4.0, g.root)  # the unfinished "a b" gives its 4 back


def test_failed_partial_match_gives_its_bonus_back() -> None:
    g = ContextGraph(SHARED)
    steps, state = steps_of(g, [A, B, X])
    assert steps == [(2.0, None), (2.0, None), (-4.0, None)] and state == g.root
    # a b, then b: fails to the prefix "b" (3), then c completes "b c" (6)
    steps, state = steps_of(g, [A, B, B, C])
    assert steps == [(2.0, None), (2.0, None), (-1.0, None), (3.0, (B, C))]


def test_fail_link_from_a_b_into_b_c() -> None:
    g = ContextGraph([((A, B, D), 1.0), ((B, C), 2.0)])
    steps, state = steps_of(g, [A, B, C])
    # a (1), a b (2), then c: no "a b c", the fail link of "a b" is "b" -> "b c" (4)
    assert steps == [(1.0, None), (1.0, None), (2.0, (B, C))] and state == g.root


def test_output_link_matches_a_suffix_inside_a_longer_hotword() -> None:
    g = ContextGraph([((A, B, C, D), 1.0), ((B, C), 2.0)])
    # "a b c" is not a hotword end but "b c" ends there (output link): non-strict keeps b c (4)
    # and restarts, so "a b c d" is never completed
    steps, _ = steps_of(g, [A, B, C, D])
    assert steps == [(1.0, None), (1.0, None), (2.0, (B, C)), (0.0, None)]
    # strict: b c counts at c and matching goes on to complete a b c d (4)
    steps, state = steps_of(g, [A, B, C, D], strict=True)
    assert steps == [(1.0, None), (1.0, None), (1.0 + 4.0, (B, C)), (1.0 + 4.0, (A, B, C, D))]
    assert g.finalize(state) == (-4.0, g.root)  # total 12 - 4 = 8 = b c + a b c d


def test_shared_prefix_bonus_reaches_descendants() -> None:
    """A later, shorter hotword raising a shared prefix's bonus changes its descendants' values
    too (icefall updates only the shared nodes, so strict totals there drift)."""
    g = ContextGraph([((A, B, C), 1.0), ((A, B), 2.0)])
    assert run_graph(g, [A, B, C], strict=True)[1] == pytest.approx(4.0 + 5.0)
    assert_same([((A, B, C), 1.0), ((A, B), 2.0)], [A, B, C, A, B, X], strict=True)


def test_index_like_tokens() -> None:
    """A token that hashes unlike its int (a tensor) still steps by its value."""

    class Token:
        def __init__(self, value: int) -> None:
            self.value = value

        def __index__(self) -> int:
            return self.value

    g = ContextGraph(SHARED)
    _, state, _ = g.forward_one_step(g.root, Token(A))
    assert g.forward_one_step(state, Token(B)) == (2.0, g.forward_one_step(state, B)[1], None)


def test_empty_graph_and_bad_hotwords() -> None:
    g = ContextGraph([])
    assert g.forward_one_step(g.root, A) == (0.0, g.root, None)
    assert g.finalize(g.root) == (0.0, g.root)
    with pytest.raises(ZipasrError, match="hotword 1"):
        ContextGraph([((A,), 1.0), ((), 1.0)])
    with pytest.raises(ZipasrError, match="hotword 0"):
        ContextGraph([((A, -1), 1.0)])
    with pytest.raises(ZipasrError, match="ints"):
        ContextGraph([((A, 1.5), 1.0)])
    with pytest.raises(ZipasrError, match="finite"):
        ContextGraph([((A,), math.nan)])


# icefall's context_graph.py self-test: its hotwords and expected totals (score per token 1, and
# 5 / len(phrase) rounded to 2 places per hotword).
ICEFALL_PHRASES = ["S", "HE", "SHE", "SHELL", "HIS", "HERS", "HELLO", "THIS", "THEM"]
ICEFALL_TOTALS = {
    # query: (strict, non-strict) with score 1; (strict, non-strict) with per-phrase scores
    "HEHERSHE": (14, 7, 35.84, 20),
    "HERSHE": (12, 5, 30.84, 15),
    "HISHE": (9, 5, 24.18, 10.84),
    "SHED": (6, 3, 18.34, 10),
    "SHELF": (6, 3, 18.34, 10),
    "HELL": (2, 2, 5, 5),
    "HELLO": (7, 2, 13, 5),
    "DHRHISQ": (4, 3, 10.84, 5.84),
    "THEN": (2, 2, 5, 5),
}


@pytest.mark.parametrize("custom", [False, True])
def test_icefall_expected_totals(custom: bool) -> None:
    hotwords = [(tuple(map(ord, p)), round(5 / len(p), 2) if custom else 1.0)
                for p in ICEFALL_PHRASES]
    g = ContextGraph(hotwords)
    for query, totals in ICEFALL_TOTALS.items():
        want_strict, want_loose = totals[2:] if custom else totals[:2]
        seq = list(map(ord, query))
        assert round(run_graph(g, seq, strict=True)[1], 2) == want_strict, query
        assert round(run_graph(g, seq, strict=False)[1], 2) == want_loose, query
        assert_same(hotwords, seq, strict=True, graph=g)
        assert_same(hotwords, seq, strict=False, graph=g)


def test_random_graphs_match_brute_force() -> None:
    rng = random.Random(0)
    for _ in range(150):
        hotwords = [(tuple(rng.randint(1, 4) for _ in range(rng.randint(1, 4))),
                     rng.choice([0.5, 1.0, 1.5, 2.0, 3.0])) for _ in range(rng.randint(1, 5))]
        g = ContextGraph(hotwords)  # reused: its memoised transitions are checked too
        for _ in range(8):
            seq = [rng.randint(1, 5) for _ in range(rng.randint(0, 14))]
            assert_same(hotwords, seq, strict=False, graph=g)
            assert_same(hotwords, seq, strict=True, graph=g)


# ---------------------------------------------------------------------------------------------
# sherpa-onnx hotwords file
# ---------------------------------------------------------------------------------------------

WORDS = ("ALPHA BRAVO CHARLIE DELTA ECHO FOXTROT GOLF HOTEL INDIA JULIET KILO LIMA MIKE "
         "NOVEMBER OSCAR PAPA QUEBEC ROMEO SIERRA TANGO IT'S").split()


def _bpe(root: Path, upper: bool):
    import sentencepiece as spm

    from zipasr.lang.bpe import train_bpe

    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(6)) for _ in range(200)]
    text = root / "text.txt"
    text.write_text("\n".join(s if upper else s.lower() for s in lines) + "\n")
    model = train_bpe(text, root / "lang", 40)
    return spm.SentencePieceProcessor(model_file=str(model))


@pytest.fixture(scope="module")
def sp(tmp_path_factory):
    return _bpe(tmp_path_factory.mktemp("bpe_upper"), upper=True)


GOOD = ["ALPHA BRAVO", "  charlie   delta :3.5", "", "   \t", "It's :0"]


def test_parse_good_file(sp, tmp_path: Path) -> None:
    path = tmp_path / "hotwords.txt"
    path.write_text("\n".join(GOOD) + "\n")
    got = parse_hotwords(path, sp, default_score=2.25)
    assert got == parse_hotwords(str(path), sp, 2.25) == parse_hotwords(GOOD, sp, 2.25)
    # sherpa-onnx encodes each word on its own; lowercase input reaches the uppercase model
    assert [sp.decode(list(h.tokens)) for h in got] == [
        "ALPHA BRAVO", "CHARLIE DELTA", "IT'S"]
    assert got[1].tokens == tuple(sp.encode("CHARLIE") + sp.encode("DELTA"))
    assert [h.score for h in got] == [2.25, 3.5, 2.25]  # ":0" is the default, as sherpa
    assert all(isinstance(h, Hotword) for h in got)
    assert parse_hotwords(["ECHO"], sp)[0].score == DEFAULT_HOTWORDS_SCORE == 1.5


def test_parse_lowercase_model(tmp_path: Path) -> None:
    lower = _bpe(tmp_path, upper=False)
    (hw,) = parse_hotwords(["Golf HOTEL"], lower)
    assert lower.decode(list(hw.tokens)) == "golf hotel"


@pytest.mark.parametrize("bad, message", [
    (":3.5", "line 2: a score without a phrase"),
    ("ALPHA :abc", "line 2: cannot read the score ':abc'"),
    ("ALPHA :", "line 2: cannot read the score ':'"),
    ("ALPHA :nan", "line 2: the score ':nan' is not a finite"),
    ("ALPHA :2 BRAVO", "line 2: the score must come after the phrase"),
    ("ALPHA :2 :3", "line 2: more than one score"),
    ("ZULU", "line 2: the BPE model cannot spell 'ZULU'"),
    ("KILO:2", "line 2: the BPE model cannot spell 'KILO:2'"),  # the score needs a space
])
def test_parse_bad_lines(sp, tmp_path: Path, bad: str, message: str) -> None:
    path = tmp_path / "hotwords.txt"
    path.write_text(f"ECHO\n{bad}\nGOLF\n")
    with pytest.raises(ZipasrError, match=re.escape(f"hotwords file {path} {message}")):
        parse_hotwords(path, sp)


def test_parse_missing_file(sp, tmp_path: Path) -> None:
    with pytest.raises(ZipasrError, match="cannot read the hotwords file"):
        parse_hotwords(tmp_path / "nope.txt", sp)
    with pytest.raises(ZipasrError, match="finite"):
        parse_hotwords(["ECHO"], sp, default_score=math.inf)
