"""Log analysis for ``bench.pipeline``: what the per-rank JSON logs of a training run say about
compute, idle time, communication and its overlap, next to the schedule simulator.

Pure functions over the span records that :mod:`actors.pipeline` and :mod:`runtime.transport`
write (README "Logs"); nothing here launches MPI or imports torch. All times are
``time.monotonic_ns()`` values (one clock per host: the ranks of a local run line up directly);
the figures come out in milliseconds.

What the logs record (per rank, per step)
-----------------------------------------
* ``span="step"``: the whole optimizer step on this rank (actions, then mirrored-gradient sum,
  gradient norm, AdamW, loss gather, flush).
* ``span="compute"`` (``op`` F/B/W, ``dir``, ``mb``, ``chunk``): one compute. An overlapped pair
  ``FB(f, b)`` of the schedule is logged as its two halves, F then B, run back to back.
* ``span="wait"`` (``kind``, ``dir``, ``mb``, ``chunk`` = the *receiver's* chunk): the time the
  consuming compute sat in ``transport.wait`` for its input (activation for an F, output gradient
  for a B) before starting.
* ``span="send"`` (``peer``, ``channel``, ``mb``, ``dir``, ``chunk`` = sender's): ``t0`` = isend
  posted (right after the producing compute; for the forward half of an FB pair, between the two
  halves), ``t1`` = the sender's transport saw the receiver match the message.
* ``span="recv"`` (same header fields, ``peer`` = sender): ``t0`` = receive posted (ahead of the
  consumer), ``t1`` = the receiver's transport found the data in place.

Definitions
-----------
Per step: ``start`` = earliest step-span start over the ranks (the simulator starts all ranks at
0); ``pipeline end`` = latest compute end over the ranks; ``makespan`` = end − start (the
simulator's makespan); ``wall`` = latest step-span end − start (the step time); ``tail`` = wall −
makespan (step-end work: mirrored-gradient sum, norm, optimizer, loss gather). Per rank:
``busy`` = sum of its compute spans; ``idle`` = makespan − busy (its bubble, as in
``SimResult.idle``); ``wait`` = sum of its wait spans (idle spent blocked on an input);
``drain`` = pipeline end − the rank's last compute end (it has finished while another rank
still computes); ``overhead`` = idle − wait − drain: time between the step start and the rank's
last compute that is neither compute nor wait — executor work the simulator does not model
(step setup, posting sends and receives, span logging, and for stage 0 the data generation that
runs right before each stage-0 F, reported apart as ``overhead_f0``: the non-wait gap before
stage-0 F's). The *bubble* is the largest per-rank idle, reported in ms and as a fraction of the
step time; the simulator's idle consists of waits and drain only, so the bubble without overhead
(largest wait + drain) is reported next to it.

Messages: every cross-rank ``Recv`` of the schedule is one message per step. Its log spans are
matched by (src, dst, channel, dir, mb) and its consumer's wait span by (dst, kind, dir, mb,
receiver chunk). For a message: ``sent`` = send t0, ``posted`` = recv t0, ``landed`` = recv t1,

* in flight: ``[max(sent, posted), landed]``; communication time ``C`` = its length;
* exposed ``X`` = length of (in flight ∩ the consumer's wait span): time the receiver sat idle
  while the message was moving. Waiting *before* ``sent`` is a dependency (the producer had not
  produced yet), not communication, and is excluded by the intersection;
* hidden ``H = C − X``: in-flight time during which the receiver did something else (computed).

A message is in the *FB phase* if its producer or its consumer is a half of an ``FB`` pair of the
schedule. The *FB overlap* is ``ΣH / ΣC`` over FB-phase messages (all measured steps). Because
``C`` is inflated by detection delay (limit 1 below), a stricter *nominal* figure is reported
too: ``1 − ΣX / (n · hop)``, exposure against n messages costing one unhidden hop latency each
(the per-hop latency below), clamped to [0, 1].

Limits of the overlap figure (what the logs cannot show):

1. ``landed`` is when the receiver's transport *noticed* the data: progress runs once per
   transformer block (forward and backward) and inside waits, so while the receiver computes,
   ``C`` includes up to one block of detection delay, counted as hidden. With MPICH's shared
   memory and no progress thread a large message only advances inside MPI calls on both ranks,
   so this delayed time is partly real transfer time too; the logs cannot separate the two.
   ``C`` is "time until the receiver could have used the data", not wire time.
2. CPU time spent posting (isend: header pack and MPI posting, ~35-40 µs per message on the
   2-core VM, see docs/runtime.md) and decoding is on the rank's core between computes; it is in
   neither ``C`` nor the wait, so it is not counted as exposed (it shows up in ``overhead``).
3. Only exposure at the consumer is counted. A sender held by backpressure (``max_inflight``) in
   ``isend`` would be exposed time too, but it is not logged as a wait.

Per-hop latency for the simulator: over messages whose consumer was already waiting when the
message left (wait t0 ≤ in-flight start < wait t1), ``landed − in-flight start`` — the latency of a
transfer that nothing hides. The median of those samples is ``Costs.comm``; with no sample it is 0
(reported as such).

Simulator costs (:func:`costs_from_means`): ``f`` = mean F; ``b`` = mean full (unsplit) B, or
mean split B + mean W when no B is full (ZB1P); ``w`` = mean W (0 without W's); ``fb`` = mean
over FB pairs of F + B of the pair (the executor runs the halves one after the other on one
core, so there is no compute overlap gain), else ``f + b``; clamped to what :class:`Costs` accepts
(``w ≤ b``, ``fb ≥ max(f, b)``). Stages are uneven (the first holds the embedding, the last the
head and loss): ``stage_scale`` (:func:`stage_scale_from`) gives each stage its measured
F + B relative to the mean over stages, and the simulator scales that stage's computes by it.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from runtime.schedules import FB, Compute, Costs, Recv, Schedule, Send, SimResult, simulate

__all__ = [
    "RunLog",
    "RankStep",
    "StepLog",
    "Plan",
    "Message",
    "StepFigures",
    "parse_lines",
    "read_run",
    "split_steps",
    "plan",
    "overlap_ns",
    "match_messages",
    "step_figures",
    "compute_means",
    "stage_means",
    "hop_latency",
    "fb_overlap",
    "costs_from_means",
    "stage_scale_from",
    "predicted_waits",
    "unexpected_waits",
    "summarize",
]

NS_PER_MS = 1e6


# ---------------------------------------------------------------------------------------- reading
@dataclass(slots=True)
class RunLog:
    """The span records of one run, per rank, and rank 0's ``config`` record (schedule, pp, ...)."""

    config: dict
    spans: dict[int, list[dict]]


