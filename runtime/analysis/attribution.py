"""Bubble time attributed to schedule actions: which F/B waited for its input, on whom (the rank
and compute that produced the input) and why, and which compute ended the pipeline (the drain of
every other rank).

A wait span ``[w0, w1]`` of a compute on rank ``r`` whose input message left its producer at
``s`` (the in-flight start, :class:`~runtime.analysis.messages.Message`) and landed at ``l``
splits exactly into

* ``producer``: ``[w0, min(w1, s)]`` — the producer had not sent yet (it was late, or busy with
  other work the schedule put first: a dependency, not communication);
* ``in flight``: ``[w0, w1] ∩ [s, l]`` — the message was travelling (exposed communication);
* ``after``: the rest — the data had landed but the waiting rank had not yet noticed and decoded it.

Figures are means per step over the analysed steps; the simulator's predicted gap before the same
compute (:func:`~runtime.analysis.predict.predicted_waits`) is put next to each, so a wait the
schedule does not explain stands out.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from runtime.analysis.messages import Message
from runtime.analysis.steps import NS_PER_MS, StepLog, overlap_ns

__all__ = ["WaitCause", "attribute_waits", "waited_on", "pipeline_enders"]


@dataclass(frozen=True, slots=True)
class WaitCause:
    """One compute's wait for its input, mean per step (ms), and whom it waited on."""

    rank: int
    op: str
    dir: int
    mb: int
    chunk: int
    on_rank: int
    """The rank that produced the input."""
    on_op: str
    """The producing compute: F for an activation, B for a gradient (same dir and mb)."""
    on_chunk: int
    wait_ms: float
    producer_ms: float
    in_flight_ms: float
    after_ms: float
    predicted_ms: float | None
    """The simulator's gap before this compute (None without a simulation)."""

    @property
    def action(self) -> str:
        return f"{self.op}(dir {self.dir}, mb {self.mb}, chunk {self.chunk})"

    @property
    def on_action(self) -> str:
        return f"{self.on_op}(dir {self.dir}, mb {self.mb}, chunk {self.on_chunk})"


def attribute_waits(messages: Iterable[Message], num_steps: int,
                    predicted: dict[tuple, float] | None = None) -> list[WaitCause]:
    """Every waited-for message's wait split into producer / in flight / after (module docstring),
    summed per consuming compute and divided by ``num_steps``; largest wait first."""
    acc: dict[tuple, list] = defaultdict(lambda: [0, 0, 0, 0])
    for m in messages:
        if m.wait is None:
            continue
        w0, w1 = m.wait
        producer = max(0, min(w1, m.start) - w0)
        flight = overlap_ns(w0, w1, m.start, m.landed)
        op = "F" if m.kind == "act" else "B"
        a = acc[(m.dst, op, m.dir, m.mb, m.chunk, m.src, m.src_chunk)]
        a[0] += w1 - w0
        a[1] += producer
        a[2] += flight
        a[3] += (w1 - w0) - producer - flight
    n = max(1, num_steps) * NS_PER_MS
    rows = [WaitCause(rank=r, op=op, dir=d, mb=mb, chunk=c, on_rank=src, on_op=op, on_chunk=sc,
                      wait_ms=t / n, producer_ms=p / n, in_flight_ms=f / n, after_ms=x / n,
                      predicted_ms=None if predicted is None else predicted.get((r, op, d, mb, c), 0.0))
            for (r, op, d, mb, c, src, sc), (t, p, f, x) in acc.items()]
    return sorted(rows, key=lambda w: (-w.wait_ms, w.rank, w.op, w.dir, w.mb))


def waited_on(causes: Iterable[WaitCause]) -> list[dict]:
    """Per (waiting rank, producing rank): wait, producer and in-flight ms per step; largest first."""
    acc: dict[tuple[int, int], list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])
    for c in causes:
        a = acc[(c.rank, c.on_rank)]
        a[0] += c.wait_ms
        a[1] += c.producer_ms
        a[2] += c.in_flight_ms
    rows = [{"rank": r, "on_rank": q, "wait_ms": w, "producer_ms": p, "in_flight_ms": f}
            for (r, q), (w, p, f) in acc.items()]
    return sorted(rows, key=lambda x: (-x["wait_ms"], x["rank"]))


def pipeline_enders(steps: Iterable[StepLog]) -> list[dict]:
    """The compute that ended each step's pipeline (the others drain until it ends), counted over
    the steps: rank, op, dir, mb, chunk and in how many steps; most frequent first."""
    counts: Counter = Counter()
    for st in steps:
        last = max(((r, c) for r, rs in st.ranks.items() for c in rs.compute), key=lambda rc: rc[1]["t1"],
                   default=None)
        if last is not None:
            r, c = last
            counts[(r, c["op"], c["dir"], c["mb"], c["chunk"])] += 1
    return [{"rank": r, "op": op, "dir": d, "mb": mb, "chunk": ch, "steps": n}
            for (r, op, d, mb, ch), n in counts.most_common()]
