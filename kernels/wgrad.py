"""Deferred weight gradients: the W half of a zero-bubble backward.

A pipeline schedule splits a chunk's backward into B (gradients for the chunk's inputs, needed at
once by the previous stage) and W (gradients for its weights, needed only at the optimizer step).
A :class:`WeightGradDeferral` owns a set of parameters; while its :meth:`~WeightGradDeferral.capture`
block is open, the linear layers of this package hand back no gradient for those weights and
append a closure that computes it later, so the B pass skips the weight GEMMs. Running the
closures (the W action) accumulates into ``param.grad`` exactly as an undeferred backward would,
with the same kernels on the same tensors, so results are bit-identical.

Why the state lives on the deferral object, found through the weight: autograd runs a backward
on the thread of the device it computes on (CUDA: one thread per device), not on the thread that
called ``backward()``. A thread-local "capturing" flag set by the caller is invisible there, and
the weight gradients would silently be computed in B. The layers reach the deferral through the
weight tensor they differentiate (an attribute the deferral sets on each of its parameters), so
the decision no longer depends on which thread runs the backward. One deferral per actor (per
set of parameters), no module-level state.

This works with any custom ``torch.autograd.Function`` (the FP8 linear is one), which hook-based
splitting on ``nn.Linear`` does not.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

import torch

__all__ = ["WeightGradDeferral", "pending_weight_grads", "deferred", "accumulate_grad"]

# The attribute a deferral sets on each parameter it owns.
_OWNER = "_heteropipe_wgrad_deferral"


class WeightGradDeferral:
    """Defers the weight gradients of ``params`` while a :meth:`capture` block is open.

    Usage (one per actor, for the parameters of its model chunks)::

        deferral = WeightGradDeferral(model.parameters())
        with deferral.capture() as pending:
            torch.autograd.backward(outputs, grads)   # B: input grads only (any thread)
        ...
        for fn in pending:                              # W, later
            fn()

    A parameter belongs to at most one deferral; :meth:`close` releases them.
    """

    __slots__ = ("_params", "_pending")

    def __init__(self, params: Iterable[torch.Tensor]):
        self._params = list(params)
        self._pending: list[Callable[[], None]] | None = None
        for p in self._params:
            owner = getattr(p, _OWNER, None)
            if owner is not None and owner is not self:
                raise ValueError(f"a parameter of shape {tuple(p.shape)} already belongs to another "
                                 f"WeightGradDeferral: close() that one first")
            setattr(p, _OWNER, self)

    @contextlib.contextmanager
    def capture(self) -> Iterator[list[Callable[[], None]]]:
        """Collect the weight-gradient work of backward passes run inside the block, on any thread.

        Yields the list that fills with closures; call each of them, in order, to do the W part.
        """
        if self._pending is not None:
            raise RuntimeError("WeightGradDeferral.capture() blocks cannot nest")
        pending: list[Callable[[], None]] = []
        self._pending = pending
        try:
            yield pending
        finally:
            self._pending = None

    def close(self) -> None:
        """Release the parameters: their weight gradients are computed immediately again."""
        for p in self._params:
            if getattr(p, _OWNER, None) is self:
                delattr(p, _OWNER)
        self._params = []


def pending_weight_grads(weight: torch.Tensor) -> list[Callable[[], None]] | None:
    """The open capture's list if ``weight``'s gradient is being deferred now, else None."""
    owner = getattr(weight, _OWNER, None)
    return None if owner is None else owner._pending


def deferred(fn: Callable[[], None]) -> Callable[[], None]:
    """Wrap ``fn`` (computes and accumulates one weight gradient) to run outside autograd."""

    def run() -> None:
        # Backward runs with grad mode off; the deferred part must too, or the saved inputs
        # (which require grad) would build a graph and make param.grad require grad.
        with torch.no_grad():
            fn()

    return run


def accumulate_grad(param: torch.Tensor, grad: torch.Tensor) -> None:
    """Add ``grad`` into ``param.grad`` the way autograd's accumulator does (first write stores)."""
    if param.grad is None:
        param.grad = grad.to(param.dtype)
    else:
        param.grad.add_(grad.to(param.dtype))
