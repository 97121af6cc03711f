"""The run directory is ours or refused (issue 9, point 1) and checked writable before any
training (point 4).

Each refusal first checks that the damage the old trainer did is absent (the user's files
still there with their content, nothing added, nothing renamed), then the one-line RunError.
Refusals go through ``jaxattn.train.loop.train`` with model initialisation and the training step
replaced by a failing stub (a refusal must come before any of it), and a few key cases
through a real ``train.py`` subprocess (exit 2, one stderr line, no traceback).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import ROOT, SHORT_RUN, TINY

from jaxattn.train import loop, plan, rundir
from jaxattn.train.config import load_config
from jaxattn.train.loop import train
from jaxattn.train.rundir import MARK, OWNED, RunError, open_run_dir

# A smaller model and a shorter run: 4 steps, evaluated and checkpointed at steps 2 and 4.
SMALL = [
    *SHORT_RUN,
    "model.d_model=16",
    "model.num_heads=2",
    "model.d_ff=32",
    "task.length=3",
    "task.batch_size=8",
    "task.eval_size=16",
    "train.steps=4",
    "train.eval_every=2",
    "train.steps_per_call=2",
]


def small_config(run_dir, *overrides):
    return load_config(TINY, [*SMALL, f"train.run_dir={run_dir}", *overrides])


def tree(root: Path) -> dict:
    """Every entry under ``root`` (hidden ones included, symlinks not followed): relative
    path -> ('dir',) | ('file', bytes) | ('link', target)."""
    out = {}
    for top, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(top) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                out[rel] = ("dir",)
            else:
                out[rel] = ("file", p.read_bytes())
    return out


def outside(root: Path, run: Path) -> dict:
    """``tree(root)`` without the run directory and what is inside it."""
    skip = run.relative_to(root).parts
    return {k: v for k, v in tree(root).items() if Path(k).parts[: len(skip)] != skip}


def one_line(err: BaseException) -> str:
    message = str(err)
    assert message and "\n" not in message
    assert "Traceback" not in message
    return message


@pytest.fixture
def no_training(monkeypatch):
    """Fail the test if the model is initialised or a training step runs: a refusal or an
    unwritable directory must be reported before any of that. A refusal of the path comes
    before anything compiles; the memory estimate (which compiles the step) is left out
    here, as is the background compilation of the other programs, so an unwritable directory
    is reported with nothing compiled too."""

    def fail(*args, **kwargs):
        raise AssertionError("training started; the run directory should have been refused")

    def make_failing_chunk(*args, **kwargs):
        return fail

    monkeypatch.setattr(plan.Plan, "init_state", fail)
    monkeypatch.setattr(plan.Plan, "compile_ahead", lambda *args, **kwargs: None)
    monkeypatch.setattr(plan, "make_train_chunk", make_failing_chunk)
    monkeypatch.setattr(loop, "check_memory", lambda *args: None)


def refused(config, **kwargs) -> str:
    """The RunError message of ``train(config)``, checked to be one line."""
    with pytest.raises(RunError) as info:
        train(config, log=lambda _: None, **kwargs)
    return one_line(info.value)


def run_train_py(*args, cwd, env=None):
    """train.py with the small config; ``args`` (flags first, then overrides) go before it."""
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--config", str(TINY), *args, *SMALL],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def one_line_failure(proc) -> str:
    """train.py's exit 2 with one stderr line and no traceback; returns that line."""
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("train.py: ")
    return lines[0]


def fake_run(path: Path, *, extra: dict | None = None) -> Path:
    """A run directory of ours without training: marked by open_run_dir, then every file
    a run writes (``OWNED``) filled with recognisable content."""
    with open_run_dir(path):
        pass
    for name in OWNED:
        if name == "checkpoints":
            (path / name / "2").mkdir(parents=True)
            (path / name / "2" / "meta").write_text("old checkpoint\n")
        else:
            (path / name).write_text(f"old {name}\n")
    for name, text in (extra or {}).items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(text)
    return path


