"""The working memory of one step's walk over the action list: what is in flight between actions.

Keys are ``(dir, mb, chunk)`` of the action that produced or will consume an entry, except where
noted. A fresh :class:`StepState` per step: nothing leaks from one step into the next, and
:meth:`StepState.leftovers` names whatever the schedule left undone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["StepState"]


@dataclass(slots=True)
class StepState:
    """Everything a step's actions hand to each other."""

    step: int
    """Optimizer step being walked."""
    recvs: dict[tuple, tuple] = field(default_factory=dict)
    """``(kind, dir, mb, chunk)`` -> (channel, operation) of a posted receive not yet consumed."""
    held: dict[tuple, list] = field(default_factory=dict)
    """Received buffers a microbatch still reads (its graph or deferred W): back to their rings at its last B/W."""
    inputs: dict[tuple, torch.Tensor] = field(default_factory=dict)
    """Input leaf of a forward (``[micro_batch, seq, hidden]``), whose ``.grad`` the backward fills."""
    graph: dict[tuple, tuple] = field(default_factory=dict)
    """(roots, grads) a forward leaves for its backward."""
    acts: dict[tuple, torch.Tensor] = field(default_factory=dict)
    """A forward's output ``[micro_batch, seq, hidden]`` waiting for its Send or local hand-off."""
    grads: dict[tuple, torch.Tensor] = field(default_factory=dict)
    """A backward's input gradient ``[micro_batch, seq, hidden]`` waiting for its Send or hand-off."""
    wgrads: dict[tuple, list] = field(default_factory=dict)
    """Deferred weight-gradient closures of a split B, run by its W."""
    losses: dict[int, float] = field(default_factory=dict)
    """Global microbatch -> loss, on the rank holding the last stage."""
    bad_losses: dict[int, float] = field(default_factory=dict)
    """The non-finite ones among ``losses``."""
    logits: dict[int, torch.Tensor] = field(default_factory=dict)
    """Forward-only steps: global microbatch -> last stage's output."""
    compute_ns: int = 0
    """Time spent inside F/B/W computations."""
    batches: dict[int, tuple] = field(default_factory=dict)
    """Global microbatch -> (tokens, targets) ``[micro_batch, seq]`` drawn this step, kept for the
    whole step: the first and the last stage on one rank (DualPipeV's rank 0) read the same draw,
    and draws made ahead while the rank waited for a message wait here for their F."""
    num_drawn: int = 0
    """How many of the walker's planned draws (its stage-0 and last-stage F's, in action order) are
    in ``batches`` or were used."""

    def leftovers(self) -> list:
        """Keys of work the schedule left undone (empty after a complete step)."""
        return [k for d in (self.recvs, self.inputs, self.graph, self.wgrads, self.held) for k in d]
