"""Schedules as data: golden DualPipe/DualPipeV orders, properties of every generator, simulator.

Every expectation here is computed independently of the code under test: golden strings written
out by hand from the public DualPipe algorithm, the stage layout and message rules re-derived
from the contract, and the closed forms typed in from the DualPipe README table.
"""

from __future__ import annotations

import dataclasses
from collections import Counter, defaultdict

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtime.schedules import (
    FB,
    Compute,
    Costs,
    DeadlockError,
    Recv,
    Schedule,
    ScheduleError,
    Send,
    build,
    bubble_table,
    closed_form,
    dualpipe,
    dualpipev,
    one_f_one_b,
    render_simulation,
    simulate,
    zb1p,
)

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Per-rank compute order of DualPipe on 8 ranks with 20 microbatches (the DualPipe README figure),
# following the eight phases of the public algorithm. Uppercase: direction 0 (enters at rank 0),
# lowercase: direction 1 (enters at rank 7); "X+y" is one overlapped F&B pair, forward first.
GOLDEN_DUALPIPE_8_20 = [
    "F0 F1 F2 F3 F4 F5 F6 f0 b0 w0 f1 b1 w1 f2 b2 w2 f3 F7+b3 f4+B0 F8+b4 f5+B1 F9+b5 f6+B2 b6 f7+B3 b7 f8+B4 b8 f9+B5 b9 B6 W6 B7 W7 B8 W8 B9 W9",
    "F0 F1 F2 F3 F4 f0 F5 f1 b0 w0 f2 b1 w1 f3 F6+b2 f4+B0 F7+b3 f5+B1 F8+b4 f6+B2 F9+b5 f7+B3 b6 f8+B4 b7 f9+B5 b8 B6 b9 B7 w9 B8 W7 B9 W8 W9",
    "F0 F1 F2 f0 F3 f1 F4 f2 b0 w0 f3 F5+b1 f4+B0 F6+b2 f5+B1 F7+b3 f6+B2 F8+b4 f7+B3 F9+b5 f8+B4 b6 f9+B5 b7 B6 b8 B7 b9 B8 W7 B9 w9 W8 W9",
    "F0 f0 F1 f1 F2 f2 F3 f3 F4 b0 f4+B0 F5+b1 f5+B1 F6+b2 f6+B2 F7+b3 f7+B3 F8+b4 f8+B4 F9+b5 f9+B5 b6 B6 b7 B7 b8 B8 b9 B9 w8 W8 w9 W9",
    "f0 F0 f1 F1 f2 F2 f3 F3 f4 B0 F4+b0 f5+B1 F5+b1 f6+B2 F6+b2 f7+B3 F7+b3 f8+B4 F8+b4 f9+B5 F9+b5 B6 b6 B7 b7 B8 b8 B9 b9 W8 w8 W9 w9",
    "f0 f1 f2 F0 f3 F1 f4 F2 B0 W0 F3 f5+B1 F4+b0 f6+B2 F5+b1 f7+B3 F6+b2 f8+B4 F7+b3 f9+B5 F8+b4 B6 F9+b5 B7 b6 B8 b7 B9 b8 w7 b9 W9 w8 w9",
    "f0 f1 f2 f3 f4 F0 f5 F1 B0 W0 F2 B1 W1 F3 f6+B2 F4+b0 f7+B3 F5+b1 f8+B4 F6+b2 f9+B5 F7+b3 B6 F8+b4 B7 F9+b5 B8 b6 B9 b7 W9 b8 w7 b9 w8 w9",
    "f0 f1 f2 f3 f4 f5 f6 F0 B0 W0 F1 B1 W1 F2 B2 W2 F3 f7+B3 F4+b0 f8+B4 F5+b1 f9+B5 F6+b2 B6 F7+b3 B7 F8+b4 B8 F9+b5 B9 b6 w6 b7 w7 b8 w8 b9 w9",
]

# DualPipeV on 4 ranks (8 stages) with 10 microbatches (the README's DualPipeV figure). Uppercase:
# chunk 0 (stages 0-3, going out), lowercase: chunk 1 (stages 4-7, coming back).
GOLDEN_DUALPIPEV_4_10 = [
    "F0 F1 F2 F3 F4 F5 F6 f0 b0 w0 f1 b1 w1 f2 b2 w2 f3 F7+b3 f4+B0 F8+b4 f5+B1 F9+b5 f6+B2 b6 f7+B3 b7 f8+B4 b8 f9+B5 b9 B6 W6 B7 W7 B8 W8 B9 W9",
    "F0 F1 F2 F3 F4 f0 F5 f1 b0 w0 f2 b1 w1 f3 F6+b2 f4+B0 F7+b3 f5+B1 F8+b4 f6+B2 F9+b5 f7+B3 b6 f8+B4 b7 f9+B5 b8 B6 b9 B7 w9 B8 W7 B9 W8 W9",
    "F0 F1 F2 f0 F3 f1 F4 f2 b0 w0 f3 F5+b1 f4+B0 F6+b2 f5+B1 F7+b3 f6+B2 F8+b4 f7+B3 F9+b5 f8+B4 b6 f9+B5 b7 B6 b8 B7 b9 B8 W7 B9 w9 W8 W9",
    "F0 f0 F1 f1 F2 f2 F3 f3 F4 b0 f4+B0 F5+b1 f5+B1 F6+b2 f6+B2 F7+b3 f7+B3 F8+b4 f8+B4 F9+b5 f9+B5 b6 B6 b7 B7 b8 B8 b9 B9 w8 W8 w9 W9",
]


