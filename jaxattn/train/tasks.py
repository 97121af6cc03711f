"""Synthetic sequence tasks, drawn on device from a PRNG key.

Every task with length ``L`` (``task.length``) lays out one sequence of ``2L + 2`` tokens
(:func:`sequence_length`, the one place that counts them)::

    BOS x1 .. xL SEP y1 .. yL

with ``xi`` drawn uniformly from the symbols ``[FIRST_SYMBOL, vocab_size)`` and ``y`` the
answer:

- ``copy``: ``y = x``;
- ``reverse``: ``y = x`` reversed;
- ``sort``: ``y = x`` sorted ascending;
- ``next_token``: the same sequence as ``copy``, but every token after BOS is scored (plain
  language modelling) instead of only the answer.

Training is next-token prediction: ``inputs = seq[:, :-1]`` and ``targets = seq[:, 1:]``,
both ``[B, 2L + 1]``. ``loss_mask`` says which target positions are scored. A prefix-LM
(``model.kind=prefix_lm``) gets the same batch and the prompt's length, ``L + 2``.

The other two kinds of model read the tasks differently (:func:`make_batch`):

- an encoder-decoder (``model.kind=encoder_decoder``) gets ``x`` as its source and
  ``BOS y`` as its target's input, ``y SEP`` as its targets, every one scored: copy, reverse
  and sort as source -> target; and ``translate``, the synthetic language pair of
  :mod:`jaxattn.train.language` (padded, variable lengths; PAD targets not scored);
- a classifier (``model.kind=classifier``) gets ``classify``'s documents
  (:mod:`jaxattn.train.documents`, padded) and their class as a target of length 1.

Token ids: ``PAD = 0`` (never produced here; reserved for padded batches), ``BOS = 1``,
``SEP = 2``, symbols ``3 .. vocab_size - 1``.

The task config is static (a frozen, hashable dataclass) and so is the batch size, so
``jax.jit(make_batch, static_argnums=(0, 2))`` compiles one program per task and size. The
config's fields are validated where it is loaded (:mod:`jaxattn.train.config`, which takes
the task names from :data:`TASKS`), not here.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp

__all__ = [
    "BOS",
    "FIRST_SYMBOL",
    "PAD",
    "SEP",
    "SEQUENCE_TASKS",
    "TASKS",
    "TASKS_OF_KIND",
    "Batch",
    "TaskConfig",
    "answer_length",
    "eval_batch",
    "make_batch",
    "make_sequences",
    "model_length",
    "prompt_length",
    "sequence_length",
    "token_label",
]


@dataclass(frozen=True)
class TaskConfig:
    name: str = "copy"  # copy | reverse | sort | next_token | translate | classify
    length: int = 10  # L, symbols per sequence (translate, classify: the longest)
    vocab_size: int = 16  # PAD=0, BOS=1, SEP=2, symbols 3..vocab_size-1
    batch_size: int = 64  # training sequences per step
    eval_size: int = 1000  # held-out sequences for exact-match
    eval_seed: int = 1_000_003  # held-out set seed, never used for training batches
    num_classes: int = 3  # classify: the classes (the first num_classes symbols name them)


PAD, BOS, SEP, FIRST_SYMBOL = 0, 1, 2, 3

# task.name -> the answer y ``[B, L]`` of the symbols x ``[B, L]``.
_ANSWERS = {
    "copy": lambda x: x,
    "reverse": lambda x: x[:, ::-1],
    "sort": lambda x: jnp.sort(x, axis=1),
    "next_token": lambda x: x,  # copy's sequences, every token scored (see _loss_mask_row)
}
SEQUENCE_TASKS = tuple(_ANSWERS)  # the tasks laid out as BOS x SEP y
TASKS = (*SEQUENCE_TASKS, "translate", "classify")
# model.kind -> the tasks it can learn (the trainer's config checks a run against it).
TASKS_OF_KIND = {
    "decoder": SEQUENCE_TASKS,
    "prefix_lm": ("copy", "reverse", "sort"),
    "encoder_decoder": ("copy", "reverse", "sort", "translate"),
    "classifier": ("classify",),
}
_SPECIAL = {PAD: "PAD", BOS: "BOS", SEP: "SEP"}


def token_label(token: int) -> str:
    """How a token is shown to people: its id, or PAD, BOS, SEP."""
    return _SPECIAL.get(int(token), str(int(token)))


class Batch(NamedTuple):
    """One batch framed as next-token prediction (for a decoder; see :func:`make_batch` for
    the other kinds).

    inputs: int32 ``[B, 2L + 1]``, the sequence without its last token.
    targets: int32 ``[B, 2L + 1]``, the sequence without BOS (``targets[:, t]`` follows
        ``inputs[:, : t + 1]``).
    loss_mask: float32 ``[B, 2L + 1]``, 1.0 where the target is scored, else 0.0.
    source: an encoder-decoder's source tokens ``[B, S]``, else None.
    prefix_lengths: a prefix-LM's prompt lengths, int32 ``[B]``, else None.
    """

    inputs: jax.Array
    targets: jax.Array
    loss_mask: jax.Array
    source: jax.Array | None = None
    prefix_lengths: jax.Array | None = None


def _check_batch_size(batch_size) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int (a static size), got {batch_size!r}")
    return batch_size


def prompt_length(task: TaskConfig) -> int:
    """Tokens given to greedy decoding: ``BOS x1 .. xL SEP``, i.e. ``L + 2``."""
    return task.length + 2


def answer_length(task: TaskConfig) -> int:
    """Tokens greedy decoding must produce after the prompt: ``y1 .. yL``, i.e. ``L``."""
    return task.length


def sequence_length(task: TaskConfig) -> int:
    """Tokens of a whole sequence ``BOS x SEP y``, ``2L + 2``: what ``model.max_len`` must
    cover (the model is fed ``2L + 1`` of them, and greedy decoding all of them)."""
    return prompt_length(task) + answer_length(task)


def make_sequences(task: TaskConfig, key: jax.Array, batch_size: int) -> jax.Array:
    """Full sequences ``BOS x SEP y``: int32 ``[B, 2L + 2]`` with ``B = batch_size``.

    ``key`` is a PRNG key (``jax.random.key`` or ``jax.random.PRNGKey``); the same key, task
    and batch size always give the same sequences.
    """
    answer = _ANSWERS.get(task.name)
    if answer is None:  # a TaskConfig built by hand, not loaded
        raise ValueError(
            f"task.name must be one of {', '.join(_ANSWERS)} (BOS x SEP y sequences); "
            f"got {task.name!r}"
        )
    b = _check_batch_size(batch_size)
    x = jax.random.randint(key, (b, task.length), FIRST_SYMBOL, task.vocab_size, dtype=jnp.int32)
    y = answer(x)
    bos = jnp.full((b, 1), BOS, jnp.int32)
    sep = jnp.full((b, 1), SEP, jnp.int32)
    return jnp.concatenate([bos, x, sep, y], axis=1)


def _loss_mask_row(task: TaskConfig) -> jax.Array:
    """float32 ``[2L + 1]``: which target positions are scored."""
    n = sequence_length(task) - 1
    if task.name == "next_token":
        return jnp.ones((n,), jnp.float32)
    # Target index t holds sequence position t + 1, and y1..yL follow the prompt, so the
    # answer is targets[prompt_length - 1:] (= targets[L+1:]). Predicting x is impossible
    # (it is random), and SEP is a constant, so only the answer is scored.
    return (jnp.arange(n) >= prompt_length(task) - 1).astype(jnp.float32)


def make_batch(task: TaskConfig, key: jax.Array, batch_size: int, kind: str = "decoder") -> Batch:
    """A training batch of ``batch_size`` fresh examples drawn from ``key``, for a model of
    ``kind`` (``model.kind``).

    A decoder's :class:`Batch` has ``inputs``/``targets`` int32 ``[B, 2L + 1]`` and
    ``loss_mask`` float32 ``[B, 2L + 1]``: for ``copy``, ``reverse`` and ``sort`` 1.0 on the
    ``L`` answer targets ``y1 .. yL`` only (``targets[:, L + 1:]``); for ``next_token`` 1.0
    on every target (every token after BOS). A prefix-LM's has ``prefix_lengths``, ``L + 2``.

    An encoder-decoder's: ``source`` ``[B, S]``, ``inputs`` ``BOS y`` and ``targets``
    ``y SEP`` ``[B, T]`` (S = L, T = L + 1 for copy, reverse and sort; for ``translate``
    :func:`jaxattn.train.language.sentence_pairs`, right-padded, ``loss_mask`` 0 at PAD).
    A classifier's (``classify``): ``inputs`` the documents ``[B, L]`` (right-padded),
    ``targets`` their classes ``[B, 1]``, ``loss_mask`` ones ``[B, 1]``.

    Jittable with ``task``, ``batch_size`` and ``kind`` static: ``jax.jit(make_batch,
    static_argnums=(0, 2, 3))``.
    """
    b = _check_batch_size(batch_size)
    if task.name == "classify":
        from jaxattn.train.documents import documents  # it draws with this module's ids

        docs, labels = documents(key, b, task.length, task.vocab_size, task.num_classes)
        return Batch(docs, labels[:, None], jnp.ones((b, 1), jnp.float32))
    bos = jnp.full((b, 1), BOS, jnp.int32)
    if task.name == "translate":
        from jaxattn.train.language import sentence_pairs

        source, target = sentence_pairs(key, b, task.length)
        inputs = jnp.concatenate([bos, target[:, :-1]], axis=1)
        return Batch(inputs, target, (target != PAD).astype(jnp.float32), source=source)
    seq = make_sequences(task, key, b)
    if kind == "encoder_decoder":
        x, y = seq[:, 1 : task.length + 1], seq[:, prompt_length(task) :]
        targets = jnp.concatenate([y, jnp.full((b, 1), SEP, jnp.int32)], axis=1)
        inputs = jnp.concatenate([bos, y], axis=1)
        return Batch(inputs, targets, jnp.ones(targets.shape, jnp.float32), source=x)
    row = _loss_mask_row(task)
    mask = jnp.broadcast_to(row[None, :], (b, row.shape[0]))
    prefix = jnp.full((b,), prompt_length(task), jnp.int32) if kind == "prefix_lm" else None
    return Batch(seq[:, :-1], seq[:, 1:], mask, prefix_lengths=prefix)


def model_length(task: TaskConfig, kind: str = "decoder") -> int:
    """The longest token sequence a model of ``kind`` reads for ``task`` (what
    ``model.max_len`` must cover): a decoder's whole ``BOS x SEP y``; an encoder-decoder's
    longer of its source and its target (``BOS y``, or a translation's longest); a
    classifier's longest document."""
    if task.name == "classify":
        return task.length
    if task.name == "translate":
        from jaxattn.train.language import target_length

        return max(task.length, target_length(task.length))
    if kind == "encoder_decoder":
        return task.length + 1
    return sequence_length(task)


# The trainer's PRNG: "rbg" compiles several times faster than the default threefry on CPU
# (measured: about 1 s of a 10 s training run went into compiling threefry kernels), and is
# as deterministic for a given seed and backend.
PRNG_IMPL = "rbg"


@functools.partial(jax.jit, static_argnums=0)
def seed_key(seed: int) -> jax.Array:
    """The PRNG key the trainer and the held-out set derive everything from. ``seed``: a
    Python int (static: one small program per seed, where calling it eagerly compiled three,
    every run)."""
    return jax.random.key(seed, impl=PRNG_IMPL)


def eval_batch(task: TaskConfig, kind: str = "decoder") -> Batch:
    """The held-out set: ``task.eval_size`` examples from ``seed_key(task.eval_seed)``, as
    :func:`make_batch` frames them for a model of ``kind``.

    Fixed for a task config, so every evaluation of a run (and of runs with the same task)
    scores the same sequences. The trainer draws its batches from keys derived from
    ``train.seed``, never from ``eval_seed``, so this batch is never trained on. Note that
    this keeps the *draws* apart, not the sequences: when the number of distinct inputs,
    ``(vocab_size - 3) ** L``, is small, training batches will contain the same sequences
    by chance, and the held-out score then measures memorisation as much as generalisation.
    """
    return make_batch(task, seed_key(task.eval_seed), task.eval_size, kind)
