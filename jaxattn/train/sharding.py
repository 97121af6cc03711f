"""Training on a device mesh: the mesh, the rules that shard parameters, and the shardings
of everything a train step reads and writes.

The engine is JAX's own (``jit`` over a :class:`jax.sharding.Mesh` with ``NamedSharding``):
no parallel loop of ours. The mesh has three axes:

- ``data``: the batch is split across it; parameters are replicated along it.
- ``fsdp``: the batch is split across it too, and so is every weight matrix's model-width
  (``D``) side, with the optimizer state that mirrors it (ZeRO-3 / FSDP style).
- ``tensor``: the heads (``N*H``), the feed-forward hidden width and the vocabulary are
  split across it (Megatron style).

A dimension whose size the axis does not divide stays whole (replicated), so every rule
holds for every model. One device is a 1 x 1 x 1 mesh: nothing to set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxattn.nn.axes import BATCH_AXES, FSDP, MESH_AXES, TENSOR

__all__ = [
    "AXES",
    "BATCH",
    "MeshConfig",
    "MeshError",
    "batch_sharding",
    "check_batch",
    "make_mesh",
    "param_spec",
    "replicated",
    "shardings_of",
]


@dataclass(frozen=True)
class MeshConfig:
    data: int = -1  # devices the batch is split over (-1: all the others leave)
    fsdp: int = 1  # devices the batch and the weights' model width are split over
    tensor: int = 1  # devices the heads, the feed-forward width and the vocabulary are split over
    coordinator: str | None = None  # host:port of process 0 (None: JAX_COORDINATOR_ADDRESS)
    num_processes: int | None = None  # processes of the run (None: JAX_NUM_PROCESSES)
    process_id: int | None = None  # this process's index (None: JAX_PROCESS_ID)


AXES = MESH_AXES  # ("data", "fsdp", "tensor"): jaxattn.nn.axes, which attention reads too
BATCH = BATCH_AXES  # the mesh axes a batch's first dimension is split over

# (module name, leaf name) -> the mesh axis of each dim of that leaf. Kernels are [in, out].
_RULES = {
    ("embed", "embedding"): (TENSOR, FSDP),  # [V, D]
    ("position_embed", "embedding"): (None, FSDP),  # [max_len, D]
    ("q_proj", "kernel"): (FSDP, TENSOR),  # [D, N*H]
    ("k_proj", "kernel"): (FSDP, TENSOR),  # [D, K*H]
    ("v_proj", "kernel"): (FSDP, TENSOR),
    ("q_proj", "bias"): (TENSOR,),
    ("k_proj", "bias"): (TENSOR,),
    ("v_proj", "bias"): (TENSOR,),
    ("out_proj", "kernel"): (TENSOR, FSDP),  # [N*H, D]
    ("up", "kernel"): (FSDP, TENSOR),  # [D, d_ff]
    ("up", "bias"): (TENSOR,),
    ("down", "kernel"): (TENSOR, FSDP),  # [d_ff, D]
    ("unembed", "kernel"): (FSDP, TENSOR),  # [D, V]
    ("unembed", "bias"): (TENSOR,),
}  # everything else (LayerNorm scales and biases, output biases, counters): replicated

# The dim of each attention weight that holds heads (N*H or K*H, head-major): split over
# tensor only in whole heads, as attention runs per head shard (a key/value projection of
# K = 1 head, multi-query, stays whole: a split inside a head would be gathered back).
_HEAD_DIMS = {
    ("q_proj", "kernel"): 1,
    ("k_proj", "kernel"): 1,
    ("v_proj", "kernel"): 1,
    ("q_proj", "bias"): 0,
    ("k_proj", "bias"): 0,
    ("v_proj", "bias"): 0,
    ("out_proj", "kernel"): 0,
}


class MeshError(ValueError):
    """A mesh these devices cannot make, or a batch it cannot split; one line."""


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
    """A ``(data, fsdp, tensor)`` mesh over ``devices`` (default: all of them).

    One size may be -1: all the devices the others leave. The sizes must multiply to the
    number of devices, all of them used. Raises :class:`MeshError` naming the sizes, the
    devices they use and those there are, and what to change.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise MeshError(
            f"at most one mesh axis may be -1, got data={data}, fsdp={fsdp}, tensor={tensor}"
        )
    n = len(devices)
    mesh = f"mesh data={data}, fsdp={fsdp}, tensor={tensor}"
    owner = "this process has" if jax.process_count() == 1 else "the run's processes have"
    if -1 in sizes:
        rest = [a for a, s in zip(AXES, sizes, strict=True) if s != -1]
        known = math.prod(s for s in sizes if s != -1)
        if n % known:
            raise MeshError(
                f"{mesh} cannot use the {_devices(n)} {owner}: {' x '.join(rest)} = "
                f"{known} must divide {n} ({AXES[sizes.index(-1)]}=-1 takes the rest), or "
                f"{_visible(f'a multiple of {known}', known)}"
            )
        sizes[sizes.index(-1)] = n // known
    used = math.prod(sizes)
    if used != n:
        others = sizes[1] * sizes[2]
        fit = (
            f"mesh.data={n // others}"
            if n % others == 0
            else f"mesh.data={n} mesh.fsdp=1 mesh.tensor=1"
        )
        raise MeshError(
            f"{mesh} uses {_devices(used)} but {owner} {n}: data x fsdp x tensor must "
            f"equal {n} (e.g. {fit}), or {_visible(str(used), used)}"
        )
    return Mesh(np.asarray(devices).reshape(sizes), AXES)


