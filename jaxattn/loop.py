"""The training loop: a run directory of ours, checkpoints as we go, exact resume, signals.

``train(config)`` opens the run directory (``jaxattn.rundir``: created and marked, or
refused), restores the latest checkpoint when resuming, then runs jitted chunks of steps
(``jaxattn.training``). After each chunk it evaluates and checkpoints on schedule. SIGINT
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

from jaxattn import tasks
from jaxattn.checkpoints import Checkpoints, model_spec, spec_fingerprint
from jaxattn.config import Config, ConfigError, dump_config, load_config, run_dir_for, to_dict
from jaxattn.optim import make_optimizer
from jaxattn.rundir import (
    RunDir,
    RunError,
    atomic_write_text,
    describe_os_error,
    open_run_dir,
)
from jaxattn.training import (
    abstract_model,
    init_state,
    make_eval_fn,
    make_train_chunk,
    updates,
)

__all__ = ["TrainResult", "TrainingInterrupted", "train"]

# Keys a resumed run may change: where the directory is named from, and the progress bar.
_RESUMABLE_DIFFERENCES = ("train.run_dir", "train.progress")


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
    """SIGINT and SIGTERM set ``signum``; the loop stops at the next chunk boundary.

    The handlers never raise, so a save in progress is never cut in half. Handlers are
    installed only from the main thread (Python's rule) and restored on exit.
    """

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame):
        if self.signum is not None:
            msg = (
                "\nstopping after the current chunk and saving a checkpoint; kill -9 to stop now\n"
            )
            sys.stderr.write(msg)
        self.signum = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)


@dataclasses.dataclass
class _Progress:
    """What the loop carries between chunks; saved in every checkpoint's meta."""

    step: int = 0
    records: list = dataclasses.field(default_factory=list)  # metrics.jsonl, one per eval
    pending: dict = dataclasses.field(  # per-step values since the last evaluation
        default_factory=lambda: {"loss": [], "accuracy": [], "skipped": []}
    )
    last_eval: dict = dataclasses.field(default_factory=dict)
    reached: bool = False
    seconds: float = 0.0  # wall time of the sessions before this one

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def _finite_or_none(x: float):
    return x if math.isfinite(x) else None  # JSON has no NaN


def _chunk_size(tc) -> int:
    size = math.gcd(tc.steps_per_call, tc.eval_every)
    every = _checkpoint_every(tc)
    return math.gcd(size, every) if every else size


def _checkpoint_every(tc) -> int:
    """Steps between checkpoints; 0 = only at the end (and when stopped)."""
    return tc.eval_every if tc.checkpoint_every is None else tc.checkpoint_every


def _config_difference(stored: dict, config: Config) -> str | None:
    """The first key (other than those a resume may change) where ``stored`` (a config as a
    nested dict) and ``config`` differ, as a phrase; None when they agree."""
    a, b = _flatten(stored), _flatten(to_dict(config))
    for key in sorted(set(a) | set(b)):
        if key not in _RESUMABLE_DIFFERENCES and a.get(key) != b.get(key):
            return f"{key} is {b.get(key)!r} here but {a.get(key)!r} in the run"
    return None


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _stored_config(run: RunDir) -> Config:
    path = run.path / "config.yaml"
    try:
        return load_config(path)
    except ConfigError as err:
        raise RunError(f"{path}: {err}") from None


def train(
    config: Config, *, resume: bool = False, overwrite: bool = False, log=print
) -> TrainResult:
    """Train ``config`` into its run directory (``train.run_dir``, default ``runs/<name>``).

    Args:
      resume: continue the run in that directory from its latest checkpoint (a new run is
        started when there is none). Its config must equal ``config`` except for
        ``train.run_dir`` and ``train.progress``.
      overwrite: replace the run in that directory (only the files a run writes are deleted).
      log: where the one-line result goes.

    Raises:
      RunError: the directory is not ours or cannot be written, a checkpoint cannot be
        read or saved, or the loss became non-finite (``train.on_nonfinite=stop``). One
        line naming the path, file, key or step.
      TrainingInterrupted: SIGINT or SIGTERM; the checkpoint of the step reached is saved.
    """
    start = time.perf_counter()
    needed = (config.train.keep_checkpoints + 2) * (_state_bytes(config) + 2**18)
    with (
        _StopSignals() as stop,
        open_run_dir(
            run_dir_for(config), resume=resume, overwrite=overwrite, needed_bytes=needed
        ) as run,
    ):
        return _train_in(config, run, resume, stop, log, start)


def _state_bytes(config: Config) -> int:
    """Bytes of the parameters and optimizer state (shapes only: nothing is computed)."""
    optimizer = make_optimizer(
        config.optim, d_model=config.model.d_model, total_steps=updates(config)
    )
    _, params = abstract_model(config)
    state = (params, jax.eval_shape(optimizer.init, params))
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))


