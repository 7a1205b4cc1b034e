"""Schedule actions and the :class:`Schedule` container: a pipeline schedule is plain data.

A schedule lists, for each pipeline rank, the actions that rank performs in order. Compute actions
name a direction, a microbatch index within that direction and one of the rank's model chunks;
:class:`Send` and :class:`Recv` name the peer and a small channel tag. An executor only walks the
lists; everything about where stages live is answered by the schedule's layout (:mod:`.layout`).

Semantics shared by the simulator and the executor (``docs/schedules.md`` has the long form):

* ``Recv`` is a non-blocking post; the compute that consumes it waits for the data. Recvs are
  listed before the compute that precedes their consumer, so receives are in flight one compute
  ahead.
* ``Send`` is non-blocking and listed right after the compute that produced its data (after the
  whole pair for :class:`FB`).
* Messages on one channel ``(src, dst, tag)`` are matched in FIFO order; the tag never encodes the
  microbatch (see :func:`tag_for`).
* A hand-off between two chunks on the same rank (DualPipeV's turn at the last rank) has no
  Send/Recv: the tensor is passed locally.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Union

from .layout import KINDS_TABLE, ScheduleLayout, layout

__all__ = [
    "OPS",
    "KINDS",
    "SCHEDULE_NAMES",
    "Compute",
    "FB",
    "Send",
    "Recv",
    "Action",
    "Schedule",
    "tag_for",
]

OPS = ("F", "B", "W")
"""Compute ops: forward, backward (input grads, plus weight grads unless split), weight grads."""

KINDS = ("act", "grad")
"""Message kinds: an activation (forward output) or a gradient w.r.t. a stage input."""

SCHEDULE_NAMES = tuple(KINDS_TABLE)
"""Schedule names: ``("dualpipe", "dualpipev", "1f1b", "zb1p")``, the rows of the layout table."""


def tag_for(kind: str, dir: int) -> int:
    """Channel tag of a message: ``2 * kind_index + dir`` with act = 0, grad = 1, so 0..3.

    Between two ranks each (kind, direction) pair carries one ordered stream in every schedule
    here, so this small id plus FIFO matching identifies a message; the microbatch travels in the
    executor's header, never in the tag (MPI only guarantees tags up to 32767).
    """
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}: must be one of {KINDS}")
    if dir not in (0, 1):
        raise ValueError(f"dir={dir!r}: must be 0 or 1")
    return 2 * KINDS.index(kind) + dir


def _check_index(owner: str, field: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{owner}.{field}={value!r}: must be a non-negative integer")


def _check_dir(owner: str, value: object) -> None:
    if value not in (0, 1) or isinstance(value, bool):
        raise ValueError(f"{owner}.dir={value!r}: must be 0 (first rank -> last) or 1 (last -> first)")


@dataclass(frozen=True, slots=True)
class Compute:
    """One chunk computation: a forward, a backward or a deferred weight-gradient pass."""

    op: Literal["F", "B", "W"]
    """``F`` forward; ``B`` backward; ``W`` the weight-gradient part of an earlier split ``B``."""
    dir: int
    """Direction of the microbatch: 0 enters at the first rank, 1 at the last (DualPipe only)."""
    mb: int
    """Microbatch index within its direction (see :meth:`Schedule.global_mb`)."""
    chunk: int
    """Which of the rank's model chunks runs (see :meth:`Schedule.stage_of`)."""
    split: bool = False
    """For ``B`` only: True when the weight gradient is left to a later ``W`` action."""

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ValueError(f"Compute.op={self.op!r}: must be one of {OPS}")
        _check_dir("Compute", self.dir)
        _check_index("Compute", "mb", self.mb)
        _check_index("Compute", "chunk", self.chunk)
        if not isinstance(self.split, bool) or (self.split and self.op != "B"):
            raise ValueError(f"Compute.split={self.split!r} on op {self.op!r}: only a B may be split (bool)")

    def __str__(self) -> str:
        suffix = " split" if self.split else ""
        return f"{self.op}(dir={self.dir}, mb={self.mb}, chunk={self.chunk}{suffix})"


@dataclass(frozen=True, slots=True)
class FB:
    """A forward and a backward of different microbatches run overlapped as one unit."""

    f: Compute
    """The forward half (``op == "F"``)."""
    b: Compute
    """The backward half (``op == "B"``)."""

    def __post_init__(self) -> None:
        if not isinstance(self.f, Compute) or self.f.op != "F":
            raise ValueError(f"FB.f={self.f!r}: must be a Compute with op 'F'")
        if not isinstance(self.b, Compute) or self.b.op != "B":
            raise ValueError(f"FB.b={self.b!r}: must be a Compute with op 'B'")

    def __str__(self) -> str:
        return f"FB[{self.f} + {self.b}]"


def _check_message(owner: str, msg: Send | Recv) -> None:
    _check_index(owner, "peer", msg.peer)
    if msg.kind not in KINDS:
        raise ValueError(f"{owner}.kind={msg.kind!r}: must be one of {KINDS}")
    _check_dir(owner, msg.dir)
    _check_index(owner, "mb", msg.mb)
    _check_index(owner, "chunk", msg.chunk)
    _check_index(owner, "tag", msg.tag)


@dataclass(frozen=True, slots=True)
class Send:
    """Non-blocking send of an activation or input gradient this rank has produced."""

    peer: int
    """Destination pipeline rank."""
    kind: Literal["act", "grad"]
    """``act``: output of F(dir, mb, chunk); ``grad``: input gradient of B(dir, mb, chunk)."""
    dir: int
    """Direction of the microbatch."""
    mb: int
    """Microbatch index within its direction."""
    chunk: int
    """The SENDER's chunk that produced the data."""
    tag: int
    """Channel id, :func:`tag_for` ``(kind, dir)``."""

    def __post_init__(self) -> None:
        _check_message("Send", self)

    def __str__(self) -> str:
        return f"Send({self.kind} dir={self.dir} mb={self.mb} chunk={self.chunk} -> rank {self.peer} tag {self.tag})"


