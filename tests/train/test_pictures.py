"""Pictures of a finished run."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from conftest import ROOT, short_config

from jaxattn.commands.viz import main
from jaxattn.train.loop import train
from jaxattn.train.pictures import draw_run, plot_attention
from jaxattn.train.rundir import RunError

TWO_LAYERS = ("model.num_layers=2", "task.eval_size=16")  # the pictures show two layers


def test_draw_run_writes_pngs(tmp_path):
    config = short_config(tmp_path / "run", *TWO_LAYERS, "train.steps=10")
    run = train(config, log=lambda _: None).run_dir
    assert main([str(run), "--example", "3"]) == 0
    for name in ("attention.png", "curves.png"):
        data = (run / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_viz_cli_reports_a_missing_run(tmp_path, capsys):
    assert main([str(tmp_path / "nothing")]) == 2
    assert "is not a run directory" in capsys.readouterr().err


def test_plot_attention_checks_shapes(tmp_path):
    with pytest.raises(ValueError, match="weights must be"):
        plot_attention(np.zeros((2, 3, 4)), [1, 2, 3], tmp_path / "x.png")
    with pytest.raises(ValueError, match="tokens has length 2"):
        plot_attention(np.zeros((1, 1, 3, 3)), [1, 2], tmp_path / "x.png")


# ------------------------------------------- what viz reads is checked first (issue 9, point 4)

PICTURES = ("attention.png", "curves.png")


@pytest.fixture(scope="module")
def viz_run(tmp_path_factory):
    """A 20-step run with checkpoints at steps 10 and 20; tests copy it before damaging it."""
    run_dir = tmp_path_factory.mktemp("viz") / "run"
    config = short_config(run_dir, *TWO_LAYERS)
    train(config, log=lambda _: None)
    return run_dir


@pytest.fixture
def run_copy(viz_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(viz_run, copy, symlinks=True)
    assert not any((copy / name).exists() for name in PICTURES)
    return copy


def listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def one_stderr_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("jaxattn.commands.viz: ")
    return lines[0]


def _drop_exact_match(record: dict) -> str:
    del record["exact_match"]
    return json.dumps(record)


def _cut_json(record: dict) -> str:
    return json.dumps(record)[:25]


@pytest.mark.parametrize(
    ("damage", "says"),
    [(_drop_exact_match, "no key 'exact_match'"), (_cut_json, "not JSON")],
    ids=["missing key", "not JSON"],
)
def test_viz_refuses_a_bad_metrics_line_before_drawing_anything(run_copy, capsys, damage, says):
    metrics = run_copy / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    lines[1] = damage(json.loads(lines[1]))
    metrics.write_text("\n".join(lines) + "\n")
    before = listing(run_copy)
    assert main([str(run_copy)]) == 2
    line = one_stderr_line(capsys)
    assert str(metrics) in line and "line 2" in line and says in line
    assert "Traceback" not in line
    # Nothing drawn: no attention.png written before metrics.jsonl was found unusable.
    assert listing(run_copy) == before


def _data_files(params_dir: Path) -> list[Path]:
    """The files holding the parameters' array data (OCDBT's ``d/`` directories)."""
    return [p for p in params_dir.rglob("*") if p.is_file() and p.parent.name == "d"]


def _flip_bytes(params_dir: Path) -> None:
    path = max(_data_files(params_dir), key=lambda p: p.stat().st_size)  # array data
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
    path.write_bytes(bytes(data))


def _truncate(params_dir: Path) -> None:
    for path in _data_files(params_dir):
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.processes
@pytest.mark.parametrize("damage", [_flip_bytes, _truncate], ids=["flipped", "truncated"])
def test_viz_cli_on_a_corrupt_checkpoint_is_one_line_and_draws_nothing(run_copy, damage):
    for step_dir in (run_copy / "checkpoints").iterdir():  # whichever step viz picks
        damage(step_dir / "params")
    before = listing(run_copy)
    proc = subprocess.run(
        [sys.executable, "-m", "jaxattn.commands.viz", str(run_copy)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, f"{len(lines)} lines on stderr: {proc.stderr[:3000]}"
    assert (
        lines[0].startswith("jaxattn.commands.viz: ") and str(run_copy / "checkpoints") in lines[0]
    )
    assert listing(run_copy) == before


@pytest.mark.parametrize(
    ("out", "why"),
    [
        ("/proc/x", "No such file or directory"),
        # mkdir said "Not a directory", of the path it was given.
        ("{run}/config.yaml/pictures", "{run}/config.yaml is a file, not a directory"),
        ("{run}/config.yaml/a/b", "{run}/config.yaml is a file, not a directory"),
    ],
    ids=["no place", "under a file", "deep under a file"],
)
def test_viz_out_to_an_unwritable_place_is_one_line(run_copy, capsys, out, why):
    out, why = out.format(run=run_copy), why.format(run=run_copy)
    before = listing(run_copy)
    assert main([str(run_copy), "--out", out]) == 2
    assert one_stderr_line(capsys) == f"jaxattn.commands.viz: cannot create {out}: {why}"
    assert listing(run_copy) == before
    assert not any(p.name.endswith(".png") for p in run_copy.rglob("*"))


def test_viz_out_in_a_read_only_folder_names_it_and_the_reason(run_copy, tmp_path, capsys):
    out = tmp_path / "read-only" / "pictures"
    mkdir = Path.mkdir

    def refused(self, *args, **kwargs):  # as a read-only folder does (root may write anyway)
        if self == out:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return mkdir(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Path, "mkdir", refused)
        assert main([str(run_copy), "--out", str(out)]) == 2
    assert one_stderr_line(capsys) == (
        f"jaxattn.commands.viz: cannot create {out}: {os.strerror(errno.EACCES)}"
    )
    assert not out.exists()


def test_viz_out_that_is_a_file_is_refused_and_left_untouched(run_copy, tmp_path, capsys):
    # It said "cannot write <file>: File exists", after loading the run.
    afile = tmp_path / "afile"
    afile.write_text("mine\n")
    before = (listing(run_copy), afile.stat().st_mtime_ns)
    with pytest.raises(SystemExit) as stop:
        main([str(run_copy), "--out", str(afile)])
    assert stop.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [
        f"python -m jaxattn.commands.viz: --out {afile} is a file, not a directory (see --help)"
    ]
    assert (listing(run_copy), afile.stat().st_mtime_ns) == before
    assert afile.read_text() == "mine\n" and listing(tmp_path) == ["afile", "run"]
    # draw_run itself, before it reads the run.
    with pytest.raises(RunError, match=f"^{re.escape(str(afile))} is a file, not a directory$"):
        draw_run(tmp_path / "no run", out_dir=afile)


def test_viz_out_writes_both_pictures_there_and_nothing_into_the_run(run_copy, tmp_path, capsys):
    out = tmp_path / "pictures"
    out.mkdir()
    before = listing(run_copy)
    assert main([str(run_copy), "--out", str(out)]) == 0
    assert capsys.readouterr().out.split() == [str(out / name) for name in PICTURES]
    assert listing(out) == list(PICTURES)
    for name in PICTURES:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert listing(run_copy) == before


def test_viz_step_picks_latest_best_or_a_number(run_copy, tmp_path, capsys):
    # Step 10 made the best by exact-match, so that best (10) != latest (20).
    (run_copy / "checkpoints" / "10" / "metrics" / "metrics").write_text(
        json.dumps({"exact_match": 1.0, "eval_loss": 9.0})
    )
    drawn = {}
    for step in ("latest", "20", "best"):
        out = tmp_path / f"step-{step}"
        out.mkdir()
        assert main([str(run_copy), "--step", step, "--out", str(out)]) == 0
        drawn[step] = (out / "attention.png").read_bytes()
    assert drawn["latest"] == drawn["20"]
    assert drawn["best"] != drawn["latest"]
    capsys.readouterr()
    assert main([str(run_copy), "--step", "30"]) == 2
    assert "[10, 20]" in one_stderr_line(capsys)
    assert main([str(run_copy), "--step", "newest"]) == 2
    assert "'newest'" in one_stderr_line(capsys)
    assert not any((run_copy / name).exists() for name in PICTURES)


# ------------------------------------------------- pictures of every run (issue 12, point 5)


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) in pixels from a PNG's IHDR chunk."""
    data = path.read_bytes()[:24]
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def attention_inches(layers: int, heads: int, side: float) -> tuple[float, float]:
    """attention.png's size: square panels of ``side`` inches 0.22 in apart, margins of 0.5 in
    (left: query labels), 0.9 in (right: the colour bar), 0.5 in (top: the title) and
    0.42 in (bottom: key labels)."""
    return side * heads + 0.22 * (heads - 1) + 1.4, side * layers + 0.22 * (layers - 1) + 0.92


