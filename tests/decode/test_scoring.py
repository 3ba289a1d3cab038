"""WER scoring: counts, alignment display and icefall's file layout on hand-checked examples;
agreement with kaldialign.edit_distance on random pairs; the WER table."""

from __future__ import annotations

import random
from pathlib import Path

import kaldialign
import pytest

from zipasr.decode.names import (
    model_name,
    parse_result_file,
    result_file,
    result_key,
    sibling_result_files,
    split_result_name,
)
from zipasr.decode.scoring import (
    error_stats,
    format_alignment,
    format_wer_table,
    read_recogs,
    read_wer_summaries,
    save_results,
)
from zipasr.errors import ZipasrError

RESULTS = [
    ("u1", "THE CAT SAT ON THE MAT".split(), "THE CAT SAT ON MAT".split()),  # 1 del
    ("u2", "A B C".split(), "A X C D".split()),  # 1 sub, 1 ins
    ("u3", "HELLO WORLD".split(), []),  # 2 del
    ("u0", ["YES"], ["YES"]),
]


def test_counts_by_hand() -> None:
    st = error_stats(RESULTS)
    assert (st.ins, st.dels, st.subs, st.corr, st.ref_len) == (1, 3, 1, 8, 12)
    assert st.wer == 41.67  # 100 * 5 / 12
    assert dict(st.sub_pairs) == {("B", "X"): 1}
    assert dict(st.del_words) == {"THE": 1, "HELLO": 1, "WORLD": 1}
    assert dict(st.ins_words) == {"D": 1}
    assert st.words["THE"] == [1, 0, 0, 0, 1]
    assert st.words["B"] == [0, 1, 0, 0, 0] and st.words["X"] == [0, 0, 1, 0, 0]


def test_alignment_display() -> None:
    assert format_alignment("A B C".split(), "A X C D".split()) == "A (B->X) C (*->D)"
    # consecutive errors merge into one bracket
    assert format_alignment("A B C D".split(), "A X Y D E".split()) == "A (B C->X Y) D (*->E)"
    assert format_alignment(["HELLO", "WORLD"], []) == "(HELLO WORLD->*)"
    assert format_alignment([], ["UH"]) == "(*->UH)"


def test_files(tmp_path: Path) -> None:
    st = save_results(tmp_path, "test-clean", "greedy_search", RESULTS, suffix="epoch-3_avg-2")
    name = "test-clean-greedy_search-epoch-3_avg-2"
    recogs = (tmp_path / f"recogs-{name}.txt").read_text().splitlines()
    assert recogs[:2] == ["u0:\tref=['YES']", "u0:\thyp=['YES']"]  # sorted by cut id
    assert recogs[4:6] == ["u2:\tref=['A', 'B', 'C']", "u2:\thyp=['A', 'X', 'C', 'D']"]
    assert read_recogs(tmp_path / f"recogs-{name}.txt") == sorted(RESULTS)

    errs = (tmp_path / f"errs-{name}.txt").read_text().splitlines()
    assert errs[0] == "%WER = 41.67"
    assert errs[1] == ("Errors: 1 insertions, 3 deletions, 1 substitutions, over 12 reference "
                       "words (8 correct)")

    def section(title: str) -> list[str]:
        i = next(k for k, line in enumerate(errs) if line.startswith(title))
        j = next((k for k in range(i + 1, len(errs)) if not errs[k]), len(errs))
        return errs[i + 1:j]

    assert section("PER-UTT DETAILS") == [
        "u0:\tYES", "u1:\tTHE CAT SAT ON (THE->*) MAT", "u2:\tA (B->X) C (*->D)",
        "u3:\t(HELLO WORLD->*)"]
    assert section("SUBSTITUTIONS") == ["1   B -> X"]
    assert section("DELETIONS") == ["1   WORLD", "1   THE", "1   HELLO"]
    assert section("INSERTIONS") == ["1   D"]
    # word corr tot_errs count_in_ref count_in_hyp; by errors, then word, descending
    assert section("PER-WORD STATS") == [
        "X   0 1 0 1", "WORLD   0 1 1 0", "THE   1 1 2 1", "HELLO   0 1 1 0", "D   0 1 0 1",
        "B   0 1 1 0", "YES   1 0 1 1", "SAT   1 0 1 1", "ON   1 0 1 1", "MAT   1 0 1 1",
        "CAT   1 0 1 1", "C   1 0 1 1", "A   1 0 1 1"]
    assert (tmp_path / f"wer-summary-{name}.txt").read_text() == (
        "settings\tWER\ngreedy_search\t41.67\n")
    assert st.wer == 41.67
    assert not list(tmp_path.glob(".*partial*"))


def test_agrees_with_kaldialign_edit_distance() -> None:
    rng = random.Random(0)
    vocab = ["A", "B", "C", "D"]
    results = []
    for i in range(200):
        ref = [rng.choice(vocab) for _ in range(rng.randint(1, 8))]
        hyp = [rng.choice(vocab) for _ in range(rng.randint(0, 8))]
        results.append((f"u{i}", ref, hyp))
        st1 = error_stats([results[-1]])
        ed = kaldialign.edit_distance(ref, hyp)
        assert (st1.ins, st1.dels, st1.subs) == (ed["ins"], ed["del"], ed["sub"])
    st = error_stats(results)
    total = sum(kaldialign.edit_distance(r, h)["total"] for _, r, h in results)
    assert st.errors == total
    assert st.wer == pytest.approx(round(100 * total / sum(len(r) for _, r, _ in results), 2))


