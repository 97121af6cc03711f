"""Turning what Orbax and TensorStore raise into one line naming a file and a reason.

Their errors are long (a TensorStore status with a spec, often hundreds of characters) and
the operating system's reason ("No space left on device") sits inside them. When one part
of a save or restore fails, the other parts go on in threads and in an event loop that is
already closed, and print their own tracebacks for a while (hundreds of lines):
:func:`quiet` keeps those off the terminal while the caller reports the failure once.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import json
import logging
import os
import re
import sys
import threading
import time
import warnings
from pathlib import Path

# Reasons worth naming when a wrapped message contains them.
_OS_REASONS = [
    os.strerror(code)
    for code in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO)
]
# Orbax's JSON files: a truncated one fails a restore with a message that names no file.
_JSON_FILES = ("_METADATA", "_CHECKPOINT_METADATA", "_sharding", "metadata", "metrics")


def _chain(err: BaseException):
    """``err``, then its causes and contexts (each once)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def first_line(err: BaseException, limit: int = 160) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def reason(err: BaseException) -> str:
    """The operating system's reason somewhere in ``err``'s chain, else its first line."""
    for e in _chain(err):
        if isinstance(e, OSError) and e.strerror:
            return e.strerror
        found = next((r for r in _OS_REASONS if r in str(e)), None)
        if found:
            return found
    return first_line(err)


def file_in(err: BaseException, root: Path) -> str | None:
    """The deepest path under ``root`` that the messages in ``err``'s chain mention (a
    TensorStore error names its database directory, then the file inside it)."""
    pattern = re.compile(re.escape(str(Path(root).absolute())) + r"[^\s'\",:\]\\]*")
    found = [m.rstrip("/.") for e in _chain(err) for m in pattern.findall(str(e))]
    return max(found, key=len) if found else None


def broken_json_file(directory: Path) -> Path | None:
    """The first of Orbax's JSON files under ``directory`` that does not parse."""
    for path in sorted(Path(directory).rglob("*")):
        if path.is_file() and path.name in _JSON_FILES:
            try:
                json.loads(path.read_bytes())
            except (ValueError, OSError):
                return path
    return None


def where(err: BaseException, directory: Path) -> str:
    """The most precise place to name for ``err`` raised reading ``directory``."""
    return str(file_in(err, directory) or broken_json_file(directory) or directory)


class _Drop(logging.Filter):
    def __init__(self, counter: list):
        super().__init__()
        self.counter = counter

    def filter(self, record) -> bool:
        self.counter[0] += 1
        return False


@contextlib.contextmanager
def quiet(settle: float = 0.5, limit: float = 5.0):
    """Around an Orbax call: log records of absl and asyncio, exceptions of other threads
    and unraisable exceptions ("Exception ignored in coroutine") are dropped. When the call
    fails, wait until none has come for ``settle`` seconds (at most ``limit``), so that the
    failed call's leftover work is silent too; then everything is restored."""
    dropped = [0]
    drop = _Drop(dropped)
    loggers = [logging.getLogger(name) for name in ("absl", "asyncio")]
    hooks = sys.unraisablehook, threading.excepthook

    def count(*_):
        dropped[0] += 1

    for logger in loggers:
        logger.addFilter(drop)
    sys.unraisablehook = threading.excepthook = count
    try:
        yield
    except BaseException:
        start = last_change = time.monotonic()
        seen = dropped[0]
        while time.monotonic() - last_change < settle and time.monotonic() - start < limit:
            time.sleep(0.05)
            with warnings.catch_warnings():  # "coroutine ... was never awaited"
                warnings.simplefilter("ignore", RuntimeWarning)
                gc.collect()  # futures whose exception nobody read complain when collected
            if dropped[0] != seen:
                seen, last_change = dropped[0], time.monotonic()
        _ignore_orbax_leftovers()  # what is finalised later still: only Orbax's own
        raise
    finally:
        for logger in loggers:
            logger.removeFilter(drop)
        sys.unraisablehook, threading.excepthook = hooks


def _from_orbax(text: str) -> bool:
    return "orbax" in text or "tensorstore" in text


class _DropOrbax(logging.Filter):
    def filter(self, record) -> bool:
        return not _from_orbax(record.getMessage())


_installed = False


def _ignore_orbax_leftovers() -> None:
    """From the first failure on, drop what a failed Orbax call's coroutines and futures
    print when they are finalised (at garbage collection or exit), and nothing else: other
    unraisable exceptions and log records go where they went before."""
    global _installed
    if _installed:
        return
    _installed = True
    logging.getLogger("asyncio").addFilter(_DropOrbax())
    previous = sys.unraisablehook

    def hook(unraisable):
        code = getattr(unraisable.object, "cr_code", None)
        if code is not None and _from_orbax(code.co_filename):
            return  # a coroutine of the failed call, finalised
        exc = unraisable.exc_value
        if unraisable.object is None and isinstance(exc, RuntimeError):
            if str(exc) == "Event loop is closed":  # a TensorStore callback into its loop
                return
        previous(unraisable)

    sys.unraisablehook = hook


def silence_for_exit() -> None:
    """For a command line that reports a RunError and exits: the failed call's leftover
    coroutines and futures are finalised at interpreter exit, after :func:`quiet` has
    restored the hooks, and would print their tracebacks under the one-line message."""
    drop = _Drop([0])
    for name in ("absl", "asyncio"):
        logging.getLogger(name).addFilter(drop)
    sys.unraisablehook = threading.excepthook = lambda *_: None
