"""Training jquant's reference models: the generic loop (``fit``) and next-token training (``train``)."""

from jquant.train.loop import LoopConfig as LoopConfig
from jquant.train.loop import fit as fit
from jquant.train.trainer import TrainConfig as TrainConfig
from jquant.train.trainer import TrainResult as TrainResult
from jquant.train.trainer import cross_entropy as cross_entropy
from jquant.train.trainer import train as train

__all__ = ["LoopConfig", "TrainConfig", "TrainResult", "cross_entropy", "fit", "train"]
