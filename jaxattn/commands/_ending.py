"""What every command line shares: its parser's one-line usage errors, and one ending.

:func:`run_command` runs a command's body and turns what it raises into one line on stderr
and an exit status: 2 for an error the user can fix (a bad config, a run directory refused,
a checkpoint that cannot be read, a bad prompt), 128 + the signal for SIGINT or SIGTERM
(130 / 143; a stopped training run says where it stopped and how to resume). The benchmarks
end through it too.
"""

from __future__ import annotations

import argparse
import re
import signal
import sys
from collections.abc import Callable

__all__ = ["OneLineParser", "run_command", "step_argument"]


class OneLineParser(argparse.ArgumentParser):
    """Usage errors in one line, as every other error of the commands (``--help`` for more)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: {message} (see --help)\n")


def step_argument(text: str):
    """``--step``: best, latest or a step number (ASCII digits only: ``int`` would take
    "²" or "٣")."""
    return int(text) if re.fullmatch(r"[0-9]+", text) else text


def _known(err: BaseException) -> str | None:
    """The line to print for an error a user can act on, or None for a bug (a traceback)."""
    from jaxattn.train.config import ConfigError  # a command's errors are the trainer's
    from jaxattn.train.rundir import RunError

    if isinstance(err, ConfigError):
        return f"config error: {err}"
    if isinstance(err, (RunError, ValueError, ImportError)):
        return str(err)
    return None


def _silence_leftovers() -> None:
    """A failed Orbax call leaves coroutines that print tracebacks when finalised at exit,
    under the one line: silenced once the command has said what happened."""
    if "jaxattn.train._orbax_errors" in sys.modules:
        sys.modules["jaxattn.train._orbax_errors"].silence_for_exit()


def run_command(prog: str, body: Callable[[], int | None]) -> int:
    """``body()``'s exit status (None = 0), or one line ``<prog>: <what happened>`` on stderr
    and 2 for a known error, 128 + signal number for an interruption. Anything else is a
    bug and propagates with its traceback."""
    try:
        status = body()
    except KeyboardInterrupt as stop:  # TrainingInterrupted too: it names its step and run
        print(f"{prog}: {stop or 'interrupted'}", file=sys.stderr)
        _silence_leftovers()
        return 128 + getattr(stop, "signum", signal.SIGINT)
    except Exception as err:
        line = _known(err)
        if line is None:
            raise
        print(f"{prog}: {line}", file=sys.stderr)
        _silence_leftovers()
        return 2
    return 0 if status is None else status
