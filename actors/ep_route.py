"""Token permutation of two-hop expert-parallel dispatch, per rank (pure: no MPI).

The same rules as :func:`topology.plan_dispatch` (which counts them for the whole group), seen from
one ep rank in each of its three roles:

* **source**: a token goes once to every node holding one of its slots, to the source's rail peer
  there (to itself on its own node): :func:`source_rows`;
* **forwarder**: the rows it received (its own node's share from every source whose rail peer it
  is) go once to every rank of its node holding one of their slots: :func:`fan_out`;
* **holder**: the slots of a received row that live on this rank, as local slot ids:
  :func:`local_slots`.

Combine and the backward pass reuse these index lists in reverse (sums with ``index_add_``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from topology.layout import EPGroup

__all__ = ["source_rows", "hop1_sources", "node_ranks", "fan_out", "local_slots"]


def source_rows(phys: torch.Tensor, group: EPGroup, me: int, slots_per_rank: int) -> list[torch.Tensor]:
    """phys: ``[tokens, top_k]`` physical slots of ep rank ``me``'s tokens. Returns, per node of the
    group (in ``group.node_ids`` order), the ascending indices of the tokens that go there."""
    node_of = torch.tensor(group.node_of, dtype=torch.int64)
    at_node = torch.zeros(phys.shape[0], group.num_nodes, dtype=torch.bool)
    if phys.numel():
        at_node[torch.arange(phys.shape[0])[:, None], node_of[phys // slots_per_rank]] = True
    return [at_node[:, k].nonzero().squeeze(1) for k in range(group.num_nodes)]


def hop1_sources(group: EPGroup, me: int) -> list[int]:
    """The ep ranks whose tokens for ``me``'s node arrive at ``me`` (itself included), ascending."""
    k = group.node_of[me]
    return [s for s in range(group.size) if group.rail[s][k] == me]


def node_ranks(group: EPGroup, me: int) -> list[int]:
    """The ep ranks on ``me``'s node, ascending (hop 2's peers)."""
    return [j for j in range(group.size) if group.node_of[j] == group.node_of[me]]


def fan_out(slots: torch.Tensor, holders: Sequence[int], slots_per_rank: int) -> list[torch.Tensor]:
    """slots: ``[rows, top_k]`` physical slots of the forwarder's rows (-1: not on this node).
    Returns per holder the ascending indices of the rows holding one of its slots."""
    rank = torch.where(slots >= 0, slots // slots_per_rank, -1)
    return [(rank == j).any(1).nonzero().squeeze(1) for j in holders]


def local_slots(slots: torch.Tensor, me: int, slots_per_rank: int) -> torch.Tensor:
    """``[rows, top_k]`` local slot ids (0 .. slots_per_rank-1) of the slots on rank ``me``, else -1."""
    mine = (slots >= 0) & (slots // slots_per_rank == me)
    return torch.where(mine, slots - me * slots_per_rank, -1)
