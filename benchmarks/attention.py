"""Attention speed and memory: jaxattn against jax.nn, Flax NNX, PyTorch and tokamax, in one run.

    python benchmarks/attention.py                # every table below, and compile time
    python benchmarks/attention.py --quick        # tiny shapes, every peer, for a smoke run
    python benchmarks/attention.py --only speed   # or: softcap, memory, compile, dropout
    python benchmarks/attention.py --max-t 512 --rounds 1   # only shapes with T <= 512

Peers in the speed table: ``jax.nn.dot_product_attention``, ``flax.nnx.dot_product_attention``
and, as optional extras of the benchmark (``pip install -e ".[bench]"``, not dependencies of
the package), PyTorch's ``torch.nn.functional.scaled_dot_product_attention`` on CPU (float32,
inputs transposed once to its ``[B, N, T, H]`` layout outside the timed call, ``is_causal=``,
forward under ``torch.inference_mode()``, forward+backward as ``torch.autograd.grad`` of the
output with cotangent ``do``, which returns fresh gradients like ``jax.vjp`` instead of
accumulating into ``.grad``; ``torch.set_num_threads`` is set to the cores XLA:CPU uses) and
tokamax's ``dot_product_attention`` with ``implementation="xla"`` and ``"xla_chunked"``. A
peer whose import fails is skipped with one line saying so. Before any row is timed, every
peer's forward output (and, for forward+backward, its three gradients) is checked against
jaxattn's: a benchmark comparing different computations would be worthless.

Every JAX implementation is wrapped in ``jax.jit``; all, torch included (synchronous on CPU),
are timed in interleaved rounds (median). ``jaxattn`` is ``dot_product_attention`` with
``implementation=None`` (the dispatcher's pick, shown in the path column). FLOPs count the
two matmuls of the forward pass, 4*B*N*T*S*H, over unmasked (query, key) pairs only (so causal
work is about half); forward+backward counts 3x the forward. The ceiling is a 2048^3 float32
matmul timed in the same run, before and after the table. Ratios are jaxattn time / time of
the fastest peer measured in that row (named in the best-peer column): below 1 means jaxattn
is faster than every peer. The soft-cap table times ``implementation="flash"`` with and
without ``logits_soft_cap`` (causal) and divides: the cost of the cap (goal: under 1.15),
beside tokamax with the same cap. Memory is the compiled temporary buffer size reported by XLA
(``jit(f).lower(...).compile().memory_analysis().temp_size_in_bytes``): compiled only, never
run, so the peers' figures at T = 16384 cost nothing to obtain.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, matmul_ceiling_gflops, run_main, time_interleaved

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
    ((1, 4096, 8, 64), False),
    ((1, 4096, 8, 64), True),
]
QUICK_SPEED_CASES = SPEED_CASES[:2]
SOFTCAP_CASES = [(2, 2048, 8, 64), (1, 4096, 8, 64)]  # causal, flash, forward and fwd+bwd
QUICK_SOFTCAP_CASES = [(1, 256, 4, 32)]
SOFT_CAP = 30.0
SOFTCAP_GOAL = 1.15  # soft-capped flash time / plain flash time
MEMORY_LENGTHS = [1024, 2048, 4096, 8192, 16384]
DROPOUT_CASES = [(32, 10, 4, 32), (2, 2048, 8, 64)]  # causal, forward+backward
DROPOUT_RATE = 0.1
PEERS_TIMED_UP_TO = 4096  # beyond this jax.nn and Flax need GiBs of logits: memory only
# Forward outputs and gradients of every peer must match jaxattn's to this, relative to the
# largest magnitude of jaxattn's array (at least 1), before anything is timed.
AGREEMENT_TOL = 1e-4
INSTALL_HINT = 'pip install -e ".[bench]"'
TOKAMAX_IMPLS = ("xla", "xla_chunked")

# The optional peers, filled in by load_optional_peers(): the imported module or None.
OPTIONAL = {"torch": None, "tokamax": None}


def _xla_cpu_threads() -> int:
    """Threads XLA:CPU runs one computation on: one per core this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def load_optional_peers() -> None:
    """Import torch and tokamax if they are installed; print one line for each."""
    try:
        import torch
    except Exception as e:
        print(f"torch peer skipped ({type(e).__name__}: {e}); install it with {INSTALL_HINT}")
    else:
        if jax.default_backend() != "cpu":
            print(f"torch peer skipped: it is timed on CPU, JAX runs on {jax.default_backend()}")
        else:
            threads = _xla_cpu_threads()
            torch.set_num_threads(threads)
            OPTIONAL["torch"] = torch
            print(
                f"torch {torch.__version__}: scaled_dot_product_attention on CPU, "
                f"torch.get_num_threads() = {torch.get_num_threads()} "
                f"(XLA:CPU uses {threads}, one per core)"
            )
    try:
        import tokamax
    except Exception as e:
        print(f"tokamax peer skipped ({type(e).__name__}: {e}); install it with {INSTALL_HINT}")
    else:
        # tokamax reads its config from absl flags and, on first use, parses sys.argv with
        # them, which fails on this script's own flags (--quick): parse none, keep defaults.
        from absl import flags

        if not flags.FLAGS.is_parsed():
            flags.FLAGS([sys.argv[0]])
        OPTIONAL["tokamax"] = tokamax
        print(
            f"tokamax {tokamax.__version__}: dot_product_attention, implementation "
            + " and ".join(repr(i) for i in TOKAMAX_IMPLS)
        )


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


