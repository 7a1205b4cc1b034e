"""bench.analysis: the pure log-analysis functions of bench.pipeline, on synthetic span records with
answers worked out by hand (no MPI, no timing).

The main fixture is one 1F1B step on 2 ranks with 1 microbatch (times in ms, converted to ns):

    rank 0: step [0, 100]   F [0, 10]   wait grad [10.5, 49.5]   B [50, 70]
            send act  t0 10.2 (-> rank 1)       recv grad posted 10.3, landed 49.0
    rank 1: step [0.05, 99] wait act [0.5, 11.5]   F [12, 22]   B [22, 42]
            recv act posted 0.1, landed 11.4     send grad t0 42.2 (-> rank 0)
"""

from __future__ import annotations

import json

import pytest

from bench.analysis import (
    Message,
    compute_means,
    costs_from_means,
    fb_overlap,
    hop_latency,
    match_messages,
    overlap_ns,
    parse_lines,
    plan,
    predicted_waits,
    read_run,
    split_steps,
    step_figures,
    summarize,
    unexpected_waits,
)
from runtime.schedules import Costs, dualpipe, one_f_one_b, simulate, zb1p

MS = 1_000_000


def ns(ms: float) -> int:
    return round(ms * MS)


def span(name: str, t0: float, t1: float, **fields) -> dict:
    return {"event": "span", "span": name, "t0": ns(t0), "t1": ns(t1), "dur_us": (t1 - t0) * 1e3, **fields}


def comp(op, t0, t1, dir=0, mb=0, chunk=0, step=0, stage=0):
    return span("compute", t0, t1, op=op, dir=dir, mb=mb, chunk=chunk, stage=stage, step=step)


def one_f_one_b_step(offset: float = 0.0, step: int = 0) -> dict[int, list[dict]]:
    o = offset
    r0 = [
        comp("F", o + 0, o + 10, step=step),
        span("send", o + 10.2, o + 11.3, peer=1, channel=0, kind="act", mb=0, chunk=0, dir=0, nbytes=64),
        span("recv", o + 10.3, o + 49.0, peer=1, channel=2, kind="grad", mb=0, chunk=0, dir=0, nbytes=64),
        span("wait", o + 10.5, o + 49.5, kind="grad", dir=0, mb=0, chunk=0),
        comp("B", o + 50, o + 70, step=step),
        span("send", o + 80, o + 81, peer=1, channel=18, kind="ctrl", mb=-1, chunk=0, dir=0, nbytes=8),
        span("step", o + 0, o + 100, step=step),
    ]
    r1 = [
        span("recv", o + 0.1, o + 11.4, peer=0, channel=0, kind="act", mb=0, chunk=0, dir=0, nbytes=64),
        span("wait", o + 0.5, o + 11.5, kind="act", dir=0, mb=0, chunk=0),
        comp("F", o + 12, o + 22, step=step, stage=1),
        comp("B", o + 22, o + 42, step=step, stage=1),
        span("send", o + 42.2, o + 49.1, peer=0, channel=2, kind="grad", mb=0, chunk=0, dir=0, nbytes=64),
        span("step", o + 0.05, o + 99, step=step),
    ]
    return {0: r0, 1: r1}


def test_overlap_ns():
    assert overlap_ns(0, 10, 5, 20) == 5
    assert overlap_ns(5, 20, 0, 10) == 5
    assert overlap_ns(0, 10, 10, 20) == 0
    assert overlap_ns(0, 10, 12, 20) == 0
    assert overlap_ns(2, 4, 0, 10) == 2


def test_message_exposed_and_hidden():
    def msg(sent, posted, landed, wait):
        return Message(step=0, src=0, dst=1, kind="act", dir=0, mb=0, fb=True, sent=ns(sent), posted=ns(posted),
                       landed=ns(landed), wait=None if wait is None else (ns(wait[0]), ns(wait[1])))

    m = msg(10, 0, 30, (20, 32))  # in flight 10..30, receiver waits from 20: 10 of 20 exposed
    assert (m.comm_ns, m.exposed_ns, m.hidden_ns) == (ns(20), ns(10), ns(10))
    m = msg(10, 0, 30, (0, 31))  # waiting before the send left is dependency, not communication
    assert (m.comm_ns, m.exposed_ns, m.hidden_ns) == (ns(20), ns(20), 0)
    m = msg(10, 15, 30, None)  # receive posted late: in flight from the post; never waited for
    assert (m.start, m.comm_ns, m.exposed_ns, m.hidden_ns) == (ns(15), ns(15), 0, ns(15))


