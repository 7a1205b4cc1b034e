"""runtime.analysis (the log analysis behind launch.analyze and bench.pipeline) on synthetic span
records with answers worked out by hand, the reader's checks (schema version, corrupt lines, clock
alignment), the trace and timeline writers, and one real mpiexec run analysed end to end.

The main fixture is one 1F1B step on 2 ranks with 1 microbatch (times in ms, converted to ns):

    rank 0: step [0, 100]   F [0, 10]   wait grad [10.5, 49.5]   B [50, 70]
            send act  t0 10.2 (-> rank 1)       recv grad posted 10.3, landed 49.0
    rank 1: step [0.05, 99] wait act [0.5, 11.5]   F [12, 22]   B [22, 42]
            recv act posted 0.1, landed 11.4     send grad t0 42.2 (-> rank 0)
"""

from __future__ import annotations

import json

import pytest

from launch import analyze
from runtime import log
from runtime.analysis import LogError, read_run, report, split_steps, summarize
from runtime.analysis.messages import Message, fb_overlap, hop_latency, match_messages, plan
from runtime.analysis.predict import compute_means, costs_from_means, predicted_waits, stage_scale_from, unexpected_waits
from runtime.analysis.steps import overlap_ns, step_figures, union_ns
from runtime.analysis.timeline import draw_timeline
from runtime.analysis.trace import chrome_trace
from runtime.clock import ClockOffset, best_offset
from runtime.schedules import Costs, dualpipe, one_f_one_b, simulate, zb1p
from tests.mpirun import mpirun

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
        span("send", o + 10.2, o + 11.3, peer=1, channel=0, kind="act", mb=0, chunk=0, dir=0, nbytes=64,
             seq=step),
        span("recv", o + 10.3, o + 49.0, peer=1, channel=2, kind="grad", mb=0, chunk=0, dir=0, nbytes=64,
             seq=step),
        span("wait", o + 10.5, o + 49.5, kind="grad", dir=0, mb=0, chunk=0),
        comp("B", o + 50, o + 70, step=step),
        span("send", o + 80, o + 81, peer=1, channel=18, kind="ctrl", mb=-1, chunk=0, dir=0, nbytes=8, seq=step),
        span("step", o + 0, o + 100, step=step),
    ]
    r1 = [
        span("recv", o + 0.1, o + 11.4, peer=0, channel=0, kind="act", mb=0, chunk=0, dir=0, nbytes=64,
             seq=step),
        span("wait", o + 0.5, o + 11.5, kind="act", dir=0, mb=0, chunk=0),
        comp("F", o + 12, o + 22, step=step, stage=1),
        comp("B", o + 22, o + 42, step=step, stage=1),
        span("send", o + 42.2, o + 49.1, peer=0, channel=2, kind="grad", mb=0, chunk=0, dir=0, nbytes=64,
             seq=step),
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
    ms = {"F": {0: 10.0, 1: 14.0}, "B": {0: 20.0, 1: 24.0}, "W": {0: 5.0}}
    assert stage_scale_from(ms, 2) == pytest.approx((30 / 34, 38 / 34))
    assert stage_scale_from({"F": {0: 1.0}, "B": {0: 1.0}}, 2) == ()


# ----------------------------------------------------------------------------- run folders on disk
CONFIG_1F1B = {"schedule": "1f1b", "pp": 2, "microbatches": 1, "stages": 2, "tokens_per_step": 128}


def write_run(root, ranks: dict[int, list[dict]], *, config=CONFIG_1F1B, hosts=None, clocks=None, schema=1):
    """A run folder as launch.train writes it: log_start (schema), clock, config (rank 0), spans."""
    root.mkdir(parents=True, exist_ok=True)
    for r, recs in ranks.items():
        host = (hosts or {}).get(r, "h0")
        lines = [{"event": "log_start", "schema": schema, "t_mono": 0, "t_wall": 0.0, "rank": r, "host": host}]
        if clocks and r in clocks:
            lines.append({"event": "clock", "offset_ns": clocks[r], "rtt_ns": 2000, "rounds": 8, "host": host})
        if r == 0 and config is not None:
            lines.append({"event": "config", **config})
        lines += [{**x, "rank": r, "host": host} for x in recs]
        (root / f"rank-{r}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return root


def two_steps(rank1_shift_ms: float = 0.0) -> dict[int, list[dict]]:
    """Two copies of the 1F1B fixture (steps 0 and 1, 200 ms apart) with three changes: rank 1's
    wait for the activation ends at 10.8 (before the message landed at 11.4: 0.6 of its 1.2 ms in
    flight is exposed, 0.6 hidden), rank 1's F starts at 11 and takes 11 ms (the slowest rank and
    stage: 31 ms of compute per step vs 30), and the step spans carry peak memory. Rank 1's clock is shifted."""
    out = {0: [], 1: []}
    for k in (0, 1):
        st = one_f_one_b_step(200 * k, step=k)
        for r, recs in st.items():
            for x in recs:
                x = dict(x)
                if r == 1 and x["span"] == "wait":
                    x["t1"] = ns(200 * k + 10.8)
                if r == 1 and x["span"] == "compute" and x["op"] == "F":
                    x["t0"] = ns(200 * k + 11)
                if x["span"] == "step":
                    x["peak_mem_bytes"] = (100 + 20 * k + r) * 2**20
                out[r].append(x)
    shift = ns(rank1_shift_ms)
    for x in out[1]:
        x["t0"] += shift
        x["t1"] += shift
    return out


def test_read_run_reports_bad_lines_with_file_and_line(tmp_path):
    run = write_run(tmp_path / "run", one_f_one_b_step())
    path = run / "rank-1.jsonl"
    n = len(path.read_text().splitlines())
    with path.open("a") as fh:
        fh.write(json.dumps(span("compute", 50, 60, dir=0, mb=0, chunk=0, stage=1, step=0)) + "\n")  # no 'op'
        fh.write(json.dumps(span("wait", 60, 59, kind="act", dir=0, mb=0, chunk=0)) + "\n")  # ends before it starts
        fh.write('{"event": "span", "span": "comp')  # a crash cut the last line
    log = read_run(run)
    assert log.problems == [f"{path}:{n + 1}: compute span lacks op, skipped",
                            f"{path}:{n + 2}: t1 59000000 before t0 60000000, skipped",
                            f"{path}:{n + 3}: not JSON (Unterminated string starting at; truncated?), skipped"]
    assert len(log.spans[1]) == len(one_f_one_b_step()[1])  # the good spans are all there


def test_read_run_refuses_what_it_cannot_analyse(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(LogError, match="no rank-\\*.jsonl logs"):
        read_run(tmp_path / "empty")
    with pytest.raises(LogError, match="no such folder"):
        read_run(tmp_path / "missing")
    run = write_run(tmp_path / "v99", one_f_one_b_step(), schema=99)
    with pytest.raises(LogError, match=r"rank-0.jsonl:1: span schema version 99; this reader knows \[1\]"):
        read_run(run)
    run = write_run(tmp_path / "old", one_f_one_b_step(), schema=None)
    with pytest.raises(LogError, match="carries no span-schema version"):
        read_run(run)
    run = write_run(tmp_path / "nocfg", one_f_one_b_step(), config=None)
    with pytest.raises(LogError, match="no 'config' record"):
        read_run(run)
    (run / "rank-1.jsonl").write_text("")
    with pytest.raises(LogError, match="rank-1.jsonl: no log_start record"):
        read_run(run)


def test_report_figures_of_a_known_run(tmp_path):
    log = read_run(write_run(tmp_path / "run", two_steps(), hosts={0: "node-a", 1: "node-b"}))
    r = report(log)
    assert r["steps"] == [0, 1] and r["step_ms"] == pytest.approx(100)
    assert r["tokens_per_s"] == pytest.approx(128 / 0.1)
    r0, r1 = r["ranks"][0], r["ranks"][1]
    # rank 0 receives the gradient: in flight 42.2 -> 49.0, all of it while rank 0 waits
    assert (r0["comm_ms"], r0["comm_exposed_ms"], r0["hidden_pct"]) == (pytest.approx(6.8), pytest.approx(6.8),
                                                                         pytest.approx(0))
    # rank 1 receives the activation: in flight 10.2 -> 11.4, waited for until 10.8
    assert (r1["comm_ms"], r1["comm_exposed_ms"], r1["hidden_pct"]) == (pytest.approx(1.2), pytest.approx(0.6),
                                                                         pytest.approx(50))
    assert r["overall"]["hidden_pct"] == pytest.approx(100 * 0.6 / 8.0)
    # idle split: rank 1 computes 11-22 and 22-42 (busy 31) of the 70 ms pipeline, waits 0.5-10.8,
    # is done at 42 while rank 0 computes until 70; the rest (0-0.5, 10.8-11) is executor overhead
    assert (r1["compute_ms"], r1["idle_ms"], r1["wait_ms"], r1["drain_ms"], r1["overhead_ms"]) == (
        pytest.approx(31), pytest.approx(39), pytest.approx(10.3), pytest.approx(28), pytest.approx(0.7))
    assert (r0["peak_mem_bytes"], r1["peak_mem_bytes"]) == (120 * 2**20, 121 * 2**20)
    assert r["slowest_rank"] == {"rank": 1, "compute_ms": pytest.approx(31)}
    assert r["slowest_stage"] == {"stage": 1, "compute_ms": pytest.approx(31)}
    # attribution: rank 0's B waited 10.5-49.5 for the gradient that left at 42.2 and landed at 49.0
    w = {(x["rank"], x["action"]): x for x in r["waits"]}
    b = w[(0, "B(dir 0, mb 0, chunk 0)")]
    assert (b["on_rank"], b["on_action"]) == (1, "B(dir 0, mb 0, chunk 0)")
    assert (b["wait_ms"], b["producer_ms"], b["in_flight_ms"], b["after_ms"]) == (
        pytest.approx(39), pytest.approx(31.7), pytest.approx(6.8), pytest.approx(0.5))
    f = w[(1, "F(dir 0, mb 0, chunk 0)")]
    assert (f["wait_ms"], f["producer_ms"], f["in_flight_ms"], f["after_ms"]) == (
        pytest.approx(10.3), pytest.approx(9.7), pytest.approx(0.6), pytest.approx(0, abs=1e-9))
    assert [(x["rank"], x["on_rank"]) for x in r["waited_on"]] == [(0, 1), (1, 0)]
    assert r["pipeline_end"] == [{"rank": 0, "op": "B", "dir": 0, "mb": 0, "chunk": 0, "steps": 2}]
    # traffic: every send span, by kind and link class (two hosts: inter-node)
    assert r["traffic"] == [
        {"kind": "act", "link": "inter-node", "messages": 2, "bytes": 128, "time_ms": pytest.approx(2.2)},
        {"kind": "grad", "link": "inter-node", "messages": 2, "bytes": 128, "time_ms": pytest.approx(13.8)},
        {"kind": "ctrl", "link": "inter-node", "messages": 2, "bytes": 16, "time_ms": pytest.approx(2.0)}]
    finer = report(log, link_class=lambda src, dst: f"link{min(src, dst)}{max(src, dst)}")
    assert {t["link"] for t in finer["traffic"]} == {"link01"}
    assert report(log, first=1)["steps"] == [1]
    with pytest.raises(LogError, match=r"no step every rank completed in --steps 5: \(complete steps: 0..1\)"):
        report(log, first=5)


def test_clock_offsets_put_ranks_on_rank0s_time(tmp_path):
    """Rank 1 runs on another host whose clock is 5 s ahead of rank 0's, and its clock record says
    so: the figures are those of the unshifted run. Without the record they are not (and a note
    says the times are unaligned). On rank 0's host a logged estimate is not applied (one clock)."""
    hosts = {0: "a", 1: "b"}
    want = report(read_run(write_run(tmp_path / "same", two_steps(), hosts=hosts)))
    skewed = two_steps(rank1_shift_ms=5000)
    got = report(read_run(write_run(tmp_path / "aligned", skewed, hosts=hosts, clocks={0: 0, 1: -ns(5000)})))
    for key in ("step_ms", "makespan_ms", "bubble", "waits", "overall", "pipeline_end"):
        assert got[key] == want[key], key
    for r in (0, 1):
        clock = ("clock_offset_ms", "clock_rtt_us")
        assert {k: v for k, v in got["ranks"][r].items() if k not in clock} == \
               {k: v for k, v in want["ranks"][r].items() if k not in clock}
    assert (got["ranks"][1]["clock_offset_ms"], got["ranks"][1]["clock_rtt_us"]) == (-5000, 2)
    one_host = read_run(write_run(tmp_path / "onehost", two_steps(), clocks={0: 0, 1: 700_000}))
    assert one_host.clocks[1] == {"offset_ns": 0, "measured_ns": 700_000, "rtt_ns": 2000}
    assert report(one_host)["bubble"] == want["bubble"]
    log = read_run(write_run(tmp_path / "unaligned", skewed, hosts={0: "a", 1: "b"}))
    assert "its times are not aligned with rank 0's" in log.problems[0]
    assert report(log)["step_ms"] == pytest.approx(5099)  # rank 0's step 0-100 ms, rank 1's 5000.05-5099


# ------------------------------------------------------------------------------ trace and picture
def _no_overlap_per_track(events: list[dict]) -> bool:
    tracks: dict[tuple, list] = {}
    for e in events:
        if e["ph"] == "X":
            tracks.setdefault((e["pid"], e["tid"]), []).append((e["ts"], e["ts"] + e["dur"]))
    return all(a[1] <= b[0] + 1e-9 for iv in tracks.values() for a, b in zip(sorted(iv), sorted(iv)[1:]))


def test_chrome_trace_of_known_spans():
    records = two_steps()
    records[0].append(span("send", 10.25, 11.0, peer=1, channel=5, kind="ctrl", mb=-1, chunk=0, dir=0, nbytes=8,
                           seq=0))  # overlaps the activation send: needs a second send track
    records[1].append(span("recv", 0.2, 11.1, peer=0, channel=5, kind="ctrl", mb=-1, chunk=0, dir=0, nbytes=8, seq=0))
    t = chrome_trace(records, hosts={0: "a", 1: "b"}, fb_halves=frozenset({(1, "F", 0, 0, 0)}))
    ev = t["traceEvents"]
    xs = [e for e in ev if e["ph"] == "X"]
    assert len(xs) == sum(len(v) for v in records.values())  # one complete event per span
    assert _no_overlap_per_track(ev)
    names = {(e["pid"], e["name"]) for e in xs}
    assert (0, "F mb0 d0 c0") in names and (1, "F mb0 d0 c0 [FB]") in names and (0, "B mb0 d0 c0") in names
    meta = {(e["pid"], e["tid"], e["name"]): e["args"] for e in ev if e["ph"] == "M"}
    assert meta[(0, 0, "process_name")] == {"name": "rank 0 (a)"}
    threads = {(pid, a["name"]) for (pid, _, n), a in meta.items() if n == "thread_name"}
    assert {(0, "compute"), (0, "send"), (0, "send #2"), (0, "recv"), (1, "recv"), (1, "recv #2"), (1, "step")} <= threads
    # flows: act and grad of both steps and the ctrl message, matched by (src, dst, channel, seq);
    # rank 0's second ctrl send (channel 18, no receive logged) gets none
    starts = {e["id"]: e for e in ev if e["ph"] == "s"}
    ends = {e["id"]: e for e in ev if e["ph"] == "f"}
    assert len(starts) == 5 and starts.keys() == ends.keys()
    tid_name = {(pid, tid): a["name"] for (pid, tid, n), a in meta.items() if n == "thread_name"}
    for k, s in starts.items():
        f = ends[k]
        assert tid_name[(s["pid"], s["tid"])].startswith("send") and tid_name[(f["pid"], f["tid"])].startswith("recv")
        assert s["pid"] != f["pid"] and f["bp"] == "e"
    act0 = next(s for s in starts.values() if s["name"] == "r0->r1 ch0 #0")
    assert act0["ts"] == pytest.approx((10.2 + 11.3) / 2 * 1e3)  # mid-send, µs from the first span (0)
    assert chrome_trace(records, window=(0, ns(150)))["traceEvents"].__len__() < len(ev)  # step 0 only


def test_timeline_png(tmp_path):
    path = draw_timeline(tmp_path / "t.png", split_steps(two_steps()), fb_halves=frozenset({(1, "F", 0, 0, 0)}),
                         title="two 1F1B steps")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    with pytest.raises(ValueError, match="at least one step"):
        draw_timeline(tmp_path / "none.png", [])


# ---------------------------------------------------------------------- run ids, clocks, the CLI
def test_run_folders_are_unique_and_created_once(tmp_path):
    ids = {log.fresh_run_id() for _ in range(200)}  # all within the same second
    assert len(ids) == 200
    made = log.create_run_dir(tmp_path / "rel", "x")
    assert made.is_absolute() and made.is_dir()
    with pytest.raises(FileExistsError, match="pass a new --run-id"):
        log.create_run_dir(tmp_path / "rel", "x")


def test_best_offset_keeps_the_shortest_round_trip():
    # rank 0's clock reads 1000 ns ahead; the second sample's reply was delayed on the way back
    samples = [(0, 1500, 1000), (2000, 3050, 2900), (5000, 6060, 5120)]
    assert best_offset(samples) == ClockOffset(offset_ns=6060 - 5060, rtt_ns=120, rounds=3)
    with pytest.raises(ValueError):
        best_offset([])


@pytest.mark.mpi
def test_clock_offsets_with_injected_skew_under_mpiexec():
    """Ranks 1 and 2 read clocks skewed by +7 s and -3 s: the estimated offsets undo the skew to
    within half the round trip (the clocks are one host's, so that bound is exact)."""
    _, out, _ = mpirun(3, "tests.mpi.clock_checks", timeout=60)
    assert out.count("clock ok") == 3, out


def test_analyze_cli_errors(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert analyze.main([str(tmp_path / "empty")]) == 2
    assert "no run folders with rank-*.jsonl logs" in capsys.readouterr().err
    run = write_run(tmp_path / "v2" / "run", one_f_one_b_step(), schema=2)
    assert analyze.main([str(run)]) == 2
    assert "span schema version 2" in capsys.readouterr().err
    for bad in ("x", "5:3", "1:2:3"):
        with pytest.raises(SystemExit):
            analyze.main([str(run), "--steps", bad])
        assert "--steps" in capsys.readouterr().err
    assert analyze.parse_steps("3:10") == (3, 10) and analyze.parse_steps("4") == (4, 5)
    assert analyze.parse_steps(":7") == (None, 7) and analyze.parse_steps("2:") == (2, None)


@pytest.mark.mpi
def test_real_run_trace_and_timeline(tmp_path, capsys):
    """A real 2-rank DualPipe run, analysed: the figures come out, the trace has one complete event
    per logged span and one flow per message, the PNG is written."""
    mpirun(2, "launch.train", "--schedule", "dualpipe", "--pp", "2", "--microbatches", "4", "--model", "tiny",
           "--steps", "3", "--log-dir", str(tmp_path), "--run-id", "real", timeout=120)
    run = tmp_path / "real"
    assert analyze.main([str(tmp_path), "--json", "--trace", str(tmp_path / "t.json"), "--png"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["steps"] == [1, 2] and r["problems"] == [] and r["messages_unmatched"] == 0
    assert r["tokens_per_s"] > 0 and all(x["peak_mem_bytes"] > 0 for x in r["ranks"].values())
    recs = [json.loads(x) for p in sorted(run.glob("rank-*.jsonl")) for x in p.read_text().splitlines()]
    logged = [x for x in recs if x["event"] == "span"]
    sends = [x for x in logged if x["span"] == "send"]
    assert len(sends) == sum(x["span"] == "recv" for x in logged) > 0
    trace = json.loads((tmp_path / "t.json").read_text())
    ev = trace["traceEvents"]
    assert all({"ph", "pid", "tid"} <= e.keys() and "name" in e for e in ev)
    assert sum(e["ph"] == "X" for e in ev) == len(logged)
    assert sum(e["ph"] == "s" for e in ev) == sum(e["ph"] == "f" for e in ev) == len(sends)
    assert _no_overlap_per_track(ev)
    png = (run / "timeline.png").read_bytes()
    assert png[:4] == b"\x89PNG" and len(png) > 5000


def test_overlapping_pair_halves_count_once():
    """An FB pair whose halves run interleaved logs two overlapping spans: busy time and the pair's
    cost are the time they cover (20 ms), not the sum of their lengths (25 ms)."""
    pair_f, pair_b = comp("F", 0, 10, dir=1, mb=1, chunk=1), comp("B", 5, 20, dir=0, mb=0, chunk=0)
    steps = split_steps({0: [pair_f, pair_b, span("step", 0, 30, step=0)],
                         1: [comp("F", 0, 10, dir=1, mb=0, chunk=1, stage=1), span("step", 0, 30, step=0)]})
    assert step_figures(steps[0]).busy_ms == pytest.approx({0: 20, 1: 10})
    assert compute_means(steps, plan(dualpipe(2, 4)))["FB"]["mean_ms"] == pytest.approx(20)
    assert union_ns([(0, 10), (5, 20), (30, 40), (32, 35)]) == 30


def test_expert_parallel_run_is_analysed_one_pipeline_replica_at_a_time(tmp_path):
    """ep = 2: world ranks 2p and 2p+1 are pipeline rank p's EP ranks, and pipeline messages name
    peers by pipeline rank. Replica 0 (world 0 and 2) gives the figures of the plain 2-rank run."""
    want = report(read_run(write_run(tmp_path / "plain", two_steps())))
    st = two_steps()
    ranks = {0: st[0], 2: st[1], 1: [dict(x) for x in st[0]], 3: [dict(x) for x in st[1]]}
    log = read_run(write_run(tmp_path / "ep", ranks, config={**CONFIG_1F1B, "ep": 2}))
    got = report(log)
    assert (got["ep"], got["ep_index"]) == (2, 0)
    assert [x["world_rank"] for x in got["ranks"].values()] == [0, 2]
    for key in ("step_ms", "bubble", "waits", "overall", "traffic"):
        assert got[key] == want[key], key
    assert [x["world_rank"] for x in report(log, ep_index=1)["ranks"].values()] == [1, 3]
    with pytest.raises(LogError, match=r"EP index 2 does not exist: the run has ep=2 \(pick 0..1\)"):
        report(log, ep_index=2)
    trace = chrome_trace(log.spans, peer_rank=lambda rank, peer: peer * 2 + rank % 2)
    assert sum(e["ph"] == "s" for e in trace["traceEvents"]) == 8  # act and grad, 2 steps, 2 replicas


# ----------------------------------------------------------------------------- expert-parallel exchanges
def ex(t0, t1, phase, link, *, nbytes, wait_ms, context="fb", layer=3, mb=(0, 1, 0)):
    return span("exchange", t0, t1, exchange="ep-moe-fwd", phase=phase, link=link, layer=layer, mb=list(mb),
                nbytes=nbytes, peers=1, context=context, wait_us=wait_ms * 1e3)


def ep_step(step, nbytes, load):
    return {"event": "ep_step", "step": step, "bytes": nbytes, "expert_load": load,
            "exchange_wait_s": {"fb": 0.0}}


def ep_run() -> dict[int, list[dict]]:
    """two_steps() at ep = 2 (world 0, 1: pipeline rank 0; world 2, 3: pipeline rank 1) with EP
    exchange spans and ep_step records (per step: dispatch hop1 in flight 10 then 6 ms, blocked 4 then
    0; combine hop1 4 ms all blocked; an intra-node hop2 on world rank 1) and two spans outside
    their own rank's steps: world rank 3 at 99.5 ms (its step 0 ends at 99, rank 0's at 100) and
    one between the steps."""
    st = two_steps()
    ranks = {0: st[0], 2: st[1], 1: [dict(x) for x in st[0]], 3: [dict(x) for x in st[1]]}
    ranks[0] += [ex(20, 30, "dispatch hop1", "inter-node", nbytes=1000, wait_ms=4),
                 ex(40, 44, "combine hop1", "inter-node", nbytes=500, wait_ms=4, context="other"),
                 ex(220, 226, "dispatch hop1", "inter-node", nbytes=1000, wait_ms=0),
                 ep_step(0, {"dispatch_inter": 1000, "dispatch_inter_meta": 40, "combine_inter": 500},
                         {"0": [[1, 3], [2, 2]]}),
                 ep_step(1, {"dispatch_inter": 1000}, {"0": [[2, 2], [4, 0]]})]
    ranks[1] += [ex(20, 22, "dispatch hop2", "intra-node", nbytes=300, wait_ms=0),
                 ep_step(0, {"dispatch_intra": 300}, {"0": [[0, 9], [9, 0]]}),  # ignored: rank 0 speaks for the group
                 ep_step(1, {}, {"0": [[0, 9], [9, 0]]})]
    ranks[2] += [ep_step(0, {}, {"1": [[3, 1]]})]
    ranks[3] += [ex(99.5, 99.8, "dispatch hop1", "inter-node", nbytes=7, wait_ms=0.1),
                 ex(120, 121, "dispatch hop1", "inter-node", nbytes=7, wait_ms=0.1)]
    return ranks


def test_ep_exchanges_by_phase_and_link_class(tmp_path):
    """Catches: exchange spans counted by another rank's step window or outside the analysed steps
    (the 99.5 / 120 ms spans, and step 0 when only step 1 is analysed), wait_us read as ns or
    hidden inverted (75% = 1 - 4/16), link classes mixed in the totals, totals not per step, and the
    FB / elsewhere split."""
    log = read_run(write_run(tmp_path / "ep", ep_run(), config={**CONFIG_1F1B, "ep": 2}))
    r = report(log, first=0)
    rows = {(x["phase"], x["link"]): x for x in r["ep_exchanges"]["rows"]}
    assert list(rows) == [("dispatch hop1", "inter-node"), ("dispatch hop2", "intra-node"),
                          ("combine hop1", "inter-node")]
    d = rows[("dispatch hop1", "inter-node")]
    assert (d["exchanges"], d["bytes"]) == (1.0, 1000.0)
    assert (d["in_flight_ms"], d["blocked_ms"], d["hidden_pct"]) == pytest.approx((8.0, 2.0, 75.0))
    assert rows[("combine hop1", "inter-node")]["hidden_pct"] == pytest.approx(0.0)
    links = {x["link"]: x for x in r["ep_exchanges"]["links"]}
    assert list(links) == ["inter-node", "intra-node"]
    assert (links["inter-node"]["bytes"], links["inter-node"]["in_flight_ms"]) == pytest.approx((1250.0, 10.0))
    assert links["inter-node"]["hidden_pct"] == pytest.approx(60.0)
    assert (links["intra-node"]["bytes"], links["intra-node"]["hidden_pct"]) == pytest.approx((150.0, 100.0))
    ctx = r["ep_exchanges"]["contexts"]
    assert ctx["fb"]["hidden_pct"] == pytest.approx(100 * (1 - 4 / 18))
    assert ctx["other"]["hidden_pct"] == pytest.approx(0.0)
    only1 = report(log, first=1, stop=2)["ep_exchanges"]["rows"]
    assert [(x["phase"], x["exchanges"], x["in_flight_ms"], x["hidden_pct"]) for x in only1] == \
        [("dispatch hop1", 1.0, pytest.approx(6.0), pytest.approx(100.0))]
    assert report(read_run(write_run(tmp_path / "plain", two_steps())))["ep_exchanges"] is None


def test_ep_step_bytes_per_link_and_expert_load(tmp_path):
    """Catches: token and meta bytes mixed, bytes not summed over ranks or not averaged over steps,
    link classes mixed, expert loads taken from every EP rank's copy (world rank 1's differ here)
    instead of once per stage, pipeline rank taken as the world rank, the worst step misnamed."""
    log = read_run(write_run(tmp_path / "ep", ep_run(), config={**CONFIG_1F1B, "ep": 2}))
    e = report(log, first=0)["ep_steps"]
    assert e["steps"] == 2
    assert e["bytes_per_step"] == {"inter": {"tokens": 1250.0, "meta": 20.0}, "intra": {"tokens": 150.0, "meta": 0.0}}
    assert e["bytes_by_phase"]["dispatch_inter"] == 1000.0
    load = {(x["pp_rank"], x["chunk"], x["moe_layer"]): x for x in e["load"]}
    assert list(load) == [(0, "0", 0), (0, "0", 1), (1, "1", 0)]
    assert (load[0, "0", 0]["max_over_mean"], load[0, "0", 0]["worst"], load[0, "0", 0]["worst_step"]) == (1.25, 1.5, 0)
    assert (load[0, "0", 1]["max_over_mean"], load[0, "0", 1]["worst_step"]) == (1.5, 1)
    assert load[1, "1", 0]["max_over_mean"] == 1.5
    bad = ep_run()
    bad[1].append({"event": "ep_step", "bytes": {}})
    log = read_run(write_run(tmp_path / "bad", bad, config={**CONFIG_1F1B, "ep": 2}))
    assert any("rank-1.jsonl" in p and "ep_step record without an integer step" in p for p in log.problems)


def test_ep_exchanges_in_trace_and_cli(tmp_path, capsys):
    """Catches: exchange spans dropped from the trace or drawn on the compute / send tracks instead
    of one track per link class, overlapping exchanges sharing a track, a label without phase /
    layer / microbatch, and the CLI not printing the EP table."""
    log = read_run(write_run(tmp_path / "ep", ep_run(), config={**CONFIG_1F1B, "ep": 2}))
    ranks = {r: list(recs) for r, recs in log.spans.items()}
    ranks[0].append(ex(25, 35, "combine-bwd hop1", "inter-node", nbytes=1, wait_ms=0, mb=(1, 0, 1)))  # overlaps
    ev = chrome_trace(ranks)["traceEvents"]
    tracks = {(e["pid"], e["tid"]): e["args"]["name"] for e in ev if e["name"] == "thread_name"}
    exch = [e for e in ev if e["ph"] == "X" and e["cat"] == "exchange"]
    assert len(exch) == sum(s["span"] == "exchange" for recs in ranks.values() for s in recs) == 7
    assert {tracks[e["pid"], e["tid"]] for e in exch if e["args"]["link"] == "inter-node"} == \
        {"ep inter-node", "ep inter-node #2"}
    assert {tracks[e["pid"], e["tid"]] for e in exch if e["args"]["link"] == "intra-node"} == {"ep intra-node"}
    assert {e["name"] for e in exch if e["pid"] == 1} == {"dispatch hop2 L3 mb1 d0 c0"}
    assert _no_overlap_per_track(ev)
    assert analyze.main([str(tmp_path / "ep"), "--steps", "0:2"]) == 0
    out = capsys.readouterr().out
    assert "expert-parallel exchanges" in out and "dispatch hop1" in out and "75.0%" in out
    assert "inter-node 0.001 MB tokens + 0.000 MB meta" in out and "worst 2.00 (step 1, r0 c0 L1)" in out
