"""Compute kernels: linear layers per precision backend and deferred weight gradients.

Imports torch and triton only; knows nothing of MPI or models.
"""

from kernels.linear import BACKENDS, linear
from kernels.wgrad import capture_weight_grads

__all__ = ["BACKENDS", "linear", "capture_weight_grads"]
