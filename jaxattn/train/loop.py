"""The training loop: a run directory of ours, checkpoints as we go, exact resume, signals.

``train(config)`` opens the run directory (``jaxattn.train.rundir``: created and marked, or
refused), restores the latest checkpoint when resuming, then runs jitted chunks of steps
(``jaxattn.train.steps``). After each chunk it evaluates and checkpoints on schedule. SIGINT
and SIGTERM only raise a flag: the current chunk finishes, a checkpoint is saved, and
:class:`TrainingInterrupted` says at which step. What the loop keeps between chunks (the
evaluation records, the train losses since the last evaluation, wall time) is saved with
every checkpoint, so a resumed run writes the same ``metrics.jsonl`` as one that was never
stopped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from tqdm import tqdm

from jaxattn.train import distributed, sharding, tasks
from jaxattn.train.checkpoints import Checkpoints, model_spec, spec_fingerprint
from jaxattn.train.config import (
    Config,
    ConfigError,
    checkpoint_every,
    chunk_size,
    dump_config,
    load_config,
    run_dir_for,
    to_dict,
)
from jaxattn.train.optim import make_optimizer
from jaxattn.train.rundir import PICTURES, RunDir, RunError, atomic_write_text, open_run_dir
from jaxattn.train.steps import (
    abstract_model,
    init_state,
    make_eval_fn,
    make_train_chunk,
    updates,
)

__all__ = ["TrainResult", "TrainingInterrupted", "train"]

# Keys a resumed run may change: they name the directory, draw the bar, or say which
# checkpoints to write and keep; none changes a step's numbers or metrics.jsonl.
_RESUMABLE_DIFFERENCES = (
    "train.run_dir",
    "train.progress",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.pictures",
    "mesh.data",  # the mesh may change: the same steps, sharded otherwise
    "mesh.fsdp",
    "mesh.tensor",
    "mesh.coordinator",  # which processes run it: the same steps on the devices they have
    "mesh.num_processes",
    "mesh.process_id",
)
_PER_STEP = ("loss", "accuracy", "lr", "nonfinite")  # per-step values kept until an evaluation


@dataclasses.dataclass(frozen=True)
class TrainResult:
    run_dir: Path
    steps: int  # training steps (micro-batches) taken, earlier sessions included
    metrics: dict  # the last evaluation
    reached_target: bool
    seconds: float  # wall time of the run: set-up, compilation, training, evaluation
    resumed_from: int | None = None  # the checkpoint step this session started from


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped training; a checkpoint of ``step`` is in ``run_dir``."""

    def __init__(self, signum: int, step: int, run_dir: Path, saved: bool):
        self.signum, self.step, self.run_dir, self.saved = signum, step, run_dir, saved
        name = signal.Signals(signum).name
        what = f"checkpoint of step {step} saved" if saved else "no checkpoint saved yet"
        super().__init__(f"stopped by {name} at step {step}; {what} in {run_dir}")


class _StopSignals:
    """SIGINT and SIGTERM set ``signum`` (the first one received); the loop stops at the
    next chunk boundary.

    The handlers never raise, so a save in progress is never cut in half. Handlers are
    installed only from the main thread (Python's rule) and restored on exit.
    """

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame):
        if self.signum is None:
            self.signum = signum
        else:  # impatient: say why nothing happens yet
            sys.stderr.write(
                "\nstopping after the current chunk and saving a checkpoint; kill -9 to stop now\n"
            )

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def _no_pending() -> dict:
    return {k: [] for k in _PER_STEP}


@dataclasses.dataclass
class _Progress:
    """What the loop carries between chunks; saved in every checkpoint's meta."""

    step: int = 0
    records: list = dataclasses.field(default_factory=list)  # metrics.jsonl, one per eval
    pending: dict = dataclasses.field(default_factory=_no_pending)  # since the last eval
    last_eval: dict = dataclasses.field(default_factory=dict)
    reached: bool = False
    seconds: float = 0.0  # wall time of the sessions before this one


def _finite_or_none(x: float):
    return x if math.isfinite(x) else None  # JSON has no NaN


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _config_difference(stored: dict, config: Config) -> str | None:
    """The first key (other than those a resume may change) where ``stored`` (a config as a
    nested dict) and ``config`` differ, as a phrase; None when they agree."""
    a, b = _flatten(stored), _flatten(to_dict(config))
    for key in sorted(set(a) | set(b)):
        if key not in _RESUMABLE_DIFFERENCES and a.get(key) != b.get(key):
            return f"{key} is {b.get(key)!r} here but {a.get(key)!r} in the run"
    return None


