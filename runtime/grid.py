"""Communicators for the rank layout of :class:`topology.Layout` (the project's one layout).

The layout (pure, in ``topology/layout.py``) says which ranks share a pipeline, a stage, an EP
group or an expert-data-parallel group; this module only splits MPI communicators along it.
"""

from __future__ import annotations

from dataclasses import dataclass

from topology.layout import AXES, Layout, RankPlace

__all__ = ["Communicators", "build_communicators"]


@dataclass(slots=True)
class Communicators:
    """One rank's communicators: the world and one per layout axis (its rank in each is its index
    along that axis: pipeline rank, dp index, ep index, EP-group index)."""

    world: object
    pp: object
    dp: object
    ep: object
    edp: object
    place: RankPlace
    layout: Layout


def build_communicators(comm, layout: Layout) -> Communicators:
    """Split ``comm`` (whose size must equal ``layout.num_ranks``) into the axis communicators."""
    if comm.Get_size() != layout.num_ranks:
        raise ValueError(f"layout pp={layout.pp} x dp={layout.dp} needs {layout.num_ranks} ranks, the communicator "
                         f"has {comm.Get_size()}: launch with -n {layout.num_ranks} or change the layout")
    rank = comm.Get_rank()
    subs = {}
    for axis in AXES:
        # colour = index of the group this rank is in along the axis; key = its position in that group
        color, key = next((i, g.index(rank)) for i, g in enumerate(layout.groups(axis)) if rank in g)
        subs[axis] = comm.Split(color, key)
    return Communicators(world=comm, place=layout.place(rank), layout=layout, **subs)
