"""Predicted expert-parallel traffic of one microbatch: routing sampled, replicas chosen, two-hop plan
priced per link class (what ``launch.topology`` prints, and what a full-scale planner reuses).

Routing is *balanced random*: every token's affinities are independent uniform scores, so with
no node limit its ``top_k`` experts are a uniform random subset. With groups = nodes the expected
number of nodes a token reaches is then ``G * (1 - C(E - E/G, K) / C(E, K))``
(:func:`expected_nodes_per_token`; 5.29 for V3's 256 experts, 8 nodes, top-8).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from topology.cluster import Cluster
from topology.cost import HopCost, compute_seconds, hop_cost
from topology.dispatch import plan_dispatch, token_bytes
from topology.layout import EPGroup
from topology.placement import choose_replicas
from topology.routing import select_experts

__all__ = ["expected_nodes_per_token", "TrafficPrediction", "predict_traffic"]


def expected_nodes_per_token(num_experts: int, num_groups: int, top_k: int) -> float:
    """Mean distinct groups among ``top_k`` experts drawn uniformly without replacement."""
    per = num_experts // num_groups
    return num_groups * (1 - math.comb(num_experts - per, top_k) / math.comb(num_experts, top_k))


@dataclass(frozen=True, slots=True)
class TrafficPrediction:
    """One microbatch's dispatch and combine over one EP group."""

    topk_groups: int
    """Groups a token may reach (M; = num_groups means no node limit)."""
    mean_nodes_per_token: float
    """Average destination nodes per token, sampled."""
    max_nodes_per_token: int
    """Most nodes any sampled token reached."""
    link_bytes: dict[str, int]
    """Exact bytes per link class and direction (``DispatchPlan.link_bytes``)."""
    dispatch: tuple[HopCost, HopCost]
    """(inter-node hop, intra-node hop) of the dispatch."""
    combine: tuple[HopCost, HopCost]
    """(inter-node hop, intra-node hop) of the combine."""
    expert_seconds: float
    """Forward expert GEMM time of the slowest device (3 matrices of hidden x moe_hidden per slot)."""


def predict_traffic(cluster: Cluster, group: EPGroup, *, phy2log: torch.Tensor, log2phy: torch.Tensor,
                    logcnt: torch.Tensor, num_groups: int, topk_groups: int, top_k: int, tokens_per_rank: int,
                    hidden: int, moe_hidden: int, dispatch_dtype: str = "fp8", combine_dtype: str = "bf16",
                    seed: int = 0) -> TrafficPrediction:
    """Sample ``tokens_per_rank`` tokens on every ep rank of ``group``, route them (balanced random,
    at most ``topk_groups`` groups), pick their replicas with the placement's rule and price the plan.

    phy2log [num_replicas], log2phy [experts, max_replicas], logcnt [experts]: one layer's placement
    over the group's ranks (slot p on ep rank ``p // (num_replicas // group.size)``).
    """
    sizes = {cluster.nodes[n].num_devices for n in group.node_ids}
    counts = [group.node_of.count(k) for k in range(group.num_nodes)]
    if len(set(counts)) != 1:
        raise ValueError(f"EP group on nodes {list(group.node_ids)} has {counts} ranks per node: expert placement "
                         f"needs the same count on every node of a group (choose ep to cover whole equal nodes; "
                         f"node sizes {sorted(sizes)})")
    num_experts = logcnt.shape[0]
    gen = torch.Generator().manual_seed(seed)
    indices = [select_experts(torch.rand(tokens_per_rank, num_experts, generator=gen), None, num_groups=num_groups,
                              topk_groups=topk_groups, top_k=top_k, route_scale=1.0)[1]
               for _ in range(group.size)]
    # one call for all tokens: the replica rule balances a layer's tokens over its replicas
    phys = choose_replicas(torch.cat(indices), phy2log, log2phy, logcnt, num_groups=num_groups,
                           num_nodes=group.num_nodes, num_devices=group.size).split(tokens_per_rank)
    dbytes, cbytes = token_bytes(hidden, dispatch_dtype), token_bytes(hidden, combine_dtype)
    plan = plan_dispatch(phys, group, slots_per_rank=phy2log.shape[0] // group.size, dispatch_token_bytes=dbytes,
                         combine_token_bytes=cbytes)
    nodes = plan.nodes_per_token()
    speed = np.array([cluster.speed(group.node_ids[k]) for k in group.node_of])
    return TrafficPrediction(
        topk_groups=topk_groups, mean_nodes_per_token=float(nodes.mean()), max_nodes_per_token=int(nodes.max()),
        link_bytes=plan.link_bytes(),
        dispatch=(hop_cost(plan.hop1, dbytes, cluster.inter), hop_cost(plan.hop2, dbytes, cluster.intra)),
        combine=(hop_cost(plan.combine_hop1, cbytes, cluster.inter),
                 hop_cost(plan.combine_hop2, cbytes, cluster.intra)),
        expert_seconds=compute_seconds(plan.expert_slots * 6.0 * hidden * moe_hidden, speed))
