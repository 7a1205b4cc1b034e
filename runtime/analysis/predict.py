"""The schedule simulator next to the measurement: simulator costs from measured compute times,
and the gap the simulator predicts before every compute.

Simulator costs (:func:`costs_from_means`): ``f`` = mean F; ``b`` = mean full (unsplit) B, or
mean split B + mean W when no B is full (ZB1P); ``w`` = mean W (0 without W's); ``fb`` = mean
over FB pairs of F + B of the pair (the executor runs the halves one after the other on one
core, so there is no compute overlap gain), else ``f + b``; clamped to what :class:`Costs` accepts
(``w ≤ b``, ``fb ≥ max(f, b)``). Stages are uneven (the first holds the embedding, the last the
head and loss): ``stage_scale`` (:func:`stage_scale_from`) gives each stage its measured
F + B relative to the mean over stages, and the simulator scales that stage's computes by it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from runtime.analysis.messages import Message, Plan
from runtime.analysis.steps import NS_PER_MS, StepLog, union_ns
from runtime.schedules import FB, Compute, Costs, SimResult

__all__ = ["compute_means", "stage_means", "stage_scale_from", "costs_from_means", "compute_key",
           "predicted_waits", "measured_waits", "unexpected_waits"]


def compute_means(steps: Iterable[StepLog], p: Plan) -> dict[str, dict]:
    """Mean duration (ms) and count of: ``F``; ``B`` full backward (inside pairs too); ``Bsplit``
    (input-gradient part of a split B); ``W``; ``FB`` (one pair: the time its two halves cover, F + B
    when they run back to back). Absent kinds are left out."""
    split = {(r, a.dir, a.mb, a.chunk): a.split for r, acts in enumerate(p.schedule.ranks) for a in acts
             if isinstance(a, Compute) and a.op == "B"}
    durs: dict[str, list[float]] = defaultdict(list)
    for st in steps:
        for r, rs in st.ranks.items():
            by_key = {}
            for c in rs.compute:
                d = (c["t1"] - c["t0"]) / NS_PER_MS
                by_key[(c["op"], c["dir"], c["mb"], c["chunk"])] = (c["t0"], c["t1"])
                if c["op"] == "B":
                    durs["Bsplit" if split.get((r, c["dir"], c["mb"], c["chunk"])) else "B"].append(d)
                else:
                    durs[c["op"]].append(d)
            for rank, fk, bk in p.pairs:
                if rank == r and fk in by_key and bk in by_key:
                    durs["FB"].append(union_ns([by_key[fk], by_key[bk]]) / NS_PER_MS)
    return {k: {"mean_ms": sum(v) / len(v), "n": len(v)} for k, v in durs.items() if v}


def stage_means(steps: Iterable[StepLog]) -> dict[str, dict[int, float]]:
    """Mean duration (ms) per op and stage (a split and a full B both count as B): how uneven the
    stages are (they become the simulator's ``stage_scale``)."""
    durs: dict[tuple[str, int], list[float]] = defaultdict(list)
    for st in steps:
        for rs in st.ranks.values():
            for c in rs.compute:
                durs[(c["op"], c["stage"])].append((c["t1"] - c["t0"]) / NS_PER_MS)
    out: dict[str, dict[int, float]] = defaultdict(dict)
    for (op, stage), v in sorted(durs.items()):
        out[op][stage] = sum(v) / len(v)
    return dict(out)


def stage_scale_from(stage_ms: dict[str, dict[int, float]], num_stages: int) -> tuple[float, ...]:
    """Per-stage cost factors for :class:`Costs`: stage s's mean F + B over the mean of that sum
    across stages (so the factors average 1); () if some stage has no measured F or B. W is left
    out: only some stages split some Bs, so its mean would weigh stages unevenly."""
    totals = []
    for stage in range(num_stages):
        if stage not in stage_ms.get("F", {}) or stage not in stage_ms.get("B", {}):
            return ()
        totals.append(stage_ms["F"][stage] + stage_ms["B"][stage])
    mean = sum(totals) / num_stages
    return tuple(t / mean for t in totals) if mean > 0 else ()


def costs_from_means(means: dict[str, dict], comm_ms: float, stage_scale: tuple[float, ...] = ()) -> Costs:
    """Simulator costs from measured means (rules in the module docstring)."""
    get = lambda k: means[k]["mean_ms"] if k in means else None  # noqa: E731
    f = get("F") or 0.0
    w = get("W") or 0.0
    if get("B") is not None:
        b = get("B")
    elif get("Bsplit") is not None:
        b = get("Bsplit") + w
    else:
        b = 0.0
    w = min(w, b)
    fb = get("FB") if get("FB") is not None else f + b
    fb = max(fb, f, b)
    return Costs(f=f, b=b, w=w, fb=fb, comm=max(0.0, comm_ms), stage_scale=stage_scale)


def compute_key(rank: int, c: Compute) -> tuple:
    """(rank, op, dir, mb, chunk): how measured and simulated computes are matched."""
    return (rank, c.op, c.dir, c.mb, c.chunk)


def predicted_waits(sim: SimResult) -> dict[tuple, float]:
    """Per compute (rank, op, dir, mb, chunk): the simulator's idle gap right before it (its start −
    the end of the rank's previous compute, or its start for the first). An FB pair's gap goes to
    its F half (the pair starts when both inputs are there); its B half gets 0."""
    out = {}
    for rank, spans in enumerate(sim.spans):
        prev = 0.0
        for sp in spans:
            gap = max(0.0, sp.start - prev)
            if isinstance(sp.action, FB):
                out[compute_key(rank, sp.action.f)] = gap
                out[compute_key(rank, sp.action.b)] = 0.0
            else:
                out[compute_key(rank, sp.action)] = gap
            prev = sp.end
    return out


def measured_waits(steps: list[StepLog]) -> dict[tuple, float]:
    """Mean wait (ms) before each compute (rank, op, dir, mb, chunk) over ``steps``; a wait for an
    activation belongs to the F, for a gradient to the B."""
    tot: dict[tuple, float] = defaultdict(float)
    for st in steps:
        for r, rs in st.ranks.items():
            for w in rs.wait:
                op = "F" if w["kind"] == "act" else "B"
                tot[(r, op, w["dir"], w["mb"], w["chunk"])] += (w["t1"] - w["t0"]) / NS_PER_MS
    return {k: v / len(steps) for k, v in tot.items()} if steps else {}


def unexpected_waits(steps: list[StepLog], sim: SimResult, *, threshold_ms: float,
                     messages: Iterable[Message] = ()) -> list[dict]:
    """Computes whose mean measured wait exceeds the simulator's predicted gap before them by more
    than ``threshold_ms``, largest excess first. With ``messages``, each row also says how much of
    the wait (mean per step) the input was in flight (``in_flight_ms``: exposed communication);
    the rest was spent before the producer sent it (the producer was late)."""
    pred = predicted_waits(sim)
    exposed: dict[tuple, float] = defaultdict(float)
    for m in messages:
        exposed[(m.dst, "F" if m.kind == "act" else "B", m.dir, m.mb, m.chunk)] += m.exposed_ns / NS_PER_MS
    rows = []
    for key, got in measured_waits(steps).items():
        want = pred.get(key, 0.0)
        if got - want > threshold_ms:
            rank, op, d, mb, chunk = key
            rows.append({"rank": rank, "op": op, "dir": d, "mb": mb, "chunk": chunk,
                         "measured_wait_ms": got, "predicted_gap_ms": want, "excess_ms": got - want,
                         "in_flight_ms": exposed.get(key, 0.0) / len(steps)})
    return sorted(rows, key=lambda r: -r["excess_ms"])
