"""Pictures of a finished run."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from jaxattn.config import load_config
from jaxattn.loop import train
from jaxattn.viz import main, plot_attention


def test_draw_run_writes_pngs(tmp_path):
    config = load_config(
        "configs/tiny.yaml",
        [
            f"train.run_dir={tmp_path / 'run'}",
            "train.progress=false",
            "train.steps=10",
            "train.eval_every=10",
            "task.eval_size=16",
        ],
    )
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
