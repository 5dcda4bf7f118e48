"""cl_cm: Adam with Critical Momenta and its baselines, for continual learning.

``from cl_cm import AdamCM, AdamCG, SAM``
"""
from .adam_cg import AdamCG, adam_cg
from .adam_cm import AdamCM, adam_cm
from .buffer import CriticalBufferOptimizer
from .sam import SAM

__version__ = "0.1.0"

__all__ = ["AdamCM", "AdamCG", "SAM", "CriticalBufferOptimizer", "adam_cm", "adam_cg", "__version__"]
