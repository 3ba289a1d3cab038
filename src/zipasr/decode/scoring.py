"""WER scoring with kaldialign and icefall-style result files.

For a test set and a result key (e.g. ``greedy_search``), :func:`save_results` writes into the
result dir:

* ``recogs-{name}.txt``: per cut (sorted by id) ``{id}:\\tref=[...]`` and ``{id}:\\thyp=[...]``
  (the word lists as Python lists, like icefall's ``store_transcripts``);
* ``errs-{name}.txt``: ``%WER = x.xx``, the error counts, then the sections PER-UTT DETAILS
  (``(ref->hyp)`` markers, consecutive errors merged), SUBSTITUTIONS, DELETIONS, INSERTIONS
  and PER-WORD STATS (icefall's ``write_error_stats``);
* ``wer-summary-{name}.txt``: ``settings\\tWER`` and one ``{key}\\t{wer}`` line;

where ``name`` is ``{test_set}-{key}`` or ``{test_set}-{key}-{suffix}`` (built by
:mod:`zipasr.decode.names`). :func:`read_wer_summaries` and :func:`format_wer_table` turn given
wer-summary files into the WER table.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import kaldialign

from zipasr.decode.names import parse_result_file, result_file, split_result_name
from zipasr.errors import ZipasrError
from zipasr.io import atomic_path

log = logging.getLogger(__name__)

ERR = "*"  # the gap symbol in alignments

# (cut id, reference words, hypothesis words)
Result = tuple[str, list[str], list[str]]


@dataclass
class ErrorStats:
    """Counts over a set of results. ``words[w] = [corr, ref_sub, hyp_sub, ins, del]``."""

    ins: int = 0
    dels: int = 0
    subs: int = 0
    corr: int = 0
    ref_len: int = 0
    sub_pairs: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))
    ins_words: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    del_words: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    words: dict[str, list[int]] = field(default_factory=lambda: defaultdict(lambda: [0] * 5))

    @property
    def errors(self) -> int:
        return self.ins + self.dels + self.subs

    @property
    def wer(self) -> float:
        """WER in percent, rounded to 2 decimals like icefall's summary (0 for no ref words)."""
        return round(100.0 * self.errors / self.ref_len, 2) if self.ref_len else 0.0


def error_stats(results: Sequence[Result]) -> ErrorStats:
    """Align every (ref, hyp) pair with kaldialign and accumulate the counts."""
    st = ErrorStats()
    for _, ref, hyp in results:
        st.ref_len += len(ref)
        for r, h in kaldialign.align(ref, hyp, ERR):
            if r == ERR:
                st.ins += 1
                st.ins_words[h] += 1
                st.words[h][3] += 1
            elif h == ERR:
                st.dels += 1
                st.del_words[r] += 1
                st.words[r][4] += 1
            elif r != h:
                st.subs += 1
                st.sub_pairs[(r, h)] += 1
                st.words[r][1] += 1
                st.words[h][2] += 1
            else:
                st.corr += 1
                st.words[r][0] += 1
    return st


