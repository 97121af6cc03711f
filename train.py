"""Train a TinyDecoder on a synthetic task: ``python train.py --config configs/tiny.yaml``.

The command itself is :mod:`jaxattn.commands.train` (overrides, ``--resume``,
``--overwrite``, exit statuses); ``python train.py --help`` says how to use it.
"""

import sys

from jaxattn.commands.train import main

if __name__ == "__main__":
    sys.exit(main())
