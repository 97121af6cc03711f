"""EncoderDecoder: cross-attention that never reads source padding, a causal decoder, padding
invariance of logits and gradients; and the prefix-LM decoder."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxattn.nn import (
    PAD_ID,
    DecoderBlock,
    EncoderDecoder,
    ModelConfig,
    MultiHeadAttention,
    TinyDecoder,
)
from jaxattn.nn.model import count_params

CFG = ModelConfig(d_model=16, num_layers=2, num_heads=4, d_ff=32, max_len=16)
VOCAB = 11
# Sources of 5 and 3 real tokens (padded to 6); targets BOS y.. of 4 and 5 real tokens.
SOURCE = jnp.array([[3, 4, 5, 6, 7, 0], [8, 9, 10, 0, 0, 0]])
SOURCE_LENGTHS = (5, 3)
TARGET = jnp.array([[1, 7, 6, 5, 0], [1, 10, 9, 8, 3]])
TARGET_LENGTHS = (4, 5)


def model(**changes):
    return EncoderDecoder(dataclasses.replace(CFG, **changes), VOCAB, rngs=nnx.Rngs(0))


def _pad(tokens, width):
    return jnp.pad(tokens, ((0, 0), (0, width - tokens.shape[1])), constant_values=PAD_ID)


def test_shapes_and_cross_attention_reads_no_source_padding():
    logits, weights = model()(SOURCE, TARGET, return_attention=True)
    assert logits.shape == (2, 5, VOCAB) and logits.dtype == jnp.float32
    assert weights["encoder"].shape == (2, 2, 4, 6, 6)
    assert weights["self"].shape == (2, 2, 4, 5, 5)
    assert weights["cross"].shape == (2, 2, 4, 5, 6)
    np.testing.assert_allclose(weights["cross"].sum(-1), 1.0, rtol=1e-5)
    for b, n in enumerate(SOURCE_LENGTHS):
        assert float(jnp.abs(weights["cross"][:, b, :, :, n:]).max()) == 0.0
        assert float(weights["cross"][:, b, :, :, :n].min()) > 0.0
    assert float(jnp.abs(jnp.triu(weights["self"], k=1)).max()) == 0.0  # causal


def test_nan_in_the_memory_at_source_padding_never_reaches_a_logit():
    """What the encoder leaves at pad positions is never read: NaN there changes nothing."""
    m = model()
    graphdef, state = nnx.split(m)

    @jax.jit
    def decode(state, memory):
        return nnx.merge(graphdef, state).decode(memory, SOURCE, TARGET)

    memory = jax.jit(lambda state: nnx.merge(graphdef, state).encode(SOURCE))(state)
    pads = jnp.arange(6)[None, :, None] >= jnp.array(SOURCE_LENGTHS)[:, None, None]
    poisoned = jnp.where(pads, jnp.nan, memory)
    np.testing.assert_array_equal(decode(state, memory), decode(state, poisoned))


def test_the_decoder_is_causal_and_every_real_source_token_reaches_every_target():
    m = model()
    graphdef, state = nnx.split(m)
    run = jax.jit(lambda state, s, t: nnx.merge(graphdef, state)(s, t))
    base = run(state, SOURCE, TARGET)
    later = run(state, SOURCE, TARGET.at[:, 3:].set(4))
    np.testing.assert_allclose(base[:, :3], later[:, :3], atol=1e-6)
    assert not np.allclose(base[:, 3:], later[:, 3:], atol=1e-4)
    last_source = run(state, SOURCE.at[0, 4].set(10), TARGET)  # the last real source token
    assert not np.allclose(base[0, 0], last_source[0, 0], atol=1e-4)  # reaches the first target
    np.testing.assert_array_equal(base[1], last_source[1])  # and no other row


@pytest.mark.parametrize(
    "changes", [{"tie_embeddings": False, "positions": "learned"}, {"positions": "rotary"}]
)
def test_extra_padding_of_either_side_changes_no_logit_and_no_gradient(changes):
    m = model(**changes)
    graphdef, state = nnx.split(m)

    def loss(state, source, target):
        logits = nnx.merge(graphdef, state)(source, target)
        real = target[:, 1:] != PAD_ID  # next-token loss on real target tokens only
        nll = -jnp.take_along_axis(
            jax.nn.log_softmax(logits[:, :-1]), target[:, 1:, None], axis=-1
        )[..., 0]
        return jnp.sum(jnp.where(real, nll, 0.0)) / jnp.sum(real), logits

    grad = jax.jit(jax.grad(loss, has_aux=True))
    g, logits = grad(state, SOURCE, TARGET)
    g_pad, logits_pad = grad(state, _pad(SOURCE, 11), _pad(TARGET, 9))
    for b, n in enumerate(TARGET_LENGTHS):
        np.testing.assert_allclose(logits[b, :n], logits_pad[b, :n], rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g, g_pad)


def test_tied_and_untied_embeddings():
    tied, untied = model(), model(tie_embeddings=False)
    assert not hasattr(tied, "unembed") and not hasattr(tied, "target_embed")
    # The untied model has a target table and an output projection (with its bias) more.
    d, v = CFG.d_model, VOCAB
    assert count_params(untied) - count_params(tied) == v * d + (d * v + v)
    # And each table does its own job: the source's embeds the source only, the target's
    # the target only, the projection makes the logits.
    graphdef, state = nnx.split(untied, nnx.Param)

    def loss(state):
        return jnp.sum(nnx.merge(graphdef, state)(SOURCE, TARGET) ** 2)

    grads = jax.jit(jax.grad(loss))(state)
    for name in ("target_embed", "unembed"):
        assert float(jnp.abs(jax.tree.leaves(grads[name])[0]).max()) > 0.0, name
    source_table = grads["encoder"]["embed"]["embedding"][...]
    # The source table's gradient comes from the source's tokens only (through the memory).
    unused = np.setdiff1d(np.arange(VOCAB), np.asarray(SOURCE))
    assert float(jnp.abs(source_table[unused]).max()) == 0.0
    assert float(jnp.abs(source_table).max()) > 0.0
    target_table = grads["target_embed"]["embedding"][...]
    unused = np.setdiff1d(np.arange(VOCAB), np.asarray(TARGET))
    assert float(jnp.abs(target_table[unused]).max()) == 0.0


def test_what_the_target_padding_holds_never_reaches_a_real_logit():
    """The target's pad embedding may hold NaN: causality alone would read it as 0 * NaN."""
    m = model(tie_embeddings=False)
    graphdef, state = nnx.split(m)
    run = jax.jit(lambda state: nnx.merge(graphdef, state)(SOURCE, TARGET))
    poisoned = jax.tree.map(lambda x: x, state)
    table = poisoned["target_embed"]["embedding"]
    table[...] = table[...].at[PAD_ID].set(jnp.nan)
    base, after = run(state), run(poisoned)
    for b, n in enumerate(TARGET_LENGTHS):
        np.testing.assert_array_equal(base[b, :n], after[b, :n])


