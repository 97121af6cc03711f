"""What a run derives from its config, built once and handed down.

:func:`make_plan` builds the schedule, the optimizer on it, the model's graph and abstract
parameters, the abstract optimizer state, the mesh and the shardings, and the jitted train
chunk and evaluation. The loop (its disk estimate, the state it initialises) and the
session (its chunks and evaluations) read them from the :class:`Plan`; nothing downstream
builds any of them again (two schedules built apart are how a logged learning rate stopped
being the applied one).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import optax

from jaxattn.train import sharding
from jaxattn.train.config import Config
from jaxattn.train.optim import make_optimizer, make_schedule
from jaxattn.train.rundir import RunError
from jaxattn.train.steps import (
    abstract_model,
    init_state,
    make_eval_fn,
    make_train_chunk,
    state_shardings,
    updates,
)

__all__ = ["Plan", "make_plan", "mesh_for"]


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything a run builds from ``config`` before its first step."""

    config: Config
    schedule: optax.Schedule  # learning rate at the optimizer's update count
    optimizer: optax.GradientTransformation  # built on ``schedule``
    graphdef: Any  # the model's structure (nnx.GraphDef)
    params: Any  # abstract parameters (nnx.State of jax.ShapeDtypeStruct)
    opt_state: Any  # abstract optimizer state
    mesh: jax.sharding.Mesh | None  # None on one device: nothing to shard
    shardings: tuple | None  # (params, opt_state) NamedShardings on ``mesh``
    train_chunk: Any  # jitted (params, opt_state, key, first step, n) -> (..., metrics)
    evaluate: Any  # params -> held-out metrics (compiled at its first call)

    @property
    def state_bytes(self) -> int:
        """Bytes of the parameters and optimizer state (one copy, from shapes only)."""
        leaves = jax.tree.leaves((self.params, self.opt_state))
        return sum(x.size * x.dtype.itemsize for x in leaves)

    def init_state(self):
        """``(params, opt_state)`` of the config's seed, in their shards on the mesh."""
        return init_state(self.config, self.optimizer, self.shardings)


def mesh_for(config: Config):
    """The device mesh of ``config.mesh``, or None on one device. Raises RunError (one line)
    for a mesh these devices cannot make or a batch it cannot split."""
    m = config.mesh
    try:
        mesh = sharding.make_mesh(m.data, m.fsdp, m.tensor)
        if mesh.size == 1:
            return None
        sharding.check_batch(config.task.batch_size, mesh)
    except sharding.MeshError as err:
        raise RunError(str(err)) from None
    return mesh


def make_plan(config: Config, mesh) -> Plan:
    """Build a run's derived objects once, on ``mesh`` (:func:`mesh_for` the config's, or
    None: one device). Shapes only: no parameter is created and nothing is compiled yet
    (the programs compile at their first call)."""
    schedule = make_schedule(
        config.optim, d_model=config.model.d_model, total_steps=updates(config)
    )
    optimizer = make_optimizer(config.optim, schedule)
    graphdef, params = abstract_model(config)
    opt_state = jax.eval_shape(optimizer.init, params)
    shardings = None if mesh is None else state_shardings(config, params, opt_state, mesh)
    return Plan(
        config=config,
        schedule=schedule,
        optimizer=optimizer,
        graphdef=graphdef,
        params=params,
        opt_state=opt_state,
        mesh=mesh,
        shardings=shardings,
        train_chunk=make_train_chunk(
            config, graphdef, optimizer, schedule, mesh=mesh, shardings=shardings
        ),
        evaluate=make_eval_fn(config, graphdef),
    )
