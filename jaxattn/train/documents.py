"""Variable-length "documents" whose class depends on the whole sequence: the ``classify``
task, drawn on device from a PRNG key.

A document holds 1 to ``length`` symbols, right-padded with PAD. The first ``num_classes``
symbols are the class symbols, the others noise; the document's class is the class symbol
it holds most often, by a strict majority (the generator makes it so: ties never occur). No
single position decides it: a model must count over every real token, and padding must count
for nothing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxattn.train.tasks import FIRST_SYMBOL, PAD

__all__ = ["documents"]


def documents(key: jax.Array, batch_size: int, length: int, vocab_size: int, num_classes: int):
    """``batch_size`` documents drawn from ``key``: int32 ``(tokens [B, length], labels [B])``.

    Lengths are uniform in ``[1, length]``; each real token is drawn uniformly from the
    symbols ``[FIRST_SYMBOL, vocab_size)``, then one more of the most frequent class symbol
    (one of them drawn at random on a tie, any class when there is none) is put at a random
    place, which makes its majority strict. ``labels[b]`` is that class, in
    ``[0, num_classes)``: each class about as often as the others.
    """
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ValueError(f"classify needs task.length >= 1 (the longest document), got {length!r}")
    if not 2 <= num_classes <= vocab_size - FIRST_SYMBOL:
        raise ValueError(
            f"classify needs 2 <= task.num_classes <= vocab_size - {FIRST_SYMBOL} "
            f"(the class symbols are among the symbols), got {num_classes} with vocab_size "
            f"{vocab_size}"
        )
    k_len, k_tok, k_perm, k_tie = jax.random.split(key, 4)
    b = batch_size
    n = jax.random.randint(k_len, (b, 1), 1, length + 1)  # real tokens per document
    pos = jnp.arange(length)[None]
    drawn = jax.random.randint(k_tok, (b, length), FIRST_SYMBOL, vocab_size, dtype=jnp.int32)
    first_n1 = pos < n - 1  # the n - 1 drawn tokens; the last real slot gets the class symbol
    symbols = FIRST_SYMBOL + jnp.arange(num_classes)
    counts = jnp.sum((drawn[:, :, None] == symbols[None, None]) & first_n1[:, :, None], axis=1)
    # The most frequent; a tie broken at random (by less than one count), never by order.
    tie = jax.random.uniform(k_tie, counts.shape, maxval=0.5)
    labels = jnp.argmax(counts + tie, axis=1).astype(jnp.int32)
    tokens = jnp.where(pos == n - 1, FIRST_SYMBOL + labels[:, None], drawn)
    # A random order of the n real tokens, PAD after them.
    order = jnp.argsort(jnp.where(pos < n, jax.random.uniform(k_perm, (b, length)), 2.0), axis=1)
    tokens = jnp.take_along_axis(tokens, order, axis=1)
    return jnp.where(pos < n, tokens, PAD), labels
