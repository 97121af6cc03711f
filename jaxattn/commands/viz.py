"""Draw a run's pictures again: ``python -m jaxattn.commands.viz runs/tiny [--step N]``.

Attention heatmaps of one held-out sequence and the training curves
(:func:`jaxattn.train.pictures.draw_run`), for any checkpoint of a run, finished or not.
Every failure is one line on stderr and exit status 2 (130 on Ctrl-C); pictures are
written whole or not at all.
"""

from __future__ import annotations

import os

from jaxattn.commands._compile_cache import add_compile_cache_flag, use_compile_cache
from jaxattn.commands._ending import (
    OneLineParser,
    exit_with,
    run_command,
    run_errors,
    step_argument,
)

__all__ = ["main"]


def main(argv=None) -> int:
    parser = OneLineParser(
        prog="python -m jaxattn.commands.viz",
        description="Draw attention heatmaps and training curves of a run, finished or not.",
    )
    parser.add_argument("run_dir", help="a run directory written by train.py, e.g. runs/tiny")
    parser.add_argument("--example", type=int, default=0, help="held-out sequence to show")
    parser.add_argument("--out", default=None, help="directory for the pictures (default: run)")
    parser.add_argument(
        "--step", default="best", help="checkpoint to draw: best (default), latest or a step"
    )
    add_compile_cache_flag(parser)
    args = parser.parse_args(argv)
    out = None if args.out is None else os.path.expanduser(args.out)
    if out is not None and os.path.exists(out) and not os.path.isdir(out):
        parser.error(f"--out {args.out} is a file, not a directory")  # before the run is read

    def run() -> None:
        use_compile_cache("jaxattn.commands.viz", not args.no_compile_cache)
        from jaxattn.train.pictures import draw_run

        step = step_argument(args.step)
        for path in draw_run(args.run_dir, example=args.example, out_dir=args.out, step=step):
            print(path)

    # RunError: the run; ValueError: --example; ImportError: no matplotlib. Pictures are
    # written whole or not at all, so an interruption leaves none half drawn.
    return run_command("jaxattn.commands.viz", run, known=run_errors(ValueError, ImportError))


if __name__ == "__main__":
    exit_with(main())
