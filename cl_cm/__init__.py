"""cl_cm: Adam with Critical Momenta and its baselines, for continual learning.

``from cl_cm import AdamCM, AdamCG, SAM``; or by name:
``cl_cm.make_optimizer("adam_cm", model.parameters(), lr=1e-3)``.
"""
from .adam_cg import AdamCG, adam_cg
from .adam_cm import AdamCM, adam_cm
from .buffered_optimizer import CriticalBufferOptimizer
from .registry import OPTIMIZERS, OptimizerSpec, buffered, has_buffer, make_optimizer, optimizer_options
from .sam import SAM

__version__ = "0.1.0"

__all__ = ["AdamCM", "AdamCG", "SAM", "CriticalBufferOptimizer", "adam_cm", "adam_cg", "OPTIMIZERS",
           "OptimizerSpec", "make_optimizer", "optimizer_options", "buffered", "has_buffer", "__version__"]
