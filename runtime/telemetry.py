"""Progress telemetry from the ranks to the launcher's collector: ZeroMQ PUSH -> PULL, one msgpack
map per frame (never pickle), both halves of the protocol here.

Telemetry must never block or slow a rank: the sender's socket queues only to a live connection
(``IMMEDIATE``) and at most ``hwm`` frames; ``send`` never waits (``NOBLOCK``) and drops the frame
when the queue is full or no collector is there (a dead or slow collector costs the rank one
failed non-blocking call). The per-rank JSON logs stay the record of truth; telemetry is only the
live view. The collector's side (:func:`decode`) rejects frames of another version or shape.

A frame: ``{"v": VERSION, "rank", "size", "step", "steps", "seconds", "compute_s"}`` plus, from
rank 0, ``"loss"``, ``"grad_norm"`` and ``"tokens"`` (tokens per step).
"""

from __future__ import annotations

import msgpack
import zmq

__all__ = ["VERSION", "REQUIRED", "Telemetry", "encode", "decode", "TelemetryError"]

VERSION = 1
REQUIRED = ("rank", "size", "step", "steps", "seconds", "compute_s")
"""Fields every frame carries (besides ``v``)."""


class TelemetryError(ValueError):
    """A frame that is not a telemetry frame of this version."""


def encode(fields: dict) -> bytes:
    """One frame (msgpack map with the version)."""
    return msgpack.packb({"v": VERSION, **fields})


def decode(frame: bytes) -> dict:
    """The fields of ``frame``; raises :class:`TelemetryError` naming what is wrong."""
    try:
        msg = msgpack.unpackb(frame, raw=False, strict_map_key=True)
    except (ValueError, msgpack.UnpackException) as exc:
        raise TelemetryError(f"not a msgpack frame: {exc}") from None
    if not isinstance(msg, dict):
        raise TelemetryError(f"frame is a {type(msg).__name__}, not a map")
    if msg.get("v") != VERSION:
        raise TelemetryError(f"frame version {msg.get('v')!r}, expected {VERSION}")
    missing = [k for k in REQUIRED if k not in msg]
    if missing:
        raise TelemetryError(f"frame lacks {', '.join(missing)}")
    return msg


class Telemetry:
    """A rank's sender; ``send`` never blocks and drops frames nobody takes."""

    def __init__(self, address: str, *, hwm: int = 8):
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.PUSH)
        self._sock.setsockopt(zmq.SNDHWM, hwm)
        self._sock.setsockopt(zmq.LINGER, 0)  # closing never waits for a collector
        self._sock.setsockopt(zmq.IMMEDIATE, 1)  # no queueing for a collector that is not connected
        self._sock.connect(address)
        self.sent = 0
        self.dropped = 0

    def send(self, **fields) -> bool:
        """Queue one frame if there is room; False (and counted in ``dropped``) if not."""
        try:
            self._sock.send(encode(fields), zmq.NOBLOCK)
        except zmq.Again:
            self.dropped += 1
            return False
        self.sent += 1
        return True

    def close(self) -> None:
        self._sock.close(linger=0)
        self._ctx.term()
