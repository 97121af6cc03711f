"""Time-to-solve of the shipped configs, whole process included (import, compile, train, eval,
checkpoint), as a user meets it.

    python benchmarks/train_speed.py                    # tiny.yaml, median of 3 runs
    python benchmarks/train_speed.py --also reverse sort next_token --runs 1
    python benchmarks/train_speed.py --checkpoint-cost --runs 7   # checkpoints' share
    python benchmarks/train_speed.py --against /tmp/before --runs 5  # this tree vs another

Each run is ``python train.py --config configs/<name>.yaml`` in a fresh process writing to a
temporary run directory; wall seconds are measured around the process. Steps/s is steps
per second of training after the first (compiling) chunk, evaluations excluded.

``--checkpoint-cost`` runs tiny.yaml with a checkpoint at every evaluation (the default),
with ``train.checkpoint_every=0`` (one checkpoint, at the end) and with every save skipped
(a baseline only a benchmark can have), alternating them so that the machine's drift falls
on all alike, and reports the medians and their ratios.

``--against DIR`` runs tiny.yaml with this tree's ``train.py`` and with DIR's (another
checkout, e.g. ``git worktree add /tmp/before <commit>``: its ``train.py`` imports its own
``jaxattn``, the script's directory coming first on ``sys.path``), alternating them, and
reports both and their ratio: a change's cost or gain measured in one interleaved run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, run_main

ROOT = Path(__file__).resolve().parents[1]


# train.py with every checkpoint save skipped: the baseline "no checkpoints" (the trainer
# itself always keeps at least the last one).
_NO_SAVES = (
    "import runpy, sys; import jaxattn.train.checkpoints as c; "
    "c.Checkpoints.save = lambda *args, **kwargs: None; "
    "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
)


def run_once(config: str, overrides=(), saves: bool = True, root: Path = ROOT) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        start = time.perf_counter()
        proc = subprocess.run(
            [
                sys.executable,
                *(() if saves else ("-c", _NO_SAVES)),
                str(root / "train.py"),
                "--config",
                str(root / "configs" / f"{config}.yaml"),
                f"train.run_dir={run_dir}",
                "train.progress=false",
                *overrides,
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise RuntimeError(f"{config} failed:\n{proc.stderr[-2000:]}")
        summary = json.loads((run_dir / "summary.json").read_text())
        checkpoints = len(list((run_dir / "checkpoints").iterdir()))
    return {
        "checkpoints": checkpoints,
        "wall_s": wall,
        "steps": summary["steps"],
        "steps_per_s": summary["steps_per_second"] or float("nan"),
        "exact_match": summary["exact_match"],
        "reached": summary["reached_target"],
    }


def _alternating(cases: dict, runs: int) -> dict:
    """``{name: [run_once(**kwargs), ...]}``, the cases taken in turn, forwards then backwards,
    so that the machine's drift falls on all alike."""
    results: dict = {name: [] for name in cases}
    for i in range(runs):
        for name in list(cases) if i % 2 == 0 else list(cases)[::-1]:
            results[name].append(run_once("tiny", **cases[name]))
    return results


def _median(rs: list, key: str) -> float:
    return statistics.median(r[key] for r in rs)


def _table(results: dict, first: str, column: str, cell) -> None:
    """One row per case: its runs, ``cell(runs)`` under ``column``, then the wall times,
    steps and exact-match."""
    print(f"| {first} | runs | {column} | wall s (median) | wall s (all) | steps | exact |")
    print("|---|---|---|---|---|---|---|")
    for name, rs in results.items():
        walls = ", ".join(f"{r['wall_s']:.2f}" for r in rs)
        print(
            f"| {name} | {len(rs)} | {cell(rs)} | {_median(rs, 'wall_s'):.2f} | {walls} | "
            f"{rs[0]['steps']} | {min(r['exact_match'] for r in rs):.4f} |"
        )


def checkpoint_cost(runs: int) -> None:
    """Whole-process time of tiny.yaml: checkpoints at every evaluation vs only at the end."""
    results = _alternating(
        {
            "every evaluation": {},
            "end only": {"overrides": ("train.checkpoint_every=0",)},
            "none (saves skipped)": {"saves": False},
        },
        runs,
    )
    _table(results, "checkpoints", "saves", lambda rs: f"{rs[0]['checkpoints']} kept")
    every, end, none = (_median(rs, "wall_s") for rs in results.values())
    print()
    for name, base in (("end only", end), ("none", none)):
        print(f"every evaluation / {name}: {every / base:.3f} ({100 * (every / base - 1):+.1f}%)")


def against(other: Path, runs: int) -> None:
    """tiny.yaml with this tree and with ``other``, alternating; medians and their ratio."""
    results = _alternating({"this tree": {"root": ROOT}, f"{other}": {"root": other}}, runs)
    _table(results, "tree", "steps/s (median)", lambda rs: f"{_median(rs, 'steps_per_s'):.1f}")
    (mine, theirs), (rate_mine, rate_theirs) = (
        [_median(rs, key) for rs in results.values()] for key in ("wall_s", "steps_per_s")
    )
    print(
        f"\nwall: this tree / other = {mine / theirs:.3f}; steps/s: {rate_mine / rate_theirs:.3f}"
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="runs of tiny.yaml (median)")
    parser.add_argument("--also", nargs="*", default=[], help="more configs, one run each")
    parser.add_argument(
        "--checkpoint-cost", action="store_true", help="checkpoints every eval vs at the end"
    )
    parser.add_argument(
        "--against", type=Path, default=None, help="another checkout to time tiny.yaml against"
    )
    args = parser.parse_args(argv)
    print(f"machine: {machine()}\n")
    if args.against is not None:
        against(args.against.resolve(), args.runs)
        return
    if args.checkpoint_cost:
        checkpoint_cost(args.runs)
        return
    print("| config | runs | wall s (median) | wall s (all) | steps | steps/s | exact | target |")
    print("|---|---|---|---|---|---|---|---|")
    for config in ["tiny", *args.also]:
        runs = [run_once(config) for _ in range(args.runs if config == "tiny" else 1)]
        mid = sorted(runs, key=lambda r: r["wall_s"])[len(runs) // 2]
        walls = ", ".join(f"{r['wall_s']:.1f}" for r in runs)
        print(
            f"| {config} | {len(runs)} | {statistics.median(r['wall_s'] for r in runs):.1f} | "
            f"{walls} | {mid['steps']} | {mid['steps_per_s']:.0f} | "
            f"{min(r['exact_match'] for r in runs):.4f} | "
            f"{'reached' if all(r['reached'] for r in runs) else 'NOT reached'} |",
            flush=True,
        )


if __name__ == "__main__":
    run_main(main)
