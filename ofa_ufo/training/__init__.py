"""Training: experiment configs, the task mixture, objectives, checkpoints and the trainer loop."""

from ofa_ufo.training.config import ConfigError, TrainConfig, load_config
from ofa_ufo.training.step_batches import TrainingError
from ofa_ufo.training.trainer import Trainer, TrainResult, train

__all__ = ["ConfigError", "TrainConfig", "TrainResult", "Trainer", "TrainingError", "load_config", "train"]
