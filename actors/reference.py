"""The single-process reference a pipeline run is checked against.

It builds the *whole* model as one stage and trains it on the same microbatches in global order,
one after the other, with the same step math as :class:`~actors.pipeline.StageActor`: gradients
start at zero, each microbatch contributes ``(loss + aux) / M``, the gradient norm clips, AdamW
steps, and the gate biases move by the step's expert load. No MPI, no schedule: whatever the
pipeline does, its losses must equal these bit for bit and its gradients to ~1e-13.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from actors.data import TokenSource
from actors.model import ModelConfig, build_stage, loss_fn
from actors.optim import AdamW, OptimConfig, grad_sq_sum

__all__ = ["Reference", "ReferenceStep"]


@dataclass(slots=True)
class ReferenceStep:
    step: int
    losses: list[float]
    """Per-microbatch cross-entropy in microbatch order."""
    grad_norm: float


class Reference:
    """The full model in one process; ``train_step`` mirrors a pipeline step."""

    def __init__(self, *, model: ModelConfig, optim: OptimConfig, data: TokenSource, microbatches: int,
                 micro_batch: int, seed: int):
        self.model = build_stage(model, 0, 1, seed=seed)
        self.data, self.microbatches, self.micro_batch = data, microbatches, micro_batch
        self.params = list(self.model.parameters())
        self.optimizer = AdamW(self.params, optim)

    def named_grads(self) -> dict[str, torch.Tensor]:
        return {n: p.grad for n, p in self.model.named_parameters()}

    def train_step(self, step: int, *, inspect: Callable[[Reference], None] | None = None) -> ReferenceStep:
        """One optimizer step; ``inspect(self)`` runs after backward, before clipping and AdamW."""
        self.model.train()
        self.model.reset_expert_load()
        for p in self.params:
            p.grad = torch.zeros_like(p)
        scale = 1.0 / self.microbatches
        losses = []
        for mb in range(self.microbatches):
            tokens, targets = self.data.batch(step, mb, self.micro_batch)
            logits, aux = self.model(tokens)
            loss = loss_fn(logits, targets)
            losses.append(loss.item())
            total = loss * scale
            if aux.requires_grad:
                total = total + aux * scale
            total.backward()
        if inspect is not None:
            inspect(self)
        norm = float(grad_sq_sum(self.params).sqrt())
        self.optimizer.step(norm)
        self.model.update_gate_bias(self.model.expert_load())
        return ReferenceStep(step=step, losses=losses, grad_norm=norm)

    @torch.no_grad()
    def forward_step(self, step: int) -> dict[int, torch.Tensor]:
        """Inference on the step's microbatches: logits ``[micro_batch, seq, vocab]`` per microbatch."""
        self.model.eval()
        return {mb: self.model(self.data.batch(step, mb, self.micro_batch)[0])[0] for mb in range(self.microbatches)}
