"""Timing helpers shared by the benchmarks: interleaved rounds, medians, machine facts."""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp


def block(x):
    return jax.block_until_ready(x)


def time_interleaved(
    fns: dict[str, Callable[[], object]], *, rounds: int = 7, min_seconds: float = 0.05
) -> dict[str, float]:
    """Median seconds per call of each zero-argument function.

    Each function is called once to compile and warm up, then an inner repeat count is chosen
    so that one timing lasts ``min_seconds``; the functions take turns in every round so that
    drifts of the machine (frequency, the other core) hit them all alike. In each turn one
    untimed call comes first: work a function leaves running after ``block_until_ready``
    returns (XLA:CPU releasing a peer's ~1 GB of [T, S] buffers) would otherwise be timed as
    part of whichever function runs next (measured: a flash call right after jax.nn took
    20-60% longer, with 10x the involuntary context switches).
    """
    inner = {}
    for name, fn in fns.items():
        block(fn())
        start = time.perf_counter()
        block(fn())
        once = max(time.perf_counter() - start, 1e-6)
        inner[name] = max(1, int(min_seconds / once))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            if len(fns) > 1:
                block(fn())  # settle: absorbs what the previous function left running
            start = time.perf_counter()
            for _ in range(inner[name]):
                out = fn()
            block(out)
            samples[name].append((time.perf_counter() - start) / inner[name])
    return {name: statistics.median(s) for name, s in samples.items()}


def matmul_ceiling_gflops(n: int = 2048, dtype=jnp.float32) -> float:
    """GFLOP/s of one jitted n x n x n matmul: the machine's practical ceiling."""
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), dtype)
    b = jax.random.normal(kb, (n, n), dtype)
    f = jax.jit(jnp.matmul)
    t = time_interleaved({"mm": lambda: f(a, b)}, rounds=5, min_seconds=0.2)["mm"]
    return 2 * n**3 / t / 1e9


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    dev = jax.devices()[0]
    return (
        f"{dev.platform.upper()} ({getattr(dev, 'device_kind', '?')}), host {cpu}, "
        f"{os.cpu_count()} cores; jax {jax.__version__}, Python {platform.python_version()}"
    )


def run_main(main: Callable[[], object]) -> None:
    """Run a benchmark's ``main`` and end as every jaxattn command does
    (:func:`jaxattn.commands._ending.run_command`): Ctrl-C is one line and exit 130, the
    table rows printed so far standing (nothing is written to disk)."""
    from jaxattn.commands._ending import run_command

    def body() -> None:
        try:
            main()
        except KeyboardInterrupt:
            raise KeyboardInterrupt(
                "interrupted: the rows above are complete, the rest was not measured"
            ) from None

    sys.exit(run_command(Path(sys.argv[0]).name, body))
