"""The live progress line: a collector process that the launcher starts for a job.

``launch.local`` starts ``python -m launch.collector ENDPOINT`` next to the job and hands ENDPOINT
to the ranks in ``$HETEROPIPE_TELEMETRY`` (``launch.cluster``: on the head node, bound to
``tcp://*:PORT``, the ranks told ``tcp://HEAD:PORT``); every rank of ``launch.train`` sends one frame per step
(:mod:`runtime.telemetry`: ZeroMQ, msgpack, dropped rather than ever blocking a rank), and the
collector prints one line per step into the launching terminal::

    step   12/60  loss   2.3104  grad-norm   0.912     9650 tokens/s  ETA 0:31  slowest rank 2 (0.41 s compute)

ETA = remaining steps x the mean of the last 5 step times. The slowest rank is the one with the
most compute time in that step (the pipeline's bottleneck stage). A step's line is printed once
every rank has reported it, or once rank 0 has reported a later one (frames were dropped: the line
says how many ranks reported). Killing the collector does not disturb the job; the logs stay the
record of truth.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator

import zmq

from runtime.telemetry import TelemetryError, decode

__all__ = ["ENV", "ProgressBoard", "command", "start", "stop", "running", "main"]

ENV = "HETEROPIPE_TELEMETRY"
"""Environment variable that carries the collector's ZeroMQ endpoint to the ranks."""
ETA_WINDOW = 5


def _clock(seconds: float) -> str:
    s = max(0, round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class ProgressBoard:
    """Frames in, progress lines out (pure; see the module docstring for when a line is due)."""

    def __init__(self) -> None:
        self._pending: dict[int, dict[int, dict]] = {}
        self._done = -1
        self._seconds: list[float] = []

    def add(self, msg: dict) -> list[str]:
        """Take one decoded frame; the lines now due, oldest step first."""
        step = msg["step"]
        if step <= self._done:
            return []
        self._pending.setdefault(step, {})[msg["rank"]] = msg
        lines = []
        for s in sorted(self._pending):
            got = self._pending.get(s)
            if got is None:
                continue
            later_rank0 = any(t > s and 0 in self._pending[t] for t in self._pending)
            if len(got) >= msg["size"] or (later_rank0 and 0 in got):
                lines.append(self._line(s, got))
                for t in [t for t in self._pending if t <= s]:
                    del self._pending[t]
                self._done = s
        return lines

    def flush(self) -> list[str]:
        """Lines of the steps rank 0 reported but some rank did not (at the end of the job)."""
        lines = [self._line(s, got) for s, got in sorted(self._pending.items()) if 0 in got]
        self._pending.clear()
        return lines

    def _line(self, step: int, got: dict[int, dict]) -> str:
        any_msg = next(iter(got.values()))
        size, steps = any_msg["size"], any_msg["steps"]
        r0 = got.get(0, {})
        secs = r0.get("seconds", max(m["seconds"] for m in got.values()))
        self._seconds.append(secs)
        recent = self._seconds[-ETA_WINDOW:]
        eta = (steps - step - 1) * sum(recent) / len(recent)
        parts = [f"step {step + 1:>4}/{steps}"]
        if "loss" in r0:
            parts.append(f"loss {r0['loss']:8.4f}")
        if "grad_norm" in r0:
            parts.append(f"grad-norm {r0['grad_norm']:7.3f}")
        if r0.get("tokens") and secs > 0:
            parts.append(f"{r0['tokens'] / secs:8.0f} tokens/s")
        parts.append(f"ETA {_clock(eta)}")
        slow = max(got.values(), key=lambda m: m["compute_s"])
        note = "" if len(got) >= size else f"; {len(got)}/{size} ranks reported"
        parts.append(f"slowest rank {slow['rank']} ({slow['compute_s']:.2f} s compute{note})")
        return "  ".join(parts)


def command(endpoint: str, python: str = sys.executable) -> list[str]:
    """The collector's command line, bound to ``endpoint`` (``launch.cluster`` runs it on the head node
    with ``tcp://*:PORT`` and tells the ranks ``tcp://HEAD:PORT``)."""
    return [python, "-m", "launch.collector", endpoint]


def start(stdout=None) -> tuple[subprocess.Popen, dict]:
    """Start a collector process for local ranks (a Unix socket; printing to ``stdout``, default the
    terminal); returns it and the environment entries that point the ranks at it."""
    endpoint = f"ipc://{tempfile.gettempdir()}/heteropipe-{os.getpid()}-{secrets.token_hex(4)}.sock"
    proc = subprocess.Popen(command(endpoint), stdout=stdout)
    return proc, {ENV: endpoint}


def stop(proc: subprocess.Popen) -> None:
    """Ask the collector to print what is left and exit; kill it if it does not within 2 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def running(enabled: bool = True) -> Iterator[dict]:
    """A collector for the duration of the block; yields the environment for the job ({} if off)."""
    if not enabled:
        yield {}
        return
    proc, env = start()
    try:
        yield env
    finally:
        stop(proc)


def _serve(endpoint: str) -> int:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PULL)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(endpoint)
    board = ProgressBoard()
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    bad = 0
    try:
        while not stopping:
            if not sock.poll(200):
                continue
            while True:
                try:
                    frame = sock.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                try:
                    lines = board.add(decode(frame))
                except TelemetryError as exc:
                    bad += 1
                    if bad == 1:
                        print(f"launch.collector: ignoring a bad telemetry frame: {exc}", file=sys.stderr, flush=True)
                    continue
                for line in lines:
                    print(line, flush=True)
        for line in board.flush():
            print(line, flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        sock.close(linger=0)
        ctx.term()
        if endpoint.startswith("ipc://"):
            with contextlib.suppress(OSError):
                os.unlink(endpoint[len("ipc://"):])
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.collector", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("endpoint", help="ZeroMQ endpoint to bind, e.g. ipc:///tmp/x.sock or tcp://0.0.0.0:5599 (the "
                                    f"ranks get it in ${ENV})")
    ns = p.parse_args(argv)
    try:
        return _serve(ns.endpoint)
    except zmq.ZMQError as exc:
        print(f"launch.collector: cannot bind {ns.endpoint}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