def merge_errors(ali: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Merge runs of consecutive errors into one ``(ref words -> hyp words)`` pair, gaps
    dropped (``*`` when a side is empty), as icefall's PER-UTT DETAILS shows them."""
    out: list[tuple[list[str], list[str]]] = []
    in_err = False
    for r, h in ali:
        if r == h:
            out.append(([r], [h]))
            in_err = False
            continue
        if not in_err:
            out.append(([], []))
            in_err = True
        if r != ERR:
            out[-1][0].append(r)
        if h != ERR:
            out[-1][1].append(h)
    return [(" ".join(r) or ERR, " ".join(h) or ERR) for r, h in out]


def format_alignment(ref: list[str], hyp: list[str]) -> str:
    """``A (B->C) D (E->*)``: correct words as is, errors as (ref->hyp)."""
    ali = merge_errors(kaldialign.align(ref, hyp, ERR))
    return " ".join(r if r == h else f"({r}->{h})" for r, h in ali)


def write_recogs(path: Path, results: Sequence[Result]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        for cut_id, ref, hyp in sorted(results):
            f.write(f"{cut_id}:\tref={ref}\n{cut_id}:\thyp={hyp}\n")


def write_error_stats(path: Path, results: Sequence[Result]) -> ErrorStats:
    """Write the ``errs-*`` file; returns the stats (``.wer`` in percent)."""
    results = sorted(results)
    st = error_stats(results)
    lines = [
        f"%WER = {st.wer:.2f}",
        f"Errors: {st.ins} insertions, {st.dels} deletions, {st.subs} substitutions, over "
        f"{st.ref_len} reference words ({st.corr} correct)",
        "Search below for sections starting with PER-UTT DETAILS:, SUBSTITUTIONS:, "
        "DELETIONS:, INSERTIONS:, PER-WORD STATS:",
        "",
        "PER-UTT DETAILS: corr or (ref->hyp)  ",
    ]
    lines += [f"{cut_id}:\t{format_alignment(ref, hyp)}" for cut_id, ref, hyp in results]
    lines += ["", "SUBSTITUTIONS: count ref -> hyp"]
    lines += [f"{c}   {r} -> {h}"
              for c, (r, h) in sorted(((c, k) for k, c in st.sub_pairs.items()), reverse=True)]
    lines += ["", "DELETIONS: count ref"]
    lines += [f"{c}   {w}" for c, w in sorted(((c, w) for w, c in st.del_words.items()),
                                              reverse=True)]
    lines += ["", "INSERTIONS: count hyp"]
    lines += [f"{c}   {w}" for c, w in sorted(((c, w) for w, c in st.ins_words.items()),
                                              reverse=True)]
    lines += ["", "PER-WORD STATS: word  corr tot_errs count_in_ref count_in_hyp"]
    for _, w, (corr, ref_sub, hyp_sub, ins, dels) in sorted(
            ((sum(v[1:]), w, v) for w, v in st.words.items()), reverse=True):
        lines.append(f"{w}   {corr} {ref_sub + hyp_sub + ins + dels} "
                     f"{corr + ref_sub + dels} {corr + hyp_sub + ins}")
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return st


def write_wer_summary(path: Path, wers: dict[str, float]) -> None:
    """``settings\\tWER`` then ``key\\twer`` lines, best first (icefall's wer-summary)."""
    body = "".join(f"{k}\t{v:.2f}\n" for k, v in sorted(wers.items(), key=lambda kv: kv[1]))
    with atomic_path(path) as tmp:
        tmp.write_text("settings\tWER\n" + body)


def save_results(result_dir: Path, test_set: str, key: str, results: Sequence[Result],
                 suffix: str | None = None) -> ErrorStats:
    """Write the recogs, errs and wer-summary files of one test set and key."""
    result_dir = Path(result_dir)
    write_recogs(result_dir / result_file("recogs", test_set, key, suffix), results)
    st = write_error_stats(result_dir / result_file("errs", test_set, key, suffix), results)
    write_wer_summary(result_dir / result_file("wer-summary", test_set, key, suffix),
                      {key: st.wer})
    log.info("[%s-%s] %%WER %.2f%% [%d / %d, %d ins, %d del, %d sub]", test_set, key, st.wer,
             st.errors, st.ref_len, st.ins, st.dels, st.subs)
    return st


def read_recogs(path: Path) -> list[Result]:
    """Parse a ``recogs-*`` file back into (id, ref, hyp) triples."""
    import ast

    refs: dict[str, list[str]] = {}
    hyps: dict[str, list[str]] = {}
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        cut_id, rest = line.split(":\t", 1)
        kind, value = rest.split("=", 1)
        (refs if kind == "ref" else hyps)[cut_id] = ast.literal_eval(value)
    return [(k, refs[k], hyps.get(k, [])) for k in sorted(refs)]


def read_wer_summaries(paths: Sequence[str | Path]) -> list[tuple[str, str, float]]:
    """(test set, setting, WER) from the given ``wer-summary-*.txt`` files, in their order.

    Exactly these files, never a directory search: the WER table must show the results the
    current configuration asked for, not whatever older decodings left on disk. The file name
    is ``wer-summary-{test_set}-{key}[-{suffix}].txt`` and the file holds ``key\\twer`` lines;
    the setting (the table's column) is ``key[-suffix]``.
    """
    rows: list[tuple[str, str, float]] = []
    seen: dict[tuple[str, str], Path] = {}
    for p in dict.fromkeys(Path(x) for x in paths):
        if not p.is_file():
            raise ZipasrError(f"wer-summary file {p} does not exist")
        try:
            kind, name = parse_result_file(p.name)
        except ValueError as e:
            raise ZipasrError(str(e)) from None
        if kind != "wer-summary":
            raise ZipasrError(f"{p} is not a wer-summary file ({kind})")
        lines = p.read_text().splitlines()
        if not lines or lines[0].split("\t") != ["settings", "WER"]:
            raise ZipasrError(f"{p} is not a wer-summary file")
        for line in lines[1:]:
            if not line.strip():
                continue
            key, wer = line.split("\t")
            test_set, setting = split_result_name(name, key)
            if (test_set, setting) in seen:
                # two directories with the same names: a table cell would silently be lost
                raise ZipasrError(f"{test_set} {setting}: in both {seen[test_set, setting]} "
                                  f"and {p}")
            seen[test_set, setting] = p
            rows.append((test_set, setting, float(wer)))
    return rows


def format_wer_table(rows: Sequence[tuple[str, str, float]]) -> str:
    """TSV: one row per test set, one column per setting (method [+ suffix]), both in their
    order of first appearance; ``-`` for a missing cell."""
    test_sets = list(dict.fromkeys(r[0] for r in rows))
    settings = list(dict.fromkeys(r[1] for r in rows))
    wer = {(t, s): w for t, s, w in rows}
    lines = ["test_set\t" + "\t".join(settings)]
    for t in test_sets:
        cells = [f"{wer[(t, s)]:.2f}" if (t, s) in wer else "-" for s in settings]
        lines.append(t + "\t" + "\t".join(cells))
    return "\n".join(lines) + "\n"
