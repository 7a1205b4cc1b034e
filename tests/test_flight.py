"""The flight recorder keeps the newest entries in order and reports their age."""

from __future__ import annotations

import time

from runtime.flight import FlightRecorder


def test_ring_keeps_the_newest_in_order_with_ages():
    fr = FlightRecorder(capacity=3)
    t0 = time.monotonic_ns()
    for i in range(5):
        fr.record("send", t0 - (5 - i) * 10**9, seq=i)  # entry i ended 5-i seconds ago
    assert len(fr) == 3
    tail = fr.tail()
    assert [e["seq"] for e in tail] == [2, 3, 4] and all(e["what"] == "send" for e in tail)
    assert [round(e["age_s"]) for e in tail] == [3, 2, 1]
    assert [e["seq"] for e in fr.tail(2)] == [3, 4]


def test_record_fields_keeps_the_handed_over_dict():
    fr = FlightRecorder()
    fields = {"peer": 1, "seq": 7, "dur_us": 3}
    fr.record_fields("recv", time.monotonic_ns(), fields)
    (entry,) = fr.tail()
    assert entry["what"] == "recv" and {k: entry[k] for k in fields} == fields and entry["age_s"] >= 0
