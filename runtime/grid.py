"""The rank grid: pipeline x expert x data parallel coordinates and their communicators.

Rank order is expert-parallel fastest, then pipeline, then data parallel: the ranks of one expert
group are consecutive, so with ranks filled node by node an expert group sits inside a node
(NVLink) when ``ep`` divides the GPUs per node. The mapping is pure; :func:`build_communicators`
alone touches MPI.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["GridSpec", "Coords", "Communicators", "build_communicators"]

AXES = ("pp", "ep", "dp")


@dataclass(frozen=True, slots=True)
class Coords:
    """A rank's position in the grid."""

    pp: int
    """Pipeline rank."""
    ep: int
    """Index inside the expert-parallel group."""
    dp: int
    """Data-parallel replica."""


@dataclass(kw_only=True, slots=True, frozen=True)
class GridSpec:
    """Sizes of the parallel dimensions; their product is the number of ranks."""

    pp: int = 1
    """Pipeline-parallel ranks (stages are placed along this axis)."""
    ep: int = 1
    """Expert-parallel ranks per pipeline stage."""
    dp: int = 1
    """Data-parallel replicas of the whole pipeline."""

    def __post_init__(self) -> None:
        for axis in AXES:
            v = getattr(self, axis)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"GridSpec.{axis}={v!r}: must be a positive integer")

    @classmethod
    def parse(cls, text: str) -> GridSpec:
        """From a plain description such as ``"pp=4,ep=2"`` (missing axes are 1)."""
        sizes = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            name, sep, value = part.partition("=")
            name = name.strip()
            if not sep or name not in AXES or not value.strip().isdigit():
                raise ValueError(f"grid {text!r}: expected comma-separated AXIS=N with AXIS in {AXES}, got {part!r}")
            if name in sizes:
                raise ValueError(f"grid {text!r}: axis {name!r} given twice")
            sizes[name] = int(value)
        return cls(**sizes)

    @property
    def size(self) -> int:
        return self.pp * self.ep * self.dp

    def coords(self, rank: int) -> Coords:
        """Grid position of ``rank``."""
        if not 0 <= rank < self.size:
            raise ValueError(f"rank={rank}: outside the grid of {self.size} ranks ({self})")
        ep = rank % self.ep
        pp = rank // self.ep % self.pp
        dp = rank // (self.ep * self.pp)
        return Coords(pp=pp, ep=ep, dp=dp)

    def rank_of(self, coords: Coords) -> int:
        """Inverse of :meth:`coords`."""
        for axis in AXES:
            if not 0 <= getattr(coords, axis) < getattr(self, axis):
                raise ValueError(f"coords {coords}: {axis} outside 0..{getattr(self, axis) - 1}")
        return (coords.dp * self.pp + coords.pp) * self.ep + coords.ep

    def groups(self, axis: str) -> list[list[int]]:
        """Ranks that differ only along ``axis``, one list per group, each in axis order."""
        if axis not in AXES:
            raise ValueError(f"axis={axis!r}: must be one of {AXES}")
        out: dict[tuple, list[int]] = {}
        for r in range(self.size):
            c = self.coords(r)
            key = tuple(getattr(c, a) for a in AXES if a != axis)
            out.setdefault(key, []).append(r)
        return list(out.values())


@dataclass(slots=True)
class Communicators:
    """One rank's communicators: the world and one per grid axis (rank in it = its coordinate)."""

    world: object
    pp: object
    ep: object
    dp: object
    coords: Coords
    spec: GridSpec


def build_communicators(comm, spec: GridSpec) -> Communicators:
    """Split ``comm`` (whose size must equal ``spec.size``) into the axis communicators."""
    if comm.Get_size() != spec.size:
        raise ValueError(f"grid {spec} needs {spec.size} ranks, the communicator has {comm.Get_size()}: "
                         f"launch with -n {spec.size} or change the grid")
    rank = comm.Get_rank()
    c = spec.coords(rank)
    subs = {}
    for axis in AXES:
        # colour = index of the group this rank is in along the axis; key = its coordinate
        color = next(i for i, g in enumerate(spec.groups(axis)) if rank in g)
        subs[axis] = comm.Split(color, getattr(c, axis))
    return Communicators(world=comm, coords=c, spec=spec, **subs)
