"""Checkpoints of a run: Orbax's CheckpointManager, plus what it takes to trust a restore.

Layout: ``<run>/checkpoints/<step>/{params, opt_state, meta}``. Orbax writes each step into
a temporary directory and renames it into place when every item is written (its atomic
finalize), so a step directory is complete or absent; a kill during a save leaves only a
``*.orbax-checkpoint-tmp*`` directory, which the next writer deletes. The manager keeps the
last ``keep`` steps and the best one by held-out exact-match (ties: lower held-out loss).

``meta`` (JSON, saved atomically with the arrays) holds what Orbax does not check:

- ``model_spec`` and its ``fingerprint``: the config that defines the model's computation
  (``model.*`` and ``task.vocab_size``). A config.yaml edited after training is caught even
  when the shapes still fit (``num_heads``, ``positions``).
- ``arrays``: shape, dtype and SHA-256 of every parameter and optimizer-state leaf, checked
  after the restore; a flipped byte names the leaf.
- whatever the trainer adds (step, its config, the evaluation history, the train-loss values
  since the last evaluation) so that a resumed run continues bit for bit.

Every failure to read a checkpoint is a :class:`RunError` with one line naming the file or
the key, or saying that the checkpoint went away while it was read (another process deleted
it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import jax
import numpy as np

from jaxattn.train import _orbax_errors as errors
from jaxattn.train.rundir import RunError

__all__ = ["Checkpoints", "model_spec", "spec_fingerprint"]

FORMAT = 1  # bump when meta changes incompatibly
ITEMS = ("params", "opt_state", "meta")


def model_spec(config) -> dict:
    """The part of a run config that defines the model's function: ``model.*`` and
    ``task.vocab_size`` (and a classifier's ``task.num_classes``), as a flat ``{dotted key:
    value}`` dict. ``model.kind`` is left out for a decoder, the only kind before the key
    existed: the checkpoints of those runs keep their spec and load."""
    spec = {f"model.{k}": v for k, v in dataclasses.asdict(config.model).items()}
    if spec["model.kind"] == "decoder":
        del spec["model.kind"]
    spec["task.vocab_size"] = config.task.vocab_size
    if config.model.kind == "classifier":
        spec["task.num_classes"] = config.task.num_classes
    return spec


def spec_fingerprint(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def _quality(metrics) -> tuple[float, float]:
    """Best checkpoint: highest held-out exact-match, then lowest held-out loss."""
    return (float(metrics["exact_match"]), -float(metrics["eval_loss"]))


def array_digests(tree) -> dict[str, dict]:
    """``{leaf path: {shape, dtype, sha256}}`` of a pytree of arrays (host copies)."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(jax.device_get(tree))
    out = {}
    for path, leaf in leaves:
        a = np.asarray(leaf)  # not ascontiguousarray: it makes 0-d arrays 1-d
        out[jax.tree_util.keystr(path)] = {
            "shape": list(a.shape),
            "dtype": str(a.dtype),
            "sha256": hashlib.sha256(a.tobytes(order="C")).hexdigest(),
        }
    return out


def _shapes(tree) -> dict[str, dict]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {
        jax.tree_util.keystr(p): {"shape": list(x.shape), "dtype": str(np.dtype(x.dtype))}
        for p, x in leaves
    }