def parse_lines(lines: Iterable[str]) -> tuple[dict | None, list[dict]]:
    """One rank's log lines → (its ``config`` record or None, its ``span`` records)."""
    config, spans = None, []
    for line in lines:
        line = line.strip()
        if not line:
            continue
        rec = json.loads(line)
        if rec.get("event") == "span":
            spans.append(rec)
        elif rec.get("event") == "config" and config is None:
            config = rec
    return config, spans


def read_run(run_dir: str | Path) -> RunLog:
    """Read ``run_dir/rank-*.jsonl`` (one run of ``launch.train``)."""
    run_dir = Path(run_dir)
    files = sorted(run_dir.glob("rank-*.jsonl"), key=lambda p: int(p.stem.split("-")[1]))
    if not files:
        raise FileNotFoundError(f"{run_dir}: no rank-*.jsonl logs")
    config, spans = None, {}
    for path in files:
        rank = int(path.stem.split("-")[1])
        cfg, recs = parse_lines(path.read_text().splitlines())
        spans[rank] = recs
        if rank == 0:
            config = cfg
    if config is None:
        raise ValueError(f"{run_dir}: rank 0's log has no 'config' record")
    return RunLog(config=config, spans=spans)


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


def split_steps(spans: dict[int, list[dict]]) -> list[StepLog]:
    """Group every rank's spans by step: a span belongs to the step whose step span (on the same
    rank) contains its start. Steps that not every rank logged are dropped."""
    per_step: dict[int, dict[int, RankStep]] = defaultdict(dict)
    for rank, recs in spans.items():
        windows = sorted((r for r in recs if r["span"] == "step"), key=lambda r: r["t0"])
        for w in windows:
            per_step[w["step"]][rank] = RankStep(step_span=w)
        for rec in recs:
            kind = rec["span"]
            if kind == "step" or kind not in ("compute", "wait", "send", "recv"):
                continue
            for w in windows:
                if w["t0"] <= rec["t0"] <= w["t1"]:
                    getattr(per_step[w["step"]][rank], kind).append(rec)
                    break
    ranks = set(spans)
    return [StepLog(step=s, ranks=rs) for s, rs in sorted(per_step.items()) if set(rs) == ranks]


