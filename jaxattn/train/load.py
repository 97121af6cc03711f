"""Loading a trained run: its config and the model of one of its checkpoints.

What ``generate``, the pictures and a user's own code call to use what ``train`` wrote; it
reads and never writes.
"""

from __future__ import annotations

from pathlib import Path

from flax import nnx

from jaxattn.train.checkpoints import Checkpoints, model_spec
from jaxattn.train.config import ConfigError, load_config
from jaxattn.train.rundir import RunDir, RunError
from jaxattn.train.steps import abstract_model

__all__ = ["load_run"]


def load_run(run_dir, *, step="best"):
    """``(model, config)``: the trained model of a run directory and its config.

    Args:
      run_dir: what ``train.py`` wrote (``runs/<config name>`` by default), finished or not.
      step: ``"best"`` (highest held-out exact-match, default), ``"latest"``, or a step
        number that has a checkpoint.

    Raises RunError (one line) when the directory is not a run, has no checkpoint, its
    config.yaml no longer matches the checkpoint (a model key edited), or a checkpoint file
    is missing or corrupt.
    """
    run_dir = Path(run_dir).expanduser()
    if not run_dir.is_dir():
        what = "not a directory" if run_dir.exists() else "no such directory"
        raise RunError(f"{run_dir} is not a run directory ({what})")
    run = RunDir(run_dir)
    config_path = run.config
    if not run.mark.is_file() or not config_path.is_file():
        raise RunError(
            f"{run_dir} is not a run directory of jaxattn (no {run.mark.name} or "
            f"{config_path.name})"
        )
    try:
        config = load_config(config_path)
    except ConfigError as err:
        raise RunError.about(config_path, err) from None
    with Checkpoints(run.checkpoints, read_only=True) as ckpts:
        steps = ckpts.steps()
        if not steps:
            raise RunError(f"{run_dir} has no complete checkpoint yet")
        if step == "best":
            chosen = ckpts.best_step()
        elif step == "latest":
            chosen = ckpts.latest_step()
        elif isinstance(step, int) and not isinstance(step, bool) and step in steps:
            chosen = step
        else:
            raise RunError(
                f"step must be 'best', 'latest' or one of the checkpoints {steps}, got {step!r}"
            )
        graphdef, abstract_params = abstract_model(config)
        params, _, _ = ckpts.restore(
            chosen,
            nnx.to_pure_dict(abstract_params),
            spec=model_spec(config),
            spec_source=config_path,
        )
    nnx.replace_by_pure_dict(abstract_params, params)
    return nnx.merge(graphdef, abstract_params), config
