"""Time-to-solve of the shipped configs, whole process included (import, compile, train, eval,
checkpoint), as a user meets it.

    python benchmarks/train_speed.py                    # tiny.yaml, median of 3 runs
    python benchmarks/train_speed.py --also reverse sort next_token --runs 1
    python benchmarks/train_speed.py --checkpoint-cost --runs 7   # checkpoints' share
    python benchmarks/train_speed.py --against /tmp/before --runs 3  # this tree vs another

Each run is ``python train.py --config configs/<name>.yaml`` in a fresh process writing to a
temporary run directory; wall seconds are measured around the process. Steps/s is steps
per second of training after the first (compiling) chunk, evaluations excluded.

``--checkpoint-cost`` runs tiny.yaml with a checkpoint at every evaluation (the default),
with ``train.checkpoint_every=0`` (one checkpoint, at the end) and with every save skipped
(a baseline only a benchmark can have), alternating them so that the machine's drift falls
on all alike, and reports the medians and their ratios.

``--against DIR`` runs tiny.yaml with this tree's ``train.py`` and with DIR's (another
checkout, e.g. ``git worktree add /tmp/before <commit>``: its ``train.py`` imports its own
``jaxattn``; ``--against-python DIR/.venv/bin/python`` runs it with the dependencies its own
``make venv`` installed), in one interleaved run: this tree's first run (an empty
compilation cache) and repeat run (the cache one run left), each with pictures on and off,
and DIR's runs with pictures on and off (with a cache if DIR's commands have one, as for
this tree). Each run reports its phases (``benchmarks/_phases.py``: import, trace, lower,
compile, steps, evaluation, checkpoints, pictures); the table gives medians and each case's
wall time against DIR's with the same pictures.
"""

from __future__ import annotations

import argparse
import json
import os
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


def run_once(
    config: str,
    overrides=(),
    saves: bool = True,
    root: Path = ROOT,
    env: dict | None = None,
    phases: bool = False,
    python: str = sys.executable,
) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        if saves and phases:
            wrapper = (str(Path(__file__).resolve().parent / "_phases.py"),)
        else:
            wrapper = () if saves else ("-c", _NO_SAVES)
        start = time.perf_counter()
        proc = subprocess.run(
            [
                python,
                *wrapper,
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
            env={
                k: v
                for k, v in {**os.environ, **(env or {})}.items()
                if v is not None  # None: unset
            }
            | {"JAXATTN_PHASES": str(Path(tmp) / "phases.json")},
        )
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise RuntimeError(f"{config} failed:\n{proc.stderr[-2000:]}")
        summary = json.loads((run_dir / "summary.json").read_text())
        checkpoints = len(list((run_dir / "checkpoints").iterdir()))
        measured = json.loads((Path(tmp) / "phases.json").read_text()) if phases else {}
    return {
        "checkpoints": checkpoints,
        "wall_s": wall,
        "steps": summary["steps"],
        "steps_per_s": summary["steps_per_second"] or float("nan"),
        "exact_match": summary["exact_match"],
        "reached": summary["reached_target"],
        "phases": measured,
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


_PHASES = (
    "import", "trace", "lower", "compile", "steps", "evaluation", "checkpoints", "pictures"
)  # fmt: skip


def against(other: Path, runs: int, python: str = sys.executable) -> None:
    """tiny.yaml with this tree (first and repeat runs) and with ``other`` (run by
    ``python``: the interpreter of its own install), pictures on and off, interleaved;
    medians of the wall time and of each phase, and the ratios."""
    pictures = {"on": ("train.pictures=true",), "off": ("train.pictures=false",)}
    with tempfile.TemporaryDirectory(prefix="train-speed-") as tmp:
        # This tree's repeat runs share a cache that one untimed run filled; each first run
        # gets an empty one. The other tree runs as a user runs it: no JAX cache named (if
        # its commands make one of their own, every run of it is a repeat run).
        warm = {"JAX_COMPILATION_CACHE_DIR": str(Path(tmp) / "warm")}
        run_once("tiny", root=ROOT, env=warm)
        fresh = iter(range(10**6))

        def empty_cache() -> dict:
            return {"JAX_COMPILATION_CACHE_DIR": str(Path(tmp) / f"first-{next(fresh)}")}

        cases = {}
        for shown, overrides in pictures.items():
            mine = sys.executable
            cases[f"this tree, first run, pictures {shown}"] = (ROOT, mine, overrides, empty_cache)
            cases[f"this tree, repeat run, pictures {shown}"] = (
                ROOT, mine, overrides, lambda: warm
            )  # fmt: skip
            cases[f"{other.name}, pictures {shown}"] = (
                other, python, overrides, lambda: {"JAX_COMPILATION_CACHE_DIR": None}
            )  # fmt: skip
        results: dict = {name: [] for name in cases}
        for i in range(runs):
            for name in list(cases) if i % 2 == 0 else list(cases)[::-1]:
                root, python_, overrides, env = cases[name]
                results[name].append(
                    run_once("tiny", overrides, root=root, env=env(), phases=True, python=python_)
                )
    print(
        "| case | runs | wall s | vs before | "
        + " | ".join(_PHASES)
        + " | programs | cache hits | steps/s | exact |"
    )
    print("|---|---|---|---|" + "---|" * len(_PHASES) + "---|---|---|---|")
    before = {
        shown: _median(results[f"{other.name}, pictures {shown}"], "wall_s") for shown in pictures
    }
    for name, rs in results.items():
        wall = _median(rs, "wall_s")
        shown = name.rsplit(" ", 1)[-1]
        cells = [f"{statistics.median(r['phases'][phase] for r in rs):.2f}" for phase in _PHASES]
        counts = [
            f"{statistics.median(r['phases'][k] for r in rs):.0f}"
            for k in ("programs", "cache_hits")
        ]
        print(
            f"| {name} | {len(rs)} | {wall:.2f} | {wall / before[shown]:.2f}x | "
            + " | ".join(cells + counts)
            + f" | {_median(rs, 'steps_per_s'):.1f} | {min(r['exact_match'] for r in rs):.4f} |"
        )
    print(
        "\nwall s of each run: "
        + "; ".join(
            f"{name}: " + ", ".join(f"{r['wall_s']:.2f}" for r in rs)
            for name, rs in results.items()
        )
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
    parser.add_argument(
        "--against-python",
        default=sys.executable,
        help="the interpreter --against's checkout runs with (its own venv: the dependencies "
        "a user of it installs), default this one",
    )
    args = parser.parse_args(argv)
    print(f"machine: {machine()}\n")
    if args.against is not None:
        against(args.against.resolve(), args.runs, args.against_python)
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
