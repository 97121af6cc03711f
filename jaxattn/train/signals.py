"""Stopping a run cleanly: SIGINT and SIGTERM raise a flag, never an exception mid-save.

The session checks the flag at each chunk boundary, saves a checkpoint of the step reached
and raises :class:`TrainingInterrupted`, which says where the run stopped.
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

__all__ = ["StopSignals", "TrainingInterrupted"]


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped training at ``step``; ``saved``: its checkpoint is in
    ``run_dir`` (False: it came before the first step; a new run leaves no directory).

    ``finished``: the signal came during the last chunk or the final save, and the run is
    complete all the same (summary.json written, nothing to resume; only its pictures are
    not drawn). ``resume`` (set by a command line, :meth:`resumed_by`) is the command that
    continues the run; it ends the message of a run that can be continued."""

    def __init__(
        self,
        signum: int,
        step: int,
        run_dir: Path,
        saved: bool,
        resume: str = "",
        finished: bool = False,
    ):
        self.signum, self.step, self.run_dir, self.saved = signum, step, run_dir, saved
        self.resume, self.finished = resume, finished
        name = signal.Signals(signum).name
        if finished:
            message = (
                f"{name} came as the run finished: it is complete at step {step} in "
                f"{run_dir} (checkpoint and summary.json written), nothing to resume; "
                f"pictures not drawn: python -m jaxattn.commands.viz {run_dir} draws them"
            )
        elif saved:
            tail = f"; resume with: {resume}" if resume else ""
            message = f"stopped by {name} at step {step}; checkpoint of step {step} saved in "
            message += f"{run_dir}{tail}"
        else:
            message = f"stopped by {name} before the first step; nothing was kept in {run_dir}"
        super().__init__(message)

    def resumed_by(self, command: str) -> TrainingInterrupted:
        """The same stop, its message ending in ``resume with: <command>``."""
        return TrainingInterrupted(
            self.signum, self.step, self.run_dir, self.saved, command, self.finished
        )


class StopSignals:
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
