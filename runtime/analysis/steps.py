"""Per-step figures of a run: which spans belong to which step, and the idle-time accounting.

All times are ns on rank 0's clock (:mod:`runtime.analysis.load` aligned them); figures in ms.

What the logs record (per rank, per step; schema in :mod:`runtime.spans`)
------------------------------------------------------------------------
* ``span="step"``: the whole optimizer step on this rank (actions, then mirrored-gradient sum,
  gradient norm, AdamW, loss gather, flush).
* ``span="compute"`` (``op`` F/B/W, ``dir``, ``mb``, ``chunk``): one compute. An overlapped pair
  ``FB(f, b)`` of the schedule is logged as its two halves, F then B, run back to back.
* ``span="wait"`` (``kind``, ``dir``, ``mb``, ``chunk`` = the *receiver's* chunk): the time the
  consuming compute sat in ``transport.wait`` for its input (activation for an F, output gradient
  for a B) before starting.
* ``span="send"`` / ``span="recv"``: one message (see :mod:`runtime.analysis.messages`).

Definitions
-----------
Per step: ``start`` = earliest step-span start over the ranks (the simulator starts all ranks at
0); ``pipeline end`` = latest compute end over the ranks; ``makespan`` = end − start (the
simulator's makespan); ``wall`` = latest step-span end − start (the step time); ``tail`` = wall −
makespan (step-end work: mirrored-gradient sum, norm, optimizer, loss gather). Per rank:
``busy`` = time covered by its compute spans (overlapping spans count once); ``idle`` = makespan − busy (its bubble, as in
``SimResult.idle``), split three ways:

* ``wait`` = sum of its wait spans: idle spent blocked on an input (waiting for input);
* ``drain`` = pipeline end − the rank's last compute end: it has finished while another rank
  still computes (pipeline drain);
* ``overhead`` = idle − wait − drain: time between the step start and the rank's last compute that
  is neither compute nor wait — executor work the simulator does not model (step setup, posting
  sends and receives, span logging, and for stage 0 the data generation that runs right before
  each stage-0 F, reported apart as ``overhead_f0``: the non-wait gap before stage-0 F's).

The *bubble* is the largest per-rank idle, reported in ms and as a fraction of the step time; the
simulator's idle consists of waits and drain only, so the bubble without overhead (largest wait +
drain) is reported next to it.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import defaultdict
from dataclasses import dataclass, field

from runtime import spans

__all__ = ["NS_PER_MS", "RankStep", "StepLog", "StepFigures", "split_steps", "select_steps", "overlap_ns",
           "union_ns", "step_figures"]

NS_PER_MS = 1e6


def overlap_ns(a0: int, a1: int, b0: int, b1: int) -> int:
    """Length of the intersection of [a0, a1] and [b0, b1] (0 if they do not meet)."""
    return max(0, min(a1, b1) - max(a0, b0))


def union_ns(intervals: list[tuple[int, int]]) -> int:
    """Total length covered by the intervals: overlapping ones count once (an FB pair that runs its
    halves interleaved logs two overlapping compute spans; the rank was busy once)."""
    total, end = 0, None
    for t0, t1 in sorted(intervals):
        if end is None or t0 > end:
            total += t1 - t0
            end = t1
        elif t1 > end:
            total += t1 - end
            end = t1
    return total


@dataclass(slots=True)
class RankStep:
    """One rank's spans of one step."""

    step_span: dict
    compute: list[dict] = field(default_factory=list)
    wait: list[dict] = field(default_factory=list)
    send: list[dict] = field(default_factory=list)
    recv: list[dict] = field(default_factory=list)


@dataclass(slots=True)
class StepLog:
    """All ranks' spans of one optimizer step."""

    step: int
    ranks: dict[int, RankStep]

    @property
    def start(self) -> int:
        return min(r.step_span["t0"] for r in self.ranks.values())

    @property
    def end(self) -> int:
        return max(r.step_span["t1"] for r in self.ranks.values())


