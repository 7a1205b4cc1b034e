"""Gradient synchronisation of one stage's expert-parallel group (one concern: after the backward,
before the norm and the optimizer).

The ep ranks of a stage hold the same replicated parameters (attention, dense layers, gates,
shared experts, norms, embedding / head) but computed their gradients on different tokens, and
each holds its own routed-expert slots, whose gradients already cover every token routed to them
(the holder computes them), but an expert with several replicas has its gradient split over them:

* replicated parameters: summed over the ep group (``Allreduce``), so every rank steps identically;
* expert slots: summed over the replicas of the same expert (one ``Allreduce`` of a ``[experts, ...]``
  buffer into which each rank adds its slots; skipped when no expert of a layer has a replica),
  every replica then takes its expert's sum;
* the squared gradient norm counts every parameter once: replicated ones on ep rank 0 only, an
  expert on the rank holding its lowest slot only, summed over the group;
* expert loads (the balancing bias's input) summed over every rank that routes for the layer, so
  the bias moves identically everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from mpi4py import MPI

from actors.ep_moe import EPMoE
from actors.optim import grad_sq_sum

__all__ = ["EPGradSync"]


def _allreduce(comm: MPI.Comm, t: torch.Tensor) -> None:
    assert t.is_contiguous() and t.device.type == "cpu"
    comm.Allreduce(MPI.IN_PLACE, t.numpy(), op=MPI.SUM)


class EPGradSync:
    """replicated: parameters every ep rank holds (their ``.grad`` must be set); experts: the
    EP MoE layers of this rank's chunks."""

    def __init__(self, comm: MPI.Comm, *, replicated: Sequence[torch.nn.Parameter], experts: Sequence[EPMoE]):
        self.comm = comm
        self.me = comm.Get_rank()
        self.replicated = list(replicated)
        self.experts = list(experts)
        # layers where some expert has several slots: only their slot gradients need summing (the
        # placement is fixed for the run, so this is decided once, not per step)
        self._replicated_experts = [ep for ep in self.experts if int(torch.bincount(ep.phy2log).max()) > 1]
        # the expert each slot serves is counted in the norm only by its lowest slot
        self._first = []
        for ep in self.experts:
            first = torch.full((ep.moe.c.num_routed_experts,), -1, dtype=torch.int64)
            slots = torch.arange(ep.phy2log.shape[0])
            first.scatter_reduce_(0, ep.phy2log, slots, reduce="amin", include_self=False)
            mine = slots[ep.me * ep.spr:(ep.me + 1) * ep.spr]
            self._first.append(first[ep.slot_experts] == mine)

    def sync(self) -> None:
        """Sum replicated gradients over the group and expert gradients over replicas (in place)."""
        if self.replicated:
            flat = torch.cat([p.grad.reshape(-1) for p in self.replicated])
            _allreduce(self.comm, flat)
            offset = 0
            for p in self.replicated:
                p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
                offset += p.numel()
        for ep in self._replicated_experts:
            for w in ep.experts_parameters():
                full = torch.zeros(ep.moe.c.num_routed_experts, *w.shape[1:], dtype=w.grad.dtype)
                full.index_add_(0, ep.slot_experts, w.grad)
                _allreduce(self.comm, full)
                w.grad.copy_(full[ep.slot_experts])

    def grad_sq_sum(self) -> torch.Tensor:
        """Σ‖grad‖² over the group's parameters, each counted once (float64, the same on every ep rank)."""
        total = grad_sq_sum(self.replicated) if self.me == 0 else torch.zeros((), dtype=torch.float64)
        for ep, first in zip(self.experts, self._first):
            for w in ep.experts_parameters():
                total = total + w.grad[first].to(torch.float64).square().sum()
        total = total.reshape(1).clone()
        _allreduce(self.comm, total)
        return total.reshape(())

    def sum_loads(self, load: torch.Tensor) -> torch.Tensor:
        """load: ``[moe_layers, experts]`` this rank's routed token slots -> the group's sum."""
        out = load.to(torch.float64).contiguous().clone()
        _allreduce(self.comm, out)
        return out
