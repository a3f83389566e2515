"""Cloud-side Flower strategies for split fine-tuning."""

from .split_learning import SplitLearningStrategy

__all__ = ["SplitLearningStrategy"]