# ---------------------------------------------------------------- independent helpers


def _token(c: Compute, lower: bool) -> str:
    text = f"{c.op}{c.mb}"
    return text.lower() if lower else text


def order(s: Schedule, rank: int, lower_by: str) -> str:
    """The rank's compute cells; lowercase when ``getattr(cell, lower_by) == 1``."""
    out = []
    for a in s.ranks[rank]:
        if isinstance(a, FB):
            out.append(_token(a.f, getattr(a.f, lower_by) == 1) + "+" + _token(a.b, getattr(a.b, lower_by) == 1))
        elif isinstance(a, Compute):
            out.append(_token(a, getattr(a, lower_by) == 1))
    return " ".join(out)


def expected_stage(name: str, pp: int, rank: int, chunk: int) -> int:
    """Stage layout from the contract, written out independently of Schedule.stage_of."""
    if name == "dualpipe":
        return rank if chunk == 0 else pp - 1 - rank
    if name == "dualpipev":
        return rank if chunk == 0 else 2 * pp - 1 - rank
    assert chunk == 0
    return rank


def holder(name: str, pp: int, d: int, stage: int) -> int:
    """Rank that runs ``stage`` for direction ``d``."""
    for r in range(pp):
        for chunk in (0, 1) if name in ("dualpipe", "dualpipev") else (0,):
            if expected_stage(name, pp, r, chunk) == stage and (name != "dualpipe" or chunk == d):
                return r
    raise AssertionError(f"no rank holds stage {stage}")


def halves(a):
    return (a.f, a.b) if isinstance(a, FB) else (a,)


def check_structure(s: Schedule, name: str, pp: int, m: int) -> None:
    """Completeness, message placement and FIFO consistency, derived from the contract."""
    stages = 2 * pp if name == "dualpipev" else pp
    dirs = (0, 1) if name == "dualpipe" else (0,)
    per_dir = m // len(dirs)
    counts: Counter = Counter()
    split = {}
    for r, actions in enumerate(s.ranks):
        for a in actions:
            if isinstance(a, (Compute, FB)):
                for c in halves(a):
                    key = (c.dir, c.mb, expected_stage(name, pp, r, c.chunk))
                    counts[(c.op, *key)] += 1
                    if c.op == "B":
                        split[key] = c.split
    expect = Counter()
    for d in dirs:
        for mb in range(per_dir):
            for stage in range(stages):
                expect[("F", d, mb, stage)] = 1
                expect[("B", d, mb, stage)] = 1
                if split[(d, mb, stage)]:
                    expect[("W", d, mb, stage)] = 1
    assert counts == expect

    # One act and one grad message per (dir, mb) and stage boundary that crosses ranks.
    cross = sum(
        1 for d in dirs for s_ in range(stages - 1) if holder(name, pp, d, s_) != holder(name, pp, d, s_ + 1)
    )
    sends = [(r, a) for r, acts in enumerate(s.ranks) for a in acts if isinstance(a, Send)]
    recvs = [(r, a) for r, acts in enumerate(s.ranks) for a in acts if isinstance(a, Recv)]
    assert len(sends) == len(recvs) == 2 * cross * per_dir
    for r, a in sends + recvs:
        assert a.peer != r, "local hand-offs must not be messages"
        assert a.tag == {"act": 0, "grad": 2}[a.kind] + a.dir <= 32767

    # FIFO: per (src, dst, tag) the receiver lists its Recvs in the sender's Send order.
    out, inc = defaultdict(list), defaultdict(list)
    for r, a in sends:
        out[(r, a.peer, a.tag)].append((a.kind, a.dir, a.mb))
    for r, a in recvs:
        inc[(a.peer, r, a.tag)].append((a.kind, a.dir, a.mb))
    assert out == inc

    for r, actions in enumerate(s.ranks):
        computes = [i for i, a in enumerate(actions) if isinstance(a, (Compute, FB))]
        for i, a in enumerate(actions):
            if isinstance(a, Send):
                # Right after its producer: only other Sends in between.
                j = i - 1
                while isinstance(actions[j], Send):
                    j -= 1
                op = "F" if a.kind == "act" else "B"
                assert any(c.op == op and (c.dir, c.mb, c.chunk) == (a.dir, a.mb, a.chunk) for c in halves(actions[j]))
            if isinstance(a, Recv):
                op = "F" if a.kind == "act" else "B"
                consumer = next(
                    j for j in computes
                    if any(c.op == op and (c.dir, c.mb, c.chunk) == (a.dir, a.mb, a.chunk) for c in halves(actions[j]))
                )
                k = computes.index(consumer)
                # Posted before the compute preceding its consumer (or before the consumer if first).
                assert i < computes[max(k - 1, 0)]


