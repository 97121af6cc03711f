"""The one ending every command and benchmark shares (jaxattn.commands._ending.run_command):
a result, or one line on stderr with the status a shell expects."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from jaxattn.commands._ending import run_command, run_errors
from jaxattn.train.config import ConfigError
from jaxattn.train.rundir import RunError
from jaxattn.train.signals import TrainingInterrupted


def ending(capsys, body, **kwargs):
    status = run_command("prog", body, **kwargs)
    out, err = capsys.readouterr()
    return status, out, err.splitlines()


def test_a_body_that_returns_ends_with_its_status(capsys):
    assert ending(capsys, lambda: None) == (0, "", [])
    assert ending(capsys, lambda: 3) == (3, "", [])


def raising(err):
    def body():
        raise err

    return body


def test_ctrl_c_is_one_line_and_130(capsys):
    assert ending(capsys, raising(KeyboardInterrupt())) == (130, "", ["prog: interrupted"])
    status, _, err = ending(capsys, raising(KeyboardInterrupt("the rows above stand")))
    assert (status, err) == (130, ["prog: the rows above stand"])


def test_a_stopped_run_names_its_step_and_how_to_resume(capsys):
    stop = TrainingInterrupted(signal.SIGTERM, 100, Path("runs/x"), True, resume="python t.py")
    status, _, err = ending(capsys, raising(stop))
    assert status == 143
    assert err == [
        "prog: stopped by SIGTERM at step 100; checkpoint of step 100 saved in runs/x; "
        "resume with: python t.py"
    ]


def test_known_errors_are_one_line_and_2_and_a_config_error_says_so(capsys):
    known = run_errors(ValueError)
    assert ending(capsys, raising(RunError("runs/x holds a run")), known=known) == (
        2,
        "",
        ["prog: runs/x holds a run"],
    )
    status, _, err = ending(capsys, raising(ConfigError("unknown key 'x'")), known=known)
    assert (status, err) == (2, ["prog: config error: unknown key 'x'"])
    assert ending(capsys, raising(ValueError("bad prompt")), known=known)[::2] == (
        2,
        ["prog: bad prompt"],
    )


def test_anything_else_is_a_bug_and_keeps_its_traceback(capsys):
    with pytest.raises(ZeroDivisionError):
        run_command("prog", raising(ZeroDivisionError("x")), known=run_errors(ValueError))
    with pytest.raises(ValueError):  # a command that does not claim ValueError
        run_command("prog", raising(ValueError("inside jax")), known=run_errors())
    assert capsys.readouterr().err == ""
