"""What the two command lines (train.py, python -m jaxattn.viz) share."""

from __future__ import annotations

import argparse


class OneLineParser(argparse.ArgumentParser):
    """Usage errors in one line, as every other error of the commands (``--help`` for more)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: {message} (see --help)\n")
