"""Attention speed and memory: jaxattn against jax.nn and Flax NNX, measured in one run.

    python benchmarks/attention.py              # speed table, memory/scaling table, compile time
    python benchmarks/attention.py --quick      # one small shape, for a smoke run
    python benchmarks/attention.py --only speed # or: memory, compile, dropout

Every implementation is wrapped in ``jax.jit`` and timed in interleaved rounds (median).
``jaxattn`` is ``dot_product_attention`` with ``implementation=None`` (the dispatcher's pick,
shown in the path column). FLOPs count the two matmuls of the forward pass, 4*B*N*T*S*H,
over unmasked (query, key) pairs only (so causal work is about half); forward+backward
counts 3x the forward. The ceiling is a 2048^3 float32 matmul timed in the same run, before
and after the table. Ratios are jaxattn time / time of the faster peer: below 1 means jaxattn
is faster. Memory is the compiled temporary buffer size reported by XLA
(``jit(f).lower(...).compile().memory_analysis().temp_size_in_bytes``): compiled only, never
run, so the peers' figures at T = 16384 cost nothing to obtain.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, matmul_ceiling_gflops, time_interleaved

import jaxattn
from jaxattn import attention as attention_module

# (B, T, N, H), causal
SPEED_CASES = [
    ((32, 10, 4, 32), False),
    ((32, 10, 4, 32), True),
    ((8, 512, 8, 64), False),
    ((8, 512, 8, 64), True),
    ((2, 2048, 8, 64), False),
    ((2, 2048, 8, 64), True),
    ((1, 4096, 8, 64), True),
]
MEMORY_LENGTHS = [1024, 2048, 4096, 8192, 16384]
DROPOUT_CASES = [(32, 10, 4, 32), (2, 2048, 8, 64)]  # causal, forward+backward
DROPOUT_RATE = 0.1
PEERS_TIMED_UP_TO = 4096  # beyond this jax.nn and Flax need GiBs of logits: memory only


def _impls(causal: bool, t: int, implementation=None):
    def ours(q, k, v):
        return jaxattn.dot_product_attention(
            q, k, v, is_causal=causal, implementation=implementation
        )

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


def _inputs(shape, dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(1), 4)
    return tuple(jax.random.normal(kk, shape, dtype) for kk in keys)


def _path(shape) -> str:
    """The path implementation=None takes for this shape (mirrors the dispatcher)."""
    _, t, _, _ = shape
    if jax.default_backend() == "gpu":
        return "auto"
    return "flash" if t * t >= attention_module.FLASH_MIN_PAIRS else "xla"


def bench_case(shape, causal: bool, rounds: int):
    b, t, n, h = shape
    q, k, v, do = _inputs(shape)
    impls = _impls(causal, t)
    fwd = {name: jax.jit(f) for name, f in impls.items()}
    bwd = {name: jax.jit(_fwd_bwd(f)) for name, f in impls.items()}
    t_fwd = time_interleaved({nm: (lambda f=f: f(q, k, v)) for nm, f in fwd.items()}, rounds=rounds)
    t_bwd = time_interleaved(
        {nm: (lambda f=f: f(q, k, v, do)) for nm, f in bwd.items()}, rounds=rounds
    )
    pairs = t * (t + 1) // 2 if causal else t * t
    return t_fwd, t_bwd, 4 * b * n * pairs * h


def block_dots_gflops(rows: int = 512, cols: int = 512, h: int = 64) -> float:
    """GFLOP/s of the two matmuls of one flash block alone (logits ``[rows, h] x [h, cols]``,
    then ``[rows, cols] x [cols, h]``), no softmax: the rate the blockwise path could reach
    if its softmax were free. Matmuls with a 64-deep contraction and 64-wide output run well
    below the square 2048^3 ceiling."""
    ka, kb, kc = jax.random.split(jax.random.key(2), 3)
    q = jax.random.normal(ka, (rows, h))
    k = jax.random.normal(kb, (cols, h))
    v = jax.random.normal(kc, (cols, h))
    f = jax.jit(lambda q, k, v: jnp.einsum("RC,CH->RH", jnp.einsum("RH,CH->RC", q, k), v))
    t = time_interleaved({"dots": lambda: f(q, k, v)}, rounds=5, min_seconds=0.2)["dots"]
    return 4 * rows * cols * h / t / 1e9


def speed_table(shapes, rounds: int) -> None:
    c0 = matmul_ceiling_gflops()
    dots = block_dots_gflops()
    names = ["jaxattn", "jax.nn", "flax.nnx"]
    header = (
        "| (B,T,N,H) | causal | pass | path | "
        + " | ".join(f"{nm} ms" for nm in names)
        + " | jaxattn GFLOP/s | % ceiling | ratio vs best peer |"
    )
    rows = []
    for shape, causal in shapes:
        t_fwd, t_bwd, flops = bench_case(shape, causal, rounds)
        for label, times, work in (("fwd", t_fwd, flops), ("fwd+bwd", t_bwd, 3 * flops)):
            rows.append((shape, causal, label, times, work))
    c1 = matmul_ceiling_gflops()
    ceiling = (c0 + c1) / 2
    print(f"ceiling: 2048^3 float32 matmul = {c0:.1f} GFLOP/s before, {c1:.1f} after")
    print(
        f"block dots: the two matmuls of one 512 x 512 x 64 block alone = {dots:.1f} GFLOP/s "
        f"({100 * dots / ceiling:.0f}% of the ceiling)\n"
    )
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for shape, causal, label, times, work in rows:
        best_peer = min(times["jax.nn"], times["flax.nnx"])
        gflops = work / times["jaxattn"] / 1e9
        cells = " | ".join(f"{times[nm] * 1e3:.3f}" for nm in names)
        print(
            f"| {shape} | {'yes' if causal else 'no'} | {label} | {_path(shape)} | {cells} | "
            f"{gflops:.1f} | {100 * gflops / ceiling:.0f}% | "
            f"{times['jaxattn'] / best_peer:.2f} |",
            flush=True,
        )


def _temp_mib(f, *args) -> float:
    compiled = jax.jit(f).lower(*args).compile()
    return compiled.memory_analysis().temp_size_in_bytes / 2**20


def memory_table(lengths, rounds: int) -> None:
    """Causal forward+backward at (1, T, 8, 64): compiled temp memory and time vs T."""
    print(
        "\n| T | flash temp MiB | jax.nn temp MiB | flax.nnx temp MiB | flash fwd+bwd s | "
        "jax.nn fwd+bwd s | flax.nnx fwd+bwd s |"
    )
    print("|---|---|---|---|---|---|---|")
    for t in lengths:
        shape = (1, t, 8, 64)
        spec = jax.ShapeDtypeStruct(shape, jnp.float32)
        impls = _impls(True, t, implementation="flash")
        mem = {nm: _temp_mib(_fwd_bwd(f), spec, spec, spec, spec) for nm, f in impls.items()}
        q, k, v, do = _inputs(shape)
        timed = {nm: jax.jit(_fwd_bwd(f)) for nm, f in impls.items()}
        if t > PEERS_TIMED_UP_TO:
            timed = {"jaxattn": timed["jaxattn"]}
        args = (q, k, v, do)
        times = time_interleaved(
            {nm: (lambda f=f, args=args: f(*args)) for nm, f in timed.items()},
            rounds=max(1, rounds // 2) if t >= 8192 else rounds,
            min_seconds=0.0,
        )
        cells = [f"{times[nm]:.3f}" if nm in times else "not run" for nm in mem]
        print(
            f"| {t} | {mem['jaxattn']:.1f} | {mem['jax.nn']:.1f} | {mem['flax.nnx']:.1f} | "
            + " | ".join(cells)
            + " |",
            flush=True,
        )


def _dropout_times(shape, rounds: int, key) -> dict[str, float]:
    t = shape[1]
    q, k, v, do = _inputs(shape)
    causal = jnp.tril(jnp.ones((t, t), jnp.bool_))[None, None]

    def ours(q, k, v, rate=DROPOUT_RATE):
        kw = {"dropout_rate": rate, "dropout_key": key} if rate else {}
        return jaxattn.dot_product_attention(q, k, v, is_causal=True, **kw)

    def flax_nnx(q, k, v):
        return nnx.dot_product_attention(
            q,
            k,
            v,
            mask=causal,
            dropout_rng=key,
            dropout_rate=DROPOUT_RATE,
            broadcast_dropout=False,
            deterministic=False,
        )

    impls = {"jaxattn": ours, "plain": lambda q, k, v: ours(q, k, v, 0.0), "flax": flax_nnx}
    fns = {nm: jax.jit(_fwd_bwd(f)) for nm, f in impls.items()}
    return time_interleaved(
        {nm: (lambda f=f: f(q, k, v, do)) for nm, f in fns.items()}, rounds=rounds
    )


def dropout_table(shapes, rounds: int) -> None:
    """Causal forward+backward with attention dropout: jaxattn (hashed mask, regenerated per
    block) against Flax NNX (a Bernoulli mask from the key, per weight); jax.nn has no
    dropout. jaxattn without dropout is timed beside them: the cost of the dropout itself."""
    key = jax.random.key(3)
    print(
        f"\nattention dropout, rate {DROPOUT_RATE}, causal forward+backward:\n\n"
        "| (B,T,N,H) | path | jaxattn ms | jaxattn no-dropout ms | flax.nnx ms | "
        "ratio vs flax.nnx |"
    )
    print("|---|---|---|---|---|---|")
    for shape in shapes:
        times = _dropout_times(shape, rounds, key)
        print(
            f"| {shape} | {_path(shape)} | {times['jaxattn'] * 1e3:.3f} | "
            f"{times['plain'] * 1e3:.3f} | {times['flax'] * 1e3:.3f} | "
            f"{times['jaxattn'] / times['flax']:.2f} |",
            flush=True,
        )


def compile_time(t: int = 16384) -> None:
    shape = (1, t, 8, 64)
    spec = jax.ShapeDtypeStruct(shape, jnp.float32)
    f = _fwd_bwd(_impls(True, t, implementation="flash")["jaxattn"])
    start = time.perf_counter()
    jax.jit(f).lower(spec, spec, spec, spec).compile()
    print(
        f"\ncompile flash causal forward+backward at {shape}: {time.perf_counter() - start:.2f} s"
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one small shape only")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--only", choices=["speed", "memory", "compile", "dropout"], default=None)
    args = parser.parse_args(argv)
    print(f"machine: {machine()}")
    if args.quick:
        speed_table(SPEED_CASES[:2], rounds=3)
        return
    if args.only in (None, "compile"):
        compile_time()
    if args.only in (None, "speed"):
        speed_table(SPEED_CASES, args.rounds)
    if args.only in (None, "memory"):
        memory_table(MEMORY_LENGTHS, args.rounds)
    if args.only in (None, "dropout"):
        dropout_table(DROPOUT_CASES, args.rounds)


if __name__ == "__main__":
    main()