def _same_text(path: Path, text: str) -> bool:
    try:
        return path.read_text(encoding="utf-8") == text
    except (OSError, UnicodeDecodeError):
        return False


def _json_file(path: Path) -> bool:
    try:
        return isinstance(json.loads(path.read_text(encoding="utf-8")), dict)
    except (OSError, ValueError):
        return False


def _write(path: Path, text: str) -> None:
    try:
        atomic_write_text(path, text)
    except OSError as err:
        raise RunError.writing(path, err) from None


def _state_bytes(config: Config, optimizer) -> int:
    """Bytes of the parameters and optimizer state (shapes only: nothing is computed)."""
    _, params = abstract_model(config)
    state = (params, jax.eval_shape(optimizer.init, params))
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))


def train(
    config: Config, *, resume: bool = False, overwrite: bool = False, log=print
) -> TrainResult:
    """Train ``config`` into its run directory (``train.run_dir``, default ``runs/<name>``).

    Args:
      resume: continue the run in that directory from its latest checkpoint (a new run is
        started when there is none). Its config must equal ``config`` except for
        ``train.run_dir``, ``train.progress``, ``train.checkpoint_every``,
        ``train.keep_checkpoints`` and ``train.pictures``.
      overwrite: replace the run in that directory (only the files a run writes are deleted).
      log: where the one-line result goes, and the line naming the pictures (or why they
        were not drawn: that never fails a run that is complete).

    Raises:
      RunError: the directory is not ours or cannot be written, a checkpoint cannot be
        read or saved, or the loss or gradients became non-finite
        (``train.on_nonfinite=stop``). One line naming the path, file, key or step.
      TrainingInterrupted: SIGINT or SIGTERM; the checkpoint of the step reached is saved.
    """
    start = time.perf_counter()
    if resume and distributed.coordinator_named(config.mesh):  # refused before joining
        raise RunError(
            "--resume of a run over several processes is not supported: resume it on "
            "one host, without mesh.coordinator, mesh.num_processes, mesh.process_id and "
            "JAX_COORDINATOR_ADDRESS (its checkpoints hold whole arrays, any mesh loads them)"
        )
    # Before JAX touches a device: after it, jax.devices() lists every process's devices.
    if distributed.initialize(config.mesh):
        mine = dataclasses.replace(config, mesh=dataclasses.replace(config.mesh, process_id=None))
        distributed.check_same(
            "config or flags", json.dumps([to_dict(mine), overwrite], sort_keys=True)
        )
        if not distributed.is_writer():  # process 0 writes the run; the others follow it
            return _follow(config, start, log)
    return _run(config, start, resume=resume, overwrite=overwrite, log=log)


def _run(
    config: Config, start: float, *, resume: bool, overwrite: bool, log, writer: bool = True
) -> TrainResult:
    """:func:`train` once the processes (if several) have joined: the run directory, the
    state on the mesh, the session. ``writer=False`` is a follower process (:func:`_follow`):
    the same steps and collectives, in the order process 0 takes them, without checkpoints."""
    optimizer = make_optimizer(
        config.optim, d_model=config.model.d_model, total_steps=updates(config)
    )
    # Room for the kept checkpoints, one being written, and a margin: checked before the
    # run directory is created (each save checks again against the checkpoints' real size).
    needed = (config.train.keep_checkpoints + 2) * (_state_bytes(config, optimizer) + 2**18)
    mesh = _mesh(config)  # before the run directory exists: a refusal leaves nothing
    with (
        _StopSignals() as stop,
        distributed.open_agreed(
            lambda: open_run_dir(
                run_dir_for(config),
                resume=resume,
                overwrite=overwrite,
                needed_bytes=needed if writer else 0,
            )
        ) as run,
    ):
        resuming = resume and run.existed
        if resuming:
            _check_resumable(run, config)
        elif resume:
            log(f"no run in {run.path} to resume; starting a new one")
        graphdef, params, opt_state = init_state(config, optimizer, mesh)
        with Checkpoints(run.checkpoints, keep=config.train.keep_checkpoints) as ckpts:
            session = _Session(config, run, ckpts, stop, start, writer=writer)
            if resuming and ckpts.latest_step() is not None:
                params, opt_state = session.restore(params, opt_state)
            if session.done:  # a resumed run that had finished: only what is missing
                log(f"{run.path} finished at step {session.progress.step} already")
                result = session.repair(log)
                missing = not all((run.path / name).is_file() for name in PICTURES)
            else:
                _write(run.path / "config.yaml", dump_config(config))
                _write(run.path / "metrics.jsonl", session.metrics_text())
                session.train(params, opt_state, graphdef, optimizer, mesh)
                result, missing = session.finish(log), True
    if config.train.pictures and missing:  # after the timed run, matplotlib imported only here
        _draw_pictures(result.run_dir, log)
    return result


