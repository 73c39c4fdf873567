"""Training methods by name: how a batch becomes a loss, and what head the model needs.

Importing this package registers every method (and the heads they add to the model registry),
so `METHODS` and checkpoint loading see all of them.
"""

from training.methods import diva, dvml, magnet  # noqa: F401  (register methods and heads)
from training.methods.base import METHODS, Batch, Method, build_method, register_method
from training.methods.metric_loss import MetricLossMethod

__all__ = ["METHODS", "Batch", "Method", "MetricLossMethod", "build_method", "register_method"]
