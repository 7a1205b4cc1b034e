"""Messages of a run: the schedule's cross-rank messages matched to their log spans, how much of
their time the receiver spent waiting (exposed) or computing (hidden), and traffic by link class.

Every cross-rank ``Recv`` of the schedule is one message per step. Its log spans are matched by
(src, dst, channel, dir, mb) and its consumer's wait span by (dst, kind, dir, mb, receiver chunk).
For a message: ``sent`` = send t0 (isend posted, right after the producing compute; for the
forward half of an FB pair, between the two halves), ``posted`` = recv t0 (receive posted ahead of
the consumer), ``landed`` = recv t1 (the receiver's transport found the data in place),

* in flight: ``[max(sent, posted), landed]``; communication time ``C`` = its length;
* exposed ``X`` = length of (in flight ∩ the consumer's wait span): time the receiver sat idle
  while the message was moving. Waiting *before* ``sent`` is a dependency (the producer had not
  produced yet), not communication, and is excluded by the intersection;
* hidden ``H = C − X``: in-flight time during which the receiver did something else (computed).

A message is in the *FB phase* if its producer or its consumer is a half of an ``FB`` pair of the
schedule. The *FB overlap* is ``ΣH / ΣC`` over FB-phase messages. Because ``C`` is inflated by
detection delay (limit 1 below), a stricter *nominal* figure is reported too:
``1 − ΣX / (n · hop)``, exposure against n messages costing one unhidden hop latency each (the
per-hop latency below), clamped to [0, 1].

Limits of the overlap figure (what the logs cannot show):

1. ``landed`` is when the receiver's transport *noticed* the data: progress runs once per
   transformer block (forward and backward) and inside waits, so while the receiver computes,
   ``C`` includes up to one block of detection delay, counted as hidden. With MPICH's shared
   memory and no progress thread a large message only advances inside MPI calls on both ranks,
   so this delayed time is partly real transfer time too; the logs cannot separate the two.
   ``C`` is "time until the receiver could have used the data", not wire time.
2. CPU time spent posting (isend: header pack and MPI posting) and decoding is on the rank's core
   between computes; it is in neither ``C`` nor the wait, so it is not counted as exposed (it
   shows up in ``overhead``).
3. Only exposure at the consumer is counted. A sender held by backpressure (``max_inflight``) in
   ``isend`` would be exposed time too, but it is not logged as a wait.

Per-hop latency for the simulator: over messages whose consumer was already waiting when the
message left (wait t0 ≤ in-flight start < wait t1), ``landed − in-flight start`` — the latency of a
transfer that nothing hides. The median of those samples is ``Costs.comm``; with no sample it is 0.

Traffic by link class (:func:`traffic`): every send span (pipeline activations and gradients,
control messages, and any kind a later layer adds, e.g. expert-parallel dispatch/combine) summed
by (message kind, link class); the link class of a (src, dst) pair comes from a function of the
two ranks (:func:`host_link_class`: ``intra-node`` when both logged the same host, else
``inter-node``; pass a finer one, e.g. from a topology, for NVLink/IB/PCIe classes).
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from runtime import spans
from runtime.analysis.steps import NS_PER_MS, StepLog, overlap_ns
from runtime.schedules import FB, Recv, Schedule, Send

__all__ = ["PlannedMessage", "Plan", "Message", "plan", "match_messages", "hop_latency", "fb_overlap",
           "host_link_class", "traffic"]


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
    src_chunk: int
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
                                       dst_chunk=a.chunk, src_chunk=sc, fb=fb))
    return Plan(schedule=schedule, pair_halves=frozenset(halves), messages=tuple(msgs), pairs=tuple(pairs))


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
    src_chunk: int = 0
    """The sender's chunk (the producer's)."""

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
                           wait=None if w is None else (w["t0"], w["t1"]), chunk=m.dst_chunk,
                           src_chunk=m.src_chunk))
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


def host_link_class(hosts: dict[int, str]) -> Callable[[int, int], str]:
    """Link class of a rank pair from the hosts the ranks logged: ``intra-node`` or ``inter-node``."""
    return lambda src, dst: "intra-node" if hosts.get(src) == hosts.get(dst) else "inter-node"


def traffic(records: dict[int, list[dict]], link_class: Callable[[int, int], str],
            window: tuple[int, int] | None = None) -> list[dict]:
    """Messages, bytes and time (send post to completion, summed) per (kind, link class) over the
    send spans of every rank (those starting inside ``window``, if given), largest bytes first."""
    acc: dict[tuple[str, str], list] = defaultdict(lambda: [0, 0, 0])
    for src, recs in records.items():
        for s in recs:
            if s["span"] != spans.SEND or (window and not window[0] <= s["t0"] < window[1]):
                continue
            a = acc[(s["kind"], link_class(src, s["peer"]))]
            a[0] += 1
            a[1] += s["nbytes"]
            a[2] += s["t1"] - s["t0"]
    rows = [{"kind": k, "link": link, "messages": n, "bytes": b, "time_ms": t / NS_PER_MS}
            for (k, link), (n, b, t) in acc.items()]
    return sorted(rows, key=lambda r: (-r["bytes"], r["kind"], r["link"]))
