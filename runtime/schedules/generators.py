"""Schedule generators: pure functions from (pp, microbatches) to a :class:`Schedule`.

Each generator first fixes the order of compute actions on every rank, then one shared pass
(:func:`_with_messages`) adds the Send/Recv actions from the stage layout, so every schedule
follows the same messaging rules: a Recv is posted one compute ahead of its consumer, a Send goes
right after its producer, and a hand-off between two chunks of one rank is local.

The DualPipe order follows the eight phases of the public DeepSeek algorithm (per rank, with
``H = pp/2`` rank pairs, ``h`` the rank's distance from its nearer end and ``M`` microbatches per
direction). The *near* leg is the direction whose microbatches enter at the rank's own end, the
*far* leg the other one:

1. ``2(H-h-1)`` forwards of the near leg (warm-up);
2. ``h+1`` pairs: a near forward, then a far forward;
3. ``H-h-1`` times: far backward with its weight part split off, that weight part, a far forward
   (zero-bubble trick: the W fills the wait for the next far input);
4. ``M-2H+h+1`` times the steady core: overlapped (near F, far B), then overlapped (far F, near B)
   -- except that the two middle ranks run their first (near F, far B) one after the other,
   because their far backward input arrives only after the near forward has gone out;
5. ``H-h-1`` times: a far backward, then overlapped (far F, near B);
6. ``h+1`` pairs: far backward, near backward; the last ``h+1`` of these backwards split off
   their weight part so the drain has W work to fill its waits;
7. ``H-h-1`` times: a deferred W, then a near backward (split);
8. ``h+1`` deferred W's.

Deferred W's run in the order their backwards were split (a FIFO), as in the public code.
DualPipeV is the same order on ``pp`` ranks with ``2*pp`` stages: the near leg is chunk 0 (stages
going out from rank 0), the far leg chunk 1 (stages coming back); it equals the first ``pp``
ranks of DualPipe on ``2*pp`` ranks with twice the microbatches.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, replace
from typing import Callable

from .actions import FB, SCHEDULE_NAMES, Action, Compute, Recv, Schedule, Send, tag_for

__all__ = ["dualpipe", "dualpipev", "one_f_one_b", "zb1p", "build", "GENERATORS"]

_Compute = Compute | FB


@dataclass(frozen=True, slots=True)
class _Leg:
    """One stream of work on a rank: a direction run by one of its chunks."""

    dir: int
    chunk: int


class _Order:
    """Hands out the next F/B/W of each leg in microbatch order while one rank's order is built."""

    def __init__(self) -> None:
        self.next_f: dict[_Leg, int] = {}
        self.next_b: dict[_Leg, int] = {}
        # Weight passes of split backwards, run first-split first (the executor keeps them FIFO).
        self.deferred: deque[Compute] = deque()

    def f(self, leg: _Leg) -> Compute:
        mb = self.next_f.get(leg, 0)
        self.next_f[leg] = mb + 1
        return Compute("F", leg.dir, mb, leg.chunk)

    def b(self, leg: _Leg, split: bool = False) -> Compute:
        mb = self.next_b.get(leg, 0)
        self.next_b[leg] = mb + 1
        if split:
            self.deferred.append(Compute("W", leg.dir, mb, leg.chunk))
        return Compute("B", leg.dir, mb, leg.chunk, split)

    def w(self) -> Compute:
        return self.deferred.popleft()