def _tokamax_impls(causal: bool, soft_cap: float | None = None) -> dict:
    """tokamax's implementations "xla" and "xla_chunked", or nothing if it is not installed."""
    tokamax = OPTIONAL["tokamax"]
    if tokamax is None:
        return {}

    def peer(implementation):
        def f(q, k, v):
            return tokamax.dot_product_attention(
                q, k, v, is_causal=causal, logits_soft_cap=soft_cap, implementation=implementation
            )

        return f

    return {f"tokamax {impl}": peer(impl) for impl in TOKAMAX_IMPLS}


def _torch_calls(q, k, v, do, causal: bool):
    """Zero-argument forward and forward+backward calls of torch's CPU SDPA on copies of the
    inputs in its [B, N, T, H] layout (transposed here, once, outside the timed calls), and a
    function turning their results back into [B, T, N, H] numpy arrays."""
    torch = OPTIONAL["torch"]
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def to_torch(x, requires_grad=False):
        t = torch.from_numpy(np.array(x)).permute(0, 2, 1, 3).contiguous()
        return t.requires_grad_(requires_grad)

    tq, tk, tv, tdo = (to_torch(x) for x in (q, k, v, do))
    gq, gk, gv = (to_torch(x, requires_grad=True) for x in (q, k, v))

    def fwd():
        with torch.inference_mode():
            return sdpa(tq, tk, tv, is_causal=causal)

    def fwd_bwd():
        out = sdpa(gq, gk, gv, is_causal=causal)
        return torch.autograd.grad(out, (gq, gk, gv), tdo)  # fresh grads, as jax.vjp gives

    def to_numpy(result):
        result = result if isinstance(result, tuple) else (result,)
        return [r.detach().permute(0, 2, 1, 3).numpy() for r in result]

    kernel = torch.nn.attention.SDPBackend(torch._fused_sdp_choice(gq, gk, gv, is_causal=causal))
    return fwd, fwd_bwd, to_numpy, kernel.name


def _max_disagreement(calls, to_numpy=None, where="") -> float | None:
    """Run each call once and compare its arrays with those of the first call (jaxattn's).

    Returns the largest absolute difference over all peers and arrays (None if there is no
    peer); raises if any peer differs by more than AGREEMENT_TOL relative to the reference's
    largest magnitude."""
    to_numpy = to_numpy or {}
    if len(calls) < 2:
        return None

    def arrays(name):
        result = calls[name]()
        if name in to_numpy:
            return to_numpy[name](result)
        return [np.asarray(x) for x in jax.tree.leaves(result)]

    ref_name, *peers = calls
    ref = arrays(ref_name)
    worst = 0.0
    for name in peers:
        for i, (r, g) in enumerate(zip(ref, arrays(name), strict=True)):
            err = float(np.max(np.abs(r - g)))
            bound = AGREEMENT_TOL * max(1.0, float(np.max(np.abs(r))))
            if not err <= bound:
                raise AssertionError(
                    f"{name} disagrees with {ref_name} {where} (array {i}): "
                    f"max |difference| {err:.3g} > {bound:.3g}"
                )
            worst = max(worst, err)
    return worst