def check_dependencies(s: Schedule, name: str, pp: int, costs: Costs) -> None:
    """Simulated times respect data dependencies and per-hop latency."""
    res = simulate(s, costs)
    end, start = {}, {}
    for r, spans in enumerate(res.spans):
        for sp in spans:
            for c in halves(sp.action):
                key = (c.op, c.dir, c.mb, expected_stage(name, pp, r, c.chunk))
                end[key], start[key] = (sp.end, r), sp.start
    last = max(k[3] for k in end)
    eps = 1e-9
    for (op, d, mb, stage), (_, r) in end.items():
        t = start[(op, d, mb, stage)]
        if op == "F" and stage > 0:
            e, q = end[("F", d, mb, stage - 1)]
            assert t >= e + (costs.comm if q != r else 0) - eps
        if op == "B":
            assert t >= end[("F", d, mb, stage)][0] - eps
            if stage < last:
                e, q = end[("B", d, mb, stage + 1)]
                assert t >= e + (costs.comm if q != r else 0) - eps
        if op == "W":
            assert t >= end[("B", d, mb, stage)][0] - eps


# ---------------------------------------------------------------- golden orders


def test_dualpipe_8_20_golden_order():
    s = dualpipe(8, 20)
    for r in range(8):
        assert order(s, r, "dir") == GOLDEN_DUALPIPE_8_20[r], f"rank {r}"
    # The same, direction by direction.
    for r in range(8):
        cells = GOLDEN_DUALPIPE_8_20[r].replace("+", " ").split()
        for lower in (False, True):
            want = [t for t in cells if t.islower() == lower]
            got = [t for t in order(s, r, "dir").replace("+", " ").split() if t.islower() == lower]
            assert got == want


def test_dualpipev_4_10_golden_order():
    s = dualpipev(4, 10)
    assert s.num_stages == 8
    for r in range(4):
        assert order(s, r, "chunk") == GOLDEN_DUALPIPEV_4_10[r], f"rank {r}"
    assert all(c.dir == 0 for acts in s.ranks for a in acts if isinstance(a, (Compute, FB)) for c in halves(a))


