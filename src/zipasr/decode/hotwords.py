"""Hotwords (contextual biasing) for modified beam search: a prefix tree over token ids with
Aho-Corasick fail links, and the sherpa-onnx ``hotwords_file`` reader.

The graph follows icefall's ``ContextGraph``. Each hotword gives every one of its tokens a bonus
(its own score, or ``--hotwords-score``); where hotwords share a prefix, a prefix node's token
bonus is the largest of theirs. A node's ``node_score`` is the sum of the token bonuses from the
root, so the *value* of a hotword is the ``node_score`` of its last node.

A hypothesis carries one node (an int). Its running bonus is the values of the hotwords it has
completed plus the ``node_score`` of its current partial match: the longest suffix of its tokens
(since the last completed hotword) that is a prefix of some hotword. A step's delta is the
change of that running bonus, so a partial match that fails gives its bonus back, and
:meth:`ContextGraph.finalize` gives back what is still partial at the end of the utterance.

Completing a hotword (non-strict mode, what the search uses) keeps the value of the longest
hotword ending at that token and starts matching afresh from the root. Strict mode (icefall's
keyword spotting) keeps the value of *every* hotword ending there and matching goes on from the
node, so overlapping occurrences all count.
"""

from __future__ import annotations

import math
import operator
import os
from collections import deque
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from zipasr.errors import ZipasrError

DEFAULT_HOTWORDS_SCORE = 1.5  # sherpa-onnx's --hotwords-score default: bonus per token

ROOT = 0


class Hotword(NamedTuple):
    """One hotword: its token ids and its bonus per token."""

    tokens: tuple[int, ...]
    score: float


class ContextGraph:
    """Aho-Corasick prefix tree over token-id sequences with per-token bonuses.

    Nodes are ints (the root is 0), cheap to keep one per hypothesis. Built once from
    ``hotwords``: ``(token ids, score per token)`` pairs; an empty list gives a graph whose every
    step scores 0.

    Per node (lists indexed by node): ``token_score``, ``node_score`` (summed from the root),
    ``fail`` (the node of the longest proper suffix in the tree) and ``match`` (the node of the
    longest hotword that is a suffix, or -1).
    """

    root = ROOT

    def __init__(self, hotwords: Iterable[tuple[Sequence[int], float]]) -> None:
        self._next: list[dict[int, int]] = [{}]  # trie children: token -> node
        self.token_score: list[float] = [0.0]  # bonus for the token into the node
        self._end: list[tuple[int, ...] | None] = [None]  # the hotword ending here, if any
        for i, (tokens, score) in enumerate(hotwords):
            try:
                tokens = tuple(operator.index(t) for t in tokens)
            except TypeError:
                raise ZipasrError(f"hotword {i}: token ids must be ints, got {tokens}") from None
            if not tokens or min(tokens) < 0:
                raise ZipasrError(f"hotword {i}: needs token ids >= 0, got {tokens}")
            if not math.isfinite(score):
                raise ZipasrError(f"hotword {i}: score must be finite, got {score}")
            self._insert(tokens, float(score))
        n = len(self._next)
        self.node_score: list[float] = [0.0] * n
        self.fail: list[int] = [ROOT] * n
        # The longest hotword that is a suffix of the node's tokens (itself, else the first end
        # node along the fail links: icefall's output link), or -1.
        self.match: list[int] = [-1] * n
        # Strict mode: the summed values of all hotwords that are suffixes of the node's tokens.
        self._match_total: list[float] = [0.0] * n
        self._link()
        # Transitions found by walking fail links, kept so each (node, token) walks once.
        self._goto: list[dict[int, int]] = [dict(children) for children in self._next]

    @property
    def num_nodes(self) -> int:
        return len(self._next)

    def _insert(self, tokens: tuple[int, ...], score: float) -> None:
        node = ROOT
        for t in tokens:
            child = self._next[node].get(t)
            if child is None:
                child = len(self._next)
                self._next[node][t] = child
                self._next.append({})
                self.token_score.append(score)
                self._end.append(None)
            else:  # a shared prefix: the largest bonus wins, as in icefall
                self.token_score[child] = max(self.token_score[child], score)
            node = child
        self._end[node] = tokens

    def _link(self) -> None:
        """node_score, fail, match and _match_total of every node, breadth first (a node's fail
        target is shallower, so it is done before the node). node_score is summed here, after all
        insertions, so a shared prefix's raised bonus reaches its descendants too."""
        queue = deque([ROOT])
        while queue:
            parent = queue.popleft()
            for t, child in self._next[parent].items():
                self.node_score[child] = self.node_score[parent] + self.token_score[child]
                if parent != ROOT:  # (the root's children fail to the root)
                    # the longest proper suffix of child's tokens that is in the tree
                    f = self.fail[parent]
                    while f != ROOT and t not in self._next[f]:
                        f = self.fail[f]
                    self.fail[child] = self._next[f].get(t, ROOT)
                below = self.fail[child]
                if self._end[child] is not None:
                    self.match[child] = child
                    self._match_total[child] = self.node_score[child]
                else:
                    self.match[child] = self.match[below]
                self._match_total[child] += self._match_total[below]
                queue.append(child)

    def _step(self, state: int, token: int) -> int:
        """The node after ``token``: the longest suffix of state's tokens + token in the tree."""
        goto = self._goto[state]
        node = goto.get(token)
        if node is None:
            node = ROOT if state == ROOT else self._step(self.fail[state], token)
            goto[token] = node
        return node

    def forward_one_step(self, state: int, token: int, *, strict: bool = False
                         ) -> tuple[float, int, tuple[int, ...] | None]:
        """Advance ``state`` by ``token``: ``(score delta, new state, matched hotword or None)``.

        The matched hotword (its token ids) is the longest one ending at this token. Non-strict
        (icefall's ``strict_mode=False``, used by its search): a match keeps its value and the
        new state is the root. Strict: every hotword ending here adds its value and the new
        state is the node reached.
        """
        node = self._goto[state].get(token)
        if node is None:  # (index: a tensor token would never hit the int-keyed memo)
            node = self._step(state, operator.index(token))
        score = self.node_score
        m = self.match[node]
        if strict:
            delta = score[node] - score[state] + self._match_total[node]
            return delta, node, None if m < 0 else self._end[m]
        if m < 0:
            return score[node] - score[state], node, None
        return score[m] - score[state], ROOT, self._end[m]

    def finalize(self, state: int) -> tuple[float, int]:
        """End of utterance: give back the bonus of the unfinished partial match. Returns
        ``(score delta, root)``."""
        return -self.node_score[state], ROOT


