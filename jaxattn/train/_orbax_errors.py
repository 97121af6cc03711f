"""Turning what Orbax and TensorStore raise into one line naming a file and a reason (never
a Python object's repr, which TensorStore puts in its messages).

Their errors are long (a TensorStore status with a spec, often hundreds of characters) and
the operating system's reason ("No space left on device") sits inside them. When one part
of a save or restore fails, the other parts go on in threads and in an event loop that is
already closed, and print their own tracebacks for a while (hundreds of lines):
:func:`quiet` keeps those off the terminal while the caller reports the failure once,
and only those: it is in place for the whole of a background save, while the user's program
goes on, whose own threads, finalisers and log records must still be heard.
"""

from __future__ import annotations

import asyncio
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


# Python objects' reprs in an error's text, which tell a user nothing: TensorStore ends a
# failed read with "See full TensorStore details: <bound method ...spec of TensorStore({...})>"
# (a spec of a hundred lines), and a default repr reads "<module.Class object at 0x7f...>".
_BOUND_METHOD = re.compile(r"<bound method ")
_OBJECT = re.compile(r"<(?:[\w.]+\.)?(\w+) object at 0x[0-9a-fA-F]+>")
_LEADS_TO_IT = re.compile(r"(?:^|(?<=[.;]))[^.;]*:\s*$")  # "See full TensorStore details:"


def _has_repr(text: str) -> bool:
    return bool(_BOUND_METHOD.search(text) or _OBJECT.search(text))


def without_reprs(text: str) -> str:
    """``text`` without Python objects' reprs: a bound method's (of unbounded length) ends
    the text, with the words that lead to it; ``<pkg.Name object at 0x...>`` becomes Name."""
    cut = _BOUND_METHOD.search(text)
    if cut:
        text = _LEADS_TO_IT.sub("", text[: cut.start()].rstrip()).rstrip()
    return _OBJECT.sub(r"\1", text)