def _close(pixels, inches, dpi=110) -> bool:
    return all(abs(p - i * dpi) <= 1 for p, i in zip(pixels, inches, strict=True))


@pytest.mark.processes
def test_training_draws_both_pictures_at_its_expected_size(trained_tiny):
    run_dir, logs = trained_tiny
    assert f"pictures: {run_dir / 'attention.png'}, {run_dir / 'curves.png'}" in logs
    # 2 layers x 4 heads of a 21-token sequence: panels of 0.11 in per token, 110 dpi.
    assert _close(png_size(run_dir / "attention.png"), attention_inches(2, 4, 0.11 * 21))
    assert png_size(run_dir / "curves.png") == (1320, 374)
    # The curves are drawn from every step's loss: all of them are in metrics.jsonl.
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [x for r in records for x in r["step_losses"]]
    assert len(losses) == records[-1]["step"] == len([x for r in records for x in r["step_lrs"]])
    assert all(isinstance(x, float) and x > 0 for x in losses)


@pytest.mark.processes
def test_the_trained_copier_attends_to_the_source_of_each_copied_token(trained_tiny):
    """Numbers behind the picture: predicting answer token j, some head of the trained
    model looks at x_j in the prompt, for every j and almost every sequence."""
    from jaxattn.train import load_run, tasks

    model, config = load_run(trained_tiny[0])
    length = config.task.length
    inputs = tasks.eval_batch(config.task).inputs[:200]
    _, weights = model(inputs, return_attention=True)  # [layers, B, N, T, T]
    weights = np.asarray(weights)
    queries = np.arange(length + 1, 2 * length + 1)  # SEP, y_1 .. y_{L-1}: predict y_1 .. y_L
    sources = np.arange(1, length + 1)  # x_1 .. x_L
    on_source = weights[:, :, :, queries, sources]  # [layers, B, N, L]
    argmax_is_source = weights[:, :, :, queries, :].argmax(-1) == sources
    # The head that copies: the source is its row's largest weight for >= 95% of the copied
    # tokens, and on average it gets most of the weight (> 0.5) at every answer position.
    share = argmax_is_source.mean(axis=(1, 3))  # [layers, N]
    layer, head = np.unravel_index(share.argmax(), share.shape)
    assert share[layer, head] >= 0.95, share
    assert on_source[layer, :, head].mean(axis=0).min() > 0.5, on_source[layer, :, head].mean(0)


