"""Training: optax loop, orbax checkpoints, the run directory, metrics and plots."""

from jmoe.train.checkpoint import CheckpointError, CheckpointStore
from jmoe.train.config import TrainConfig
from jmoe.train.errors import NonFiniteLoss, TrainError
from jmoe.train.metrics import MetricsLog, read_metrics
from jmoe.train.plot import plot_run
from jmoe.train.rundir import load_run, read_config, write_config
from jmoe.train.state import abstract_train_state, init_train_state, make_optimizer
from jmoe.train.trainer import cross_entropy, evaluate, make_train_step, train

__all__ = [
    "CheckpointError",
    "CheckpointStore",
    "MetricsLog",
    "NonFiniteLoss",
    "TrainConfig",
    "TrainError",
    "abstract_train_state",
    "cross_entropy",
    "evaluate",
    "init_train_state",
    "load_run",
    "make_optimizer",
    "make_train_step",
    "plot_run",
    "read_config",
    "read_metrics",
    "train",
    "write_config",
]
