"""Rank layout: ``pp`` pipeline stages x ``dp`` ranks per stage, expert-parallel groups of ``ep`` inside dp.

Ranks are devices, numbered node-major (rank r is the cluster's device r). A stage holds ``dp``
consecutive ranks, split into ``dp // ep`` expert-parallel groups of ``ep`` consecutive ranks, so
an EP group spans ``ep / devices-per-node`` whole nodes and lists its ranks node-major — the
order expert placement assumes (physical slot p lives on ep rank ``p // slots_per_rank``, and ep
rank e on the group's node ``e // devices-per-node`` when nodes are uniform). DeepSeek-V3: 2,048
H800 on 256 nodes, pp 16 -> 128 ranks per stage -> two EP64 groups of 8 nodes each.

Inside an EP group, attention is data parallel (``dp`` axis: all ranks of a stage); expert
weights are replicated across a stage's EP groups (``edp`` axis: same ep index, other groups).

Rails: a rank's *rail position* is its index among its group's ranks on its node. Its rail peer
on another node of the group is the rank there with the same position, or, where the group has
fewer ranks on that node, position ``mod`` that count (so every rank has exactly one peer per
node, and the peers on a smaller node each serve several positions). Two-hop dispatch crosses
the inter-node link only between rail peers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from topology.cluster import Cluster

__all__ = ["AXES", "RankPlace", "EPGroup", "Layout"]

AXES = ("pp", "dp", "ep", "edp")
"""Communicator axes: pipeline (same dp index), data parallel (a whole stage), expert parallel (one
EP group), expert data parallel (same ep index in the other EP groups of the stage)."""


@dataclass(frozen=True, slots=True)
class RankPlace:
    """Where a rank sits: its coordinates and its device."""

    rank: int
    pp: int
    """Pipeline rank (stage index)."""
    dp: int
    """Index among the stage's ranks (0 .. dp-1)."""
    ep_group: int
    """Which EP group of the stage (``dp // ep``)."""
    ep: int
    """Index inside the EP group (node-major)."""
    node: int
    """Cluster node index."""
    local: int
    """Device index on its node."""
    rail: int
    """Index among its EP group's ranks on its node (see the module docstring)."""
    kind: str
    """Device kind."""


@dataclass(frozen=True, slots=True)
class EPGroup:
    """One expert-parallel group as dispatch sees it, in ep-rank terms."""

    ranks: tuple[int, ...]
    """Global rank of each ep rank: ``[ep]``, node-major."""
    node_ids: tuple[int, ...]
    """The cluster nodes the group spans, in order: ``[group_nodes]``."""
    node_of: tuple[int, ...]
    """Position in ``node_ids`` of each ep rank's node: ``[ep]``."""
    rail: tuple[tuple[int, ...], ...]
    """``rail[e][k]``: the ep rank on the group's k-th node that rank e's inter-node traffic goes to
    (e itself on its own node): ``[ep, group_nodes]``."""

    @property
    def size(self) -> int:
        return len(self.ranks)

    @property
    def num_nodes(self) -> int:
        return len(self.node_ids)


