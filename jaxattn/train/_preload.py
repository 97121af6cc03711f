"""Import modules in a background thread, ahead of the code that needs them.

Importing is Python work, which holds the interpreter's lock; XLA compiling a program or
running the steps does not. A module a run needs later (Orbax for its checkpoints, matplotlib
for its pictures) imported while the main thread waits on XLA costs the run nothing. An
import that fails here fails nowhere: the code that needs the module imports it again and
says what is missing.
"""

from __future__ import annotations

import contextlib
import importlib
import threading

__all__ = ["preload"]


def preload(*modules: str) -> None:
    """Start importing ``modules`` (in order) in a daemon thread; returns at once."""

    def load():
        for module in modules:
            with contextlib.suppress(Exception):
                importlib.import_module(module)

    threading.Thread(target=load, name="jaxattn-preload", daemon=True).start()
