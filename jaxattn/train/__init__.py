"""The trainer: config, synthetic tasks, loss and optimizer, the loop, checkpoints, the run
directory, loading a trained run and its pictures. Imports optax, orbax, yaml and tqdm on top
of :mod:`jaxattn.nn`.

    from jaxattn.train import load_config, train, load_run
    result = train(load_config("configs/tiny.yaml"))
"""

from jaxattn.train.config import Config as Config
from jaxattn.train.config import ConfigError as ConfigError
from jaxattn.train.config import load_config as load_config
from jaxattn.train.load import load_run as load_run
from jaxattn.train.loop import train as train
from jaxattn.train.rundir import RunError as RunError
from jaxattn.train.session import TrainResult as TrainResult
from jaxattn.train.signals import TrainingInterrupted as TrainingInterrupted