def _devices(n: int) -> str:
    return f"{n} device" + ("" if n == 1 else "s")


def _visible(how_many: str, count: int) -> str:
    """How to change the devices JAX sees (before it starts)."""
    return (
        f"make {how_many} devices visible (CUDA_VISIBLE_DEVICES; on CPU "
        f"XLA_FLAGS=--xla_force_host_platform_device_count={count})"
    )


def _names(path) -> list[str]:
    """The string keys of a pytree path (dict keys and attribute names), in order."""
    names = []
    for entry in path:
        name = getattr(entry, "key", getattr(entry, "name", None))
        if isinstance(name, str) and name not in ("value", "raw_value"):
            names.append(name)
    return names


def param_spec(path, shape, mesh: Mesh, *, head_dim: int) -> P:
    """The PartitionSpec of the parameter (or its optimizer moment) at pytree ``path``;
    ``head_dim`` (H) keeps the attention weights' head dims split in whole heads."""
    names = _names(path)
    key = tuple(names[-2:]) if len(names) >= 2 else ()
    axes = _RULES.get(key, ())
    if len(axes) != len(shape):
        return P()
    spec = []
    for i, (axis, dim) in enumerate(zip(axes, shape, strict=True)):
        unit = head_dim if _HEAD_DIMS.get(key) == i else 1
        spec.append(axis if axis is not None and dim % (unit * mesh.shape[axis]) == 0 else None)
    return P(*spec)


def shardings_of(tree, mesh: Mesh, *, head_dim: int):
    """A NamedSharding for every leaf of ``tree`` (parameters, or an optimizer state that
    mirrors them: Adam's moments have the parameters' paths under ``mu`` / ``nu``)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: NamedSharding(
            mesh, param_spec(path, np.shape(leaf), mesh, head_dim=head_dim)
        ),
        tree,
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Arrays ``[B, ...]`` split over data and fsdp along B."""
    return NamedSharding(mesh, P(BATCH))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def check_batch(batch_size: int, mesh: Mesh, what: str = "task.batch_size") -> None:
    """Raise :class:`MeshError` unless data x fsdp divides ``batch_size``."""
    split = math.prod(mesh.shape[axis] for axis in BATCH)
    if batch_size % split:
        raise MeshError(
            f"{what}={batch_size} cannot be split over data x fsdp = {split} devices; use a "
            f"multiple of {split}"
        )