def first_line(err: BaseException, limit: int = 160) -> str:
    text = " ".join(without_reprs(str(err)).split()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def reason(err: BaseException) -> str:
    """The operating system's reason somewhere in ``err``'s chain, else the first line of
    the first error in it whose text holds no object's repr (TensorStore's outer error
    holds one; the error it wraps says what went wrong), without reprs in any case."""
    for e in _chain(err):
        if isinstance(e, OSError) and e.strerror:
            return e.strerror
        found = next((r for r in _OS_REASONS if r in str(e)), None)
        if found:
            return found
    return first_line(next((e for e in _chain(err) if not _has_repr(str(e))), err))


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


class _Origin:
    """What is Orbax's own: code in Orbax's and TensorStore's directories, and what they
    run (their threads, coroutines, event loops). What :func:`quiet` drops is decided here,
    so that the user's threads, finalisers and loggers are heard during a save."""

    def __init__(self):
        self.dirs = tuple(
            os.path.join(os.path.abspath(path), "")
            for name in ("orbax", "tensorstore")
            for path in getattr(sys.modules.get(name), "__path__", ())
        )
        self.asyncio = os.path.join(os.path.dirname(os.path.abspath(asyncio.__file__)), "")
        self.threading = os.path.abspath(threading.__file__)

    def code(self, filename: str) -> bool:
        return os.path.abspath(filename).startswith(self.dirs)

    def entered(self, tb) -> bool:
        """Whether the code that ``tb``'s exception came out of, past threading's and
        asyncio's machinery (a thread's target, a task's coroutine, a finaliser), is
        Orbax's: a user's thread that called Orbax and failed is the user's."""
        for filename in map(os.path.abspath, _filenames(tb)):
            if filename != self.threading and not filename.startswith(self.asyncio):
                return self.code(filename)
        return False

    def only_asyncio(self, tb) -> bool:
        filenames = list(map(os.path.abspath, _filenames(tb)))
        return bool(filenames) and all(f.startswith(self.asyncio) for f in filenames)

    def record(self, record: logging.LogRecord) -> bool:
        if self.code(record.pathname):  # absl names the line that logged: Orbax's own
            return True
        if record.name != "asyncio":
            return False
        # asyncio reports a task, future or callback of whoever ran it: Orbax's when it
        # names them (a coroutine's repr gives its file) or its exception came out of them.
        err = record.exc_info[1] if record.exc_info else None
        return _from_orbax(record.getMessage()) or (
            err is not None and self.entered(err.__traceback__)
        )

    def thread(self, args) -> bool:
        """An exception that ended one of Orbax's threads: one of its classes, or its
        target is Orbax's code."""
        module = type(args.thread).__module__ if args.thread is not None else ""
        return module.split(".")[0] in ("orbax", "tensorstore") or self.entered(args.exc_traceback)

    def unraisable(self, unraisable) -> bool:
        obj = unraisable.object
        for attr in ("cr_code", "gi_code", "ag_code", "__code__"):  # a coroutine, __del__
            code = getattr(obj, attr, None)
            if code is not None and self.code(code.co_filename):
                return True  # one of Orbax's, finalised
        if self.entered(unraisable.exc_traceback):
            return True
        # TensorStore completing a read into Orbax's event loop after the failed call closed
        # it: called from TensorStore's own (C++) thread, so no Python frame but asyncio's.
        exc = unraisable.exc_value
        return (
            obj is None
            and isinstance(exc, RuntimeError)
            and str(exc) == "Event loop is closed"
            and self.only_asyncio(unraisable.exc_traceback)
        )


def _filenames(tb):
    while tb is not None:
        yield tb.tb_frame.f_code.co_filename
        tb = tb.tb_next


def _from_orbax(text: str) -> bool:
    return "orbax" in text or "tensorstore" in text


class _OrbaxRecords(logging.Filter):
    """Drops the log records that are Orbax's (counted in ``counter``), keeps the others."""

    def __init__(self, origin: _Origin, counter: list):
        super().__init__()
        self.origin, self.counter = origin, counter

    def filter(self, record) -> bool:
        if _decide(self.origin.record, record):
            self.counter[0] += 1
            return False
        return True


class _Hook:
    """In place of ``sys.unraisablehook`` or ``threading.excepthook``: drops what ``is_orbax``
    says is Orbax's (counted in ``counter``) and hands everything else to the hook it
    replaced. Once removed it only hands on: a hook installed over it meanwhile may still
    call it."""

    def __init__(self, previous, is_orbax, counter: list):
        self.previous, self.is_orbax, self.counter = previous, is_orbax, counter
        self.active = True

    def __call__(self, args) -> None:
        if self.active and _decide(self.is_orbax, args):
            self.counter[0] += 1
            return
        self.previous(args)


def _decide(is_orbax, item) -> bool:
    try:
        return bool(is_orbax(item))
    except Exception:  # undecided (an object whose attributes raise): it is heard
        return False


def _remove(module, name: str, hook: _Hook) -> None:
    """Put back the hook that ``hook`` replaced, unless another one was installed since
    (the user's: it stays). Quiet blocks may end in any order (a save's ends at the next
    wait): hooks of blocks already ended are skipped."""
    hook.active = False
    if getattr(module, name) is hook:
        previous = hook.previous
        while isinstance(previous, _Hook) and not previous.active:
            previous = previous.previous
        setattr(module, name, previous)


@contextlib.contextmanager
def quiet(settle: float = 0.5, limit: float = 5.0):
    """Around an Orbax call: Orbax's and TensorStore's log records (absl, asyncio), the
    exceptions that end their threads and their unraisable exceptions ("Exception ignored
    in coroutine") are dropped; everyone else's go where they went before (the previous
    hooks, the loggers' handlers). When the call fails, wait until none has come for
    ``settle`` seconds (at most ``limit``), so that the failed call's leftover work is
    silent too. Then the hooks are put back, and the filters removed."""
    origin = _Origin()
    dropped = [0]
    drop = _OrbaxRecords(origin, dropped)
    loggers = [logging.getLogger(name) for name in ("absl", "asyncio")]
    hooks = [
        (module, name, _Hook(getattr(module, name), is_orbax, dropped))
        for module, name, is_orbax in (
            (sys, "unraisablehook", origin.unraisable),
            (threading, "excepthook", origin.thread),
        )
    ]
    for logger in loggers:
        logger.addFilter(drop)
    for module, name, hook in hooks:
        setattr(module, name, hook)
    failed = False
    try:
        yield
    except BaseException:
        failed = True
        start = last_change = time.monotonic()
        seen = dropped[0]
        while time.monotonic() - last_change < settle and time.monotonic() - start < limit:
            time.sleep(0.05)
            with warnings.catch_warnings():  # "coroutine ... was never awaited"
                warnings.simplefilter("ignore", RuntimeWarning)
                gc.collect()  # futures whose exception nobody read complain when collected
            if dropped[0] != seen:
                seen, last_change = dropped[0], time.monotonic()
        raise
    finally:
        for logger in loggers:
            logger.removeFilter(drop)
        for hook in reversed(hooks):
            _remove(*hook)
        if failed:
            _ignore_orbax_leftovers(origin)  # what is finalised later still


def _ignore_orbax_leftovers(origin: _Origin) -> None:
    """After a failure: drop what the failed Orbax call's coroutines and futures print when
    they are finalised (at garbage collection or exit), and nothing else: other unraisable
    exceptions and asyncio records go where they went before. Installed once, just above
    the first hook that is not ours (quiet blocks still open put back what was under
    theirs)."""
    logger = logging.getLogger("asyncio")
    if not any(isinstance(f, _LeftoverRecords) for f in logger.filters):
        logger.addFilter(_LeftoverRecords(origin, [0]))
    above, hook = None, sys.unraisablehook
    while isinstance(hook, _Hook):
        if isinstance(hook, _Leftovers):
            return
        above, hook = hook, hook.previous
    leftovers = _Leftovers(hook, origin.unraisable, [0])
    if above is None:
        sys.unraisablehook = leftovers
    else:
        above.previous = leftovers


class _Leftovers(_Hook):
    """The hook of :func:`_ignore_orbax_leftovers`, for the rest of the process."""


class _LeftoverRecords(_OrbaxRecords):
    """The asyncio filter of :func:`_ignore_orbax_leftovers`, for the rest of the process."""


def silence_for_exit() -> None:
    """For a command line that reports a RunError and exits: the failed call's leftover
    coroutines and futures are finalised at interpreter exit, after :func:`quiet` has
    restored the hooks, and would print their tracebacks under the one-line message."""
    drop = _Drop([0])
    for name in ("absl", "asyncio"):
        logging.getLogger(name).addFilter(drop)
    sys.unraisablehook = threading.excepthook = lambda *_: None
