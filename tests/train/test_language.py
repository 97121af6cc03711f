"""The translate task's language pair: every target is the grammar's translation of its
source (against a plain-Python reference), lengths vary, padding only at the end."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxattn.train import language
from jaxattn.train.language import WORDS, sentence_pairs, target_length
from jaxattn.train.tasks import PAD, SEP

KIND = {w: kind for kind, names in language._SOURCE.items() for w in names}


def _translate(words: list[str]) -> list[str]:
    """The reference: parse a source sentence by word kinds and write its translation."""
    verb = next(i for i, w in enumerate(words) if KIND[w] == "verb")

    def phrase(ws):  # DET ADJ* NOUN -> DET' NOUN' ADJ'*
        det, *adjs, noun = ws
        assert KIND[det] == "det" and KIND[noun] == "noun" and all(KIND[a] == "adj" for a in adjs)
        out = []
        for w in (det, noun, *adjs):
            out += language._TARGET[KIND[w]][language._SOURCE[KIND[w]].index(w)]
        return out

    obj = phrase(words[verb + 1 :]) if words[verb + 1 :] else []
    verb_word = words[verb]
    tail = language._TARGET["verb"][language._SOURCE["verb"].index(verb_word)]
    return phrase(words[:verb]) + obj + tail + ["SEP"]


@pytest.mark.parametrize("length", [5, 9, 13])
def test_every_target_is_the_translation_of_its_source(length):
    source, target = jax.jit(sentence_pairs, static_argnums=(1, 2))(jax.random.key(0), 300, length)
    source, target = np.asarray(source), np.asarray(target)
    assert source.shape == (300, length) and target.shape == (300, target_length(length))
    for s, t in zip(source, target, strict=True):
        words = [WORDS[i] for i in s[s != PAD]]
        assert [WORDS[i] for i in t[t != PAD]] == _translate(words)
    # Padding only after the real tokens; SEP ends every target, once.
    for x in (source, target):
        real = x != PAD
        assert (real[:, :-1] >= real[:, 1:]).all()
    assert ((target == SEP).sum(1) == 1).all()
    # Lengths vary over the whole range the grammar allows.
    lengths = (source != PAD).sum(1)
    assert lengths.min() == 3 and lengths.max() == length
    assert len(set((target != PAD).sum(1).tolist())) > 4


def test_the_dictionary_changes_lengths_and_the_order_moves_words():
    source, target = sentence_pairs(jax.random.key(1), 200)
    src_len, tgt_len = (np.asarray(x != PAD).sum(1) for x in (source, target))
    # "a" is dropped and some nouns take an ending: targets (less SEP) are shorter, as long
    # and longer than their sources.
    diff = tgt_len - 1 - src_len
    assert (diff < 0).any() and (diff == 0).any() and (diff > 0).any()
    # The verb comes last (before SEP), and it was never last in a source with an object.
    last = np.asarray(target)[np.arange(200), tgt_len - 2]
    verbs = {w for (w,) in language._TARGET["verb"]}
    assert all(WORDS[i] in verbs for i in last)


def test_same_key_same_pairs_and_a_too_short_length_is_one_line():
    a, b = sentence_pairs(jax.random.key(2), 8), sentence_pairs(jax.random.key(2), 8)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    with pytest.raises(ValueError, match=r"task\.length >= 5"):
        sentence_pairs(jax.random.key(0), 2, 4)
