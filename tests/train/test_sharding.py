"""Training on a device mesh (issue 13, first part): the mesh, the sharding rules, and
sharded training that gives one device's losses, on CPU devices forced to 4 or 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import ROOT, SHORT_RUN, TINY, xla_flags
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

from jaxattn.train import load_run
from jaxattn.train.config import load_config
from jaxattn.train.loop import train
from jaxattn.train.rundir import RunError
from jaxattn.train.sharding import AXES, MeshError, make_mesh, param_spec


class Key:  # a pytree path entry, as jax.tree_util makes them
    def __init__(self, key):
        self.key = key


def spec(names, shape, sizes):
    return param_spec([Key(n) for n in names], shape, AbstractMesh(sizes, AXES), head_dim=16)


def test_rules_shard_weights_over_fsdp_and_tensor_where_the_axis_divides():
    assert spec(["blocks", "0", "attention", "q_proj", "kernel"], (64, 64), (1, 4, 2)) == P(
        "fsdp", "tensor"
    )
    assert spec(["blocks", "feed_forward", "down", "kernel"], (256, 64), (1, 4, 2)) == P(
        "tensor", "fsdp"
    )
    # Adam's moments carry the parameter's path under mu / nu: the same rule.
    assert spec(["mu", "embed", "embedding"], (16, 64), (1, 4, 2)) == P("tensor", "fsdp")
    # A vocabulary of 15 is not split in 2: that dim stays whole.
    assert spec(["embed", "embedding"], (15, 64), (1, 4, 2)) == P(None, "fsdp")
    # Heads split whole: a key projection of one head (16 wide) is not split 2 ways.
    assert spec(["attention", "k_proj", "kernel"], (64, 16), (1, 4, 2)) == P("fsdp", None)
    assert spec(["attention", "k_proj", "kernel"], (64, 32), (1, 4, 2)) == P("fsdp", "tensor")
    # LayerNorm, output biases and counters are replicated.
    assert spec(["final_norm", "scale"], (64,), (1, 4, 2)) == P()
    assert spec(["count"], (), (1, 4, 2)) == P()


CPU_COUNT = "XLA_FLAGS=--xla_force_host_platform_device_count"


@pytest.mark.parametrize(
    ("sizes", "says"),
    [
        ((-1, -1, 1), "at most one mesh axis may be -1"),
        (
            (3, 1, 1),
            "mesh data=3, fsdp=1, tensor=1 uses 3 devices but this process has 1: "
            "data x fsdp x tensor must equal 1 (e.g. mesh.data=1), or make 3 devices visible "
            f"(CUDA_VISIBLE_DEVICES; on CPU {CPU_COUNT}=3)",
        ),
        (
            (1, 2, 2),
            "uses 4 devices but this process has 1: data x fsdp x tensor must equal 1 "
            "(e.g. mesh.data=1 mesh.fsdp=1 mesh.tensor=1)",
        ),
        (
            (-1, 2, 1),
            "mesh data=-1, fsdp=2, tensor=1 cannot use the 1 device this process has: "
            "fsdp x tensor = 2 must divide 1 (data=-1 takes the rest), or make a multiple of 2 "
            f"devices visible (CUDA_VISIBLE_DEVICES; on CPU {CPU_COUNT}=2)",
        ),
    ],
)
def test_a_mesh_these_devices_cannot_make_is_one_line(sizes, says):
    with pytest.raises(MeshError) as info:
        make_mesh(*sizes)
    assert says in str(info.value) and "\n" not in str(info.value)


def test_train_refuses_an_impossible_mesh_before_creating_the_run_directory(tmp_path):
    config = load_config(TINY, [f"train.run_dir={tmp_path / 'run'}", "mesh.tensor=2"])
    with pytest.raises(RunError, match="tensor=2 cannot use the 1 device this process has"):
        train(config, log=lambda _: None)
    assert not (tmp_path / "run").exists()


SHARDED = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from jaxattn.train import sharding, tasks
    from jaxattn.train.config import load_config
    from jaxattn.train.plan import make_plan, mesh_for
    from jaxattn.train.rundir import RunError
    import jax
    from flax import nnx
    from jaxattn.nn import decoding


    config = load_config(sys.argv[1], ["train.steps=20", "model.num_layers=1"])
    refused = {}  # what a run says of a mesh that does not use the 4 devices, too few or many
    for mesh in (["mesh.data=3"], ["mesh.data=8"], ["mesh.tensor=3"]):
        try:
            mesh_for(load_config(sys.argv[1], mesh))
        except RunError as err:
            refused[" ".join(mesh)] = str(err)
    key = tasks.seed_key(0)
    prompts = np.asarray(tasks.eval_batch(config.task).inputs[:16, :12])  # BOS x1..x10 SEP
    out = {}
    for name, sizes in [("one", None), ("data=4", (4, 1, 1)), ("fsdp=4", (1, 4, 1)),
                        ("data=2 x tensor=2", (2, 1, 2))]:
        plan = make_plan(config, None if sizes is None else sharding.make_mesh(*sizes))
        graphdef = plan.graphdef
        params, opt_state = plan.init_state()
        params, opt_state, m = plan.train_chunk(params, opt_state, key, 0, 20)
        q = params["blocks"][0]["attention"]["q_proj"]["kernel"][...]
        up_mu = opt_state[1][0].mu["blocks"][0]["feed_forward"]["up"]["kernel"][...]
        out[name] = {
            "loss": np.asarray(m["loss"]).tolist(),
            "devices": len(q.sharding.device_set),
            "q_shard": list(q.addressable_shards[0].data.shape),
            "up_mu_shard": list(up_mu.addressable_shards[0].data.shape),
        }
        if name == "data=4":  # data parallelism: covered by the losses; saves compiling
            continue
        # Evaluation and cached generation on the sharded parameters, as they are.
        evaluation = plan.evaluate(params)
        generated = decoding.decode(
            graphdef, params, prompts, np.full(16, 12, np.int32), None, max_new_tokens=10
        )
        logits, _ = jax.jit(lambda p: nnx.merge(graphdef, p).prefill(
            prompts, nnx.merge(graphdef, p).init_cache(16, 22)))(params)
        out[name]["eval_loss"] = float(evaluation["eval_loss"])
        out[name]["generated"] = np.asarray(generated).tolist()
        out[name]["prefill_logits"] = np.asarray(logits).tolist()
    print(json.dumps({"meshes": out, "refused": refused}))
    """
)


