"""A synthetic language pair with one fixed, deterministic translation: the ``translate``
task's sentences, drawn on device from a PRNG key.

The source language is English-like, subject-verb-object, adjectives before their noun::

    DET ADJ* NOUN VERB [DET ADJ* NOUN]          e.g.  the big old cat sees a dog

The target language puts the verb last and adjectives after their noun, and its dictionary
changes lengths: ``a`` has no translation (the word is dropped) and half of the nouns take a
case ending, a second token::

    DET' NOUN' [-s] ADJ'* [DET' NOUN' [-s] ADJ'*] VERB'   e.g.  le chat-s grand vieux chien voit

So a model must reorder (the verb moves over the whole object, each adjective over its
noun), look every word up, and emit the right number of tokens for each: 100% is reachable,
since nothing is random once the source is drawn. Sentences have 3 to 5 + 2m words, m the
most adjectives a noun takes, (``length`` - 5) // 2: at most ``length``. Targets end with
``SEP``.

Vocabulary (one table for both languages; ids as in :mod:`jaxattn.train.tasks`): PAD, BOS,
SEP, then the source words, then the target words: :data:`VOCAB_SIZE` ids in all.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxattn.train.tasks import PAD, SEP, _check_batch_size

__all__ = ["VOCAB_SIZE", "WORDS", "max_adjectives", "sentence_pairs", "target_length"]

_SOURCE = {
    "det": ["the", "a"],
    "adj": ["big", "old", "red", "small", "new", "blue"],
    "noun": ["cat", "dog", "bird", "fish", "tree", "house", "car", "book"],
    "verb": ["sees", "likes", "eats", "finds", "takes", "makes"],
}
# Each source word's translation: its target words, in order (none for "a").
_TARGET = {
    "det": [["le"], []],
    "adj": [["grand"], ["vieux"], ["rouge"], ["petit"], ["neuf"], ["bleu"]],
    "noun": [["chat"], ["chien"], ["oiseau"], ["poisson"]]
    + [[w, "-s"] for w in ("arbre", "maison", "voiture", "livre")],
    "verb": [["voit"], ["aime"], ["mange"], ["trouve"], ["prend"], ["fait"]],
}


def _vocabulary():
    """(the id of each word, the two target ids of each source id, -1 = none)."""
    words = ["PAD", "BOS", "SEP"]
    first = {}
    for kind, names in _SOURCE.items():
        first[kind] = len(words)
        words += names
    targets = sorted({w for kind in _TARGET.values() for t in kind for w in t}, key=str)
    target_id = {w: len(words) + i for i, w in enumerate(targets)}
    words += targets
    table = np.full((len(words), 2), -1, np.int32)
    for kind in _SOURCE:
        for i, translation in enumerate(_TARGET[kind]):
            for j, w in enumerate(translation):
                table[first[kind] + i, j] = target_id[w]
    return tuple(words), first, table


WORDS, _FIRST, _TRANSLATION = _vocabulary()
VOCAB_SIZE = len(WORDS)  # the task's vocab_size: both languages and the three specials


def max_adjectives(length: int) -> int:
    """The most adjectives a noun takes in sentences of at most ``length`` words (>= 5)."""
    return (length - 5) // 2


def target_length(length: int) -> int:
    """The longest target of sources of at most ``length`` words, its ``SEP`` included:
    two nouns with endings and the most adjectives, the verb, two determiners and SEP."""
    return 2 * (2 + max_adjectives(length)) + 1 + 2 + 1


def _compact(tokens, present, width: int):
    """Each row's present tokens moved to its front, in order, PAD after: ``[B, width]``."""
    b = tokens.shape[0]
    position = jnp.where(present, jnp.cumsum(present, axis=1) - 1, width)  # width: dropped
    out = jnp.full((b, width), PAD, jnp.int32)
    rows = jnp.broadcast_to(jnp.arange(b)[:, None], tokens.shape)
    return out.at[rows, position].set(tokens, mode="drop")


def sentence_pairs(key: jax.Array, batch_size: int, length: int = 9):
    """``batch_size`` sentence pairs drawn from ``key``: int32 ``(source [B, length],
    target [B, target_length(length)])``, each right-padded with PAD; a target ends with
    SEP. The same key and sizes always give the same pairs.
    """
    b = _check_batch_size(batch_size)
    m = max_adjectives(length)
    if m < 0:
        raise ValueError(f"translate needs task.length >= 5 (a sentence's 5 slots), got {length}")
    k = jax.random.split(key, 10)

    def word(kind, key, shape=()):
        n = len(_SOURCE[kind])
        return _FIRST[kind] + jax.random.randint(key, (b, *shape), 0, n, dtype=jnp.int32)

    det1, det2 = word("det", k[0]), word("det", k[1])
    adj1, adj2 = word("adj", k[2], (m,)), word("adj", k[3], (m,))
    noun1, noun2, verb = word("noun", k[4]), word("noun", k[5]), word("verb", k[6])
    n_adj1 = jax.random.randint(k[7], (b, 1), 0, m + 1)
    n_adj2 = jax.random.randint(k[8], (b, 1), 0, m + 1)
    has_object = jax.random.bernoulli(k[9], 0.5, (b, 1))
    slots = jnp.arange(m)[None]
    ones = jnp.ones((b, 1), bool)
    # (words [B, n], present [B, n]) of each part of a sentence.
    subject_adj = (adj1, slots < n_adj1)
    object_adj = (adj2, (slots < n_adj2) & has_object)
    parts = {
        "det1": (det1[:, None], ones),
        "adj1": subject_adj,
        "noun1": (noun1[:, None], ones),
        "verb": (verb[:, None], ones),
        "det2": (det2[:, None], has_object),
        "adj2": object_adj,
        "noun2": (noun2[:, None], has_object),
    }

    def sentence(order, translate: bool):
        words = jnp.concatenate([parts[p][0] for p in order], axis=1)
        present = jnp.concatenate([parts[p][1] for p in order], axis=1)
        if translate:  # each word -> its (up to) two target words
            pair = jnp.asarray(_TRANSLATION)[words]  # [B, n, 2]
            words = pair.reshape(b, -1)
            present = (jnp.repeat(present, 2, axis=1)) & (words >= 0)
        return words, present

    source = _compact(
        *sentence(("det1", "adj1", "noun1", "verb", "det2", "adj2", "noun2"), False), length
    )
    words, present = sentence(("det1", "noun1", "adj1", "det2", "noun2", "adj2", "verb"), True)
    width = target_length(length)
    words = jnp.concatenate([words, jnp.full((b, 1), SEP, jnp.int32)], axis=1)
    present = jnp.concatenate([present, ones], axis=1)
    return source, _compact(words, present, width)
