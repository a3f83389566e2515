"""Cloud-side Flower strategies for split fine-tuning."""

from .split_learning import RoundFailed, SplitLearningStrategy
from .u_shaped import UShapedStrategy

__all__ = ["RoundFailed", "SplitLearningStrategy", "UShapedStrategy"]
