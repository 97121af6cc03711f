"""Orbax's noise is silenced for Orbax's own threads and records only (issue 9, point 5).

A background save keeps Orbax's threads quiet for as long as it runs, while the user's
program goes on: an exception of one of the program's threads, a finaliser that fails, a
record of its absl or asyncio logger in that window must reach the hooks and handlers the
program had; after ``wait()`` its hooks are in place again, whatever happened meanwhile.
The failure path's one quiet line is tested in test_checkpoints.py.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import sys
import threading
import types
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest
from orbax.checkpoint._src.path import async_path

from jaxattn.train.checkpoints import Checkpoints, spec_fingerprint
from jaxattn.train.rundir import RunError

META = {"model_spec": {}, "fingerprint": spec_fingerprint({})}
PARAMS = {"w": np.arange(3, dtype=np.float32), "b": np.array(1, np.float32)}
OPT_STATE = {"mu": np.zeros((2,), np.float32)}


@pytest.fixture
def heard(monkeypatch):
    """The program's own hooks, installed before any save: what reaches them."""
    heard = types.SimpleNamespace(threads=[], unraisables=[])
    monkeypatch.setattr(threading, "excepthook", heard.threads.append)
    monkeypatch.setattr(sys, "unraisablehook", heard.unraisables.append)
    heard.hooks = (threading.excepthook, sys.unraisablehook)
    return heard


def messages(hook_calls) -> list[str]:
    return [str(call.exc_value) for call in hook_calls]


def run_thread(target, *args) -> None:
    thread = threading.Thread(target=target, args=args)
    thread.start()
    thread.join()


def the_programs_work(message):
    raise ValueError(message)


class Finalised:
    def __del__(self):
        raise ValueError("the program's finaliser")


def log_filters() -> list:
    return [logging.getLogger(name).filters[:] for name in ("absl", "asyncio")]


def test_a_thread_of_the_program_raising_during_a_background_save_is_heard(heard, tmp_path):
    with Checkpoints(tmp_path / "checkpoints") as ckpts:
        ckpts.save(1, PARAMS, OPT_STATE, META, None)
        run_thread(the_programs_work, "the program's thread")
        # A thread running Orbax's code is Orbax's: still dropped (the window is open).
        run_thread(ocp.path.step.step_from_checkpoint_name, "not a step")
        ckpts.wait()
    assert messages(heard.threads) == ["the program's thread"]
    assert heard.threads[0].thread is not None


def test_an_unraisable_exception_of_the_program_during_a_save_is_heard(heard, tmp_path):
    with Checkpoints(tmp_path / "checkpoints") as ckpts:
        ckpts.save(1, PARAMS, OPT_STATE, META, None)
        Finalised()  # collected at once: "Exception ignored in: <function Finalised.__del__>"
        # Orbax's: one of its coroutines finalised, and TensorStore calling into the event
        # loop of a failed call, closed (no Python frame but asyncio's).
        coroutine = async_path.exists(tmp_path)
        coroutine.close()
        loop = asyncio.new_event_loop()
        loop.close()
        try:
            loop.call_soon_threadsafe(print)
        except RuntimeError as err:
            closed = err
        for obj, err, tb in [
            (coroutine, ValueError("Orbax's coroutine"), None),
            (None, closed, closed.__traceback__.tb_next),  # from asyncio's frames on
        ]:
            sys.unraisablehook(
                types.SimpleNamespace(
                    exc_type=type(err), exc_value=err, exc_traceback=tb, err_msg=None, object=obj
                )
            )
        ckpts.wait()
    assert messages(heard.unraisables) == ["the program's finaliser"]


def test_log_records_of_the_program_during_a_save_are_emitted(heard, tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    with Checkpoints(tmp_path / "checkpoints") as ckpts:
        # Orbax warns (absl) that this save has no metrics: its record is dropped.
        ckpts.save(1, PARAMS, OPT_STATE, META, None)
        logging.getLogger("absl").warning("the program's absl record")
        logging.getLogger("asyncio").error("the program's asyncio record")
        ckpts.wait()
    assert caplog.messages == ["the program's absl record", "the program's asyncio record"]


def test_after_wait_the_hooks_and_filters_are_the_programs(heard, tmp_path):
    filters = log_filters()
    with Checkpoints(tmp_path / "checkpoints") as ckpts:
        ckpts.save(1, PARAMS, OPT_STATE, META, None)
        assert (threading.excepthook, sys.unraisablehook) != heard.hooks  # the window
        ckpts.wait()
        assert (threading.excepthook, sys.unraisablehook) == heard.hooks
        assert log_filters() == filters


def test_a_hook_the_program_installs_during_a_save_stays(heard, tmp_path, monkeypatch):
    later = []
    with Checkpoints(tmp_path / "checkpoints") as ckpts:
        ckpts.save(1, PARAMS, OPT_STATE, META, None)
        monkeypatch.setattr(threading, "excepthook", later.append)
        ckpts.wait()
    assert threading.excepthook == later.append
    run_thread(the_programs_work, "after the save")
    assert messages(later) == ["after the save"]


@pytest.mark.parametrize("first", ["a", "b"])
def test_two_saves_ending_in_either_order_put_back_the_programs_hooks(heard, tmp_path, first):
    with Checkpoints(tmp_path / "a") as a, Checkpoints(tmp_path / "b") as b:
        a.save(1, PARAMS, OPT_STATE, META, None)
        b.save(1, PARAMS, OPT_STATE, META, None)
        run_thread(the_programs_work, "both pending")
        (a if first == "a" else b).wait()
        run_thread(the_programs_work, "one pending")
        (b if first == "a" else a).wait()
    assert (threading.excepthook, sys.unraisablehook) == heard.hooks
    assert messages(heard.threads) == ["both pending", "one pending"]


def test_a_failed_background_save_drops_orbax_records_only(heard, tmp_path, monkeypatch, caplog):
    """Orbax's threads log a failed save with its traceback (absl, one record per writer):
    dropped. The program's thread in the same window is heard, and its excepthook is its own
    again after the RunError."""
    real_save = ocp.handlers.JsonCheckpointHandler._save_fn

    async def full_disk(self, item, directory):  # step 2's JSON items (meta, metrics)
        if Path(str(directory)).parent.name.startswith("2.orbax-checkpoint-tmp"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return await real_save(self, item, directory)

    monkeypatch.setattr(ocp.handlers.JsonCheckpointHandler, "_save_fn", full_disk)
    caplog.set_level(logging.WARNING)
    with Checkpoints(tmp_path / "checkpoints") as ckpts:
        ckpts.save(1, PARAMS, OPT_STATE, META, None)
        ckpts.wait()
        ckpts.save(2, PARAMS, OPT_STATE, META, None)
        run_thread(the_programs_work, "the program's thread")
        with pytest.raises(RunError, match=r"step 2.*No space left on device"):
            ckpts.wait()
    assert messages(heard.threads) == ["the program's thread"]
    assert caplog.records == [] and heard.unraisables == []
    assert threading.excepthook == heard.hooks[0]
