"""Training steps: pure, jitted, fused in one loop; and the held-out evaluation.

Data flow: a step key -> ``tasks.make_batch`` on device -> ``TinyDecoder`` -> loss ->
gradients -> Optax update, ``steps_per_call`` of them in one jitted loop with the
parameter and optimizer buffers donated, so Python runs once per chunk, not once per step.
What a run builds from its config (schedule, optimizer, abstract state, shardings, these
programs) is built once, by :func:`jaxattn.train.plan.make_plan`; the functions here take
those objects and never derive them again.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxattn.nn import Classifier, EncoderDecoder, ModelConfig, decoding
from jaxattn.nn.config import DECODER_KINDS
from jaxattn.nn.model import TinyDecoder
from jaxattn.train import sharding, tasks
from jaxattn.train.config import Config
from jaxattn.train.optim import cross_entropy, schedule_count, token_accuracy


def build_model(config: Config, seed: int | None = None) -> nnx.Module:
    """The model of ``config.model.kind`` (TinyDecoder for a decoder or a prefix-LM,
    Classifier, EncoderDecoder), initialised from ``seed`` (default ``train.seed``)."""
    seed = config.train.seed if seed is None else seed
    return _new_model(config.model, config.task.vocab_size, config.task.num_classes, seed)


def _new_model(model: ModelConfig, vocab_size: int, num_classes: int, seed: int):
    rngs = nnx.Rngs(params=tasks.seed_key(seed))
    if model.kind == "classifier":
        return Classifier(model, vocab_size, num_classes, rngs=rngs)
    if model.kind == "encoder_decoder":
        return EncoderDecoder(model, vocab_size, rngs=rngs)
    return TinyDecoder(model, vocab_size, rngs=rngs)


def logits_of(model, batch: tasks.Batch, key=None):
    """float32 logits ``[B, T, V]`` of ``batch``'s targets, whatever the model's kind (a
    classifier's ``[B, 1, C]``: its class is a target of length 1)."""
    if isinstance(model, Classifier):
        return model(batch.inputs, key=key)[:, None]
    if isinstance(model, EncoderDecoder):
        return model(batch.source, batch.inputs, key=key)
    return model(batch.inputs, prefix_lengths=batch.prefix_lengths, key=key)


def updates(config: Config) -> int:
    """Optimizer updates in a run: ``train.steps`` counts micro-batches, and
    ``optim.accumulate_steps`` of them make one update (what the schedules count)."""
    return max(1, -(-config.train.steps // config.optim.accumulate_steps))


def loss_fn(params, graphdef, batch: tasks.Batch, key, label_smoothing: float):
    """Mean label-smoothed cross-entropy over scored tokens, and the token accuracy."""
    logits = logits_of(nnx.merge(graphdef, params), batch, key)
    loss = cross_entropy(logits, batch.targets, batch.loss_mask, label_smoothing)
    return loss, token_accuracy(logits, batch.targets, batch.loss_mask)


def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def make_train_chunk(
    config: Config,
    graphdef,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
    *,
    mesh=None,
    shardings=None,
):
    """A jitted ``(params, opt_state, base_key, start_step, n, steps=None) -> (params,
    opt_state, metrics)``.

    Runs ``steps`` steps (an int32 scalar, traced: one compiled program serves every count
    up to ``n``, so a last, shorter chunk compiles nothing new; None = ``n``) in one loop;
    step ``i`` draws its batch and dropout keys from ``fold_in(base_key, i)``, so a run is
    reproducible from its seed whatever the chunk size. ``n`` (static) is the capacity:
    ``steps`` is clipped to ``[0, n]``. ``params`` and ``opt_state`` are donated. On a
    ``mesh`` (:mod:`jaxattn.train.sharding`) each batch is split over data and fsdp, and
    the new parameters and optimizer state keep ``shardings`` (``(params, opt_state)``
    NamedShardings, from the rules). Metrics are per-step arrays ``[n]``: ``loss``,
    ``accuracy``, ``lr`` (float32) and ``nonfinite`` (bool: the loss or a gradient is not
    finite); entries past ``steps`` are 0 (False).

    ``lr`` is ``schedule`` (the one ``optimizer`` was built on) at the optimizer's own
    update count before the step (:func:`jaxattn.train.optim.schedule_count`): the rate of
    the update this step's gradient goes into, whatever the accumulation or skipped steps.

    With ``train.on_nonfinite=skip`` such a step leaves the parameters and optimizer state
    as they were; with ``stop`` its update is applied and the caller stops there, never
    saving that state.
    """
    task, smoothing, kind = config.task, config.optim.label_smoothing, config.model.kind
    use_dropout = bool(config.model.dropout or config.model.attention_dropout)
    skip_nonfinite = config.train.on_nonfinite == "skip"

    def chunk(params, opt_state, base_key, start_step, n, steps=None):
        steps = n if steps is None else jnp.clip(steps, 0, n)
        if mesh is None:
            return run_steps(params, opt_state, base_key, start_step, n, steps)
        # The mesh in context: attention runs per shard (jaxattn.nn.layers.per_shard).
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return run_steps(params, opt_state, base_key, start_step, n, steps)

    def run_steps(params, opt_state, base_key, start_step, n, steps):
        def one_step(params, opt_state, step):
            batch_key, dropout_key = jax.random.split(jax.random.fold_in(base_key, step))
            batch = tasks.make_batch(task, batch_key, task.batch_size, kind)
            if mesh is not None:
                batch = jax.lax.with_sharding_constraint(batch, sharding.batch_sharding(mesh))
            (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                params, graphdef, batch, dropout_key if use_dropout else None, smoothing
            )
            lr = schedule(schedule_count(opt_state))  # before the update: the rate it uses
            updates, new_opt_state = optimizer.update(grads, opt_state, params)
            new_params = optax.apply_updates(params, updates)
            finite = jnp.isfinite(loss) & _all_finite(grads)
            if skip_nonfinite:
                # Keep the old state: the same buffers, so no copy when the step is kept.
                new_params, new_opt_state = jax.tree.map(
                    lambda new, old: jnp.where(finite, new, old),
                    (new_params, new_opt_state),
                    (params, opt_state),
                )
            metrics = {"loss": loss, "accuracy": acc, "lr": lr, "nonfinite": ~finite}
            return new_params, new_opt_state, metrics

        def body(i, carry):
            params, opt_state, metrics = carry
            params, opt_state, m = one_step(params, opt_state, start_step + i)
            metrics = {k: metrics[k].at[i].set(m[k]) for k in metrics}
            return params, opt_state, metrics

        metrics = {
            **{k: jnp.zeros(n, jnp.float32) for k in ("loss", "accuracy", "lr")},
            "nonfinite": jnp.zeros(n, bool),
        }
        # A traced trip count is a while loop: the same program for every ``steps``.
        return jax.lax.fori_loop(0, steps, body, (params, opt_state, metrics))

    if mesh is None:
        return jax.jit(chunk, static_argnums=(4,), donate_argnums=(0, 1))
    return jax.jit(
        chunk,
        static_argnums=(4,),
        donate_argnums=(0, 1),
        out_shardings=(*shardings, sharding.replicated(mesh)),
    )


def make_eval_fn(config: Config, graphdef, *, decode: bool = False):
    """``params -> metrics`` on the held-out set, one jitted program compiled at its first
    call (the held-out batch is drawn inside it, the same every call): teacher-forced loss
    and token accuracy, and ``exact_match``, the fraction of sequences whose answer greedy
    decoding from ``BOS x SEP`` gets exactly right.

    Exact-match is computed from the one teacher-forced pass: greedy decoding reproduces the
    answer exactly if and only if the argmax at every answer position, given the true prefix,
    is the true next token (by induction over the answer: while the decoded prefix equals the
    true one, the model sees the same input). That is one forward pass instead of L. With
    ``decode=True`` it is computed by actually decoding, with the key/value cache
    (:func:`jaxattn.nn.decoding.decode`, what :func:`jaxattn.nn.generate` runs; the tests
    check that both agree; a causal decoder only).

    The same induction holds for a prefix-LM (its prompt never sees the answer) and an
    encoder-decoder (its decoder is causal): there the whole target is the answer, ``SEP``
    (where decoding stops) included and padding not. A classifier's exact-match is its
    accuracy: the class is the whole answer.
    """
    task, kind = config.task, config.model.kind
    if decode and kind != "decoder":
        raise ValueError(f"decode=True evaluates a causal decoder only, not model.kind={kind}")
    prompt_len, answer_len = tasks.prompt_length(task), tasks.answer_length(task)
    # Index in `targets` of the first answer token: a decoder's answer follows its prompt;
    # an encoder-decoder's or a classifier's targets are all answer.
    first = prompt_len - 1 if kind in DECODER_KINDS else 0

    @jax.jit  # compiled at the first evaluation: building a plan compiles nothing
    def evaluate(params):
        # The held-out batch is drawn inside the program (microseconds a call), which is
        # then the only one an evaluation compiles.
        batch = tasks.eval_batch(task, kind)
        logits = logits_of(nnx.merge(graphdef, params), batch)
        loss = cross_entropy(logits, batch.targets, batch.loss_mask, 0.0)
        acc = token_accuracy(logits, batch.targets, batch.loss_mask)
        if decode:
            prompts = jnp.concatenate([batch.inputs[:, :1], batch.targets[:, :first]], axis=1)
            lengths = jnp.full(prompts.shape[:1], prompt_len, jnp.int32)
            predicted = decoding.decode(
                graphdef, params, prompts, lengths, None, max_new_tokens=answer_len
            )[:, prompt_len:]
        else:
            predicted = jnp.argmax(logits[:, first:], axis=-1)
        # An unscored target (a translation's padding) is no part of the answer.
        hits = (predicted == batch.targets[:, first:]) | (batch.loss_mask[:, first:] <= 0)
        correct = jnp.all(hits, axis=1)
        return {
            "eval_loss": loss,
            "eval_token_accuracy": acc,
            "exact_match": jnp.mean(correct),
            "correct": correct,
        }

    return evaluate


def abstract_model(config: Config):
    """``(graphdef, params)`` of the model with shapes only (no memory, no compute). The
    params are the caller's own (a new State: ``load_run`` fills its in place)."""
    num_classes = config.task.num_classes if config.model.kind == "classifier" else 0
    graphdef, params = _abstract_model(config.model, config.task.vocab_size, num_classes)
    return graphdef, jax.tree.map(lambda x: x, params)


@functools.cache  # tracing the model's construction takes a quarter of a second
def _abstract_model(model: ModelConfig, vocab_size: int, num_classes: int):
    """Shapes do not depend on the seed: one abstract model per model config, vocabulary and
    classes (the trainer's plan and the pictures drawn after it share it)."""

    def build():
        return _new_model(model, vocab_size, num_classes, 0)

    return nnx.split(nnx.eval_shape(build), nnx.Param)


def state_shardings(config: Config, params, opt_state, mesh):
    """The NamedShardings ``(params, opt_state)`` on ``mesh`` of the abstract ``params`` and
    ``opt_state`` (shapes only), by :mod:`jaxattn.train.sharding`'s rules."""
    head_dim = config.model.d_model // config.model.num_heads
    return (
        sharding.shardings_of(params, mesh, head_dim=head_dim),
        sharding.shardings_of(opt_state, mesh, head_dim=head_dim),
    )


def make_init(config: Config, optimizer: optax.GradientTransformation, shardings=None):
    """A jitted ``() -> (params, opt_state)`` of the config's seed: eager NNX initialisation
    dispatches (and compiles) every small op one by one, seconds on CPU. With ``shardings``
    (:func:`state_shardings`) every array is created in its shard (never whole on one
    device)."""

    def init():
        params = nnx.split(build_model(config), nnx.Param)[1]
        return params, optimizer.init(params)

    return jax.jit(init, out_shardings=shardings)


def init_state(config: Config, optimizer: optax.GradientTransformation, shardings=None):
    """``(params, opt_state)``, initialised in one compiled call (:func:`make_init`)."""
    return make_init(config, optimizer, shardings)()
