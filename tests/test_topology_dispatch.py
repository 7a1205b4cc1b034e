"""topology.dispatch and topology.cost against brute-force counts over tokens."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from topology import Cluster, LinkClass, Layout, Node, emulated_cluster, select_experts
from topology.cost import REFERENCE_FLOPS, compute_seconds, hop_cost
from topology.dispatch import plan_dispatch, token_bytes


def _brute(phys, layout, group_rank0, slots_per_rank):
    """Walk every token: which nodes, which ranks, who forwards — from the layout's rail_peers."""
    ranks = layout.ep_group(group_rank0).ranks
    hop1, hop2 = Counter(), Counter()
    for src, p in enumerate(phys):
        g_src = ranks[src]
        for row in p.tolist():
            dest_ranks = {ranks[s // slots_per_rank] for s in row}
            for n in {layout.place(d).node for d in dest_ranks}:
                fwd = g_src if n == layout.place(g_src).node else layout.rail_peers(g_src)[n]
                if fwd != g_src:
                    hop1[src, fwd - ranks[0]] += 1
                for d in dest_ranks:
                    if layout.place(d).node == n:
                        hop2[fwd - ranks[0], d - ranks[0]] += 1
    return hop1, hop2


def _dense(counter, n):
    m = np.zeros((n, n), dtype=np.int64)
    for (a, b), v in counter.items():
        m[a, b] += v
    return m


CLUSTERS = [
    (emulated_cluster(4, 4), 16, 2),  # uniform: 4 nodes x 4, EP16, 2 slots per rank
    (Cluster(nodes=(Node(name="a", num_devices=4, kind="h800"), Node(name="b", num_devices=2, kind="h800"),
                    Node(name="c", num_devices=3, kind="h800"))), 9, 3),  # uneven nodes, rails mod count
]


@pytest.mark.parametrize("cluster,ep,spr", CLUSTERS)
def test_counts_and_bytes_equal_brute_force(cluster, ep, spr):
    layout = Layout(cluster=cluster, ep=ep)
    group = layout.ep_group(0)
    rng = np.random.default_rng(ep)
    phys = [rng.integers(0, ep * spr, size=(int(rng.integers(0, 60)), 4)) for _ in range(ep)]
    plan = plan_dispatch(phys, group, slots_per_rank=spr, dispatch_token_bytes=7, combine_token_bytes=11)
    h1, h2 = _brute(phys, layout, 0, spr)
    assert np.array_equal(plan.hop1, _dense(h1, ep)) and np.array_equal(plan.hop2, _dense(h2, ep))
    assert np.array_equal(plan.combine_hop1, plan.hop1.T)
    # hop-1 traffic from a source to a node = the (token, destination node) pairs for that node
    for src, p in enumerate(phys):
        for k, n in enumerate(group.node_ids):
            if n == layout.place(src).node:
                continue
            pairs = sum(any(layout.place(s // spr).node == n for s in row) for row in p.tolist())
            assert plan.hop1[src, group.rail[src][k]] == pairs
    inter = sum(h1.values())
    intra = sum(v for (a, b), v in h2.items() if a != b)
    assert plan.link_bytes() == {"dispatch_inter": 7 * inter, "dispatch_intra": 7 * intra,
                                 "combine_inter": 11 * inter, "combine_intra": 11 * intra}
    slots = Counter(s // spr for p in phys for s in p.ravel().tolist())
    assert plan.expert_slots.tolist() == [slots[e] for e in range(ep)]
    assert plan.nodes_per_token().tolist() == [len({layout.place(s // spr).node for s in row})
                                               for p in phys for row in p.tolist()]


def test_node_limited_routing_bounds_nodes_and_m1_stays_home():
    # 32 experts homed 4 per rank on 8 ranks over 4 nodes: groups = nodes, slots = experts
    layout = Layout(cluster=emulated_cluster(4, 2), ep=8)
    gen = torch.Generator().manual_seed(0)
    for m in (1, 2, 4):
        phys = [select_experts(torch.rand(200, 32, generator=gen), None, num_groups=4, topk_groups=m, top_k=4,
                               route_scale=1.0)[1] for _ in range(8)]
        plan = plan_dispatch(phys, layout.ep_group(0), slots_per_rank=4, dispatch_token_bytes=1, combine_token_bytes=1)
        assert plan.nodes_per_token().max() <= m
        if m == 1:  # one node per token: exactly one inter-node send per token that leaves its node
            sent_away = sum(int((np.asarray(p) // 8 != layout.place(s).node).any(1).sum()) for s, p in enumerate(phys))
            assert plan.hop1.sum() == sent_away


def test_token_bytes():
    assert token_bytes(7168, "fp8") == 7168 + 4 * 56 and token_bytes(7168, "bf16") == 14336
    with pytest.raises(ValueError, match="dtype='int4'"):
        token_bytes(8, "int4")


def test_hop_cost_and_compute():
    link = LinkClass(name="ib", bandwidth_gbs=50.0, latency_us=5.0)
    counts = np.array([[9, 3, 0], [1, 0, 2], [0, 0, 0]])  # diagonal ignored
    c = hop_cost(counts, 1000, link)
    # rank 0 sends 3000 B in 1 message; rank 2 receives 2000 in 1; rank 1 sends 3000 B in 2 messages
    assert (c.total_bytes, c.max_device_bytes, c.max_device_messages) == (6000, 3000, 2)
    assert c.seconds == pytest.approx(3000 / 50e9 + 2 * 5e-6)
    slowest = 4e11 / (0.25 * REFERENCE_FLOPS)  # the slow device, not the one with more work
    assert compute_seconds(np.array([8e11, 4e11]), np.array([1.0, 0.25])) == pytest.approx(slowest)