def _dualpipe_order(pairs: int, h: int, per_leg: int, near: _Leg, far: _Leg) -> list[_Compute]:
    """Compute order of one rank: ``pairs`` = H rank pairs, ``h`` = distance from the near end."""
    o = _Order()
    out: list[_Compute] = []
    tail = pairs - h - 1  # ranks between this one and the middle
    middle = tail == 0
    for _ in range(2 * tail):  # 1
        out.append(o.f(near))
    for _ in range(h + 1):  # 2
        out += [o.f(near), o.f(far)]
    for _ in range(tail):  # 3
        out += [o.b(far, split=True), o.w(), o.f(far)]
    for i in range(per_leg - 2 * pairs + h + 1):  # 4
        if i == 0 and middle:
            out += [o.f(near), o.b(far)]
        else:
            out.append(FB(o.f(near), o.b(far)))
        out.append(FB(o.f(far), o.b(near)))
    for _ in range(tail):  # 5
        out += [o.b(far), FB(o.f(far), o.b(near))]
    for k in range(2 * (h + 1)):  # 6: the last h+1 backwards split
        out.append(o.b(far if k % 2 == 0 else near, split=k >= h + 1))
    for _ in range(tail):  # 7
        out += [o.w(), o.b(near, split=True)]
    while o.deferred:  # 8: exactly h+1 remain
        out.append(o.w())
    return out


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


def _check_positive(name: str, pp: int, microbatches: int) -> None:
    _require(isinstance(pp, int) and pp >= 1, f"{name}: pp={pp!r} must be a positive integer (number of ranks)")
    _require(
        isinstance(microbatches, int) and microbatches >= 1,
        f"{name}: microbatches={microbatches!r} must be a positive integer",
    )


def dualpipe(pp: int, microbatches: int) -> Schedule:
    """DeepSeek-V3 DualPipe on ``pp`` ranks (= stages); half the microbatches enter at each end."""
    _check_positive("dualpipe", pp, microbatches)
    _require(
        pp % 2 == 0,
        f"dualpipe: pp={pp} must be even (rank r pairs stage r with stage pp-1-r); use pp={pp + 1} or "
        f"dualpipev, which runs {2 * pp} stages on {pp} ranks",
    )
    _require(
        microbatches % 2 == 0 and microbatches >= 2 * pp,
        f"dualpipe: microbatches={microbatches} must be even and >= 2*pp={2 * pp} (half enter at each end, "
        f"and the steady phase needs pp per direction); use microbatches={max(2 * pp, microbatches + microbatches % 2)}",
    )
    return _dualpipe_family(_layout("dualpipe", pp, microbatches))


def dualpipev(pp: int, microbatches: int) -> Schedule:
    """DualPipeV ("cut-in-half"): ``2*pp`` stages in a V on ``pp`` ranks, one model copy."""
    _check_positive("dualpipev", pp, microbatches)
    _require(
        microbatches >= 2 * pp,
        f"dualpipev: microbatches={microbatches} must be >= 2*pp={2 * pp} (pp = ranks; the steady phase "
        f"needs one microbatch per stage in flight); use microbatches={2 * pp} or fewer ranks",
    )
    return _dualpipe_family(_layout("dualpipev", pp, microbatches))


