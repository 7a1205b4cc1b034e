"""Autograd linear layer ``y = x Wᵀ (+ b)`` with per-backend GEMMs and deferrable weight grads.

Backends:
- ``"fp32"``: float32 GEMMs (torch.matmul) — the exact path the pipeline tests compare bit for bit.

The weight gradient is deferred (see :mod:`kernels.wgrad`) when a capture block is active; the
bias gradient is not (it is a cheap reduction and needs no GEMM).
"""

from __future__ import annotations

import torch

from kernels.wgrad import accumulate_grad, defer, deferring

__all__ = ["linear", "BACKENDS"]

BACKENDS = ("fp32",)


class _LinearFP32(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        y = torch.matmul(x, weight.t())
        return y + bias if bias is not None else y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_x = torch.matmul(grad_y, weight) if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            x2 = x.reshape(-1, x.shape[-1])
            g2 = grad_y.reshape(-1, grad_y.shape[-1])
            if deferring():
                defer(lambda: accumulate_grad(weight, torch.matmul(g2.t(), x2)))
            else:
                grad_w = torch.matmul(g2.t(), x2)
        grad_b = None
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_y.reshape(-1, grad_y.shape[-1]).sum(0)
        return grad_x, grad_w, grad_b


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, backend: str = "fp32"
) -> torch.Tensor:
    """``x [..., in] @ weight[out, in]ᵀ (+ bias[out]) -> [..., out]`` on the chosen backend."""
    if backend == "fp32":
        return _LinearFP32.apply(x, weight, bias)
    raise ValueError(f"linear: backend={backend!r} is not one of {BACKENDS}")
