"""JSON form of a schedule (``docs/schedules.md``)::

    {"schedule": "dualpipe", "pp": 8, "microbatches": 20,
     "ranks": [[{"op": "F", "dir": 0, "mb": 0, "chunk": 0, "split": false},
                {"op": "SEND", "peer": 1, "kind": "act", "dir": 0, "mb": 0, "chunk": 0, "tag": 0},
                {"op": "FB", "f": {...}, "b": {...}}, ...], ...]}

The layout (``num_stages``, placement, mirrors) is not stored: it follows from the schedule name and
``pp`` (:mod:`.layout`).
"""

from __future__ import annotations

import json
from typing import Any

from .actions import FB, SCHEDULE_NAMES, Action, Compute, Recv, Schedule, Send

__all__ = ["to_json", "from_json", "dumps"]

_MESSAGE_KEYS = ("peer", "kind", "dir", "mb", "chunk", "tag")
_COMPUTE_KEYS = ("dir", "mb", "chunk", "split")


def _compute_json(c: Compute) -> dict[str, Any]:
    return {"op": c.op, "dir": c.dir, "mb": c.mb, "chunk": c.chunk, "split": c.split}


def _action_json(a: Action) -> dict[str, Any]:
    if isinstance(a, Compute):
        return _compute_json(a)
    if isinstance(a, FB):
        return {"op": "FB", "f": _compute_json(a.f), "b": _compute_json(a.b)}
    op = "SEND" if isinstance(a, Send) else "RECV"
    return {"op": op, **{k: getattr(a, k) for k in _MESSAGE_KEYS}}


def to_json(schedule: Schedule) -> dict[str, Any]:
    """The schedule as plain JSON-ready data."""
    return {
        "schedule": schedule.name,
        "pp": schedule.pp,
        "microbatches": schedule.microbatches,
        "ranks": [[_action_json(a) for a in actions] for actions in schedule.ranks],
    }


def _fields(d: Any, keys: tuple[str, ...], where: str) -> dict[str, Any]:
    if not isinstance(d, dict):
        raise ValueError(f"{where}: expected a JSON object, got {d!r}")
    missing = [k for k in keys if k not in d]
    if missing:
        raise ValueError(f"{where}: missing field(s) {missing}")
    return {k: d[k] for k in keys}


def _compute_from(d: Any, where: str) -> Compute:
    if not isinstance(d, dict) or d.get("op") not in ("F", "B", "W"):
        raise ValueError(f"{where}.op: a compute action needs op 'F', 'B' or 'W', got {d!r}")
    return Compute(d["op"], **_fields(d, _COMPUTE_KEYS, where))


def _action_from(d: Any, where: str) -> Action:
    op = d.get("op") if isinstance(d, dict) else None
    if op in ("F", "B", "W"):
        return _compute_from(d, where)
    if op == "FB":
        f = _fields(d, ("f", "b"), where)
        return FB(_compute_from(f["f"], f"{where}.f"), _compute_from(f["b"], f"{where}.b"))
    if op in ("SEND", "RECV"):
        return (Send if op == "SEND" else Recv)(**_fields(d, _MESSAGE_KEYS, where))
    raise ValueError(f"{where}.op={op!r}: must be one of F, B, W, FB, SEND, RECV")


def from_json(d: dict[str, Any]) -> Schedule:
    """Inverse of :func:`to_json`; raises ValueError naming the bad field."""
    top = _fields(d, ("schedule", "pp", "microbatches", "ranks"), "schedule JSON")
    name, pp = top["schedule"], top["pp"]
    if name not in SCHEDULE_NAMES:
        raise ValueError(f"schedule JSON .schedule={name!r}: must be one of {SCHEDULE_NAMES}")
    if not isinstance(pp, int) or not isinstance(top["ranks"], list):
        raise ValueError("schedule JSON: .pp must be an integer and .ranks a list of per-rank lists")
    ranks = []
    for r, actions in enumerate(top["ranks"]):
        if not isinstance(actions, list):
            raise ValueError(f"schedule JSON .ranks[{r}]: must be a list of actions")
        ranks.append(tuple(_action_from(a, f"ranks[{r}][{i}]") for i, a in enumerate(actions)))
    return Schedule(
        name=name,
        pp=pp,
        microbatches=top["microbatches"],
        ranks=tuple(ranks),
    )


def dumps(schedule: Schedule) -> str:
    """:func:`to_json` as text, one action per line so that diffs and greps stay readable."""
    d = to_json(schedule)
    head = ", ".join(f"{json.dumps(k)}: {json.dumps(d[k])}" for k in ("schedule", "pp", "microbatches"))
    rows = []
    for actions in d["ranks"]:
        rows.append("  [\n" + ",\n".join("    " + json.dumps(a) for a in actions) + "\n  ]")
    return "{" + head + ', "ranks": [\n' + ",\n".join(rows) + "\n]}"
