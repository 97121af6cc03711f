"""Training on a device mesh (issue 13, first part): the mesh, the sharding rules, and
sharded training that gives one device's losses, on CPU devices forced to 4 or 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

from jaxattn.train import load_run
from jaxattn.train.config import load_config
from jaxattn.train.loop import train
from jaxattn.train.rundir import RunError
from jaxattn.train.sharding import AXES, MeshError, make_mesh, param_spec

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny.yaml"


class Key:  # a pytree path entry, as jax.tree_util makes them
    def __init__(self, key):
        self.key = key


def spec(names, shape, sizes):
    return param_spec([Key(n) for n in names], shape, AbstractMesh(sizes, AXES))


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
    # LayerNorm, output biases and counters are replicated.
    assert spec(["final_norm", "scale"], (64,), (1, 4, 2)) == P()
    assert spec(["count"], (), (1, 4, 2)) == P()


@pytest.mark.parametrize(
    ("sizes", "says"),
    [
        ((-1, -1, 1), "at most one mesh axis may be -1"),
        ((3, 1, 1), "mesh data=3 x fsdp=1 x tensor=1 needs 3 devices, this process sees 1 device"),
        ((-1, 2, 1), "this process sees 1 device, not a multiple of 2"),
    ],
)
def test_a_mesh_these_devices_cannot_make_is_one_line(sizes, says):
    with pytest.raises(MeshError) as info:
        make_mesh(*sizes)
    assert says in str(info.value) and "\n" not in str(info.value)


def test_train_refuses_an_impossible_mesh_before_creating_the_run_directory(tmp_path):
    config = load_config(TINY, [f"train.run_dir={tmp_path / 'run'}", "mesh.tensor=2"])
    with pytest.raises(RunError, match="tensor=2: this process sees 1 device, not a multiple of 2"):
        train(config, log=lambda _: None)
    assert not (tmp_path / "run").exists()


SHARDED = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from jaxattn.train import sharding, tasks
    from jaxattn.train.config import load_config
    from jaxattn.train.optim import make_optimizer
    from jaxattn.train.steps import init_state, make_train_chunk, updates

    config = load_config(sys.argv[1], ["train.steps=20", "model.num_layers=1"])
    optimizer = make_optimizer(config.optim, d_model=64, total_steps=updates(config))
    key = tasks.seed_key(0)
    out = {}
    for name, sizes in [("one", None), ("data=4", (4, 1, 1)), ("fsdp=4", (1, 4, 1)),
                        ("data=2 x tensor=2", (2, 1, 2))]:
        mesh = None if sizes is None else sharding.make_mesh(*sizes)
        graphdef, params, opt_state = init_state(config, optimizer, mesh)
        params, opt_state, m = make_train_chunk(config, graphdef, optimizer, mesh)(
            params, opt_state, key, 0, 20
        )
        q = params["blocks"][0]["attention"]["q_proj"]["kernel"][...]
        up_mu = opt_state[1][0].mu["blocks"][0]["feed_forward"]["up"]["kernel"][...]
        out[name] = {
            "loss": np.asarray(m["loss"]).tolist(),
            "devices": len(q.sharding.device_set),
            "q_shard": list(q.addressable_shards[0].data.shape),
            "up_mu_shard": list(up_mu.addressable_shards[0].data.shape),
        }
    print(json.dumps(out))
    """
)


def _python(code: str, devices: int, *args) -> str:
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
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


def test_20_steps_on_three_meshes_give_the_losses_of_one_device_with_the_rules_shards():
    out = json.loads(_python(SHARDED, 4, TINY))
    one = np.asarray(out["one"]["loss"])
    for name in ("data=4", "fsdp=4", "data=2 x tensor=2"):
        # Sharded reductions add in another order: float32 rounding, nothing more.
        np.testing.assert_allclose(out[name]["loss"], one, rtol=1e-5, atol=1e-5)
        assert out[name]["devices"] == 4
    # q_proj [64, 64] and Adam's mu of up [64, 256]: whole on data=4, the model width split
    # 4 ways on fsdp=4, the heads / hidden width split 2 ways on tensor=2.
    assert out["data=4"]["q_shard"] == [64, 64]
    assert out["fsdp=4"]["q_shard"] == [16, 64] and out["fsdp=4"]["up_mu_shard"] == [16, 256]
    assert out["data=2 x tensor=2"]["q_shard"] == [64, 32]
    assert out["data=2 x tensor=2"]["up_mu_shard"] == [64, 128]


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


def test_a_run_on_4_devices_resumes_on_2_and_loads_on_1(tmp_path):
    run = tmp_path / "run"
    args = [
        f"train.run_dir={run}",
        "train.progress=false",
        "train.pictures=false",
        "train.steps=20",
        "train.eval_every=10",
        "train.steps_per_call=10",
        "task.eval_size=64",
        "model.num_layers=1",  # compiles faster; the sharding does not depend on depth
    ]
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
