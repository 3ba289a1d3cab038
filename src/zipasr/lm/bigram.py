"""A backoff bigram over BPE tokens: Kneser-Ney estimation, ARPA files, dense scoring tables.

Estimation (:func:`estimate_kn`) is interpolated Kneser-Ney with one absolute discount per order,
``D = n1 / (n1 + 2 n2)`` (n_k: the number of n-gram types seen k times; not modified KN's three
discounts). Sentences are ``<s> t1 .. tn </s>``. The unigram level uses continuation counts
(how many distinct tokens precede w) and is itself interpolated with a uniform distribution over
every token but ``<blk>`` and ``<sos/eos>`` (plus ``</s>``), so no token is ever impossible:

    p1(w)   = (N(. w) - D1) / N(. .) + D1 * |{w: N(. w) > 0}| / N(. .) / |vocab|
    p2(w|h) = (c(h w) - D2) / c(h)   + D2 * |{w: c(h w) > 0}| / c(h) * p1(w)

Written as ARPA (log10; words are the sentencepiece pieces, ``<s>``, ``</s>``), each seen bigram
is listed with its interpolated probability and each history's backoff weight is
``D2 * |{w: c(h w) > 0}| / c(h)``, which makes every history's distribution sum to one.

Reading (:func:`read_arpa`) accepts any bigram ARPA over the same pieces (a kenlm
``lmplz -o 2`` file too) and gives :class:`BigramLm`: dense natural-log tables indexed by token id.
Scores follow icefall's LODR scorer on the FST that arpa2fst makes of the file: the score of w
after h is ``ln max(p(w|h) if the bigram is listed, backoff(h) * p(w))`` (the FST offers both
paths and the scorer keeps the cheaper one), and the state after w is w. For a Kneser-Ney file the
listed value is never below the backoff path, so this equals the ARPA probability.
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from zipasr.errors import ZipasrError
from zipasr.io import atomic_path

log = logging.getLogger(__name__)

BOS, EOS = "<s>", "</s>"
NEVER = -99.0  # log10 "probability" of <s> as a unigram (it is only ever a history), as kenlm
DISCOUNT_FALLBACK = 0.5  # when counts-of-counts give no usable discount (tiny corpora)
LN10 = math.log(10.0)


@dataclass
class Arpa:
    """A bigram ARPA model in memory, log10 values keyed by words."""

    unigrams: dict[str, tuple[float, float]] = field(default_factory=dict)  # w: (log p, log bow)
    bigrams: dict[tuple[str, str], float] = field(default_factory=dict)     # (h, w): log p


# -- estimation ------------------------------------------------------------------------------

def _discount(counts: Iterable[int], what: str) -> float:
    """``n1 / (n1 + 2 n2)``, or the fallback when it is 0 or 1 (no count of 1, or of 2)."""
    cc = Counter(c for c in counts if c in (1, 2))
    n1, n2 = cc[1], cc[2]
    if n1 == 0 or n2 == 0:
        log.warning("%s: %d types seen once and %d seen twice: no Kneser-Ney discount can be "
                    "estimated; using %.2f (the corpus is tiny)", what, n1, n2, DISCOUNT_FALLBACK)
        return DISCOUNT_FALLBACK
    return n1 / (n1 + 2 * n2)


def estimate_kn(sentences: Iterable[Sequence[int]], pieces: Sequence[str], *,
                skip_ids: Sequence[int] = (0, 1)) -> Arpa:
    """Interpolated Kneser-Ney bigram (see the module doc) of token-id sentences.

    Args:
      sentences: token ids per sentence (no ``<sos/eos>``; empty sentences are skipped).
      pieces: the piece of every id (``sp.id_to_piece``), the ARPA's words.
      skip_ids: ids that are not tokens (blank, sos/eos): in no sentence, not in the model.
    """
    skip = set(skip_ids)
    vocab = [p for i, p in enumerate(pieces) if i not in skip]
    clash = {BOS, EOS} & set(vocab)
    if clash:
        raise ZipasrError(f"piece(s) {sorted(clash)} clash with the ARPA sentence markers")
    pair_counts: Counter[tuple[str, str]] = Counter()
    n_sentences = 0
    for sent in sentences:
        if not len(sent):
            continue
        bad = [t for t in sent if t in skip or not 0 <= t < len(pieces)]
        if bad:
            raise ZipasrError(f"sentence {n_sentences} holds id(s) {sorted(set(bad))[:5]} "
                              f"that are not tokens of the {len(pieces)}-piece vocabulary")
        words = [BOS, *(pieces[t] for t in sent), EOS]
        pair_counts.update(zip(words[:-1], words[1:], strict=False))
        n_sentences += 1
    if n_sentences == 0:
        raise ZipasrError("no sentence to estimate the bigram from")

    d2 = _discount(pair_counts.values(), "bigram")
    history_total: Counter[str] = Counter()
    history_types: Counter[str] = Counter()
    continuation: Counter[str] = Counter()  # N(. w): distinct histories before w
    for (h, w), c in pair_counts.items():
        history_total[h] += c
        history_types[h] += 1
        continuation[w] += 1
    d1 = _discount(continuation.values(), "unigram")
    types = sum(continuation.values())  # N(. .)
    scored = [*vocab, EOS]
    floor = d1 * len(continuation) / types / len(scored)  # the uniform share of every word
    p1 = {w: max(continuation[w] - d1, 0.0) / types + floor for w in scored}

    arpa = Arpa()
    gamma = {h: d2 * history_types[h] / history_total[h] for h in history_total}
    arpa.unigrams[BOS] = (NEVER, math.log10(gamma[BOS]))
    for w in scored:
        bow = math.log10(gamma[w]) if w in gamma else 0.0
        arpa.unigrams[w] = (math.log10(p1[w]), bow)
    for (h, w), c in sorted(pair_counts.items()):
        p = (c - d2) / history_total[h] + gamma[h] * p1[w]
        arpa.bigrams[(h, w)] = math.log10(p)
    log.info("bigram: %d sentences, %d bigram types, discounts D1 %.3f D2 %.3f", n_sentences,
             len(pair_counts), d1, d2)
    return arpa


# -- ARPA files ------------------------------------------------------------------------------

def _num(x: float) -> str:
    return f"{x:.8g}"


def write_arpa(arpa: Arpa, path: Path) -> None:
    """The model as an ARPA file (tab-separated, as SRILM/kenlm write it), atomically."""
    lines = ["", "\\data\\", f"ngram 1={len(arpa.unigrams)}", f"ngram 2={len(arpa.bigrams)}",
             "", "\\1-grams:"]
    for w, (p, bow) in arpa.unigrams.items():
        has_bow = bow != 0.0 or w == BOS
        lines.append(f"{_num(p)}\t{w}\t{_num(bow)}" if has_bow else f"{_num(p)}\t{w}")
    lines += ["", "\\2-grams:"]
    lines += [f"{_num(p)}\t{h} {w}" for (h, w), p in arpa.bigrams.items()]
    lines += ["", "\\end\\", ""]
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines), encoding="utf-8")


_SECTION = re.compile(r"^\\(\d+)-grams:$")
_COUNT = re.compile(r"^ngram (\d+)=(\d+)$")


def parse_arpa(path: Path) -> Arpa:
    """Parse a unigram or bigram ARPA file (a higher order is an error: its scores would need
    the longer histories)."""
    path = Path(path)
    if not path.is_file():
        raise ZipasrError(f"ARPA file {path} does not exist")
    arpa, order, declared = Arpa(), 0, {}
    with open(path, encoding="utf-8") as f:
        for n, raw in enumerate(f, 1):
            line = raw.strip()
            if not line:
                continue
            if line == "\\end\\":
                break
            if line == "\\data\\":
                order = 0
                continue
            if (m := _COUNT.match(line)) and order == 0:
                declared[int(m[1])] = int(m[2])
                continue
            if m := _SECTION.match(line):
                order = int(m[1])
                if order > 2:
                    raise ZipasrError(f"{path}:{n}: a {order}-gram section: only unigram and "
                                      f"bigram ARPA models are supported (lmplz -o 2)")
                continue
            fields = line.split()
            if order not in (1, 2) or len(fields) not in (order + 1, order + 2):
                raise ZipasrError(f"{path}:{n}: not an ARPA {order or 'header'} line: {line!r}")
            try:
                p = float(fields[0])
                bow = float(fields[order + 1]) if len(fields) == order + 2 else 0.0
            except ValueError:
                raise ZipasrError(f"{path}:{n}: not a number in {line!r}") from None
            if order == 1:
                arpa.unigrams[fields[1]] = (p, bow)
            else:
                arpa.bigrams[(fields[1], fields[2])] = p
    if not declared or not arpa.unigrams:
        raise ZipasrError(f"{path} is not an ARPA file (no \\data\\ header or no unigrams)")
    got = {1: len(arpa.unigrams), 2: len(arpa.bigrams)}
    for k, v in declared.items():
        if k > 2:
            raise ZipasrError(f"{path}: a {k}-gram model: only unigram and bigram ARPA models "
                              f"are supported (lmplz -o 2)")
        if got[k] != v:
            raise ZipasrError(f"{path}: the header declares {v} {k}-grams, the file holds "
                              f"{got[k]} (truncated?)")
    return arpa


# -- dense tables for search -----------------------------------------------------------------

class BigramLm:
    """A bigram as dense natural-log tables over token ids, for vectorised search.

    A state is a token id: the last token scored (the history), or :attr:`start_state`
    (``<sos/eos>``'s id stands for ``<s>``). Row ``blank_id`` is the null history (backoff
    weight 1: the unigram distribution). ``blank_id`` and ``sos_id`` are never scored (-inf),
    nor is ``</s>`` (its probabilities are apart, in :attr:`eos_log_probs`, for perplexity).

    Attributes:
      log_probs: (V, V) ``log_probs[h, w]`` = ln score of w after history h.
      eos_log_probs: (V,) ln score of ``</s>`` after each history.
    """

    def __init__(self, log_probs: torch.Tensor, eos_log_probs: torch.Tensor, *,
                 sos_id: int = 1, blank_id: int = 0) -> None:
        v = log_probs.size(0)
        if log_probs.shape != (v, v) or eos_log_probs.shape != (v,):
            raise ValueError(f"log_probs {tuple(log_probs.shape)}, eos_log_probs "
                             f"{tuple(eos_log_probs.shape)}: expected (V, V) and (V,)")
        self.log_probs = log_probs
        self.eos_log_probs = eos_log_probs
        self.sos_id = sos_id
        self.blank_id = blank_id

    @property
    def vocab_size(self) -> int:
        return self.log_probs.size(0)

    @property
    def start_state(self) -> int:
        """The ``<s>`` history."""
        return self.sos_id

    def to(self, device: torch.device | str) -> BigramLm:
        return BigramLm(self.log_probs.to(device), self.eos_log_probs.to(device),
                        sos_id=self.sos_id, blank_id=self.blank_id)

    def log_prob(self, prev: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
        """(N,) ln score of ``token`` (N,) after the histories ``prev`` (N,) (states)."""
        return self.log_probs[prev, token]

    def next_log_probs(self, prev: torch.Tensor) -> torch.Tensor:
        """(N, V) ln scores of every token after the histories ``prev`` (N,)."""
        return self.log_probs[prev]

    @staticmethod
    def next_state(token: torch.Tensor) -> torch.Tensor:
        """The state after ``token`` (N,): the token itself (a bigram's history is one token)."""
        return token

    def sentence_log_probs(self, sentences: Sequence[Sequence[int]]) -> torch.Tensor:
        """(S,) ln p of each ``<s> tokens </s>`` (``</s>`` included, as perplexity counts it),
        in float64."""
        prev, nxt, owner = [], [], []
        for k, sent in enumerate(sentences):
            prev += [self.start_state, *sent[:-1]] if len(sent) else []
            nxt += list(sent)
            owner += [k] * len(sent)
        last = torch.tensor([s[-1] if len(s) else self.start_state for s in sentences],
                            dtype=torch.long)
        out = self.eos_log_probs.double()[last]
        if nxt:
            steps = self.log_probs[torch.tensor(prev), torch.tensor(nxt)].double()
            out = out.index_add(0, torch.tensor(owner), steps)
        return out

    @classmethod
    def from_arpa(cls, arpa: Arpa, piece_to_id: dict[str, int], *, sos_id: int = 1,
                  blank_id: int = 0, dtype: torch.dtype = torch.float32,
                  where: str = "ARPA") -> BigramLm:
        """Dense tables of ``arpa`` for the vocabulary ``piece_to_id`` (size V = max id + 1)."""
        v = max(piece_to_id.values()) + 1
        inf = -math.inf

        def index(word: str) -> int:
            if word == BOS:
                return sos_id
            if word not in piece_to_id:
                raise ZipasrError(f"{where}: word {word!r} is not a piece of the BPE model "
                                  f"(an ARPA over other tokens?)")
            i = piece_to_id[word]
            if i in (sos_id, blank_id):
                raise ZipasrError(f"{where}: word {word!r} is the blank or <sos/eos> id {i}, "
                                  f"not a token")
            return i

        uni = torch.full((v,), inf, dtype=torch.float64)
        bow = torch.zeros(v, dtype=torch.float64)
        uni_eos = inf
        for w, (p, b) in arpa.unigrams.items():
            if w == EOS:
                uni_eos = p * LN10
                continue
            i = index(w)
            bow[i] = b * LN10
            if w != BOS:
                uni[i] = p * LN10
        missing = [w for w, i in piece_to_id.items() if i not in (sos_id, blank_id)
                   and uni[i] == inf]
        if missing:
            # arpa2fst gives such tokens no arc: icefall's scorer says -inf; so do we
            log.warning("%s: %d vocabulary piece(s) without a unigram score -inf, e.g. %s",
                        where, len(missing), missing[:5])
        bow[blank_id] = 0.0  # the null history
        # ln max(listed, backoff path); the backoff path first, then raise the listed ones
        table = bow[:, None] + uni[None, :]
        eos = bow + uni_eos
        rows, cols, vals, eos_rows, eos_vals = [], [], [], [], []
        for (h, w), p in arpa.bigrams.items():
            if w == EOS:
                eos_rows.append(index(h))
                eos_vals.append(p * LN10)
            else:
                rows.append(index(h))
                cols.append(index(w))
                vals.append(p * LN10)
        rows_t, cols_t = torch.tensor(rows, dtype=torch.long), torch.tensor(cols, dtype=torch.long)
        table[rows_t, cols_t] = torch.maximum(table[rows_t, cols_t],
                                              torch.tensor(vals, dtype=torch.float64))
        eos_t = torch.tensor(eos_rows, dtype=torch.long)
        eos[eos_t] = torch.maximum(eos[eos_t], torch.tensor(eos_vals, dtype=torch.float64))
        table[:, [blank_id, sos_id]] = inf
        return cls(table.to(dtype), eos.to(dtype), sos_id=sos_id, blank_id=blank_id)


def read_arpa(path: Path, sp: Any = None, *, piece_to_id: dict[str, int] | None = None,
              dtype: torch.dtype = torch.float32) -> BigramLm:
    """The :class:`BigramLm` of a bigram ARPA file over the pieces of ``sp`` (a
    SentencePieceProcessor or the path of its model) or of ``piece_to_id``."""
    if piece_to_id is None:
        if sp is None:
            raise ValueError("read_arpa needs the BPE model (sp) or piece_to_id")
        if isinstance(sp, (str, Path)):
            import sentencepiece as spm

            sp = spm.SentencePieceProcessor(model_file=str(sp))
        piece_to_id = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    return BigramLm.from_arpa(parse_arpa(path), piece_to_id, dtype=dtype, where=str(path))
