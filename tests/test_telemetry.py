"""Progress telemetry (runtime.telemetry) and the launcher's collector (launch.collector): the frame
format both ways, that a rank's send never waits (no collector, a collector that stops reading),
the progress lines for complete, partial and late steps, and the collector process end to end."""

from __future__ import annotations

import subprocess
import time

import msgpack
import pytest
import zmq

from launch import collector
from launch.collector import ProgressBoard
from runtime.telemetry import Telemetry, TelemetryError, decode, encode


def frame(rank, step, *, size=2, steps=10, seconds=0.5, compute_s=0.3, **extra):
    return {"v": 1, "rank": rank, "size": size, "step": step, "steps": steps, "seconds": seconds,
            "compute_s": compute_s, **extra}


def test_frames_round_trip_and_bad_frames_are_named():
    f = {k: v for k, v in frame(1, 3, loss=2.5).items() if k != "v"}
    assert decode(encode(f)) == {"v": 1, **f}
    with pytest.raises(TelemetryError, match="frame version 2, expected 1"):
        decode(msgpack.packb({**frame(0, 0), "v": 2}))
    with pytest.raises(TelemetryError, match="frame lacks compute_s"):
        decode(msgpack.packb({k: v for k, v in frame(0, 0).items() if k != "compute_s"}))
    with pytest.raises(TelemetryError, match="not a map"):
        decode(msgpack.packb([1, 2]))
    with pytest.raises(TelemetryError, match="not a msgpack frame"):
        decode(b"\xc1")  # a byte msgpack never uses


def test_send_drops_instead_of_waiting(tmp_path):
    # nobody listening: every frame is dropped at once
    tele = Telemetry(f"ipc://{tmp_path}/none.sock")
    assert [tele.send(**frame(0, k)) for k in range(5)] == [False] * 5 and tele.dropped == 5
    tele.close()
    # a collector that connects and then stops reading: queues fill up, later frames are dropped
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.setsockopt(zmq.RCVHWM, 4)
    pull.bind(f"ipc://{tmp_path}/slow.sock")
    tele = Telemetry(f"ipc://{tmp_path}/slow.sock", hwm=4)
    deadline = time.monotonic() + 10
    while not tele.send(**frame(0, 0)) and time.monotonic() < deadline:  # wait until connected
        time.sleep(0.01)
    for k in range(50_000):
        tele.send(**frame(0, k))
    assert tele.sent >= 1 and tele.dropped > 0
    assert decode(pull.recv()) == frame(0, 0)  # what got through is intact
    tele.close()
    pull.close(linger=0)
    ctx.term()


def test_progress_board_lines():
    b = ProgressBoard()
    assert b.add(frame(1, 0, compute_s=0.40)) == []  # waits for rank 0
    (line,) = b.add(frame(0, 0, seconds=0.5, compute_s=0.30, loss=2.5, grad_norm=0.75, tokens=1000))
    assert line == ("step    1/10  loss   2.5000  grad-norm   0.750      2000 tokens/s  ETA 0:04  "
                    "slowest rank 1 (0.40 s compute)")  # 9 steps x 0.5 s left
    # step 1: rank 1's frame is lost; rank 0's frame for step 2 closes step 1 with what came
    assert b.add(frame(0, 1, seconds=1.5, loss=2.0)) == []
    lines = b.add(frame(0, 2, seconds=1.0, loss=1.5))
    assert lines == ["step    2/10  loss   2.0000  ETA 0:08  slowest rank 0 (0.30 s compute; 1/2 ranks reported)"]
    assert b.add(frame(1, 1)) == []  # late frame of a step already shown
    (line,) = b.add(frame(1, 2))
    assert line.startswith("step    3/10  loss   1.5000  ETA 0:07")  # mean of 0.5, 1.5, 1.0 s x 7 steps
    assert b.add(frame(0, 3, seconds=1.0)) == [] and b.flush() == [
        "step    4/10  ETA 0:06  slowest rank 0 (0.30 s compute; 1/2 ranks reported)"]


def test_collector_process_prints_the_steps(tmp_path):
    proc, env = collector.start(stdout=subprocess.PIPE)
    try:
        tele = Telemetry(env[collector.ENV])
        deadline = time.monotonic() + 20  # until the collector has bound and the connection is up
        while not tele.send(rank=0, size=1, step=0, steps=2, seconds=0.25, compute_s=0.2, loss=3.0) \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        tele.send(rank=0, size=1, step=1, steps=2, seconds=0.25, compute_s=0.1, loss=2.0)
        time.sleep(0.5)
        tele.close()
    finally:
        collector.stop(proc)
    out = proc.stdout.read().decode()
    assert "step    1/2  loss   3.0000  ETA 0:00  slowest rank 0 (0.20 s compute)" in out
    assert "step    2/2  loss   2.0000" in out
    assert proc.returncode == 0
