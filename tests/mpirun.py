"""Launch a test script on K real MPI ranks with a hard timeout (never hangs the suite)."""

from __future__ import annotations

import time

import pytest

from launch.local import LaunchTimeout, run_local

__all__ = ["mpirun"]


def mpirun(n: int, module: str, *args: str, timeout: float = 120, env: dict | None = None,
           expect_ok: bool = True) -> tuple[int, str, float]:
    """Run ``python -m module args`` on ``n`` ranks; returns (returncode, merged output, seconds).

    Fails the test (with the job's output) if it runs past ``timeout`` or, with ``expect_ok``, if it
    exits non-zero.
    """
    t0 = time.monotonic()
    try:
        res = run_local(n, module, list(args), timeout=timeout, env={"OMP_NUM_THREADS": "1", **(env or {})},
                        capture=True)
    except LaunchTimeout as exc:
        pytest.fail(f"{module} on {n} ranks hung past {timeout} s and was killed; output:\n{exc.output[-6000:]}")
    secs = time.monotonic() - t0
    if expect_ok and res.returncode != 0:
        pytest.fail(f"{module} on {n} ranks exited {res.returncode}; output:\n{res.stdout[-8000:]}")
    return res.returncode, res.stdout, secs