def test_remat_gives_the_same_gradients():
    # One layer and the trainer's rbg keys: threefry's dropout draws compile for seconds.
    key = jax.random.key(3, impl="rbg")
    plain = model(dropout=0.1, num_layers=1)
    remat = model(dropout=0.1, num_layers=1, remat=True)
    graphdef, state = nnx.split(plain)
    graphdef_r, _ = nnx.split(remat)

    def loss(graphdef):
        return lambda state: jnp.sum(nnx.merge(graphdef, state)(SOURCE, TARGET, key=key) ** 2)

    g, g_r = (jax.jit(jax.grad(loss(gd)))(state) for gd in (graphdef, graphdef_r))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), g, g_r)


def test_a_cross_block_without_memory_or_with_a_cache_is_one_line():
    block = DecoderBlock(CFG, rngs=nnx.Rngs(0), cross=True)
    with pytest.raises(ValueError, match=r"needs memory \[B, S, D\], got None"):
        block(jnp.zeros((1, 3, 16)))
    cache = TinyDecoder(CFG, VOCAB, rngs=nnx.Rngs(0)).init_cache(1, 4).layers[0]
    with pytest.raises(NotImplementedError, match="blocks without cross-attention"):
        block.prefill(jnp.zeros((1, 3, 16)), cache)


def test_cross_attention_is_not_causal_unless_asked():
    attention = MultiHeadAttention(CFG, rngs=nnx.Rngs(0), cross=True)
    x, memory = jnp.ones((1, 2, 16)), jax.random.normal(jax.random.key(0), (1, 5, 16))
    _, weights = attention(x, context=memory, return_weights=True)
    assert float(weights[..., 4].min()) > 0.0  # the first query reads the last key
    _, causal = attention(x, context=memory, is_causal=True, return_weights=True)
    assert float(causal[0, :, 0, 4].max()) == 0.0


# --------------------------------------------------------------------------- prefix-LM


def test_prefix_lm_prompt_tokens_see_later_prompt_tokens_and_never_a_target_token():
    decoder = TinyDecoder(CFG, VOCAB, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(decoder)
    run = jax.jit(lambda state, t, p: nnx.merge(graphdef, state)(t, prefix_lengths=p))
    tokens = jnp.array([[1, 3, 4, 5, 2, 3, 4, 5], [1, 6, 7, 2, 6, 7, 0, 0]])
    prefix = jnp.array([5, 4])  # BOS x SEP
    base = run(state, tokens, prefix)
    # A later prompt token reaches the first position (bidirectional within the prompt) ...
    seen = run(state, tokens.at[0, 3].set(9), prefix)
    assert not np.allclose(base[0, 0], seen[0, 0], atol=1e-4)
    # ... but no target token reaches any prompt position, nor a target position before it.
    after = run(state, tokens.at[0, 6].set(9).at[1, 5].set(9), prefix)
    np.testing.assert_allclose(base[0, :6], after[0, :6], atol=1e-6)
    np.testing.assert_allclose(base[1, :5], after[1, :5], atol=1e-6)
    # A PAD inside the prefix is read by no one (the prompt's padding, both ways hidden).
    padded = jnp.array([[1, 3, 4, 0, 0, 2, 5, 6]])
    _, w = nnx.merge(graphdef, state)(padded, prefix_lengths=5, return_attention=True)
    assert float(w[..., 3:5].max()) == 0.0
    # A prefix of 0 (or 1: the first token sees only itself either way) is the causal decoder
    # at every real position (a pad's own row reads no pad in prefix mode).
    real = np.asarray(tokens != PAD_ID)
    np.testing.assert_allclose(
        np.asarray(run(state, tokens, jnp.array([1, 0])))[real],
        np.asarray(decoder(tokens))[real],
        rtol=1e-5,
        atol=1e-6,
    )