def test_parse_and_read_run(tmp_path):
    run = tmp_path / "r0-1f1b"
    run.mkdir()
    steps = one_f_one_b_step()
    for r, recs in steps.items():
        lines = [{"event": "log_start", "t_mono": 1}]
        if r == 0:
            lines.append({"event": "config", "schedule": "1f1b", "pp": 2, "microbatches": 1})
        lines += recs
        (run / f"rank-{r}.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    cfg, spans = parse_lines((run / "rank-0.jsonl").read_text().splitlines())
    assert cfg["schedule"] == "1f1b" and len(spans) == len(steps[0])
    log = read_run(run)
    assert (log.config["pp"], sorted(log.spans), len(log.spans[1])) == (2, [0, 1], len(steps[1]))
    with pytest.raises(FileNotFoundError):
        read_run(tmp_path / "nothing")


def test_split_steps_by_rank_windows():
    a, b = one_f_one_b_step(0, step=0), one_f_one_b_step(200, step=1)
    spans = {r: a[r] + b[r] for r in (0, 1)}
    spans[1] = spans[1] + [span("step", 400, 450, step=2)]  # rank 0 never logged step 2: dropped
    steps = split_steps(spans)
    assert [s.step for s in steps] == [0, 1]
    s1 = steps[1]
    assert [c["t0"] for c in s1.ranks[0].compute] == [ns(200), ns(250)]
    assert len(s1.ranks[0].send) == 2 and len(s1.ranks[1].recv) == 1 and len(s1.ranks[1].wait) == 1
    assert (s1.start, s1.end) == (ns(200), ns(300))


def test_step_figures_idle_wait_other():
    (step,) = split_steps(one_f_one_b_step())
    f = step_figures(step)
    assert f.makespan_ms == pytest.approx(70)  # earliest step start 0 -> last compute end 70
    assert f.wall_ms == pytest.approx(100) and f.tail_ms == pytest.approx(30)
    assert f.busy_ms == pytest.approx({0: 30, 1: 30})
    assert f.idle_ms == pytest.approx({0: 40, 1: 40})
    assert f.wait_ms == pytest.approx({0: 39, 1: 11})
    assert f.drain_ms == pytest.approx({0: 0, 1: 28})  # rank 1 is done at 42, rank 0 computes until 70
    assert f.overhead_ms == pytest.approx({0: 1, 1: 1})  # r0: 10-10.5, 49.5-50; r1: 0-0.5, 11.5-12
    assert f.overhead_f0_ms == pytest.approx({0: 0, 1: 0})
    assert f.bubble_ms == pytest.approx(40)


def test_overhead_before_stage0_forwards():
    r0 = [comp("F", 2, 10, mb=0), comp("F", 13, 20, mb=1), comp("B", 20.5, 30, mb=1), comp("B", 31, 40, mb=0),
          span("step", 0, 50, step=0)]
    r1 = [span("wait", 1, 11, kind="act", dir=0, mb=0, chunk=0), comp("F", 11, 25, mb=0, stage=1),
          span("step", 0, 50, step=0)]
    f = step_figures(split_steps({0: r0, 1: r1})[0])
    assert f.overhead_f0_ms == pytest.approx({0: 5, 1: 0})  # gaps 0-2 and 10-13; rank 1 runs stage 1
    assert f.overhead_ms == pytest.approx({0: 6.5, 1: 1})  # r0 adds 20-20.5, 30-31; r1: 0-1
    assert f.drain_ms == pytest.approx({0: 0, 1: 15})


def test_messages_latency_and_overlap():
    (step,) = split_steps(one_f_one_b_step())
    p = plan(one_f_one_b(2, 1))
    msgs, missing = match_messages(step, p)
    assert missing == 0 and len(msgs) == 2
    by_kind = {m.kind: m for m in msgs}
    act, grad = by_kind["act"], by_kind["grad"]
    assert (act.src, act.dst, act.start, act.landed) == (0, 1, ns(10.2), ns(11.4))
    assert act.wait == (ns(0.5), ns(11.5)) and act.exposed_ns == ns(1.2)
    assert (grad.src, grad.dst, grad.start, grad.comm_ns, grad.exposed_ns) == (1, 0, ns(42.2), ns(6.8), ns(6.8))
    assert not act.fb and not grad.fb  # 1F1B has no FB pairs
    assert hop_latency(msgs) == (pytest.approx(4.0), 2)  # median of 1.2 and 6.8
    o = fb_overlap(msgs, fb_only=False)
    assert o["messages"] == 2 and o["comm_ms"] == pytest.approx(8.0) and o["hidden_fraction"] == pytest.approx(0.0)
    assert fb_overlap(msgs)["messages"] == 0 and fb_overlap(msgs)["hidden_fraction"] is None
    # a message the receiver never waited for is fully hidden; it is no latency sample
    hidden = Message(step=0, src=0, dst=1, kind="act", dir=0, mb=1, fb=True, sent=0, posted=0, landed=ns(4), wait=None)
    o = fb_overlap(msgs + [hidden])
    assert o["messages"] == 1 and o["hidden_fraction"] == pytest.approx(1.0)
    both = fb_overlap(msgs + [hidden], fb_only=False)
    assert both["hidden_fraction"] == pytest.approx(4 / 12)
    assert hop_latency([hidden]) == (0.0, 0)
    strict = fb_overlap(msgs, fb_only=False, hop_ms=5.0)  # exposed 8 of a nominal 2 x 5 ms
    assert strict["nominal_comm_ms"] == pytest.approx(10) and strict["hidden_fraction_nominal"] == pytest.approx(0.2)
    assert fb_overlap(msgs, fb_only=False, hop_ms=1.0)["hidden_fraction_nominal"] == 0.0  # clamped
    assert fb_overlap(msgs, fb_only=False, hop_ms=0.0)["hidden_fraction_nominal"] is None
    # a missing recv span is counted, not guessed
    step.ranks[1].recv.clear()
    assert match_messages(step, p)[1] == 1


def test_plan_marks_fb_phase_messages():
    p = plan(dualpipe(2, 4))
    # rank 0 pairs F(dir1 mb1 chunk1)+B(dir0 mb0 chunk0), rank 1 F(dir0 mb1 chunk0)+B(dir1 mb0 chunk1):
    # their inputs are the FB-phase messages; their outputs go to the loss or the data end.
    fb = {(m.src, m.dst, m.kind, m.dir, m.mb) for m in p.messages if m.fb}
    assert fb == {(1, 0, "act", 1, 1), (1, 0, "grad", 0, 0), (0, 1, "act", 0, 1), (0, 1, "grad", 1, 0)}
    assert len(p.messages) == 8 and len(p.pairs) == 2
    assert (0, "F", 1, 1, 1) in p.pair_halves and (1, "B", 1, 0, 1) in p.pair_halves


def test_compute_means_pairs_split_and_w():
    p = plan(dualpipe(2, 4))
    r0 = [comp("F", 0, 10, dir=1, mb=1, chunk=1), comp("B", 10, 30, dir=0, mb=0, chunk=0),  # the pair: 30
          comp("F", 40, 44, dir=0, mb=0, chunk=0), comp("B", 50, 66, dir=1, mb=1, chunk=1),
          comp("B", 70, 80, dir=0, mb=1, chunk=0), comp("W", 80, 86, dir=0, mb=1, chunk=0),  # split B, W
          span("step", 0, 100, step=0)]
    r1 = [comp("F", 0, 12, dir=1, mb=0, chunk=1), span("step", 0, 100, step=0)]
    steps = split_steps({0: r0, 1: r1})
    m = compute_means(steps, p)
    assert m["F"] == {"mean_ms": pytest.approx((10 + 4 + 12) / 3), "n": 3}
    assert m["B"] == {"mean_ms": pytest.approx(18), "n": 2}
    assert m["Bsplit"] == {"mean_ms": pytest.approx(10), "n": 1}
    assert m["W"] == {"mean_ms": pytest.approx(6), "n": 1}
    assert m["FB"] == {"mean_ms": pytest.approx(30), "n": 1}


def test_costs_from_means_rules():
    def means(**kw):
        return {k: {"mean_ms": v, "n": 1} for k, v in kw.items()}

    c = costs_from_means(means(F=10, B=20, W=5, Bsplit=14, FB=28), 0.5)
    assert c == Costs(f=10, b=20, w=5, fb=28, comm=0.5)
    c = costs_from_means(means(F=10, Bsplit=12, W=7), 0.0)  # ZB1P: every B split
    assert (c.b, c.w, c.fb) == (19, 7, 29)
    c = costs_from_means(means(F=10, B=20), -1.0)  # 1F1B: no W; no pairs; negative comm clamped
    assert (c.w, c.fb, c.comm) == (0, 30, 0)
    c = costs_from_means(means(F=10, B=20, FB=15), 0.0)  # fb below max(f, b) is raised to it
    assert c.fb == 20


def test_predicted_and_unexpected_waits():
    sim = simulate(one_f_one_b(2, 1), Costs(f=10, b=20, w=0, fb=30, comm=4))
    assert predicted_waits(sim) == {(0, "F", 0, 0, 0): 0.0, (1, "F", 0, 0, 0): 14.0, (1, "B", 0, 0, 0): 0.0,
                                    (0, "B", 0, 0, 0): 38.0}
    steps = split_steps(one_f_one_b_step())  # measured waits: rank 0's B 39 ms, rank 1's F 11 ms
    msgs, _ = match_messages(steps[0], plan(one_f_one_b(2, 1)))
    rows = unexpected_waits(steps, sim, threshold_ms=0.5, messages=msgs)
    assert [(r["rank"], r["op"]) for r in rows] == [(0, "B")]
    assert rows[0]["excess_ms"] == pytest.approx(1.0)
    assert rows[0]["in_flight_ms"] == pytest.approx(6.8)  # the gradient left at 42.2, landed at 49.0
    assert unexpected_waits(steps, sim, threshold_ms=2.0) == []
    sim_pair = simulate(dualpipe(2, 4), Costs(f=1, b=2, w=1, fb=3))
    pw = predicted_waits(sim_pair)
    assert pw[(0, "B", 0, 0, 0)] == 0.0  # the B half of rank 0's pair never waits on its own


def test_summarize_known_step():
    runs = [(one_f_one_b(2, 1), split_steps(one_f_one_b_step()))]
    s = summarize(runs, wait_threshold_ms=1.5)
    assert s["steps_measured"] == 1 and s["median_step_ms"] == pytest.approx(100)
    assert s["bubble_ms"] == pytest.approx(40) and s["bubble_fraction"] == pytest.approx(0.4)
    assert s["costs_ms"] == pytest.approx({"f": 10, "b": 20, "w": 0, "fb": 30, "comm": 4})
    # simulated with those costs: r0 F 0-10, r1 F 14-24, B 24-44, r0 B 48-68 -> idle 38 on both
    assert s["sim"]["makespan_ms"] == pytest.approx(68) and s["sim"]["bubble_ms"] == pytest.approx(38)
    assert s["bubble_diff_pct_of_step"] == pytest.approx(2.0)
    assert s["fb_overlap"] is None and s["all_overlap"]["messages"] == 2
    assert s["unexpected_waits"] == [] and s["messages_unmatched"] == 0
    assert s["bubble_without_overhead_ms"] == pytest.approx(39)  # rank 0: wait 39 + drain 0
    assert s["stage_means_ms"] == {"F": {0: 10, 1: 10}, "B": {0: 20, 1: 20}}
    with pytest.raises(ValueError):
        summarize([(one_f_one_b(2, 1), [])])


def test_summarize_zb1p_costs_from_split_backward():
    # zb1p on 2 ranks, 1 microbatch: split B then W everywhere; no full B
    r0 = [comp("F", 0, 10), comp("B", 40, 52), comp("W", 52, 60), span("step", 0, 70, step=0)]
    r1 = [comp("F", 12, 22), comp("B", 22, 34), comp("W", 34, 42), span("step", 0, 70, step=0)]
    s = summarize([(zb1p(2, 1), split_steps({0: r0, 1: r1}))])
    assert s["costs_ms"]["b"] == pytest.approx(20) and s["costs_ms"]["w"] == pytest.approx(8)
    assert s["idle_ms"] == pytest.approx({0: 30, 1: 30})
    assert s["messages_unmatched"] == 2  # no send/recv spans in this log



def test_stage_scale_from_measured_stage_means():
    from bench.analysis import stage_scale_from

    ms = {"F": {0: 10.0, 1: 14.0}, "B": {0: 20.0, 1: 24.0}, "W": {0: 5.0}}
    assert stage_scale_from(ms, 2) == pytest.approx((30 / 34, 38 / 34))
    assert stage_scale_from({"F": {0: 1.0}, "B": {0: 1.0}}, 2) == ()
