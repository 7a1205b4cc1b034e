"""How a pipeline rank runs its model chunks' forward and backward and combines its gradients with
the ranks that share its stage: the part of a step that changes with the parallel layout.

:class:`~actors.pipeline.StageActor` walks the schedule and calls an executor for the compute of
each action and at the step end. :class:`LocalExecutor` is the plain case (each stage on one rank:
one autograd graph per chunk, nothing to combine); :class:`actors.ep_stage.EPExecutor` runs the
chunks expert-parallel over the stage's ep group.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

import torch

from actors.fb_overlap import Steps, drive
from actors.model import Stage
from actors.optim import grad_sq_sum

__all__ = ["ChunkExecutor", "LocalExecutor"]


class ChunkExecutor(Protocol):
    loss_scale: float
    """Factor on this rank's loss (1 / ranks sharing a microbatch's rows)."""

    def forward_steps(self, chunk: int, key: object, x: torch.Tensor) -> Steps:
        """Chunk ``chunk``'s forward of microbatch ``key`` as steps (actors/fb_overlap.py), returning
        (output, balance loss)."""

    def backward_steps(self, chunk: int, key: object, roots: Sequence[torch.Tensor],
                       grads: Sequence[torch.Tensor | None]) -> Steps:
        """Its backward from ``roots`` / ``grads`` (the loss, or the output and its gradient), as steps."""

    def run(self, steps: Steps) -> object:
        """Run one action's steps alone; returns their result."""

    def run_pair(self, forward: Steps, backward: Steps, *, after_first: Callable[[], None]) -> None:
        """An FB action: a forward and a backward (``after_first`` once the forward is done)."""

    def sync_grads(self) -> None:
        """Combine gradients with the other ranks of the stage (after the mirror sum)."""

    def grad_sq_sum(self, chunks: Sequence[int]) -> torch.Tensor:
        """Σ‖grad‖² of ``chunks`` as this rank contributes to the global norm (float64 0-dim, on the CPU)."""

    def expert_loads(self, loads: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """Per chunk ``[moe_layers, experts]`` loads -> the loads of every rank routing for them."""

    def microbatch_losses(self, losses: torch.Tensor) -> torch.Tensor:
        """``[microbatches]`` this rank's losses -> the global microbatches' (first-stage rank 0 only)."""

    def step_stats(self) -> dict:
        """What the step log adds for this layout (empty: nothing)."""


class LocalExecutor:
    """Each chunk's forward and backward as one autograd graph on this rank."""

    loss_scale = 1.0

    def __init__(self, chunks: Mapping[int, Stage]):
        self.chunks = chunks

    def forward_steps(self, chunk: int, key: object, x: torch.Tensor) -> Steps:
        yield from ()  # no exchanges: steps that only compute
        return self.chunks[chunk](x)

    def backward_steps(self, chunk: int, key: object, roots, grads) -> Steps:
        yield from ()
        torch.autograd.backward(roots, grads)

    def run(self, steps: Steps) -> object:
        return drive(steps)

    def run_pair(self, forward: Steps, backward: Steps, *, after_first: Callable[[], None]) -> None:
        drive(forward)
        after_first()
        drive(backward)

    def sync_grads(self) -> None:
        """Nothing to combine: without expert parallelism a stage has one rank, which holds every
        gradient of its chunks (DualPipe's mirror sum is MirrorSync's, before this)."""

    def grad_sq_sum(self, chunks: Sequence[int]) -> torch.Tensor:
        return sum((grad_sq_sum(list(self.chunks[c].parameters())).cpu() for c in chunks),
                   torch.zeros((), dtype=torch.float64))

    def expert_loads(self, loads: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        return dict(loads)

    def microbatch_losses(self, losses: torch.Tensor) -> torch.Tensor:
        return losses

    def step_stats(self) -> dict:
        return {}
