"""What a hostile probe of the commands' compilation cache found (jaxattn/commands/
_compile_cache.py), kept: leftovers that made every later write to our directory fail (an
entry without its ``-atime`` file after a kill or a full disk, a directory in an entry's
place or the lock's), two threads' failures said in two lines, JAX's own size warning shown
raw, and a ``JAX_COMPILATION_CACHE_DIR`` naming our directory left unbounded."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT, SHORT_RUN, TINY

from jaxattn.commands._compile_cache import _ENTRY_ERROR, _repair

KEY = "0123456789abcdef" * 4  # a key's hash


def _env(**cache) -> dict:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE", "XDG_CACHE"))
    }
    return {**env, "MPLBACKEND": "Agg", **cache}


def _leftovers(cache, outside):
    """What a kill mid-write, a full disk or a stray hand leave in our directory."""
    cache.mkdir(parents=True, mode=0o700)
    (cache / ".lockfile").mkdir()  # every get and put of JAX fails on it
    (cache / f"jit_half-{KEY}-cache").write_bytes(b"\x28\xb5" * 100)  # killed mid-write
    (cache / f"jit_dir-{KEY}-cache").mkdir()  # eviction stats it, reading fails
    (cache / f"jit_dir-{KEY}-atime").write_bytes(b"\0" * 8)
    (cache / f"jit_link-{KEY}-cache").symlink_to(outside)  # never what it points to
    (cache / f"jit_ok-{KEY}-cache").write_bytes(b"entry")
    (cache / f"jit_ok-{KEY}-atime").write_bytes(b"\0" * 8)


def test_repair_removes_what_fails_every_write_and_nothing_else(tmp_path):
    cache, outside = tmp_path / "jit", tmp_path / "outside"
    outside.write_text("keep")
    _leftovers(cache, outside)
    (cache / f"jit_atimedir-{KEY}-cache").write_bytes(b"entry")
    (cache / f"jit_atimedir-{KEY}-atime").mkdir()
    _repair(cache)
    assert sorted(p.name for p in cache.iterdir()) == [
        ".lockfile",
        f"jit_ok-{KEY}-atime",
        f"jit_ok-{KEY}-cache",
    ]
    assert outside.read_text() == "keep"
    warning = f"Cache value for key 'jit_x-{KEY}' of size 9 bytes exceeds the maximum cache size"
    assert _ENTRY_ERROR.search(warning) is not None


@pytest.mark.processes
def test_leftovers_in_our_directory_cost_one_line_once(tmp_path):
    cache, outside = tmp_path / "xdg" / "jaxattn" / "jit", tmp_path / "outside"
    outside.write_text("keep")
    _leftovers(cache, outside)
    run = tmp_path / "run"

    def train(*more):
        proc = subprocess.run(
            [sys.executable, str(ROOT / "train.py"), "--config", str(TINY), *SHORT_RUN, *more],
            cwd=tmp_path,
            env=_env(XDG_CACHE_HOME=str(tmp_path / "xdg")),
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stderr.splitlines(), json.loads((run / "summary.json").read_text())

    lines, first = train(f"train.run_dir={run}")
    assert len(lines) == 1, lines
    assert lines[0].startswith("train.py: a compilation cache entry could not be ")
    assert lines[0].endswith("; compiling instead") and KEY not in lines[0]
    assert outside.read_text() == "keep"

    # The leftovers are gone and this run's programs were written: not a word any more.
    lines, second = train(f"train.run_dir={run}", "--overwrite")
    assert lines == []
    assert second["eval_loss"] == first["eval_loss"]
    entries = {p.name for p in cache.iterdir()} - {".lockfile"}
    programs = {name[: -len("-cache")] for name in entries if name.endswith("-cache")}
    assert f"jit_ok-{KEY}" in programs and len(programs) == 5, entries  # 4 programs and ok
    assert entries == {f"{p}-{end}" for p in programs for end in ("cache", "atime")}
    assert all((cache / name).is_file() and not (cache / name).is_symlink() for name in entries)


_THREADS = """
import os, threading, warnings
import jax
from jaxattn.commands._compile_cache import MAX_BYTES, use_compile_cache
said = []
ours = use_compile_cache("prog", say=said.append)
print(jax.config.jax_compilation_cache_max_size == MAX_BYTES)
entry = os.path.join(ours, "jit_x-{key}-cache")
open(entry, "wb").close()
open(entry[: -len("cache")] + "atime", "wb").write(bytes(8))
start = threading.Barrier(8)
def fail():
    start.wait()
    warnings.warn("Error reading persistent compilation cache entry for 'jit_x': "
                  "OSError: " + entry)
threads = [threading.Thread(target=fail) for _ in range(8)]
for t in threads: t.start()
for t in threads: t.join()
print(len(said), "..." in said[0], os.path.exists(entry))
"""


@pytest.mark.processes
def test_our_directory_named_by_jax_is_bounded_and_threads_say_one_line(tmp_path):
    # JAX_COMPILATION_CACHE_DIR naming our own directory: evicted as ours (every entry has
    # its -atime), or the entries written without one would fail every later write there.
    env = _env(
        XDG_CACHE_HOME=str(tmp_path),
        JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jaxattn" / "jit"),
    )
    proc = subprocess.run(
        [sys.executable, "-c", _THREADS.replace("{key}", KEY)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["True", "1", "True", "False"], proc.stdout + proc.stderr
