"""tfdp_prune: differentially private Keras training of the parameters chosen from public data."""

from tfdp_prune.optimizer import DPKerasAdamOptimizer
from tfdp_prune.optimizer import DPKerasSGDOptimizer
from tfdp_prune.optimizer import make_dp_optimizer_class
from tfdp_prune.per_example import PerExampleEngine
from tfdp_prune.per_example import VectorizedEngine
from tfdp_prune.train_step import make_private

__version__ = "0.1.0"

__all__ = [
    "DPKerasAdamOptimizer",
    "DPKerasSGDOptimizer",
    "PerExampleEngine",
    "VectorizedEngine",
    "make_dp_optimizer_class",
    "make_private",
]
