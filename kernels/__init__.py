"""Compute kernels: linear layers per precision backend and deferred weight gradients.

Imports torch (and, on NVIDIA GPUs, triton on first use); knows nothing of MPI or models and
configures no logging: callers log :func:`describe_backend` once at start-up.

- :func:`linear`, :func:`grouped_linear`: autograd layers on the ``"fp32"``, ``"bf16"`` or
  ``"fp8"`` backend (:data:`BACKENDS`), weight gradients deferrable with a
  :class:`WeightGradDeferral` (works whichever thread autograd runs the backward on).
- :func:`quantize_tokens`, :func:`dequantize_tokens`: 1x128 FP8 token rows for the wire
  (:mod:`kernels.wire`), fed to :func:`grouped_linear` as received (``x_fp8``).
- :func:`backend_for`, :func:`describe_backend`: per-device backend choice and its description.
- :mod:`kernels.scaled_mm`: cuBLASLt's blockwise FP8 GEMM where present and correct (probed),
  picked per shape against the Triton GEMM; :mod:`kernels.fp8_weights`: FP8 weight copies made
  once per optimizer step.
- :mod:`kernels.triton_ops` (Triton kernels) and :mod:`kernels.reference` (pure torch): FP8
  quantization, dequantization and GEMMs, BF16 GEMMs.
"""

from kernels.backend import BACKENDS, backend_for, describe_backend
from kernels.linear import grouped_linear, linear
from kernels.wgrad import WeightGradDeferral
from kernels.wire import dequantize_tokens, quantize_tokens

__all__ = ["BACKENDS", "linear", "grouped_linear", "backend_for", "describe_backend", "WeightGradDeferral",
           "quantize_tokens", "dequantize_tokens"]
