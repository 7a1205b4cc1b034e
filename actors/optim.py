"""AdamW on float32 master weights with gradient clipping by a norm computed across all ranks.

The model's parameters are the float32 master weights (the bf16/fp8 backends cast copies inside
the GEMMs), so AdamW runs on them directly; it is :class:`torch.optim.AdamW` with ``fused=True``
(one fused kernel per parameter: about 3x faster than the per-op path on CPU, and element-wise, so
a parameter's update does not depend on which other parameters share its rank)
and a learning rate set every step from a linear warm-up. Clipping needs the norm of the *whole*
model's gradient: the caller computes it (sum of :func:`grad_sq_sum` over ranks) and passes it to
:meth:`AdamW.step`, so every rank scales by the same factor.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["OptimConfig", "AdamW", "grad_sq_sum"]


@dataclass(kw_only=True, slots=True)
class OptimConfig:
    """AdamW and clipping settings."""

    lr: float = 3e-3
    """Peak learning rate (reached after ``warmup_steps``, then constant)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """Adam's moment decay rates (V3: 0.9, 0.95)."""
    eps: float = 1e-8
    """Adam's denominator epsilon."""
    weight_decay: float = 0.1
    """Decoupled weight decay on matrices (embedding, projections, experts, head); none on norms."""
    grad_clip: float = 1.0
    """Scale gradients so that their global L2 norm is at most this (0 disables clipping)."""
    warmup_steps: int = 5
    """Steps of linear learning-rate warm-up from lr/warmup_steps."""

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"optim.lr={self.lr!r}: must be > 0")
        self.betas = tuple(self.betas)
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.betas={self.betas!r}: need two values in [0, 1)")
        if not self.eps > 0:
            raise ValueError(f"optim.eps={self.eps!r}: must be > 0")
        if self.weight_decay < 0:
            raise ValueError(f"optim.weight_decay={self.weight_decay!r}: must be >= 0")
        if self.grad_clip < 0:
            raise ValueError(f"optim.grad_clip={self.grad_clip!r}: must be >= 0 (0 disables clipping)")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps={self.warmup_steps!r}: must be a non-negative integer")


def grad_sq_sum(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σ‖grad‖² over ``params`` in float64 (0-dim), summed in the given order; missing grads count 0."""
    total = torch.zeros((), dtype=torch.float64, device=params[0].device if params else None)
    for p in params:
        if p.grad is not None:
            total += p.grad.to(torch.float64).square().sum()
    return total


class AdamW:
    """AdamW over ``params`` with warm-up and externally supplied global-norm clipping."""

    def __init__(self, params: Sequence[torch.nn.Parameter], config: OptimConfig):
        self.config = config
        params = list(params)
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        self._opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr, betas=config.betas,
                                      eps=config.eps, fused=True)
        self.params = params
        self.num_steps = 0

    def state_dict(self) -> dict:
        """Everything :meth:`step` depends on besides the parameters: moments, step counts."""
        return {"torch": self._opt.state_dict(), "num_steps": self.num_steps}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` (same parameters in the same order)."""
        self._opt.load_state_dict(state["torch"])
        self.num_steps = int(state["num_steps"])

    def lr_at(self, step: int) -> float:
        """Learning rate of optimizer step ``step`` (0-based)."""
        w = self.config.warmup_steps
        return self.config.lr * min(1.0, (step + 1) / w) if w else self.config.lr

    def clip_coef(self, global_norm: float) -> float:
        """The factor gradients are scaled by: min(1, grad_clip / (norm + 1e-6)); 1 when disabled."""
        clip = self.config.grad_clip
        return min(1.0, clip / (global_norm + 1e-6)) if clip > 0 else 1.0

    @torch.no_grad()
    def step(self, global_norm: float) -> None:
        """Clip by ``global_norm`` (the whole model's gradient norm), then one AdamW update."""
        coef = self.clip_coef(global_norm)
        if coef < 1.0:
            for p in self.params:
                if p.grad is not None:
                    p.grad.mul_(coef)
        lr = self.lr_at(self.num_steps)
        for group in self._opt.param_groups:
            group["lr"] = lr
        self._opt.step()
        # The fused kernel writes the parameters without bumping their autograd version, which
        # is what invalidates the FP8 weight copies (kernels.fp8_weights): bump it here.
        torch.autograd.graph.increment_version(self.params)
        self.num_steps += 1
