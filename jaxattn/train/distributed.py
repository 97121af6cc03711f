"""Many hosts: one training run over the devices of several processes (``jax.distributed``).

Every process runs the same ``train.py`` command; JAX's coordinator joins them, after which
``jax.devices()`` lists the devices of all of them and the mesh
(:mod:`jaxattn.train.sharding`) spans them: each process computes the shards of its own
devices, collectives cross processes (gloo on CPU, NCCL on GPU). Nothing here is a loop of
ours: it is ``jax.distributed.initialize`` and what the trainer does around it.

Process 0 owns the run directory: it writes the config, metrics, summary, checkpoints and
pictures. The others train in step with it and write nothing of the run; each checkpoint is
gathered whole onto every process first (a collective all must join), so a multi-host
run's checkpoints are those of a one-host run and load anywhere (a model must then fit one
host's memory).

The coordinator is named by ``mesh.coordinator`` (``host:port`` of process 0, reachable by
all) or the environment variable ``JAX_COORDINATOR_ADDRESS``; the number of processes and
this process's index by ``mesh.num_processes`` / ``mesh.process_id`` or ``JAX_NUM_PROCESSES``
/ ``JAX_PROCESS_ID``, and where none is given JAX detects them on the clusters it knows
(SLURM, Open MPI, Kubernetes, Cloud TPU).
"""

from __future__ import annotations

import hashlib
import os
import re
import socket

import jax
import numpy as np

from jaxattn.train.rundir import RunError

__all__ = [
    "PROCESS_KEYS",
    "agree",
    "check_same",
    "coordinator_named",
    "gather",
    "initialize",
    "is_host_port",
    "is_writer",
    "open_agreed",
]

# The config keys that make a run span several processes (each has a JAX_* variable too).
PROCESS_KEYS = ("mesh.coordinator", "mesh.num_processes", "mesh.process_id")


def is_host_port(v: str) -> bool:
    """``host:port``: a name or IPv4 address, or an IPv6 address in brackets, and a port."""
    host, _, port = v.rpartition(":")
    if not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
        return False
    if host.startswith("["):
        return bool(re.fullmatch(r"\[[0-9A-Fa-f:.]+\]", host))
    return bool(re.fullmatch(r"[A-Za-z0-9.-]+", host))


def _setting(value, variable: str, convert=str):
    if value is not None:
        return value
    raw = os.environ.get(variable)
    if raw is None or raw.strip() == "":
        return None
    try:
        return convert(raw.strip())
    except ValueError:
        raise RunError(f"environment variable {variable}={raw!r} is not an int") from None


def coordinator_named(mesh) -> bool:
    """Whether ``mesh`` (a ``MeshConfig``) or the environment names a coordinator: whether
    :func:`initialize` would join several processes."""
    return _setting(mesh.coordinator, "JAX_COORDINATOR_ADDRESS") is not None


def _check_port_free(coordinator: str) -> None:
    """On process 0: the coordinator's port must be free here, or JAX's gRPC server dies
    with a segmentation fault (seen with jax 0.10.2) instead of an error."""
    port = int(coordinator.rpartition(":")[2])
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # A port in TIME_WAIT from an earlier run may be bound again; a listening one not.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("", port))
        except OSError as err:
            raise RunError(
                f"coordinator port {port} is not free on this host ({err.strerror}): another "
                "run holds it, or it is reserved; pick another mesh.coordinator port"
            ) from None


def initialize(mesh) -> bool:
    """Join the processes named by ``mesh`` (a ``MeshConfig``) or the environment; a no-op
    when no coordinator is named, or when this process has joined already. Returns whether
    the run spans several processes.

    Raises RunError (one line) when JAX cannot join them (JAX already started on its own
    devices, a coordinator that does not answer within 5 minutes, settings JAX refuses), or
    when a process count or index is given without a coordinator.
    """
    coordinator = _setting(mesh.coordinator, "JAX_COORDINATOR_ADDRESS")
    num_processes = _setting(mesh.num_processes, "JAX_NUM_PROCESSES", int)
    process_id = _setting(mesh.process_id, "JAX_PROCESS_ID", int)
    if coordinator is None:
        if num_processes not in (None, 1) or process_id not in (None, 0):
            # Each process would train alone, all into the same run directory.
            raise RunError(
                f"num_processes={num_processes}, process_id={process_id} but no coordinator: "
                "set mesh.coordinator (or JAX_COORDINATOR_ADDRESS) to process 0's host:port"
            )
        return jax.process_count() > 1
    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    if not is_host_port(coordinator):  # the config key is checked where it is loaded
        raise RunError(
            f"JAX_COORDINATOR_ADDRESS={coordinator!r} is not host:port with a port in "
            "[1, 65535], e.g. 10.0.0.1:1234"
        )
    if process_id == 0:
        _check_port_free(coordinator)
    try:
        jax.distributed.initialize(
            coordinator_address=coordinator, num_processes=num_processes, process_id=process_id
        )
    except Exception as err:  # JAX raises RuntimeError, ValueError, TypeError, XlaRuntimeError
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RunError(
            f"cannot join the processes of coordinator {coordinator} (num_processes="
            f"{num_processes}, process_id={process_id}): {reason}"
        ) from None
    return jax.process_count() > 1


def agree(value: int) -> int:
    """The largest of every process's ``value`` (an int >= 0), on every process: how
    processes agree on a stop signal or a failure (a collective: all must call it at the
    same point). The value itself on one process."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    return int(np.max(multihost_utils.process_allgather(np.int32(value))))


def check_same(what: str, text: str) -> None:
    """Raise RunError on every process unless all passed the same ``text`` (their config,
    say): processes started with different settings would otherwise fail apart, one with an
    error and the others waiting at a collective. A collective; nothing on one process."""
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    digest = int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big") & 0x7FFFFFFF
    digests = np.asarray(multihost_utils.process_allgather(np.int32(digest))).ravel()
    others = [i for i, d in enumerate(digests) if d != digests[0]]
    if others:
        raise RunError(
            f"process {', '.join(map(str, others))} started with another {what} than process "
            "0: start every process with the same command (only mesh.process_id differs)"
        )


def is_writer() -> bool:
    """Whether this process writes the run directory: process 0 (the only one on one host)."""
    return jax.process_index() == 0


def gather(tree):
    """Every array of ``tree`` whole, as NumPy, on every process (a collective: every
    process must call it at the same point). The identity on one process."""
    if jax.process_count() == 1:
        return tree
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


def open_agreed(open_dir):
    """``open_dir()``, and on several processes every process learns whether all of them
    opened theirs: one that cannot (process 0's run directory refused, say) makes all
    raise, rather than leaving the others waiting at the first collective."""
    failure = None
    try:
        run = open_dir()
    except RunError as err:
        failure = err
    if agree(0 if failure is None else 1):
        if failure is not None:
            raise failure
        run.close()
        raise RunError(
            f"another process of the run could not open its directory (see its output); "
            f"process {jax.process_index()} stops too"
        )
    return run
