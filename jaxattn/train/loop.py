"""The training loop: a run directory of ours, checkpoints as we go, exact resume, signals.

``train(config)`` builds what the run derives from its config once (:mod:`jaxattn.train.plan`),
opens the run directory (:mod:`jaxattn.train.rundir`: created and marked, or refused),
restores the latest checkpoint when resuming, and hands everything to a
:class:`~jaxattn.train.session.Session`, which runs the chunks, evaluations and checkpoints.
SIGINT and SIGTERM only raise a flag (:mod:`jaxattn.train.signals`): the current chunk
finishes, a checkpoint is saved, and :class:`TrainingInterrupted` says at which step. On
several processes (:mod:`jaxattn.train.distributed`) process 0 writes the run and the others
follow it.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import jax

from jaxattn.train import _preload, distributed, pictures
from jaxattn.train.checkpoints import Checkpoints
from jaxattn.train.config import (
    Config,
    ConfigError,
    load_config,
    run_dir_for,
    to_dict,
)
from jaxattn.train.plan import check_memory, make_plan, mesh_for
from jaxattn.train.rundir import RunDir, RunError, check_run_dir, open_run_dir
from jaxattn.train.session import Session, TrainResult, config_difference
from jaxattn.train.signals import StopSignals, TrainingInterrupted

__all__ = ["TrainResult", "TrainingInterrupted", "train"]


def train(
    config: Config, *, resume: bool = False, overwrite: bool = False, log=print
) -> TrainResult:
    """Train ``config`` into its run directory (``train.run_dir``, default ``runs/<name>``).

    Args:
      resume: continue the run in that directory from its latest checkpoint (a new run is
        started when there is none). Its config must equal ``config`` except for the keys
        of :data:`~jaxattn.train.session.RESUMABLE_DIFFERENCES` (where the run is written,
        its bar, checkpoints and pictures, and the mesh and processes).
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
            f"one host, without {', '.join(distributed.PROCESS_KEYS)} and "
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
    """:func:`train` once the processes (if several) have joined: the plan, the run
    directory, the state on the mesh, the session. ``writer=False`` is a follower process
    (:func:`_follow`): the same steps and collectives, in the order process 0 takes them,
    without checkpoints."""
    plan = make_plan(config, mesh_for(config))  # before the directory: a refusal leaves nothing
    if jax.process_count() == 1:  # the path's refusals first: they only read, the memory
        # check compiles (several processes learn a refusal together, in open_agreed)
        check_run_dir(run_dir_for(config), resume=resume, overwrite=overwrite)
    # The initialisation, the evaluation and the pictures' program compile in the background
    # while the chunk compiles (check_memory) and the first steps run; Orbax is imported then.
    plan.compile_ahead(pictures=writer and config.train.pictures)
    _preload.preload("orbax.checkpoint", "orbax.checkpoint.checkpoint_managers")
    check_memory(plan)
    # Room for the kept checkpoints, one being written, and a margin: checked before the
    # run directory is created (each save checks again against the checkpoints' real size).
    needed = (config.train.keep_checkpoints + 2) * (plan.state_bytes + 2**18)
    with (
        StopSignals() as stop,
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
            if not run.has_checkpoint():  # nothing to continue from: change nothing
                raise RunError(
                    f"cannot resume {run.path}: it has no checkpoint (nothing was changed); "
                    "--overwrite starts it again, deleting its checkpoints, metrics.jsonl, "
                    "summary.json and pictures"
                )
        elif resume:
            log(f"no run in {run.path} to resume; starting a new one")
        session = None
        try:
            params, opt_state = plan.init_state()
            with Checkpoints(run.checkpoints, keep=config.train.keep_checkpoints) as ckpts:
                session = Session(plan, run, ckpts, stop, start, writer=writer)
                if resuming:
                    params, opt_state = session.restore(params, opt_state)
                if session.done:  # a resumed run that had finished: only what is missing
                    log(f"{run.path} finished at step {session.progress.step} already")
                    result = session.repair(log)
                    missing = not all(p.is_file() for p in run.pictures)
                else:
                    session.start_files()
                    if config.train.pictures:  # matplotlib's import overlaps the steps
                        pictures.preload()
                    session.train(params, opt_state)
                    result, missing = session.finish(log), True
        except BaseException as err:
            # A new run that failed before its first checkpoint leaves nothing behind, so
            # the same command can simply be run again.
            discard = writer and not run.existed and (session is None or session.saved_step is None)
            if discard:
                run.discard()
            if _out_of_memory(err):
                gone = f"; {run.path} removed" if discard else ""
                raise RunError(
                    f"out of memory ({_first_line(err)}){gone}; make the model or batch smaller"
                ) from None
            raise
    if stop.signum is not None:  # during the last chunk or the final save: complete, said
        raise TrainingInterrupted(stop.signum, result.steps, result.run_dir, True, finished=True)
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
                stopped.signum,
                stopped.step,
                run_dir_for(config),
                stopped.saved,
                finished=stopped.finished,
            ) from None
    log(f"process {jax.process_index()} of {jax.process_count()}: done; process 0 wrote the run")
    return dataclasses.replace(result, run_dir=run_dir_for(config))


def _out_of_memory(err: BaseException) -> bool:
    """XLA's allocation failure (a ``RESOURCE_EXHAUSTED`` runtime error)."""
    return isinstance(err, jax.errors.JaxRuntimeError) and "RESOURCE_EXHAUSTED" in str(err)


def _first_line(err: BaseException) -> str:
    return next(iter(str(err).strip().splitlines()), type(err).__name__)[:200]


def _draw_pictures(run_dir: Path, log) -> None:
    """The run's pictures (:func:`jaxattn.train.pictures.draw_run`); a failure costs the
    pictures only, said in one line: the run itself is complete."""
    try:
        from jaxattn.train.pictures import draw_run

        paths = draw_run(run_dir)
    except Exception as err:  # whatever it is, the run stands
        known = isinstance(err, (RunError, ImportError, ValueError))
        log(f"pictures not drawn: {err if known else repr(err)}")
        return
    except KeyboardInterrupt:  # the run is complete; only the pictures are missing
        log(
            "pictures not drawn (interrupted); draw them with: "
            f"python -m jaxattn.commands.viz {run_dir}"
        )
        return
    log(f"pictures: {', '.join(str(p) for p in paths)}")


def _check_resumable(run: RunDir, config: Config) -> None:
    """Refuse to resume with another config than the run's config.yaml (absent when a run
    was killed before writing it, and then it has no checkpoint either)."""
    path = run.config
    if not path.exists():
        return
    try:
        stored = load_config(path)
    except ConfigError as err:
        raise RunError.about(path, err) from None
    difference = config_difference(to_dict(stored), config)
    if difference:
        raise RunError(
            f"cannot resume {run.path}: {difference}; resume with the run's config (see "
            f"its {path.name}) or pass --overwrite to start again"
        )
