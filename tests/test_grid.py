"""Rank grid mapping (pure, no MPI)."""

from __future__ import annotations

import itertools

import pytest

from runtime.grid import Coords, GridSpec


@pytest.mark.parametrize("pp,ep,dp", [(1, 1, 1), (4, 1, 1), (2, 4, 1), (2, 2, 3), (8, 8, 2)])
def test_bijection_and_groups(pp, ep, dp):
    g = GridSpec(pp=pp, ep=ep, dp=dp)
    seen = {g.coords(r) for r in range(g.size)}
    assert len(seen) == g.size == pp * ep * dp
    assert seen == {Coords(pp=a, ep=b, dp=c) for a, b, c in itertools.product(range(pp), range(ep), range(dp))}
    for r in range(g.size):
        assert g.rank_of(g.coords(r)) == r
    for axis, n in (("pp", pp), ("ep", ep), ("dp", dp)):
        groups = g.groups(axis)
        assert len(groups) == g.size // n and all(len(x) == n for x in groups)
        assert sorted(itertools.chain(*groups)) == list(range(g.size))
        for grp in groups:  # members differ only along the axis, listed in axis order
            cs = [g.coords(r) for r in grp]
            assert [getattr(c, axis) for c in cs] == list(range(n))
            others = {tuple(getattr(c, a) for a in ("pp", "ep", "dp") if a != axis) for c in cs}
            assert len(others) == 1


def test_expert_groups_are_consecutive_ranks():
    assert GridSpec(pp=2, ep=4).groups("ep") == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert GridSpec(pp=2, ep=4).groups("pp")[0] == [0, 4]


def test_parse_and_errors():
    assert GridSpec.parse("pp=4, ep=2") == GridSpec(pp=4, ep=2, dp=1)
    for bad in ("pp=0", "tp=2", "pp=2,pp=2", "pp", "pp=x"):
        with pytest.raises(ValueError):
            GridSpec.parse(bad)
    with pytest.raises(ValueError, match="rank=8"):
        GridSpec(pp=4, ep=2).coords(8)