def split_steps(records: dict[int, list[dict]]) -> list[StepLog]:
    """Group every rank's spans by step: a span belongs to the step whose step span (on the same
    rank) contains its start. Steps that not every rank logged are dropped."""
    per_step: dict[int, dict[int, RankStep]] = defaultdict(dict)
    for rank, recs in records.items():
        windows = sorted((r for r in recs if r["span"] == spans.STEP), key=lambda r: r["t0"])
        for w in windows:
            per_step[w["step"]][rank] = RankStep(step_span=w)
        # one rank's steps run one after the other, so the ends are sorted too: the earliest window
        # ending at or after a span's start is the only one that can hold it (a bisection, not a
        # scan of every window per span, which made long runs quadratic)
        ends = [w["t1"] for w in windows]
        for rec in recs:
            kind = rec["span"]
            if kind not in (spans.COMPUTE, spans.WAIT, spans.SEND, spans.RECV):
                continue
            k = bisect_left(ends, rec["t0"])
            if k < len(windows) and windows[k]["t0"] <= rec["t0"]:
                getattr(per_step[windows[k]["step"]][rank], kind).append(rec)
    ranks = set(records)
    return [StepLog(step=s, ranks=rs) for s, rs in sorted(per_step.items()) if set(rs) == ranks]


def select_steps(steps: list[StepLog], first: int | None, stop: int | None) -> list[StepLog]:
    """The steps numbered ``first <= step < stop`` (None: unbounded), as Python's ``first:stop``."""
    return [s for s in steps if (first is None or s.step >= first) and (stop is None or s.step < stop)]


@dataclass(frozen=True, slots=True)
class StepFigures:
    """Idle-time accounting of one step (ms; see the module docstring)."""

    step: int
    wall_ms: float
    makespan_ms: float
    tail_ms: float
    busy_ms: dict[int, float]
    wait_ms: dict[int, float]
    idle_ms: dict[int, float]
    drain_ms: dict[int, float]
    overhead_ms: dict[int, float]
    overhead_f0_ms: dict[int, float]

    @property
    def bubble_ms(self) -> float:
        return max(self.idle_ms.values())


def _wait_of(waits: dict, c: dict) -> dict | None:
    if c["op"] == "W":
        return None
    return waits.get(("act" if c["op"] == "F" else "grad", c["dir"], c["mb"], c["chunk"]))


def step_figures(step: StepLog) -> StepFigures:
    """Wall time, pipeline makespan and per-rank busy / wait / idle / drain / overhead of one step."""
    start = step.start
    end = max((c["t1"] for rs in step.ranks.values() for c in rs.compute), default=start)
    makespan = (end - start) / NS_PER_MS
    busy, wait, idle, drain, over, over_f0 = {}, {}, {}, {}, {}, {}
    for r, rs in step.ranks.items():
        comps = sorted(rs.compute, key=lambda c: c["t0"])
        busy[r] = union_ns([(c["t0"], c["t1"]) for c in comps]) / NS_PER_MS
        wait[r] = sum(overlap_ns(w["t0"], w["t1"], start, end) for w in rs.wait) / NS_PER_MS
        idle[r] = makespan - busy[r]
        drain[r] = (end - comps[-1]["t1"]) / NS_PER_MS if comps else makespan
        over[r] = idle[r] - wait[r] - drain[r]
        waits = {(w["kind"], w["dir"], w["mb"], w["chunk"]): w for w in rs.wait}
        prev, f0 = start, 0
        for c in comps:
            if c["op"] == "F" and c.get("stage") == 0:
                w = _wait_of(waits, c)
                f0 += c["t0"] - prev - (overlap_ns(w["t0"], w["t1"], prev, c["t0"]) if w else 0)
            prev = c["t1"]
        over_f0[r] = f0 / NS_PER_MS
    return StepFigures(step=step.step, wall_ms=(step.end - start) / NS_PER_MS, makespan_ms=makespan,
                       tail_ms=(step.end - end) / NS_PER_MS, busy_ms=busy, wait_ms=wait, idle_ms=idle,
                       drain_ms=drain, overhead_ms=over, overhead_f0_ms=over_f0)
