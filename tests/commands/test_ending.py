"""The one ending every command and benchmark shares (jaxattn.commands._ending.run_command):
a result, or one line on stderr with the status a shell expects."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

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


# ------------------------------------------------------------------ standard output lost


class Unwritable:
    """A standard output whose writes (``at="write"``) or whose flush of what was written
    (``at="flush"``, as a block-buffered file on a full disk) fail with ``code``."""

    def __init__(self, code: int, at: str = "write"):
        self.code, self.at, self.held = code, at, ""

    def fail(self):
        raise OSError(self.code, os.strerror(self.code))

    def write(self, text: str) -> int:
        if self.at == "write":
            self.fail()
        self.held += text
        return len(text)

    def flush(self) -> None:
        if self.at == "flush" and self.held:
            self.fail()


def printing(*lines, then=None):
    def body():
        for line in lines:
            print(line)
        return then

    return body


@pytest.mark.parametrize(
    ("code", "status"),
    [(errno.ENOSPC, 1), (errno.EIO, 1), (errno.EBADF, 1), (errno.EPIPE, 141)],
    ids=["full disk", "I/O error", "bad descriptor", "reader gone"],
)
@pytest.mark.parametrize("at", ["write", "flush"])
def test_output_that_cannot_be_written_is_one_line(capsys, monkeypatch, code, status, at):
    # It was an OSError traceback, or at exit "Exception ignored ... OSError" and status 120.
    stdout = Unwritable(code, at)
    monkeypatch.setattr(sys, "stdout", stdout)
    assert ending(capsys, printing("3 4 5")) == (
        status,
        "",
        [f"prog: cannot write to standard output: {os.strerror(code)}"],
    )
    assert sys.stdout is stdout  # put back


def test_output_lost_is_reported_even_when_the_body_goes_on(capsys, monkeypatch):
    def body():
        try:
            print("3 4 5")
        except BrokenPipeError:  # `| head`: what the command said before
            pass

    monkeypatch.setattr(sys, "stdout", Unwritable(errno.EPIPE))
    assert ending(capsys, body)[::2] == (
        141,
        ["prog: cannot write to standard output: Broken pipe"],
    )


def test_a_closed_stdout_is_refused_before_the_body_runs(capsys, monkeypatch):
    # Python makes sys.stdout None when descriptor 1 is closed: every print did nothing and
    # the command ended 0 (train.py trained for nothing).
    monkeypatch.setattr(sys, "stdout", None)
    ran = []
    assert ending(capsys, lambda: ran.append(1)) == (
        2,
        "",
        ["prog: standard output is closed; nothing could be printed"],
    )
    assert ran == []


def test_the_bodys_own_oserrors_keep_their_way(capsys, monkeypatch):
    # A full disk under a checkpoint is not the output's: a known error, or a bug.
    def full_disk():
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "runs/x/metrics.jsonl")

    with pytest.raises(OSError, match=r"metrics\.jsonl"):
        run_command("prog", full_disk, known=run_errors())
    status, _, err = ending(capsys, full_disk, known=run_errors(OSError))
    assert (status, err) == (
        2,
        ["prog: [Errno 28] No space left on device: 'runs/x/metrics.jsonl'"],
    )


def test_another_failure_stays_one_line_when_stdout_is_lost_too(capsys, monkeypatch):
    """Output still buffered when the body fails is flushed, or dropped if it cannot be: the
    failure's line stays the only one."""
    monkeypatch.setattr(sys, "stdout", Unwritable(errno.ENOSPC, at="flush"))

    def body():
        print("row 1")
        raise KeyboardInterrupt("the rows above stand")

    assert ending(capsys, body) == (130, "", ["prog: the rows above stand"])
    status, _, err = ending(capsys, printing("row", then=None), known=run_errors())
    assert (status, err) == (1, ["prog: cannot write to standard output: No space left on device"])


def command_line(module: str, *args) -> list[str]:
    return [sys.executable, "-m", module, *map(str, args)]


def ran(proc: subprocess.Popen) -> tuple[int, list[str]]:
    _, err = proc.communicate(timeout=300)
    return proc.returncode, err.splitlines()


@pytest.mark.processes
def test_commands_refuse_a_closed_stdout_before_any_work(trained_tiny, tmp_path):
    run_dir, _ = trained_tiny
    closed = ["bash", "-c", 'exec "$@" >&-', "bash"]  # descriptor 1 closed, not /dev/null
    commands = {
        "jaxattn.commands.generate": command_line(
            "jaxattn.commands.generate", "--run", run_dir, "--prompt", PROMPT
        ),
        "jaxattn.commands.viz": command_line(
            "jaxattn.commands.viz", run_dir, "--out", tmp_path / "pictures"
        ),
        "train.py": [sys.executable, ROOT / "train.py", f"train.run_dir={tmp_path / 'run'}"],
    }
    procs = {
        prog: subprocess.Popen([*closed, *argv], cwd=ROOT, stderr=subprocess.PIPE, text=True)
        for prog, argv in commands.items()
    }
    for prog, proc in procs.items():
        assert ran(proc) == (2, [f"{prog}: standard output is closed; nothing could be printed"])
    assert list(tmp_path.iterdir()) == []  # no picture drawn, no run started


@pytest.mark.processes
@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full")
def test_commands_whose_output_is_lost_end_in_one_line(trained_tiny, tmp_path):
    run_dir, _ = trained_tiny
    generate = command_line("jaxattn.commands.generate", "--run", run_dir, "--prompt", PROMPT)
    viz = command_line("jaxattn.commands.viz", run_dir, "--out", tmp_path)
    reader, gone = os.pipe()
    os.close(reader)  # a pipe whose reader has gone before the answer comes (`| head`)
    with open("/dev/full", "wb") as full:
        procs = [
            subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=subprocess.PIPE, text=True)
            for argv, out in [(generate, full), (viz, full), (generate, gone)]
        ]
    os.close(gone)
    full_disk = "cannot write to standard output: No space left on device"
    assert ran(procs[0]) == (1, [f"jaxattn.commands.generate: {full_disk}"])
    assert ran(procs[1]) == (1, [f"jaxattn.commands.viz: {full_disk}"])
    assert ran(procs[2]) == (
        141,
        ["jaxattn.commands.generate: cannot write to standard output: Broken pipe"],
    )


PROMPT = "3 4 5 6 7 8 9 10 11 12"  # as long as the trained ones: no note on stderr


def test_sigterm_outside_training_is_one_line_and_143(capsys):
    # SIGTERM while a command imported, compiled or loaded once killed it without a word.
    before = signal.getsignal(signal.SIGTERM)

    def body():
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM should have stopped the body")

    status = run_command("cmd", body)
    assert status == 143
    assert capsys.readouterr().err == "cmd: stopped by SIGTERM\n"
    assert signal.getsignal(signal.SIGTERM) == before  # put back
