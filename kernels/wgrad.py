"""Deferred weight gradients: the W half of a zero-bubble backward.

A pipeline schedule splits a chunk's backward into B (gradients for the chunk's inputs, needed at
once by the previous stage) and W (gradients for its weights, needed only at the optimizer step).
Linear layers of this package check :func:`deferring` in their autograd ``backward``: when a
:func:`capture_weight_grads` block is active they hand back no weight gradient and append a
closure that computes it later, so the B pass skips the weight GEMMs. Running the closures (the W
action) accumulates into ``param.grad`` exactly as an undeferred backward would, with the same
kernels on the same tensors, so results are bit-identical.

This works with any custom ``torch.autograd.Function`` (the FP8 linear is one), which hook-based
splitting on ``nn.Linear`` does not.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

import torch

__all__ = ["capture_weight_grads", "deferring", "defer", "accumulate_grad"]

_state = threading.local()


def deferring() -> bool:
    """True inside a :func:`capture_weight_grads` block on this thread."""
    return getattr(_state, "pending", None) is not None


def defer(fn: Callable[[], None]) -> None:
    """Queue ``fn`` (computes and accumulates one weight gradient) on the active capture."""
    pending = getattr(_state, "pending", None)
    assert pending is not None, "defer() called outside capture_weight_grads()"

    def run() -> None:
        # Backward runs with grad mode off; the deferred part must too, or the saved inputs
        # (which require grad) would build a graph and make param.grad require grad.
        with torch.no_grad():
            fn()

    pending.append(run)


def accumulate_grad(param: torch.Tensor, grad: torch.Tensor) -> None:
    """Add ``grad`` into ``param.grad`` the way autograd's accumulator does (first write stores)."""
    if param.grad is None:
        param.grad = grad.to(param.dtype)
    else:
        param.grad.add_(grad.to(param.dtype))


@contextlib.contextmanager
def capture_weight_grads() -> Iterator[list[Callable[[], None]]]:
    """Collect the weight-gradient work of backward passes run inside the block.

    Yields a list that fills with closures; call each of them (in order) to do the W part::

        with capture_weight_grads() as pending:
            torch.autograd.backward(outputs, grads)   # B: input grads only
        ...
        for fn in pending:                              # W, later
            fn()
    """
    if deferring():
        raise RuntimeError("capture_weight_grads() blocks cannot nest")
    pending: list[Callable[[], None]] = []
    _state.pending = pending
    try:
        yield pending
    finally:
        _state.pending = None
