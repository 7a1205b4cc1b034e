"""Walk a :class:`Schedule` with per-action costs: validity, deadlock, timing, memory.

Execution model (the executor's): every rank walks its list in order. A ``Recv`` is posted at
once and costs nothing; a ``Send`` leaves at once and arrives ``comm`` later; a compute starts
when the rank is free and all its inputs are there -- remote ones when their message has arrived,
local ones (an earlier compute of the same rank) when that compute has finished. Links are not
shared, so there is no contention: the times do not depend on the order ranks are advanced in.

Costs are per chunk: ``f`` a forward, ``b`` a full backward (input and weight gradients), ``w`` the
weight-gradient part, so a split ``B`` costs ``b - w``; ``fb`` an overlapped forward+backward pair.
Activations are counted in units of one stage's activations for one microbatch: a forward adds
one, which stays live until its full ``B`` or, for a split one, until its ``W`` (the weight pass
still needs the stage inputs). Inside an overlapped pair both are live at once.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from .actions import FB, Action, Compute, Recv, Schedule, Send, tag_for
from .layout import KINDS_TABLE

__all__ = [
    "Costs",
    "Span",
    "SimResult",
    "ClosedForm",
    "ScheduleError",
    "DeadlockError",
    "validate",
    "simulate",
    "closed_form",
]


class ScheduleError(ValueError):
    """The schedule is not a valid, complete pipeline step (the message says what and where)."""


class DeadlockError(ScheduleError):
    """Every unfinished rank waits for a message whose Send its peer has not reached."""

    def __init__(self, message: str, waiting: dict[int, str]) -> None:
        super().__init__(message)
        self.waiting = waiting
        """Per blocked rank: the action it waits at and the message it waits for."""


@dataclass(kw_only=True, slots=True, frozen=True)
class Costs:
    """Time of each kind of action, in any one unit."""

    f: float
    """Forward of one chunk (F)."""
    b: float
    """Full backward of one chunk, input plus weight gradients (B in the DualPipe table)."""
    w: float
    """Weight-gradient part of a backward (W); a split B costs ``b - w``."""
    fb: float
    """A forward and a backward chunk run overlapped (F&B)."""
    comm: float = 0.0
    """Latency of one point-to-point message between neighbouring ranks (per hop)."""
    stage_scale: tuple[float, ...] = ()
    """Optional per-stage factor on every compute of that stage (uneven stages: the first holds the
    embedding, the last the head and loss); one entry per model stage, () = all stages cost the same.
    An overlapped pair scales by its halves' factors weighted by their costs."""
    rank_scale: tuple[float, ...] = ()
    """Optional per-rank factor on every compute of that rank, on top of :attr:`stage_scale` (a
    slower device: 1 / its relative speed); one entry per rank, () = all ranks equally fast."""

    def __post_init__(self) -> None:
        for name in ("f", "b", "w", "fb", "comm"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"Costs.{name}={v!r}: must be a finite number >= 0")
        for name in ("stage_scale", "rank_scale"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
            for i, v in enumerate(getattr(self, name)):
                if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                    raise ValueError(f"Costs.{name}[{i}]={v!r}: must be a finite number > 0")
        if self.w > self.b:
            raise ValueError(f"Costs.w={self.w} > Costs.b={self.b}: W is part of the full backward B; use w <= b")
        if self.fb < max(self.f, self.b):
            raise ValueError(
                f"Costs.fb={self.fb} < max(f, b)={max(self.f, self.b)}: an overlapped pair takes at least as long "
                "as its longer half; use fb >= max(f, b) (fb = f + b means no overlap gain)"
            )

    def of(self, action: Compute | FB) -> float:
        """Duration of one compute action."""
        if isinstance(action, FB):
            return self.fb
        if action.op == "F":
            return self.f
        if action.op == "W":
            return self.w
        return self.b - self.w if action.split else self.b

    def at(self, action: Compute | FB, stage_of: Callable[[int], int]) -> float:
        """Duration of ``action`` on the stages its chunks run (``stage_of(chunk)``), with
        :attr:`stage_scale` applied; the same as :meth:`of` when no scale is given."""
        if not self.stage_scale:
            return self.of(action)
        if isinstance(action, FB):
            f, b = self.of(action.f), self.of(action.b)
            if f + b == 0:
                return self.fb
            weighted = f * self.stage_scale[stage_of(action.f.chunk)] + b * self.stage_scale[stage_of(action.b.chunk)]
            return self.fb * weighted / (f + b)
        return self.of(action) * self.stage_scale[stage_of(action.chunk)]


@dataclass(frozen=True, slots=True)
class Span:
    """When one compute action ran."""

    index: int
    """Position of the action in its rank's list."""
    action: Compute | FB
    """The compute action."""
    start: float
    """Start time."""
    end: float
    """End time."""


@dataclass(kw_only=True, slots=True, frozen=True)
class SimResult:
    """What a simulated step looks like."""

    makespan: float
    """Time from the first action to the last one on any rank."""
    busy: tuple[float, ...]
    """Per rank: total compute time."""
    idle: tuple[float, ...]
    """Per rank: ``makespan - busy``, i.e. that rank's bubble."""
    peak_activations: tuple[int, ...]
    """Per rank: most stage-activations live at once (see module docstring)."""
    param_copies: tuple[int, ...]
    """Per rank: stages whose parameters it holds, in units of one stage."""
    spans: tuple[tuple[Span, ...], ...]
    """Per rank: its compute actions with start and end times, in list order."""

    @property
    def bubble(self) -> float:
        """Largest per-rank idle time: what the slowest-to-fill device loses in one step."""
        return max(self.idle)


@dataclass(kw_only=True, slots=True, frozen=True)
class ClosedForm:
    """The DualPipe README figures for a schedule on ``PP`` stages."""

    bubble: float
    """Bubble time per device."""
    params: int
    """Parameters per device, in units of one stage's parameters (PP stages)."""
    activations: int
    """Peak activations per device, in units of one stage-microbatch."""
    devices: int
    """Ranks used."""
    assumption: str
    """The cost condition under which ``bubble`` is the schedule's bubble (docs/schedules.md)."""
    holds: bool
    """Whether the costs given meet ``assumption``; if not, ``bubble`` is only the formula's value
    (it can even be negative) and the simulator's figure is the one to use."""


def _one_f_one_b_form(pp_stages: int, c: Costs, base: str, uniform: bool) -> dict:
    return dict(bubble=(pp_stages - 1) * (c.f + c.b), params=1, activations=pp_stages, assumption=base, holds=uniform)


def _zb1p_form(pp_stages: int, c: Costs, base: str, uniform: bool) -> dict:
    return dict(bubble=(pp_stages - 1) * (c.f + c.b - 2 * c.w), params=1, activations=pp_stages,
                assumption=f"{base}, W <= F, W <= B - W, microbatches >= PP",
                holds=uniform and c.w <= c.f and c.w <= c.b - c.w)


def _dualpipe_form(pp_stages: int, c: Costs, base: str, uniform: bool) -> dict:
    if pp_stages % 2:
        raise ValueError(f"pp_stages={pp_stages}: DualPipe and DualPipeV need an even number of stages; "
                         f"use {pp_stages + 1}")
    return dict(bubble=(pp_stages // 2 - 1) * (c.fb + c.b - 3 * c.w), params=2, activations=pp_stages + 1,
                assumption=f"{base}, F = B - W >= W",
                holds=uniform and math.isclose(c.f, c.b - c.w, rel_tol=1e-9, abs_tol=1e-12) and c.w <= c.f)


_FORMULAS: dict[str, Callable[[int, Costs, str, bool], dict]] = {
    "dualpipe": _dualpipe_form,
    "dualpipev": _dualpipe_form,
    "1f1b": _one_f_one_b_form,
    "zb1p": _zb1p_form,
}
"""The published bubble / memory formulas of each schedule kind (ranks used come from its layout)."""


def closed_form(name: str, pp_stages: int, costs: Costs) -> ClosedForm:
    """Table figures for ``name`` on ``pp_stages`` pipeline stages (PP in the README).

    1F1B (PP-1)(F+B); ZB1P (PP-1)(F+B-2W); DualPipe and DualPipeV (PP/2-1)(F&B+B-3W). DualPipeV
    runs the PP stages on PP/2 devices. Every formula assumes comm = 0 and stages of equal cost;
    ZB1P's also W <= F and W <= B - W (and at least PP microbatches), DualPipe's F = B - W >= W.
    ``holds`` says whether ``costs`` meet that.
    """
    if not isinstance(pp_stages, int) or pp_stages < 1:
        raise ValueError(f"pp_stages={pp_stages!r}: must be a positive integer (number of pipeline stages)")
    if name not in _FORMULAS:
        raise ValueError(f"name={name!r}: must be one of {tuple(KINDS_TABLE)}")
    uniform = costs.comm == 0 and len(set(costs.stage_scale)) <= 1 and len(set(costs.rank_scale)) <= 1
    figures = _FORMULAS[name](pp_stages, costs, "comm = 0, equal stages", uniform)
    return ClosedForm(devices=KINDS_TABLE[name].ranks_for(pp_stages), **figures)


def _halves(a: Compute | FB) -> tuple[Compute, ...]:
    return (a.f, a.b) if isinstance(a, FB) else (a,)


def _neighbour(s: Schedule, rank: int, c: Compute, kind: str, inbound: bool) -> tuple[int, int] | None:
    """(rank, chunk) on the other end of ``kind`` data flowing into/out of ``c``; None at the ends."""
    stage = s.stage_of(rank, c.chunk)
    # Activations flow to higher stages, gradients to lower ones.
    step = 1 if (kind == "act") != inbound else -1
    other = stage + step
    if not 0 <= other < s.num_stages:
        return None
    return s.place(c.dir, other)


def _where(rank: int, index: int, action: Action) -> str:
    return f"rank {rank} action #{index} {action}"


def _check_compute(s: Schedule, rank: int, index: int, c: Compute) -> None:
    where = _where(rank, index, c)
    if c.chunk not in s.chunks(rank):
        raise ScheduleError(f"{where}: chunk {c.chunk} not held ({s.name} ranks hold chunks {s.chunks(rank)})")
    if c.dir not in s.directions:
        raise ScheduleError(f"{where}: dir {c.dir} not used by {s.name} (directions {s.directions})")
    if c.mb >= s.microbatches_per_dir:
        raise ScheduleError(f"{where}: mb {c.mb} out of range 0..{s.microbatches_per_dir - 1}")
    if s.place(c.dir, s.stage_of(rank, c.chunk)) != (rank, c.chunk):
        raise ScheduleError(f"{where}: this chunk does not run direction {c.dir} in {s.name}")


def _check_message(s: Schedule, rank: int, index: int, m: Send | Recv) -> None:
    where = _where(rank, index, m)
    if m.chunk not in s.chunks(rank) or m.dir not in s.directions or m.mb >= s.microbatches_per_dir:
        raise ScheduleError(f"{where}: chunk, dir or mb out of range for {s.name}")
    if m.tag != tag_for(m.kind, m.dir):
        raise ScheduleError(f"{where}: tag must be {tag_for(m.kind, m.dir)} for ({m.kind}, dir {m.dir})")
    probe = Compute("F" if m.kind == "act" else "B", m.dir, m.mb, m.chunk)
    other = _neighbour(s, rank, probe, m.kind, inbound=isinstance(m, Recv))
    if other is None or other[0] != m.peer or m.peer == rank:
        expect = "no peer (end of the pipeline)" if other is None else f"rank {other[0]}"
        if other is not None and other[0] == rank:
            expect = "a local hand-off, no message"
        raise ScheduleError(f"{where}: peer {m.peer} is wrong; the stage layout says {expect}")


def _check_complete(s: Schedule) -> None:
    counts: Counter[tuple[str, int, int, int]] = Counter()
    split: dict[tuple[int, int, int], bool] = {}
    for rank, actions in enumerate(s.ranks):
        for a in actions:
            if isinstance(a, (Compute, FB)):
                for c in _halves(a):
                    key = (c.dir, c.mb, s.stage_of(rank, c.chunk))
                    counts[(c.op, *key)] += 1
                    if c.op == "B":
                        split[key] = c.split
    problems = []
    for d in s.directions:
        for mb in range(s.microbatches_per_dir):
            for stage in range(s.num_stages):
                key = (d, mb, stage)
                want = {"F": 1, "B": 1, "W": 1 if split.get(key) else 0}
                for op, n in want.items():
                    got = counts.pop((op, *key), 0)
                    if got != n:
                        problems.append(f"{op}(dir={d}, mb={mb}, stage={stage}) appears {got}x, expected {n}x")
    problems += [f"{op}(dir={d}, mb={mb}, stage={st}) is outside the step" for (op, d, mb, st) in counts]
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ScheduleError(f"{s.name}: incomplete step: " + "; ".join(problems[:5]) + more)


def _pair_messages(s: Schedule) -> dict[tuple[int, int], tuple[int, int]]:
    """Match the k-th Send and k-th Recv of every channel (src, dst, tag); check FIFO headers.

    Returns, for each Recv at (rank, index), the (rank, index) of the Send it receives.
    """
    sends: dict[tuple[int, int, int], list[tuple[int, Send]]] = {}
    recvs: dict[tuple[int, int, int], list[tuple[int, Recv]]] = {}
    for rank, actions in enumerate(s.ranks):
        for i, a in enumerate(actions):
            if isinstance(a, Send):
                sends.setdefault((rank, a.peer, a.tag), []).append((i, a))
            elif isinstance(a, Recv):
                recvs.setdefault((a.peer, rank, a.tag), []).append((i, a))
    pairs = {}
    for channel in sorted(sends.keys() | recvs.keys()):
        src, dst, tag = channel
        out, inc = sends.get(channel, []), recvs.get(channel, [])
        name = f"channel rank {src} -> rank {dst} tag {tag}"
        if len(out) != len(inc):
            raise ScheduleError(f"{name}: {len(out)} Send(s) but {len(inc)} Recv(s); every message needs both")
        for k, ((si, sa), (ri, ra)) in enumerate(zip(out, inc)):
            if (sa.kind, sa.dir, sa.mb) != (ra.kind, ra.dir, ra.mb):
                raise ScheduleError(
                    f"{name}: FIFO order differs: message #{k} is {sa} (rank {src} action #{si}) but the "
                    f"matching Recv #{k} expects {ra} (rank {dst} action #{ri}); list the Recvs in Send order"
                )
            pairs[(dst, ri)] = (src, si)
    return pairs


def validate(schedule: Schedule) -> dict[tuple[int, int], tuple[int, int]]:
    """Static checks: actions fit the layout, the step is complete, channels are FIFO-consistent.

    Returns the Recv -> Send pairing (see :func:`simulate`). Raises :class:`ScheduleError`.
    """
    s = schedule
    for rank, actions in enumerate(s.ranks):
        for i, a in enumerate(actions):
            if isinstance(a, (Send, Recv)):
                _check_message(s, rank, i, a)
            elif isinstance(a, (Compute, FB)):
                for c in _halves(a):
                    _check_compute(s, rank, i, c)
            else:
                raise ScheduleError(f"rank {rank} action #{i}: {a!r} is not a schedule action")
    _check_complete(s)
    return _pair_messages(s)


class _Rank:
    """Progress of one rank during the simulation."""

    __slots__ = ("pc", "t", "busy", "live", "peak", "done", "posted", "spans", "waiting")

    def __init__(self) -> None:
        self.pc = 0
        self.t = 0.0
        self.busy = 0.0
        self.live = 0
        self.peak = 0
        # (op, dir, mb, chunk) -> end time of that compute on this rank.
        self.done: dict[tuple[str, int, int, int], float] = {}
        # (kind, dir, mb, chunk) -> (rank, index) of the Send feeding a posted, unconsumed Recv.
        self.posted: dict[tuple[str, int, int, int], tuple[int, int]] = {}
        self.spans: list[Span] = []
        self.waiting = ""


def simulate(schedule: Schedule, costs: Costs) -> SimResult:
    """Run ``schedule`` under ``costs``; raise :class:`ScheduleError` / :class:`DeadlockError`."""
    s = schedule
    pairs = validate(s)
    if costs.stage_scale and len(costs.stage_scale) != s.num_stages:
        raise ValueError(f"Costs.stage_scale has {len(costs.stage_scale)} entries but {s.name} on {s.pp} ranks has "
                         f"{s.num_stages} stages: give one factor per stage")
    if costs.rank_scale and len(costs.rank_scale) != s.pp:
        raise ValueError(f"Costs.rank_scale has {len(costs.rank_scale)} entries but {s.name} runs on {s.pp} ranks: "
                         f"give one factor per rank")
    ranks = [_Rank() for _ in range(s.pp)]
    sent: dict[tuple[int, int], float] = {}

    def inputs(rank: int, st: _Rank, index: int, c: Compute) -> list[tuple[str, tuple]]:
        """What ``c`` needs: ("local", done-key) or ("remote", posted-key) entries."""
        where = _where(rank, index, c)
        needs: list[tuple[str, tuple]] = []
        if c.op == "W":
            if ("Bsplit", c.dir, c.mb, c.chunk) not in st.done:
                raise ScheduleError(f"{where}: no split B(dir={c.dir}, mb={c.mb}, chunk={c.chunk}) ran before it")
            return [("local", ("B", c.dir, c.mb, c.chunk))]
        if c.op == "B":
            if ("F", c.dir, c.mb, c.chunk) not in st.done:
                raise ScheduleError(f"{where}: its forward F(dir={c.dir}, mb={c.mb}, chunk={c.chunk}) has not run")
            needs.append(("local", ("F", c.dir, c.mb, c.chunk)))
        kind = "act" if c.op == "F" else "grad"
        src = _neighbour(s, rank, c, kind, inbound=True)
        if src is None:
            return needs
        if src[0] == rank:
            producer = ("F" if kind == "act" else "B", c.dir, c.mb, src[1])
            if producer not in st.done:
                raise ScheduleError(f"{where}: local input from {producer[0]} of chunk {src[1]} has not run yet")
            needs.append(("local", producer))
        else:
            key = (kind, c.dir, c.mb, c.chunk)
            if key not in st.posted:
                raise ScheduleError(f"{where}: needs {kind} from rank {src[0]} but no Recv for it was posted before it")
            needs.append(("remote", key))
        return needs

    def step(rank: int) -> bool:
        """Advance ``rank`` by one action; False when it must wait for a message."""
        st = ranks[rank]
        a = s.ranks[rank][st.pc]
        if isinstance(a, Recv):
            st.posted[(a.kind, a.dir, a.mb, a.chunk)] = pairs[(rank, st.pc)]
        elif isinstance(a, Send):
            producer = ("F" if a.kind == "act" else "B", a.dir, a.mb, a.chunk)
            if producer not in st.done:
                raise ScheduleError(f"{_where(rank, st.pc, a)}: its data is produced by {producer[0]} which has not run")
            sent[(rank, st.pc)] = st.t
        else:
            start = st.t
            needs = [n for c in _halves(a) for n in inputs(rank, st, st.pc, c)]
            for how, key in needs:
                if how == "local":
                    start = max(start, st.done[key])
                    continue
                send = st.posted[key]
                if send not in sent:
                    peer = ranks[send[0]]
                    st.waiting = (
                        f"rank {rank} waits at action #{st.pc} {a} for {key[0]} dir={key[1]} mb={key[2]} from "
                        f"rank {send[0]}, which has not reached its Send (action #{send[1]}; it is at action "
                        f"#{peer.pc} {s.ranks[send[0]][peer.pc] if peer.pc < len(s.ranks[send[0]]) else 'end'})"
                    )
                    return False
                start = max(start, sent[send] + costs.comm)
            for how, key in needs:
                if how == "remote":
                    del st.posted[key]
            end = start + costs.at(a, lambda chunk: s.stage_of(rank, chunk)) * (
                costs.rank_scale[rank] if costs.rank_scale else 1.0)
            st.t = end
            st.busy += end - start
            st.spans.append(Span(st.pc, a, start, end))
            for c in _halves(a):
                if c.op == "F":
                    st.live += 1
                    st.peak = max(st.peak, st.live)
            for c in _halves(a):
                st.done[(c.op, c.dir, c.mb, c.chunk)] = end
                if c.op == "B" and c.split:
                    st.done[("Bsplit", c.dir, c.mb, c.chunk)] = end
                if c.op == "W" or (c.op == "B" and not c.split):
                    st.live -= 1
        st.pc += 1
        st.waiting = ""
        return True

    pending = set(range(s.pp))
    while pending:
        progressed = False
        for rank in sorted(pending):
            st = ranks[rank]
            while st.pc < len(s.ranks[rank]) and step(rank):
                progressed = True
            if st.pc == len(s.ranks[rank]):
                pending.discard(rank)
        if pending and not progressed:
            waiting = {r: ranks[r].waiting for r in sorted(pending)}
            raise DeadlockError(
                f"{s.name}: deadlock, ranks {sorted(pending)} wait on each other: " + "; ".join(waiting.values()),
                waiting,
            )
    for rank, st in enumerate(ranks):
        if st.posted:
            key = next(iter(st.posted))
            raise ScheduleError(f"rank {rank}: a Recv for {key[0]} dir={key[1]} mb={key[2]} chunk={key[3]} is never consumed")
    makespan = max(st.t for st in ranks)
    return SimResult(
        makespan=makespan,
        busy=tuple(st.busy for st in ranks),
        idle=tuple(makespan - st.busy for st in ranks),
        peak_activations=tuple(st.peak for st in ranks),
        param_copies=tuple(
            len({c.chunk for sp in st.spans for c in _halves(sp.action) if c.op != "W"}) for st in ranks
        ),
        spans=tuple(tuple(st.spans) for st in ranks),
    )