def _call(f, *args):
    """The zero-argument call ``f(*args)``, as time_interleaved takes it."""
    return lambda: f(*args)


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
    """Forward and forward+backward times of jaxattn and every peer at one shape, after
    checking that they all compute the same thing."""
    b, t, n, h = shape
    q, k, v, do = _inputs(shape)
    impls = _impls(causal, t) | _tokamax_impls(causal)
    fwd = {nm: _call(jax.jit(f), q, k, v) for nm, f in impls.items()}
    bwd = {nm: _call(jax.jit(_fwd_bwd(f)), q, k, v, do) for nm, f in impls.items()}
    to_numpy, kernel = {}, None
    if OPTIONAL["torch"] is not None:
        fwd["torch"], bwd["torch"], to_numpy["torch"], kernel = _torch_calls(q, k, v, do, causal)
    where = f"at {shape}, causal={causal}"
    diff_fwd = _max_disagreement(fwd, to_numpy, f"(forward) {where}")
    diff_bwd = _max_disagreement(bwd, to_numpy, f"(gradients) {where}")
    t_fwd = time_interleaved(fwd, rounds=rounds)
    t_bwd = time_interleaved(bwd, rounds=rounds)
    pairs = t * (t + 1) // 2 if causal else t * t
    return t_fwd, t_bwd, 4 * b * n * pairs * h, (diff_fwd, diff_bwd), kernel


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


def _diff(d: float | None) -> str:
    return "n/a" if d is None else f"{d:.1e}"


def _ms(times, name) -> str:
    return f"{times[name] * 1e3:.3f}" if name in times else "skipped"


def _best_peer(times) -> str:
    return min((nm for nm in times if nm != "jaxattn"), key=times.__getitem__)


def speed_table(shapes, rounds: int) -> None:
    c0 = matmul_ceiling_gflops()
    dots = block_dots_gflops()
    names = ["jaxattn", "jax.nn", "flax.nnx", "torch", *(f"tokamax {i}" for i in TOKAMAX_IMPLS)]
    header = (
        "| (B,T,N,H) | causal | pass | path | "
        + " | ".join(f"{nm} ms" for nm in names)
        + " | jaxattn GFLOP/s | % ceiling | best peer | ratio vs best peer | max abs diff |"
    )
    rows, kernels = [], set()
    for shape, causal in shapes:
        t_fwd, t_bwd, flops, diffs, kernel = bench_case(shape, causal, rounds)
        kernels.add(kernel)
        for label, times, work, diff in (
            ("fwd", t_fwd, flops, diffs[0]),
            ("fwd+bwd", t_bwd, 3 * flops, diffs[1]),
        ):
            rows.append((shape, causal, label, times, work, diff))
    c1 = matmul_ceiling_gflops()
    ceiling = (c0 + c1) / 2
    print(f"ceiling: 2048^3 float32 matmul = {c0:.1f} GFLOP/s before, {c1:.1f} after")
    print(
        f"block dots: the two matmuls of one 512 x 512 x 64 block alone = {dots:.1f} GFLOP/s "
        f"({100 * dots / ceiling:.0f}% of the ceiling)\n"
    )
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for shape, causal, label, times, work, diff in rows:
        best = _best_peer(times)
        gflops = work / times["jaxattn"] / 1e9
        cells = " | ".join(_ms(times, nm) for nm in names)
        print(
            f"| {shape} | {'yes' if causal else 'no'} | {label} | {_path(shape)} | {cells} | "
            f"{gflops:.1f} | {100 * gflops / ceiling:.0f}% | {best} | "
            f"{times['jaxattn'] / times[best]:.2f} | {_diff(diff)} |",
            flush=True,
        )
    print(
        "\nmax abs diff: the largest |peer - jaxattn| over all peers, of the output (fwd) or of "
        f"dq, dk, dv (fwd+bwd), checked before timing (bound {AGREEMENT_TOL:g} x the largest "
        "|jaxattn| value, at least 1)."
    )
    if OPTIONAL["torch"] is not None:
        print(f"torch SDPA kernel chosen (torch._fused_sdp_choice): {', '.join(sorted(kernels))}")