# ---------------------------------------------------------------------------------------------
# sherpa-onnx's hotwords file, modeling unit "bpe"
# ---------------------------------------------------------------------------------------------


def _case_fold(sp: Any):
    """The case the BPE vocabulary is in (LibriSpeech transcripts are uppercase): hotwords are
    folded to it, so ``hello`` reaches a model trained on ``HELLO``. A mixed-case vocabulary
    leaves the text alone."""
    letters = set()
    for i in range(sp.get_piece_size()):
        piece = sp.id_to_piece(i)
        if sp.is_control(i) or sp.is_unknown(i) or (piece.startswith("<") and piece.endswith(">")):
            continue  # <blk>, <sos/eos>, <unk>: not text
        letters.update(c for c in piece if c.isalpha() and c.lower() != c.upper())
    if letters and all(c.isupper() for c in letters):
        return str.upper
    if letters and all(c.islower() for c in letters):
        return str.lower
    return lambda s: s


def _parse_score(word: str, where: str) -> float:
    try:
        score = float(word[1:])
    except ValueError:
        raise ZipasrError(f"{where}: cannot read the score {word!r} (expected e.g. ':3.5')")\
            from None
    if not math.isfinite(score):
        raise ZipasrError(f"{where}: the score {word!r} is not a finite number")
    return score


def parse_hotwords(source: str | os.PathLike | Iterable[str], sp: Any,
                   default_score: float = DEFAULT_HOTWORDS_SCORE) -> list[Hotword]:
    """Read sherpa-onnx's hotwords format and encode it with the BPE model ``sp``.

    ``source`` is a file path (str or PathLike) or an iterable of lines. One hotword (a word or a
    phrase) per line, words separated by whitespace, optionally followed by ``:SCORE``, the bonus
    per token for this line (``:0`` or none: ``default_score``, as sherpa-onnx). Blank lines are
    skipped, as sherpa-onnx does; there are no comments. Each word is encoded on its own, as
    sherpa-onnx's ``bpe`` modeling unit does, after folding to the vocabulary's case.

    Raises ZipasrError naming the line for a score without a phrase, words after the score, more
    than one score, an unreadable score, or a word the BPE model cannot spell (``<unk>``).
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise ZipasrError(f"cannot read the hotwords file {path}: {e}") from e
        name = f"hotwords file {path}"
    else:
        lines, name = list(source), "hotwords"
    if not math.isfinite(default_score):
        raise ZipasrError(f"the hotwords score must be a finite number, got {default_score}")
    fold = _case_fold(sp)
    unk = sp.unk_id()
    out = []
    for lineno, line in enumerate(lines, 1):
        where = f"{name} line {lineno}"
        words, score = [], None
        for word in line.split():
            if word.startswith(":"):
                if score is not None:
                    raise ZipasrError(f"{where}: more than one score in {line.strip()!r}")
                score = _parse_score(word, where)
            elif score is not None:
                raise ZipasrError(f"{where}: the score must come after the phrase, "
                                  f"in {line.strip()!r}")
            else:
                words.append(word)
        if not words:
            if score is not None:
                raise ZipasrError(f"{where}: a score without a phrase: {line.strip()!r}")
            continue
        tokens: list[int] = []
        for word in words:
            ids = sp.encode(fold(word))
            if unk in ids:
                raise ZipasrError(f"{where}: the BPE model cannot spell {word!r} (it has "
                                  f"characters outside its vocabulary)")
            tokens.extend(ids)
        out.append(Hotword(tuple(tokens), default_score if not score else score))
    return out
