"""Train a TinyDecoder on a synthetic task: ``python train.py --config configs/tiny.yaml``.

Overrides follow the config file as ``key.sub=value``, e.g. ``train.steps=500``. A bad config
stops with one line naming the key and what is allowed (exit status 2), before anything is
written.
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="Train a TinyDecoder on a synthetic sequence task.",
        epilog="example: python train.py --config configs/tiny.yaml train.steps=500",
    )
    parser.add_argument("--config", default="configs/tiny.yaml", help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    args = parser.parse_args(argv)

    from jaxattn.config import ConfigError, load_config

    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"train.py: config error: {err}", file=sys.stderr)
        return 2

    from jaxattn.training import train

    try:
        result = train(config)
    except KeyboardInterrupt:
        print("train.py: interrupted; no run directory was written", file=sys.stderr)
        return 130
    print(f"run directory: {result.run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
