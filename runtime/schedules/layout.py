"""Where a schedule kind puts model stages on pipeline ranks: the layout as values.

Every schedule kind is one row of :data:`KINDS_TABLE` (chunks per rank, model copies, directions);
:func:`layout` turns a row and a rank count into a :class:`ScheduleLayout` whose tables answer
every placement question (which stage a rank's chunk runs, which rank and chunk run a stage for a
direction, which rank holds the other copy of a rank's stages). Executors, generators, the
simulator and the tools read these values; nothing outside the table compares schedule names.

All kinds fold the model the same way: chunk 0 of rank r runs stage r and a second chunk runs
stage ``num_stages - 1 - r``. With two copies of the model (DualPipe) that is stage ``pp-1-r`` of
the second copy, which carries the second direction; with one copy (DualPipeV) it is the way back
of a V over ``2 * pp`` stages.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["KindFacts", "KINDS_TABLE", "ScheduleLayout", "layout"]


@dataclass(frozen=True, slots=True)
class KindFacts:
    """What fixes a schedule kind's layout, whatever the number of ranks."""

    num_chunks: int
    """Model chunks each rank holds (1 or 2)."""
    copies: int
    """Copies of the whole model across the ranks: 2 for DualPipe (one per direction), else 1."""
    directions: tuple[int, ...]
    """Directions microbatches travel in: 0 enters at the first rank, 1 at the last."""

    def __post_init__(self) -> None:
        if self.num_chunks not in (1, 2) or self.copies not in (1, 2) or self.copies > self.num_chunks:
            raise ValueError(f"{self}: need 1 or 2 chunks per rank and no more copies than chunks")
        if len(self.directions) != self.copies:
            raise ValueError(f"{self}: one direction per model copy")

    def num_stages(self, pp: int) -> int:
        """Model stages on ``pp`` ranks."""
        return pp * self.num_chunks // self.copies

    def ranks_for(self, num_stages: int) -> int:
        """Ranks that run ``num_stages`` stages (inverse of :meth:`num_stages`)."""
        return num_stages * self.copies // self.num_chunks


KINDS_TABLE: dict[str, KindFacts] = {
    "dualpipe": KindFacts(num_chunks=2, copies=2, directions=(0, 1)),
    "dualpipev": KindFacts(num_chunks=2, copies=1, directions=(0,)),
    "1f1b": KindFacts(num_chunks=1, copies=1, directions=(0,)),
    "zb1p": KindFacts(num_chunks=1, copies=1, directions=(0,)),
}
"""The layout facts of every schedule kind, by name (the one place a name decides a layout)."""


@dataclass(frozen=True, slots=True)
class ScheduleLayout:
    """The stage layout of one schedule kind on ``pp`` ranks, as tables (build with :func:`layout`)."""

    name: str
    """Schedule kind (a key of :data:`KINDS_TABLE`)."""
    pp: int
    """Pipeline ranks."""
    num_stages: int
    """Model stages."""
    directions: tuple[int, ...]
    """Directions microbatches travel in."""
    stages: tuple[tuple[int, ...], ...]
    """``stages[rank][chunk]``: the global stage (0 = embedding end) a rank's chunk runs."""
    placement: tuple[tuple[tuple[int, int], ...], ...]
    """``placement[dir][stage]``: the ``(rank, chunk)`` that runs ``stage`` for direction ``dir``."""
    mirrors: tuple[int | None, ...]
    """``mirrors[rank]``: the other rank holding the same stages (a second model copy), or None."""

    @property
    def num_chunks(self) -> int:
        """Model chunks per rank."""
        return len(self.stages[0])

    def chunks(self, rank: int) -> tuple[int, ...]:
        """The chunk indices rank ``rank`` holds."""
        self._check_rank(rank)
        return tuple(range(len(self.stages[rank])))

    def stage_of(self, rank: int, chunk: int) -> int:
        """Global model stage (0 = embedding end, num_stages-1 = loss end) of a rank's chunk."""
        self._check_rank(rank)
        if not isinstance(chunk, int) or not 0 <= chunk < len(self.stages[rank]):
            raise ValueError(f"chunk={chunk!r}: {self.name} ranks hold chunks 0..{self.num_chunks - 1}")
        return self.stages[rank][chunk]

    def place(self, dir: int, stage: int) -> tuple[int, int]:
        """``(rank, chunk)`` that runs ``stage`` for microbatches of direction ``dir``."""
        if dir not in self.directions:
            raise ValueError(f"dir={dir!r}: {self.name} uses directions {self.directions}")
        if not isinstance(stage, int) or not 0 <= stage < self.num_stages:
            raise ValueError(f"stage={stage!r}: {self.name} has stages 0..{self.num_stages - 1}")
        return self.placement[self.directions.index(dir)][stage]

    def mirror_of(self, rank: int) -> int | None:
        """The rank holding the other copy of ``rank``'s stages (their gradients are summed), or None."""
        self._check_rank(rank)
        return self.mirrors[rank]

    def _check_rank(self, rank: int) -> None:
        if not isinstance(rank, int) or not 0 <= rank < self.pp:
            raise ValueError(f"rank={rank!r}: must be in 0..{self.pp - 1}")


def layout(name: str, pp: int) -> ScheduleLayout:
    """The layout of schedule kind ``name`` on ``pp`` ranks, from its row of :data:`KINDS_TABLE`."""
    if name not in KINDS_TABLE:
        raise ValueError(f"schedule name={name!r}: must be one of {tuple(KINDS_TABLE)}")
    if not isinstance(pp, int) or isinstance(pp, bool) or pp < 1:
        raise ValueError(f"pp={pp!r}: must be a positive integer (number of ranks)")
    facts = KINDS_TABLE[name]
    num_stages = facts.num_stages(pp)
    stages = tuple((r, num_stages - 1 - r)[:facts.num_chunks] for r in range(pp))
    placement = []
    for i, _ in enumerate(facts.directions):
        # one copy: a stage has one holder; two copies: copy (= chunk) i carries direction i
        row = {s: (r, c) for r in range(pp) for c, s in enumerate(stages[r]) if facts.copies == 1 or c == i}
        placement.append(tuple(row[s] for s in range(num_stages)))
    by_stages: dict[frozenset[int], list[int]] = {}
    for r in range(pp):
        by_stages.setdefault(frozenset(stages[r]), []).append(r)
    mirrors = tuple(next((q for q in by_stages[frozenset(stages[r])] if q != r), None) for r in range(pp))
    return ScheduleLayout(name=name, pp=pp, num_stages=num_stages, directions=facts.directions, stages=stages,
                          placement=tuple(placement), mirrors=mirrors)