def _dualpipe_family(layout: Schedule) -> Schedule:
    """The DualPipe order on every rank of ``layout``, its legs read from the layout: each of a
    rank's two chunks runs one leg (a direction); the near leg is the one with the lower stage."""
    orders = []
    for r in range(layout.pp):
        legs = sorted(((layout.stage_of(r, c), _Leg(d, c)) for d in layout.directions for c in layout.chunks(r)
                       if layout.place(d, layout.stage_of(r, c)) == (r, c)), key=lambda x: x[0])
        (h, near), (_, far) = legs
        orders.append(_dualpipe_order(layout.num_stages // 2, h, layout.microbatches_per_dir, near, far))
    return _assemble(layout, orders)


def one_f_one_b(pp: int, microbatches: int) -> Schedule:
    """1F1B: ``pp-1-r`` warm-up forwards on rank r, then alternate F and full B, then drain B's."""
    _check_positive("1f1b", pp, microbatches)
    orders = []
    for r in range(pp):
        warm = min(pp - 1 - r, microbatches)
        order: list[_Compute] = [Compute("F", 0, k, 0) for k in range(warm)]
        for k in range(microbatches - warm):
            order += [Compute("F", 0, warm + k, 0), Compute("B", 0, k, 0)]
        order += [Compute("B", 0, k, 0) for k in range(microbatches - warm, microbatches)]
        orders.append(order)
    return _assemble(_layout("1f1b", pp, microbatches), orders)


def zb1p(pp: int, microbatches: int) -> Schedule:
    """ZB-H1: 1F1B with split backwards; rank r runs each W ``r`` microbatches late.

    Delaying W on later ranks lets their input-gradient passes (the critical path back to rank 0)
    run early, while in-flight activations stay at ``pp`` on every rank, as in 1F1B.
    """
    _check_positive("zb1p", pp, microbatches)
    orders = []
    for r in range(pp):
        warm = min(pp - 1 - r, microbatches)
        order: list[_Compute] = [Compute("F", 0, k, 0) for k in range(warm)]
        for k in range(microbatches):
            if k + warm < microbatches:
                order.append(Compute("F", 0, k + warm, 0))
            order.append(Compute("B", 0, k, 0, True))
            if k >= r:
                order.append(Compute("W", 0, k - r, 0))
        order += [Compute("W", 0, k, 0) for k in range(max(microbatches - r, 0), microbatches)]
        orders.append(order)
    return _assemble(_layout("zb1p", pp, microbatches), orders)


GENERATORS: dict[str, Callable[[int, int], Schedule]] = {
    "dualpipe": dualpipe,
    "dualpipev": dualpipev,
    "1f1b": one_f_one_b,
    "zb1p": zb1p,
}
"""Generator per schedule name."""


def build(name: str, pp: int, microbatches: int) -> Schedule:
    """The schedule called ``name`` (one of :data:`SCHEDULE_NAMES`)."""
    if name not in GENERATORS:
        raise ValueError(f"schedule name={name!r}: must be one of {SCHEDULE_NAMES}")
    return GENERATORS[name](pp, microbatches)


def _layout(name: str, pp: int, microbatches: int) -> Schedule:
    """An empty schedule: only its stage-layout helpers are used while building."""
    return Schedule(
        name=name,
        pp=pp,
        microbatches=microbatches,
        ranks=tuple(() for _ in range(pp)),
    )


def _assemble(layout: Schedule, orders: list[list[_Compute]]) -> Schedule:
    return replace(layout, ranks=tuple(_with_messages(layout, r, order) for r, order in enumerate(orders)))


def _halves(a: _Compute) -> tuple[Compute, ...]:
    return (a.f, a.b) if isinstance(a, FB) else (a,)


def _peer(layout: Schedule, rank: int, c: Compute, inbound: bool) -> tuple[int, str] | None:
    """Remote rank and message kind that feeds (``inbound``) or is fed by ``c``; None if none/local."""
    stage = layout.stage_of(rank, c.chunk)
    last = layout.num_stages - 1
    if c.op == "F" and inbound and stage > 0:
        other, kind = stage - 1, "act"
    elif c.op == "F" and not inbound and stage < last:
        other, kind = stage + 1, "act"
    elif c.op == "B" and inbound and stage < last:
        other, kind = stage + 1, "grad"
    elif c.op == "B" and not inbound and stage > 0:
        other, kind = stage - 1, "grad"
    else:
        return None
    peer, _ = layout.place(c.dir, other)
    return None if peer == rank else (peer, kind)


def _with_messages(layout: Schedule, rank: int, order: list[_Compute]) -> tuple[Action, ...]:
    # posts[j] holds the Recvs listed just before compute j: those consumed by compute j+1 (or by
    # compute 0 itself), so each receive is in flight while the preceding compute runs.
    posts: list[list[Action]] = [[] for _ in order]
    for j, a in enumerate(order):
        for c in _halves(a):
            src = _peer(layout, rank, c, inbound=True)
            if src is not None:
                posts[max(j - 1, 0)].append(Recv(src[0], src[1], c.dir, c.mb, c.chunk, tag_for(src[1], c.dir)))
    out: list[Action] = []
    for j, a in enumerate(order):
        out += posts[j]
        out.append(a)
        for c in _halves(a):
            dst = _peer(layout, rank, c, inbound=False)
            if dst is not None:
                out.append(Send(dst[0], dst[1], c.dir, c.mb, c.chunk, tag_for(dst[1], c.dir)))
    return tuple(out)
