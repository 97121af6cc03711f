"""Generation speed: jaxattn's cached decoder against uncached generation and Flax NNX's own
decode cache, on one model, in one interleaved run.

    python benchmarks/decode.py                    # total lengths 32, 256, 1024, 5 rounds
    python benchmarks/decode.py --quick            # lengths 32 and 256, 3 rounds
    python benchmarks/decode.py --lengths 256 --rounds 3 --uncached-steps 8

The model is TinyDecoder widened to 4 layers, d_model 256 (4 heads of 64, d_ff 1024, vocab
16, sinusoidal positions, random weights), batch 8. Each total length T is a prompt of
P = T/2 random tokens followed by M = T/2 greedy tokens. Three generators, each one jitted
loop, all producing the same tokens (checked before anything is timed):

- ``jaxattn cached``: :func:`jaxattn.nn.decoding.decode`: ``model.prefill`` of the prompts,
  then one ``model.decode_step`` per token over a head-major ``[B, K, S, H]`` KVCache
  (lax.while_loop).
- ``flax nnx cache``: the same model (the same weights, copied) with its attention replaced
  by ``flax.nnx.MultiHeadAttention(decode=True)``, whose cache takes one token per call:
  the prompt is fed one token at a time, then the new tokens, in one lax.fori_loop.
- ``uncached``: generation as it was before the cache: a lax.fori_loop that reruns the
  whole fixed-size ``[B, T]`` buffer through ``model(tokens)`` every step. Every step does
  the same work, so beyond ``--uncached-steps`` new tokens (default 16) the loop is timed
  for that many steps and its time scaled by M / steps (marked "(est.)").

Columns: "first token" is the time to first token: the prompts through the model (prefill,
cache written) and the argmax of the last position, timed as its own jitted function (for
uncached: one step, total / M). "total" is the whole generation of M tokens. "decode ms/token"
is (total - first token) / (M - 1): the cost of each new token after the first (uncached:
total / M). "tokens/s" is B * M / total. "vs uncached" is uncached total / total; "per
token vs flax" is decode ms/token / flax's (below 1: faster than Flax). Goals of the issue:
cached >= 20x faster than uncached at T = 1024, per token cached / flax <= 1.0. All times
are medians of interleaved rounds (benchmarks/common.py).
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, matmul_ceiling_gflops, run_main, time_interleaved

from jaxattn.nn import ModelConfig, TinyDecoder
from jaxattn.nn.decoding import decode
from jaxattn.nn.layers import sinusoidal_at

BATCH = 8
VOCAB = 16
LENGTHS = (32, 256, 1024)
QUICK_LENGTHS = (32, 256)
SPEEDUP_GOAL = 20.0  # uncached total / cached total, at T = 1024
FLAX_GOAL = 1.0  # cached decode ms/token / flax decode ms/token
NAMES = ("jaxattn cached", "flax nnx cache", "uncached")


def model_config(max_len: int) -> ModelConfig:
    return ModelConfig(
        d_model=256, num_layers=4, num_heads=4, d_ff=1024, max_len=max_len, positions="sinusoidal"
    )


# ---------------------------------------------------------------------- jaxattn, cached


@functools.partial(jax.jit, static_argnames=("graphdef", "total"))
def cached_first_token(graphdef, state, prompts, *, total: int):
    """Time to first token of the cached path: prefill into a fresh cache, argmax."""
    model = nnx.merge(graphdef, state)
    logits, cache = model.prefill(prompts, model.init_cache(prompts.shape[0], total))
    return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache


@functools.partial(jax.jit, static_argnames=("graphdef", "total"))
def cached_logits(graphdef, state, prompts, *, total: int):
    """Logits of the first token and of the first decode step (for the agreement check)."""
    model = nnx.merge(graphdef, state)
    logits, cache = model.prefill(prompts, model.init_cache(prompts.shape[0], total))
    first = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
    return logits[:, -1], model.decode_step(first, cache)[0]


# ---------------------------------------------------------------------- uncached


@functools.partial(jax.jit, static_argnames=("graphdef", "total", "steps"))
def uncached(graphdef, state, prompts, *, total: int, steps: int):
    """The first ``steps`` new tokens, each from the whole ``[B, total]`` buffer run through
    the model (causal attention keeps the unwritten tail out of the logits used)."""
    model = nnx.merge(graphdef, state)
    b, p = prompts.shape
    tokens = jnp.concatenate([prompts, jnp.zeros((b, total - p), jnp.int32)], axis=1)

    def step(pos, tokens):
        logits = model(tokens)  # [B, total, V]
        new = jnp.argmax(jax.lax.dynamic_index_in_dim(logits, pos - 1, 1, False), axis=-1)
        return jax.lax.dynamic_update_index_in_dim(tokens, new.astype(jnp.int32), pos, 1)

    return jax.lax.fori_loop(p, p + steps, step, tokens)


# ---------------------------------------------------------------------- Flax NNX decode cache


class FlaxBlock(nnx.Module):
    """A TinyDecoder pre-norm block whose attention is ``nnx.MultiHeadAttention(decode=True)``
    with the block's own projections copied in; its norms and feed-forward are clones."""

    def __init__(self, block, *, rngs: nnx.Rngs):
        ours = block.attention
        n, h = ours.num_heads, ours.head_dim
        d = n * h
        self.norm1, self.norm2 = nnx.clone(block.norm1), nnx.clone(block.norm2)
        self.feed_forward = nnx.clone(block.feed_forward)
        mha = nnx.MultiHeadAttention(n, d, qkv_features=d, decode=True, rngs=rngs)
        for theirs, linear in ((mha.query, ours.q_proj), (mha.key, ours.k_proj)):
            theirs.kernel[...] = linear.kernel[...].reshape(d, n, h)  # [D, N*H] -> [D, N, H]
            theirs.bias[...] = linear.bias[...].reshape(n, h)
        mha.value.kernel[...] = ours.v_proj.kernel[...].reshape(d, n, h)
        mha.value.bias[...] = ours.v_proj.bias[...].reshape(n, h)
        mha.out.kernel[...] = ours.out_proj.kernel[...].reshape(n, h, d)  # [N*H, D] -> [N, H, D]
        mha.out.bias[...] = ours.out_proj.bias[...]
        self.attention = mha

    def __call__(self, x):
        x = x + self.attention(self.norm1(x))
        return x + self.feed_forward(self.norm2(x))


