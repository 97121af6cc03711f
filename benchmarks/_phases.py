"""Run a tree's ``train.py`` and write where its time went, as JSON, to ``$JAXATTN_PHASES``.

    JAXATTN_PHASES=out.json python benchmarks/_phases.py ROOT/train.py --config C [overrides]

Used by ``benchmarks/train_speed.py --against`` on this tree and on an older checkout alike:
it wraps only what both have (the session's ``train`` and ``_evaluate``, the checkpoints'
``__init__``, ``save``, ``wait`` and ``restore``, the loop's ``_draw_pictures``) and listens to
JAX's own compilation events. Seconds:

- ``import``: importing the command and the trainer (JAX, Flax, Optax, the package);
- ``trace``, ``lower``, ``compile``: JAX's tracing to jaxprs, lowering to StableHLO, and XLA
  compiling (or loading from the persistent cache: ``cache_hits`` counts those), wherever
  they happen; ``programs`` counts the compilations, ``cache_hits`` the loads;
- ``evaluation``: the held-out evaluations (waiting for their results);
- ``checkpoints``: opening the checkpoint manager (Orbax's import included), saving, waiting
  for the asynchronous writes, restoring;
- ``steps``: the session's training loop less the evaluations, checkpoints and compilation in
  it: the steps themselves, and the bar and metrics around them;
- ``pictures``: drawing attention.png and curves.png (matplotlib's import included);
- ``process``: from this script's start to its end; the caller adds the interpreter's start.
"""

from __future__ import annotations

import atexit
import json
import os
import runpy
import sys
import time
from pathlib import Path

_start = time.perf_counter()
script = Path(sys.argv[1]).resolve()
sys.path.insert(0, str(script.parent))  # the tree's own jaxattn, whatever is installed

totals = {
    k: 0.0
    for k in ("trace", "lower", "compile", "evaluation", "checkpoints", "session", "pictures")
}
counts = {"programs": 0, "cache_hits": 0}
inside_session = {"compile": 0.0, "evaluation": 0.0, "checkpoints": 0.0, "depth": 0}

from jax import monitoring  # noqa: E402

import jaxattn.commands.train  # noqa: E402, F401  (the command, imported before it runs)
import jaxattn.train.checkpoints as checkpoints  # noqa: E402
import jaxattn.train.loop as loop  # noqa: E402
import jaxattn.train.session as session  # noqa: E402

totals["import"] = time.perf_counter() - _start

_EVENTS = {
    "/jax/core/compile/jaxpr_trace_duration": "trace",
    "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
    "/jax/core/compile/backend_compile_duration": "compile",
}


def _on_duration(event, seconds, **kwargs):
    phase = _EVENTS.get(event)
    if phase is None:
        return
    totals[phase] += seconds
    counts["programs"] += phase == "compile"
    if inside_session["depth"]:
        inside_session["compile"] += seconds


def _on_event(event, **kwargs):
    if event == "/jax/compilation_cache/cache_hits":
        counts["cache_hits"] += 1


monitoring.register_event_duration_secs_listener(_on_duration)
monitoring.register_event_listener(_on_event)


def _timed(owner, name: str, phase: str, session_part: bool = False):
    real = getattr(owner, name)

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        if phase == "session":
            inside_session["depth"] += 1
        try:
            return real(*args, **kwargs)
        finally:
            seconds = time.perf_counter() - t0
            totals[phase] += seconds
            if phase == "session":
                inside_session["depth"] -= 1
            elif session_part and inside_session["depth"]:
                inside_session[phase] += seconds

    setattr(owner, name, timed)


_timed(session.Session, "train", "session")
_timed(session.Session, "_evaluate", "evaluation", session_part=True)
for method in ("__init__", "save", "wait", "restore"):
    _timed(checkpoints.Checkpoints, method, "checkpoints", session_part=True)
_timed(loop, "_draw_pictures", "pictures")


def _write():
    t = dict(totals)
    t["steps"] = t.pop("session") - sum(inside_session[k] for k in ("compile", "evaluation"))
    t["steps"] -= inside_session["checkpoints"]
    t["process"] = time.perf_counter() - _start
    with open(os.environ["JAXATTN_PHASES"], "w", encoding="utf-8") as f:
        json.dump({**t, **counts}, f)


atexit.register(_write)
sys.argv = sys.argv[1:]
runpy.run_path(str(script), run_name="__main__")
