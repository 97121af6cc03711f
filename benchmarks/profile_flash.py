"""Where the time of one flash attention call goes, by kind of XLA operation.

    python benchmarks/profile_flash.py                       # causal forward, (2, 2048, 8, 64)
    python benchmarks/profile_flash.py --shape 1,4096,8,64 --backward --no-causal

Runs the call under ``jax.profiler`` (a Perfetto trace in a temporary directory), sums the
duration of every executed XLA operation, and groups them: matmuls (``dot``), reductions
(max and sum of the softmax), exponentials, copies and slices, masking (``select``) and the
rest. The matmul line also gives its GFLOP/s over the FLOPs the blocks actually compute
(masked pairs inside a visited block included), to set beside the 2048^3 ceiling measured in
the same run: it says how much of a call is matmul work at the machine's rate, and so what
fraction of the ceiling the whole call could reach at best.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, matmul_ceiling_gflops, run_main

import jaxattn
from jaxattn import _blocks as flash_blocks
from jaxattn import _flash as flash

_SKIP = ("Thunk", "$", "cond", "while", "Slinky", "Pjit", "Common", "Execute", "end:", "Alloc")
_GROUPS = {
    "dot": "matmul",
    "reduce": "reduce (max, sum)",
    "exponential": "exp",
    "select": "mask (select)",
    "copy": "copy/slice/transpose",
    "transpose": "copy/slice/transpose",
    "bitcast": "copy/slice/transpose",
    "dynamic-slice": "copy/slice/transpose",
    "dynamic-update-slice": "copy/slice/transpose",
}


def _root_ops(hlo: str) -> dict[str, str]:
    """Name of each fusion or op in the compiled HLO -> the op at the root of what it calls."""
    roots, current = {}, None
    for line in hlo.splitlines():
        m = re.match(r"^%(\S+) \(", line)
        if m:
            current = m.group(1)
        elif current and "ROOT" in line:
            op = re.search(r"= \S+ ([\w-]+)\(", line)
            roots.setdefault(current, op.group(1) if op else "?")
    kinds = {}
    for line in hlo.splitlines():
        m = re.match(r"\s+%(\S+) = .*fusion\(.*calls=%(\S+?),", line)
        if m:
            kinds[m.group(1)] = roots.get(m.group(2), "?")
    return kinds


def _computed_flops(shape, causal: bool, blocks, backward: bool) -> float:
    """FLOPs of the matmuls over the visited blocks (a visited block is computed whole)."""
    b, t, n, h = shape
    bq, bk = min(blocks[0], t), min(blocks[1], t)
    nq, nk = -(-t // bq), -(-t // bk)
    geo = flash_blocks.Geo(b=1, t=t, s=t, k=1, g=1, h=h, hv=h, bq=bq, bk=bk, nq=nq, nk=nk)
    cls = np.asarray(flash_blocks.classify(geo, jaxattn.CausalMask() if causal else None, None))
    pairs = np.count_nonzero(cls) * bq * bk
    per_pair = 4 * h * (3.5 if backward else 1)  # forward: 2 matmuls; backward: 5 more
    return b * n * pairs * per_pair


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="2,2048,8,64", help="B,T,N,H")
    parser.add_argument("--no-causal", dest="causal", action="store_false")
    parser.add_argument("--backward", action="store_true", help="forward+backward")
    parser.add_argument("--calls", type=int, default=5)
    args = parser.parse_args()
    shape = tuple(int(x) for x in args.shape.split(","))
    blocks = flash.DEFAULT_BLOCKS[jax.default_backend()]

    keys = jax.random.split(jax.random.key(1), 4)
    q, k, v, d_out = (jax.random.normal(key, shape, jnp.float32) for key in keys)

    def attend(q, k, v):
        return jaxattn.dot_product_attention(q, k, v, is_causal=args.causal, implementation="flash")

    if args.backward:
        fn = jax.jit(lambda q, k, v, d: jax.vjp(attend, q, k, v)[1](d))
        inputs = (q, k, v, d_out)
    else:
        fn = jax.jit(attend)
        inputs = (q, k, v)
    kinds = _root_ops(fn.lower(*inputs).compile().as_text())
    jax.block_until_ready(fn(*inputs))

    ceiling = matmul_ceiling_gflops()
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            start = time.perf_counter()
            for _ in range(args.calls):
                jax.block_until_ready(fn(*inputs))
            wall = (time.perf_counter() - start) / args.calls
        (trace,) = Path(trace_dir).rglob("*.trace.json.gz")
        events = json.load(gzip.open(trace))
    events = events["traceEvents"] if isinstance(events, dict) else events

    per_group: dict[str, float] = collections.Counter()
    for event in events:
        name = event.get("name", "")
        if event.get("ph") != "X" or name.startswith(_SKIP):
            continue
        op = kinds.get(name, name.split(".")[0])
        per_group[_GROUPS.get(op, "other")] += event.get("dur", 0) / 1e3 / args.calls

    total = sum(per_group.values())
    flops = _computed_flops(shape, args.causal, blocks, args.backward)
    print(machine())
    pass_name = "fwd+bwd" if args.backward else "fwd"
    print(f"shape {shape}, causal={args.causal}, {pass_name}, blocks {blocks}")
    print(f"wall {wall * 1e3:.1f} ms per call (under the profiler); ops sum {total:.1f} ms")
    print(f"ceiling (2048^3 matmul): {ceiling:.1f} GFLOP/s\n")
    print("| op | ms per call | share |")
    print("|---|---|---|")
    for group, ms in sorted(per_group.items(), key=lambda x: -x[1]):
        print(f"| {group} | {ms:.1f} | {ms / total:.0%} |")
    dot_ms = per_group.get("matmul", 0.0)
    if dot_ms:
        rate = flops / dot_ms / 1e6
        gflop = flops / 1e9
        print(f"\nmatmuls: {gflop:.2f} GFLOP computed (visited blocks whole) at {rate:.1f} GFLOP/s")


if __name__ == "__main__":
    run_main(main)
