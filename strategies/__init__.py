"""The cloud: the ServerApp (``strategies.server_app``) and its Flower strategies for split fine-tuning.

The cloud imports the product package (``privtune_flwr``); nothing there imports the cloud."""

from .split_learning import RoundFailed, SplitLearningStrategy
from .u_shaped import UShapedStrategy

__all__ = ["RoundFailed", "SplitLearningStrategy", "UShapedStrategy"]
