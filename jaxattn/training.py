"""Training: pure jitted steps fused with lax.scan, evaluation, metrics, checkpoints.

Data flow: a step key -> ``tasks.make_batch`` on device -> ``TinyDecoder`` -> loss ->
gradients -> Optax update, ``steps_per_call`` of them in one jitted ``lax.scan`` with the
parameter and optimizer buffers donated, so Python runs once per chunk, not once per step.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from tqdm import tqdm

from jaxattn import tasks
from jaxattn.config import Config, run_dir_for, save_config
from jaxattn.decoding import greedy_tokens
from jaxattn.model import TinyDecoder
from jaxattn.optim import cross_entropy, make_optimizer, make_schedule, token_accuracy

PARAMS_DIR = "params"  # Orbax checkpoint of the model parameters (what load_run reads)
TRAIN_STATE_DIR = "train_state"  # Orbax checkpoint of the optimizer state and step


def build_model(config: Config, seed: int | None = None) -> TinyDecoder:
    seed = config.train.seed if seed is None else seed
    rngs = nnx.Rngs(params=tasks.seed_key(seed))
    return TinyDecoder(config.model, config.task.vocab_size, rngs=rngs)


def updates(config: Config) -> int:
    """Optimizer updates in a run: ``train.steps`` counts micro-batches, and
    ``optim.accumulate_steps`` of them make one update (what the schedules count)."""
    return max(1, -(-config.train.steps // config.optim.accumulate_steps))


def loss_fn(params, graphdef, batch: tasks.Batch, key, label_smoothing: float):
    """Mean label-smoothed cross-entropy over scored tokens, and the token accuracy."""
    model = nnx.merge(graphdef, params)
    logits = model(batch.inputs, key=key)
    loss = cross_entropy(logits, batch.targets, batch.loss_mask, label_smoothing)
    return loss, token_accuracy(logits, batch.targets, batch.loss_mask)


def make_train_chunk(config: Config, graphdef, optimizer: optax.GradientTransformation):
    """A jitted ``(params, opt_state, base_key, start_step, n) -> (params, opt_state, metrics)``.

    Runs ``n`` (static) steps in a ``lax.scan``; step ``i`` draws its batch and dropout keys
    from ``fold_in(base_key, i)``, so a run is reproducible from its seed whatever the chunk
    size. ``params`` and ``opt_state`` are donated. Metrics are per-step arrays ``[n]``.
    """
    task, smoothing = config.task, config.optim.label_smoothing
    schedule = make_schedule(
        config.optim, d_model=config.model.d_model, total_steps=config.train.steps
    )
    accumulate = config.optim.accumulate_steps

    use_dropout = bool(config.model.dropout or config.model.attention_dropout)

    def chunk(params, opt_state, base_key, start_step, n):
        def one_step(carry, step):
            params, opt_state = carry
            batch_key, dropout_key = jax.random.split(jax.random.fold_in(base_key, step))
            batch = tasks.make_batch(task, batch_key, task.batch_size)
            (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                params, graphdef, batch, dropout_key if use_dropout else None, smoothing
            )
            updates, opt_state = optimizer.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            lr = schedule(step // accumulate)
            return (params, opt_state), {"loss": loss, "accuracy": acc, "lr": lr}

        steps = start_step + jnp.arange(n)
        (params, opt_state), metrics = jax.lax.scan(one_step, (params, opt_state), steps)
        return params, opt_state, metrics

    return jax.jit(chunk, static_argnums=(4,), donate_argnums=(0, 1))


def make_eval_fn(config: Config, graphdef, *, decode: bool = False):
    """Jitted ``params -> metrics`` on the held-out set: teacher-forced loss and token
    accuracy, and ``exact_match``, the fraction of sequences whose answer greedy decoding from
    ``BOS x SEP`` gets exactly right.

    Exact-match is computed from the one teacher-forced pass: greedy decoding reproduces the
    answer exactly if and only if the argmax at every answer position, given the true prefix,
    is the true next token (by induction over the answer: while the decoded prefix equals the
    true one, the model sees the same input). That is one forward pass instead of L. With
    ``decode=True`` it is computed by actually running :func:`jaxattn.generate` (the tests
    check that both agree).
    """
    task = config.task
    batch = jax.jit(tasks.eval_batch, static_argnums=0)(task)
    prompt_len, answer_len = tasks.prompt_length(task), tasks.answer_length(task)
    first = prompt_len - 1  # index in `targets` of the first answer token

    @jax.jit
    def evaluate(params):
        model = nnx.merge(graphdef, params)
        logits = model(batch.inputs)
        loss = cross_entropy(logits, batch.targets, batch.loss_mask, 0.0)
        acc = token_accuracy(logits, batch.targets, batch.loss_mask)
        if decode:
            prompts = jnp.concatenate([batch.inputs[:, :1], batch.targets[:, :first]], axis=1)
            predicted = greedy_tokens(graphdef, params, prompts, answer_len)[:, prompt_len:]
        else:
            predicted = jnp.argmax(logits[:, first:], axis=-1)
        correct = jnp.all(predicted == batch.targets[:, first:], axis=1)
        return {
            "eval_loss": loss,
            "eval_token_accuracy": acc,
            "exact_match": jnp.mean(correct),
            "correct": correct,
        }

    return evaluate


def abstract_model(config: Config):
    """``(graphdef, params)`` of the model with shapes only (no memory, no compute)."""
    return nnx.split(nnx.eval_shape(lambda: build_model(config)), nnx.Param)


def init_state(config: Config, optimizer: optax.GradientTransformation):
    """``(graphdef, params, opt_state)``, initialised in one compiled call: eager NNX
    initialisation dispatches (and compiles) every small op one by one, seconds on CPU."""
    graphdef, _ = abstract_model(config)

    @jax.jit
    def init():
        params = nnx.split(build_model(config), nnx.Param)[1]
        return params, optimizer.init(params)

    return (graphdef, *init())


@dataclasses.dataclass(frozen=True)
class TrainResult:
    run_dir: Path
    steps: int  # training steps (micro-batches) taken
    metrics: dict  # the last evaluation
    reached_target: bool
    seconds: float  # wall time of the run: set-up, compilation, training, evaluation


def _chunks(total: int, size: int, eval_every: int):
    """Chunk lengths covering ``total`` steps, each ending on an eval boundary or earlier."""
    size = math.gcd(size, eval_every)
    done = 0
    while done < total:
        n = min(size, total - done)
        yield done, n
        done += n


def train(config: Config, *, log=print) -> TrainResult:
    """Train ``config`` and write its run directory (config, metrics, checkpoint).

    The run is built in a temporary directory beside the final one and moved into place only
    when it is complete: an error or Ctrl-C leaves no half-written run behind.
    """
    final_dir = run_dir_for(config)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = final_dir.parent / f".{final_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir()
    try:
        result = _train_into(config, tmp_dir, log)
        old = final_dir.parent / f".{final_dir.name}.old-{os.getpid()}"
        if final_dir.exists():
            final_dir.rename(old)
        tmp_dir.rename(final_dir)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return dataclasses.replace(result, run_dir=final_dir)


def _train_into(config: Config, run_dir: Path, log) -> TrainResult:
    start = time.perf_counter()
    tc = config.train
    save_config(config, run_dir / "config.yaml")
    optimizer = make_optimizer(
        config.optim, d_model=config.model.d_model, total_steps=updates(config)
    )
    graphdef, params, opt_state = init_state(config, optimizer)
    chunk_fn = make_train_chunk(config, graphdef, optimizer)
    evaluate = make_eval_fn(config, graphdef)
    base_key = tasks.seed_key(tc.seed)

    progress = tqdm(
        total=tc.steps, unit="step", dynamic_ncols=True, file=sys.stderr, disable=not tc.progress
    )
    last_eval: dict = {}
    reached = False
    step = steady_steps = 0
    steady_seconds = 0.0
    with (run_dir / "metrics.jsonl").open("w") as metrics_file:
        try:
            for start_step, n in _chunks(tc.steps, tc.steps_per_call, tc.eval_every):
                t0 = time.perf_counter()
                params, opt_state, m = chunk_fn(params, opt_state, base_key, start_step, n)
                m = jax.device_get(m)
                chunk_seconds = time.perf_counter() - t0
                if start_step > 0:  # the first chunk includes compilation
                    steady_steps, steady_seconds = steady_steps + n, steady_seconds + chunk_seconds
                step = start_step + n
                postfix = {
                    "loss": f"{m['loss'][-1]:.3f}",
                    "acc": f"{m['accuracy'][-1]:.3f}",
                    "lr": f"{m['lr'][-1]:.2e}",
                    "steps/s": f"{n / chunk_seconds:.0f}",
                }
                if step % tc.eval_every == 0 or step == tc.steps:
                    evaluation = jax.device_get(evaluate(params))
                    evaluation.pop("correct")
                    last_eval = {k: float(v) for k, v in evaluation.items()}
                    record = {
                        "step": step,
                        "train_loss": float(m["loss"].mean()),
                        "train_accuracy": float(m["accuracy"].mean()),
                        "lr": float(m["lr"][-1]),
                        **last_eval,
                    }
                    metrics_file.write(json.dumps(record) + "\n")
                    metrics_file.flush()
                    postfix["exact"] = f"{last_eval['exact_match']:.3f}"
                    reached = last_eval["exact_match"] >= tc.target_exact_match
                progress.set_postfix(postfix, refresh=False)
                progress.update(n)
                if reached:
                    break
        finally:
            progress.close()
    seconds = time.perf_counter() - start
    _save_checkpoint(run_dir, params, opt_state, step)
    summary = {
        "steps": step,
        "reached_target": reached,
        "seconds": seconds,  # whole run: set-up, compilation, training, evaluation
        "steps_per_second": steady_steps / steady_seconds if steady_seconds else None,
        **last_eval,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    log(
        f"{'reached' if reached else 'did not reach'} exact-match target "
        f"{tc.target_exact_match:.3f}: {last_eval.get('exact_match', float('nan')):.4f} on "
        f"{config.task.eval_size} held-out sequences after {step} steps, {seconds:.1f} s"
    )
    return TrainResult(run_dir, step, last_eval, reached, seconds)


def _save_checkpoint(run_dir: Path, params, opt_state, step: int):
    import orbax.checkpoint as ocp  # imported here: only the end of a run needs it

    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save((run_dir / PARAMS_DIR).absolute(), nnx.to_pure_dict(params))
        ckpt.save(
            (run_dir / TRAIN_STATE_DIR).absolute(),
            {"opt_state": opt_state, "step": jnp.asarray(step, jnp.int32)},
        )
        ckpt.wait_until_finished()


def load_run(run_dir) -> tuple[TinyDecoder, Config]:
    """The trained model of a run directory and its config.

    ``run_dir`` is what ``train.py`` wrote (``runs/<config name>`` by default).
    """
    import orbax.checkpoint as ocp

    from jaxattn.config import load_config

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file() or not (run_dir / PARAMS_DIR).is_dir():
        raise FileNotFoundError(
            f"{run_dir} is not a finished run directory (expected config.yaml and {PARAMS_DIR}/)"
        )
    config = load_config(run_dir / "config.yaml")
    graphdef, abstract_params = abstract_model(config)
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nnx.to_pure_dict(abstract_params)
    )
    with ocp.StandardCheckpointer() as ckpt:
        restored = ckpt.restore((run_dir / PARAMS_DIR).absolute(), target)
    nnx.replace_by_pure_dict(abstract_params, restored)
    return nnx.merge(graphdef, abstract_params), config