@pytest.mark.parametrize("ranks", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("extra", [0, 1, 2, 5])
def test_dualpipev_is_first_half_of_dualpipe(ranks, extra):
    """REFERENCE: DualPipeV on N ranks with C microbatches = first N ranks of DualPipe(2N, 2C)."""
    c = 2 * ranks + extra
    v, d = dualpipev(ranks, c), dualpipe(2 * ranks, 2 * c)
    for r in range(ranks):
        assert order(v, r, "chunk") == order(d, r, "dir")


def test_golden_has_no_messages_at_the_v_turn():
    s = dualpipev(4, 10)
    # Rank 3 holds stages 3 and 4: the hand-off between them is local.
    assert not [a for a in s.ranks[3] if isinstance(a, (Send, Recv)) and a.peer == 3]
    assert {a.peer for a in s.ranks[3] if isinstance(a, (Send, Recv))} == {2}


# ---------------------------------------------------------------- layout helpers


def test_layout_helpers():
    d = dualpipe(8, 20)
    assert [d.stage_of(2, c) for c in d.chunks(2)] == [2, 5]
    assert d.place(1, 5) == (2, 1) and d.place(0, 5) == (5, 0)
    assert d.global_mb(0, 3) == 3 and d.global_mb(1, 3) == 13
    v = dualpipev(4, 10)
    assert v.num_stages == 8 and v.num_chunks == 2
    assert [v.stage_of(1, c) for c in v.chunks(1)] == [1, 6]
    assert v.place(0, 4) == (3, 1) and v.global_mb(0, 9) == 9
    o = one_f_one_b(4, 6)
    assert o.chunks(3) == (0,) and o.stage_of(3, 0) == 3
    with pytest.raises(ValueError, match="chunk"):
        o.stage_of(0, 1)
    with pytest.raises(ValueError, match="mb"):
        d.global_mb(1, 10)


def _stages_from_messages(s: Schedule) -> dict[tuple[int, int, int], int]:
    """(rank, chunk, dir) -> the stage it runs, read off the actions alone (no layout helper): a
    microbatch's first forward is the one nothing feeds; an activation Send matched FIFO with its
    Recv, or a local hand-off (a forward with no Recv, fed by the rank's earlier forward of the
    same microbatch), moves it one stage on."""
    queues: dict[tuple, list] = defaultdict(list)
    for r, actions in enumerate(s.ranks):
        for a in actions:
            if isinstance(a, Send) and a.kind == "act":
                queues[(r, a.peer, a.tag)].append((r, a.chunk, a.dir, a.mb))
    producer: dict[tuple, tuple] = {}  # F (rank, chunk, dir, mb) -> the F whose output it takes
    entries = []
    for r, actions in enumerate(s.ranks):
        taken: Counter = Counter()
        earlier: dict[tuple, tuple] = {}  # (dir, mb) -> this rank's latest F of it so far
        for a in actions:
            if isinstance(a, Recv) and a.kind == "act":
                key = (a.peer, r, a.tag)
                producer[(r, a.chunk, a.dir, a.mb)] = queues[key][taken[key]]
                taken[key] += 1
            for c in halves(a) if isinstance(a, (Compute, FB)) else ():
                if c.op != "F":
                    continue
                f = (r, c.chunk, c.dir, c.mb)
                if f not in producer:
                    if (c.dir, c.mb) in earlier:
                        producer[f] = earlier[(c.dir, c.mb)]
                    else:
                        entries.append(f)
                earlier[(c.dir, c.mb)] = f
    consumer = {p: f for f, p in producer.items()}
    assert len(consumer) == len(producer), "an output feeds two forwards"
    stage: dict[tuple, int] = {}
    for f in entries:
        k = 0
        while True:
            key = (f[0], f[1], f[2])
            assert stage.setdefault(key, k) == k, f"{key} runs stages {stage[key]} and {k}"
            if f not in consumer:
                break
            f, k = consumer[f], k + 1
        assert k == s.num_stages - 1, f"{f}: a microbatch passes {k + 1} stages, not {s.num_stages}"
    assert len(entries) == s.microbatches
    return stage


@pytest.mark.parametrize("name,pp,m", [("dualpipe", 2, 4), ("dualpipe", 4, 8), ("dualpipe", 8, 20),
                                       ("dualpipev", 1, 2), ("dualpipev", 3, 7), ("dualpipev", 4, 10),
                                       ("1f1b", 3, 5), ("zb1p", 4, 6)])
def test_layout_values_agree_with_the_generated_actions(name, pp, m):
    """The layout's tables (stage_of, place, mirrors) against the stage each chunk runs as read off
    the actions' message flow. Catches a layout row or table that disagrees with what the
    generators emit, e.g. DualPipe's second direction placed on chunk 0, or a mirror table that
    pairs ranks not holding the same stages (the executor would then add another stage's gradients)."""
    s = build(name, pp, m)
    lay = s.layout
    derived = _stages_from_messages(s)
    assert {(r, c) for r, c, _ in derived} == {(r, c) for r in range(pp) for c in lay.chunks(r)}
    for (r, c, d), stage in derived.items():
        assert lay.stage_of(r, c) == stage == expected_stage(name, pp, r, c)
        assert lay.place(d, stage) == (r, c)
    assert sorted(lay.directions) == sorted({d for _, _, d in derived})
    held = {r: sorted(st for (q, _, _), st in derived.items() if q == r) for r in range(pp)}
    for r in range(pp):
        mirror = lay.mirror_of(r)
        if mirror is None:  # nobody else holds these stages
            assert all(held[q] != held[r] for q in range(pp) if q != r)
            continue
        assert mirror != r and lay.mirror_of(mirror) == r and held[mirror] == held[r]
    copies = 2 if name == "dualpipe" else 1
    assert sum(lay.mirror_of(r) is not None for r in range(pp)) == (pp if copies == 2 else 0)


# ---------------------------------------------------------------- properties of every schedule

costs_st = st.builds(
    lambda f, b, wf, fbf, comm: Costs(f=f, b=b, w=wf * b, fb=max(f, b) + fbf * min(f, b), comm=comm),
    st.floats(0.1, 4), st.floats(0.1, 6), st.floats(0, 1), st.floats(0, 1), st.sampled_from([0.0, 0.0, 0.3, 1.0]),
)


@st.composite
def sized(draw):
    name = draw(st.sampled_from(["dualpipe", "dualpipev", "1f1b", "zb1p"]))
    stages = draw(st.sampled_from(range(2, 17, 2)))
    if name == "dualpipe":
        return name, stages, 2 * stages + 2 * draw(st.integers(0, 5))
    if name == "dualpipev":
        ranks = stages // 2
        return name, ranks, 2 * ranks + draw(st.integers(0, 9))
    return name, stages, draw(st.integers(1, 3 * stages))


@SETTINGS
@given(sized(), costs_st)
def test_every_schedule_is_complete_ordered_fifo_and_deadlock_free(size, costs):
    name, pp, m = size
    s = build(name, pp, m)
    assert (s.name, s.pp, s.microbatches) == (name, pp, m)
    check_structure(s, name, pp, m)
    check_dependencies(s, name, pp, costs)


@SETTINGS
@given(
    st.sampled_from(["dualpipe", "dualpipev"]),
    st.integers(-2, 20),
    st.integers(-2, 60),
)
def test_invalid_sizes_are_refused(name, pp, m):
    valid = pp >= 1 and m >= 2 * pp and (name == "dualpipev" or (pp % 2 == 0 and m % 2 == 0))
    if valid:
        build(name, pp, m)
        return
    with pytest.raises(ValueError) as err:
        build(name, pp, m)
    msg = str(err.value)
    assert name in msg and ("pp=" in msg or "microbatches=" in msg)
    if pp >= 1 and m >= 1:
        assert "use " in msg  # the fix is spelled out


@pytest.mark.parametrize("name", ["1f1b", "zb1p"])
@pytest.mark.parametrize("pp, m", [(0, 4), (4, 0), (-1, 3)])
def test_invalid_sizes_linear(name, pp, m):
    with pytest.raises(ValueError, match="positive integer"):
        build(name, pp, m)


def test_unknown_name():
    with pytest.raises(ValueError, match="dualpipev"):
        build("gpipe", 4, 8)


# ---------------------------------------------------------------- figures


@SETTINGS
@given(st.sampled_from(range(2, 17, 2)), st.integers(1, 40), costs_st)
def test_1f1b_bubble_is_closed_form(pp, m, costs):
    """Assumption: comm = 0 (any F, B, any microbatch count)."""
    c = dataclasses.replace(costs, comm=0.0)
    res = simulate(one_f_one_b(pp, m), c)
    want = (pp - 1) * (c.f + c.b)
    assert res.idle == pytest.approx([want] * pp)
    assert res.bubble == pytest.approx(closed_form("1f1b", pp, c).bubble)


zb_costs = st.builds(
    # W <= F and W <= B - W (the deferred W fits in the holes), comm = 0.
    lambda f, bi, wf: Costs(f=f, b=bi + wf * min(f, bi), w=wf * min(f, bi), fb=f + bi + wf * min(f, bi)),
    st.floats(0.1, 4), st.floats(0.1, 4), st.floats(0, 1),
)


@SETTINGS
@given(st.sampled_from(range(2, 17, 2)), st.integers(0, 30), zb_costs)
def test_zb1p_bubble_is_closed_form(pp, extra, c):
    m = pp + extra  # ZB-H1's figure needs at least pp microbatches
    res = simulate(zb1p(pp, m), c)
    want = (pp - 1) * (c.f + c.b - 2 * c.w)
    assert res.idle == pytest.approx([want] * pp)
    assert closed_form("zb1p", pp, c).bubble == pytest.approx(want)


@SETTINGS
@given(st.sampled_from(range(2, 17, 2)), st.integers(0, 6), st.floats(0.1, 3), st.floats(0, 1))
def test_dualpipe_bubble_is_closed_form_at_uniform_cells(stages, extra, x, overlap):
    """The README formula's cost model: F = W = B - W (B = 2F), B <= F&B <= F + B, comm = 0."""
    c = Costs(f=x, b=2 * x, w=x, fb=2 * x + overlap * x)
    want = (stages // 2 - 1) * (c.fb + c.b - 3 * c.w)
    d = simulate(dualpipe(stages, 2 * stages + 2 * extra), c)
    v = simulate(dualpipev(stages // 2, stages + extra), c)
    assert d.bubble == pytest.approx(want) and v.bubble == pytest.approx(want)
    assert closed_form("dualpipe", stages, c).bubble == pytest.approx(want)
    assert closed_form("dualpipev", stages, c).devices == stages // 2


range_costs = st.builds(
    # Documented range: W <= F, W <= B - W, max(F, B) <= F&B <= F + B, comm = 0.
    lambda f, b, wf, fbf: Costs(f=f, b=b, w=wf * min(f, b / 2), fb=max(f, b) + fbf * min(f, b)),
    st.floats(0.1, 4), st.floats(0.1, 6), st.floats(0, 1), st.floats(0, 1),
)


@SETTINGS
@given(st.sampled_from(range(2, 17, 2)), st.integers(0, 4), range_costs)
def test_dualpipe_bubble_below_1f1b_and_zb1p(stages, extra, c):
    m = 2 * stages + 2 * extra
    others = min(simulate(one_f_one_b(stages, m), c).bubble, simulate(zb1p(stages, m), c).bubble)
    assert simulate(dualpipe(stages, m), c).bubble < others
    assert simulate(dualpipev(stages // 2, m), c).bubble < others


@pytest.mark.parametrize("stages", [2, 4, 8, 16])
def test_activations_and_parameters_match_table(stages):
    c = Costs(f=1, b=2, w=1, fb=2.6)
    m = 2 * stages + 4
    one = simulate(one_f_one_b(stages, m), c)
    assert one.peak_activations == tuple(stages - r for r in range(stages))  # 1F1B: PP on rank 0
    assert one.param_copies == (1,) * stages
    zb = simulate(zb1p(stages, m), c)
    assert zb.peak_activations == (stages,) * stages and zb.param_copies == (1,) * stages
    d = simulate(dualpipe(stages, m), c)
    assert d.peak_activations == (stages + 1,) * stages and d.param_copies == (2,) * stages
    v = simulate(dualpipev(stages // 2, m), c)
    assert v.peak_activations == (stages + 1,) * (stages // 2) and v.param_copies == (2,) * (stages // 2)
    table = {"1f1b": (1, stages, stages), "zb1p": (1, stages, stages),
             "dualpipe": (2, stages + 1, stages), "dualpipev": (2, stages + 1, stages // 2)}
    for name, (params, act, devices) in table.items():
        cf = closed_form(name, stages, c)
        assert (cf.params, cf.activations, cf.devices) == (params, act, devices)


def test_closed_form_values():
    c = Costs(f=1, b=2, w=1, fb=2.6)
    assert closed_form("1f1b", 8, c).bubble == pytest.approx(21)
    assert closed_form("zb1p", 8, c).bubble == pytest.approx(7)
    assert closed_form("dualpipe", 8, c).bubble == pytest.approx(4.8)
    with pytest.raises(ValueError, match="even"):
        closed_form("dualpipe", 7, c)


dualpipe_cells = st.builds(
    # F = B - W >= W, the DualPipe formula's cost model; comm 0 or not.
    lambda f, wf, fbf, comm: Costs(f=f, b=f + wf * f, w=wf * f, fb=f + wf * f + fbf * f, comm=comm),
    st.floats(0.1, 4), st.floats(0, 1), st.floats(0, 1), st.sampled_from([0.0, 0.0, 0.3]),
)


@SETTINGS
@given(st.sampled_from(range(2, 17, 2)), st.integers(0, 4), st.one_of(costs_st, dualpipe_cells))
def test_closed_form_holds_means_simulator_agrees(stages, extra, c):
    """Whenever closed_form says its assumption holds, the simulator (the independent reference)
    gives exactly the formula's bubble; a formula outside its assumption is flagged, never silent."""
    built = {"1f1b": one_f_one_b(stages, stages + extra), "zb1p": zb1p(stages, stages + extra),
             "dualpipe": dualpipe(stages, 2 * stages + 2 * extra),
             "dualpipev": dualpipev(stages // 2, stages + extra)}
    for name, sched in built.items():
        cf = closed_form(name, stages, c)
        if cf.holds:
            assert simulate(sched, c).bubble == pytest.approx(cf.bubble, abs=1e-9), (name, c)
        else:
            assert c.comm > 0 or name != "1f1b"


def test_closed_form_outside_its_assumption_is_flagged():
    c = Costs(f=1, b=2, w=1.5, fb=2.6)  # W > F and W > B - W: ZB1P's formula gives 0, DualPipe's 0.3 at PP=8
    assert closed_form("1f1b", 8, c).holds
    for name in ("zb1p", "dualpipe", "dualpipev"):
        assert not closed_form(name, 8, c).holds
    assert not closed_form("dualpipe", 8, Costs(f=2, b=2, w=1, fb=3)).holds  # F != B - W
    assert not closed_form("1f1b", 8, Costs(f=1, b=2, w=1, fb=2.6, comm=0.2)).holds
    assert not closed_form("1f1b", 2, Costs(f=1, b=2, w=1, fb=2.6, stage_scale=(1, 2))).holds
    table = bubble_table([8], c)
    starred = [line.split()[1] for line in table.splitlines() if "*" in line and not line.startswith("*")]
    assert starred == ["zb1p", "dualpipe", "dualpipev"]
    assert "* zb1p: its formula assumes comm = 0, equal stages, W <= F, W <= B - W" in table
    text = render_simulation(zb1p(4, 8), simulate(zb1p(4, 8), c), c)
    assert "these costs do not meet that" in text and "W <= B - W" in text


def test_comm_latency_adds_to_the_bubble():
    base, slow = Costs(f=1, b=2, w=1, fb=2.6), Costs(f=1, b=2, w=1, fb=2.6, comm=0.2)
    for name, pp in [("1f1b", 4), ("zb1p", 4), ("dualpipe", 4), ("dualpipev", 2)]:
        s = build(name, pp, 8)
        assert simulate(s, slow).bubble > simulate(s, base).bubble
    # Two ranks, one microbatch: F0 -> act hop -> F1, B1 -> grad hop -> B0.
    res = simulate(one_f_one_b(2, 1), slow)
    assert res.makespan == pytest.approx(1 + 0.2 + 1 + 2 + 0.2 + 2)


# ---------------------------------------------------------------- broken schedules


def _with_rank(s: Schedule, rank: int, actions) -> Schedule:
    ranks = list(s.ranks)
    ranks[rank] = tuple(actions)
    return dataclasses.replace(s, ranks=tuple(ranks))


def test_receive_before_send_on_both_ranks_is_a_deadlock_naming_ranks():
    """Swap each rank's first receive-and-consume of the far direction ahead of its own first
    forward: rank 0 now waits for rank 1's activation and rank 1 for rank 0's."""
    s = dualpipe(2, 4)
    for rank, far in ((0, 1), (1, 0)):
        acts = list(s.ranks[rank])
        recv = next(a for a in acts if isinstance(a, Recv) and a.kind == "act" and a.dir == far and a.mb == 0)
        fwd = next(a for a in acts if isinstance(a, Compute) and a.op == "F" and a.dir == far and a.mb == 0)
        acts.remove(recv)
        acts.remove(fwd)
        s = _with_rank(s, rank, [recv, fwd] + acts)
    with pytest.raises(DeadlockError) as err:
        simulate(s, Costs(f=1, b=2, w=1, fb=2.6))
    assert set(err.value.waiting) == {0, 1}
    msg = str(err.value)
    assert "rank 0 waits" in msg and "rank 1 waits" in msg and "F(dir=1, mb=0" in msg and "F(dir=0, mb=0" in msg


def test_swapped_recvs_on_one_channel_break_fifo():
    s = one_f_one_b(2, 3)
    acts = list(s.ranks[1])
    i, j = [k for k, a in enumerate(acts) if isinstance(a, Recv)][:2]
    acts[i], acts[j] = acts[j], acts[i]
    with pytest.raises(ScheduleError, match=r"rank 0 -> rank 1 tag 0: FIFO order differs"):
        simulate(_with_rank(s, 1, acts), Costs(f=1, b=2, w=1, fb=3))


def test_missing_recv_and_missing_send_are_reported():
    s = one_f_one_b(2, 2)
    c = Costs(f=1, b=2, w=1, fb=3)
    no_send = [a for a in s.ranks[0] if not (isinstance(a, Send) and a.mb == 1)]
    with pytest.raises(ScheduleError, match="1 Send.*2 Recv"):
        simulate(_with_rank(s, 0, no_send), c)
    late = list(s.ranks[1])
    recv = next(a for a in late if isinstance(a, Recv) and a.mb == 1)
    late.remove(recv)
    late.append(recv)  # posted only after its consumer ran
    with pytest.raises(ScheduleError, match="no Recv for it was posted"):
        simulate(_with_rank(s, 1, late), c)


def test_incomplete_and_misordered_steps_are_reported():
    s = zb1p(2, 2)
    c = Costs(f=1, b=2, w=1, fb=3)
    no_w = [a for a in s.ranks[0] if not (isinstance(a, Compute) and a.op == "W" and a.mb == 0)]
    with pytest.raises(ScheduleError, match=r"W\(dir=0, mb=0, stage=0\) appears 0x"):
        simulate(_with_rank(s, 0, no_w), c)
    acts = list(s.ranks[1])
    w = next(a for a in acts if isinstance(a, Compute) and a.op == "W")
    acts.remove(w)
    acts.insert(0, w)  # W before its B
    with pytest.raises(ScheduleError, match="no split B"):
        simulate(_with_rank(s, 1, acts), c)


def test_action_and_cost_validation():
    with pytest.raises(ValueError, match="split"):
        Compute("F", 0, 0, 0, True)
    with pytest.raises(ValueError, match="dir"):
        Compute("F", 2, 0, 0)
    with pytest.raises(ValueError, match="FB.f"):
        FB(Compute("B", 0, 0, 0), Compute("B", 1, 0, 1))
    with pytest.raises(ValueError, match=r"Costs.w=3 > Costs.b=2"):
        Costs(f=1, b=2, w=3, fb=3)
    with pytest.raises(ValueError, match="Costs.fb"):
        Costs(f=1, b=2, w=1, fb=1)
    with pytest.raises(ValueError, match="Costs.comm"):
        Costs(f=1, b=2, w=1, fb=3, comm=-1)


# ---------------------------------------------------------------- JSON form and CLI

# ``python -m launch.schedule 1f1b --pp 2 --microbatches 2 --json``, as shown in docs/schedules.md.
JSON_1F1B_2_2 = """\
{"schedule": "1f1b", "pp": 2, "microbatches": 2, "ranks": [
  [
    {"op": "F", "dir": 0, "mb": 0, "chunk": 0, "split": false},
    {"op": "SEND", "peer": 1, "kind": "act", "dir": 0, "mb": 0, "chunk": 0, "tag": 0},
    {"op": "RECV", "peer": 1, "kind": "grad", "dir": 0, "mb": 0, "chunk": 0, "tag": 2},
    {"op": "F", "dir": 0, "mb": 1, "chunk": 0, "split": false},
    {"op": "SEND", "peer": 1, "kind": "act", "dir": 0, "mb": 1, "chunk": 0, "tag": 0},
    {"op": "RECV", "peer": 1, "kind": "grad", "dir": 0, "mb": 1, "chunk": 0, "tag": 2},
    {"op": "B", "dir": 0, "mb": 0, "chunk": 0, "split": false},
    {"op": "B", "dir": 0, "mb": 1, "chunk": 0, "split": false}
  ],
  [
    {"op": "RECV", "peer": 0, "kind": "act", "dir": 0, "mb": 0, "chunk": 0, "tag": 0},
    {"op": "F", "dir": 0, "mb": 0, "chunk": 0, "split": false},
    {"op": "RECV", "peer": 0, "kind": "act", "dir": 0, "mb": 1, "chunk": 0, "tag": 0},
    {"op": "B", "dir": 0, "mb": 0, "chunk": 0, "split": false},
    {"op": "SEND", "peer": 0, "kind": "grad", "dir": 0, "mb": 0, "chunk": 0, "tag": 2},
    {"op": "F", "dir": 0, "mb": 1, "chunk": 0, "split": false},
    {"op": "B", "dir": 0, "mb": 1, "chunk": 0, "split": false},
    {"op": "SEND", "peer": 0, "kind": "grad", "dir": 0, "mb": 1, "chunk": 0, "tag": 2}
  ]
]}"""


def test_json_documented_example(capsys):
    from launch.schedule import main

    assert main(["1f1b", "--pp", "2", "--microbatches", "2", "--json"]) == 0
    assert capsys.readouterr().out.rstrip("\n") == JSON_1F1B_2_2


@pytest.mark.parametrize("name, pp, m", [("dualpipe", 4, 10), ("dualpipev", 3, 7), ("1f1b", 3, 5), ("zb1p", 4, 6)])
def test_json_round_trip(name, pp, m):
    import json

    from runtime.schedules import dumps, from_json, to_json

    s = build(name, pp, m)
    d = json.loads(dumps(s))
    assert d == to_json(s) and from_json(d) == s
    ops = {a["op"] for rank in d["ranks"] for a in rank}
    assert ops <= {"F", "B", "W", "FB", "SEND", "RECV"}
    for rank in d["ranks"]:
        for a in rank:
            if a["op"] == "FB":
                assert set(a) == {"op", "f", "b"} and a["f"]["op"] == "F" and a["b"]["op"] == "B"
            elif a["op"] in ("SEND", "RECV"):
                assert set(a) == {"op", "peer", "kind", "dir", "mb", "chunk", "tag"}
            else:
                assert set(a) == {"op", "dir", "mb", "chunk", "split"}
    bad = json.loads(dumps(s))
    del bad["ranks"][0][0]["mb"]
    with pytest.raises(ValueError, match=r"ranks\[0\]\[0\].*mb"):
        from_json(bad)


def test_cli_table_issue4_figures(capsys):
    """``--table`` prints the issue-4 closing table; at F=1 B=2 W=1 F&B=2.6 comm=0 the simulated
    bubble equals the README closed form (values typed in from the formulas)."""
    from launch.schedule import main

    assert main(["--table", "--stages", "4", "8", "16", "--f", "1", "--b", "2", "--w", "1", "--fb", "2.6"]) == 0
    rows = {}
    for line in capsys.readouterr().out.splitlines()[2:]:
        cells = line.split()
        rows[(int(cells[0]), cells[1])] = cells[2:]
    want = {  # PP: 1F1B (PP-1)(F+B), ZB1P (PP-1)(F+B-2W), DualPipe(V) (PP/2-1)(F&B+B-3W)
        4: {"1f1b": 9.0, "zb1p": 3.0, "dualpipe": 1.6, "dualpipev": 1.6},
        8: {"1f1b": 21.0, "zb1p": 7.0, "dualpipe": 4.8, "dualpipev": 4.8},
        16: {"1f1b": 45.0, "zb1p": 15.0, "dualpipe": 11.2, "dualpipev": 11.2},
    }
    assert set(rows) == {(pp, name) for pp in want for name in want[pp]}
    for (pp, name), (ranks, mbs, sim, cf, act, params) in rows.items():
        assert int(ranks) == (pp // 2 if name == "dualpipev" else pp) and int(mbs) == 2 * pp
        assert float(sim) == pytest.approx(want[pp][name]) and float(cf) == pytest.approx(want[pp][name])
        two = name.startswith("dualpipe")
        assert act == f"{pp + 1 if two else pp}/{pp + 1 if two else pp}"
        assert params == ("2x/2x" if two else "1x/1x")


def test_stage_scale_ones_change_nothing_and_uneven_1f1b_matches_hand_formula():
    base = Costs(f=1, b=2, w=1, fb=2.6, comm=0.1)
    for sched in (dualpipe(4, 8), dualpipev(2, 6), one_f_one_b(4, 6), zb1p(4, 6)):
        ones = Costs(f=1, b=2, w=1, fb=2.6, comm=0.1, stage_scale=(1.0,) * sched.num_stages)
        assert simulate(sched, ones).spans == simulate(sched, base).spans
    # pp=2 1F1B, stage 1 slower (f1 + b1 >= f0 + b0): rank 1 never idles after its first input, so the
    # step is f0 + M (f1 + b1) + b0 (the last input gradient still runs on rank 0).
    for m in (1, 4, 7):
        sim = simulate(one_f_one_b(2, m), Costs(f=1, b=2, w=0, fb=3, stage_scale=(1.0, 1.5)))
        assert sim.makespan == pytest.approx(1 + m * 4.5 + 2)
    with pytest.raises(ValueError, match="give one factor per stage"):
        simulate(one_f_one_b(2, 2), Costs(f=1, b=2, w=0, fb=3, stage_scale=(1.0,)))
    with pytest.raises(ValueError, match=r"stage_scale\[1\]=0"):
        Costs(f=1, b=2, w=0, fb=3, stage_scale=(1.0, 0))
