"""What the command lines (train.py, python -m jaxattn.viz, python -m jaxattn.generate)
share."""

from __future__ import annotations

import argparse
import re


class OneLineParser(argparse.ArgumentParser):
    """Usage errors in one line, as every other error of the commands (``--help`` for more)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: {message} (see --help)\n")


def step_argument(text: str):
    """``--step``: best, latest or a step number (ASCII digits only: ``int`` would take
    "²" or "٣")."""
    return int(text) if re.fullmatch(r"[0-9]+", text) else text