class Checkpoints:
    """The checkpoints directory of one run.

    Args:
      directory: ``<run>/checkpoints``.
      keep: how many of the latest steps to keep (the best by exact-match is kept too).
      read_only: open for reading (``load_run``, viz): nothing is created or deleted.
    """

    def __init__(self, directory, *, keep: int = 3, read_only: bool = False):
        import orbax.checkpoint as ocp  # imported here: only runs that save or load need it

        self._ocp = ocp
        self.directory = Path(directory).absolute()
        self._pending: int | None = None  # the step an asynchronous save is still writing
        self._silence = contextlib.ExitStack()  # Orbax's noise (only), while a save is pending
        if self.directory.exists() and not self.directory.is_dir():
            raise RunError(f"{self.directory} is not a directory of checkpoints")
        if read_only and not self.directory.is_dir():
            raise RunError(f"{self.directory} does not exist: the run has no checkpoint yet")
        if not read_only:
            self._remove_temporaries()  # what a save cut short by a kill left
        # Quiet: read_only logs warnings that say only that, and opening reads every
        # step's metrics, one of which may be corrupt (then one line below).
        try:
            with errors.quiet():
                self._manager = ocp.CheckpointManager(
                    self.directory, options=self._options(keep, read_only), item_names=ITEMS
                )
        except Exception as err:
            raise RunError(
                f"{errors.where(err, self.directory)}: cannot open the checkpoints "
                f"({errors.reason(err)})"
            ) from None

    def _options(self, keep: int, read_only: bool):
        from orbax.checkpoint import checkpoint_managers as policies

        return self._ocp.CheckpointManagerOptions(
            # Last `keep` steps, and the best by exact-match among those evaluated.
            preservation_policy=policies.AnyPreservationPolicy(
                [
                    policies.LatestN(n=keep),
                    policies.BestN(
                        get_metric_fn=_quality, n=1, keep_checkpoints_without_metrics=False
                    ),
                ]
            ),
            best_fn=_quality,  # makes Orbax store the metrics with each step (and best_step)
            # A save returns once the arrays are copied; Orbax writes and finalizes the step
            # in the background while training goes on (wait() joins it).
            enable_async_checkpointing=not read_only,
            cleanup_tmp_directories=False,  # done here, synchronously (_remove_temporaries)
            create=not read_only and jax.process_count() == 1,
            **self._one_process(read_only),
            read_only=read_only,
        )

    def _one_process(self, read_only: bool) -> dict:
        """Options of a multi-process run: one process writes and reads a run's
        checkpoints (process 0, the arrays gathered whole first), so no barrier waits for
        the others. Orbax then leaves creating the directory to us."""
        if jax.process_count() == 1:
            return {}
        if not read_only:
            try:
                self.directory.mkdir(exist_ok=True)
            except OSError as err:
                raise RunError.writing(self.directory, err) from None
        me = jax.process_index()
        return {
            "multiprocessing_options": self._ocp.options.MultiprocessingOptions(
                primary_host=me, active_processes={me}
            )
        }

    def close(self) -> None:
        """Wait for a pending save (RunError if it failed), then close the manager."""
        try:
            self.wait()
        finally:
            self._manager.close()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:  # already failing: let a pending save finish if it can, and report that error
            with contextlib.suppress(Exception):
                self.close()

    # ---------------------------------------------------------------------------- listing

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def best_step(self) -> int | None:
        """The step with the best held-out exact-match; the latest when none was evaluated."""
        return self._manager.best_step()

    def step_dir(self, step: int) -> Path:
        return self.directory / str(step)

    # ----------------------------------------------------------------------------- saving

    def save(self, step: int, params, opt_state, meta: dict, metrics: dict | None) -> None:
        """Start saving one step; ``meta`` gets the arrays' digests. The arrays are copied
        before it returns, so the caller may donate them; Orbax writes the step in the
        background and :meth:`wait` (or the next save, or closing) waits for it.

        On failure (a full disk, a vanished directory), now or in the background, the step's
        temporary directory is removed, the earlier steps stay, and a RunError names the
        step and the reason.
        """
        self.wait()
        ocp = self._ocp
        meta = {
            "format": FORMAT,
            **meta,
            "arrays": {
                "params": array_digests(params),
                "opt_state": array_digests(opt_state),
            },
        }
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            opt_state=ocp.args.StandardSave(opt_state),
            meta=ocp.args.JsonSave(meta),
        )
        self._check_room(step)
        self._silence.enter_context(errors.quiet())
        try:
            self._manager.save(step, args=args, metrics=metrics, force=True)
        except Exception as err:  # Orbax and TensorStore wrap OSErrors in their own types
            self._failed(step, err)
        self._pending = step

    def poll(self) -> None:
        """If the pending save has ended, settle it (:meth:`wait` without waiting): its
        failure is raised at the next chunk boundary, and Orbax's threads are heard again."""
        if self._pending is not None and not self._manager.is_saving_in_progress():
            self.wait()

    def wait(self) -> None:
        """Return once the pending save (if any) is complete on disk; RunError if it failed."""
        step, self._pending = self._pending, None
        try:
            if step is not None:
                self._manager.wait_until_finished()
        except Exception as err:
            self._failed(step, err)
        finally:  # also when interrupted: the process's hooks are not left replaced
            self._silence.close()

    def _failed(self, step: int, err: Exception):
        self._silence.__exit__(type(err), err, err.__traceback__)  # let the leftovers settle
        self._remove_temporaries(settle=True)
        raise RunError(
            f"cannot save the checkpoint of step {step} in {self.directory}: "
            f"{errors.reason(err)}; checkpoints kept: {self._kept()}"
        ) from err

    def _kept(self) -> str:
        with contextlib.suppress(Exception):  # a listing for a message, after a failure
            self._manager.reload()
        return ", ".join(map(str, self.steps())) or "none"

    def _check_room(self, step: int) -> None:
        """Refuse a save that cannot fit: twice the size of the latest checkpoint must be
        free. A full disk is then one clear line, before Orbax starts writing."""
        latest = self.latest_step()
        if latest is None:
            return  # the run directory's free space was checked before training
        size = sum(f.stat().st_size for f in self.step_dir(latest).rglob("*") if f.is_file())
        free = shutil.disk_usage(self.directory).free
        if free < 2 * size:
            raise RunError(
                f"cannot save the checkpoint of step {step} in {self.directory}: "
                f"{os.strerror(errno.ENOSPC)} ({free / 2**20:.1f} MiB free, a checkpoint "
                f"takes {size / 2**20:.1f} MiB); checkpoints kept: {self._kept()}"
            )

    def _remove_temporaries(self, settle: bool = False) -> None:
        """Delete Orbax's temporary step directories (``*.orbax-checkpoint-tmp*``): a save
        that was cut short. With ``settle``, after a failed save, keep deleting until the
        failed save's other writers, still running in Orbax's threads, have stopped."""
        deadline = time.monotonic() + (5.0 if settle else 0.0)
        quiet_since = None
        while True:
            leftovers = list(self.directory.glob("*.orbax-checkpoint-tmp*"))
            for p in leftovers:
                shutil.rmtree(p, ignore_errors=True)
            if not settle or time.monotonic() > deadline:
                return
            now = time.monotonic()
            quiet_since = (quiet_since or now) if not leftovers else None
            if quiet_since is not None and now - quiet_since > 0.5:
                return
            time.sleep(0.05)

    # ---------------------------------------------------------------------------- reading

    def read_meta(self, step: int, needs: tuple = ()) -> dict:
        """The ``meta`` item of ``step``, with every key a restore ``needs`` present (and
        the model spec and array digests that every restore checks)."""
        ocp = self._ocp
        where = self.step_dir(step) / "meta"
        with self._reading(step, where, "cannot read the checkpoint's metadata"):
            args = ocp.args.Composite(meta=ocp.args.JsonRestore())
            meta = self._manager.restore(step, args=args)["meta"]
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
            raise RunError(f"{where}: not a checkpoint of this jaxattn (format {found!r})")
        missing = [key for key in ("model_spec", "fingerprint", *needs) if key not in meta]
        arrays = meta.get("arrays")
        missing += [
            f"arrays.{item}"
            for item in ("params", "opt_state")
            if not (isinstance(arrays, dict) and isinstance(arrays.get(item), dict))
        ]
        if missing:
            raise RunError(f"{where}: no key {missing[0]!r} (incomplete or edited metadata)")
        return meta

    def restore(
        self, step: int, params_like, opt_state_like=None, *, spec: dict, spec_source, needs=()
    ):
        """``(params, opt_state or None, meta)`` of ``step``, verified.

        Args:
          params_like, opt_state_like: pytrees of ``jax.ShapeDtypeStruct`` (or arrays) giving
            the structure, shapes and dtypes to restore into; ``opt_state_like=None`` skips
            the optimizer state (loading a model only).
          spec: ``model_spec`` of the config the caller builds the model from.
          spec_source: what to name when that config differs (e.g. ``runs/x/config.yaml``).
          needs: keys of meta the caller reads (checked present, as the caller's own).

        Raises RunError naming the differing config key, the leaf whose shape or checksum
        differs, or the file that cannot be read.
        """
        meta = self.read_meta(step, needs)
        self._check_spec(step, meta, spec, spec_source)
        wanted = {"params": params_like}
        if opt_state_like is not None:
            wanted["opt_state"] = opt_state_like
        restored = {}
        for item, like in wanted.items():  # one at a time, to name the item that fails
            self._check_shapes(step, item, like, meta["arrays"][item])
            restored[item] = self._restore_item(step, item, like)
            for key, digest in array_digests(restored[item]).items():
                if digest["sha256"] != meta["arrays"][item][key]["sha256"]:
                    raise RunError(
                        f"{self.step_dir(step) / item}: {key} differs from what was saved "
                        "(checksum mismatch: the checkpoint's files are corrupt)"
                    )
        return restored["params"], restored.get("opt_state"), meta

    def _check_spec(self, step: int, meta: dict, spec: dict, spec_source) -> None:
        saved = meta["model_spec"]
        if spec_fingerprint(saved) != meta["fingerprint"]:
            raise RunError(
                f"{self.step_dir(step) / 'meta'}: its model fingerprint does not match its "
                "model keys (edited metadata)"
            )
        for key in sorted(set(spec) | set(saved)):
            if spec.get(key) != saved.get(key):
                raise RunError(
                    f"{spec_source}: {key} is {spec.get(key)!r}, but checkpoint {step} was "
                    f"trained with {key}={saved.get(key)!r}"
                )

    def _check_shapes(self, step: int, item: str, like, saved: dict) -> None:
        where = self.step_dir(step) / item
        needed = _shapes(like)
        for key, s in needed.items():
            got = saved.get(key)
            if got is None:
                raise RunError(f"{where}: has no {item} leaf {key}")
            if got["shape"] != s["shape"] or got["dtype"] != s["dtype"]:
                raise RunError(
                    f"{where}: {key} is {got['dtype']}{got['shape']} in the checkpoint but "
                    f"the model needs {s['dtype']}{s['shape']}"
                )
        extra = sorted(set(saved) - set(needed))
        if extra:
            raise RunError(f"{where}: unexpected {item} leaves {', '.join(extra)}")

    def _restore_item(self, step: int, item: str, like):
        ocp = self._ocp
        # Each array is read into the sharding of ``like`` (the run's mesh now, which may
        # differ from the mesh that saved it), or onto one device when ``like`` has none.
        one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])

        def target(x):
            sharding = getattr(x, "sharding", None) or one_device
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

        abstract = jax.tree.map(target, like)
        args = ocp.args.Composite(**{item: ocp.args.StandardRestore(abstract)})
        with self._reading(step, self.step_dir(step) / item, "cannot read the checkpoint"):
            return self._manager.restore(step, args=args)[item]

    @contextlib.contextmanager
    def _reading(self, step: int, where: Path, what: str):
        """Around one Orbax read of ``step``: a failure is one RunError, ``<where>: <what>
        (<reason>)``, or, when the step or files of it went away meanwhile (another process
        deleted it: a trainer keeping its last checkpoints), says so; that is worth trying
        again."""
        before = self._files(step)
        try:
            with errors.quiet():
                yield
        except Exception as err:
            step_dir = self.step_dir(step)
            again = "(deleted by another process?); run the command again"
            if not step_dir.is_dir():
                raise RunError(f"{step_dir} disappeared while it was being read {again}") from None
            gone = sorted(p.relative_to(step_dir) for p in before - self._files(step))
            if gone:
                more = f" and {len(gone) - 1} more files" if len(gone) > 1 else ""
                raise RunError(
                    f"{step_dir} became incomplete while it was being read: {gone[0]}{more} "
                    f"disappeared {again}"
                ) from None
            raise RunError(f"{errors.where(err, where)}: {what} ({errors.reason(err)})") from None

    def _files(self, step: int) -> set[Path]:
        """The files of ``step`` now (none if it is gone)."""
        walk = os.walk(self.step_dir(step))  # errors ignored: a directory may go meanwhile
        return {Path(folder, name) for folder, _, names in walk for name in names}