def test_empty_reference() -> None:
    st = error_stats([("u", [], ["UH"])])
    assert (st.ins, st.ref_len, st.wer) == (1, 0, 0.0)


def test_result_names() -> None:
    """The names the rules declare and `zipasr decode` writes (one implementation)."""
    assert model_name(30, 9, True) == "epoch-30_avg-9_use-averaged-model"
    assert model_name(1, 1, False) == "epoch-1_avg-1"
    assert model_name(2, 1, True, 1000) == "epoch-2_last-1000-batches_use-averaged-model"
    assert result_key("greedy_search", 4) == "greedy_search"
    assert result_key("modified_beam_search", 2) == "modified_beam_search_beam-size-2"
    assert result_file("errs", "test-clean", "greedy_search", "epoch-1_avg-1") == (
        "errs-test-clean-greedy_search-epoch-1_avg-1.txt")
    assert result_file("wer-summary", "{part}", "{key}") == "wer-summary-{part}-{key}.txt"
    with pytest.raises(ValueError, match="kind"):
        result_file("wer", "test", "greedy_search")
    assert parse_result_file("wer-summary-dev-greedy_search.txt") == (
        "wer-summary", "dev-greedy_search")
    assert sibling_result_files("errs-dev-greedy_search.txt") == [
        "recogs-dev-greedy_search.txt", "errs-dev-greedy_search.txt",
        "wer-summary-dev-greedy_search.txt"]
    with pytest.raises(ValueError, match="is not named"):
        parse_result_file("wer-dev-greedy_search.txt")
    key = "modified_beam_search_beam-size-4"
    assert split_result_name(f"test-clean-{key}-epoch-1_avg-1", key) == (
        "test-clean", f"{key}-epoch-1_avg-1")
    assert split_result_name(f"dev-{key}", key) == ("dev", key)


def test_wer_table(tmp_path: Path) -> None:
    results = [("u", ["A", "B"], ["A", "C"])]  # 50 %
    save_results(tmp_path / "greedy", "test-clean", "greedy_search", results)
    save_results(tmp_path / "greedy", "test-other", "greedy_search", [
        ("u", ["A", "B", "C", "D"], ["A", "B", "C", "D"])])
    beam4 = "modified_beam_search_beam-size-4"
    save_results(tmp_path / "beam", "test-clean", beam4,
                 [("u", ["A", "B", "C", "D"], ["A", "B", "C"])])
    # an older decoding left on disk: not among the files given, so not in the table
    save_results(tmp_path / "beam", "test-clean", "modified_beam_search_beam-size-2", results)
    files = [tmp_path / "greedy" / "wer-summary-test-clean-greedy_search.txt",
             tmp_path / "beam" / f"wer-summary-test-clean-{beam4}.txt",
             tmp_path / "greedy" / "wer-summary-test-other-greedy_search.txt"]
    rows = read_wer_summaries(files)
    assert rows == [("test-clean", "greedy_search", 50.0),
                    ("test-clean", beam4, 25.0),
                    ("test-other", "greedy_search", 0.0)]
    table = format_wer_table(rows)
    assert table == (f"test_set\tgreedy_search\t{beam4}\n"
                     "test-clean\t50.00\t25.00\n"
                     "test-other\t0.00\t-\n")
    # a suffix (the averaged model's name) stays in the column name
    save_results(tmp_path / "avg", "dev", "greedy_search", results, suffix="epoch-1_avg-1")
    assert read_wer_summaries([tmp_path / "avg" / "wer-summary-dev-greedy_search-epoch-1_avg-1"
                               ".txt"]) == [("dev", "greedy_search-epoch-1_avg-1", 50.0)]


def test_wer_table_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ZipasrError, match="does not exist"):
        read_wer_summaries([tmp_path / "wer-summary-test-greedy_search.txt"])
    save_results(tmp_path / "a", "test", "greedy_search", [("u", ["A"], ["A"])])
    with pytest.raises(ZipasrError, match=r"not a wer-summary file \(errs\)"):
        read_wer_summaries([tmp_path / "a" / "errs-test-greedy_search.txt"])
    other = tmp_path / "summary.txt"
    other.write_text("settings\tWER\ngreedy_search\t1.00\n")
    with pytest.raises(ZipasrError, match="is not named"):
        read_wer_summaries([other])
    bad = tmp_path / "wer-summary-test-greedy_search.txt"
    bad.write_text("greedy_search\t1.00\n")
    with pytest.raises(ZipasrError, match="not a wer-summary file"):
        read_wer_summaries([bad])
    # the same cell from two directories: an error, not a silently dropped result
    save_results(tmp_path / "b", "test", "greedy_search", [("u", ["A"], ["B"])])
    with pytest.raises(ZipasrError, match="in both"):
        read_wer_summaries([tmp_path / d / "wer-summary-test-greedy_search.txt"
                            for d in ("a", "b")])