@dataclass(frozen=True, slots=True)
class Recv:
    """Non-blocking post of a receive; the consuming compute waits for its arrival."""

    peer: int
    """Source pipeline rank."""
    kind: Literal["act", "grad"]
    """``act``: input of this rank's F(dir, mb, chunk); ``grad``: output gradient of its B."""
    dir: int
    """Direction of the microbatch."""
    mb: int
    """Microbatch index within its direction."""
    chunk: int
    """The RECEIVER's chunk that will consume the data."""
    tag: int
    """Channel id, :func:`tag_for` ``(kind, dir)``."""

    def __post_init__(self) -> None:
        _check_message("Recv", self)

    def __str__(self) -> str:
        return f"Recv({self.kind} dir={self.dir} mb={self.mb} chunk={self.chunk} <- rank {self.peer} tag {self.tag})"


Action = Union[Compute, FB, Send, Recv]
"""Anything a rank's action list may hold."""


@dataclass(kw_only=True, slots=True, frozen=True)
class Schedule:
    """A whole pipeline schedule: one ordered action list per rank, plus its stage layout.

    The layout (:class:`~runtime.schedules.layout.ScheduleLayout`, from the kind's row of
    :data:`~runtime.schedules.layout.KINDS_TABLE`) answers where stages live:

    * ``dualpipe``: ``pp`` ranks, ``pp`` stages, two copies of the model. Rank r chunk 0 runs stage
      r for direction 0 (flows rank 0 -> pp-1); chunk 1 runs stage pp-1-r for direction 1 (flows
      rank pp-1 -> 0). Half of the microbatches go in each direction; rank pp-1-r is r's mirror.
    * ``dualpipev``: ``pp`` ranks, ``2 * pp`` stages in a V, one copy: rank r chunk 0 runs stage r,
      chunk 1 runs stage 2*pp-1-r. Every microbatch has direction 0 and enters at rank 0.
    * ``1f1b`` and ``zb1p``: ``pp`` ranks, ``pp`` stages, rank r chunk 0 runs stage r.
    """

    name: str
    """Schedule name, one of :data:`SCHEDULE_NAMES`."""
    pp: int
    """Number of pipeline ranks (for dualpipev: half the number of stages)."""
    microbatches: int
    """Microbatches in one step, all directions together."""
    ranks: tuple[tuple[Action, ...], ...]
    """``ranks[r]`` is rank r's ordered action list."""
    layout: ScheduleLayout = field(init=False, repr=False, compare=False)
    """The stage layout of ``name`` on ``pp`` ranks (derived, not passed)."""

    def __post_init__(self) -> None:
        if self.name not in SCHEDULE_NAMES:
            raise ValueError(f"Schedule.name={self.name!r}: must be one of {SCHEDULE_NAMES}")
        if not isinstance(self.pp, int) or self.pp < 1:
            raise ValueError(f"Schedule.pp={self.pp!r}: must be a positive integer")
        if not isinstance(self.microbatches, int) or self.microbatches < 1:
            raise ValueError(f"Schedule.microbatches={self.microbatches!r}: must be a positive integer")
        if len(self.ranks) != self.pp:
            raise ValueError(f"Schedule.ranks has {len(self.ranks)} lists: need one per rank (pp={self.pp})")
        object.__setattr__(self, "layout", layout(self.name, self.pp))

    @property
    def num_stages(self) -> int:
        """Model stages: ``2 * pp`` for dualpipev, ``pp`` otherwise."""
        return self.layout.num_stages

    @property
    def num_chunks(self) -> int:
        """Model chunks per rank."""
        return self.layout.num_chunks

    @property
    def directions(self) -> tuple[int, ...]:
        """Directions microbatches travel in: (0, 1) for dualpipe, (0,) otherwise."""
        return self.layout.directions

    @property
    def microbatches_per_dir(self) -> int:
        """Microbatches entering in each direction (``mb`` ranges over 0..this-1)."""
        return self.microbatches // len(self.directions)

    def chunks(self, rank: int) -> tuple[int, ...]:
        """The chunk indices rank ``rank`` holds."""
        return self.layout.chunks(rank)

    def stage_of(self, rank: int, chunk: int) -> int:
        """Global model stage (0 = embedding end, num_stages-1 = loss end) of a rank's chunk."""
        return self.layout.stage_of(rank, chunk)

    def place(self, dir: int, stage: int) -> tuple[int, int]:
        """``(rank, chunk)`` that runs ``stage`` for microbatches of direction ``dir``."""
        return self.layout.place(dir, stage)

    def mirror_of(self, rank: int) -> int | None:
        """The rank holding the other copy of ``rank``'s stages (dualpipe: pp-1-rank), or None."""
        return self.layout.mirror_of(rank)

    def global_mb(self, dir: int, mb: int) -> int:
        """Index of microbatch ``mb`` of direction ``dir`` in the step's data order."""
        if dir not in self.directions:
            raise ValueError(f"dir={dir!r}: {self.name} uses directions {self.directions}")
        if not 0 <= mb < self.microbatches_per_dir:
            raise ValueError(f"mb={mb!r}: each direction has microbatches 0..{self.microbatches_per_dir - 1}")
        return dir * self.microbatches_per_dir + mb