# ------------------------------------------------------------------------------ schedule facts
@dataclass(frozen=True, slots=True)
class PlannedMessage:
    """One cross-rank message of the schedule (per step)."""

    src: int
    dst: int
    kind: str
    dir: int
    mb: int
    tag: int
    dst_chunk: int
    fb: bool
    """Its producer or its consumer is a half of an FB pair."""


@dataclass(frozen=True, slots=True)
class Plan:
    """What the analysis needs from a schedule."""

    schedule: Schedule
    pair_halves: frozenset
    """(rank, op, dir, mb, chunk) of every compute that is a half of an FB pair."""
    messages: tuple[PlannedMessage, ...]
    pairs: tuple[tuple[int, tuple, tuple], ...]
    """(rank, F key, B key) of every FB pair; keys are (op, dir, mb, chunk)."""


def plan(schedule: Schedule) -> Plan:
    """Pair halves and cross-rank messages of ``schedule``."""
    halves, pairs = set(), []
    src_chunk: dict[tuple, int] = {}
    for rank, actions in enumerate(schedule.ranks):
        for a in actions:
            if isinstance(a, FB):
                fk, bk = (("F", a.f.dir, a.f.mb, a.f.chunk), ("B", a.b.dir, a.b.mb, a.b.chunk))
                halves.update({(rank, *fk), (rank, *bk)})
                pairs.append((rank, fk, bk))
            elif isinstance(a, Send):
                src_chunk[(rank, a.peer, a.tag, a.dir, a.mb)] = a.chunk
    msgs = []
    for rank, actions in enumerate(schedule.ranks):
        for a in actions:
            if not isinstance(a, Recv):
                continue
            producer_op = consumer_op = "F" if a.kind == "act" else "B"
            sc = src_chunk[(a.peer, rank, a.tag, a.dir, a.mb)]
            fb = (rank, consumer_op, a.dir, a.mb, a.chunk) in halves or \
                 (a.peer, producer_op, a.dir, a.mb, sc) in halves
            msgs.append(PlannedMessage(src=a.peer, dst=rank, kind=a.kind, dir=a.dir, mb=a.mb, tag=a.tag,
                                       dst_chunk=a.chunk, fb=fb))
    return Plan(schedule=schedule, pair_halves=frozenset(halves), messages=tuple(msgs), pairs=tuple(pairs))


# ------------------------------------------------------------------------------------ messages
def overlap_ns(a0: int, a1: int, b0: int, b1: int) -> int:
    """Length of the intersection of [a0, a1] and [b0, b1] (0 if they do not meet)."""
    return max(0, min(a1, b1) - max(a0, b0))


@dataclass(frozen=True, slots=True)
class Message:
    """One measured message (see the module docstring for the definitions)."""

    step: int
    src: int
    dst: int
    kind: str
    dir: int
    mb: int
    fb: bool
    sent: int
    posted: int
    landed: int
    wait: tuple[int, int] | None
    chunk: int = 0
    """The receiver's chunk (the consumer's)."""

    @property
    def start(self) -> int:
        return max(self.sent, self.posted)

    @property
    def comm_ns(self) -> int:
        return max(0, self.landed - self.start)

    @property
    def exposed_ns(self) -> int:
        return 0 if self.wait is None else overlap_ns(self.start, self.landed, *self.wait)

    @property
    def hidden_ns(self) -> int:
        return self.comm_ns - self.exposed_ns


