"""Synthetic tasks: layout, answers against NumPy, loss masks in closed form, keys, errors."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from jaxattn.train import tasks
from jaxattn.train.tasks import TaskConfig

L, V, B = 5, 9, 32


def cfg(name="copy", **kw):
    return TaskConfig(name=name, **{"length": L, "vocab_size": V, "eval_size": 16, **kw})


def sequences(name, key=0, batch=B, **kw):
    return np.asarray(tasks.make_sequences(cfg(name, **kw), jax.random.key(key), batch))


def test_constants():
    assert (tasks.PAD, tasks.BOS, tasks.SEP, tasks.FIRST_SYMBOL) == (0, 1, 2, 3)
    assert tasks.SEQUENCE_TASKS == ("copy", "reverse", "sort", "next_token")
    assert tasks.TASKS == (*tasks.SEQUENCE_TASKS, "translate", "classify")


@pytest.mark.parametrize("name", tasks.SEQUENCE_TASKS)
def test_layout_and_symbol_range(name):
    seq = sequences(name)
    assert seq.shape == (B, 2 * L + 2)
    assert seq.dtype == np.int32
    assert (seq[:, 0] == tasks.BOS).all()
    assert (seq[:, L + 1] == tasks.SEP).all()
    body = np.concatenate([seq[:, 1 : L + 1], seq[:, L + 2 :]], axis=1)
    assert body.min() >= tasks.FIRST_SYMBOL
    assert body.max() < V
    # Uniform over the 6 symbols: 32 * 5 draws see every one of them (fixed key, not luck).
    assert set(np.unique(seq[:, 1 : L + 1])) == set(range(tasks.FIRST_SYMBOL, V))


@pytest.mark.parametrize(
    ("name", "answer"),
    [
        ("copy", lambda x: x),
        ("reverse", lambda x: x[:, ::-1]),
        ("sort", lambda x: np.sort(x, axis=1)),
        ("next_token", lambda x: x),
    ],
)
def test_answers_match_numpy(name, answer):
    seq = sequences(name)
    x, y = seq[:, 1 : L + 1], seq[:, L + 2 :]
    np.testing.assert_array_equal(y, answer(x))


def test_same_key_gives_same_x_across_tasks():
    # The task only changes the answer half; the drawn symbols are the same for a given key.
    xs = [sequences(name)[:, : L + 2] for name in tasks.SEQUENCE_TASKS]
    for x in xs[1:]:
        np.testing.assert_array_equal(x, xs[0])


@pytest.mark.parametrize("name", tasks.SEQUENCE_TASKS)
def test_batch_is_shifted_sequence(name):
    task = cfg(name)
    key = jax.random.key(3)
    seq = np.asarray(tasks.make_sequences(task, key, B))
    batch = tasks.make_batch(task, key, B)
    assert isinstance(batch, tasks.Batch)
    assert batch.source is None and batch.prefix_lengths is None  # a decoder's batch
    for a in batch[:3]:
        assert a.shape == (B, 2 * L + 1)
    assert batch.inputs.dtype == batch.targets.dtype == np.int32
    assert batch.loss_mask.dtype == np.float32
    np.testing.assert_array_equal(batch.inputs, seq[:, :-1])
    np.testing.assert_array_equal(batch.targets, seq[:, 1:])


@pytest.mark.parametrize("name", ["copy", "reverse", "sort"])
def test_loss_mask_scores_exactly_the_answer_closed_form(name):
    batch = tasks.make_batch(cfg(name, length=3), jax.random.key(0), 2)
    # targets = x1 x2 x3 SEP y1 y2 y3: only y1..y3 are scored.
    expected = np.array([[0, 0, 0, 0, 1, 1, 1]] * 2, np.float32)
    np.testing.assert_array_equal(batch.loss_mask, expected)


@pytest.mark.parametrize("name", ["copy", "reverse", "sort"])
def test_loss_mask_selects_the_answer_targets(name):
    batch = tasks.make_batch(cfg(name), jax.random.key(1), B)
    seq = sequences(name, key=1)
    mask = np.asarray(batch.loss_mask).astype(bool)
    assert mask.sum(axis=1).tolist() == [L] * B
    np.testing.assert_array_equal(np.asarray(batch.targets)[mask].reshape(B, L), seq[:, L + 2 :])


def test_next_token_mask_scores_every_position_after_bos():
    batch = tasks.make_batch(cfg("next_token", length=3), jax.random.key(0), 4)
    np.testing.assert_array_equal(batch.loss_mask, np.ones((4, 7), np.float32))


def test_prompt_answer_and_sequence_lengths():
    task = cfg("reverse", length=7)
    assert tasks.prompt_length(task) == 9
    assert tasks.answer_length(task) == 7
    assert tasks.sequence_length(task) == 16  # 2 * 7 + 2
    seq = np.asarray(tasks.make_sequences(task, jax.random.key(0), 2))
    assert seq.shape[1] == tasks.sequence_length(task)
    assert (seq[:, tasks.prompt_length(task) - 1] == tasks.SEP).all()


def test_deterministic_for_a_key_and_different_across_keys():
    task = cfg("sort")
    a = tasks.make_batch(task, jax.random.key(7), B)
    b = tasks.make_batch(task, jax.random.key(7), B)
    c = tasks.make_batch(task, jax.random.key(8), B)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.inputs, c.inputs)


def test_legacy_uint32_keys_work():
    seq = tasks.make_sequences(cfg(), jax.random.PRNGKey(0), 3)
    assert seq.shape == (3, 2 * L + 2)


def test_eval_batch_is_fixed_and_distinct_from_training_batches():
    task = cfg("copy", eval_size=16, eval_seed=123)
    e1, e2 = tasks.eval_batch(task), tasks.eval_batch(task)
    assert e1.inputs.shape == (16, 2 * L + 1)
    for x, y in zip(e1, e2, strict=True):
        np.testing.assert_array_equal(x, y)
    # Exactly the batch drawn from the trainer's key for eval_seed.
    ref = tasks.make_batch(task, tasks.seed_key(123), 16)
    np.testing.assert_array_equal(e1.inputs, ref.inputs)
    # A training batch (any other key) is a different set of sequences.
    train = tasks.make_batch(task, jax.random.fold_in(tasks.seed_key(0), 0), 16)
    assert not np.array_equal(e1.inputs, train.inputs)
    # Another eval seed gives another held-out set.
    other = tasks.eval_batch(dataclasses.replace(task, eval_seed=124))
    assert not np.array_equal(e1.inputs, other.inputs)


@pytest.mark.parametrize("name", tasks.SEQUENCE_TASKS)
def test_jit_matches_eager(name):
    task = cfg(name)
    jitted = jax.jit(tasks.make_batch, static_argnums=(0, 2))
    key = jax.random.key(5)
    for x, y in zip(jitted(task, key, 4), tasks.make_batch(task, key, 4), strict=True):
        np.testing.assert_array_equal(x, y)


def test_traced_key_inside_scan():
    # The trainer draws batches from traced keys inside lax.scan with the task closed over.
    task = cfg("reverse")

    def body(carry, key):
        return carry, tasks.make_batch(task, key, 2).targets

    keys = jax.random.split(jax.random.key(0), 3)
    _, targets = jax.jit(lambda k: jax.lax.scan(body, 0, k))(keys)
    assert targets.shape == (3, 2, 2 * L + 1)


def test_unknown_task_of_a_hand_built_config_lists_allowed_names():
    # Loaded configs are validated (tests/train/test_config.py); a TaskConfig built by hand
    # with an unknown name must not silently draw another task's sequences.
    with pytest.raises(
        ValueError,
        match=r"task\.name must be one of copy, reverse, sort, next_token \(BOS x SEP y "
        r"sequences\); got 'copyy'",
    ):
        tasks.make_batch(cfg("copyy"), jax.random.key(0), 2)


@pytest.mark.parametrize("size", [0, -1, 2.0, True])
def test_bad_batch_size(size):
    with pytest.raises(ValueError, match=r"batch_size must be a positive int"):
        tasks.make_batch(cfg(), jax.random.key(0), size)


def test_smallest_vocab_has_one_symbol():
    seq = np.asarray(tasks.make_sequences(cfg("sort", vocab_size=4), jax.random.key(0), 3))
    assert (seq[:, 1 : L + 1] == tasks.FIRST_SYMBOL).all()
