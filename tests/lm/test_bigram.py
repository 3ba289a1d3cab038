"""The Kneser-Ney token bigram: values by hand, normalisation, ARPA round trip, and icefall's
LODR scoring rule (the better of the listed bigram and the backoff path) on a hand-made ARPA."""

from __future__ import annotations

import math
import random
from fractions import Fraction as F
from pathlib import Path

import pytest
import torch

from zipasr.errors import ZipasrError
from zipasr.lm.bigram import Arpa, estimate_kn, parse_arpa, read_arpa, write_arpa

PIECES = ["<blk>", "<sos/eos>", "<unk>", "a", "b", "c"]
IDS = {p: i for i, p in enumerate(PIECES)}


def _p(arpa: Arpa, h: str, w: str) -> float:
    """ARPA's rule, spelled out: the listed bigram, else backoff(h) * p(w)."""
    if (h, w) in arpa.bigrams:
        return 10.0 ** arpa.bigrams[(h, w)]
    return 10.0 ** arpa.unigrams[h][1] * 10.0 ** arpa.unigrams[w][0]


def test_kneser_ney_by_hand() -> None:
    # <s> a b </s> | <s> a b c </s> | <s> b c </s>
    arpa = estimate_kn([[3, 4], [3, 4, 5], [4, 5]], PIECES)
    # bigram types: 2 seen once (<s> b, b </s>), 4 seen twice: D2 = 2 / (2 + 2 * 4)
    d2 = F(1, 5)
    # continuation counts N(. w): a 1, b 2, c 1, </s> 2 (6 types); counts-of-counts 2 and 2:
    # D1 = 2 / (2 + 2 * 2); 4 words seen, 5 scored words (<unk> a b c </s>)
    d1 = F(1, 3)
    floor = d1 * 4 / 6 / 5
    p1 = {"<unk>": floor, "a": (1 - d1) / 6 + floor, "b": (2 - d1) / 6 + floor,
          "c": (1 - d1) / 6 + floor, "</s>": (2 - d1) / 6 + floor}
    assert p1["a"] == F(7, 45) and p1["b"] == F(29, 90) and sum(p1.values()) == 1
    # backoff weights D2 * types(h) / c(h): <s> 2/3, a 1/2, b 2/3, c 1/2
    gamma = {"<s>": d2 * 2 / 3, "a": d2 / 2, "b": d2 * 2 / 3, "c": d2 / 2}
    listed = {("<s>", "a"): (2 - d2) / 3 + gamma["<s>"] * p1["a"],
              ("<s>", "b"): (1 - d2) / 3 + gamma["<s>"] * p1["b"],
              ("a", "b"): (2 - d2) / 2 + gamma["a"] * p1["b"],
              ("b", "</s>"): (1 - d2) / 3 + gamma["b"] * p1["</s>"],
              ("b", "c"): (2 - d2) / 3 + gamma["b"] * p1["c"],
              ("c", "</s>"): (2 - d2) / 2 + gamma["c"] * p1["</s>"]}
    assert set(arpa.bigrams) == set(listed)
    for key, p in listed.items():
        assert arpa.bigrams[key] == pytest.approx(math.log10(p), abs=1e-12), key
    for w, p in p1.items():
        assert arpa.unigrams[w][0] == pytest.approx(math.log10(p), abs=1e-12), w
    for h, g in gamma.items():
        assert arpa.unigrams[h][1] == pytest.approx(math.log10(g), abs=1e-12), h
    assert arpa.unigrams["<unk>"][1] == 0.0 and arpa.unigrams["<s>"][0] == -99.0
    assert _p(arpa, "<s>", "c") == pytest.approx(float(gamma["<s>"] * p1["c"]), rel=1e-12)


def _random_corpus(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.choice([3, 4, 5, 6, 7, 8]) for _ in range(rng.randint(1, 6))] for _ in range(n)]


PIECES8 = [*PIECES, "d", "e", "f"]


def test_every_history_sums_to_one_and_round_trips(tmp_path: Path) -> None:
    arpa = estimate_kn(_random_corpus(40, 0), PIECES8)
    path = tmp_path / "lm.arpa"
    write_arpa(arpa, path)
    back = parse_arpa(path)
    assert set(back.unigrams) == set(arpa.unigrams) and set(back.bigrams) == set(arpa.bigrams)
    for w, (p, b) in arpa.unigrams.items():
        assert back.unigrams[w] == pytest.approx((p, b), abs=1e-7)
    for k, p in arpa.bigrams.items():
        assert back.bigrams[k] == pytest.approx(p, abs=1e-7)
    words = [*PIECES8[2:], "</s>"]
    for model, tol in ((arpa, 1e-12), (back, 1e-6)):
        for h in ["<s>", *PIECES8[2:]]:
            assert math.fsum(_p(model, h, w) for w in words) == pytest.approx(1.0, abs=tol), h
        assert all(_p(model, h, w) > 0 for h in ["<s>", *PIECES8[2:]] for w in words)


