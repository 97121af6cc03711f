"""Training on a device mesh: per-device memory and steps/s of the train step, by mesh shape,
with remat and mixed precision.

    python benchmarks/sharding.py                   # CPU: 4 forced host devices, wide model
    python benchmarks/sharding.py --model tiny      # configs/tiny.yaml as it is
    python benchmarks/sharding.py --devices 8       # another forced device count (CPU only)

On CPU, ``--xla_force_host_platform_device_count`` splits this machine into ``--devices``
XLA devices (set before JAX starts); they share its cores, so steps/s there measures what
sharding costs, not what more hardware gains. On a GPU or TPU the real devices are used and
the meshes that need more than there are are skipped.

The model is ``configs/tiny.yaml`` widened (``--model wide``: d_model 256, 4 layers, d_ff
1024; batch 64 of length 21) or as it is (``--model tiny``). Each row is the trainer's own
jitted chunk (:func:`jaxattn.train.steps.make_train_chunk`, ``--steps`` fused steps) on that
mesh, its state created in its shards by :func:`jaxattn.train.steps.init_state`:

- state MB / device: parameters and Adam moments held by one device (the shards on device 0);
- compiled MB / device: XLA's memory analysis of the compiled chunk for one device,
  arguments + outputs - donated aliases + temporaries; temp MB: the temporaries alone;
- residuals MB: what the backward pass keeps from the forward pass for one batch on one
  device (the leaves of ``jax.vjp``'s closure, parameters included), the figure remat
  lowers whatever the compiler does (XLA:CPU merges remat's recomputation back into the
  forward pass, so on CPU its compiled memory does not fall; on GPU it does);
- steps/s: median over interleaved rounds (every row takes its turn in each round);
- loss: the chunk's first losses must equal the one-device run's (max |difference| shown).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def _parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("wide", "tiny"), default="wide")
    parser.add_argument("--devices", type=int, default=4, help="forced CPU devices")
    parser.add_argument("--steps", type=int, default=10, help="steps fused in one timed call")
    parser.add_argument("--rounds", type=int, default=5)
    return parser.parse_args(argv)


ARGS = _parse()
# Before JAX is imported: the flag is read once, when the CPU backend starts.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={ARGS.devices}"
).strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import block, machine, run_main, time_interleaved  # noqa: E402

from jaxattn.train import sharding, tasks  # noqa: E402
from jaxattn.train.config import load_config  # noqa: E402
from jaxattn.train.plan import make_plan  # noqa: E402
from jaxattn.train.steps import loss_fn  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WIDE = ["model.d_model=256", "model.num_layers=4", "model.d_ff=1024"]

# (row name, mesh sizes or None for no mesh, model overrides)
CASES = [
    ("1 device, no mesh", None, []),
    ("data=1", (1, 1, 1), []),
    ("data=2", (2, 1, 1), []),
    ("data=4", (4, 1, 1), []),
    ("fsdp=4", (1, 4, 1), []),
    ("data=2 x tensor=2", (2, 1, 2), []),
    ("1 device, remat", None, ["model.remat=true"]),
    ("1 device, bfloat16 compute", None, ["model.compute_dtype=bfloat16"]),
    ("1 device, remat + bfloat16", None, ["model.remat=true", "model.compute_dtype=bfloat16"]),
]


def _mb(n: float) -> str:
    return f"{n / 2**20:.1f}"


def build(mesh_sizes, overrides):
    """The case's chunk, state and a runner that keeps the donated state flowing."""
    model = WIDE if ARGS.model == "wide" else []
    config = load_config(ROOT / "configs" / "tiny.yaml", [*model, *overrides])
    mesh = None
    if mesh_sizes is not None:
        n = int(np.prod(mesh_sizes))
        mesh = sharding.make_mesh(*mesh_sizes, devices=jax.devices()[:n])
    plan = make_plan(config, mesh)
    graphdef, chunk = plan.graphdef, plan.train_chunk
    params, opt_state = plan.init_state()
    key = tasks.seed_key(0)
    compiled = chunk.lower(params, opt_state, key, 0, ARGS.steps).compile()
    memory = compiled.memory_analysis()
    device0 = jax.devices()[0]
    state_bytes = sum(
        shard.data.nbytes
        for leaf in jax.tree.leaves((params, opt_state))
        for shard in leaf.addressable_shards
        if shard.device == device0
    )
    residuals = None
    if mesh is None:
        batch = tasks.make_batch(config.task, key, config.task.batch_size)
        _, vjp = jax.vjp(lambda p: loss_fn(p, graphdef, batch, None, 0.1)[0], params)
        residuals = sum(x.nbytes for x in jax.tree.leaves(vjp))
        del vjp
    held = {"state": (params, opt_state)}

    def run():
        params, opt_state, metrics = chunk(*held["state"], key, 0, ARGS.steps)
        held["state"] = (params, opt_state)
        return metrics["loss"]

    return {
        "run": run,
        "state": state_bytes,
        "temp": memory.temp_size_in_bytes,
        "residuals": residuals,
        "compiled": memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        - memory.alias_size_in_bytes
        + memory.temp_size_in_bytes,
    }


def main() -> None:
    start = time.perf_counter()
    print(f"machine: {machine()}")
    print(f"devices: {len(jax.devices())} x {jax.devices()[0].device_kind}")
    shape = "d_model 256, 4 layers, d_ff 1024" if ARGS.model == "wide" else "tiny.yaml as is"
    print(f"model: {ARGS.model} ({shape}); batch 64 x 21 tokens; {ARGS.steps} steps per call\n")
    cases = {}
    for name, sizes, overrides in CASES:
        if sizes is not None and np.prod(sizes) > len(jax.devices()):
            print(f"skipped {name}: needs {np.prod(sizes)} devices")
            continue
        cases[name] = build(sizes, overrides)
        cases[name]["first"] = np.asarray(block(cases[name]["run"]()))
    reference = cases["1 device, no mesh"]["first"]
    seconds = time_interleaved(
        {name: case["run"] for name, case in cases.items()}, rounds=ARGS.rounds, min_seconds=0.5
    )
    print(
        "| run | state MB / device | compiled MB / device | temp MB / device | steps/s "
        "| residuals MB | vs 1 device | max abs loss diff vs 1 device |"
    )
    print("|---|---|---|---|---|---|---|---|")
    base = seconds["1 device, no mesh"]
    for name, case in cases.items():
        diff = float(np.abs(case["first"] - reference).max())
        print(
            f"| {name} | {_mb(case['state'])} | {_mb(case['compiled'])} | {_mb(case['temp'])} "
            f"| {ARGS.steps / seconds[name]:.1f} "
            f"| {'' if case['residuals'] is None else _mb(case['residuals'])} "
            f"| {base / seconds[name]:.2f}x | {diff:.1e} |"
        )
    print(f"\nwall time: {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    run_main(main)
