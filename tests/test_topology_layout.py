"""topology.layout: the V3 layout, rail peers, uneven nodes, refusals with the count needed."""

from __future__ import annotations

import pytest

from topology import Cluster, Layout, Node, emulated_cluster


def test_deepseek_v3_layout():
    # 2,048 H800 on 256 nodes; PP16 -> 128 ranks per stage -> two EP64 groups of 8 nodes each
    lay = Layout(cluster=emulated_cluster(256, 8), pp=16, ep=64)
    assert (lay.num_ranks, lay.dp, lay.num_ep_groups) == (2048, 128, 2)
    for r in (0, 63, 64, 1000, 2047):
        p = lay.place(r)
        assert (p.pp, p.dp, p.ep_group, p.ep) == (r // 128, r % 128, r % 128 // 64, r % 64)
        assert (p.node, p.local, p.rail) == (r // 8, r % 8, r % 8)
        g = lay.ep_group(r)
        first_node = r // 64 * 8
        assert g.node_ids == tuple(range(first_node, first_node + 8))  # 8 nodes per EP group
        assert list(g.ranks) == [r - r % 64 + e for e in range(64)]  # node-major: ep e on node e // 8
        # rail peers: same local index on the 7 other nodes of the group
        assert lay.rail_peers(r) == {n: n * 8 + r % 8 for n in g.node_ids if n != r // 8}
    assert lay.groups("pp")[5] == [5 + 128 * s for s in range(16)]
    assert lay.groups("edp")[0] == [0, 64]
    for axis in ("pp", "dp", "ep", "edp"):  # each axis partitions the ranks
        assert sorted(r for g in lay.groups(axis) for r in g) == list(range(2048))


def test_uneven_nodes_rail_mapping():
    c = Cluster(nodes=(Node(name="a", num_devices=8, kind="h800"), Node(name="b", num_devices=4, kind="ascend910c"),
                       Node(name="c", num_devices=8, kind="h800")))
    lay = Layout(cluster=c, ep=20)
    assert [lay.place(r).node for r in range(20)] == [0] * 8 + [1] * 4 + [2] * 8
    assert lay.place(9).kind == "ascend910c" and lay.place(9).local == 1
    g = lay.ep_group(0)
    for e in range(20):
        peers = lay.rail_peers(e)
        assert set(peers) == {0, 1, 2} - {lay.place(e).node}  # one peer on every other node
        pos = lay.place(e).rail
        for n, q in peers.items():
            count = c.nodes[n].num_devices
            assert lay.place(q).node == n and lay.place(q).rail == pos % count  # position mod the node's count
        assert g.rail[e][g.node_of[e]] == e  # own node: itself
    assert lay.rail_peers(6) == {1: 10, 2: 18} and lay.rail_peers(10) == {0: 2, 2: 14}


def test_group_starting_mid_node():
    lay = Layout(cluster=emulated_cluster(2, 6), ep=4, dp=12)  # groups: 0-3 | 4-7 (node0: 4,5; node1: 6,7) | 8-11
    assert [lay.place(r).rail for r in range(4, 8)] == [0, 1, 0, 1]
    assert lay.rail_peers(4) == {1: 6} and lay.rail_peers(7) == {0: 5} and lay.rail_peers(0) == {}
    g = lay.ep_group(5)
    assert g.ranks == (4, 5, 6, 7) and g.node_of == (0, 0, 1, 1) and g.rail[1] == (1, 3)


def test_refusals_name_the_count():
    c = emulated_cluster(4, 8)
    with pytest.raises(ValueError, match="needs 64 devices; the cluster has 32.*add 32 devices"):
        Layout(cluster=c, pp=2, dp=32, ep=32)
    with pytest.raises(ValueError, match=r"layout.ep=3: must divide dp=32.*\[1, 2, 4, 8, 16, 32\]"):
        Layout(cluster=c, ep=3)
    with pytest.raises(ValueError, match="layout.pp=3: does not divide the cluster's 32 devices"):
        Layout(cluster=c, pp=3)
    with pytest.raises(ValueError, match="layout.pp=0"):
        Layout(cluster=c, pp=0)
    with pytest.raises(ValueError, match="rank=32"):
        Layout(cluster=c).place(32)
    with pytest.raises(ValueError, match="axis='tp'"):
        Layout(cluster=c).groups("tp")