# ------------------------------------------------------------------ paths that are not ours


def test_non_empty_directory_without_the_mark_is_refused(tmp_path, no_training):
    mydata = tmp_path / "mydata"
    mydata.mkdir()
    (mydata / "thesis.txt").write_text("important\n")
    before = tree(tmp_path)
    message = refused(small_config(mydata))
    # The old trainer deleted the directory and left only the run's files.
    assert (mydata / "thesis.txt").read_text() == "important\n"
    assert tree(tmp_path) == before  # nothing added, not even the mark
    assert not (mydata / MARK).exists()
    assert str(mydata) in message and "not a jaxattn run" in message
    assert "thesis.txt" in message


def test_parent_of_earlier_runs_is_refused(tmp_path, no_training):
    runs = tmp_path / "runs"
    fake_run(runs / "a")
    fake_run(runs / "b")
    before = tree(tmp_path)
    message = refused(small_config(runs))
    assert tree(tmp_path) == before  # the earlier runs are intact
    assert (runs / "a" / "metrics.jsonl").read_text() == "old metrics.jsonl\n"
    assert str(runs) in message
    # Neither flag makes it ours.
    assert refused(small_config(runs), overwrite=True) == message
    assert refused(small_config(runs), resume=True) == message
    assert tree(tmp_path) == before


@pytest.mark.parametrize("run_dir", ["configs", "."])
def test_configs_directory_or_cwd_is_refused(tmp_path, monkeypatch, no_training, run_dir):
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    (tmp_path / "notes.txt").write_text("mine\n")
    monkeypatch.chdir(tmp_path)
    before = tree(tmp_path)
    config = load_config("configs/tiny.yaml", [*SMALL, f"train.run_dir={run_dir}"])
    message = refused(config)
    assert tree(tmp_path) == before  # the configs, the one loaded included, are intact
    assert (tmp_path / "configs" / "tiny.yaml").read_bytes() == TINY.read_bytes()
    assert "not a jaxattn run" in message
    assert refused(config, overwrite=True) == message
    assert tree(tmp_path) == before


def test_regular_file_is_refused_and_not_renamed(tmp_path, no_training):
    target = tmp_path / "run"
    target.write_text("a file of mine\n")
    before = tree(tmp_path)
    for flags in ({}, {"overwrite": True}, {"resume": True}):
        message = refused(small_config(target), **flags)
        assert "is not a directory" in message and str(target) in message
    # The old trainer replaced it and kept the original as a hidden .run.old-PID.
    assert target.read_text() == "a file of mine\n"
    assert tree(tmp_path) == before
    assert not [p for p in tmp_path.rglob("*") if ".old-" in p.name or ".partial-" in p.name]


@pytest.mark.parametrize("kind", ["directory", "empty directory", "file", "dangling"])
def test_symlink_is_refused(tmp_path, no_training, kind):
    target = tmp_path / "target"
    if kind.endswith("directory"):
        target.mkdir()
    if kind == "directory":
        (target / "data.txt").write_text("data\n")
    elif kind == "file":
        target.write_text("data\n")
    link = tmp_path / "run"
    link.symlink_to(target)
    before = tree(tmp_path)
    for flags in ({}, {"overwrite": True}, {"resume": True}):
        message = refused(small_config(link), **flags)
        assert "is a symlink" in message and str(link) in message
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert tree(tmp_path) == before  # link and target intact; a dangling target not created
    assert not [p for p in tmp_path.rglob("*") if ".old-" in p.name]


