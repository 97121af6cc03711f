"""What a run derives from its config, built once and handed down.

:func:`make_plan` builds the schedule, the optimizer on it, the model's graph and abstract
parameters, the abstract optimizer state, the mesh and the shardings, and the jitted train
chunk and evaluation. The loop (its disk and memory estimates, the state it initialises)
and the session (its chunks and evaluations) read them from the :class:`Plan`; nothing
downstream builds any of them again (two schedules built apart are how a logged learning
rate stopped being the applied one).

The train chunk is compiled ahead of time (:meth:`Plan.chunk`), once, for every chunk
length a run takes (the last, shorter chunk of a run or a resumed session included): the
compiled program is the one the session runs, and XLA's memory analysis of it is what
:func:`check_memory` compares with the devices' free memory before a run directory exists.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import optax

from jaxattn.nn.config import DECODER_KINDS
from jaxattn.train import sharding, tasks
from jaxattn.train.config import Config, chunk_size
from jaxattn.train.optim import make_optimizer, make_schedule
from jaxattn.train.rundir import RunError
from jaxattn.train.steps import (
    abstract_model,
    make_eval_fn,
    make_init,
    make_train_chunk,
    state_shardings,
    updates,
)

__all__ = ["Plan", "check_memory", "make_plan", "mesh_for"]


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
    evaluate: Any  # jitted params -> held-out metrics
    _chunks: list = dataclasses.field(default_factory=list, repr=False, compare=False)
    _ahead: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    @property
    def state_bytes(self) -> int:
        """Bytes of the parameters and optimizer state (one copy, from shapes only)."""
        leaves = jax.tree.leaves((self.params, self.opt_state))
        return sum(x.size * x.dtype.itemsize for x in leaves)

    @property
    def chunk_steps(self) -> int:
        """Steps of the longest chunk: :func:`~jaxattn.train.config.chunk_size`, or every
        step of a shorter run."""
        return min(chunk_size(self.config.train), self.config.train.steps)

    def chunk(self):
        """``train_chunk`` compiled once for the plan's state (shapes and shardings):
        ``(params, opt_state, base_key, start_step, steps) -> (params, opt_state,
        metrics)``, any ``steps`` up to :attr:`chunk_steps` (metrics ``[chunk_steps]``, the
        first ``steps`` of them filled). Compiling ahead of time gives the program's memory
        analysis (:func:`check_memory`) without compiling it twice."""
        if not self._chunks:
            key = jax.eval_shape(lambda: tasks.seed_key(0))
            lowered = self.train_chunk.lower(*self._abstract_state(), key, 0, self.chunk_steps, 0)
            self._chunks.append(lowered.compile())
        return self._chunks[0]

    def _abstract_state(self):
        """``(params, opt_state)`` as ShapeDtypeStructs, with their shardings on a mesh."""
        state = (self.params, self.opt_state)
        if self.shardings is None:
            return state
        return jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
            state,
            self.shardings,
        )

    def compile_ahead(self, *, pictures: bool = False) -> None:
        """Start compiling, in a background thread, the programs a run needs besides its
        train chunk: the initialisation, the evaluation and (``pictures``) the pictures'
        attention weights. Called before the chunk compiles: XLA compiles outside Python's
        lock, so two programs compile at once on two cores, and whatever is left compiles
        while the first steps run (on the default run, 1.4 s of a first run's 4 s of
        compilation). :meth:`init_state` and :meth:`evaluator` wait for their program; an
        error compiling one is raised there."""
        if self._ahead:
            return
        from concurrent.futures import ThreadPoolExecutor

        params, _ = self._abstract_state()
        programs = {
            "init": lambda: (
                make_init(self.config, self.optimizer, self.shardings).lower().compile()
            ),
            "evaluate": lambda: self.evaluate.lower(params).compile(),
        }
        kind = self.config.model.kind
        if pictures and self.mesh is None and kind in DECODER_KINDS:  # what pictures draw
            from jaxattn.train.pictures import compile_attention_of

            programs["pictures"] = lambda: compile_attention_of(
                self.graphdef, self.params, self.config.task, kind
            )
        pool = ThreadPoolExecutor(1, thread_name_prefix="jaxattn-compile")
        self._ahead.update({k: pool.submit(f) for k, f in programs.items()})
        pool.shutdown(wait=False)  # its thread ends when the last program is compiled

    def init_state(self):
        """``(params, opt_state)`` of the config's seed, in their shards on the mesh."""
        if "init" in self._ahead:
            return self._ahead["init"].result()()
        return make_init(self.config, self.optimizer, self.shardings)()

    def evaluator(self):
        """The evaluation, compiled: ``params -> held-out metrics``."""
        if "evaluate" not in self._ahead:
            return self.evaluate
        return self._ahead["evaluate"].result()


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


def _size(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _free_memory(device) -> tuple[int, str] | None:
    """Bytes free for ``device``'s buffers and what they are, or None when unknown: an
    accelerator's allocator limit less what is in use; on CPU the host's available memory
    (Linux ``MemAvailable``), which the process's CPU devices share."""
    stats = device.memory_stats() or {}
    if "bytes_limit" in stats:
        return stats["bytes_limit"] - stats.get("bytes_in_use", 0), f"{device.device_kind}"
    if device.platform != "cpu":
        return None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            line = next(x for x in f if x.startswith("MemAvailable:"))
        return int(line.split()[1]) * 1024, "this host"
    except (OSError, StopIteration, ValueError, IndexError):
        pages = os.sysconf("SC_AVPHYS_PAGES") if hasattr(os, "sysconf") else None
        return (pages * os.sysconf("SC_PAGE_SIZE"), "this host") if pages else None


def check_memory(plan: Plan) -> None:
    """Refuse (RunError, one line) a run whose train step cannot fit: XLA's memory analysis
    of the compiled chunk (arguments, outputs not aliased to donated inputs,
    temporaries and code, per device) against the free memory of the devices. Compiles
    the chunk (:meth:`Plan.chunk`), which the run then uses; nothing is allocated."""
    stats = plan.chunk().memory_analysis()
    if stats is None:  # a backend without the analysis: the first step will tell
        return
    per_device = (
        stats.argument_size_in_bytes
        + stats.output_size_in_bytes
        - stats.alias_size_in_bytes
        + stats.temp_size_in_bytes
        + stats.generated_code_size_in_bytes
    )
    device = jax.local_devices()[0]
    free = _free_memory(device)
    if free is None:
        return
    available, where = free
    # The host's memory is shared by the CPU devices the run uses here (its mesh's, or one);
    # an accelerator's is its own.
    used_here = 1 if plan.mesh is None else len(plan.mesh.local_devices)
    sharing = used_here if device.platform == "cpu" else 1
    needed = per_device * sharing
    if needed > available:
        m = plan.config.model
        raise RunError(
            f"the train step needs about {_size(needed)} of memory (XLA's analysis of the "
            f"compiled step: parameters, optimizer state, gradients, activations) but "
            f"{where} has {_size(available)} free; make the model or batch smaller "
            f"(model.d_model={m.d_model}, model.num_layers={m.num_layers}, "
            f"task.batch_size={plan.config.task.batch_size}) or shard it over more devices"
        )