def match_messages(step: StepLog, p: Plan) -> tuple[list[Message], int]:
    """The step's messages with their send, recv and consumer-wait spans; also how many planned
    messages had no matching send or recv span (0 in a complete log)."""
    sends = {(r, s["peer"], s["channel"], s["dir"], s["mb"]): s
             for r, rs in step.ranks.items() for s in rs.send if s.get("kind") in ("act", "grad")}
    recvs = {(r, s["peer"], s["channel"], s["dir"], s["mb"]): s
             for r, rs in step.ranks.items() for s in rs.recv if s.get("kind") in ("act", "grad")}
    waits = {(r, w["kind"], w["dir"], w["mb"], w["chunk"]): w for r, rs in step.ranks.items() for w in rs.wait}
    out, missing = [], 0
    for m in p.messages:
        s = sends.get((m.src, m.dst, m.tag, m.dir, m.mb))
        r = recvs.get((m.dst, m.src, m.tag, m.dir, m.mb))
        if s is None or r is None:
            missing += 1
            continue
        w = waits.get((m.dst, m.kind, m.dir, m.mb, m.dst_chunk))
        out.append(Message(step=step.step, src=m.src, dst=m.dst, kind=m.kind, dir=m.dir, mb=m.mb, fb=m.fb,
                           sent=s["t0"], posted=r["t0"], landed=r["t1"],
                           wait=None if w is None else (w["t0"], w["t1"]), chunk=m.dst_chunk))
    return out, missing


def hop_latency(messages: Iterable[Message]) -> tuple[float, int]:
    """Per-hop latency in ms: median of ``landed − start`` over messages whose consumer was already
    waiting when they left; (0.0, 0) without such a message."""
    samples = [m.landed - m.start for m in messages
               if m.wait is not None and m.wait[0] <= m.start < m.wait[1] and m.landed >= m.start]
    if not samples:
        return 0.0, 0
    return statistics.median(samples) / NS_PER_MS, len(samples)


def fb_overlap(messages: Iterable[Message], *, fb_only: bool = True, hop_ms: float | None = None) -> dict:
    """Communication time, exposed and hidden time (ms) and the hidden fraction (None when there
    is no communication) over the (FB-phase) messages. With ``hop_ms``, also the stricter
    ``hidden_fraction_nominal`` = 1 − exposed / (messages × hop_ms), clamped to [0, 1]: exposure
    against what the messages would cost if each took one unhidden hop (not inflated by detection
    delay, see the module docstring)."""
    sel = [m for m in messages if m.fb or not fb_only]
    comm = sum(m.comm_ns for m in sel)
    exposed = sum(m.exposed_ns for m in sel)
    out = {"messages": len(sel), "comm_ms": comm / NS_PER_MS, "exposed_ms": exposed / NS_PER_MS,
           "hidden_ms": (comm - exposed) / NS_PER_MS, "hidden_fraction": (comm - exposed) / comm if comm else None}
    if hop_ms is not None:
        nominal = len(sel) * hop_ms
        out["nominal_comm_ms"] = nominal
        out["hidden_fraction_nominal"] = min(1.0, max(0.0, 1 - exposed / NS_PER_MS / nominal)) if nominal > 0 else None
    return out


# ----------------------------------------------------------------------------- step figures
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
        busy[r] = sum(c["t1"] - c["t0"] for c in comps) / NS_PER_MS
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


def compute_means(steps: Iterable[StepLog], p: Plan) -> dict[str, dict]:
    """Mean duration (ms) and count of: ``F``; ``B`` full backward (inside pairs too); ``Bsplit``
    (input-gradient part of a split B); ``W``; ``FB`` (F + B of one pair). Absent kinds are left out."""
    split = {(r, a.dir, a.mb, a.chunk): a.split for r, acts in enumerate(p.schedule.ranks) for a in acts
             if isinstance(a, Compute) and a.op == "B"}
    durs: dict[str, list[float]] = defaultdict(list)
    for st in steps:
        for r, rs in st.ranks.items():
            by_key = {}
            for c in rs.compute:
                d = (c["t1"] - c["t0"]) / NS_PER_MS
                by_key[(c["op"], c["dir"], c["mb"], c["chunk"])] = d
                if c["op"] == "B":
                    durs["Bsplit" if split.get((r, c["dir"], c["mb"], c["chunk"])) else "B"].append(d)
                else:
                    durs[c["op"]].append(d)
            for rank, fk, bk in p.pairs:
                if rank == r and fk in by_key and bk in by_key:
                    durs["FB"].append(by_key[fk] + by_key[bk])
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


