"""The commands' persistent compilation cache: compile once per machine, not once per run.

JAX can keep every program it compiles in a directory and load it from there the next time
the same program (same code, shapes, devices, flags and versions) is compiled. The commands
(train.py, generate, viz, the walk-through) turn it on by default, so that running a command
again, or another command on the same run, compiles nothing. The library itself never does:
importing :mod:`jaxattn` sets no JAX state.

Where: ``JAX_COMPILATION_CACHE_DIR`` when it is set (JAX's own variable: the user's cache,
used as it is), else ``$XDG_CACHE_HOME/jaxattn/jit`` (``~/.cache/jaxattn/jit``), our own,
created private (mode 0700: whoever can write a compilation cache can run code in the
processes that read it) and bounded at :data:`MAX_BYTES`, least recently used entries
evicted (JAX's eviction). ``--no-compile-cache`` or ``JAX_ENABLE_COMPILATION_CACHE=false``
turn it off.

A cache never fails a command: a directory that cannot be created or written turns it off,
and an entry that cannot be read or written (a corrupt file, a full disk) is compiled as
usual; either is said in one line, once. In our own directory an unreadable entry is
removed, so that the program compiled instead takes its place, and so is anything that
would make every later write fail (JAX's eviction reads every entry's ``-atime`` file: an
entry left without one by a kill or a full disk, or a directory in an entry's place).
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import threading
import warnings
from pathlib import Path

__all__ = ["MAX_BYTES", "add_compile_cache_flag", "default_dir", "use_compile_cache"]

MAX_BYTES = 2**30  # our directory's bound; a default run's programs take about 2 MiB
_FLAG = "--no-compile-cache"


def add_compile_cache_flag(parser) -> None:
    """The commands' ``--no-compile-cache`` flag."""
    parser.add_argument(
        _FLAG,
        action="store_true",
        help="compile every program instead of loading it from the compilation cache "
        "(default: $JAX_COMPILATION_CACHE_DIR, else $XDG_CACHE_HOME/jaxattn/jit)",
    )


