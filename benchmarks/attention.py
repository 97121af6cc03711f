"""Attention speed: jaxattn against jax.nn and Flax NNX, measured in one run.

    python benchmarks/attention.py            # the table of the foundation issue
    python benchmarks/attention.py --quick    # one small shape, for a smoke run

Every implementation is wrapped in ``jax.jit`` and timed in interleaved rounds (median).
FLOPs count the two matmuls of the forward pass, 4*B*N*T*S*H, over unmasked (query, key)
pairs only (so causal work is about half); forward+backward counts 3x the forward (two
forward and four backward matmuls). The ceiling is a 2048^3 float32 matmul timed in the same
run. Ratios are jaxattn time / time of the faster peer: below 1 means jaxattn is faster.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, matmul_ceiling_gflops, time_interleaved

import jaxattn

SHAPES = [(32, 10, 4, 32), (8, 512, 8, 64), (2, 2048, 8, 64)]


def _impls(causal: bool, t: int):
    def ours(q, k, v):
        return jaxattn.dot_product_attention(q, k, v, is_causal=causal)

    def jax_nn(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=causal)

    def flax_nnx(q, k, v):
        mask = jnp.tril(jnp.ones((t, t), jnp.bool_))[None, None] if causal else None
        return nnx.dot_product_attention(q, k, v, mask=mask)

    return {"jaxattn": ours, "jax.nn": jax_nn, "flax.nnx": flax_nnx}


def _fwd_bwd(f):
    def run(q, k, v, do):
        _, vjp = jax.vjp(f, q, k, v)
        return vjp(do)

    return run


def bench_case(shape, causal: bool, dtype=jnp.float32, rounds: int = 7):
    b, t, n, h = shape
    keys = jax.random.split(jax.random.key(1), 4)
    q, k, v, do = (jax.random.normal(kk, (b, t, n, h), dtype) for kk in keys)
    impls = _impls(causal, t)
    fwd = {name: jax.jit(f) for name, f in impls.items()}
    bwd = {name: jax.jit(_fwd_bwd(f)) for name, f in impls.items()}
    t_fwd = time_interleaved({nm: (lambda f=f: f(q, k, v)) for nm, f in fwd.items()}, rounds=rounds)
    t_bwd = time_interleaved(
        {nm: (lambda f=f: f(q, k, v, do)) for nm, f in bwd.items()}, rounds=rounds
    )
    pairs = t * (t + 1) // 2 if causal else t * t
    flops = 4 * b * n * pairs * h
    return t_fwd, t_bwd, flops


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one small shape only")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    shapes = SHAPES[:1] if args.quick else SHAPES

    ceiling = matmul_ceiling_gflops()
    print(f"machine: {machine()}")
    print(f"ceiling: 2048^3 float32 matmul = {ceiling:.1f} GFLOP/s\n")
    names = ["jaxattn", "jax.nn", "flax.nnx"]
    header = (
        "| (B,T,N,H) | causal | pass | "
        + " | ".join(f"{nm} ms" for nm in names)
        + " | jaxattn GFLOP/s | % ceiling | ratio vs best peer |"
    )
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for shape in shapes:
        for causal in (False, True):
            t_fwd, t_bwd, flops = bench_case(shape, causal, rounds=args.rounds)
            for label, times, work in (("fwd", t_fwd, flops), ("fwd+bwd", t_bwd, 3 * flops)):
                best_peer = min(times["jax.nn"], times["flax.nnx"])
                gflops = work / times["jaxattn"] / 1e9
                cells = " | ".join(f"{times[nm] * 1e3:.3f}" for nm in names)
                print(
                    f"| {shape} | {'yes' if causal else 'no'} | {label} | {cells} | "
                    f"{gflops:.1f} | {100 * gflops / ceiling:.0f}% | "
                    f"{times['jaxattn'] / best_peer:.2f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
