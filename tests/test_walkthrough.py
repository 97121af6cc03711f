"""examples/walkthrough.py runs end to end and shows each pitfall next to jaxattn's answer
(the script docs/walkthrough.md is written from); by default its pictures go to
runs/walkthrough under the working directory, never into the tracked docs/walkthrough."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import ROOT
from PIL import Image


@pytest.mark.processes
def test_the_walkthrough_runs_and_says_what_the_docs_say(trained_tiny, tmp_path):
    run_dir, _ = trained_tiny  # trained once per test session; the script can train its own
    docs = ROOT / "docs" / "walkthrough"
    before = [(path, path.stat().st_mtime_ns) for path in sorted(docs.iterdir())]
    result = subprocess.run(  # no --out: the default, from a working directory of its own
        [sys.executable, str(ROOT / "examples" / "walkthrough.py"), "--run", str(run_dir)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "Warning" not in result.stderr, result.stderr[-2000:]
    sections = [line for line in out.splitlines() if line.startswith("=== ")]
    assert len(sections) == 11
    for expected in [
        "same tokens, same embeddings on a second call: True",
        "tutorial, weights drawn in the call: same output twice? False",
        "variance of q . k / sqrt(d_k):                  0.9",
        "row sums:\n    [1. 1. 1.]",
        "tutorial, normalised over the whole matrix: row sums:\n    [0.061 0.016 0.923]",
        "jaxattn, the same scores in float16:\n    [0.731 0.269 0.   ]",
        "tutorial, additive -inf mask:\n    [[0.269 0.731]\n     [  nan   nan]]",
        "gradient with respect to q (row 1: zeros, not NaN):\n"
        "    [[-0.786  0.786]\n     [ 0.     0.   ]]",
        "tutorial, a causal mask given: output equal to no mask at all? True",
        "grouped query heads == every key head repeated for its G query heads: True",
        "the decoder is causal: changing tokens 3 and 4 leaves the logits of 0..2 alone: True",
        "the best possible training loss is 0.565",
        "exact-match 1.000",
        "picture: runs/walkthrough/attention.png",  # it says where the pictures went
        "picture: runs/walkthrough/curves.png",
    ]:
        assert expected in out, expected
    for name, size in [("attention.png", (1243, 633)), ("curves.png", (1320, 374))]:
        with Image.open(tmp_path / "runs" / "walkthrough" / name) as image:
            assert image.size == size
    after = [(path, path.stat().st_mtime_ns) for path in sorted(docs.iterdir())]
    assert after == before  # the tracked pictures of the docs untouched
