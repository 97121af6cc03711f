"""The ``train.py`` command: config file + overrides -> :func:`jaxattn.train.train`.

Train a model (``model.kind``: a decoder, prefix-LM, classifier or encoder-decoder) on a
synthetic task: ``python train.py --config configs/tiny.yaml``.

Overrides follow the config file as ``key.sub=value``, e.g. ``train.steps=500``. The run
directory (``train.run_dir``, default ``runs/<name>``) is created and marked as a run; an
existing run is continued with ``--resume`` or replaced with ``--overwrite``, and a path
that is not a run is never written to. Every failure is one line on stderr:

- exit 2: a bad config, a run directory refused or unwritable, a checkpoint that cannot be
  read or saved, a non-finite loss;
- exit 130 / 143: SIGINT / SIGTERM; the current chunk finishes, a checkpoint is saved, and
  the line says how to resume.
"""

from __future__ import annotations

import shlex
import sys

from jaxattn.commands._compile_cache import add_compile_cache_flag, use_compile_cache
from jaxattn.commands._ending import OneLineParser, exit_with, run_command, run_errors


def _resume_command(argv: list[str], several: bool = False) -> str:
    """The command line that continues this run, as the user started it (same directory);
    for a run over several processes, on one host (its checkpoints hold whole arrays)."""
    script = sys.argv[0] if sys.argv[0].endswith("train.py") else "train.py"
    args = [a for a in argv if a not in ("--resume", "--overwrite")]
    if several:  # the keys that made it span processes, reset: a resume runs on one host
        from jaxattn.train.distributed import PROCESS_KEYS

        args = [a for a in args if not a.startswith(tuple(f"{k}=" for k in PROCESS_KEYS))]
        args += [f"{k}=null" for k in PROCESS_KEYS]
    command = shlex.join(["python", script, *args, "--resume"])
    return f"{command} (on one host, JAX_COORDINATOR_ADDRESS unset)" if several else command


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = OneLineParser(
        allow_abbrev=False,  # "--over" would survive into the printed resume command
        description="Train a model (model.kind) on a synthetic sequence task.",
        epilog="example: python train.py --config configs/tiny.yaml",
    )
    parser.add_argument("--config", default="configs/tiny.yaml", help="YAML config file")
    again = parser.add_mutually_exclusive_group()
    again.add_argument(
        "--resume", action="store_true", help="continue the run in the run directory"
    )
    again.add_argument(
        "--overwrite", action="store_true", help="replace the run in the run directory"
    )
    add_compile_cache_flag(parser)
    parser.add_argument(
        "overrides",
        nargs="*",
        help="key.sub=value overrides, e.g. model.positions=rotary train.run_dir=runs/rotary",
    )
    args = parser.parse_intermixed_args(argv)  # flags may come between overrides

    def run() -> None:
        use_compile_cache("train.py", not args.no_compile_cache)
        from jaxattn.train.config import load_config
        from jaxattn.train.loop import TrainingInterrupted, train

        config = load_config(args.config, args.overrides)
        try:
            result = train(config, resume=args.resume, overwrite=args.overwrite)
        except TrainingInterrupted as stop:
            import jax

            command = _resume_command(argv, several=jax.process_count() > 1)
            raise stop.resumed_by(command) from None
        print(f"run directory: {result.run_dir}")

    return run_command("train.py", run, known=run_errors())


if __name__ == "__main__":
    exit_with(main())