def softcap_table(shapes, rounds: int) -> None:
    """Causal attention on the flash path with and without ``logits_soft_cap``: the cost of
    the cap, and tokamax (which has the same cap) beside it."""
    peers = [f"tokamax {i}" for i in TOKAMAX_IMPLS]
    print(
        f"\nlogits soft cap {SOFT_CAP:g}, causal, jaxattn implementation='flash' "
        f"(goal: soft-cap cost under {SOFTCAP_GOAL}):\n\n"
        "| (B,T,N,H) | pass | flash ms | flash soft-cap ms | soft-cap cost | "
        + " | ".join(f"{nm} soft-cap ms" for nm in peers)
        + " | soft-cap ratio vs best peer | max abs diff |"
    )
    print("|" + "---|" * (7 + len(peers)))
    for shape in shapes:
        q, k, v, do = _inputs(shape)

        def flash(q, k, v, cap=None):
            return jaxattn.dot_product_attention(
                q, k, v, is_causal=True, implementation="flash", logits_soft_cap=cap
            )

        impls = {
            "flash soft-cap": lambda q, k, v: flash(q, k, v, SOFT_CAP),
            "flash": flash,
        } | _tokamax_impls(True, SOFT_CAP)
        for label, args, wrap in (("fwd", (q, k, v), None), ("fwd+bwd", (q, k, v, do), _fwd_bwd)):
            calls = {nm: _call(jax.jit(wrap(f) if wrap else f), *args) for nm, f in impls.items()}
            checked = {nm: c for nm, c in calls.items() if nm != "flash"}  # others are capped
            diff = _max_disagreement(checked, where=f"({label}, soft cap) at {shape}")
            times = time_interleaved(calls, rounds=rounds)
            capped = times["flash soft-cap"]
            best = min((times[nm] for nm in peers if nm in times), default=None)
            ratio = f"{capped / best:.2f}" if best else "n/a"
            cells = " | ".join(_ms(times, nm) for nm in peers)
            print(
                f"| {shape} | {label} | {times['flash'] * 1e3:.3f} | {capped * 1e3:.3f} | "
                f"{capped / times['flash']:.2f} | {cells} | {ratio} | {_diff(diff)} |",
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
    parser.add_argument(
        "--quick", action="store_true", help="tiny shapes, every peer: speed and soft-cap only"
    )
    parser.add_argument("--rounds", type=int, default=None, help="7, or 3 with --quick")
    parser.add_argument(
        "--only", choices=["speed", "softcap", "memory", "compile", "dropout"], default=None
    )
    parser.add_argument(
        "--max-t", type=int, default=None, help="only shapes with sequence length T <= this"
    )
    args = parser.parse_args(argv)
    print(f"machine: {machine()}")
    load_optional_peers()
    rounds = args.rounds or (3 if args.quick else 7)
    max_t = args.max_t or float("inf")

    def upto(cases, t_of):
        return [c for c in cases if t_of(c) <= max_t]

    if args.quick:
        speed_table(upto(QUICK_SPEED_CASES, lambda c: c[0][1]), rounds)
        softcap_table(upto(QUICK_SOFTCAP_CASES, lambda c: c[1]), rounds)
        return
    if args.only in (None, "compile"):
        compile_time(min(16384, max_t))
    if args.only in (None, "speed"):
        speed_table(upto(SPEED_CASES, lambda c: c[0][1]), rounds)
    if args.only in (None, "softcap"):
        softcap_table(upto(SOFTCAP_CASES, lambda c: c[1]), rounds)
    if args.only in (None, "memory"):
        memory_table(upto(MEMORY_LENGTHS, lambda t: t), rounds)
    if args.only in (None, "dropout"):
        dropout_table(upto(DROPOUT_CASES, lambda c: c[1]), rounds)


if __name__ == "__main__":
    run_main(main)
