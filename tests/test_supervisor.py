"""The supervisor's judgement on synthetic heartbeats (no MPI), and a real heartbeat thread.

Deadlines are shrunk to tenths of a second; each test feeds the messages a job would send and
checks the verdict names the rank the scenario made the culprit (the mpiexec tests in
tests/test_reliability_mpi.py cover the same verdicts end to end).
"""

from __future__ import annotations

import json
import os
import re
import time

import msgpack
import pytest
import zmq

from launch.supervisor import EXIT_CODE, Supervisor, SupervisorConfig, supervise
from runtime.heartbeat import Heartbeat

FAST = SupervisorConfig(heartbeat_s=0.05, liveness_s=0.4, progress_s=0.4, startup_s=0.6)


def _sup(n: int) -> Supervisor:
    sup = Supervisor(n, FAST)
    for r in range(n):  # remote ranks (another host): no pid checks, heartbeats only
        sup._take({"type": "hello", "rank": r, "pid": 1, "host": "elsewhere",
                   "role": {"role": "stage", "stages": [r], "schedule": "1f1b", "num_stages": n}, "log_dir": None})
    return sup


def _beat(sup: Supervisor, rank: int, *, count: int, waits_for: list[int], step: int = 3,
          compute: float | None = 0.1, action: str = "F(mb=0)") -> None:
    sup._take({"type": "beat", "rank": rank, "step": step, "action": action, "count": count,
               "waits_for": waits_for, "pending": [], "num_pending": len(waits_for), "last_step_s": 0.2,
               "last_compute_s": compute, "flight": []})


def _run_until_verdict(sup: Supervisor, beats, limit_s: float = 3.0) -> dict:
    t_end = time.monotonic() + limit_s
    while time.monotonic() < t_end:
        beats()
        verdict = sup.check()
        if verdict is not None:
            return verdict
        time.sleep(0.02)
    pytest.fail("no verdict")


def test_stuck_rank_found_at_the_end_of_the_waits_for_chain():
    # rank 0 waits for 1, 1 waits for 2, rank 2 waits for nobody and never advances: 2 is stuck
    sup = _sup(4)
    v = _run_until_verdict(sup, lambda: [_beat(sup, 0, count=5, waits_for=[1]), _beat(sup, 1, count=7, waits_for=[2]),
                                         _beat(sup, 2, count=9, waits_for=[]), _beat(sup, 3, count=9, waits_for=[0])])
    assert v["verdict"] == "stuck" and v["rank"] == 2 and "rank 1 waits on it" in v["why"]
    assert "pipeline stage 2 of 4 (1f1b)" in v["text"]
    sup.close()


def test_cycle_is_reported_as_a_deadlock():
    sup = _sup(2)
    v = _run_until_verdict(sup, lambda: [_beat(sup, 0, count=1, waits_for=[1]), _beat(sup, 1, count=1, waits_for=[0])])
    assert v["verdict"] == "stuck" and "deadlock" in v["why"]
    sup.close()


def test_silent_rank_is_named_and_a_progressing_rank_is_not_stuck():
    sup = _sup(3)
    counter = iter(range(10**6))
    # rank 1 beats once then goes silent; 0 and 2 keep beating and advancing
    _beat(sup, 1, count=0, waits_for=[])
    v = _run_until_verdict(sup, lambda: [_beat(sup, 0, count=next(counter), waits_for=[1]),
                                         _beat(sup, 2, count=next(counter), waits_for=[])])
    assert v["verdict"] == "silent" and v["rank"] == 1 and "no heartbeat" in v["why"]
    sup.close()


def test_rank_that_never_reports_is_named_after_the_startup_grace():
    sup = Supervisor(2, FAST)
    sup._take({"type": "hello", "rank": 0, "pid": 1, "host": "elsewhere", "role": {"role": "stage"}, "log_dir": None})
    v = _run_until_verdict(sup, lambda: _beat(sup, 0, count=time.monotonic_ns(), waits_for=[]))
    assert v["verdict"] == "silent" and v["rank"] == 1 and "never reported" in v["why"] and sup.address in v["why"]
    sup.close()


