"""The per-rank two-hop permutation (actors/ep_route.py), simulated without MPI for a whole EP group:
every (token, slot) pair must reach the rank holding the slot exactly once, and the token counts
per hop must equal topology.plan_dispatch's brute-force plan."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from actors import ep_route
from topology import Cluster, Layout, Node, emulated_cluster, plan_dispatch


def _simulate(group, phys, spr):
    """Move (source, token) ids along the routes; returns hop matrices and what each holder got."""
    ep = group.size
    hop1 = np.zeros((ep, ep), dtype=np.int64)
    hop2 = np.zeros((ep, ep), dtype=np.int64)
    inbox = {f: [] for f in range(ep)}  # forwarder -> rows (src, token, slots) from each source, in order
    for src in range(ep):
        for k, idx in enumerate(ep_route.source_rows(phys[src], group, src, spr)):
            peer = group.rail[src][k]
            if peer != src:
                hop1[src, peer] += len(idx)
            inbox[peer].append((src, idx, phys[src][idx]))
    held = {j: [] for j in range(ep)}
    for f in range(ep):
        srcs = [s for s, _, _ in inbox[f]]
        assert srcs == sorted(srcs) and srcs == ep_route.hop1_sources(group, f)
        ids = torch.cat([torch.stack([torch.full_like(i, s), i], 1) for s, i, _ in inbox[f]])
        slots = torch.cat([sl for _, _, sl in inbox[f]])
        holders = ep_route.node_ranks(group, f)
        for j, rows in zip(holders, ep_route.fan_out(slots, holders, spr)):
            hop2[f, j] += len(rows)
            held[j].append((ids[rows], ep_route.local_slots(slots[rows], j, spr)))
    return hop1, hop2, held


@pytest.mark.parametrize("cluster,ep", [(emulated_cluster(2, 2), 4), (emulated_cluster(2, 1), 2),
                                        (emulated_cluster(4, 2), 8),
                                        (Cluster(nodes=(Node(name="a", num_devices=2, kind="h800"),
                                                        Node(name="b", num_devices=1, kind="h800"))), 3)])
def test_two_hop_permutation_delivers_every_pair_once_and_matches_the_plan(cluster, ep):
    group = Layout(cluster=cluster, pp=1, ep=ep).ep_group(0)
    spr, top_k, tokens = 3, 4, 40
    gen = torch.Generator().manual_seed(ep)
    phys = [torch.stack([torch.randperm(ep * spr, generator=gen)[:top_k] for _ in range(tokens)]) for _ in range(ep)]
    hop1, hop2, held = _simulate(group, phys, spr)
    plan = plan_dispatch(phys, group, slots_per_rank=spr, dispatch_token_bytes=1, combine_token_bytes=1)
    assert (hop1 == plan.hop1).all() and (hop2 == plan.hop2).all()
    # brute force: the (source, token, slot) triples each holder computes are exactly its slots' pairs
    for j in range(ep):
        got = sorted((int(s), int(t), int(slot) + j * spr) for ids, local in held[j]
                     for (s, t), row in zip(ids, local) for slot in row if slot >= 0)
        want = sorted((s, t, int(p)) for s in range(ep) for t in range(tokens) for p in phys[s][t]
                      if int(p) // spr == j)
        assert got == want
        # a row reaches a holder once, however many of its slots the holder has
        rows = [tuple(r) for ids, _ in held[j] for r in ids.tolist()]
        assert len(rows) == len(set(rows))