def _python(code: str, devices: int, *args) -> str:
    env = {
        **os.environ,
        "XLA_FLAGS": xla_flags(f"--xla_force_host_platform_device_count={devices}"),
    }
    result = subprocess.run(
        [sys.executable, "-c", code, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip().splitlines()[-1]


@pytest.mark.processes
def test_20_steps_on_three_meshes_give_the_losses_of_one_device_with_the_rules_shards():
    result = json.loads(_python(SHARDED, 4, TINY))
    out = result["meshes"]
    one = np.asarray(out["one"]["loss"])
    for name in ("data=4", "fsdp=4", "data=2 x tensor=2"):
        # Sharded reductions add in another order: float32 rounding, nothing more.
        np.testing.assert_allclose(out[name]["loss"], one, rtol=1e-5, atol=1e-5)
        assert out[name]["devices"] == 4
        if name == "data=4":
            continue
        np.testing.assert_allclose(out[name]["eval_loss"], out["one"]["eval_loss"], rtol=1e-5)
        np.testing.assert_allclose(
            out[name]["prefill_logits"], out["one"]["prefill_logits"], rtol=1e-4, atol=1e-5
        )
        assert out[name]["generated"] == out["one"]["generated"]
    # q_proj [64, 64] and Adam's mu of up [64, 256]: whole on data=4, the model width split
    # 4 ways on fsdp=4, the heads / hidden width split 2 ways on tensor=2.
    assert out["data=4"]["q_shard"] == [64, 64]
    assert out["fsdp=4"]["q_shard"] == [16, 64] and out["fsdp=4"]["up_mu_shard"] == [16, 256]
    assert out["data=2 x tensor=2"]["q_shard"] == [64, 32]
    assert out["data=2 x tensor=2"]["up_mu_shard"] == [64, 128]
    # A mesh that does not use the 4 devices: it said "needs 3 devices, this process sees 4
    # devices", which reads as too few.
    fix = "data x fsdp x tensor must equal 4 (e.g. mesh.data=4)"
    assert result["refused"] == {
        "mesh.data=3": f"mesh data=3, fsdp=1, tensor=1 uses 3 devices but this process has 4: "
        f"{fix}, or make 3 devices visible (CUDA_VISIBLE_DEVICES; on CPU {CPU_COUNT}=3)",
        "mesh.data=8": f"mesh data=8, fsdp=1, tensor=1 uses 8 devices but this process has 4: "
        f"{fix}, or make 8 devices visible (CUDA_VISIBLE_DEVICES; on CPU {CPU_COUNT}=8)",
        "mesh.tensor=3": "mesh data=-1, fsdp=1, tensor=3 cannot use the 4 devices this "
        "process has: fsdp x tensor = 3 must divide 4 (data=-1 takes the rest), or make a "
        f"multiple of 3 devices visible (CUDA_VISIBLE_DEVICES; on CPU {CPU_COUNT}=3)",
    }


RUN = textwrap.dedent(
    """
    import sys
    from jaxattn.train.config import load_config
    from jaxattn.train.loop import train
    config = load_config(sys.argv[1], sys.argv[3:])
    result = train(config, resume=sys.argv[2] == "resume", log=lambda _: None)
    print(result.steps, result.resumed_from)
    """
)


@pytest.mark.processes
def test_a_run_on_4_devices_resumes_on_2_and_loads_on_1(tmp_path):
    run = tmp_path / "run"
    args = [f"train.run_dir={run}", *SHORT_RUN]
    assert _python(RUN, 4, TINY, "new", *args, "mesh.fsdp=4", "mesh.data=1") == "20 None"
    whole = (run / "metrics.jsonl").read_text()
    # Lose the last checkpoint, as a kill would: the run continues from step 10 on 2 devices.
    import shutil

    shutil.rmtree(run / "checkpoints" / "20")
    (run / "summary.json").unlink()
    assert _python(RUN, 2, TINY, "resume", *args, "mesh.data=2") == "20 10"
    resumed = (run / "metrics.jsonl").read_text()
    steps = [[json.loads(line)["step_losses"] for line in t.splitlines()] for t in (whole, resumed)]
    np.testing.assert_allclose(np.ravel(steps[1]), np.ravel(steps[0]), rtol=1e-5)
    model, config = load_run(run)  # this process: one device
    assert config.mesh.data == 2
    assert len(model.embed.embedding[...].sharding.device_set) == 1


PER_SHARD = textwrap.dedent(
    """
    import json
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    import jaxattn as ja
    from jaxattn.nn.layers import per_shard
    from jaxattn.train.sharding import make_mesh

    COLLECTIVES = ("all-gather", "all-to-all", "collective-permute", "all-reduce")
    out = {}
    cases = [((2, 1, 2), "flash", 4), ((2, 1, 2), "xla", 2), ((1, 1, 4), "flash", 1),
             ((1, 1, 4), "xla", 2)]
    for sizes, impl, kv in cases:
        mesh = make_mesh(*sizes)
        t = 160 if impl == "flash" else 16  # flash: T * S >= 128 * 128
        keys = jax.random.split(jax.random.key(0), 3)
        q = jax.random.normal(keys[0], (8, t, 4, 16))
        k, v = (jax.random.normal(x, (8, t, kv, 16)) for x in keys[1:])
        heads = "tensor" if kv % sizes[2] == 0 else None
        q_sh = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))
        kv_sh = NamedSharding(mesh, P(("data", "fsdp"), None, heads, None))
        args = (jax.device_put(q, q_sh), *(jax.device_put(x, kv_sh) for x in (k, v)))

        def attend(q, k, v, key, shard, mask, impl=impl):
            return ja.dot_product_attention(q, k, v, is_causal=True, implementation=impl)

        def sharded(q, k, v, mesh=mesh, attend=attend):
            with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
                return per_shard(attend, q, k, v, None)

        def plain(q, k, v, attend=attend):
            return attend(q, k, v, None, None, None)

        def grads(f):
            return jax.jit(jax.grad(lambda q, k, v: jnp.sum(f(q, k, v) ** 2), argnums=(0, 1, 2)))

        def collectives(f):
            programs = {"forward": jax.jit(f), "backward": grads(f)}
            return {
                name: {c: fn.lower(*args).compile().as_text().count(c + "(") for c in COLLECTIVES}
                for name, fn in programs.items()
            }

        row = {
            "collectives": collectives(sharded),
            "kv_split": heads is not None,
            "out": np.asarray(jax.jit(sharded)(*args)).tolist(),
            "spec": [list(a) if isinstance(a, tuple) else a
                     for a in jax.jit(sharded)(*args).sharding.spec],
            "grads": [np.asarray(g).tolist() for g in grads(sharded)(*args)],
            # The reference: the same kernel on one device.
            "expected": np.asarray(jax.jit(plain)(q, k, v)).tolist(),
            "expected_grads": [np.asarray(g).tolist() for g in grads(plain)(q, k, v)],
        }
        if (sizes, impl, kv) == ((2, 1, 2), "flash", 4):
            row["plain_collectives"] = collectives(plain)
        out[f"{sizes}-{impl}-{kv}"] = row

    # A per-sequence mask (key padding by lengths, and segments) is split with the batch.
    from jaxattn.masks import PaddingMask, SegmentMask
    mesh = make_mesh(2, 1, 2)
    q, k, v = (jax.random.normal(x, (8, 16, 4, 16)) for x in jax.random.split(jax.random.key(3), 3))
    sh = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))
    lengths = jnp.array([16, 3, 9, 1, 12, 5, 16, 7])
    segments = jnp.asarray(np.random.default_rng(0).integers(0, 2, (8, 16)))

    def attend_masked(q, k, v, key, shard, mask):
        return ja.dot_product_attention(q, k, v, mask=mask)

    def masked(q, k, v):
        mask = PaddingMask(kv_lengths=lengths) & SegmentMask(segments)
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return per_shard(attend_masked, q, k, v, None, mask)

    def masked_plain(q, k, v):
        mask = PaddingMask(kv_lengths=lengths) & SegmentMask(segments)
        return attend_masked(q, k, v, None, None, mask)

    def grads_of(f):
        return jax.jit(jax.grad(lambda q, k, v: jnp.sum(f(q, k, v) ** 2), argnums=(0, 1, 2)))

    sharded_args = [jax.device_put(x, sh) for x in (q, k, v)]
    out["mask"] = {
        "out": np.asarray(jax.jit(masked)(*sharded_args)).tolist(),
        "expected": np.asarray(jax.jit(masked_plain)(q, k, v)).tolist(),
        "grads": [np.asarray(g).tolist() for g in grads_of(masked)(*sharded_args)],
        "expected_grads": [np.asarray(g).tolist() for g in grads_of(masked_plain)(q, k, v)],
        "collectives": {
            c: jax.jit(masked).lower(*sharded_args).compile().as_text().count(c + "(")
            for c in COLLECTIVES
        },
    }

    # Bool masks split as they broadcast against [B, N, T, S]: a [T, S] one (T == B here)
    # stays whole, a [B, N, T, S] one is split over the batch and, with the heads, over them.
    tril = jnp.tril(jnp.ones((8, 8), bool))
    per_row = jax.random.bernoulli(jax.random.key(4), 0.7, (8, 4, 8, 8)) | jnp.eye(8, dtype=bool)
    qs = [x[:, :8] for x in (q, k, v)]
    bool_cases = {}
    for name, mask, sizes in (("shared", tril, (4, 1, 1)), ("per_row_head", per_row, (2, 1, 2))):
        mesh_b = make_mesh(*sizes)
        sh_b = NamedSharding(mesh_b, P(("data", "fsdp"), None, "tensor", None))

        def with_mask(q, k, v, mask=mask, mesh_b=mesh_b):
            with jax.sharding.use_abstract_mesh(mesh_b.abstract_mesh):
                return per_shard(attend_masked, q, k, v, None, mask)

        got = jax.jit(with_mask)(*[jax.device_put(x, sh_b) for x in qs])
        want = attend_masked(*qs, None, None, mask)
        bool_cases[name] = float(jnp.max(jnp.abs(got - want)))
    out["bool_masks"] = bool_cases

    # Dropout per shard: every sequence the same, rows 0 and 4 on different data shards.
    mesh = make_mesh(2, 1, 2)
    x = jnp.broadcast_to(jax.random.normal(jax.random.key(1), (1, 16, 4, 16)), (8, 16, 4, 16))
    x = jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None)))

    def dropped(x, key):
        def attend(q, k, v, key, shard, mask):
            key = key if shard is None else jax.random.fold_in(key, shard)
            return ja.dot_product_attention(q, k, v, dropout_rate=0.5, dropout_key=key)

        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return per_shard(attend, x, x, x, key)

    y = np.asarray(jax.jit(dropped)(x, jax.random.key(2)))
    out["dropout"] = {
        "finite": bool(np.isfinite(y).all()),
        "rows_same_shard_equal": bool(np.array_equal(y[0], y[1])),
        "rows_other_shard_equal": bool(np.array_equal(y[0], y[4])),
    }
    print(json.dumps(out))
    """
)


@pytest.mark.processes
def test_attention_runs_per_shard_without_gathering_its_inputs():
    """Batch (data, fsdp) and heads (tensor) split across 4 devices: per_shard runs the
    kernel on each device's sequences and heads, forward and backward, with no collective at
    all; left to the partitioner, the blockwise kernel gathers the batch (why per_shard
    exists)."""
    out = json.loads(_python(PER_SHARD, 4))
    # One kernel call per shard draws one mask for its rows: rows of one shard share a key
    # (and differ only through their batch index), rows of two shards use two keys.
    assert out.pop("dropout") == {
        "finite": True,
        "rows_same_shard_equal": False,
        "rows_other_shard_equal": False,
    }
    # A mask of per-sequence values is split with its sequences: the values and gradients
    # of one device, and nothing gathered.
    masked = out.pop("mask")
    np.testing.assert_allclose(masked["out"], masked["expected"], rtol=1e-5, atol=1e-6)
    for got, want in zip(masked["grads"], masked["expected_grads"], strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert set(masked["collectives"].values()) == {0}
    assert out.pop("bool_masks") == {
        "shared": pytest.approx(0, abs=1e-6),
        "per_row_head": pytest.approx(0, abs=1e-6),
    }
    assert len(out) == 4
    for case, row in out.items():
        forward, backward = row["collectives"]["forward"], row["collectives"]["backward"]
        assert set(forward.values()) == {0}, case
        if row["kv_split"]:
            assert set(backward.values()) == {0}, case
        else:
            # Keys and values shared by head shards (K < tensor, copied to each): their
            # gradients are summed over the shards and made whole again, as the replicated
            # keys they are; nothing is moved otherwise.
            assert backward["all-to-all"] == backward["collective-permute"] == 0, case
            assert backward["all-reduce"] >= 1, case
        np.testing.assert_allclose(row["out"], row["expected"], rtol=1e-5, atol=1e-6)
        for got, expected in zip(row["grads"], row["expected_grads"], strict=True):
            np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
        assert row["spec"] == [["data", "fsdp"], None, "tensor", None], case
    assert out["(2, 1, 2)-flash-4"]["plain_collectives"]["forward"]["all-gather"] > 0
