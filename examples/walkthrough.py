"""Attention step by step with jaxattn, from token embeddings to a trained model's pictures.

    python examples/walkthrough.py                          # pictures into runs/walkthrough/
    python examples/walkthrough.py --out docs/walkthrough   # redraw the pictures of the docs

``docs/walkthrough.md`` is this script's story with its output. Each section prints what it
computes; where the NumPy tutorials attention is usually learnt from go wrong, the wrong
result is printed beside jaxattn's. About half a minute on a laptop CPU, most of it the
training run at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxattn
from jaxattn import CausalMask, PaddingMask, dot_product_attention, reference
from jaxattn.commands import add_compile_cache_flag, use_compile_cache
from jaxattn.nn import ModelConfig, TinyDecoder
from jaxattn.nn.layers import apply_rotary, sinusoidal_positions

ROOT = Path(__file__).resolve().parents[1]
np.set_printoptions(precision=3, suppress=True, linewidth=100)


def section(title: str) -> None:
    print(f"\n=== {title} ===\n")


def show(name: str, x) -> None:
    text = np.array2string(np.asarray(x), prefix="    ")
    print(f"{name}:\n    {text}")


# ------------------------------------------------------------------------------ 1


def embeddings_and_projections():
    section("1. Tokens -> embeddings -> queries, keys and values")
    config = ModelConfig(d_model=16, num_layers=1, num_heads=2, d_ff=32, max_len=8)
    model = TinyDecoder(config, vocab_size=10, rngs=nnx.Rngs(0))
    tokens = jnp.array([[1, 5, 7, 3, 2]])  # B=1 sequence of T=5 token ids
    x = model.embed(tokens)  # [B, T, D]: one learned row of the table per token
    attention = model.blocks[0].attention
    q = attention.q_proj(x).reshape(1, 5, 2, 8)  # [B, T, N, H]: N=2 heads of H=8
    k = attention.k_proj(x).reshape(1, 5, 2, 8)
    v = attention.v_proj(x).reshape(1, 5, 2, 8)
    print(f"tokens {tokens.shape} -> embeddings {x.shape} -> q {q.shape}, k {k.shape}, v {v.shape}")
    again = model.embed(tokens)
    print(f"same tokens, same embeddings on a second call: {bool(jnp.array_equal(x, again))}")

    # A tutorial draws its weights inside the function: every call is a new random model,
    # and nothing it "learns" can be kept.
    def tutorial_embedding(tokens, vocab_size=10, d_model=16):
        table = np.random.default_rng().standard_normal((vocab_size, d_model))  # anew each call
        return table[tokens]

    first, second = tutorial_embedding(np.asarray(tokens)), tutorial_embedding(np.asarray(tokens))
    print(f"tutorial, weights drawn in the call: same output twice? {np.allclose(first, second)}")
    return model


# ------------------------------------------------------------------------------ 2


def scaling():
    section("2. Scores, and why they are divided by sqrt(d_k)")
    d_k = 64
    key_q, key_k = jax.random.split(jax.random.key(0))
    q = jax.random.normal(key_q, (10000, d_k))  # entries of variance 1
    k = jax.random.normal(key_k, (10000, d_k))
    scores = jnp.sum(q * k, axis=-1)  # q . k: a sum of d_k products of variance 1
    print(f"variance of q . k over 10000 pairs, d_k = {d_k}: {float(jnp.var(scores)):.1f}")
    print(f"variance of q . k / sqrt(d_k):                  {float(jnp.var(scores / 8.0)):.3f}")
    row = scores[:8]
    print(f"softmax of 8 unscaled scores: largest weight {float(jax.nn.softmax(row).max()):.3f}")
    print(
        f"softmax of the same, scaled:  largest weight {float(jax.nn.softmax(row / 8).max()):.3f}"
    )
    print("(unscaled, the softmax saturates: one key takes nearly all the weight, and its")
    print(" gradient nearly vanishes)")


# ------------------------------------------------------------------------------ 3


def masks():
    section("3. Masks: True = may attend")
    show("CausalMask().materialize(5, 5) (query rows, key columns)", CausalMask().materialize(5, 5))
    padding = PaddingMask(kv_lengths=jnp.array([3]))
    show("PaddingMask(kv_lengths=[3]): keys 3 and 4 are padding", padding.materialize(5, 5)[0, 0])
    both = CausalMask() & padding
    show("CausalMask() & PaddingMask(kv_lengths=[3])", both.materialize(5, 5)[0, 0])
    show(
        "CausalMask().materialize(2, 5): 2 new queries after 3 cached keys (bottom-right)",
        CausalMask().materialize(2, 5),
    )

    # A tutorial builds its look-ahead mask as 1 = keep (1 - triu(ones, k=1)) and then
    # applies it as 1 = block (scores += mask * -1e9): it blocks exactly the allowed keys.
    scores = np.zeros((5, 5))
    keep = 1 - np.triu(np.ones((5, 5)), k=1)
    with np.errstate(invalid="ignore"):
        wrong = np.exp(scores + keep * -1e9)
        wrong = wrong / wrong.sum(-1, keepdims=True)
    show(
        "tutorial: keep-mask applied as block-mask, weights of query 0 (future keys only)", wrong[0]
    )
    show("... and of query 4, whose every key is allowed, so every key is blocked", wrong[4])
    q = jnp.zeros((1, 5, 1, 4))
    _, weights = dot_product_attention(q, q, q, is_causal=True, return_weights=True)
    show("jaxattn is_causal=True, weights of query 0", weights[0, 0, 0])


# ------------------------------------------------------------------------------ 4


def softmax_rows():
    section("4. Softmax, one row at a time")
    scores = jnp.array([[2.0, 1.0, 0.0], [0.0, 0.0, 0.0], [5.0, -1.0, 3.0]])
    q = jnp.eye(3)[None, :, None, :] * jnp.sqrt(3.0)  # so that q k^T / sqrt(3) == scores
    k = scores.T[None, :, None, :]
    _, weights = dot_product_attention(q, k, k, return_weights=True)
    show("scores (query rows, key columns)", scores)
    show("jaxattn weights", weights[0, 0])
    show("row sums", weights[0, 0].sum(-1))

    x = np.asarray(scores)
    whole = np.exp(x) / np.sum(np.exp(x))  # a tutorial's sum over the whole matrix
    show("tutorial, normalised over the whole matrix: row sums", whole.sum(-1))
    columns = np.exp(x) / np.sum(np.exp(x), axis=0, keepdims=True)  # over the wrong axis
    show("tutorial, normalised along the wrong axis: row sums", columns.sum(-1))

    # Without subtracting the row's maximum first, exp overflows: from 88.7 in float32,
    # from 11.1 in float16 (whose largest number is 65504).
    for dtype, top in ((np.float32, 1e4), (np.float16, 12.0)):
        row = np.array([top, top - 1, 0.0], dtype)
        with np.errstate(over="ignore", invalid="ignore"):
            naive = np.exp(row) / np.sum(np.exp(row))
        show(f"tutorial, scores {row.tolist()} in {np.dtype(dtype).name}, no max subtracted", naive)
        # One query [1], three keys [s] and scale 1: the scores are the row itself.
        one = jnp.ones((1, 1, 1, 1), dtype)
        keys = jnp.asarray(row)[None, :, None, None]
        _, w = dot_product_attention(one, keys, keys, scale=1.0, return_weights=True)
        show(f"jaxattn, the same scores in {np.dtype(dtype).name}", w[0, 0, 0])
    print("(jaxattn subtracts each row's maximum and computes the softmax in float32)")


# ------------------------------------------------------------------------------ 5


def fully_masked_row():
    section("5. A query that may see no key")
    scores = np.array([[1.0, 2.0], [3.0, 4.0]])
    additive = np.array([[0.0, 0.0], [-np.inf, -np.inf]])  # row 1 masked entirely
    with np.errstate(invalid="ignore"):
        e = np.exp(scores + additive - np.max(scores + additive, axis=-1, keepdims=True))
        tutorial = e / e.sum(-1, keepdims=True)
    show("tutorial, additive -inf mask", tutorial)
    # The same scores for jaxattn: queries = the score rows, one-hot keys, scale 1.
    q = jnp.asarray(scores, jnp.float32)[None, :, None, :]
    k = jnp.eye(2)[None, :, None, :]
    v = jnp.arange(4.0).reshape(1, 2, 1, 2)
    mask = jnp.array([[True, True], [False, False]])
    out, weights = dot_product_attention(q, k, v, mask=mask, scale=1.0, return_weights=True)
    show("jaxattn weights, same mask (bool, True = may attend)", weights[0, 0])
    show("jaxattn output (row 1: zeros)", out[0, :, 0])
    grads = jax.grad(lambda q: jnp.sum(dot_product_attention(q, k, v, mask=mask, scale=1.0)))(q)
    show("gradient with respect to q (row 1: zeros, not NaN)", grads[0, :, 0])


# ------------------------------------------------------------------------------ 6


def mask_none():
    section("6. `if mask is None: scaled += mask`")

    def tutorial_attention(q, k, v, mask=None):
        scaled = q @ k.T / math.sqrt(q.shape[-1])
        if mask is None:  # inverted: meant `is not None`
            scaled += mask
        w = np.exp(scaled - scaled.max(-1, keepdims=True))
        return (w / w.sum(-1, keepdims=True)) @ v

    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((4, 8)) for _ in range(3))
    try:
        tutorial_attention(q, k, v)
    except TypeError:
        print("tutorial, no mask: `scaled += None` raises TypeError")
    causal = np.where(np.tril(np.ones((4, 4))) > 0, 0.0, -np.inf)
    unmasked = tutorial_attention(q, k, v, np.zeros((4, 4)))
    same = np.allclose(tutorial_attention(q, k, v, causal), unmasked)
    print(f"tutorial, a causal mask given: output equal to no mask at all? {same}")
    qj, kj, vj = (jnp.asarray(x, jnp.float32)[None, :, None, :] for x in (q, k, v))
    plain = dot_product_attention(qj, kj, vj)
    causal_out = dot_product_attention(qj, kj, vj, is_causal=True)
    print(
        f"jaxattn: mask=None works; is_causal=True changes the output: "
        f"{not bool(jnp.allclose(plain, causal_out))}"
    )


# ------------------------------------------------------------------------------ 7


def weighted_sum_and_paths():
    section("7. The weighted sum, and the textbook formula against the fast paths")
    keys = jax.random.split(jax.random.key(1), 3)
    q, k, v = (jax.random.normal(x, (2, 256, 4, 32)) for x in keys)
    w = jax.nn.softmax(jnp.einsum("btnh,bsnh->bnts", q, k) / math.sqrt(32), axis=-1)
    by_hand = jnp.einsum("bnts,bsnh->btnh", w, v)  # each output row: weights . values
    with jax.enable_x64(True):  # the formula in float64: the yardstick
        exact = np.asarray(
            reference.dot_product_attention(
                *(jnp.asarray(np.asarray(x, np.float64)) for x in (q, k, v)), is_causal=True
            )
        )
    print(
        f"by hand vs jaxattn (no mask): max |diff| "
        f"{float(jnp.abs(by_hand - dot_product_attention(q, k, v)).max()):.1e}"
    )
    for impl in ("xla", "flash"):
        out = dot_product_attention(q, k, v, is_causal=True, implementation=impl)
        diff = float(np.abs(np.asarray(out, np.float64) - np.asarray(exact)).max())
        print(f"{impl:>5} path, causal, T = 256, vs the float64 formula: max |diff| {diff:.1e}")
    print("(the flash path never builds the [T, S] weights: it walks key blocks with a running")
    print(" max and sum; implementation=None picks it from T * S >= 128 * 128)")


# ------------------------------------------------------------------------------ 8


def heads():
    section("8. Several heads, and grouped-query heads")
    keys = jax.random.split(jax.random.key(2), 3)
    q = jax.random.normal(keys[0], (1, 6, 4, 8))  # N = 4 query heads
    k = jax.random.normal(keys[1], (1, 6, 2, 8))  # K = 2 key/value heads: G = 2 per group
    v = jax.random.normal(keys[2], (1, 6, 2, 8))
    grouped = dot_product_attention(q, k, v, is_causal=True)
    repeated = dot_product_attention(
        q, jnp.repeat(k, 2, axis=2), jnp.repeat(v, 2, axis=2), is_causal=True
    )
    print(f"q {q.shape}, k and v {k.shape} -> out {grouped.shape}")
    print(
        f"grouped query heads == every key head repeated for its G query heads: "
        f"{bool(jnp.allclose(grouped, repeated, atol=1e-6))}"
    )
    print("(heads attend independently; the layer concatenates them: [B, T, N*H] -> out_proj)")


# ------------------------------------------------------------------------------ 9


def positions():
    section("9. Positions")
    enc = sinusoidal_positions(6, 8)
    show("sinusoidal_positions(6, 8): sin and cos of pos / 10000^(2i/D)", enc)
    x = jax.random.normal(jax.random.key(3), (1, 1, 1, 8))
    y = jax.random.normal(jax.random.key(4), (1, 1, 1, 8))

    def rotated_dot(p_q, p_k):
        qr = apply_rotary(x, jnp.array([p_q]))
        kr = apply_rotary(y, jnp.array([p_k]))
        return float(jnp.sum(qr * kr))

    print(
        f"rotary: q.k at positions (2, 5) {rotated_dot(2, 5):.4f}, at (10, 13) "
        f"{rotated_dot(10, 13):.4f}, at (2, 6) {rotated_dot(2, 6):.4f}"
    )
    print("(rotary positions make the score depend on the offset between query and key only)")


# ------------------------------------------------------------------------------ 10


def block(model):
    section("10. LayerNorm, the feed-forward block, a decoder block")
    x = jax.random.normal(jax.random.key(5), (1, 5, 16)) * 3 + 1
    block = model.blocks[0]
    normed = block.norm1(x)
    print(
        f"LayerNorm: per-token mean {float(jnp.abs(normed.mean(-1)).max()):.1e} (max |.|), "
        f"variance {float(normed.var(-1).mean()):.3f}"
    )
    print(
        f"feed-forward: {x.shape} -> relu(x W1 + b1) {block.feed_forward.up(x).shape} "
        f"-> W2 {block.feed_forward(x).shape}"
    )
    out, _ = block(x)
    print(
        f"decoder block (pre-norm): x + attention(LN(x)), then + feed_forward(LN(.)): {out.shape}"
    )
    tokens = jnp.array([[1, 5, 7, 3, 2]])
    changed = tokens.at[:, 3:].set(9)
    same = jnp.allclose(model(tokens)[:, :3], model(changed)[:, :3], atol=1e-6)
    print(
        f"the decoder is causal: changing tokens 3 and 4 leaves the logits of 0..2 alone: "
        f"{bool(same)}"
    )


# ------------------------------------------------------------------------------ 11


def training(out_dir: Path, run: Path | None = None):
    section("11. Training the tiny config: warmup, label smoothing, and what it learned")
    from jaxattn.train import load_config, load_run, train
    from jaxattn.train.optim import make_schedule
    from jaxattn.train.pictures import draw_run
    from jaxattn.train.steps import build_model, updates

    config = load_config(ROOT / "configs" / "tiny.yaml", ["train.progress=false"])
    o = config.optim
    schedule = make_schedule(o, d_model=config.model.d_model, total_steps=updates(config))
    lrs = ", ".join(f"{s}: {float(schedule(s)):.2e}" for s in (0, 50, 100, 500, 1000, 1499))
    print(f"learning rate ({o.schedule}, warmup {o.warmup_steps}): {lrs}")
    alpha, v = o.label_smoothing, config.task.vocab_size
    top, rest = 1 - alpha + alpha / v, alpha / v
    floor = -(top * math.log(top) + (v - 1) * rest * math.log(rest))
    print(
        f"label smoothing {alpha} over {v} tokens: the best possible training loss is "
        f"{floor:.3f}, not 0 (the target puts {rest:.4f} on every wrong token)"
    )
    before = build_model(config).embed.embedding[...]  # the same seed's untrained table
    with tempfile.TemporaryDirectory() as tmp:
        if run is None:  # train it here: python train.py --config configs/tiny.yaml
            run = Path(tmp) / "tiny"
            overrides = ["train.progress=false", "train.pictures=false", f"train.run_dir={run}"]
            train(load_config(ROOT / "configs" / "tiny.yaml", overrides), log=print)
        trained, _ = load_run(run)
        moved = float(jnp.abs(trained.embed.embedding[...] - before).max())
        print(
            f"the embedding table moved by up to {moved:.3f}: parameters are created once "
            "and trained"
        )
        summary = json.loads((run / "summary.json").read_text())
        print(f"exact-match {summary['exact_match']:.3f} after {summary['steps']} steps")
        for path in draw_run(run, out_dir=out_dir):
            print(f"picture: {path}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("runs", "walkthrough"),  # beside train.py's runs, never the tracked docs
        help="where the pictures go (default: runs/walkthrough)",
    )
    parser.add_argument(
        "--run", type=Path, help="a tiny.yaml run already trained, instead of training one"
    )
    add_compile_cache_flag(parser)
    args = parser.parse_args(argv)
    use_compile_cache("walkthrough.py", not args.no_compile_cache)
    from jaxattn.train import RunError, load_run

    try:
        # Both checked before half a minute of work, not after it.
        if args.run is not None:
            load_run(args.run)
        try:
            args.out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise RunError.writing(args.out, err) from None
        if not os.access(args.out, os.W_OK):
            raise RunError(f"cannot write {args.out}: permission denied")
        print(f"jaxattn {jaxattn.__version__}, jax {jax.__version__} on {jax.default_backend()}")
        model = embeddings_and_projections()
        scaling()
        masks()
        softmax_rows()
        fully_masked_row()
        mask_none()
        weighted_sum_and_paths()
        heads()
        positions()
        block(model)
        training(args.out, args.run)
    except RunError as err:
        print(f"walkthrough.py: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a training run it started is in a temporary directory: gone
        print("walkthrough.py: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
