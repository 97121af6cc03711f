"""The commands' persistent compilation cache (jaxattn/commands/_compile_cache.py): a second
run compiles nothing, each program compiles once in a run, a cache that cannot be used or
holds corrupt entries never fails a run, and the library itself sets no JAX state."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, SHORT_RUN, TINY

from jaxattn.commands._compile_cache import _usable, default_dir

# train.py with JAX's own compilation events counted, written as JSON to $COUNTS at exit:
# ``programs`` (every compilation, loads from the cache included) by name, and ``hits``.
_COUNTING = """
import atexit, collections, json, os, runpy, sys
from jax import monitoring
programs, hits = collections.Counter(), []
def on_duration(event, seconds, **kwargs):
    if event == "/jax/core/compile/backend_compile_duration":
        programs[kwargs["fun_name"]] += 1
def on_event(event, **kwargs):
    if event == "/jax/compilation_cache/cache_hits":
        hits.append(1)
monitoring.register_event_duration_secs_listener(on_duration)
monitoring.register_event_listener(on_event)
def write():
    with open(os.environ["COUNTS"], "w") as f:
        json.dump({"programs": programs, "hits": len(hits)}, f)
atexit.register(write)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""

# What a run compiles, once each: the train chunk (one program for every chunk length),
# the initialisation, the seed's key, the evaluation and the pictures' attention weights.
PROGRAMS = {"jit(chunk)", "jit(init)", "jit(seed_key)", "jit(evaluate)", "jit(weights)"}

# A last chunk shorter than the others (10, 10, 5 steps) and a resumed session's first:
# neither may compile the chunk again.
RUN = (*SHORT_RUN, "train.steps=25", "train.target_exact_match=1.0")


def _env(tmp_path, **cache) -> dict:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE", "XDG_CACHE"))
    }
    return {**env, "MPLBACKEND": "Agg", **cache}