class FlaxDecoder(nnx.Module):
    """``model`` (a pre-norm, tied, sinusoidal TinyDecoder) with Flax's cached attention."""

    def __init__(self, model: TinyDecoder):
        rngs = nnx.Rngs(0)
        self.d_model = model.config.d_model
        self.embed = nnx.clone(model.embed)
        self.blocks = nnx.List([FlaxBlock(b, rngs=rngs) for b in model.blocks])
        self.final_norm = nnx.clone(model.final_norm)

    def init_cache(self, batch_size: int, size: int):
        for block in self.blocks:
            block.attention.init_cache((batch_size, size, self.d_model))

    def __call__(self, tokens, position):
        """One token per sequence (int ``[B]``) at ``position`` (the caches' index):
        float32 logits ``[B, V]`` of the next one."""
        x = self.embed(tokens[:, None]) * math.sqrt(self.d_model)
        x = x + sinusoidal_at(position[None, None], self.d_model)  # [1, 1, D]
        for block in self.blocks:
            x = block(x)
        return self.embed.attend(self.final_norm(x))[:, 0].astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("graphdef", "total"))
def flax_run(graphdef, params, prompts, steps, *, total: int):
    """Feed tokens 0 .. steps-1 one per call (prompt tokens, then each argmax) into fresh
    Flax caches of ``total`` slots. Returns (tokens ``[B, total]``, the caches, the last
    logits). ``steps = P`` is the first token; ``steps = total - 1`` the whole generation."""
    model = nnx.merge(graphdef, params)
    b, p = prompts.shape
    model.init_cache(b, total)
    graphdef, params, cache = nnx.split(model, nnx.Param, ...)
    tokens = jnp.concatenate([prompts, jnp.zeros((b, total - p), jnp.int32)], axis=1)

    def step(i, carry):
        tokens, cache, _ = carry
        model = nnx.merge(graphdef, params, cache)
        logits = model(tokens[:, i], i)
        new = jnp.where(i + 1 < p, tokens[:, i + 1], jnp.argmax(logits, axis=-1))
        tokens = jax.lax.dynamic_update_index_in_dim(tokens, new.astype(jnp.int32), i + 1, 1)
        return tokens, nnx.split(model, nnx.Param, ...)[2], logits

    logits = jnp.zeros((b, VOCAB), jnp.float32)
    return jax.lax.fori_loop(0, steps, step, (tokens, cache, logits))