def _train_in(config: Config, run: RunDir, resume: bool, stop, log, start) -> TrainResult:
    tc = config.train
    resuming = resume and run.existed
    # A run killed before it wrote config.yaml has no checkpoint either: nothing to compare.
    if resuming and (run.path / "config.yaml").exists():
        difference = _config_difference(to_dict(_stored_config(run)), config)
        if difference:
            raise RunError(
                f"cannot resume {run.path}: {difference}; resume with the run's config "
                "(see its config.yaml) or pass --overwrite to start again"
            )
    optimizer = make_optimizer(
        config.optim, d_model=config.model.d_model, total_steps=updates(config)
    )
    graphdef, params, opt_state = init_state(config, optimizer)
    spec = model_spec(config)
    with Checkpoints(run.checkpoints, keep=tc.keep_checkpoints) as ckpts:
        progress, resumed_from = _Progress(), None
        latest = ckpts.latest_step() if resuming else None
        if latest is not None:
            pure, opt_state, meta = ckpts.restore(
                latest,
                nnx.to_pure_dict(params),
                opt_state,
                spec=spec,
                spec_source=run.path / "config.yaml",
            )
            nnx.replace_by_pure_dict(params, pure)
            difference = _config_difference(meta["config"], config)
            if difference:  # config.yaml was edited since the checkpoint was saved
                raise RunError(
                    f"{run.path / 'config.yaml'} differs from checkpoint {latest}: {difference}"
                )
            progress = _Progress(**meta["progress"])
            resumed_from = latest
        elif resume and not run.existed:
            log(f"no run in {run.path} to resume; starting a new one")
        _write(run.path / "config.yaml", dump_config(config))
        _write(
            run.path / "metrics.jsonl",
            "".join(json.dumps(r, allow_nan=False) + "\n" for r in progress.records),
        )
        loop = _Loop(config, run, ckpts, stop, spec, progress, optimizer, graphdef)
        if loop.done:
            log(f"{run.path} finished at step {progress.step} already; nothing to train")
        loop.run(params, opt_state, start)
        return loop.finish(start, resumed_from, log)


def _write(path: Path, text: str) -> None:
    try:
        atomic_write_text(path, text)
    except OSError as err:
        raise RunError(f"cannot write {path}: {describe_os_error(err)}") from None


