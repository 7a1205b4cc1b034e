"""Pipeline schedules as data: DualPipe, DualPipeV, 1F1B and ZB1P, a simulator and renderers.

Pure Python: generators build a :class:`Schedule` (one ordered action list per rank, and its stage
layout from the kind's row of :data:`KINDS_TABLE`), the simulator walks it, :func:`to_json` /
:func:`from_json` move it around. ``docs/schedules.md`` describes the format and the semantics an
executor must follow.
"""

from .actions import FB, KINDS, OPS, SCHEDULE_NAMES, Action, Compute, Recv, Schedule, Send, tag_for
from .generators import GENERATORS, build, dualpipe, dualpipev, one_f_one_b, zb1p
from .jsonio import dumps, from_json, to_json
from .layout import KINDS_TABLE, KindFacts, ScheduleLayout, layout
from .render import LEGEND, bubble_table, cell_label, render_simulation, render_timeline
from .simulator import (
    ClosedForm,
    Costs,
    DeadlockError,
    ScheduleError,
    SimResult,
    Span,
    closed_form,
    simulate,
    validate,
)

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
    "KINDS_TABLE",
    "KindFacts",
    "ScheduleLayout",
    "layout",
    "GENERATORS",
    "build",
    "dualpipe",
    "dualpipev",
    "one_f_one_b",
    "zb1p",
    "Costs",
    "Span",
    "SimResult",
    "ClosedForm",
    "ScheduleError",
    "DeadlockError",
    "validate",
    "simulate",
    "closed_form",
    "to_json",
    "from_json",
    "dumps",
    "LEGEND",
    "cell_label",
    "render_timeline",
    "render_simulation",
    "bubble_table",
]
