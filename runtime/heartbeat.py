"""Rank side of supervision: a daemon thread that tells the supervisor where this rank is.

Every ``interval_s`` the thread sends one msgpack message over a ZeroMQ PUSH socket to the
supervisor's PULL socket (``launch.supervisor``): the rank's step, current action, a counter of
actions done (progress), the receive it is blocked on, its pending operations and the recent tail
of its flight recorder. PUSH/PULL queues instead of dropping (unlike the telemetry's PUB/SUB), so
the control stream is lossless while the supervisor is alive; a send that would block is skipped
(``NOBLOCK``): a rank never waits for its supervisor. Message types, all maps with ``type`` and
``rank``:

* ``hello`` (first): ``pid``, ``host``, ``role`` (the actor's role description), ``log_dir``;
* ``beat``: the actor's :meth:`~runtime.actor.Actor.status`, every ``interval_s`` and also at once
  when the rank starts a step (:meth:`Heartbeat.poke`), so a rank that dies between two periodic
  beats is still reported with the step it reached;
* ``failed`` (last, from the failure path before ``MPI_Abort``): the failure report and status;
* ``bye`` (last, after a clean stop).

The thread owns the socket (ZeroMQ sockets are not thread-safe): the main thread hands the final
message over and waits a bounded time for it to leave.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable

import msgpack
import zmq

__all__ = ["Heartbeat"]

_FINAL_WAIT_S = 3.0
"""How long the main thread waits for a final message to leave (the supervisor may be gone)."""


def _pack(msg: dict) -> bytes:
    return msgpack.packb(msg, default=str)


class Heartbeat:
    """Sends ``status()`` to ``address`` every ``interval_s`` seconds from a daemon thread."""

    def __init__(self, address: str, *, rank: int, status: Callable[[], dict], role: dict,
                 log_dir: str | None = None, interval_s: float = 1.0):
        if not interval_s > 0:
            raise ValueError(f"interval_s={interval_s}: must be > 0")
        self.address, self.rank, self.interval_s = address, rank, interval_s
        self._status = status
        self._hello = {"type": "hello", "rank": rank, "pid": os.getpid(), "host": socket.gethostname(),
                       "role": role, "log_dir": log_dir}
        self._wake = threading.Event()
        self._sent = threading.Event()
        self._final: dict | None = None
        self._final_sent = False
        self._thread = threading.Thread(target=self._loop, name=f"heartbeat-{rank}", daemon=True)
        self._thread.start()

    def _beat(self) -> dict:
        try:
            return {"type": "beat", "rank": self.rank, **self._status()}
        except Exception as exc:  # noqa: BLE001 - a racing read must not stop the heartbeats
            return {"type": "beat", "rank": self.rank, "status_error": f"{type(exc).__name__}: {exc}"}

    def _loop(self) -> None:
        ctx = zmq.Context()
        sock = ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, int(_FINAL_WAIT_S * 1000))
        sock.setsockopt(zmq.SNDHWM, 10_000)
        sock.connect(self.address)
        try:
            sock.send(_pack(self._hello), zmq.NOBLOCK)
            while True:
                self._wake.wait(self.interval_s)
                self._wake.clear()
                if self._final is not None:
                    break
                try:
                    sock.send(_pack(self._beat()), zmq.NOBLOCK)
                except zmq.Again:
                    pass  # supervisor gone or far behind: never block the rank
            sock.setsockopt(zmq.SNDTIMEO, int(_FINAL_WAIT_S * 1000))
            try:
                sock.send(_pack(self._final))
                self._final_sent = True
            except zmq.Again:
                pass  # not taken within the wait: _finish returns False and the caller says so
        finally:
            sock.close()
            ctx.term()
            self._sent.set()

    def poke(self) -> None:
        """Send a beat now (the rank started a step), not only at the next period."""
        self._wake.set()

    def _finish(self, msg: dict) -> bool:
        if self._final is None:
            self._final = msg
            self._wake.set()
        return self._sent.wait(_FINAL_WAIT_S + 1.0) and self._final_sent

    def report_failure(self, report: dict) -> bool:
        """Send the failure report (with the current status) as the last message; waits briefly.
        False if it did not leave (the supervisor is gone or not reading)."""
        return self._finish({**self._beat(), **report, "type": "failed", "rank": self.rank})

    def stop(self) -> bool:
        """Clean end: send ``bye`` as the last message; waits briefly. False if it did not leave."""
        return self._finish({"type": "bye", "rank": self.rank})
