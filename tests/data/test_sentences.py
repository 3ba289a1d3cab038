"""The offline English text source of the synthetic corpus."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from zipasr.data.synth.sentences import (
    MAX_WORDS,
    MIN_WORDS,
    SentenceGenerator,
    generate_sentences,
    load_lexicon,
    number_words,
    to_transcript,
    vocabulary,
)

CLEAN = re.compile(r"^[A-Z']+( [A-Z']+)*$")


@pytest.fixture(scope="module")
def sentences():
    return generate_sentences(3000, seed=7)


def test_vocabulary_is_large_enough(sentences):
    assert len(vocabulary()) >= 500
    used = Counter(w for s in sentences for w in s.words)
    assert len(used) >= 500  # reached in practice, not only in the word lists


def test_lengths(sentences):
    lengths = Counter(len(s.words) for s in sentences)
    assert min(lengths) >= MIN_WORDS == 3
    assert max(lengths) <= MAX_WORDS == 15
    assert len(lengths) >= 10  # varied, not one fixed template length


def test_text_and_transcript(sentences):
    for s in sentences:
        assert s.text == s.text.lower(), s  # espeak spells short uppercase words
        assert CLEAN.match(s.transcript), s.transcript
        assert s.transcript == to_transcript(s.text)
        assert len(s.words) == len(re.findall(r"[a-z']+", s.text))


def test_deterministic_for_a_seed():
    a = generate_sentences(300, seed=3)
    assert a == generate_sentences(300, seed=3)
    assert a != generate_sentences(300, seed=4)
    assert generate_sentences(50, seed="0:dev") == generate_sentences(50, seed="0:dev")


def test_unique_and_exclude():
    a = generate_sentences(500, seed=1)
    assert len({s.transcript for s in a}) == 500
    b = generate_sentences(500, seed=2, exclude=[s.transcript for s in a])
    assert not {s.transcript for s in a} & {s.transcript for s in b}


def test_syntax_is_varied(sentences):
    texts = [s.text for s in sentences]
    assert sum(t.endswith("?") for t in texts) > 0.08 * len(texts)  # questions
    assert sum("," in t for t in texts) > 0.05 * len(texts)  # lists, clauses
    assert sum("'" in t for t in texts) > 0.05 * len(texts)  # contractions, possessives
    numbers = {w for n in range(1, 100) for w in number_words(n)} | {"hundred", "o'clock"}
    assert sum(bool(numbers & set(t.split())) for t in texts) > 0.05 * len(texts)
    starts = Counter(t.split()[0] for t in texts)
    assert starts.most_common(1)[0][1] < 0.3 * len(texts)  # "the" leads, not dominates


def test_agreement_samples():
    gen = SentenceGenerator(seed=11)
    texts = [gen.sentence().text for _ in range(2000)]
    bad = re.compile(r"\b(i is|i are|he are|she are|they is|we is|he am|they am|a [aeio]\w+)\b")
    offenders = [t for t in texts if bad.search(t)]
    assert not offenders, offenders[:5]


def test_number_words():
    assert number_words(0) == ["zero"]
    assert number_words(21) == ["twenty", "one"]
    assert number_words(100) == ["one", "hundred"]
    assert number_words(312) == ["three", "hundred", "and", "twelve"]
    assert number_words(1005) == ["one", "thousand", "and", "five"]
    assert number_words(2340) == ["two", "thousand", "three", "hundred", "and", "forty"]
    with pytest.raises(ValueError):
        number_words(-1)


def test_word_lists_avoid_heteronyms_and_have_license():
    from importlib import resources

    heteronyms = {"read", "lead", "live", "wind", "tear", "close", "minute", "present", "record",
                  "use", "bow", "wound", "object", "desert"}
    assert not heteronyms & vocabulary()
    for f in resources.files("zipasr.data.synth").joinpath("text").iterdir():
        if f.name.endswith(".txt"):
            assert "Apache License, Version 2.0" in f.read_text()[:600], f.name
    lex = load_lexicon()
    assert len(lex.nouns) > 200 and len(lex.verbs) > 150 and len(lex.adjectives) > 100