class _Loop:
    """One session of training: chunks, evaluations, checkpoints, until done or stopped."""

    def __init__(self, config, run, ckpts, stop, spec, progress, optimizer, graphdef):
        self.config, self.run_dir, self.ckpts, self.stop = config, run.path, ckpts, stop
        self.spec, self.p = spec, progress
        self.chunk_fn = make_train_chunk(config, graphdef, optimizer)
        self.evaluate = make_eval_fn(config, graphdef)
        self.saved_step: int | None = ckpts.latest_step()
        self.steady_steps, self.steady_seconds = 0, 0.0

    # A finished run: the target reached, or every step taken.
    @property
    def done(self) -> bool:
        return self.p.reached or self.p.step >= self.config.train.steps

    def run(self, params, opt_state, start):
        tc, p = self.config.train, self.p
        size = _chunk_size(tc)
        every = _checkpoint_every(tc)
        base_key = tasks.seed_key(tc.seed)
        bar = tqdm(
            total=tc.steps,
            initial=p.step,
            unit="step",
            dynamic_ncols=True,
            file=sys.stderr,
            disable=not tc.progress or self.done,
        )
        self.session_start = start
        compiled = False
        try:
            metrics_file = open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8")
        except OSError as err:
            raise RunError(
                f"cannot write {self.run_dir / 'metrics.jsonl'}: {describe_os_error(err)}"
            ) from None
        try:
            while not self.done and self.stop.signum is None:
                first = p.step
                n = min(size, tc.steps - first)
                t0 = time.perf_counter()
                params, opt_state, m = self.chunk_fn(params, opt_state, base_key, first, n)
                m = jax.device_get(m)
                seconds = time.perf_counter() - t0
                self._check_finite(m, first)
                if compiled:  # the session's first chunk includes compilation
                    self.steady_steps += n
                    self.steady_seconds += seconds
                compiled = True
                for k in ("loss", "accuracy", "skipped"):
                    p.pending[k].extend(m[k].tolist())
                p.step = first + n
                postfix = {
                    "loss": f"{m['loss'][-1]:.3f}",
                    "acc": f"{m['accuracy'][-1]:.3f}",
                    "lr": f"{m['lr'][-1]:.2e}",
                    "steps/s": f"{n / seconds:.0f}",
                }
                evaluated = None
                if p.step % tc.eval_every == 0 or p.step == tc.steps:
                    evaluated = self._evaluate(params, m, metrics_file)
                    postfix["exact"] = f"{p.last_eval['exact_match']:.3f}"
                if self.done or (every and p.step % every == 0):
                    self._save(params, opt_state, evaluated)
                bar.set_postfix(postfix, refresh=False)
                bar.update(n)
        finally:
            bar.close()
            metrics_file.close()
        if self.stop.signum is not None and not self.done:
            saved = p.step > 0
            if saved and self.saved_step != p.step:
                self._save(params, opt_state, None)
            raise TrainingInterrupted(self.stop.signum, p.step, self.run_dir, saved)
        return params, opt_state

    def _check_finite(self, m, first: int) -> None:
        if self.config.train.on_nonfinite == "skip":
            return
        bad = np.flatnonzero(~np.isfinite(m["loss"]))
        if bad.size:
            step = first + int(bad[0]) + 1
            kept = (
                f"the last good checkpoint is step {self.saved_step} in {self.ckpts.directory}"
                if self.saved_step is not None
                else "no checkpoint was saved before it"
            )
            raise RunError(
                f"train loss is {m['loss'][bad[0]]} at step {step}; stopped without saving it; "
                f"{kept} (lower optim.learning_rate, or set train.on_nonfinite=skip)"
            )

    def _evaluate(self, params, m, metrics_file) -> dict:
        p = self.p
        evaluation = jax.device_get(self.evaluate(params))
        evaluation.pop("correct")
        p.last_eval = {k: float(v) for k, v in evaluation.items()}
        skipped = np.asarray(p.pending["skipped"], bool)
        kept = ~skipped

        def mean(key):
            values = np.asarray(p.pending[key], np.float64)[kept]
            return _finite_or_none(float(values.mean())) if values.size else None

        record = {
            "step": p.step,
            "train_loss": mean("loss"),
            "train_accuracy": mean("accuracy"),
            "lr": float(m["lr"][-1]),
            **{k: _finite_or_none(v) for k, v in p.last_eval.items()},
        }
        if self.config.train.on_nonfinite == "skip":
            record["skipped_steps"] = int(skipped.sum())
        p.records.append(record)
        p.pending = {"loss": [], "accuracy": [], "skipped": []}
        p.reached = p.last_eval["exact_match"] >= self.config.train.target_exact_match
        try:
            metrics_file.write(json.dumps(record, allow_nan=False) + "\n")
            metrics_file.flush()
        except OSError as err:
            raise RunError(
                f"cannot write {self.run_dir / 'metrics.jsonl'}: {describe_os_error(err)}"
            ) from None
        return {"exact_match": p.last_eval["exact_match"], "eval_loss": p.last_eval["eval_loss"]}

    def _save(self, params, opt_state, evaluated: dict | None) -> None:
        p = self.p
        elapsed = p.seconds + time.perf_counter() - self.session_start
        meta = {
            "step": p.step,
            "config": to_dict(self.config),
            "model_spec": self.spec,
            "fingerprint": spec_fingerprint(self.spec),
            "progress": {**p.to_json(), "seconds": elapsed},
        }
        metrics = evaluated if evaluated and all(map(math.isfinite, evaluated.values())) else None
        self.ckpts.save(p.step, nnx.to_pure_dict(params), opt_state, meta, metrics)
        self.saved_step = p.step

    def finish(self, start, resumed_from, log) -> TrainResult:
        tc, p = self.config.train, self.p
        seconds = p.seconds + time.perf_counter() - start
        summary = {
            "steps": p.step,
            "reached_target": p.reached,
            "seconds": seconds,  # whole run: set-up, compilation, training, evaluation
            "steps_per_second": (
                self.steady_steps / self.steady_seconds if self.steady_seconds else None
            ),
            "best_checkpoint": self.ckpts.best_step(),
            "resumed_from": resumed_from,
            **{k: _finite_or_none(v) for k, v in p.last_eval.items()},
        }
        text = json.dumps(summary, indent=2, allow_nan=False)
        _write(self.run_dir / "summary.json", text + "\n")
        log(
            f"{'reached' if p.reached else 'did not reach'} exact-match target "
            f"{tc.target_exact_match:.3f}: {p.last_eval.get('exact_match', float('nan')):.4f} "
            f"on {self.config.task.eval_size} held-out sequences after {p.step} steps, "
            f"{seconds:.1f} s"
        )
        return TrainResult(self.run_dir, p.step, p.last_eval, p.reached, seconds, resumed_from)
