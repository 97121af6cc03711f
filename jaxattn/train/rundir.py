"""The run directory: created and marked by the trainer, refused when it is not ours.

A run directory belongs to its run. ``open_run_dir`` creates it (or takes an empty
directory), writes the mark file ``.jaxattn-run`` first, and holds an advisory lock on it for
as long as the run trains. A path that exists and is not a run of ours (a non-empty
directory without the mark, a regular file, a symlink) is refused with one line before
anything is written; an existing run is continued only with ``resume=True`` and replaced
only with ``overwrite=True``, which deletes the files a run writes and nothing else.
Nothing outside the run directory is ever deleted or renamed.

Every file the trainer writes whole (the mark, config.yaml, summary.json, metrics.jsonl when
rewritten) goes through :func:`atomic_write_text`: a temporary file in the same directory,
fsync, then ``os.replace``, so a reader sees the old file or the new one, never half.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
from pathlib import Path

try:  # advisory locks; absent on Windows, where two runs into one directory are not caught
    import fcntl
except ImportError:  # pragma: no cover - depends on the platform
    fcntl = None

__all__ = [
    "MARK",
    "OWNED",
    "PICTURES",
    "RunDir",
    "RunError",
    "atomic_write_text",
    "check_free_space",
    "check_run_dir",
    "check_writable",
    "describe_os_error",
    "is_run_dir",
    "open_run_dir",
]

MARK = ".jaxattn-run"  # the file that says "this directory is a jaxattn run"
CHECKPOINTS = "checkpoints"
CONFIG, METRICS, SUMMARY = "config.yaml", "metrics.jsonl", "summary.json"
PICTURES = ("attention.png", "curves.png")  # what jaxattn.train.pictures.draw_run writes
# What a run writes into its directory, and all that --overwrite deletes. Anything else a
# user put there (notes, pictures drawn elsewhere) stays.
OWNED = (CHECKPOINTS, CONFIG, METRICS, SUMMARY, *PICTURES)


class RunError(Exception):
    """A run directory or checkpoint problem; the message is one line naming the path, the
    file or the key, and what to do. The commands (:mod:`jaxattn.commands`) print it and
    exit with status 2."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))

    @classmethod
    def about(cls, path, err: Exception) -> RunError:
        """``err``'s message, prefixed with ``path`` unless it names it already."""
        return cls(str(err) if str(path) in str(err) else f"{path}: {err}")

    @classmethod
    def writing(cls, path, err: OSError) -> RunError:
        """``cannot write <path>: <the operating system's reason>``."""
        return cls(f"cannot write {path}: {describe_os_error(err)}")