def default_dir() -> Path:
    """Our cache directory: ``$XDG_CACHE_HOME/jaxattn/jit``, else ``~/.cache/jaxattn/jit``
    (a relative ``XDG_CACHE_HOME`` is ignored, as the XDG specification says)."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(base):
        base = os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "jaxattn" / "jit"


def _say(line: str) -> None:
    if sys.stderr is not None:
        print(line, file=sys.stderr, flush=True)


def _usable(directory: Path) -> str | None:
    """None when ``directory`` can hold the cache (created, private, if missing), else why
    not."""
    if directory.exists() and not directory.is_dir():
        return "not a directory"
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as err:
        return err.strerror or type(err).__name__
    if not os.access(directory, os.W_OK | os.X_OK):
        return "permission denied"
    return None


def use_compile_cache(prog: str, enabled: bool = True, say=_say) -> Path | None:
    """Turn on JAX's persistent compilation cache for this process (a command's, before it
    compiles anything); returns its directory, or None when it stays off.

    Off when ``enabled`` is False (``--no-compile-cache``: JAX's cache is then disabled,
    even one named by ``JAX_COMPILATION_CACHE_DIR``), when ``JAX_ENABLE_COMPILATION_CACHE``
    is false, and, said in one line starting with ``prog``, when the directory cannot be
    created or written. Every program is cached, however fast it compiled (JAX's default
    threshold of 1 s would leave out all of a small model's), unless
    ``JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS`` says otherwise.
    """
    import jax

    if not enabled:
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    if not jax.config.jax_enable_compilation_cache:
        return None
    named = jax.config.jax_compilation_cache_dir
    directory = Path(named).expanduser() if named else default_dir()
    ours = not named or directory.absolute() == default_dir().absolute()  # evicted alike
    problem = _usable(directory)
    if problem is not None:
        say(f"{prog}: compilation cache off, {directory}: {problem} ({_FLAG} skips it)")
        jax.config.update("jax_enable_compilation_cache", False)  # JAX would try it all the same
        return None
    jax.config.update("jax_compilation_cache_dir", str(directory))
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    if ours and "JAX_COMPILATION_CACHE_MAX_SIZE" not in os.environ:
        jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    _report_cache_warnings(prog, directory if ours else None, say)
    return directory


_ENTRY_ERROR = re.compile(
    r"Error (reading|writing) persistent compilation cache entry for '(.+?)'"
    r"|Cache value for key .* exceeds the maximum cache size"  # JAX_COMPILATION_CACHE_MAX_SIZE
)
_installed: list = []  # the hook, once per process
_said = threading.Lock()  # compiling threads may fail at the same time: one line all the same


def _report_cache_warnings(prog: str, ours: Path | None, say) -> None:
    """JAX reports a cache entry it cannot read or write as a warning and compiles instead
    (``jax_raise_persistent_cache_errors`` is off by default): shown here as one line, the
    first time only. An unreadable entry of our own directory is removed before the
    program compiled instead is written (JAX never replaces an entry that exists)."""
    state = {"prog": prog, "ours": ours, "say": say, "said": False}
    if _installed:  # a second command in one process (a test): the same hook, its settings
        _installed[0].update(state)
        return
    _installed.append(state)
    show = warnings.showwarning

    def showwarning(message, category, filename, lineno, file=None, line=None):
        match = _ENTRY_ERROR.search(str(message))
        if match is None:
            return show(message, category, filename, lineno, file, line)
        reading, module = match.group(1) == "reading", match.group(2)
        if state["ours"] is not None:
            if reading:
                _remove_entries(state["ours"], module)
            _repair(state["ours"])
        with _said:
            first, state["said"] = not state["said"], True
        if first:
            detail = str(message).split(": ", 1)[-1].splitlines()[0]
            detail = re.sub(r"[0-9a-f]{64}", "...", detail)[:200]  # a key's hash: no help
            what = "read" if reading else "written"
            state["say"](
                f"{state['prog']}: a compilation cache entry could not be {what} "
                f"({detail}); compiling instead"
            )
        return None

    warnings.showwarning = showwarning
    # The "default" action shows a warning once per place in JAX's code: every failure here.
    warnings.filterwarnings("always", message="Error (reading|writing) persistent compilation")


def _remove_entries(directory: Path, module: str) -> None:
    """Remove ``module``'s entries (``<module>-<hash>-cache`` and its ``-atime``) from our
    directory: one of them could not be read, and which one JAX does not say."""
    pattern = re.compile(re.escape(module) + r"-[0-9a-f]{64}-(cache|atime)")
    try:
        names = [p for p in directory.iterdir() if pattern.fullmatch(p.name)]
    except OSError:
        return
    for path in names:
        _remove(path)


def _repair(directory: Path) -> None:
    """Remove from our directory what makes JAX's every write fail: an entry (``*-cache``,
    as JAX's eviction lists them) that is not a file or has no ``-atime`` file beside it,
    and a ``.lockfile`` that is a directory. Under JAX's lock, so that no entry being
    written by another process is taken for one left without its ``-atime``."""
    lockfile = directory / ".lockfile"
    if lockfile.is_dir() and not lockfile.is_symlink():
        _remove(lockfile)
    try:
        import filelock

        with filelock.FileLock(lockfile, timeout=5):
            for path in directory.glob("*-cache"):
                atime = path.with_name(path.name[: -len("cache")] + "atime")
                if not (_is_file(path) and _is_file(atime)):
                    _remove(path)
                    _remove(atime)
    except Exception:  # the lock held elsewhere, a file gone: next time
        pass


def _is_file(path: Path) -> bool:
    return path.is_file() and not path.is_symlink()


def _remove(path: Path) -> None:
    """Remove ``path`` (a directory with what it holds; a link, never what it points to)."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    except OSError:
        pass