def test_straggler_is_noted_against_its_own_pace_and_not_stopped():
    sup = _sup(2)
    # rank 0's stage is structurally 3x dearer than rank 1's: not a straggler; then rank 1 slows 4x
    for step in range(1, 8):
        _beat(sup, 0, count=step, waits_for=[], step=step, compute=0.3, action="step done")
        _beat(sup, 1, count=step, waits_for=[], step=step, compute=0.1 if step < 6 else 0.4, action="step done")
        assert sup.check() is None
    stragglers = [n for n in sup.notes if "straggler" in n]
    assert len(stragglers) == 1 and "rank 1" in stragglers[0] and "4.0x its usual 0.100 s, since step 6" in stragglers[0]
    sup.close()


def test_heartbeat_thread_reaches_the_supervisor_and_reports_a_failure():
    sup = Supervisor(1, FAST)
    beat = Heartbeat(sup.address, rank=0, status=lambda: {"step": 2, "action": "B", "count": 4, "waits_for": []},
                     role={"role": "stage", "stages": [0]}, interval_s=0.05)
    t_end = time.monotonic() + 5
    while time.monotonic() < t_end and not sup._ranks[0].last:
        sup.receive(0.05)
    assert sup._ranks[0].hello["pid"] == os.getpid() and sup._ranks[0].last["count"] == 4
    beat.report_failure({"error": "ValueError: boom", "traceback": "ValueError: boom\n", "pending": []})
    sup.receive(1.0)
    v = sup.check()
    assert v["verdict"] == "failed" and v["rank"] == 0 and v["error"] == "ValueError: boom"
    sup.close()


def test_report_line_names_the_file_or_why_there_is_none(tmp_path):
    # the launcher prints this line: a path that cannot be written must say so, not vanish
    sup = _sup(1)
    verdict = {"verdict": "silent", "rank": 0}
    assert sup.write_report(verdict) == "no report file: no rank named a log folder in its hello"
    sup._ranks[0].hello["log_dir"] = str(tmp_path / "missing")
    assert sup.write_report(verdict).startswith(f"no report file: cannot write {tmp_path / 'missing'}/supervisor.json")
    sup._ranks[0].hello["log_dir"] = str(tmp_path)
    assert sup.write_report(verdict) == f"full report: {tmp_path / 'supervisor.json'}"
    assert json.loads((tmp_path / "supervisor.json").read_text()) == verdict
    sup.close()


def test_cluster_supervisor_listens_on_every_interface_and_skips_stray_frames():
    # on a cluster the ranks get the head's name, the socket listens on every interface, and the open
    # port may receive frames that are no heartbeat: they must not end the supervision
    probe = Supervisor(1, FAST)
    port = int(probe.address.rsplit(":", 1)[1])
    probe.close()
    sup = Supervisor(1, FAST, bind="*", port=port, advertise="head0")
    assert sup.address == f"tcp://head0:{port}" and sup.env()["HETEROPIPE_SUPERVISOR"] == sup.address
    with pytest.raises(zmq.ZMQError):
        Supervisor(1, FAST, bind="*", port=port)  # taken: launch.supervisor says "pass another --port"
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.connect(f"tcp://127.0.0.1:{port}")
    for frame in (b"\xc1 not msgpack", msgpack.packb([1, 2]), msgpack.packb({"rank": "x"})):
        push.send(frame)
    push.send(msgpack.packb({"type": "hello", "rank": 0, "pid": 1, "host": "elsewhere", "role": {}, "log_dir": None}))
    t_end = time.monotonic() + 5
    while time.monotonic() < t_end and sup._ranks[0].hello is None:
        sup.receive(0.05)
    assert sup._ranks[0].hello is not None and sup._ranks[0].hello["host"] == "elsewhere"
    push.close(linger=0)
    ctx.term()
    sup.close()


def test_verdict_ends_a_launcher_that_ignores_sigterm_after_the_grace():
    # a cluster launcher gets SIGTERM first (to take its remote ranks down); one that ignores it, or
    # whose rank is frozen, must still be gone after kill_grace_s, never leaving the supervisor waiting
    sup = Supervisor(1, FAST)  # no rank ever reports: "silent" after the 0.6 s start-up grace
    t0 = time.monotonic()
    res = supervise(["sh", "-c", "trap '' TERM; echo up; sleep 30"], sup, capture=True, kill_grace_s=0.5)
    t_end, took = time.time(), time.monotonic() - t0
    sup.close()
    assert res.returncode == EXIT_CODE and "never reported" in res.stdout and "up" in res.stdout
    t_verdict = float(re.search(r"verdict at unix time ([0-9.]+)", res.stdout).group(1))
    assert t_end - t_verdict >= 0.5 and took < 5, (t_end - t_verdict, took)  # the grace, then SIGKILL
