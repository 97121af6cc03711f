"""Train a TinyDecoder on a synthetic task: ``python train.py --config configs/tiny.yaml``.

Overrides follow the config file as ``key.sub=value``, e.g. ``train.steps=500``. The run
directory (``train.run_dir``, default ``runs/<name>``) is created and marked as a run; an
existing run is continued with ``--resume`` or replaced with ``--overwrite``, and a path
that is not a run is never written to. Every failure is one line on stderr:

- exit 2: a bad config, a run directory refused or unwritable, a checkpoint that cannot be
  read or saved, a non-finite loss;
- exit 130 / 143: SIGINT / SIGTERM; the current chunk finishes, a checkpoint is saved, and
  the line says how to resume.
"""

import sys

from jaxattn.commands.train import main

if __name__ == "__main__":
    sys.exit(main())
