"""The overlapped F&B program: one microbatch's forward and another's backward, interleaved so that
each one's exchanges travel while the other computes (DeepSeek-V3's pairing, report Fig. 4).

A chunk's forward or backward is a *steps* generator: it computes until it has posted an exchange
(:class:`~runtime.exchange.ExchangeOp`), yields it, and is resumed once the op is done; its return
value is the result. :func:`drive` runs one alone (each op waited for at once).
:func:`run_pair` interleaves two: the forward computes to its first exchange, the backward to its
first, then whichever one's exchange completes first computes its next segment while the other's
travels, and so on; when one ends the other runs alone. Which one resumes first depends on arrival
times, so the two must post on *separate* exchange streams (:class:`~runtime.exchange.Exchange`
objects; the EP executor gives forwards and backwards one each): each stream's posting order is
then still the program's, the same on every rank of an EP group.

:class:`WaitClock` adds up the time spent blocked on exchanges (the *exposed* communication).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator

from runtime.exchange import ExchangeOp, wait_any

__all__ = ["Steps", "WaitClock", "drive", "run_pair"]

Steps = Generator[ExchangeOp, None, object]


class WaitClock:
    """Nanoseconds blocked in exchange waits, by label (e.g. ``fb`` / ``other``)."""

    def __init__(self) -> None:
        self.ns: dict[str, int] = {}

    def wait(self, op: ExchangeOp, label: str) -> None:
        t0 = time.perf_counter_ns()
        op.wait()
        self.add(label, time.perf_counter_ns() - t0)

    def add(self, label: str, ns: int) -> None:
        self.ns[label] = self.ns.get(label, 0) + ns

    def take(self) -> dict[str, float]:
        """Seconds per label since the last call (and reset)."""
        out = {k: v / 1e9 for k, v in self.ns.items()}
        self.ns = {}
        return out


def drive(steps: Steps, clock: WaitClock | None = None, label: str = "other") -> object:
    """Run ``steps`` alone, waiting for each exchange at once; returns its result."""
    while True:
        try:
            op = next(steps)
        except StopIteration as stop:
            return stop.value
        clock.wait(op, label) if clock is not None else op.wait()


def run_pair(first: Steps, second: Steps, *, after_first: Callable[[], None] | None = None,
             clock: WaitClock | None = None, label: str = "fb") -> tuple[object, object]:
    """Run ``first`` and ``second`` interleaved (module docstring); ``after_first`` runs as soon as
    ``first`` has returned (e.g. post the send of the forward's output). Returns both results."""
    gens, ops, out = [first, second], [None, None], [None, None]
    live = [True, True]

    def resume(i: int) -> None:
        try:
            ops[i] = next(gens[i])
        except StopIteration as stop:
            live[i], out[i] = False, stop.value
            if i == 0 and after_first is not None:
                after_first()

    resume(0)
    resume(1)
    while live[0] and live[1]:
        t0 = time.perf_counter_ns()
        i = wait_any(ops)
        if clock is not None:
            clock.add(label, time.perf_counter_ns() - t0)
        resume(i)
    for i in (0, 1):
        while live[i]:
            clock.wait(ops[i], label) if clock is not None else ops[i].wait()
            resume(i)
    return out[0], out[1]