def _follow(config: Config, start: float, log) -> TrainResult:
    """A process other than 0 of a multi-process run: :func:`_run` in a scratch directory
    it deletes, saving no checkpoint (it joins the gathering of each one) and drawing
    nothing."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="jaxattn-follower-") as scratch:
        train_config = dataclasses.replace(
            config.train, run_dir=str(Path(scratch) / "run"), progress=False, pictures=False
        )
        try:
            result = _run(
                dataclasses.replace(config, train=train_config),
                start,
                resume=False,
                overwrite=False,
                log=lambda _: None,
                writer=False,
            )
        except TrainingInterrupted as stopped:  # name the run, not the scratch directory
            raise TrainingInterrupted(
                stopped.signum, stopped.step, run_dir_for(config), stopped.saved
            ) from None
    log(f"process {jax.process_index()} of {jax.process_count()}: done; process 0 wrote the run")
    return dataclasses.replace(result, run_dir=run_dir_for(config))


def _draw_pictures(run_dir: Path, log) -> None:
    """The run's pictures (:func:`jaxattn.viz.draw_run`); a failure costs the pictures only,
    said in one line: the run itself is complete."""
    try:
        from jaxattn.viz import draw_run

        paths = draw_run(run_dir)
    except Exception as err:  # whatever it is, the run stands
        known = isinstance(err, (RunError, ImportError, ValueError))
        log(f"pictures not drawn: {err if known else repr(err)}")
        return
    except KeyboardInterrupt:  # the run is complete; only the pictures are missing
        log(f"pictures not drawn (interrupted); draw them with: python -m jaxattn.viz {run_dir}")
        return
    log(f"pictures: {', '.join(str(p) for p in paths)}")


def _mesh(config: Config):
    """The device mesh of ``config.mesh`` (:mod:`jaxattn.train.sharding`), or None on one
    device: nothing to shard. Raises RunError (one line) for a mesh these devices cannot
    make or a batch it cannot split."""
    m = config.mesh
    try:
        mesh = sharding.make_mesh(m.data, m.fsdp, m.tensor)
        if mesh.size == 1:
            return None
        sharding.check_batch(config.task.batch_size, mesh)
    except sharding.MeshError as err:
        raise RunError(str(err)) from None
    return mesh


def _check_resumable(run: RunDir, config: Config) -> None:
    """Refuse to resume with another config than the run's config.yaml (absent when a run
    was killed before writing it, and then it has no checkpoint either)."""
    path = run.path / "config.yaml"
    if not path.exists():
        return
    try:
        stored = load_config(path)
    except ConfigError as err:
        raise RunError.about(path, err) from None
    difference = _config_difference(to_dict(stored), config)
    if difference:
        raise RunError(
            f"cannot resume {run.path}: {difference}; resume with the run's config (see "
            "its config.yaml) or pass --overwrite to start again"
        )


class _Session:
    """One session of a run: restore, chunks, evaluations, checkpoints, until done or
    stopped."""

    def __init__(
        self,
        config: Config,
        run: RunDir,
        ckpts: Checkpoints,
        stop,
        start: float,
        *,
        writer: bool = True,
    ):
        self.config, self.run_dir, self.ckpts, self.stop = config, run.path, ckpts, stop
        self.writer = writer  # False: a follower process, which saves no checkpoint
        self.start = start  # this session's clock
        self.spec = model_spec(config)
        self.progress = _Progress()
        self.resumed_from: int | None = None
        self.saved_step: int | None = None
        self.steady_steps, self.steady_seconds = 0, 0.0

    @property
    def done(self) -> bool:
        """The target reached, or every step taken."""
        return self.progress.reached or self.progress.step >= self.config.train.steps

    def metrics_text(self) -> str:
        return "".join(json.dumps(r, allow_nan=False) + "\n" for r in self.progress.records)

    def restore(self, params, opt_state):
        """Continue from the latest checkpoint: its arrays and the loop's progress."""
        latest = self.ckpts.latest_step()
        config_path = self.run_dir / "config.yaml"
        pure, opt_state, meta = self.ckpts.restore(
            latest,
            nnx.to_pure_dict(params),
            opt_state,
            spec=self.spec,
            spec_source=config_path,
            needs=("config", "progress"),
        )
        nnx.replace_by_pure_dict(params, pure)
        difference = _config_difference(meta["config"], self.config)
        if difference:  # config.yaml was edited since the checkpoint was saved
            raise RunError(f"{config_path} differs from checkpoint {latest}: {difference}")
        try:
            self.progress = _Progress(**meta["progress"])
            for key in _PER_STEP:  # a checkpoint of a jaxattn that kept fewer
                self.progress.pending.setdefault(key, [])
        except TypeError:
            raise RunError(
                f"{self.ckpts.step_dir(latest) / 'meta'}: its 'progress' is not this "
                "jaxattn's (edited metadata)"
            ) from None
        self.resumed_from = self.saved_step = latest
        return params, opt_state

    def train(self, params, opt_state, graphdef, optimizer, mesh=None) -> None:
        tc, progress = self.config.train, self.progress
        chunk_fn = make_train_chunk(self.config, graphdef, optimizer, mesh)
        evaluate = make_eval_fn(self.config, graphdef)
        size, every = chunk_size(tc), checkpoint_every(tc)
        base_key = tasks.seed_key(tc.seed)
        bar = tqdm(
            total=tc.steps,
            initial=progress.step,
            unit="step",
            dynamic_ncols=True,
            file=sys.stderr,
            disable=not tc.progress,
        )
        compiled = False  # the session's first chunk includes compilation
        try:
            # Unbuffered: a failed write (a full disk) raises at once and leaves nothing
            # for close() to retry; a half line is replaced from the checkpoint on resume.
            metrics_file = open(self.run_dir / "metrics.jsonl", "ab", buffering=0)
        except OSError as err:
            raise RunError.writing(self.run_dir / "metrics.jsonl", err) from None
        with bar, metrics_file:
            while not self.done:
                # Several processes stop at the same boundary, whichever was signalled (a
                # small collective per chunk; nothing on one process).
                self.stop.signum = distributed.agree(self.stop.signum or 0) or None
                if self.stop.signum is not None:
                    break
                first = progress.step
                n = min(size, tc.steps - first)
                t0 = time.perf_counter()
                params, opt_state, m = chunk_fn(params, opt_state, base_key, first, n)
                m = jax.device_get(m)
                seconds = time.perf_counter() - t0
                if compiled:
                    self.steady_steps += n
                    self.steady_seconds += seconds
                compiled = True
                self.ckpts.poll()  # a background save that failed stops the run here
                self._check_finite(m, first)
                for k in _PER_STEP:
                    progress.pending[k].extend(m[k].tolist())
                progress.step = first + n
                postfix = {
                    "loss": f"{m['loss'][-1]:.3f}",
                    "acc": f"{m['accuracy'][-1]:.3f}",
                    "lr": f"{m['lr'][-1]:.2e}",
                    "steps/s": f"{n / seconds:.0f}",
                }
                best_metrics = None  # what ranks this step's checkpoint, when evaluated
                if progress.step % tc.eval_every == 0 or progress.step == tc.steps:
                    best_metrics = self._evaluate(evaluate(params), m, metrics_file)
                    postfix["exact"] = f"{progress.last_eval['exact_match']:.3f}"
                if self.done or (every and progress.step % every == 0):
                    self._save(params, opt_state, best_metrics)
                bar.set_postfix(postfix, refresh=False)
                bar.update(n)
        if self.stop.signum is not None and not self.done:
            if progress.step > 0 and self.saved_step != progress.step:
                self._save(params, opt_state, None)
            self.ckpts.wait()  # on disk before we say so
            raise TrainingInterrupted(
                self.stop.signum, progress.step, self.run_dir, saved=progress.step > 0
            )

    def _check_finite(self, m, first: int) -> None:
        """With ``on_nonfinite=stop``: raise at the first step whose loss or gradients were
        not finite. Its update and those after it in the chunk are never saved."""
        if self.config.train.on_nonfinite == "skip":
            return
        bad = np.flatnonzero(m["nonfinite"])
        if bad.size:
            kept = (
                f"the last good checkpoint is step {self.saved_step} in {self.ckpts.directory}"
                if self.saved_step is not None
                else "no checkpoint was saved before it"
            )
            raise RunError(
                f"train loss is {m['loss'][bad[0]]} (or a gradient is not finite) at step "
                f"{first + int(bad[0]) + 1}; stopped without saving it; {kept} (lower "
                "optim.learning_rate, or set train.on_nonfinite=skip)"
            )

    def _evaluate(self, evaluation, m, metrics_file) -> dict:
        """Record one held-out evaluation; returns the metrics that rank its checkpoint."""
        progress = self.progress
        evaluation = jax.device_get(evaluation)
        evaluation.pop("correct")
        progress.last_eval = {k: float(v) for k, v in evaluation.items()}
        skipped = np.asarray(progress.pending["nonfinite"], bool)

        def mean(key):  # over the steps since the last evaluation, whatever the chunking
            values = np.asarray(progress.pending[key], np.float64)[~skipped]
            return _finite_or_none(float(values.mean())) if values.size else None

        record = {
            "step": progress.step,
            "train_loss": mean("loss"),
            "train_accuracy": mean("accuracy"),
            "lr": float(m["lr"][-1]),
            **{k: _finite_or_none(v) for k, v in progress.last_eval.items()},
            # Every step since the previous record, for the curves (6 digits; null: skipped).
            "step_losses": [
                None if bad else _finite_or_none(float(f"{x:.6g}"))
                for x, bad in zip(progress.pending["loss"], skipped, strict=True)
            ],
            "step_lrs": [float(f"{x:.6g}") for x in progress.pending["lr"]],
        }
        if self.config.train.on_nonfinite == "skip":
            record["skipped_steps"] = int(skipped.sum())
        progress.records.append(record)
        progress.pending = _no_pending()
        progress.reached = progress.last_eval["exact_match"] >= self.config.train.target_exact_match
        try:
            metrics_file.write((json.dumps(record, allow_nan=False) + "\n").encode())
        except OSError as err:
            raise RunError.writing(self.run_dir / "metrics.jsonl", err) from None
        ranking = {k: progress.last_eval[k] for k in ("exact_match", "eval_loss")}
        return ranking if all(map(math.isfinite, ranking.values())) else None

    def _save(self, params, opt_state, best_metrics: dict | None) -> None:
        progress = self.progress
        meta = {
            "step": progress.step,
            "config": to_dict(self.config),
            "model_spec": self.spec,
            "fingerprint": spec_fingerprint(self.spec),
            "progress": {**dataclasses.asdict(progress), "seconds": self._seconds()},
        }
        # Several processes: each array whole on every process first (all must join).
        params, opt_state = distributed.gather((params, opt_state))
        if self.writer:
            self.ckpts.save(progress.step, nnx.to_pure_dict(params), opt_state, meta, best_metrics)
        self.saved_step = progress.step

    def _seconds(self) -> float:
        """Wall time of the run so far, earlier sessions included."""
        return self.progress.seconds + time.perf_counter() - self.start

    def repair(self, log) -> TrainResult:
        """A run that had finished before this session: its files are left as they are,
        except those a kill (or a user) removed or spoiled, rewritten from the last
        checkpoint (config.yaml, metrics.jsonl, summary.json)."""
        p = self.progress
        if not _same_text(self.run_dir / "metrics.jsonl", self.metrics_text()):
            _write(self.run_dir / "metrics.jsonl", self.metrics_text())
        if not (self.run_dir / "config.yaml").is_file():
            _write(self.run_dir / "config.yaml", dump_config(self.config))
        if not _json_file(self.run_dir / "summary.json"):
            self.start = time.perf_counter()  # the wall time is the one up to the checkpoint
            return self.finish(log)
        return TrainResult(
            self.run_dir, p.step, p.last_eval, p.reached, p.seconds, self.resumed_from
        )

    def finish(self, log) -> TrainResult:
        self.ckpts.wait()  # the last checkpoint on disk before the summary names it
        tc, p = self.config.train, self.progress
        seconds = self._seconds()
        summary = {
            "steps": p.step,
            "reached_target": p.reached,
            "seconds": seconds,  # whole run: set-up, compilation, training, evaluation
            "steps_per_second": (
                self.steady_steps / self.steady_seconds if self.steady_seconds else None
            ),
            "best_checkpoint": self.ckpts.best_step(),
            "resumed_from": self.resumed_from,
            **{k: _finite_or_none(v) for k, v in p.last_eval.items()},
        }
        _write(self.run_dir / "summary.json", json.dumps(summary, indent=2, allow_nan=False) + "\n")
        log(
            f"{'reached' if p.reached else 'did not reach'} exact-match target "
            f"{tc.target_exact_match:.3f}: {p.last_eval.get('exact_match', float('nan')):.4f} "
            f"on {self.config.task.eval_size} held-out sequences after {p.step} steps, "
            f"{seconds:.1f} s"
        )
        return TrainResult(self.run_dir, p.step, p.last_eval, p.reached, seconds, self.resumed_from)
