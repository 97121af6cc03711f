"""The classify task's documents: the label is the strict majority class symbol."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from jaxattn.train.documents import documents
from jaxattn.train.tasks import FIRST_SYMBOL, PAD

# Jitted, sizes static: one program per shape, a few shapes (eagerly, every operation of
# every example would compile on its own).
_documents = jax.jit(documents, static_argnums=(1, 2, 3, 4))


@given(
    seed=st.integers(0, 2**31 - 1),
    length=st.sampled_from([1, 2, 7, 24]),
    classes=st.sampled_from([2, 5]),
    noise=st.sampled_from([0, 6]),
)
def test_the_label_is_the_strict_majority_class_symbol(seed, length, classes, noise):
    vocab = FIRST_SYMBOL + classes + noise
    tokens, labels = _documents(jax.random.key(seed), 16, length, vocab, classes)
    tokens, labels = np.asarray(tokens), np.asarray(labels)
    assert tokens.shape == (16, length) and labels.shape == (16,)
    for row, label in zip(tokens, labels, strict=True):
        real = row != PAD
        assert real.sum() >= 1 and (real[:-1] >= real[1:]).all()  # right-padded
        assert ((row[real] >= FIRST_SYMBOL) & (row[real] < vocab)).all()
        counts = np.bincount(row[real] - FIRST_SYMBOL, minlength=vocab)[:classes]
        assert counts[label] > np.delete(counts, label).max(initial=0)  # strict majority


def test_lengths_and_labels_cover_their_ranges_and_order_is_random():
    tokens, labels = documents(jax.random.key(0), 2000, 12, 10, 3)
    lengths = np.asarray(tokens != PAD).sum(1)
    assert set(lengths.tolist()) == set(range(1, 13))
    shares = np.bincount(np.asarray(labels), minlength=3) / 2000
    assert shares.min() > 0.28 and shares.max() < 0.39  # ties are not class 0's
    # The added class symbol is not always last: it sits anywhere.
    last = np.asarray(tokens)[np.arange(2000), lengths - 1]
    assert (last != FIRST_SYMBOL + np.asarray(labels)).mean() > 0.3


def test_too_many_classes_or_an_empty_length_is_one_line():
    with pytest.raises(ValueError, match=r"task\.length >= 1 \(the longest document\), got 0"):
        documents(jax.random.key(0), 2, 0, 6, 2)
    with pytest.raises(ValueError, match=r"2 <= task\.num_classes <= vocab_size - 3"):
        documents(jax.random.key(0), 2, 5, 6, 4)