# ------------------------------------------------------------------------------- expected waits
def _compute_key(rank: int, c: Compute) -> tuple:
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
                out[_compute_key(rank, sp.action.f)] = gap
                out[_compute_key(rank, sp.action.b)] = 0.0
            else:
                out[_compute_key(rank, sp.action)] = gap
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


# ------------------------------------------------------------------------------------- summary
def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def summarize(runs: list[tuple[Schedule, list[StepLog]]], *, wait_threshold_ms: float | None = None) -> dict:
    """All figures of one schedule from its measured steps (several runs of the same schedule).

    Returns step times, idle accounting (median over steps, per rank), mean compute times,
    the per-hop latency, the simulator's figures for the measured costs, the FB overlap and the
    unexpected waits. Needs at least one step.
    """
    schedule = runs[0][0]
    p = plan(schedule)
    steps = [st for _, sts in runs for st in sts]
    if not steps:
        raise ValueError(f"{schedule.name}: no measured steps to summarize")
    figs = [step_figures(st) for st in steps]
    msgs, missing = [], 0
    for st in steps:
        got, miss = match_messages(st, p)
        msgs += got
        missing += miss
    means = compute_means(steps, p)
    comm_ms, comm_n = hop_latency(msgs)
    per_stage = stage_means(steps)
    costs = costs_from_means(means, comm_ms, stage_scale_from(per_stage, schedule.num_stages))
    sim = simulate(schedule, costs)
    ranks = sorted(figs[0].idle_ms)
    step_ms = _median([f.wall_ms for f in figs])
    idle = {r: _median([f.idle_ms[r] for f in figs]) for r in ranks}
    med = lambda attr: {r: _median([getattr(f, attr)[r] for f in figs]) for r in ranks}  # noqa: E731
    wait, drain, over, over_f0, busy = (med(a) for a in ("wait_ms", "drain_ms", "overhead_ms", "overhead_f0_ms",
                                                         "busy_ms"))
    bubble = max(idle.values())
    no_over = max(_median([f.idle_ms[r] - f.overhead_ms[r] for f in figs]) for r in ranks)
    sim_bubble = sim.bubble
    threshold = wait_threshold_ms if wait_threshold_ms is not None else max(1.0, 0.05 * costs.f)
    return {
        "schedule": schedule.name,
        "pp": schedule.pp,
        "stages": schedule.num_stages,
        "microbatches": schedule.microbatches,
        "steps_measured": len(steps),
        "step_ms": [f.wall_ms for f in figs],
        "median_step_ms": step_ms,
        "median_makespan_ms": _median([f.makespan_ms for f in figs]),
        "median_tail_ms": _median([f.tail_ms for f in figs]),
        "busy_ms": busy,
        "idle_ms": idle,
        "wait_ms": wait,
        "drain_ms": drain,
        "overhead_ms": over,
        "overhead_f0_ms": over_f0,
        "bubble_ms": bubble,
        "bubble_fraction": bubble / step_ms,
        "bubble_without_overhead_ms": no_over,
        "means": means,
        "stage_means_ms": per_stage,
        "stage_scale": list(costs.stage_scale),
        "comm_per_hop_ms": comm_ms,
        "comm_samples": comm_n,
        "messages_unmatched": missing,
        "costs_ms": {"f": costs.f, "b": costs.b, "w": costs.w, "fb": costs.fb, "comm": costs.comm},
        "sim": {"makespan_ms": sim.makespan, "busy_ms": dict(enumerate(sim.busy)),
                "idle_ms": dict(enumerate(sim.idle)), "bubble_ms": sim_bubble,
                "bubble_fraction": sim_bubble / step_ms},
        "bubble_diff_pct_of_step": 100.0 * (bubble - sim_bubble) / step_ms,
        "bubble_without_overhead_diff_pct_of_step": 100.0 * (no_over - sim_bubble) / step_ms,
        "fb_overlap": fb_overlap(msgs, hop_ms=comm_ms) if p.pairs else None,
        "all_overlap": fb_overlap(msgs, fb_only=False, hop_ms=comm_ms),
        "unexpected_waits": unexpected_waits(steps, sim, threshold_ms=threshold, messages=msgs),
        "unexpected_wait_threshold_ms": threshold,
    }
