"""What every command line shares: its parser's one-line usage errors, and one ending.

:func:`run_command` runs a command's body and turns what it raises into one line on stderr
and an exit status: 2 for an error the user can fix (a bad config, a run directory refused,
a checkpoint that cannot be read, a bad prompt, standard output closed), 1 when standard
output cannot be written (a full disk), 141 when its reader has gone (``| head``), 128 + the
signal for SIGINT or SIGTERM (130 / 143; a stopped training run says where it stopped and
how to resume). The benchmarks end through it too.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import errno
import os
import re
import signal
import sys
import threading
from collections.abc import Callable

__all__ = [
    "OneLineParser",
    "describe_error",
    "exit_with",
    "run_command",
    "run_errors",
    "step_argument",
]


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
    under the one line: silenced at exit, once the command has said what happened (only if
    Orbax was used at all). At exit, not now: a program (or a test) that calls ``main``
    keeps its own logging and hooks for as long as it runs."""
    if "jaxattn.train._orbax_errors" in sys.modules:
        atexit.register(sys.modules["jaxattn.train._orbax_errors"].silence_for_exit)


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


class _Watched:
    """Standard output while a command runs: what it writes goes through unchanged, and the
    first error writing it is kept, so that the ending tells a lost output from the
    command's other OSErrors (a checkpoint's full disk) and reports it once."""

    def __init__(self, stream):
        self.stream = stream
        self.failed: OSError | None = None

    def _watch(self, method, *args):
        try:
            return method(*args)
        except OSError as err:
            self.failed = self.failed or err
            raise

    def write(self, text):
        return self._watch(self.stream.write, text)

    def writelines(self, lines):
        return self._watch(self.stream.writelines, lines)

    def flush(self):
        return self._watch(self.stream.flush)

    def __getattr__(self, name):  # isatty, fileno, encoding, ...
        return getattr(self.stream, name)


def _say(line: str) -> None:
    """One line on stderr, if there is one (``print(file=None)`` would print to stdout)."""
    if sys.stderr is not None:
        print(line, file=sys.stderr, flush=True)


def _to_devnull(stream) -> None:
    """Point the file under ``stream`` at os.devnull: what is still buffered is dropped there
    at exit rather than failing again as an "Exception ignored" under the one line."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):  # a stream of Python's own (a test's)
        return
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, fd)
    finally:
        os.close(null)


def _stdout_lost(prog: str, err: OSError, stream) -> int:
    """The line and status of output that could not be written: 141 (128 + SIGPIPE, as a
    shell reports a writer killed by it) when the reader has gone, else 1."""
    _to_devnull(stream)
    _say(f"{prog}: cannot write to standard output: {err.strerror or err}")
    return 128 + signal.SIGPIPE if err.errno == errno.EPIPE else 1


def _settle_stdout(stream) -> None:
    """After the one line of another failure: what is still buffered for stdout is written
    now, or dropped if it cannot be (a second line would hide the first)."""
    try:
        stream.flush()
    except OSError:
        _to_devnull(stream)


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
    - 2, before ``body`` runs, when standard output is closed (``>&-``: Python makes
      ``sys.stdout`` None and every print a silent no-op): nothing it prints could be seen;
    - 1 when writing standard output fails (``>/dev/full``, an I/O error), at a print or at
      the final flush, done here so that nothing fails later at exit; 141 (128 + SIGPIPE)
      when the reader has closed the pipe (``| head -1``). Either way stdout is then pointed
      at os.devnull, so that the interpreter's own flush at exit says nothing more;
    - 128 + the signal number for SIGINT or SIGTERM (``KeyboardInterrupt``; a stopped
      training run's names its step and how to resume).

    Anything else is a bug and propagates with its traceback."""
    if sys.stdout is None:
        _say(f"{prog}: standard output is closed; nothing could be printed")
        return 2
    out = sys.stdout = _Watched(sys.stdout)
    terminate = _terminate_as_interrupt()
    try:
        status = _run(prog, body, known, describe, out)
    finally:
        sys.stdout = out.stream
        if terminate is not None:
            signal.signal(signal.SIGTERM, terminate)
    return status


class _Terminated(KeyboardInterrupt):
    """SIGTERM outside training (importing, compiling, loading, drawing): the command stops
    where it is and says so, as for Ctrl-C. Training catches it itself (a checkpoint)."""

    signum = signal.SIGTERM

    def __str__(self):
        return "stopped by SIGTERM"


def _raise_terminated(signum, frame):
    raise _Terminated


def _terminate_as_interrupt():
    """Make SIGTERM raise :class:`_Terminated` while the command runs (it killed the
    process without a word); returns the handler to put back, or None (not the main
    thread, or SIGTERM ignored on purpose)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    previous = signal.getsignal(signal.SIGTERM)
    if previous is signal.SIG_IGN:
        return None
    signal.signal(signal.SIGTERM, _raise_terminated)
    return previous or signal.SIG_DFL


def _run(prog, body, known, describe, out: _Watched) -> int:
    try:
        status = body()
        out.flush()
    except KeyboardInterrupt as stop:  # TrainingInterrupted too: it names its step and run
        _say(f"{prog}: {str(stop) or 'interrupted'}")
        _settle_stdout(out.stream)
        _silence_leftovers()
        return 128 + getattr(stop, "signum", signal.SIGINT)
    except Exception as err:
        if err is out.failed:
            return _stdout_lost(prog, err, out.stream)
        try:
            types = known() if callable(known) else known
        except ImportError:  # the package itself is broken: the original error says how
            raise err from None
        if not isinstance(err, types):
            raise
        _say(f"{prog}: {describe(err)}")
        _settle_stdout(out.stream)
        _silence_leftovers()
        return 2
    if out.failed is not None:  # caught by the body, but the output is lost all the same
        return _stdout_lost(prog, out.failed, out.stream)
    return 0 if status is None else status


def exit_with(status: int):
    """End a command's process with ``status``, without the interpreter's teardown.

    What a normal exit does that matters is done first: the threads that are not daemons
    are joined and the ``atexit`` functions run (after a signal, 130 / 143, neither: the
    user asked to stop now), then standard output and error are flushed and the process
    ends (``os._exit``). The teardown skipped, freeing every module and XLA's state, frees
    nothing the system does not take back, and took half a second after a command's last
    line (5% of a repeat training run); after a signal that landed while XLA was
    compiling, it crashed (a segmentation fault after the one line, exit -11 instead of
    143)."""
    signalled = status in (128 + signal.SIGINT, 128 + signal.SIGTERM)
    if not signalled:
        for thread in threading.enumerate():
            if thread is not threading.current_thread() and not thread.daemon:
                thread.join()
        atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(status)