# ---------------------------------------------------------------------- one length


def bench_length(model, flax_split, total: int, rounds: int, uncached_cap: int):
    """Check that the three generators agree at one total length, then time them."""
    p = total // 2
    m = total - p
    steps = m if uncached_cap <= 0 else min(m, uncached_cap)
    prompts = jax.random.randint(jax.random.key(total), (BATCH, p), 0, VOCAB, jnp.int32)
    lengths = jnp.full((BATCH,), p, jnp.int32)
    graphdef, state = nnx.split(model)
    fg, fp = flax_split
    calls = {
        "jaxattn cached": lambda: decode(
            graphdef, state, prompts, lengths, jax.random.key(0), max_new_tokens=m
        ),
        "flax nnx cache": lambda: flax_run(fg, fp, prompts, total - 1, total=total),
        "uncached": lambda: uncached(graphdef, state, prompts, total=total, steps=steps),
        "jaxattn first": lambda: cached_first_token(graphdef, state, prompts, total=total),
        "flax first": lambda: flax_run(fg, fp, prompts, p, total=total),
    }
    ours = np.asarray(calls["jaxattn cached"]())
    theirs = np.asarray(calls["flax nnx cache"]()[0])
    plain = np.asarray(calls["uncached"]())
    for name, got, upto in (("flax nnx cache", theirs, total), ("uncached", plain, p + steps)):
        bad = np.argwhere(got[:, :upto] != ours[:, :upto])
        if bad.size:
            b, t = bad[0]
            raise AssertionError(
                f"{name} disagrees with jaxattn cached at total {total}: row {b}, position "
                f"{t}: token {got[b, t]} against {ours[b, t]}"
            )
    first_ours, step_ours = cached_logits(graphdef, state, prompts, total=total)
    first_flax = flax_run(fg, fp, prompts, p, total=total)[2]
    step_flax = flax_run(fg, fp, prompts, p + 1, total=total)[2]
    diffs = [
        float(jnp.max(jnp.abs(a - b)))
        for a, b in ((first_ours, first_flax), (step_ours, step_flax))
    ]
    times = time_interleaved(calls, rounds=rounds)
    times["uncached"] *= m / steps
    return times, diffs, (p, m, steps)


def _goal(met: bool) -> str:
    return "goal met:" if met else "GOAL MISSED:"


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}" if seconds < 10 else f"{seconds * 1e3:.0f}"


