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

__all__ = ["OneLineParser", "describe_error", "run_command", "run_errors", "step_argument"]


class OneLineParser(argparse.ArgumentParser):
    """Usage errors in one line, as every other error of the commands (``--help`` for more)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: {message} (see --help)\n")


def step_argument(text: str):
    """``--step``: best, latest or a step number (ASCII digits only: ``int`` would take
    "²" or "٣")."""
    return int(text) if re.fullmatch(r"[0-9]+", text) else text


def _silence_leftovers() -> None:
    """A failed Orbax call leaves coroutines that print tracebacks when finalised at exit,
    under the one line: silenced once the command has said what happened (only if Orbax
    was used at all)."""
    if "jaxattn.train._orbax_errors" in sys.modules:
        sys.modules["jaxattn.train._orbax_errors"].silence_for_exit()


Errors = tuple[type[Exception], ...]


def run_errors(*more: type[Exception]) -> Callable[[], Errors]:
    """``known`` for a command on runs: the trainer's :class:`~jaxattn.train.RunError` and
    :class:`~jaxattn.train.ConfigError`, and ``more``; imported only when needed."""

    def types() -> Errors:
        from jaxattn.train.config import ConfigError
        from jaxattn.train.rundir import RunError

        return (RunError, ConfigError, *more)

    return types


def describe_error(err: Exception) -> str:
    """A known error's line: a config error says so first."""
    from jaxattn.train.config import ConfigError

    return f"config error: {err}" if isinstance(err, ConfigError) else str(err)


def run_command(
    prog: str,
    body: Callable[[], int | None],
    known: Errors | Callable[[], Errors] = (),
    describe: Callable[[Exception], str] = describe_error,
) -> int:
    """``body()``'s exit status (None = 0), or one line ``<prog>: <what happened>`` on stderr:

    - 2 for an error of a ``known`` type, the command's own (a bad config, a run directory
      refused, a bad prompt), worded by ``describe``. ``known`` may be a function returning
      the types, called only when something is raised: a command imports the trainer (and
      its error types) inside ``body``, where Ctrl-C during the import is one line too;
    - 128 + the signal number for SIGINT or SIGTERM (``KeyboardInterrupt``; a stopped
      training run's names its step and how to resume).

    Anything else is a bug and propagates with its traceback."""
    try:
        status = body()
    except KeyboardInterrupt as stop:  # TrainingInterrupted too: it names its step and run
        print(f"{prog}: {str(stop) or 'interrupted'}", file=sys.stderr)
        _silence_leftovers()
        return 128 + getattr(stop, "signum", signal.SIGINT)
    except Exception as err:
        try:
            types = known() if callable(known) else known
        except ImportError:  # the package itself is broken: the original error says how
            raise err from None
        if not isinstance(err, types):
            raise
        print(f"{prog}: {describe(err)}", file=sys.stderr)
        _silence_leftovers()
        return 2
    return 0 if status is None else status
