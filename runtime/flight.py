"""Flight recorder: a rank's last few hundred queue operations and compute spans, kept in memory.

Appending is one ``deque.append`` of a tuple (atomic under the GIL, no lock, no formatting), so it
can sit on the per-message path; the entries are turned into dicts only when somebody reads them:
the actor's failure report (dumped to the rank's log on abort or hang) and the heartbeat thread,
which carries the recent tail to the supervisor because a killed or frozen rank cannot dump its own.
"""

from __future__ import annotations

import time
from collections import deque

__all__ = ["FlightRecorder"]


class FlightRecorder:
    """A ring of ``(t_ns, what, fields)`` entries; the oldest fall out once ``capacity`` is reached."""

    def __init__(self, capacity: int = 512):
        if capacity < 1:
            raise ValueError(f"capacity={capacity}: must be >= 1")
        self._ring: deque[tuple[int, str, dict]] = deque(maxlen=capacity)

    def record(self, what: str, t_ns: int | None = None, **fields) -> None:
        """Add one entry (``t_ns``: its monotonic end time; now if omitted)."""
        self._ring.append((time.monotonic_ns() if t_ns is None else t_ns, what, fields))

    def record_fields(self, what: str, t_ns: int, fields: dict) -> None:
        """Add one entry whose ``fields`` dict the caller hands over (kept as is, not copied): the
        per-message span callback already holds a fresh dict, and re-packing it as keywords would
        cost more than the append itself."""
        self._ring.append((t_ns, what, fields))

    def tail(self, n: int | None = None) -> list[dict]:
        """The newest ``n`` entries (all if None), oldest first, as dicts with ``age_s`` from now."""
        entries = list(self._ring)  # one C call under the GIL: the appending thread cannot interleave
        if n is not None:
            entries = entries[-n:]
        now = time.monotonic_ns()
        return [{"what": what, "age_s": round((now - t) / 1e9, 3), **fields} for t, what, fields in entries]

    def __len__(self) -> int:
        return len(self._ring)