def print_rows(total, times, diffs, sizes) -> dict[str, float]:
    """The three rows of one length; returns decode seconds per token of each generator."""
    p, m, steps = sizes
    per_token = {
        "jaxattn cached": (times["jaxattn cached"] - times["jaxattn first"]) / (m - 1),
        "flax nnx cache": (times["flax nnx cache"] - times["flax first"]) / (m - 1),
        "uncached": times["uncached"] / m,
    }
    first = {
        "jaxattn cached": times["jaxattn first"],
        "flax nnx cache": times["flax first"],
        "uncached": times["uncached"] / m,
    }
    est = "" if steps == m else f" (est. from {steps} steps)"
    for name in NAMES:
        speedup = times["uncached"] / times[name]
        vs_flax = per_token[name] / per_token["flax nnx cache"]
        print(
            f"| {total} = {p} + {m} | {name} | {_ms(first[name])} | "
            f"{_ms(times[name])}{est if name == 'uncached' else ''} | "
            f"{per_token[name] * 1e3:.3f} | {BATCH * m / times[name]:.0f} | "
            f"{speedup:.1f}x | {'' if name == 'uncached' else f'{vs_flax:.2f}'} | "
            f"{f'{diffs[0]:.1e} / {diffs[1]:.1e}' if name == 'jaxattn cached' else ''} |",
            flush=True,
        )
    return per_token


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="lengths 32 and 256, 3 rounds")
    parser.add_argument("--rounds", type=int, default=None, help="5, or 3 with --quick")
    parser.add_argument(
        "--lengths", type=str, default=None, help="total lengths, comma-separated (even, >= 4)"
    )
    parser.add_argument(
        "--uncached-steps",
        type=int,
        default=16,
        help="time at most this many uncached steps and scale to M (0: all M)",
    )
    args = parser.parse_args(argv)
    start = time.perf_counter()
    lengths = QUICK_LENGTHS if args.quick else LENGTHS
    if args.lengths:
        try:
            lengths = tuple(int(x) for x in args.lengths.split(","))
        except ValueError:
            lengths = ()
        if not lengths or any(t < 4 or t % 2 for t in lengths):
            parser.error(f"--lengths must be even numbers >= 4, comma-separated: {args.lengths!r}")
    rounds = args.rounds or (3 if args.quick else 5)
    print(f"machine: {machine()}")
    print(f"ceiling: 2048^3 float32 matmul = {matmul_ceiling_gflops():.1f} GFLOP/s")
    config = model_config(max(1024, *lengths))
    print(
        f"model: TinyDecoder, {config.num_layers} layers, d_model {config.d_model}, "
        f"{config.num_heads} heads, d_ff {config.d_ff}, vocab {VOCAB}, {config.positions} "
        f"positions; batch {BATCH}; prompt P = T/2 random tokens, M = T/2 greedy tokens; "
        f"{rounds} rounds\n"
    )
    model = TinyDecoder(config, VOCAB, rngs=nnx.Rngs(0))
    flax_split = nnx.split(FlaxDecoder(model))
    print(
        "| T = P + M | generator | first token ms | total ms | decode ms/token | tokens/s | "
        "vs uncached | per token vs flax | max abs logit diff vs flax (first token / step) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    results = {}
    for total in lengths:
        times, diffs, sizes = bench_length(model, flax_split, total, rounds, args.uncached_steps)
        results[total] = (times, print_rows(total, times, diffs, sizes))
    print(
        "\nfirst token: prefill + argmax, its own jitted call (uncached: one step). decode "
        "ms/token: (total - first token) / (M - 1) (uncached: total / M). tokens/s: B * M / "
        "total. vs uncached: uncached total / total. per token vs flax: decode ms/token / "
        "flax's. Checked before timing, at every length: flax nnx cache's tokens equal "
        "jaxattn cached's at every row and position, uncached's at every new token it ran."
    )
    for total, (times, per_token) in results.items():
        speedup = times["uncached"] / times["jaxattn cached"]
        ratio = per_token["jaxattn cached"] / per_token["flax nnx cache"]
        goals = (
            f"cached / flax per token {ratio:.2f} ({_goal(ratio <= FLAX_GOAL)} <= {FLAX_GOAL:g})"
        )
        if total == 1024:
            goals += f", cached vs uncached {speedup:.1f}x ({_goal(speedup >= SPEEDUP_GOAL)} >= "
            goals += f"{SPEEDUP_GOAL:g}x)"
        print(f"T = {total}: {goals}")
    print(f"\nwall time: {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    run_main(main)