def test_a_picture_that_cannot_be_drawn_costs_one_line_not_the_run(tmp_path, monkeypatch):
    import jaxattn.train.pictures

    def no_matplotlib(run_dir):
        raise ImportError("pictures need matplotlib: pip install 'jaxattn[viz]'")

    monkeypatch.setattr(jaxattn.train.pictures, "draw_run", no_matplotlib)
    config = short_config(
        tmp_path / "run",
        *TWO_LAYERS,
        "train.pictures=true",
        "train.steps=5",
        "train.eval_every=5",
        "task.eval_size=8",
    )
    logs = []
    result = train(config, log=logs.append)
    assert logs[-1] == "pictures not drawn: pictures need matplotlib: pip install 'jaxattn[viz]'"
    assert (result.run_dir / "summary.json").is_file()
    assert not (result.run_dir / "attention.png").exists()
    # Any other failure too: one line, the run stands.
    monkeypatch.setattr(jaxattn.train.pictures, "draw_run", lambda run_dir: 1 / 0)
    train(config, resume=True, log=logs.append)
    assert logs[-1] == "pictures not drawn: ZeroDivisionError('division by zero')"
    # Resuming the finished run draws the missing pictures, and only while they are missing.
    calls = []
    monkeypatch.setattr(
        jaxattn.train.pictures, "draw_run", lambda run_dir: calls.append(run_dir) or []
    )
    train(config, resume=True, log=logs.append)
    assert calls == [result.run_dir]
    for name in PICTURES:
        (result.run_dir / name).write_bytes(b"drawn")
    train(config, resume=True, log=logs.append)
    assert calls == [result.run_dir]


def test_a_long_sequence_gets_a_picture_of_bounded_size(tmp_path):
    t = 401  # task.length 200: panels capped at 4 in, every 12th token labelled
    weights = np.tril(np.ones((t, t), np.float32))
    weights = np.broadcast_to(weights / weights.sum(-1, keepdims=True), (1, 2, t, t))
    path = plot_attention(weights, np.arange(t) % 16, tmp_path / "long.png")
    assert _close(png_size(path), attention_inches(1, 2, 4.0))