def test_dense_tables_follow_the_arpa(tmp_path: Path) -> None:
    arpa = estimate_kn(_random_corpus(40, 1), PIECES8)
    write_arpa(arpa, tmp_path / "lm.arpa")
    ids = {p: i for i, p in enumerate(PIECES8)}
    lm = read_arpa(tmp_path / "lm.arpa", piece_to_id=ids, dtype=torch.float64)
    back = parse_arpa(tmp_path / "lm.arpa")
    assert lm.log_probs.shape == (9, 9) and lm.start_state == 1
    for h in ["<s>", *PIECES8[2:]]:
        row = 1 if h == "<s>" else ids[h]
        for w in PIECES8[2:]:
            assert float(lm.log_probs[row, ids[w]]) == pytest.approx(
                math.log(_p(back, h, w)), abs=1e-12)
        assert float(lm.eos_log_probs[row]) == pytest.approx(math.log(_p(back, h, "</s>")),
                                                             abs=1e-12)
    assert (lm.log_probs[:, :2] == -math.inf).all() and lm.log_probs[:, 2:].isfinite().all()
    # row 0: the null history (unigrams)
    assert float(lm.log_probs[0, ids["d"]]) == pytest.approx(
        back.unigrams["d"][0] * math.log(10), abs=1e-12)
    # vectorised calls and whole sentences
    prev, tok = torch.tensor([1, 3, 8]), torch.tensor([4, 4, 2])
    torch.testing.assert_close(lm.log_prob(prev, tok), lm.log_probs[prev, tok])
    assert torch.equal(lm.next_state(tok), tok)
    want = math.log(_p(back, "<s>", "a") * _p(back, "a", "f") * _p(back, "f", "</s>"))
    got = lm.sentence_log_probs([[3, 8], [5]])
    assert float(got[0]) == pytest.approx(want, abs=1e-12) and got.shape == (2,)


HAND_ARPA = """
\\data\\
ngram 1=5
ngram 2=3

\\1-grams:
-99\t<s>\t-0.1
-0.5\ta\t-0.2
-0.6\tb
-0.9\t</s>
-1.0\t<unk>

\\2-grams:
-2.0\ta b
-0.3\t<s> a
-1.5\ta </s>

\\end\\
"""


def test_backoff_path_beats_a_listed_bigram(tmp_path: Path, caplog) -> None:
    path = tmp_path / "hand.arpa"
    path.write_text(HAND_ARPA)
    ids = {"<blk>": 0, "<sos/eos>": 1, "<unk>": 2, "a": 3, "b": 4, "c": 5}
    lm = read_arpa(path, piece_to_id=ids, dtype=torch.float64)
    ln10 = math.log(10)

    def lp(h: int, w: int) -> float:
        return float(lm.log_prob(torch.tensor([h]), torch.tensor([w]))[0])

    # listed p(b|a) = 10^-2, backoff(a) p(b) = 10^-0.8: the FST's cheaper path wins
    assert lp(3, 4) == pytest.approx(-0.8 * ln10, abs=1e-12)
    assert lp(1, 3) == pytest.approx(-0.3 * ln10, abs=1e-12)  # listed beats -0.1 - 0.5
    assert lp(1, 4) == pytest.approx(-0.7 * ln10, abs=1e-12)  # backoff from <s>
    assert lp(4, 3) == pytest.approx(-0.5 * ln10, abs=1e-12)  # b: no backoff weight (1)
    assert float(lm.eos_log_probs[3]) == pytest.approx(-1.1 * ln10, abs=1e-12)  # -0.2 - 0.9
    # "c" has no unigram: no arc in arpa2fst's FST, -inf as icefall's scorer; and a warning
    assert lp(3, 5) == -math.inf and "without a unigram" in caplog.text


def test_bad_arpa_files_are_clear_errors(tmp_path: Path) -> None:
    ids = {"<blk>": 0, "<sos/eos>": 1, "<unk>": 2, "a": 3, "b": 4}
    bad = tmp_path / "bad.arpa"
    bad.write_text(HAND_ARPA.replace("ngram 1=5", "ngram 1=6").replace(
        "-1.0\t<unk>", "-1.0\t<unk>\n-1.2\tzebra"))
    with pytest.raises(ZipasrError, match="'zebra' is not a piece of the BPE model"):
        read_arpa(bad, piece_to_id=ids)
    bad.write_text(HAND_ARPA.replace("ngram 2=3", "ngram 2=4"))
    with pytest.raises(ZipasrError, match="declares 4 2-grams, the file holds 3"):
        parse_arpa(bad)
    bad.write_text(HAND_ARPA.replace("ngram 2=3", "ngram 2=3\nngram 3=1"))
    with pytest.raises(ZipasrError, match="only unigram and bigram"):
        parse_arpa(bad)
    bad.write_text("hello\n")
    with pytest.raises(ZipasrError, match="not an ARPA"):
        parse_arpa(bad)
    with pytest.raises(ZipasrError, match="not tokens"):
        estimate_kn([[3, 1]], PIECES)