def test_empty_directory_is_taken_and_marked(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with open_run_dir(run) as opened:
        assert opened.path == run and opened.existed is False
        assert json.loads((run / MARK).read_text())["jaxattn_run"] == 1
    assert sorted(p.name for p in run.iterdir()) == [MARK]  # no probe file left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_open_run_dir_refusals_write_nothing(tmp_path):
    """The same refusals straight from open_run_dir, for library callers."""
    mydata = tmp_path / "mydata"
    mydata.mkdir()
    (mydata / "thesis.txt").write_text("important\n")
    (tmp_path / "file").write_text("x\n")
    (tmp_path / "link").symlink_to(mydata)
    before = tree(tmp_path)
    for path in (mydata, tmp_path / "file", tmp_path / "link", tmp_path):
        for flags in ({}, {"resume": True}, {"overwrite": True}):
            with pytest.raises(RunError) as info:
                open_run_dir(path, **flags)
            assert str(path) in one_line(info.value)
    assert tree(tmp_path) == before


# --------------------------------------------------------------------------- runs of ours


def test_existing_run_needs_resume_or_overwrite(tmp_path, no_training):
    run = fake_run(tmp_path / "run")
    before = tree(tmp_path)
    message = refused(small_config(run))
    assert "--resume" in message and "--overwrite" in message and str(run) in message
    assert tree(tmp_path) == before


def test_resume_and_overwrite_together_are_refused(tmp_path, no_training):
    run = fake_run(tmp_path / "run")
    before = tree(tmp_path)
    for path in (run, tmp_path / "absent"):
        with pytest.raises(RunError) as info:
            open_run_dir(path, resume=True, overwrite=True)
        for message in (
            one_line(info.value),
            refused(small_config(path), resume=True, overwrite=True),
        ):
            words = message.replace(str(tmp_path), "")  # the test's own name says resume
            assert "resume" in words and "overwrite" in words
    assert tree(tmp_path) == before  # neither replaced nor created


def test_overwrite_deletes_only_what_a_run_writes(tmp_path):
    run = fake_run(
        tmp_path / "run",
        extra={
            "notes.txt": "my notes\n",
            "plots/loss.svg": "<svg/>\n",
            "checkpoints-old.txt": "similar name, not ours\n",
        },
    )
    (tmp_path / "beside.txt").write_text("beside\n")
    before_outside = outside(tmp_path, run)
    with open_run_dir(run, overwrite=True) as opened:
        assert opened.existed is True
    assert not [name for name in OWNED if (run / name).exists()]
    assert (run / "notes.txt").read_text() == "my notes\n"
    assert (run / "plots" / "loss.svg").read_text() == "<svg/>\n"
    assert (run / "checkpoints-old.txt").read_text() == "similar name, not ours\n"
    assert (run / MARK).is_file()
    assert outside(tmp_path, run) == before_outside


def test_overwrite_unlinks_symlinks_inside_the_run_without_following_them(tmp_path):
    """A user's symlink named like a run file is removed; what it points to is not touched."""
    data = tmp_path / "data"
    (data / "deep").mkdir(parents=True)
    (data / "deep" / "x.bin").write_bytes(b"\0\1\2")
    (tmp_path / "cfg.yaml").write_text("mine\n")
    run = tmp_path / "run"
    with open_run_dir(run):
        pass
    (run / "checkpoints").symlink_to(data)
    (run / "config.yaml").symlink_to(tmp_path / "cfg.yaml")
    before_outside = outside(tmp_path, run)
    with open_run_dir(run, overwrite=True):
        pass
    assert not (run / "checkpoints").is_symlink() and not (run / "checkpoints").exists()
    assert not (run / "config.yaml").is_symlink() and not (run / "config.yaml").exists()
    assert outside(tmp_path, run) == before_outside


def test_run_in_use_by_another_process_is_refused(tmp_path):
    run = fake_run(tmp_path / "run")
    before = tree(tmp_path)
    with open_run_dir(run, resume=True):  # holds the lock, as a training process does
        for flags in ({"resume": True}, {"overwrite": True}):
            with pytest.raises(RunError) as info:
                open_run_dir(run, **flags)
            assert "in use" in one_line(info.value) and str(run) in str(info.value)
        # --overwrite of a run being trained deletes nothing.
        assert tree(tmp_path) == before
    with open_run_dir(run, resume=True):  # released when the holder closed it
        pass


# ------------------------------------------------------------- unwritable, full disk, ~


@pytest.mark.parametrize("where", ["/proc/x", "/sys/x", "under a file", "deep under a file"])
def test_unwritable_run_dir_is_one_line_before_training(tmp_path, no_training, where):
    (tmp_path / "file").write_text("mine\n")
    path = {
        "under a file": tmp_path / "file" / "run",
        "deep under a file": tmp_path / "file" / "a" / "run",
    }.get(where, Path(where))
    before = tree(tmp_path)
    message = refused(small_config(path))
    assert str(path) in message and "cannot write" in message
    assert not Path(path).exists()
    assert tree(tmp_path) == before


def test_full_disk_at_the_write_probe_is_one_line_before_training(
    tmp_path, monkeypatch, no_training
):
    """The directory can be created and marked, but 4 KiB more do not fit: found before
    training (the old trainer found it after the whole training, in tracebacks)."""
    real_open = open

    def full_disk_open(file, *args, **kwargs):
        if ".write-test" in Path(file).name:
            raise OSError(28, "No space left on device", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(rundir, "open", full_disk_open, raising=False)
    run = tmp_path / "run"
    message = refused(small_config(run))
    assert message == f"cannot write the run directory {run}: No space left on device"
    # What this call created (the mark, the directory) is undone: no probe, no half run,
    # and the same command works once there is room again.
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    with rundir.open_run_dir(run) as opened:
        assert opened.existed is False and (run / MARK).is_file()


def test_too_little_free_space_is_refused_before_training(tmp_path, monkeypatch):
    def no_state(*args, **kwargs):
        raise AssertionError("the model was initialised despite too little free space")

    monkeypatch.setattr(plan.Plan, "init_state", no_state)
    real = shutil.disk_usage
    monkeypatch.setattr(
        rundir.shutil, "disk_usage", lambda p: real(p)._replace(free=2**17)
    )  # 0.125 MiB: less than (keep_checkpoints + 2) * 256 KiB, whatever the model
    run = tmp_path / "run"
    message = refused(small_config(run))
    assert "MiB" in message and "0.1 MiB free" in message and str(run) in message
    # Nothing trained, nothing saved, and the directory this call made is gone again, so
    # the same command can simply be run again (not refused as "holds a run already").
    assert list(tmp_path.iterdir()) == []


def test_check_free_space_passes_when_there_is_room(tmp_path):
    rundir.check_free_space(tmp_path, 1)
    with pytest.raises(RunError, match="MiB"):
        rundir.check_free_space(tmp_path, 2**62)


def test_tilde_is_expanded(tmp_path, monkeypatch):
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        assert (home / "x" / MARK).is_file()  # the run directory is open by then
        raise Stop

    monkeypatch.setattr(plan.Plan, "init_state", stop)
    with pytest.raises(Stop):
        train(small_config("~/x"), log=lambda _: None)
    assert not (home / "x").exists()  # a start that failed leaves nothing
    assert list(cwd.iterdir()) == []  # the old trainer made a directory named '~' here
    assert not [p for p in tmp_path.rglob("~*")]


# --------------------------------------------------------------------- a whole real run


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One real 4-step run, started with resume=True on a path where no run is, from a
    working directory of its own, beside files of the user's; snapshots outside its
    directory taken before and after."""
    root = tmp_path_factory.mktemp("finished")
    parent, cwd = root / "parent", root / "cwd"
    (parent / "earlier").mkdir(parents=True)
    (parent / "earlier" / "result.txt").write_text("earlier\n")
    (parent / "sibling.txt").write_text("sibling\n")
    cwd.mkdir()
    (cwd / "here.txt").write_text("here\n")
    run = parent / "run"
    before = outside(root, run)
    logs: list[str] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        result = train(small_config(run), resume=True, log=logs.append)
    return SimpleNamespace(
        root=root, run=run, result=result, logs=logs, before=before, after=outside(root, run)
    )


def copy_run(finished_run, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(finished_run.run, run, symlinks=True)
    return run


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def checkpoint_steps(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir())


def test_resume_on_a_path_without_a_run_starts_a_new_one(finished_run):
    result, run = finished_run.result, finished_run.run
    assert any("no run in" in line and "starting a new one" in line for line in finished_run.logs)
    assert result.run_dir == run and result.steps == 4 and result.resumed_from is None
    assert [r["step"] for r in records(run)] == [2, 4]
    assert checkpoint_steps(run) == ["2", "4"]
    assert (run / MARK).is_file()


def test_a_whole_run_touches_nothing_outside_its_directory(finished_run):
    assert finished_run.after == finished_run.before
    names = {p.name for p in finished_run.run.iterdir()}
    assert names == {MARK, "checkpoints", "config.yaml", "metrics.jsonl", "summary.json"}
    assert names <= {MARK, *OWNED}  # everything it wrote, --overwrite may delete
    leftovers = [
        p for p in finished_run.run.rglob("*") if ".tmp-" in p.name or ".write-test" in p.name
    ]
    assert leftovers == []


def test_overwrite_replaces_a_real_run_and_keeps_the_users_files(finished_run, tmp_path):
    run = copy_run(finished_run, tmp_path)
    (run / "notes.txt").write_text("my notes\n")
    (run / "checkpoints" / "stale.txt").write_text("from the old run\n")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 99}\n')
    (tmp_path / "beside.txt").write_text("beside\n")
    before = outside(tmp_path, run)
    result = train(small_config(run, "train.seed=1"), overwrite=True, log=lambda _: None)
    assert (run / "notes.txt").read_text() == "my notes\n"
    assert outside(tmp_path, run) == before
    assert result.resumed_from is None and result.steps == 4
    assert [r["step"] for r in records(run)] == [2, 4]  # a new file, not the old one appended
    assert checkpoint_steps(run) == ["2", "4"]  # the old checkpoints directory went whole
    assert load_config(run / "config.yaml").train.seed == 1
    assert json.loads((run / "summary.json").read_text())["resumed_from"] is None


# ---------------------------------------------------------------- train.py, end to end


@pytest.mark.processes
def test_train_py_refuses_a_directory_of_the_users(tmp_path):
    mydata = tmp_path / "mydata"
    mydata.mkdir()
    (mydata / "thesis.txt").write_text("important\n")
    before = tree(tmp_path)
    line = one_line_failure(run_train_py("train.run_dir=mydata", cwd=tmp_path))
    assert (mydata / "thesis.txt").read_text() == "important\n"
    assert tree(tmp_path) == before  # nothing added: no mark, no runs/
    assert "mydata" in line and "not a jaxattn run" in line


@pytest.mark.processes
def test_train_py_refuses_the_configs_directory(tmp_path):
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    before = tree(tmp_path)
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            "--config",
            "configs/tiny.yaml",
            "--overwrite",
            *SMALL,
            "train.run_dir=configs",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    line = one_line_failure(proc)
    assert tree(tmp_path) == before  # the --config file included
    assert "configs" in line and "not a jaxattn run" in line


@pytest.mark.processes
def test_train_py_unwritable_run_dir_is_one_line(tmp_path):
    line = one_line_failure(run_train_py("train.run_dir=/proc/x", cwd=tmp_path))
    assert "/proc/x" in line and "cannot write" in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.processes
def test_train_py_existing_run_names_both_flags(finished_run, tmp_path):
    run = copy_run(finished_run, tmp_path)
    before = tree(tmp_path)
    line = one_line_failure(run_train_py(f"train.run_dir={run}", cwd=tmp_path))
    assert "--resume" in line and "--overwrite" in line
    assert tree(tmp_path) == before


@pytest.mark.processes
def test_train_py_resume_of_a_finished_run_trains_nothing_more(finished_run, tmp_path):
    run = copy_run(finished_run, tmp_path)
    files = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    steps = checkpoint_steps(run)
    before = outside(tmp_path, run)
    proc = run_train_py("--resume", f"train.run_dir={run}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert "finished at step 4 already" in proc.stdout
    # Nothing rewritten: metrics, config and summary (its wall time and steps/s) as they were.
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == files
    assert json.loads(files["summary.json"])["steps"] == 4
    assert checkpoint_steps(run) == steps
    assert outside(tmp_path, run) == before


def test_of_two_starts_on_one_new_directory_only_one_wins(tmp_path, monkeypatch):
    """Both saw an empty directory; the mark is created with O_EXCL, so the second is
    refused and does not take away the first one's mark (or lock a file of its own)."""
    run = tmp_path / "run"
    with open_run_dir(run):
        mark = (run / MARK).read_bytes()
        monkeypatch.setattr(rundir, "is_run_dir", lambda path: False)  # it looked too early
        with pytest.raises(RunError) as info:
            rundir.open_run_dir(run)
        assert "another process just now" in one_line(info.value)
        assert (run / MARK).read_bytes() == mark
    monkeypatch.undo()
    with open_run_dir(run, resume=True) as opened:  # the winner's run is a run
        assert opened.existed


def test_leftovers_of_a_kill_are_removed_on_open_and_nothing_of_the_users(tmp_path):
    run = fake_run(tmp_path / "run", extra={".notes.tmp-draft": "mine\n", "notes.txt": "mine\n"})
    (run / ".checkpoints.deleting-4242" / "7").mkdir(parents=True)  # --overwrite killed
    (run / ".config.yaml.tmp-4242").write_text("half")  # atomic_write_text killed
    (run / ".curves.tmp-4242.png").write_bytes(b"\x89PNG")  # viz killed
    (run / ".write-test-4242").write_bytes(b"\0")  # the probe killed
    with open_run_dir(run, resume=True):
        pass
    hidden = sorted(p.name for p in run.iterdir() if p.name.startswith("."))
    assert hidden == [".jaxattn-run", ".notes.tmp-draft"]
    assert (run / "notes.txt").read_text() == "mine\n"
    assert (run / "config.yaml").read_text() == "old config.yaml\n"  # resume keeps the run


def test_a_run_dir_inside_a_run_or_with_a_too_long_name_is_one_line(tmp_path, no_training):
    run = fake_run(tmp_path / "run")
    before = tree(tmp_path)
    for inside in (run / "checkpoints" / "999", run / "plots"):
        # Was accepted: a run inside another's checkpoints/ broke its load_run and resume.
        assert f"is inside the run {run}" in refused(small_config(inside))
    long = "a" * 300
    for path in (tmp_path / long, tmp_path / "x" / long / "y"):
        # Was a 25-line OSError traceback (File name too long), and left x/ behind.
        assert "File name too long" in refused(small_config(path))
    assert tree(tmp_path) == before


def test_a_directory_where_a_run_writes_a_file_is_refused_not_deleted(tmp_path, no_training):
    run = fake_run(tmp_path / "run")
    (run / "summary.json").unlink()
    (run / "summary.json").mkdir()
    (run / "summary.json" / "keep").write_text("mine\n")
    for flags in ({"resume": True}, {"overwrite": True}):
        message = refused(small_config(run), **flags)
        assert "summary.json is not what a run writes there" in message
    assert (run / "summary.json" / "keep").read_text() == "mine\n"


def test_resume_of_a_finished_run_rewrites_only_what_a_kill_left_missing(finished_run, tmp_path):
    run = copy_run(finished_run, tmp_path)
    metrics = (run / "metrics.jsonl").read_bytes()
    (run / "summary.json").unlink()  # killed after the last checkpoint, before the summary
    (run / "metrics.jsonl").write_text('{"step": 2, "tra')  # and a line cut short
    logs: list[str] = []
    result = train(small_config(run), resume=True, log=logs.append)
    assert result.steps == 4 and result.resumed_from == 4
    assert any("finished at step 4 already" in line for line in logs)
    assert (run / "metrics.jsonl").read_bytes() == metrics
    assert json.loads((run / "summary.json").read_text())["steps"] == 4
    assert checkpoint_steps(run) == ["2", "4"]


def test_resume_without_a_checkpoint_changes_nothing_and_says_what_overwrite_would_do(
    finished_run, tmp_path
):
    # A finished run whose checkpoints were removed: resuming it once restarted from step 0,
    # truncated metrics.jsonl and left the old summary.json claiming the finished run.
    run = copy_run(finished_run, tmp_path)
    shutil.rmtree(run / "checkpoints")
    before = tree(run)
    message = refused(small_config(run), resume=True)
    assert message.startswith(f"cannot resume {run}: it has no checkpoint (nothing was changed)")
    assert "--overwrite starts it again" in message and "metrics.jsonl" in message
    assert tree(run) == before  # metrics, summary, config byte for byte; no checkpoints/
    # An empty checkpoints/ (or one holding only a save a kill cut short) is the same.
    (run / "checkpoints" / "4.orbax-checkpoint-tmp-1").mkdir(parents=True)
    before = tree(run)
    assert "it has no checkpoint" in refused(small_config(run), resume=True)
    assert tree(run) == before


def test_a_new_run_that_fails_to_start_leaves_nothing_behind(tmp_path, monkeypatch):
    # Any failure before the first checkpoint (here the model's initialisation: on a real
    # machine, out of memory) once left a marked directory with an empty metrics.jsonl that
    # the next run refused without --overwrite.
    parent = tmp_path / "runs"
    kept = tmp_path / "kept"
    kept.mkdir()  # an empty directory of the user's: its files go, the directory stays

    def out_of_memory(*args, **kwargs):
        raise MemoryError("no room")

    monkeypatch.setattr(plan.Plan, "init_state", out_of_memory)
    for run in (parent / "deep" / "run", kept):
        with pytest.raises(MemoryError):
            train(small_config(run), log=lambda _: None)
    assert not parent.exists()  # the directories the run made, removed
    assert kept.is_dir() and list(kept.iterdir()) == []
    monkeypatch.undo()
    result = train(small_config(parent / "deep" / "run"), log=lambda _: None)  # same again
    assert result.steps == 4


def test_a_step_that_cannot_fit_in_memory_is_refused_before_the_directory_exists(
    tmp_path, monkeypatch
):
    # XLA's analysis of the compiled step against the free memory: here the host is made
    # to have 4 KiB free, less than the small model's step needs.
    monkeypatch.setattr(plan, "_free_memory", lambda device: (2**12, "this host"))
    run = tmp_path / "run"
    message = refused(small_config(run))
    assert message.startswith("the train step needs about ") and " MiB of memory " in message
    assert "but this host has 0.0 MiB free; make the model or batch smaller" in message
    assert "model.d_model=16" in message and "task.batch_size" in message
    assert not run.exists()
    monkeypatch.setattr(plan, "_free_memory", lambda device: None)  # unknown: no refusal
    assert train(small_config(run), log=lambda _: None).steps == 4


def test_xla_running_out_of_memory_is_one_line_and_the_new_run_is_removed(tmp_path, monkeypatch):
    import jax

    def exhausted(self):
        class Compiled:
            def memory_analysis(self):
                return None

            def __call__(self, *args):
                raise jax.errors.JaxRuntimeError(
                    "RESOURCE_EXHAUSTED: Out of memory allocating 16 GiB.\nmore detail"
                )

        return Compiled()

    monkeypatch.setattr(plan.Plan, "chunk", exhausted)
    run = tmp_path / "run"
    message = refused(small_config(run))
    assert message == (
        f"out of memory (RESOURCE_EXHAUSTED: Out of memory allocating 16 GiB.); {run} "
        "removed; make the model or batch smaller"
    )
    assert not run.exists()
