"""Two-hop dispatch / combine plans for one expert-parallel group (pure; DeepSeek-V3 section 3.2.2).

Dispatch: a token travels once per destination node. Hop 1 crosses the inter-node link from its
source rank to the source's rail peer on the destination node (:class:`topology.EPGroup`); hop 2
fans it out over the intra-node link to the ranks there that hold its experts, once per (token,
destination rank) however many of its experts that rank holds. On the source's own node hop 1 is
skipped and the source fans out itself. A hop whose sender is also the receiver moves nothing.
Combine is the reverse: each holder sums its experts' weighted outputs for the token and sends one
vector back to the forwarder (hop 2 reversed), the forwarder sums the node's vectors and sends one
back over the inter-node link (hop 1 reversed) — so combine also crosses once per (token, node).

Input is the physical expert slots each token uses (``phys``; which replica serves which token is
the placement's rule, :func:`topology.placement.choose_replicas`), so the plan does not depend on
that rule. Slot ``p`` lives on ep rank ``p // slots_per_rank`` (EPLB's convention).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from topology.layout import EPGroup

__all__ = ["TOKEN_DTYPES", "token_bytes", "DispatchPlan", "plan_dispatch"]

TOKEN_DTYPES = ("fp8", "bf16", "fp32")
"""Wire formats of one token's hidden vector."""


def token_bytes(hidden: int, dtype: str) -> int:
    """Bytes of one token on the wire. ``fp8``: E4M3 values plus one float32 scale per 128 channels
    (V3's 1x128 activation tiles; V3 dispatches in FP8 and combines in BF16)."""
    if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
        raise ValueError(f"hidden={hidden!r}: must be a positive integer")
    if dtype == "fp8":
        return hidden + 4 * math.ceil(hidden / 128)
    if dtype == "bf16":
        return 2 * hidden
    if dtype == "fp32":
        return 4 * hidden
    raise ValueError(f"dtype={dtype!r}: must be one of {TOKEN_DTYPES}")


@dataclass(frozen=True, slots=True)
class DispatchPlan:
    """Token counts of one dispatch over an EP group (combine moves the same tokens backwards)."""

    token_nodes: tuple[np.ndarray, ...]
    """Per source ep rank: ``[tokens, group_nodes]`` bool, the nodes each token is sent to."""
    hop1: np.ndarray
    """``[ep, ep]`` tokens sent over the inter-node link, source -> its rail peer (zero diagonal)."""
    hop2: np.ndarray
    """``[ep, ep]`` tokens forwarder -> holder inside a node; the diagonal is local (no transfer)."""
    expert_slots: np.ndarray
    """``[ep]`` (token, expert) pairs each rank computes (its expert GEMM rows)."""
    dispatch_token_bytes: int
    """Bytes per token on the way out."""
    combine_token_bytes: int
    """Bytes per token on the way back."""

    @property
    def combine_hop1(self) -> np.ndarray:
        """``[ep, ep]`` combine tokens over the inter-node link (rail peer -> source)."""
        return self.hop1.T

    @property
    def combine_hop2(self) -> np.ndarray:
        """``[ep, ep]`` combine tokens inside a node (holder -> forwarder); diagonal local."""
        return self.hop2.T

    def nodes_per_token(self) -> np.ndarray:
        """``[all tokens]`` destination nodes of every token, sources concatenated."""
        return np.concatenate([m.sum(1) for m in self.token_nodes])

    def link_bytes(self) -> dict[str, int]:
        """Exact bytes per link class and direction: ``inter``/``intra`` x ``dispatch``/``combine``."""
        inter = int(self.hop1.sum())
        intra = int(self.hop2.sum() - np.trace(self.hop2))
        d, c = self.dispatch_token_bytes, self.combine_token_bytes
        return {"dispatch_inter": inter * d, "dispatch_intra": intra * d,
                "combine_inter": inter * c, "combine_intra": intra * c}


def plan_dispatch(phys: Sequence[torch.Tensor | np.ndarray], group: EPGroup, *, slots_per_rank: int,
                  dispatch_token_bytes: int, combine_token_bytes: int) -> DispatchPlan:
    """The two-hop plan for one microbatch.

    phys: one ``[tokens, top_k]`` array of physical slots per source ep rank (``group.size`` of them).
    """
    ep, num_nodes = group.size, group.num_nodes
    if len(phys) != ep:
        raise ValueError(f"phys: {len(phys)} source arrays; expected one per ep rank ({ep})")
    if slots_per_rank < 1:
        raise ValueError(f"slots_per_rank={slots_per_rank}: must be positive")
    node_of = np.asarray(group.node_of)
    rail = np.asarray(group.rail)  # [ep, group_nodes]
    hop1 = np.zeros((ep, ep), dtype=np.int64)
    hop2 = np.zeros((ep, ep), dtype=np.int64)
    expert_slots = np.zeros(ep, dtype=np.int64)
    token_nodes = []
    for src, p in enumerate(phys):
        p = np.asarray(p.cpu() if isinstance(p, torch.Tensor) else p, dtype=np.int64)
        if p.ndim != 2 or (p.size and (p.min() < 0 or p.max() >= ep * slots_per_rank)):
            raise ValueError(f"phys[{src}]: must be [tokens, top_k] slots in 0..{ep * slots_per_rank - 1}")
        dest = p // slots_per_rank  # [tokens, top_k] ep rank holding each slot
        expert_slots += np.bincount(dest.ravel(), minlength=ep)
        rows = np.arange(p.shape[0])[:, None]
        at_rank = np.zeros((p.shape[0], ep), dtype=bool)
        at_rank[rows, dest] = True  # once per (token, destination rank)
        at_node = np.zeros((p.shape[0], num_nodes), dtype=bool)
        at_node[rows, node_of[dest]] = True  # once per (token, destination node)
        token_nodes.append(at_node)
        per_node = at_node.sum(0)
        per_node[node_of[src]] = 0  # own node: no inter-node hop
        np.add.at(hop1[src], rail[src], per_node)
        # the forwarder on each destination rank's node is the source's rail peer (itself at home)
        np.add.at(hop2, (rail[src][node_of], np.arange(ep)), at_rank.sum(0))
    return DispatchPlan(token_nodes=tuple(token_nodes), hop1=hop1, hop2=hop2, expert_slots=expert_slots,
                        dispatch_token_bytes=dispatch_token_bytes, combine_token_bytes=combine_token_bytes)