def _train(tmp_path, env, *args):
    """train.py, counted: (process, counts)."""
    counts = tmp_path / "counts.json"
    proc = subprocess.run(
        [sys.executable, "-c", _COUNTING, str(ROOT / "train.py"), "--config", str(TINY), *args],
        cwd=tmp_path,
        env={**env, "COUNTS": str(counts)},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, json.loads(counts.read_text())


def _summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


@pytest.mark.processes
def test_each_program_compiles_once_and_a_second_run_compiles_nothing(tmp_path):
    cache = tmp_path / "cache"
    env = _env(tmp_path, JAX_COMPILATION_CACHE_DIR=str(cache))
    run = tmp_path / "run"
    first, counts = _train(tmp_path, env, *RUN, f"train.run_dir={run}", "train.pictures=true")
    assert first.stderr == ""
    assert counts["hits"] == 0
    assert counts["programs"] == dict.fromkeys(PROGRAMS, 1), counts  # nothing compiled twice
    assert (run / "attention.png").is_file()
    reference = _summary(run)
    assert reference["steps"] == 25

    # The same command again: every program comes from the cache, the same numbers out.
    second, counts = _train(
        tmp_path, env, *RUN, f"train.run_dir={run}", "train.pictures=true", "--overwrite"
    )
    assert second.stderr == ""
    assert counts["programs"] == dict.fromkeys(PROGRAMS, 1)
    assert counts["hits"] == len(PROGRAMS)  # loaded, not compiled
    for key in ("steps", "eval_loss", "exact_match", "eval_token_accuracy"):
        assert _summary(run)[key] == reference[key]

    # A resumed session whose first chunk is the short one (from step 20 to 25: the last
    # checkpoint removed, as if the run had been stopped there) compiles nothing either.
    shutil.rmtree(run / "checkpoints" / "25")
    (run / "summary.json").unlink()
    _, counts = _train(tmp_path, env, *RUN, f"train.run_dir={run}", "--resume")
    assert _summary(run)["resumed_from"] == 20
    assert counts["hits"] == sum(counts["programs"].values()), counts
    assert max(counts["programs"].values()) == 1


@pytest.mark.processes
def test_corrupt_entries_are_compiled_instead_said_once_and_replaced(tmp_path):
    # Our own directory ($XDG_CACHE_HOME/jaxattn/jit): unreadable entries are removed.
    env = _env(tmp_path, XDG_CACHE_HOME=str(tmp_path / "xdg"))
    run, args = tmp_path / "run", (*RUN, f"train.run_dir={tmp_path / 'run'}")
    _train(tmp_path, env, *args)
    reference = _summary(run)
    cache = tmp_path / "xdg" / "jaxattn" / "jit"
    assert oct(cache.stat().st_mode & 0o777) == "0o700"  # whoever writes it runs code here
    entries = sorted(cache.glob("*-cache"))
    assert len(entries) == len(PROGRAMS) - 1  # no pictures in this run
    for entry in entries:  # a disk that filled up while writing, or bit rot
        entry.write_bytes(entry.read_bytes()[:100])

    proc, counts = _train(tmp_path, env, *args, "--overwrite")
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("train.py: a compilation cache entry could not be read (")
    assert lines[0].endswith("); compiling instead")
    assert counts["hits"] == 0
    assert _summary(run)["eval_loss"] == reference["eval_loss"]

    # The programs compiled instead took the corrupt entries' places.
    proc, counts = _train(tmp_path, env, *args, "--overwrite")
    assert proc.stderr == ""
    assert counts["hits"] == sum(counts["programs"].values()) == len(PROGRAMS) - 1


@pytest.mark.processes
def test_a_cache_that_cannot_be_made_is_one_line_and_the_run_goes_on(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory\n")
    env = _env(tmp_path, JAX_COMPILATION_CACHE_DIR=str(blocker / "cache"))
    run = tmp_path / "run"
    proc, counts = _train(tmp_path, env, *RUN, f"train.run_dir={run}")
    assert proc.stderr.splitlines() == [
        f"train.py: compilation cache off, {blocker / 'cache'}: Not a directory "
        "(--no-compile-cache skips it)"
    ]
    assert _summary(run)["steps"] == 25
    assert counts["hits"] == 0
    assert blocker.read_text() == "not a directory\n"

    # --no-compile-cache: not a word, and nothing written to a cache that could be.
    cache = tmp_path / "unused"
    proc, counts = _train(
        tmp_path,
        _env(tmp_path, JAX_COMPILATION_CACHE_DIR=str(cache)),
        *RUN,
        f"train.run_dir={run}",
        "--overwrite",
        "--no-compile-cache",
    )
    assert proc.stderr == ""
    assert not cache.exists()


def test_importing_the_library_sets_no_jax_state():
    code = """
import os, warnings, jax
def state():
    return ({k: getattr(jax.config, k) for k in dir(jax.config) if k.startswith("jax_")},
            dict(os.environ), warnings.showwarning, list(warnings.filters))
before = state()
import jaxattn, jaxattn.nn, jaxattn.train, jaxattn.train.loop, jaxattn.commands
import jaxattn.commands.train, jaxattn.commands.generate, jaxattn.commands.viz
assert state() == before, "an import changed JAX's config, the environment or warnings"
print("unchanged")
"""
    env = {**os.environ}
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False
    )
    assert proc.stdout.strip() == "unchanged", proc.stderr[-2000:]


def test_our_directory_follows_xdg_and_ignores_a_relative_one(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_dir() == tmp_path / "jaxattn" / "jit"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")  # the XDG spec: ignored
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_dir() == tmp_path / "home" / ".cache" / "jaxattn" / "jit"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_dir() == tmp_path / "home" / ".cache" / "jaxattn" / "jit"


def test_a_directory_is_usable_only_when_it_can_be_written(tmp_path):
    made = tmp_path / "new" / "cache"
    assert _usable(made) is None and made.is_dir()
    assert oct(made.stat().st_mode & 0o777) == "0o700"
    a_file = tmp_path / "file"
    a_file.write_text("")
    assert _usable(a_file) == "not a directory"
    assert _usable(a_file / "below") == "Not a directory"
