"""Train a TinyDecoder on a synthetic task: ``python train.py --config configs/tiny.yaml``.

The command itself is :mod:`jaxattn.commands.train` (overrides, ``--resume``,
``--overwrite``, exit statuses); ``python train.py --help`` says how to use it.
"""

import signal
import sys

if __name__ == "__main__":
    # Importing the package imports JAX, a second or two in which a Ctrl-C raised inside one
    # of JAX's garbage-collection callbacks would be printed and dropped (the run then went
    # on): held until the import is done, then one line.
    held = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    try:
        from jaxattn.commands._ending import exit_with
        from jaxattn.commands.train import main
    finally:
        signal.signal(signal.SIGINT, previous)
    if held:
        print("train.py: interrupted", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
    exit_with(main())