def describe_os_error(err: OSError) -> str:
    """``'No space left on device'`` rather than ``"[Errno 28] No space left on device: '...'"``
    (the caller names the path)."""
    return err.strerror or str(err) or type(err).__name__


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` whole or not at all (temporary file, fsync, rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


class RunDir:
    """A run directory: its path and the names of the files a run keeps there, and, when
    opened by :func:`open_run_dir`, whether it held a run before and its lock.

    ``RunDir(path)`` names the files of a run without opening it (reading a trained run).
    Use an opened one as a context manager (or call :meth:`close`) to release the lock.
    """

    def __init__(self, path, existed: bool = False, lock_file=None, created=()):
        self.path = Path(path)
        self.existed = existed  # an earlier run of ours was there (resumed or replaced)
        self._lock_file = lock_file
        self._created = tuple(created)  # directories the opening made, deepest first

    @property
    def mark(self) -> Path:
        return self.path / MARK

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def config(self) -> Path:
        """The run's resolved config (what resuming and loading compare against)."""
        return self.path / CONFIG

    @property
    def metrics(self) -> Path:
        """One JSON record per held-out evaluation."""
        return self.path / METRICS

    @property
    def summary(self) -> Path:
        """Written when the run finishes: its steps, result and time."""
        return self.path / SUMMARY

    @property
    def pictures(self) -> tuple[Path, ...]:
        return tuple(self.path / name for name in PICTURES)

    def has_checkpoint(self) -> bool:
        """Whether ``checkpoints/`` holds a complete step (a directory named by its step:
        Orbax renames a step's temporary directory to that only once it is whole)."""
        try:
            return any(p.name.isdigit() and p.is_dir() for p in self.checkpoints.iterdir())
        except OSError:
            return False

    def discard(self) -> None:
        """Undo a new run that failed before its first checkpoint: delete what a run writes
        (``OWNED``) and the mark, release the lock, and remove the directories the opening
        created if they are empty (a file a user put there keeps them). Refused for a
        directory that held a run before."""
        if self.existed:
            raise ValueError(f"{self.path} held a run before: it is never discarded")
        with contextlib.suppress(OSError):
            _remove_owned(self.path)
        with contextlib.suppress(OSError):
            self.mark.unlink()
        self.close()
        for p in self._created:
            with contextlib.suppress(OSError):
                p.rmdir()

    def close(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()  # closing the descriptor releases the flock
            self._lock_file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def is_run_dir(path: Path) -> bool:
    """True when ``path`` is a directory marked as a jaxattn run (not through a symlink)."""
    path = Path(path)
    return path.is_dir() and not path.is_symlink() and (path / MARK).is_file()


def _refusal(path: Path) -> str | None:
    """Why ``path`` cannot become a run directory, or None if it can (absent, empty, ours)."""
    try:
        return _refusal_of(path)
    except OSError as err:  # a name too long, a loop of symlinks above it, ...
        return f"cannot use {path} as a run directory: {describe_os_error(err)}"


def _refusal_of(path: Path) -> str | None:
    inside = next((p for p in path.absolute().parents if is_run_dir(p)), None)
    if inside is not None:  # its checkpoints/, or a directory a user keeps inside a run
        return f"{path} is inside the run {inside}; choose a directory outside it"
    if path.is_symlink():
        return f"{path} is a symlink; give the real directory as train.run_dir"
    if not path.exists():
        return None
    if not path.is_dir():
        return f"{path} exists and is not a directory; choose another train.run_dir"
    if (path / MARK).is_file():
        wrong = [n for n in OWNED if _wrong_kind(path / n)]
        if wrong:  # a user's directory where a run keeps a file: never deleted, never trained
            return f"{path / wrong[0]} is not what a run writes there; move it out of the run"
        return None
    try:
        entries = sorted(p.name for p in path.iterdir())
    except OSError as err:
        return f"cannot read {path}: {describe_os_error(err)}"
    if entries:
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        return (
            f"{path} is a directory that is not a jaxattn run ({len(entries)} entries: "
            f"{shown}); refusing to write into it: choose a new or empty train.run_dir"
        )
    return None


def _wrong_kind(path: Path) -> bool:
    """A symlink, or a directory where a run writes a file (or the reverse)."""
    if path.is_symlink():
        return False  # unlinked by --overwrite, never followed
    if not path.exists():
        return False
    return path.is_dir() != (path.name == CHECKPOINTS)


def _create_mark(path: Path) -> None:
    """Create the mark with O_EXCL: of two processes starting a run in the same new
    directory, exactly one gets it (the other is refused). It is never rewritten, so the
    lock taken on it is on one file for the life of the run."""
    try:
        fd = os.open(path / MARK, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        raise RunError(
            f"{path} was made a run by another process just now; choose another "
            "train.run_dir, or --resume it once that process is done"
        ) from None
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump({"jaxattn_run": 1, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, f)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _lock(path: Path):
    """Open the mark file and take an exclusive, non-blocking lock on it."""
    f = open(path / MARK, "a+", encoding="utf-8")  # kept open: the lock lives with it
    if fcntl is not None:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            raise RunError(
                f"{path} is in use by another training process; wait for it to finish or "
                "choose another train.run_dir"
            ) from None
    return f


def _leftover(name: str) -> bool:
    """Whether ``name`` is work in progress of ours that a kill left behind: a temporary
    ``.<owned>.tmp-<pid>`` (``atomic_write_text``; viz's ``.<stem>.tmp-<pid>.png``), a
    ``.<owned>.deleting-<pid>`` (``--overwrite``) or a ``.write-test-<pid>`` probe. Only
    these exact shapes: a hidden file of the user's never matches by accident."""
    stems = "|".join(re.escape(n) for n in (*OWNED, *(n[:-4] for n in OWNED if n.endswith(".png"))))
    return bool(
        re.fullmatch(rf"\.(?:{stems})\.(?:tmp|deleting)-\d+(?:\.png)?|\.write-test-\d+", name)
    )


def _remove_leftovers(path: Path) -> None:
    for p in path.iterdir():
        if _leftover(p.name):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()


def check_run_dir(path, *, resume: bool = False, overwrite: bool = False) -> bool:
    """Refuse (RunError, one line) what :func:`open_run_dir` would refuse, reading only:
    a path that is not ours, an existing run without ``resume`` or ``overwrite``. Returns
    whether ``path`` holds a run. The trainer asks before its costlier checks (compiling
    the step for its memory estimate); ``open_run_dir`` asks again as it opens."""
    if resume and overwrite:
        raise RunError("resume and overwrite exclude each other; pass one of them")
    path = Path(path)
    reason = _refusal(path)
    if reason:
        raise RunError(reason)
    existed = is_run_dir(path)
    if existed and not (resume or overwrite):
        raise RunError(
            f"{path} holds a run already; pass --resume to continue it or --overwrite to "
            "replace it (Python: resume=True or overwrite=True)"
        )
    return existed


def open_run_dir(
    path, *, resume: bool = False, overwrite: bool = False, needed_bytes: int = 0
) -> RunDir:
    """Create, or take over, the run directory ``path`` and lock it.

    - absent or an empty directory: created and marked;
    - a run of ours: kept as it is with ``resume``, emptied of the files a run writes with
      ``overwrite`` (files a user added are kept), refused otherwise;
    - anything else: refused.

    Raises RunError (one line) on refusal, when the directory cannot be created or written
    or its disk has less than ``needed_bytes`` free, or when another process trains into
    it. A failure after the directory was created removes what this call created, so the
    same command can simply be run again.
    """
    path = Path(path)
    existed = check_run_dir(path, resume=resume, overwrite=overwrite)
    created = [p for p in (path, *path.parents) if not p.exists()]  # deepest first
    marked = False
    lock_file = None
    try:
        path.mkdir(parents=True, exist_ok=True)
        if not existed:
            _create_mark(path)
            marked = True
        lock_file = _lock(path)
        _remove_leftovers(path)
        check_writable(path)
        check_free_space(path, needed_bytes)
        if existed and overwrite:
            _remove_owned(path)
    except BaseException as err:
        if lock_file is not None:
            lock_file.close()
        if marked and lock_file is not None:  # undo this call: its mark (if it is ours) ...
            with contextlib.suppress(OSError):
                (path / MARK).unlink()
        for p in created:  # ... and the directories it made, if they are still empty
            with contextlib.suppress(OSError):
                p.rmdir()
        if isinstance(err, OSError):
            raise RunError(
                f"cannot write the run directory {path}: {describe_os_error(err)}"
            ) from None
        raise
    return RunDir(path, existed, lock_file, created)


def _remove_owned(path: Path) -> None:
    """Delete what a run writes into ``path`` (``OWNED``), never following a symlink. A
    directory is renamed to a hidden name first, so a kill in the middle of deleting it
    leaves a leftover that the next open removes, not a half-deleted checkpoint."""
    for name in OWNED:
        target = path / name
        if target.is_dir() and not target.is_symlink():
            doomed = path / f".{name}.deleting-{os.getpid()}"
            target.rename(doomed)
            shutil.rmtree(doomed)
        elif target.exists() or target.is_symlink():
            target.unlink()


def check_writable(path: Path) -> None:
    """Write, fsync and delete a small file in ``path``: a read-only mount, a full disk or
    missing permission shows up here, before training, not at the first checkpoint."""
    probe = path / f".write-test-{os.getpid()}"
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()


def check_free_space(path: Path, needed: int) -> None:
    """Refuse to start when the disk holding ``path`` has less than ``needed`` bytes free."""
    try:
        free = shutil.disk_usage(path).free
    except OSError:  # pragma: no cover - statvfs unsupported: the first save will tell
        return
    if free < needed:
        raise RunError(
            f"{path}: {free / 2**20:.1f} MiB free on its disk, but the checkpoints need about "
            f"{needed / 2**20:.1f} MiB; free some space or choose another train.run_dir"
        )
