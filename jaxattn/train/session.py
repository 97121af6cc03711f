"""One session of a run: from its first chunk (or its restored checkpoint) until it is done
or stopped.

:class:`Session` runs the plan's jitted chunks (:mod:`jaxattn.train.plan`), evaluates and
checkpoints on schedule, appends ``metrics.jsonl``, and keeps in :class:`Progress` what the
loop carries between chunks (the evaluation records, the per-step values since the last
evaluation, wall time). Progress is saved with every checkpoint, so a resumed run writes
the same ``metrics.jsonl`` as one that was never stopped. The run directory, the plan and
the processes are the loop's (:mod:`jaxattn.train.loop`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from tqdm import tqdm

from jaxattn.train import distributed, tasks
from jaxattn.train.checkpoints import Checkpoints, model_spec, spec_fingerprint
from jaxattn.train.config import Config, checkpoint_every, dump_config, to_dict
from jaxattn.train.plan import Plan
from jaxattn.train.rundir import RunDir, RunError, atomic_write_text
from jaxattn.train.signals import StopSignals, TrainingInterrupted

__all__ = ["RESUMABLE_DIFFERENCES", "Progress", "Session", "TrainResult", "config_difference"]

# Keys a resumed run may change: they name the directory, draw the bar, or say which
# checkpoints to write and keep; none changes a step's numbers or metrics.jsonl.
RESUMABLE_DIFFERENCES = (
    "train.run_dir",
    "train.progress",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.pictures",
    "mesh.data",  # the mesh may change: the same steps, sharded otherwise
    "mesh.fsdp",
    "mesh.tensor",
    *distributed.PROCESS_KEYS,  # which processes run it: the same steps on their devices
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


def _no_pending() -> dict:
    return {k: [] for k in _PER_STEP}


@dataclasses.dataclass
class Progress:
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


def config_difference(stored: dict, config: Config) -> str | None:
    """The first key (other than those a resume may change) where ``stored`` (a config as a
    nested dict) and ``config`` differ, as a phrase; None when they agree."""
    a, b = _flatten(stored), _flatten(to_dict(config))
    for key in sorted(set(a) | set(b)):
        if key not in RESUMABLE_DIFFERENCES and a.get(key) != b.get(key):
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


class Session:
    """One session of a run: restore, chunks, evaluations, checkpoints, until done or
    stopped."""

    def __init__(
        self,
        plan: Plan,
        run: RunDir,
        ckpts: Checkpoints,
        stop: StopSignals,
        start: float,
        *,
        writer: bool = True,
    ):
        self.plan, self.config, self.run = plan, plan.config, run
        self.ckpts, self.stop = ckpts, stop
        self.run_dir = run.path
        self.writer = writer  # False: a follower process, which saves no checkpoint
        self.start = start  # this session's clock
        self.spec = model_spec(self.config)
        self.meta = {  # what every checkpoint's meta says of the run
            "config": to_dict(self.config),
            "model_spec": self.spec,
            "fingerprint": spec_fingerprint(self.spec),
        }
        self.progress = Progress()
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
        config_path = self.run.config
        pure, opt_state, meta = self.ckpts.restore(
            latest,
            nnx.to_pure_dict(params),
            opt_state,
            spec=self.spec,
            spec_source=config_path,
            needs=("config", "progress"),
        )
        nnx.replace_by_pure_dict(params, pure)
        difference = config_difference(meta["config"], self.config)
        if difference:  # config.yaml was edited since the checkpoint was saved
            raise RunError(f"{config_path} differs from checkpoint {latest}: {difference}")
        try:
            self.progress = Progress(**meta["progress"])
            for key in _PER_STEP:  # a checkpoint of a jaxattn that kept fewer
                self.progress.pending.setdefault(key, [])
        except TypeError:
            raise RunError(
                f"{self.ckpts.step_dir(latest) / 'meta'}: its 'progress' is not this "
                "jaxattn's (edited metadata)"
            ) from None
        self.resumed_from = self.saved_step = latest
        return params, opt_state

    def start_files(self) -> None:
        """A session that trains: the run's config.yaml, and metrics.jsonl as of its
        progress (empty, or the records up to the restored checkpoint)."""
        _write(self.run.config, dump_config(self.config))
        _write(self.run.metrics, self.metrics_text())

    def train(self, params, opt_state) -> None:
        tc, progress = self.config.train, self.progress
        evaluator = self.plan.evaluator  # compiled in the background until first needed
        size, every = self.plan.chunk_steps, checkpoint_every(tc)
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
            metrics_file = open(self.run.metrics, "ab", buffering=0)
        except OSError as err:
            raise RunError.writing(self.run.metrics, err) from None
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
                params, opt_state, m = self.plan.chunk()(params, opt_state, base_key, first, n)
                m = {k: v[:n] for k, v in jax.device_get(m).items()}
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
                    best_metrics = self._evaluate(evaluator()(params), m, metrics_file)
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
            raise RunError.writing(self.run.metrics, err) from None
        ranking = {k: progress.last_eval[k] for k in ("exact_match", "eval_loss")}
        return ranking if all(map(math.isfinite, ranking.values())) else None

    def _save(self, params, opt_state, best_metrics: dict | None) -> None:
        progress = self.progress
        meta = {
            "step": progress.step,
            **self.meta,
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
        if not _same_text(self.run.metrics, self.metrics_text()):
            _write(self.run.metrics, self.metrics_text())
        if not self.run.config.is_file():
            _write(self.run.config, dump_config(self.config))
        if not _json_file(self.run.summary):
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
        _write(self.run.summary, json.dumps(summary, indent=2, allow_nan=False) + "\n")
        log(
            f"{'reached' if p.reached else 'did not reach'} exact-match target "
            f"{tc.target_exact_match:.3f}: {p.last_eval.get('exact_match', float('nan')):.4f} "
            f"on {self.config.task.eval_size} held-out sequences after {p.step} steps, "
            f"{seconds:.1f} s"
        )
        return TrainResult(self.run_dir, p.step, p.last_eval, p.reached, seconds, self.resumed_from)
