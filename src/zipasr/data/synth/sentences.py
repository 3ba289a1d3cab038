"""Offline, license-clean English sentences for the synthetic default corpus.

A small hand-written probabilistic grammar over word lists shipped in
``zipasr/data/synth/text/*.txt`` (our own, Apache-2.0). It produces varied, mostly plausible
English of 3 to 15 words: statements in several tenses with agreement, negation, questions,
imperatives, lists, comparatives, relative and embedded clauses, possessives, contractions and
spelled-out numbers. Selectional restrictions (verbs and adjectives list the noun tags they accept)
keep the sentences sensible enough for a BPE model and a transducer to learn real structure.

Each :class:`Sentence` carries two strings: ``text`` (lowercase with punctuation, for espeak-ng,
which spells short uppercase words) and ``transcript`` (LibriSpeech style: uppercase letters,
apostrophes and single spaces).

Everything is deterministic for a seed (``random.Random``; no global state).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import cache, cached_property
from importlib import resources

__all__ = [
    "MAX_WORDS",
    "MIN_WORDS",
    "Lexicon",
    "Sentence",
    "SentenceGenerator",
    "generate_sentences",
    "load_lexicon",
    "number_words",
    "to_transcript",
    "vocabulary",
]

MIN_WORDS = 3
MAX_WORDS = 15

# ---------------------------------------------------------------------------------------------
# Lexicon
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Noun:
    """A noun; ``plural`` is None for a mass noun ("milk", "music")."""

    singular: str
    plural: str | None
    tags: frozenset[str]
    preps: tuple[str, ...] = ()

    @cached_property
    def keys(self) -> frozenset[str]:
        """What a selection spec may name: its tags and the word itself."""
        return self.tags | {self.singular}


@dataclass(frozen=True)
class Verb:
    base: str
    third: str
    past: str
    participle: str
    gerund: str
    subjects: frozenset[str]
    objects: frozenset[str] | None  # None: intransitive use


@dataclass(frozen=True)
class Adjective:
    word: str
    comparative: str | None
    superlative: str | None
    fits: frozenset[str]


@dataclass(frozen=True, eq=False)  # identity hash: the caches below key on it cheaply
class Lexicon:
    """The word lists, parsed and cross-checked."""

    nouns: tuple[Noun, ...]
    verbs: tuple[Verb, ...]
    adjectives: tuple[Adjective, ...]
    manner_adverbs: tuple[str, ...]
    frequency_adverbs: tuple[str, ...]
    names: tuple[tuple[str, str], ...]  # (name, "male" | "female")
    _cache: dict = field(default_factory=dict, repr=False)

    def nouns_for(self, spec: frozenset[str]) -> tuple[Noun, ...]:
        """Nouns whose tags or word a spec names."""
        key = ("n", spec)
        if key not in self._cache:
            self._cache[key] = tuple(n for n in self.nouns if n.keys & spec)
        return self._cache[key]

    def adjectives_for(self, noun: Noun) -> tuple[Adjective, ...]:
        """Adjectives that fit a noun."""
        key = ("a", noun.singular)
        if key not in self._cache:
            self._cache[key] = tuple(a for a in self.adjectives if a.fits & noun.keys)
        return self._cache[key]

    def select(self, name: str, fn: Callable[[], tuple]) -> tuple:
        """A derived word list, computed once (``fn`` must depend only on ``name``)."""
        key = ("s", name)
        if key not in self._cache:
            self._cache[key] = fn()
        return self._cache[key]

    @cached_property
    def transitive(self) -> tuple[Verb, ...]:
        return tuple(v for v in self.verbs if v.objects is not None)

    @cached_property
    def intransitive(self) -> tuple[Verb, ...]:
        return tuple(v for v in self.verbs if v.objects is None)

    @cached_property
    def places(self) -> tuple[Noun, ...]:
        return tuple(n for n in self.nouns if n.preps)


def _rows(name: str) -> Iterable[list[str]]:
    text = resources.files("zipasr.data.synth").joinpath("text", name).read_text(encoding="utf-8")
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if line:
            yield [f"{name}:{lineno}", *line.split()]


# Tags implied by other tags, so the lists need not repeat them.
_IMPLIED = {"fruit": "food", "vegetable": "food", "dish": "food", "massfood": "food"}


def _tags(field: str) -> frozenset[str]:
    tags = set(field.split(","))
    return frozenset(tags | {_IMPLIED[t] for t in tags if t in _IMPLIED})


def _spec(field: str) -> frozenset[str]:
    return frozenset(field.split(","))


@cache
def load_lexicon() -> Lexicon:
    """Parse the shipped word lists; raise ValueError naming the file:line of a bad entry."""
    nouns = []
    for where, *f in _rows("nouns.txt"):
        if len(f) not in (3, 4):
            raise ValueError(f"{where}: expected SINGULAR PLURAL TAGS [PREPS], got {f}")
        preps = tuple(f[3].split(",")) if len(f) == 4 else ()
        nouns.append(Noun(f[0], None if f[1] == "-" else f[1], _tags(f[2]), preps))
    verbs = []
    for where, *f in _rows("verbs.txt"):
        if len(f) != 7:
            raise ValueError(f"{where}: expected 7 fields, got {f}")
        verbs.append(Verb(*f[:5], _spec(f[5]), None if f[6] == "-" else _spec(f[6])))
    adjectives = []
    for where, *f in _rows("adjectives.txt"):
        if len(f) != 4:
            raise ValueError(f"{where}: expected 4 fields, got {f}")
        cmp_, sup = (None if x == "-" else x for x in f[1:3])
        adjectives.append(Adjective(f[0], cmp_, sup, _spec(f[3])))
    adverbs: dict[str, list[str]] = {"manner": [], "frequency": []}
    for where, *f in _rows("adverbs.txt"):
        if len(f) != 2 or f[1] not in adverbs:
            raise ValueError(f"{where}: expected ADVERB manner|frequency, got {f}")
        adverbs[f[1]].append(f[0])
    names = []
    for where, *f in _rows("names.txt"):
        if len(f) != 2 or f[1] not in ("male", "female"):
            raise ValueError(f"{where}: expected NAME male|female, got {f}")
        names.append((f[0], f[1]))
    lex = Lexicon(
        tuple(nouns),
        tuple(verbs),
        tuple(adjectives),
        tuple(dict.fromkeys(adverbs["manner"])),
        tuple(dict.fromkeys(adverbs["frequency"])),
        tuple(names),
    )
    _check(lex)
    return lex


def _check(lex: Lexicon) -> None:
    """Every tag or word a spec names must select at least one noun (catches typos)."""
    known = frozenset().union(*(n.keys for n in lex.nouns))
    specs = [(f"verb {v.base!r} subjects", v.subjects) for v in lex.verbs]
    specs += [(f"verb {v.base!r} objects", v.objects) for v in lex.verbs if v.objects]
    specs += [(f"adjective {a.word!r}", a.fits) for a in lex.adjectives]
    for what, spec in specs:
        unknown = sorted(spec - known)
        if unknown:
            raise ValueError(f"{what}: unknown noun tags or words {unknown}")


# ---------------------------------------------------------------------------------------------
# Numbers
# ---------------------------------------------------------------------------------------------

_ONES = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen \
fifteen sixteen seventeen eighteen nineteen".split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_ORDINALS = "zeroth first second third fourth fifth sixth seventh eighth ninth tenth eleventh \
twelfth thirteenth fourteenth fifteenth sixteenth seventeenth eighteenth nineteenth \
twentieth".split()


def number_words(n: int) -> list[str]:
    """Spell 0 <= n < 1,000,000 as LibriSpeech does ("three hundred and twelve")."""
    if not 0 <= n < 1_000_000:
        raise ValueError(f"number out of range: {n}")
    if n < 20:
        return [_ONES[n]]
    if n < 100:
        return [_TENS[n // 10]] + ([_ONES[n % 10]] if n % 10 else [])
    if n < 1000:
        rest = ["and", *number_words(n % 100)] if n % 100 else []
        return [_ONES[n // 100], "hundred", *rest]
    rest = n % 1000
    tail = [] if not rest else (["and"] if rest < 100 else []) + number_words(rest)
    return [*number_words(n // 1000), "thousand", *tail]


def _year_words(y: int) -> list[str]:
    """Years as people say them: nineteen eighty four, two thousand and five, twenty twenty."""
    if 2000 <= y < 2010:
        return number_words(y)
    hi, lo = divmod(y, 100)
    if lo == 0:
        return [*number_words(hi), "hundred"]
    return [*number_words(hi), *(["oh"] if lo < 10 else []), *number_words(lo)]


# ---------------------------------------------------------------------------------------------
# Sentences
# ---------------------------------------------------------------------------------------------

_CLEAN = re.compile(r"[^A-Z' ]+")


def to_transcript(text: str) -> str:
    """LibriSpeech-style transcript: uppercase letters, apostrophes, single spaces."""
    return " ".join(_CLEAN.sub(" ", text.upper()).split())


@dataclass(frozen=True)
class Sentence:
    text: str  # lowercase with punctuation: what espeak-ng speaks
    transcript: str  # uppercase, letters/apostrophes/spaces: the reference

    @property
    def words(self) -> list[str]:
        return self.transcript.split()


def _join(tokens: Sequence[str]) -> str:
    out = " ".join(t for t in tokens if t)
    return re.sub(r" ([,.?!])", r"\1", out)


# (pronoun, object form, possessive, person, plural); "you" agrees like a plural.
_PRONOUNS = [
    ("i", "me", "my", 1, False),
    ("you", "you", "your", 2, True),
    ("he", "him", "his", 3, False),
    ("she", "her", "her", 3, False),
    ("we", "us", "our", 1, True),
    ("they", "them", "their", 3, True),
]
_POSSESSIVES = ["my", "your", "his", "her", "our", "their"]
_DAYS = "monday tuesday wednesday thursday friday saturday sunday".split()
_MONTHS = "january february march april june july august september october november".split()
_SEASONS = ["spring", "summer", "autumn", "winter"]
_A_BEFORE = {"useful", "uniform", "unique", "university", "one", "usual", "european"}
_AN_BEFORE = {"honest", "hour", "honor"}

_TIMES = {
    "past": [
        ["yesterday"], ["last", "night"], ["last", "week"], ["this", "morning"],
        ["last", "summer"], ["two", "days", "ago"], ["an", "hour", "ago"], ["on", "<day>"],
        ["in", "<month>"], ["last", "<season>"], ["a", "long", "time", "ago"], ["after", "lunch"],
    ],
    "present": [
        ["every", "day"], ["every", "morning"], ["on", "<days>"], ["at", "night"],
        ["in", "the", "evening"], ["after", "school"], ["after", "dinner"],
        ["before", "breakfast"], ["twice", "a", "week"], ["once", "a", "month"],
        ["in", "the", "<season>"], ["every", "weekend"],
    ],
    "progressive": [["right", "now"], ["at", "the", "moment"], ["today"], ["this", "afternoon"]],
    "future": [
        ["tomorrow"], ["next", "week"], ["next", "year"], ["tonight"], ["later"], ["soon"],
        ["on", "<day>"], ["in", "two", "weeks"], ["next", "<season>"], ["after", "lunch"],
    ],
}
_TENSE_TIME = {
    "present": "present", "past": "past", "progressive": "progressive",
    "past_progressive": "past", "future": "future", "going_to": "future",
}
_TENSES = ["present", "past", "progressive", "past_progressive", "future", "going_to",
           "perfect", "modal"]
_TENSE_WEIGHTS = [24, 30, 10, 4, 10, 5, 8, 9]
_MODALS = ["can", "could", "should", "must", "might", "would"]
_NEG_MODALS = {"can": "can't", "could": "couldn't", "should": "shouldn't", "must": "must not",
               "might": "might not", "would": "wouldn't"}
# Verbs that read badly as commands ("want this apple") or with a list of objects.
_STATIVE = {"want", "need", "like", "love", "hate", "see", "hear", "notice", "believe", "trust",
            "smell", "taste", "remember", "prefer", "lose", "miss", "ignore", "admire"}
_LIST_VERBS = {"buy", "sell", "bring", "pack", "need", "want", "find", "collect", "cook", "wash",
               "draw", "eat", "carry", "order", "like", "love", "feed", "visit", "invite", "clean",
               "paint", "count", "choose", "share", "hide", "drop", "fold", "deliver", "plant"}
_DEGREE = ["very", "quite", "rather", "too", "so", "really", "a little"]


@dataclass(frozen=True)
class _Agr:
    person: int
    plural: bool


_THIRD_SG = _Agr(3, False)
_THIRD_PL = _Agr(3, True)


class SentenceGenerator:
    """Draw sentences from the grammar; deterministic for a seed."""

    def __init__(self, seed: int | str = 0, lexicon: Lexicon | None = None) -> None:
        self.rng = random.Random(seed)
        self.lex = lexicon or load_lexicon()
        self._templates: list[tuple[Callable[[], list[str]], float]] = [
            (self._transitive, 30),
            (self._intransitive, 10),
            (self._copula, 9),
            (self._comparative, 3),
            (self._there, 5),
            (self._yes_no, 7),
            (self._wh_question, 8),
            (self._imperative, 6),
            (self._list, 4),
            (self._numbers, 6),
            (self._compound, 6),
            (self._embedded, 4),
            (self._relative, 3),
            (self._possessive, 3),
            (self._ditransitive, 4),
            (self._conversation, 2),
        ]

    # -- public --------------------------------------------------------------------------------

    def sentence(self) -> Sentence:
        """One sentence of MIN_WORDS..MAX_WORDS words."""
        funcs, weights = zip(*self._templates, strict=True)
        while True:
            tokens = self.rng.choices(funcs, weights)[0]()
            if not tokens:
                continue
            text = _join(tokens)
            if text[-1] not in ".?!":
                text += "."
            transcript = to_transcript(text)
            if MIN_WORDS <= len(transcript.split()) <= MAX_WORDS:
                return Sentence(text, transcript)

    # -- small helpers --------------------------------------------------------------------------

    @property
    def _person_transitive(self) -> tuple[Verb, ...]:
        return self.lex.select("person transitive", lambda: tuple(
            v for v in self.lex.transitive if "person" in v.subjects))

    @property
    def _countable_things(self) -> tuple[Noun, ...]:
        return self.lex.select("countable things", lambda: tuple(
            n for n in self.lex.nouns if n.plural and "place" not in n.tags))

    def p(self, prob: float) -> bool:
        return self.rng.random() < prob

    def pick(self, seq: Sequence):
        return seq[self.rng.randrange(len(seq))]

    def _fill(self, words: list[str]) -> list[str]:
        out = []
        for w in words:
            if w == "<day>":
                w = self.pick(_DAYS)
            elif w == "<days>":
                w = self.pick(_DAYS) + "s"
            elif w == "<month>":
                w = self.pick(_MONTHS)
            elif w == "<season>":
                w = self.pick(_SEASONS)
            out.append(w)
        return out

    def time_phrase(self, tense: str) -> list[str]:
        group = _TENSE_TIME.get(tense)
        return self._fill(self.pick(_TIMES[group])) if group else []

    def tense(self) -> str:
        return self.rng.choices(_TENSES, _TENSE_WEIGHTS)[0]

    def noun(self, spec: frozenset[str], avoid: Noun | None = None) -> Noun:
        options = self.lex.nouns_for(spec)
        for _ in range(5):
            n = self.pick(options)
            if n != avoid:
                return n
        return n

    def number(self) -> int:
        return self.rng.choice([2, 2, 3, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 15, 20, 24, 30, 50,
                                self.rng.randint(13, 99)])

    @staticmethod
    def article(next_word: str) -> str:
        if next_word in _AN_BEFORE:
            return "an"
        if next_word in _A_BEFORE:
            return "a"
        return "an" if next_word[0] in "aeiou" else "a"

    # -- noun phrases ---------------------------------------------------------------------------

    def np(self, noun: Noun, plural: bool | None = None, det: str | None = None,
           adj_prob: float = 0.3, definite: bool = False) -> tuple[list[str], _Agr]:
        """A noun phrase around ``noun``; returns its tokens and agreement."""
        if noun.plural is None:
            plural = False
        elif plural is None:
            plural = self.p(0.3)
        head = noun.plural if plural else noun.singular
        adjs: list[str] = []
        fitting = self.lex.adjectives_for(noun)
        if fitting and self.p(adj_prob):
            adjs.append(self.pick(fitting).word)
            if self.p(0.1):
                second = self.pick(fitting).word
                if second != adjs[0]:
                    adjs.insert(0, second)
        if det is None:
            if definite:
                det = self.rng.choices(["the", "this", "that", "poss"], [6, 1, 1, 2])[0]
                if plural:
                    det = {"this": "these", "that": "those"}.get(det, det)
            elif noun.plural is None:
                det = self.rng.choices(["the", "some", "", "poss", "more"], [4, 3, 3, 1, 1])[0]
            elif plural:
                det = self.rng.choices(["the", "some", "", "poss", "num", "these", "many"],
                                       [5, 3, 2, 2, 3, 1, 1])[0]
            else:
                det = self.rng.choices(["the", "a", "poss", "this", "that", "name"],
                                       [8, 8, 3, 1, 1, 1])[0]
        if det == "poss":
            det = self.pick(_POSSESSIVES)
        elif det == "name":
            det = self.pick(self.lex.names)[0] + "'s"
        elif det == "num":
            det = " ".join(number_words(self.number()))
        elif det == "a":
            det = self.article((adjs or [head])[0])
        tokens = [*det.split(), *adjs, head]
        return tokens, _THIRD_PL if plural else _THIRD_SG

    def subject(self, spec: frozenset[str], pron_prob: float = 0.3
                ) -> tuple[list[str], _Agr, Noun | None]:
        """A subject that can do what ``spec`` allows: pronoun, name, or noun phrase."""
        if "person" in spec:
            r = self.rng.random()
            if r < pron_prob:
                pron, _, _, person, plural = self.pick(_PRONOUNS)
                return [pron], _Agr(person, plural), None
            if r < pron_prob + 0.2:
                return [self.pick(self.lex.names)[0]], _THIRD_SG, None
        noun = self.noun(spec)
        tokens, agr = self.np(noun, definite=self.p(0.7))
        return tokens, agr, noun

    def obj(self, spec: frozenset[str], avoid: Noun | None = None) -> list[str]:
        if "person" in spec and self.p(0.25):
            if self.p(0.5):
                return [self.pick(_PRONOUNS)[1]]
            return [self.pick(self.lex.names)[0]]
        return self.np(self.noun(spec, avoid))[0]

    def pp(self) -> list[str]:
        """A place phrase: "near the old bridge", "at home"."""
        if self.p(0.08):
            return self.pick([["at", "home"], ["at", "work"], ["at", "school"], ["outside"],
                              ["upstairs"], ["downstairs"], ["here"], ["there"]])
        place = self.pick(self.lex.places)
        tokens, _ = self.np(place, plural=False, definite=True, adj_prob=0.2)
        return [self.pick(place.preps), *tokens]

    # -- verb phrases ---------------------------------------------------------------------------

    @staticmethod
    def be(agr: _Agr, past: bool) -> str:
        if past:
            return "were" if agr.plural or agr.person == 2 else "was"
        if agr.person == 1 and not agr.plural:
            return "am"
        return "are" if agr.plural or agr.person == 2 else "is"

    def vp(self, verb: Verb, agr: _Agr, tense: str, negative: bool = False) -> list[str]:
        """Conjugated verb group: "does not eat", "was eating", "has eaten", "might eat"."""
        third = agr.person == 3 and not agr.plural
        short = self.p(0.6)  # contraction or full form
        if tense == "present":
            if not negative:
                if self.p(0.15):
                    return [self.pick(self.lex.frequency_adverbs),
                            verb.third if third else verb.base]
                return [verb.third if third else verb.base]
            aux = "does" if third else "do"
            return [aux + "n't", verb.base] if short else [aux, "not", verb.base]
        if tense == "past":
            if not negative:
                return [verb.past]
            return ["didn't", verb.base] if short else ["did", "not", verb.base]
        if tense in ("progressive", "past_progressive"):
            be = self.be(agr, tense == "past_progressive")
            if negative:
                if short and be != "am":
                    return [be + "n't", verb.gerund]
                return [be, "not", verb.gerund]
            return [be, verb.gerund]
        if tense == "future":
            if negative:
                return ["won't", verb.base] if short else ["will", "not", verb.base]
            return ["will", verb.base]
        if tense == "going_to":
            be = self.be(agr, False)
            return [be, *(["not"] if negative else []), "going", "to", verb.base]
        if tense == "perfect":
            have = "has" if third else "have"
            if negative:
                return [have + "n't", verb.participle] if short else [have, "never",
                                                                      verb.participle]
            return [have, *(["just"] if self.p(0.15) else []), verb.participle]
        modal = self.pick(_MODALS)
        if negative:
            return [*_NEG_MODALS[modal].split(), verb.base]
        return [modal, verb.base]

    def _clause(self, tense: str | None = None, time: bool = False) -> list[str]:
        """A plain statement (used on its own and inside bigger sentences)."""
        tense = tense or self.tense()
        negative = self.p(0.15)
        if self.p(0.75):
            verb = self.pick(self.lex.transitive)
            subj, agr, noun = self.subject(verb.subjects)
            rest = self.obj(verb.objects, avoid=noun)
        else:
            verb = self.pick(self.lex.intransitive)
            subj, agr, noun = self.subject(verb.subjects)
            rest = []
        tokens = [*subj, *self.vp(verb, agr, tense, negative), *rest]
        if time:
            tp = self.time_phrase(tense)
            if tp:
                tokens = [*tp, ",", *tokens] if self.p(0.3) else [*tokens, *tp]
        return tokens

    # -- templates ------------------------------------------------------------------------------

    def _transitive(self) -> list[str]:
        verb = self.pick(self.lex.transitive)
        tense = self.tense()
        subj, agr, noun = self.subject(verb.subjects)
        tokens = [*subj, *self.vp(verb, agr, tense, self.p(0.12)), *self.obj(verb.objects, noun)]
        r = self.rng.random()
        if r < 0.25:
            tokens += self.pp()
        elif r < 0.4:
            tokens.append(self.pick(self.lex.manner_adverbs))
        tp = self.time_phrase(tense) if self.p(0.35) else []
        if tp:
            tokens = [*tp, ",", *tokens] if self.p(0.3) else [*tokens, *tp]
        return tokens

    def _intransitive(self) -> list[str]:
        verb = self.pick(self.lex.intransitive)
        tense = self.tense()
        subj, agr, _ = self.subject(verb.subjects)
        tokens = [*subj, *self.vp(verb, agr, tense, self.p(0.1))]
        if self.p(0.5):
            tokens.append(self.pick(self.lex.manner_adverbs))
        if self.p(0.5):
            tokens += self.pp()
        if self.p(0.4):
            tokens += self.time_phrase(tense)
        return tokens

    def _copula(self) -> list[str]:
        past = self.p(0.4)
        spec = self.pick([frozenset({"person", "animal"}), frozenset({"object", "fixture"}),
                          frozenset({"place", "vehicle"}), frozenset({"food", "drink"}),
                          frozenset({"abstract"})])
        subj, agr, noun = self.subject(spec)
        fits = self.lex.adjectives_for(noun) if noun else self.lex.adjectives_for(
            self.noun(frozenset({"person"})))
        if not fits:
            return []
        adj = self.pick(fits).word
        neg = ["not"] if self.p(0.15) else []
        deg = self.pick(_DEGREE).split() if self.p(0.35) else []
        tokens = [*subj, self.be(agr, past), *neg, *deg, adj]
        if self.p(0.3):
            tokens += self.time_phrase("past" if past else "progressive")
        elif self.p(0.2):
            tokens += self.pp()
        return tokens

    def _comparative(self) -> list[str]:
        adj = self.pick(self.lex.select("comparable", lambda: tuple(
            a for a in self.lex.adjectives if a.comparative)))
        nouns = self.lex.select(f"countable:{adj.word}", lambda: tuple(
            n for n in self.lex.nouns_for(adj.fits) if n.plural))
        if not nouns:
            return []
        a, b = self.pick(nouns), self.pick(nouns)
        past = self.p(0.3)
        if self.p(0.25):
            # superlative: "this is the biggest dog i have ever seen"
            return [self.pick(["this", "that", "it"]), "was" if past else "is", "the",
                    adj.superlative or f"most {adj.word}", a.singular, "i", "have", "ever",
                    "seen"]
        comp = adj.comparative or f"more {adj.word}"
        left, agr = self.np(a, definite=True, adj_prob=0.0)
        right, _ = self.np(b, definite=True, adj_prob=0.0)
        if self.p(0.3) and "person" in a.tags:
            left, agr = [self.pick(self.lex.names)[0]], _THIRD_SG
            right = [self.pick(self.lex.names)[0]]
        return [*left, self.be(agr, past), *comp.split(), "than", *right]

    def _there(self) -> list[str]:
        noun = self.pick(self.lex.select("things", lambda: tuple(
            n for n in self.lex.nouns if "place" not in n.tags)))
        plural = noun.plural is not None and self.p(0.5)
        past = self.p(0.4)
        if plural:
            det = self.pick(["num", "num", "some", "many", "no", "two"])
            np, _ = self.np(noun, plural=True, det=det)
            be = "were" if past else "are"
        else:
            np, _ = self.np(noun, plural=False, det="a" if noun.plural else
                            self.pick(["some", "no"]))
            be = "was" if past else "is"
        if self.p(0.2):
            return [be, "there", *np, *self.pp(), "?"]
        return ["there", be, *np, *self.pp()]

    def _yes_no(self) -> list[str]:
        r = self.rng.random()
        if r < 0.45:
            verb = self.pick(self.lex.transitive)
            subj, agr, noun = self.subject(verb.subjects, pron_prob=0.5)
            third = agr.person == 3 and not agr.plural
            aux = self.rng.choices(["do", "did", "will", "can", "should", "modal"],
                                   [4, 4, 1, 2, 1, 1])[0]
            if aux == "do":
                aux = "does" if third else "do"
            elif aux == "modal":
                aux = self.pick(["could", "would", "might"])
            tail = self.pp() if self.p(0.2) else []
            return [aux, *subj, verb.base, *self.obj(verb.objects, noun), *tail, "?"]
        if r < 0.7:
            spec = self.pick([frozenset({"person", "animal"}), frozenset({"object", "place"}),
                              frozenset({"food", "drink"})])
            subj, agr, noun = self.subject(spec, pron_prob=0.3)
            fits = self.lex.adjectives_for(noun or self.noun(frozenset({"person"})))
            be = self.be(agr, self.p(0.4))
            return [be, *subj, *([self.pick(_DEGREE[:5])] if self.p(0.3) else []),
                    self.pick(fits).word, "?"]
        if r < 0.85:
            verb = self.pick(self.lex.verbs)
            subj, agr, noun = self.subject(verb.subjects, pron_prob=0.6)
            have = "has" if agr.person == 3 and not agr.plural else "have"
            obj = self.obj(verb.objects, noun) if verb.objects else []
            return [have, *subj, "ever", verb.participle, *obj, "?"]
        verb = self.pick(self.lex.verbs)
        subj, agr, noun = self.subject(verb.subjects, pron_prob=0.5)
        obj = self.obj(verb.objects, noun) if verb.objects else []
        return [self.be(agr, self.p(0.3)), *subj, verb.gerund, *obj, "?"]

    def _wh_question(self) -> list[str]:
        kind = self.rng.randrange(9)
        if kind == 0:
            noun = self.pick(self.lex.nouns_for(frozenset({"object", "pet"})))
            np, agr = self.np(noun, definite=True)
            return ["where", self.be(agr, self.p(0.3)), *np, "?"]
        if kind == 1:
            verb = self.pick(self.lex.transitive)
            subj, agr, noun = self.subject(verb.subjects, pron_prob=0.5)
            wh = self.pick(["where", "when", "why", "how"])
            aux = self.pick(["did", "do", "will", "can"])
            if aux == "do" and agr.person == 3 and not agr.plural:
                aux = "does"
            return [wh, aux, *subj, verb.base, *self.obj(verb.objects, noun), "?"]
        if kind == 2:
            verb = self.pick(self.lex.transitive)
            subj, agr, noun = self.subject(verb.subjects, pron_prob=0.5)
            aux = "does" if agr.person == 3 and not agr.plural else "do"
            aux = self.pick([aux, "did", "will"])
            return ["what", aux, *subj, verb.base, "?"]
        if kind == 3:
            verb = self.pick(self._person_transitive)
            return ["who", verb.past, *self.obj(verb.objects), "?"]
        if kind == 4:
            subj, agr, noun = self.subject(frozenset({"person", "animal"}), pron_prob=0.4)
            fits = self.lex.adjectives_for(noun or self.noun(frozenset({"person"})))
            return ["why", self.be(agr, self.p(0.4)), *subj, "so", self.pick(fits).word, "?"]
        if kind == 5:
            verb = self.pick(self.lex.transitive)
            nouns = self.lex.select(f"countable-objects:{verb.base}:{sorted(verb.objects)}",
                                    lambda: tuple(n for n in self.lex.nouns_for(verb.objects)
                                                  if n.plural))
            if not nouns:
                return []
            subj, agr, _ = self.subject(verb.subjects, pron_prob=0.6)
            aux = self.pick(["did", "will", "can", "do" if agr.plural or agr.person < 3
                             else "does"])
            return ["how", "many", self.pick(nouns).plural, aux, *subj, verb.base, "?"]
        if kind == 6:
            noun = self.pick(self._countable_things)
            verb = self.pick(["like", "want", "need"])
            return ["which", noun.singular, "do", "you", verb,
                    *(["best"] if verb == "like" and self.p(0.3) else []), "?"]
        if kind == 7:
            name = self.pick(self.lex.names)[0]
            return self.pick([
                ["how", "old", "is", name, "?"],
                ["how", "are", "you", self.pick(["today", "feeling", "doing"]), "?"],
                ["what", "time", "does", "the", self.pick(["bus", "train", "ferry", "plane",
                                                         "tram", "show", "shop"]),
                 self.pick(["leave", "arrive", "open", "start", "stop"]), "?"],
                ["whose", self.pick(self.lex.nouns_for(frozenset({"object"}))).singular,
                 "is", self.pick(["this", "that"]), "?"],
            ])
        place = self.pick(self.lex.places)
        return ["how", "far", "is", "the", place.singular, "from", "here", "?"]

    def _imperative(self) -> list[str]:
        verb = self.pick(self.lex.select("commands", lambda: tuple(
            v for v in self._person_transitive if v.base not in _STATIVE)))
        obj = self.obj(verb.objects)
        r = self.rng.random()
        if r < 0.15:
            head = ["don't", verb.base]
        elif r < 0.3:
            head = ["let's", verb.base]
        elif r < 0.4:
            adj = self.pick(["careful", "quiet", "polite", "kind", "calm", "brave", "quick"])
            return ["please", "be", adj, *(self.pp() if self.p(0.4) else ["when", "you",
                                                                          "come", "home"])]
        else:
            head = [*(["please"] if self.p(0.4) else []), verb.base]
        tail: list[str] = []
        if self.p(0.3):
            tail = self.pp()
        elif self.p(0.2):
            tail = [self.pick(self.lex.manner_adverbs)]
        elif self.p(0.2):
            tail = self._fill(self.pick(_TIMES["future"]))
        elif self.p(0.15):
            tail = ["before", "you", self.pick(["leave", "go", "eat", "sleep", "forget"])]
        return [*head, *obj, *tail]

    def _list(self) -> list[str]:
        verb = self.pick(self.lex.select("list verbs", lambda: tuple(
            v for v in self.lex.transitive
            if v.base in _LIST_VERBS and len(self.lex.nouns_for(v.objects)) >= 6)))
        nouns = self.rng.sample(self.lex.nouns_for(verb.objects), self.rng.choice([3, 3, 4]))
        items = [self.np(n, adj_prob=0.1)[0] for n in nouns]
        tokens: list[str] = []
        for i, item in enumerate(items):
            if i == len(items) - 1:
                tokens += ["and"]
            elif i:
                tokens += [","]
            tokens += item
        tense = self.pick(["past", "present", "future", "going_to", "modal"])
        subj, agr, _ = self.subject(verb.subjects, pron_prob=0.6)
        lead = [*subj, *self.vp(verb, agr, tense)]
        if self.p(0.2) and verb.base not in _STATIVE:
            lead = ["please", verb.base]
        return [*lead, *tokens]

    def _numbers(self) -> list[str]:
        kind = self.rng.randrange(9)
        name = self.pick(self.lex.names)[0]
        if kind == 0:
            return [name, self.pick(["is", "was"]), *number_words(self.rng.randint(2, 95)),
                    "years", "old"]
        if kind == 1:
            h = self.rng.randint(1, 12)
            m = self.pick([0, 0, 15, 30, 45, 5, 10, 20, 40, 50])
            if m == 0:
                clock = [*number_words(h), "o'clock"]
            elif m == 15 and self.p(0.5):
                clock = ["a", "quarter", "past", *number_words(h)]
            elif m == 30 and self.p(0.5):
                clock = ["half", "past", *number_words(h)]
            elif m < 10:
                clock = [*number_words(h), "oh", *number_words(m)]
            else:
                clock = [*number_words(h), *number_words(m)]
            veh = self.pick(["train", "bus", "ferry", "plane", "tram", "lesson", "game", "meal"])
            verb = self.pick(["leaves", "arrives", "starts", "ends"])
            tp = [self.pick(["every", "on"]), self.pick(_DAYS)] if self.p(0.3) else []
            return ["the", veh, verb, "at", *clock, *tp]
        if kind == 2:
            noun = self.pick(self.lex.nouns_for(frozenset({"object", "food", "vehicle"})))
            np, agr = self.np(noun, plural=False, definite=True)
            price = number_words(self.rng.randint(2, 999 if "vehicle" in noun.tags else 60))
            verb = "costs" if self.p(0.6) else "cost"
            tail = ["and", *number_words(self.rng.randint(2, 99)), "cents"] if self.p(0.2) else []
            return [*np, verb, *price, "dollars", *tail]
        if kind == 3:
            a, b = self.rng.randint(1, 20), self.rng.randint(1, 20)
            op = self.pick(["plus", "minus", "times"])
            if op == "minus" and b > a:
                a, b = b, a
            res = {"plus": a + b, "minus": a - b, "times": a * b}[op]
            return [*number_words(a), op, *number_words(b), self.pick(["is", "equals", "makes"]),
                    *number_words(res)]
        if kind == 4:
            digits = [_ONES[self.rng.randrange(10)] for _ in range(self.rng.randint(4, 7))]
            whose = self.pick(["my", "your", "his", "her", "our", "their", name + "'s"])
            return [whose, self.pick(["phone", "room", "ticket", "house"]), "number", "is",
                    *["oh" if d == "zero" and self.p(0.5) else d for d in digits]]
        if kind == 5:
            year = self.rng.randint(1900, 2030)
            verb = self.pick([["was", "born"], ["moved", "here"], ["built", "the", "house"],
                              ["bought", "the", "farm"], ["started", "school"]])
            return [name, *verb, "in", *_year_words(year)]
        if kind == 6:
            floor = self.pick(_ORDINALS[1:13])
            return ["the", self.pick(["office", "room", "kitchen", "library", "classroom"]),
                    "is", "on", "the", floor, "floor"]
        if kind == 7:
            n = self.rng.randint(2, 12)
            unit = self.pick(["hours", "days", "weeks", "months", "years"])
            subj, agr, _ = self.subject(frozenset({"person"}), pron_prob=0.6)
            verb = self.pick(["waited", "worked", "traveled", "slept", "stayed", "walked"])
            return [*subj, verb, "for", *number_words(n), unit]
        nth = self.pick(_ORDINALS[1:21])
        return ["today", "is", "the", nth, "of", self.pick(_MONTHS)]

    def _compound(self) -> list[str]:
        r = self.rng.random()
        if r < 0.4:
            conj = self.pick(["and", "but", "so", "because", "while", "before", "after"])
            sep = [","] if conj in ("and", "but", "so") else []
            tense = self.pick(["past", "past", "present", "future"])
            return [*self._clause(tense), *sep, conj, *self._clause(tense)]
        if r < 0.7:
            wh = self.pick(["when", "if", "after", "before"])
            first = self._clause("past" if wh != "if" else "present")
            second = self._clause("past" if wh != "if" else "future")
            return [wh, *first, ",", *second]
        return [*self._clause("past"), "and", "then", *self._short_vp()]

    def _short_vp(self) -> list[str]:
        verb = self.pick(self.lex.select("person verbs", lambda: tuple(
            v for v in self.lex.verbs if "person" in v.subjects)))
        obj = self.obj(verb.objects) if verb.objects else []
        return [verb.past, *obj]

    def _embedded(self) -> list[str]:
        r = self.rng.random()
        if r < 0.6:
            lead = self.pick([["i", "think"], ["i", "hope"], ["we", "know"], ["they", "said"],
                              ["she", "told", "me"], ["he", "believes"], ["i", "heard"],
                              [self.pick(self.lex.names)[0], "says"],
                              [self.pick(self.lex.names)[0], "said"], ["it", "seems"],
                              ["i'm", "sure"], ["we're", "glad"]])
            return [*lead, *(["that"] if self.p(0.5) else []), *self._clause(time=self.p(0.3))]
        noun = self.pick(self.lex.nouns_for(frozenset({"object", "pet"})))
        np, agr = self.np(noun, definite=True)
        lead = self.pick([["do", "you", "know"], ["i", "wonder"], ["can", "you", "tell", "me"],
                          ["nobody", "knows"], ["i", "forgot"]])
        q = "?" if lead[0] in ("do", "can") else "."
        return [*lead, "where", *np, self.be(agr, self.p(0.3)), q]

    def _relative(self) -> list[str]:
        verb = self.pick(self.lex.transitive)
        head = self.noun(verb.subjects)
        np, agr = self.np(head, definite=True, adj_prob=0.1)
        rel = "who" if "person" in head.tags else "that"
        inner = [rel, *self.vp(verb, agr, self.pick(["present", "past"])),
                 *self.np(self.noun(verb.objects, head), adj_prob=0.1)[0]]
        if self.p(0.5):
            fits = self.lex.adjectives_for(head)
            if fits:
                return [*np, *inner, self.be(agr, self.p(0.4)), self.pick(fits).word]
        verb2 = self.pick(self.lex.select(f"intransitive:{head.singular}", lambda: tuple(
            v for v in self.lex.intransitive if v.subjects & head.keys)) or self.lex.intransitive)
        return [*np, *inner, *self.vp(verb2, agr, self.pick(["past", "present", "future"]))]

    def _possessive(self) -> list[str]:
        name, _ = self.pick(self.lex.names)
        noun = self.pick(self._countable_things)
        fits = self.lex.adjectives_for(noun)
        r = self.rng.random()
        if r < 0.5 and fits:
            return [name + "'s", noun.singular, self.pick(["is", "was", "isn't", "wasn't"]),
                    *([self.pick(_DEGREE[:5])] if self.p(0.3) else []), self.pick(fits).word]
        if r < 0.75:
            owner = self.pick(self.lex.nouns_for(frozenset({"person", "animal"})))
            return ["the", owner.singular + "'s", noun.singular, self.pick(["is", "was"]),
                    *self.pp()]
        mine = self.pick(["mine", "yours", "his", "hers", "ours", "theirs"])
        owned = self.pick(self.lex.nouns_for(frozenset({"object", "vehicle", "pet"})))
        return [self.pick(["this", "that"]), owned.singular, "is",
                *(["not"] if self.p(0.3) else []), mine]

    def _ditransitive(self) -> list[str]:
        verb, thing_spec = self.pick([
            (("give", "gives", "gave", "given", "giving"), {"object", "food", "drink"}),
            (("show", "shows", "showed", "shown", "showing"), {"object", "pet", "place"}),
            (("send", "sends", "sent", "sent", "sending"), {"mail", "gift"}),
            (("lend", "lends", "lent", "lent", "lending"), {"object", "money", "vehicle"}),
            (("hand", "hands", "handed", "handed", "handing"), {"object", "food"}),
            (("offer", "offers", "offered", "offered", "offering"), {"food", "drink", "gift"}),
            (("teach", "teaches", "taught", "taught", "teaching"), {"song", "game", "lesson",
                                                                     "poem"}),
            (("tell", "tells", "told", "told", "telling"), {"tellable"}),
            (("buy", "buys", "bought", "bought", "buying"), {"gift", "toy", "food", "book"}),
        ])
        v = Verb(*verb, frozenset({"person"}), frozenset(thing_spec))
        subj, agr, _ = self.subject(v.subjects, pron_prob=0.4)
        to = self.obj(frozenset({"person"}))
        thing = self.np(self.noun(v.objects), adj_prob=0.25)[0]
        return [*subj, *self.vp(v, agr, self.pick(["past", "past", "present", "future",
                                                   "modal", "perfect"])), *to, *thing]

    def _conversation(self) -> list[str]:
        name = self.pick(self.lex.names)[0]
        return self.pick([
            ["good", self.pick(["morning", "afternoon", "evening"]), name, ",", "how", "are",
             "you", "?"],
            ["thank", "you", "very", "much", "for", "the", self.pick(
                self.lex.nouns_for(frozenset({"gift", "meal", "dish", "mail", "tellable"}))
            ).singular],
            ["see", "you", *self._fill(self.pick(_TIMES["future"])), ",", name],
            ["nice", "to", "meet", "you", ",", name],
            ["happy", "birthday", ",", "dear", name],
            ["i'm", "sorry", ",", "i", "didn't", self.pick(["hear", "see", "know"]), "that"],
            ["yes", ",", "i", "think", "so"],
            ["no", ",", "thank", "you", ",", "i'm", self.pick(["fine", "busy", "full"])],
            ["what", "a", "lovely", self.pick(["day", "song", "garden", "surprise", "idea"]),
             "!"],
        ])


def generate_sentences(n: int, seed: int | str = 0, *, unique: bool = True,
                       exclude: Iterable[str] = ()) -> list[Sentence]:
    """``n`` sentences for ``seed``; with ``unique``, no transcript repeats or is in ``exclude``."""
    gen = SentenceGenerator(seed)
    seen = set(exclude)
    out: list[Sentence] = []
    while len(out) < n:
        s = gen.sentence()
        if unique:
            if s.transcript in seen:
                continue
            seen.add(s.transcript)
        out.append(s)
    return out


def vocabulary() -> frozenset[str]:
    """Every lowercase word the word lists and the grammar's own word lists can produce."""
    lex = load_lexicon()
    words: set[str] = set()
    for n in lex.nouns:
        words.update(filter(None, [n.singular, n.plural]))
    for v in lex.verbs:
        words.update([v.base, v.third, v.past, v.participle, v.gerund])
    for a in lex.adjectives:
        words.update(filter(None, [a.word, a.comparative, a.superlative]))
    words.update(lex.manner_adverbs + lex.frequency_adverbs)
    words.update(name for name, _ in lex.names)
    return frozenset(words)
