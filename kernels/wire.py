"""Token rows quantized for the wire: the 1x128 FP8 tiles an FP8 GEMM reads, made by the sender.

Expert-parallel dispatch to an FP8 rank sends E4M3 values plus their 1x128 scales (V3: dispatch
in FP8); the receiver feeds them to :func:`kernels.grouped_linear` as received (its ``x_fp8``).
The sender may be a rank without FP8 GEMMs (a BF16 device sending to an FP8 one), so the
quantizer falls back to the pure-torch reference wherever the Triton kernels cannot run; both
give the same bits (``tests/test_kernels_triton.py``), so the receiver cannot tell who made them.
"""

from __future__ import annotations

from types import ModuleType

import torch

from kernels import reference
from kernels.backend import fp8_impl

__all__ = ["quantize_tokens", "dequantize_tokens"]


def _ops(device: torch.device) -> ModuleType:
    try:
        impl = fp8_impl(device)
    except ValueError:  # no FP8 GEMM on this device: quantizing is plain arithmetic, the reference does it
        impl = "reference"
    if impl == "triton":
        from kernels import triton_ops

        return triton_ops
    return reference


def quantize_tokens(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x[tokens, hidden]`` -> ``(q[tokens, hidden] e4m3, s[tokens, ceil(hidden/128)] float32)``: one
    scale per token and 128 channels, the layout of the FP8 GEMM's left operand."""
    return _ops(x.device).quant_act_1x128(x)


def dequantize_tokens(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``q * s`` as float32 ``[tokens, hidden]``: what the FP8 GEMM computes with (the autograd leaf of
    received FP8 rows, and the source of the weight gradient's 128x1 tiles)."""
    return _ops(q.device).dequant_act_1x128(q, s, torch.float32)
