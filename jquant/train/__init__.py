"""Training language models from scratch (used for jquant's reference models)."""

from jquant.train.trainer import TrainConfig as TrainConfig
from jquant.train.trainer import TrainResult as TrainResult
from jquant.train.trainer import cross_entropy as cross_entropy
from jquant.train.trainer import train as train

__all__ = ["TrainConfig", "TrainResult", "cross_entropy", "train"]