@dataclass(kw_only=True, slots=True)
class Layout:
    """The pp x dp rank layout on a cluster, EP groups of ``ep`` inside dp."""

    cluster: Cluster
    """The machines; ranks are its devices in node-major order."""
    pp: int = 1
    """Pipeline stages."""
    ep: int = 1
    """Ranks per expert-parallel group; must divide ``dp``."""
    dp: int = 0
    """Ranks per stage; 0 means all devices divided by ``pp``."""
    places: tuple[RankPlace, ...] = field(init=False)
    """Every rank's place, indexed by rank."""

    def __post_init__(self) -> None:
        total = self.cluster.num_devices
        for name in ("pp", "ep"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"layout.{name}={v!r}: must be a positive integer")
        if isinstance(self.dp, bool) or not isinstance(self.dp, int) or self.dp < 0:
            raise ValueError(f"layout.dp={self.dp!r}: must be a positive integer (0: devices // pp)")
        if self.dp == 0:
            if total % self.pp:
                raise ValueError(f"layout.pp={self.pp}: does not divide the cluster's {total} devices; "
                                 f"give dp explicitly (pp x dp <= {total}) or change pp")
            self.dp = total // self.pp
        if self.dp % self.ep:
            raise ValueError(f"layout.ep={self.ep}: must divide dp={self.dp} (EP groups live inside a stage); "
                             f"choose ep among {[d for d in range(1, self.dp + 1) if self.dp % d == 0]}")
        need = self.pp * self.dp
        if need > total:
            raise ValueError(f"layout pp={self.pp} x dp={self.dp} needs {need} devices; the cluster has {total} "
                             f"({self.cluster.num_nodes} nodes): add {need - total} devices or shrink pp/dp")
        node_of = self.cluster.device_node()
        first = [0] * self.cluster.num_nodes  # first device number of each node
        for n in range(1, self.cluster.num_nodes):
            first[n] = first[n - 1] + self.cluster.nodes[n - 1].num_devices
        places = []
        for r in range(need):
            n = node_of[r]
            d = r % self.dp
            group_start = r - d % self.ep
            # rail position: index among this group's ranks on this node
            rail = r - max(first[n], group_start)
            places.append(RankPlace(rank=r, pp=r // self.dp, dp=d, ep_group=d // self.ep, ep=d % self.ep, node=n,
                                    local=r - first[n], rail=rail, kind=self.cluster.nodes[n].kind))
        self.places = tuple(places)

    @property
    def num_ranks(self) -> int:
        return self.pp * self.dp

    @property
    def num_ep_groups(self) -> int:
        """EP groups per stage."""
        return self.dp // self.ep

    def place(self, rank: int) -> RankPlace:
        if not 0 <= rank < self.num_ranks:
            raise ValueError(f"rank={rank}: outside the layout's {self.num_ranks} ranks")
        return self.places[rank]

    def groups(self, axis: str) -> list[list[int]]:
        """Ranks that share every coordinate but ``axis``'s, one list per group, in axis order."""
        if axis == "pp":
            return [[p * self.dp + d for p in range(self.pp)] for d in range(self.dp)]
        if axis == "dp":
            return [list(range(p * self.dp, (p + 1) * self.dp)) for p in range(self.pp)]
        if axis == "ep":
            return [list(range(s, s + self.ep)) for s in range(0, self.num_ranks, self.ep)]
        if axis == "edp":
            return [[p * self.dp + g * self.ep + e for g in range(self.num_ep_groups)]
                    for p in range(self.pp) for e in range(self.ep)]
        raise ValueError(f"axis={axis!r}: must be one of {AXES}")

    def ep_group(self, rank: int) -> EPGroup:
        """The EP group containing ``rank``."""
        start = rank - self.place(rank).ep
        ranks = tuple(range(start, start + self.ep))
        node_ids = tuple(dict.fromkeys(self.places[r].node for r in ranks))
        pos = {n: k for k, n in enumerate(node_ids)}
        on_node = [[r - start for r in ranks if self.places[r].node == n] for n in node_ids]
        rail = tuple(tuple(members[self.places[r].rail % len(members)] for members in on_node) for r in ranks)
        return EPGroup(ranks=ranks, node_ids=node_ids, node_of=tuple(pos[self.places[r].node] for r in ranks),
                       rail=rail)

    def rail_peers(self, rank: int) -> dict[int, int]:
        """Cluster node -> the global rank ``rank`` exchanges with there (its rail peer), over its EP group."""
        g = self.ep_group(rank)
        e = self.place(rank).ep
        return {n: g.ranks[g.rail[e][k]] for k, n in enumerate(g.node_ids) if n != self.places[rank].node}
