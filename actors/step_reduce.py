"""Step-end reductions over the pipeline ranks: the global gradient norm (every rank clips with the
same number) and the per-microbatch losses on rank 0.

Both go over dynamic control messages on the pipeline communicator; rank 0 sums and orders, so the
result does not depend on arrival order.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from runtime.transport import Transport

__all__ = ["global_grad_norm", "LossGather"]

# Control channels between pipeline ranks (the schedule's tags are 0..3, actors.mirror_sync 16..18).
CH_NORM_UP, CH_NORM_DOWN, CH_LOSS = 19, 20, 21


def global_grad_norm(tp: Transport, local: torch.Tensor) -> float:
    """L2 norm from every rank's ``local`` Σ‖grad‖² (float64 0-dim): rank 0 sums in rank order and
    sends the root back, so every rank gets the same bits."""
    size = tp.comm.Get_size()
    if tp.rank == 0:
        hs = [tp.irecv(r, channel=CH_NORM_UP, shape=(), dtype=torch.float64) for r in range(1, size)]
        total = local.clone()
        for h in hs:
            total += tp.wait(h)
        norm = total.sqrt().reshape(())
        for r in range(1, size):
            tp.isend(r, norm, channel=CH_NORM_DOWN, kind="ctrl")
        return float(norm)
    tp.isend(0, local.reshape(()), channel=CH_NORM_UP, kind="ctrl")
    return float(tp.recv(0, channel=CH_NORM_DOWN, shape=(), dtype=torch.float64))


class LossGather:
    """Per-microbatch losses of one step onto rank 0, in global microbatch order.

    :meth:`start` right after the last action (the other ranks' losses then travel during the
    step's tail instead of after it), :meth:`finish` at the step end.
    """

    def __init__(self, tp: Transport, microbatches: int, combine: Callable[[torch.Tensor], torch.Tensor]):
        """``combine``: this rank's ``[microbatches]`` losses -> the global microbatches' (the
        executor's ``microbatch_losses``)."""
        self.tp, self.microbatches, self.combine = tp, microbatches, combine
        self._mine: torch.Tensor | None = None
        self._hs: list = []

    def start(self, losses: dict[int, float]) -> None:
        """``losses``: global microbatch -> loss, those this rank computed."""
        tp = self.tp
        self._mine = torch.tensor(sorted(losses.items()), dtype=torch.float64).reshape(-1, 2)
        if tp.rank != 0:
            tp.isend(0, self._mine, channel=CH_LOSS, kind="ctrl")
        else:
            self._hs = [tp.irecv(r, channel=CH_LOSS) for r in range(1, tp.comm.Get_size())]

    def finish(self) -> list[float]:
        """Rank 0: every microbatch's loss in global order; the other ranks: []."""
        assert self._mine is not None, "LossGather.finish before start"
        mine, self._mine = self._mine, None
        if self.tp.rank != 0:
            return []
        table = torch.cat([mine] + [self.tp.wait(h) for h in self._hs])
        self._hs = []
        order = table[:, 0].long()
        if sorted(order.tolist()) != list(range(self.microbatches)):
            raise RuntimeError(f"losses came back for microbatches {sorted(order.tolist())}, expected "
                               f"0..{self.microbatches - 1}")
        return self.combine(table[order.argsort(), 1]).tolist()
