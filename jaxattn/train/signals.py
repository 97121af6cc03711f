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
    """SIGINT or SIGTERM stopped training; a checkpoint of ``step`` is in ``run_dir``.

    ``resume`` (set by a command line) is the command that continues the run; it ends the
    message when given."""

    def __init__(self, signum: int, step: int, run_dir: Path, saved: bool, resume: str = ""):
        self.signum, self.step, self.run_dir, self.saved = signum, step, run_dir, saved
        self.resume = resume
        name = signal.Signals(signum).name
        what = f"checkpoint of step {step} saved" if saved else "no checkpoint saved yet"
        tail = f"; resume with: {resume}" if resume else ""
        super().__init__(f"stopped by {name} at step {step}; {what} in {run_dir}{tail}")


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
