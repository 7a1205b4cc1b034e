"""Runtime core under real mpiexec: transport checks and failure paths (hard timeouts)."""

from __future__ import annotations

import json

import pytest

from tests.mpirun import mpirun

pytestmark = pytest.mark.mpi


@pytest.mark.parametrize("n", [2, 4, 8])
def test_transport_checks(n):
    checks = [] if n == 4 else ["ping_pong", "ring", "mixed_dtypes"]  # the full set once, the cheap ones at 2 and 8
    _, out, _ = mpirun(n, "tests.mpi.transport_checks", *checks, timeout=150)
    for r in range(n):
        assert f"rank {r}: all transport checks ok" in out


def test_actor_that_raises_aborts_job_fast(tmp_path):
    rc, out, secs = mpirun(4, "tests.mpi.failure_checks", "raise", str(tmp_path), timeout=60, expect_ok=False)
    assert rc != 0
    assert "[rank 2 @" in out and "ValueError: boom from rank 2" in out
    assert "'op': 'send', 'peer': 0, 'channel': 7" in out  # the pending send was reported
    assert secs < 30
    lines = [json.loads(x) for x in (tmp_path / "fail-raise" / "rank-2.jsonl").read_text().splitlines()]
    fail = [x for x in lines if x["event"] == "actor_failed"]
    assert fail and fail[0]["rank"] == 2 and fail[0]["role"] == "faulty" and "boom" in fail[0]["error"]


def test_receive_past_deadline_reports_pending_and_aborts(tmp_path):
    rc, out, secs = mpirun(4, "tests.mpi.failure_checks", "timeout", str(tmp_path), timeout=60, expect_ok=False)
    assert rc != 0
    assert "CommTimeout: rank 1: receive from rank 0 channel 3" in out
    assert "'op': 'recv', 'peer': 0, 'channel': 3, 'kind': 'grad', 'mb': 42" in out
    assert secs < 30
