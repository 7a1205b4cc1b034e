"""runtime.grid.build_communicators splits along the topology layout (fake communicator, no MPI)."""

from __future__ import annotations

import pytest

from runtime.grid import build_communicators
from topology import Layout, emulated_cluster


class _FakeComm:
    """Records Split(color, key) instead of calling MPI."""

    def __init__(self, rank: int, size: int):
        self.rank, self.size = rank, size

    def Get_rank(self):  # noqa: N802 (mpi4py's names)
        return self.rank

    def Get_size(self):  # noqa: N802
        return self.size

    def Split(self, color, key):  # noqa: N802
        return (color, key)


def test_split_colours_and_keys_follow_the_layout():
    layout = Layout(cluster=emulated_cluster(4, 4), pp=2, ep=4)  # 16 ranks, stages of 8, two EP4 groups each
    comms = [build_communicators(_FakeComm(r, 16), layout) for r in range(16)]
    for axis, size in (("pp", 2), ("dp", 8), ("ep", 4), ("edp", 2)):
        members: dict[int, dict[int, int]] = {}
        for r, c in enumerate(comms):
            color, key = getattr(c, axis)
            members.setdefault(color, {})[key] = r
        # a communicator = one group of the layout, ranks in it ordered by their index along the axis
        got = sorted([m[k] for k in sorted(m)] for m in members.values())
        assert got == sorted(layout.groups(axis)) and all(len(g) == size for g in got)
    # indices in the communicators are the rank's coordinates
    for r, c in enumerate(comms):
        p = layout.place(r)
        assert (c.pp[1], c.dp[1], c.ep[1], c.edp[1]) == (p.pp, p.dp, p.ep, p.ep_group)
    # the EP group spans nodes: ranks 0-3 are node 0, EP group 0 of stage 0 is ranks 0-3
    assert layout.groups("ep")[0] == [0, 1, 2, 3] and layout.groups("pp")[0] == [0, 8]


def test_size_mismatch_names_the_count():
    with pytest.raises(ValueError, match="needs 16 ranks.*-n 16"):
        build_communicators(_FakeComm(0, 8), Layout(cluster=emulated_cluster(4, 4), pp=2, ep=4))
