"""Each rank's monotonic-clock offset to rank 0, so spans of different hosts share one time axis.

``time.monotonic_ns()`` counts from an arbitrary point per host (boot), so spans of two hosts cannot
be compared as logged. At start every rank plays a few MPI ping-pongs with rank 0 (NTP's method):
it reads its clock (``a``), rank 0 answers with its own (``r``), it reads again (``b``). If the two
legs take equally long, rank 0's clock read ``r`` at local time ``(a + b) / 2``, so
``offset = r − (a + b) / 2`` and ``local + offset`` is rank 0's time; an uneven split errs by at
most half the round trip. The sample with the shortest round trip is kept (least room for error).
Drift over a run (clock rates differ by ~10 ppm: 0.6 ms an hour) is not corrected.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from mpi4py import MPI

__all__ = ["ClockOffset", "best_offset", "offset_to_root"]


@dataclass(frozen=True, slots=True)
class ClockOffset:
    """This rank's estimate of rank 0's clock minus its own."""

    offset_ns: int
    """Add to a local monotonic time to get rank 0's."""
    rtt_ns: int
    """Round trip of the kept sample; the offset is good to ±rtt/2."""
    rounds: int
    """Ping-pongs played."""


def best_offset(samples: Sequence[tuple[int, int, int]]) -> ClockOffset:
    """The estimate from ``(a, r, b)`` samples (local send, root's reading, local receive; ns):
    the one with the shortest round trip ``b − a``."""
    if not samples:
        raise ValueError("samples: need at least one (a, r, b) ping-pong")
    a, r, b = min(samples, key=lambda s: s[2] - s[0])
    return ClockOffset(offset_ns=r - (a + b) // 2, rtt_ns=b - a, rounds=len(samples))


def offset_to_root(comm: MPI.Comm, *, rounds: int = 8,
                   clock: Callable[[], int] = time.monotonic_ns) -> ClockOffset:
    """Collective: every rank's :class:`ClockOffset` to rank 0 (rank 0 gets offset 0).

    Rank 0 serves the others one after the other (their samples do not queue behind each other),
    on a duplicate of ``comm`` so no message of the caller can match. ``clock`` is injectable for
    tests (a rank with a known skew).
    """
    if rounds < 1:
        raise ValueError(f"rounds={rounds}: must be >= 1")
    c = comm.Dup()
    try:
        buf = np.zeros(1, np.int64)
        if c.rank == 0:
            for peer in range(1, c.size):
                for _ in range(rounds):
                    c.Recv(buf, source=peer, tag=0)
                    buf[0] = clock()
                    c.Send(buf, dest=peer, tag=1)
            return ClockOffset(offset_ns=0, rtt_ns=0, rounds=0)
        samples = []
        for _ in range(rounds):
            a = clock()
            c.Send(buf, dest=0, tag=0)
            c.Recv(buf, source=0, tag=1)
            b = clock()
            samples.append((a, int(buf[0]), b))
        return best_offset(samples)
    finally:
        c.Free()
