"""Non-blocking, ordered, bounded tensor queues between ranks over MPI point-to-point.

One :class:`Transport` per actor and communicator. Every (peer, channel) pair is an ordered
stream: messages on it are delivered in send order (MPI's non-overtaking rule on a fixed tag, plus
a sequence number that is checked). Nothing blocks when posted:

* :meth:`Transport.isend` posts the header message (and the payload message for large tensors)
  and returns a handle. The header goes with a *synchronous-mode* send (``Issend``), which
  completes only once the receiver has matched it; at most ``max_inflight`` such sends may be
  open per stream, so a slow receiver throttles its sender (backpressure) instead of letting MPI
  buffer an unbounded backlog of eager messages.
* :meth:`Transport.irecv` posts a receive ahead of time. When the caller gives the shape and
  dtype (or a preallocated ``out`` tensor), the payload receive is posted at once, straight into
  that memory; otherwise it is posted when the header arrives.
* :meth:`Transport.progress` completes whatever is ready (``Testsome``) and returns at once;
  call it between pieces of computation so rendezvous transfers advance while computing.
  :meth:`Transport.wait` drives progress until a handle completes or its deadline passes, then
  raises :class:`CommTimeout` carrying the report of every pending operation.

Payload receives on a stream must be posted in stream order (a payload message matches the
oldest posted receive on its tag), so a receive whose shape is known can only post its payload
receive once every earlier receive on the stream has posted its own.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from mpi4py import MPI

from runtime import spans
from runtime.envelope import (
    HEADER_MAX,
    INLINE_MAX,
    KINDS,
    EnvelopeError,
    Header,
    dtype_code,
    itemsize,
    pack_header,
    unpack_header,
)

__all__ = ["TransportConfig", "Transport", "SendHandle", "RecvHandle", "CommTimeout"]

_HDR_BUF = 2 + HEADER_MAX + INLINE_MAX
_SPIN_S = 0.02
"""Seconds a waiting rank polls (yielding the core between polls) before it starts sleeping."""


def _wire(t: torch.Tensor) -> MPI.buffer:
    """The memory of contiguous ``t`` as an mpi4py buffer, for MPI and for inline copies.

    It is a bare address and length: whoever posts it keeps ``t`` alive until MPI is done. Taken
    from the address, not through numpy, because ``Tensor.numpy()`` alone costs ~1 us on the
    per-message path, five times this; and it is dtype-blind, so bfloat16 and float8 need no view.
    """
    return MPI.buffer.fromaddress(t.data_ptr(), t.nbytes)


@dataclass(kw_only=True, slots=True)
class TransportConfig:
    """Limits and behaviour of one actor's queues."""

    max_inflight: int = 16
    """Open (unmatched) sends allowed per (peer, channel) before isend waits for the receiver."""
    timeout_s: float = 120.0
    """Deadline for any single wait (a receive or a backpressured send); then CommTimeout."""
    max_channels: int = 1024
    """Channels per peer; tags 2c and 2c+1 must stay below the MPI tag bound (>= 32767)."""

    def __post_init__(self) -> None:
        if self.max_inflight < 1:
            raise ValueError(f"TransportConfig.max_inflight={self.max_inflight}: must be >= 1")
        if not self.timeout_s > 0:
            raise ValueError(f"TransportConfig.timeout_s={self.timeout_s}: must be > 0 seconds")
        if not 1 <= self.max_channels <= 16383:
            raise ValueError(f"TransportConfig.max_channels={self.max_channels}: must be in 1..16383 (MPI guarantees tags up to 32767)")


class CommTimeout(TimeoutError):
    """A wait passed its deadline. ``pending`` lists every operation still open on the transport."""

    def __init__(self, message: str, pending: list[dict]):
        super().__init__(message)
        self.pending = pending


class SendHandle:
    """An in-flight send. ``done`` once both its MPI messages completed (the receiver matched it)."""

    __slots__ = ("header", "peer", "open", "keep", "payload_req", "t_post", "t_done")

    def __init__(self, header: Header, keep: tuple):
        self.header = header
        self.peer = header.dst
        self.open = 0
        self.keep = keep  # buffers MPI reads from; must outlive the requests
        self.payload_req: MPI.Request | None = None
        self.t_post = time.monotonic_ns()
        self.t_done = 0

    @property
    def done(self) -> bool:
        return self.open == 0


class RecvHandle:
    """A posted receive. ``done`` once the tensor is in ``tensor``; ``header`` is set on arrival."""

    __slots__ = ("peer", "channel", "shape", "dtype", "expect", "tensor", "header", "hdr_buf",
                 "open", "payload_posted", "payload_req", "t_post", "t_done", "on_done")

    def __init__(self, peer: int, channel: int, shape, dtype, out, expect):
        self.peer = peer
        self.channel = channel
        self.shape = shape
        self.dtype = dtype
        self.expect = expect
        self.tensor: torch.Tensor | None = out
        self.header: Header | None = None
        self.hdr_buf: np.ndarray | None = None
        self.open = 0
        self.payload_posted = False
        self.payload_req: MPI.Request | None = None
        self.t_post = time.monotonic_ns()
        self.t_done = 0
        self.on_done: Callable[[RecvHandle], None] | None = None

    @property
    def done(self) -> bool:
        return self.header is not None and self.open == 0

    @property
    def known(self) -> bool:
        return self.shape is not None

    @property
    def known_inline(self) -> bool:
        return self.known and math.prod(self.shape) * itemsize(self.dtype) <= INLINE_MAX


class _Stream:
    """State of one (peer, channel): send sequence, expected receive sequence, FIFO of receives."""

    __slots__ = ("send_seq", "recv_seq", "recvs", "sends_open")

    def __init__(self) -> None:
        self.send_seq = 0
        self.recv_seq = 0
        self.recvs: deque[RecvHandle] = deque()  # posted, header not yet arrived or payload open
        self.sends_open = 0


class Transport:
    """Tensor send/recv queues of one rank on one communicator."""

    def __init__(self, comm: MPI.Comm, config: TransportConfig | None = None,
                 on_span: Callable[..., None] | None = None):
        self.comm = comm
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()
        self.config = config or TransportConfig()
        tag_ub = comm.Get_attr(MPI.TAG_UB) or 32767
        if 2 * self.config.max_channels + 1 > tag_ub:
            raise ValueError(f"TransportConfig.max_channels={self.config.max_channels} needs tags up to "
                             f"{2 * self.config.max_channels + 1}, above this MPI's TAG_UB={tag_ub}")
        self._on_span = on_span
        self._streams: dict[tuple[int, int], _Stream] = {}
        # Open MPI requests and, at the same index, what completes when they do.
        self._reqs: list[MPI.Request] = []
        self._owners: list[tuple[object, str]] = []
        self._status = [MPI.Status() for _ in range(64)]
        self._buf_pool: list[np.ndarray] = []
        self._sends: set[SendHandle] = set()
        # Sends whose header the receiver has matched: it posts the payload receive in the same
        # progress step, so waiting on these payloads in MPI is safe (they cannot stall for long).
        self._matched_payloads: list[SendHandle] = []

    # ------------------------------------------------------------------ posting
    def _stream(self, peer: int, channel: int) -> _Stream:
        key = (peer, channel)
        s = self._streams.get(key)
        if s is None:
            if not 0 <= peer < self.size:
                raise ValueError(f"peer={peer}: not a rank of this communicator (size {self.size})")
            if not 0 <= channel < self.config.max_channels:
                raise ValueError(f"channel={channel}: must be in 0..{self.config.max_channels - 1}")
            s = self._streams[key] = _Stream()
        return s

    def _add(self, req: MPI.Request, owner: object, what: str) -> None:
        self._reqs.append(req)
        self._owners.append((owner, what))

    def isend(self, peer: int, tensor: torch.Tensor, *, channel: int = 0, kind: str = "data",
              mb: int = -1, chunk: int = 0, dir: int = 0) -> SendHandle:
        """Post ``tensor`` to ``peer`` on ``channel``; returns at once (unless backpressured).

        The tensor must not be modified until the handle is done (its memory is sent in place).
        """
        if kind not in KINDS:
            raise ValueError(f"kind={kind!r}: must be one of {KINDS}")
        if not tensor.is_cpu:
            raise ValueError(f"isend: tensor on {tensor.device}; this transport moves host memory, copy it to CPU first")
        s = self._streams.get((peer, channel)) or self._stream(peer, channel)
        if s.sends_open >= self.config.max_inflight:
            self._wait_until(lambda: s.sends_open < self.config.max_inflight,
                             lambda: f"send to rank {peer} channel {channel} stayed backpressured "
                                     f"({s.sends_open} unmatched sends)")
        h = Header(kind=kind, src=self.rank, dst=peer, channel=channel, dtype=tensor.dtype,
                   shape=tuple(tensor.shape), seq=s.send_seq, mb=mb, chunk=chunk, dir=dir)
        s.send_seq += 1
        if not tensor.is_contiguous():
            tensor = tensor.contiguous()
        payload = _wire(tensor)
        msg = pack_header(h, payload if h.inline else None)
        handle = SendHandle(h, (msg, tensor))
        self._add(self.comm.Issend([msg, MPI.BYTE], peer, 2 * channel), handle, "send_hdr")
        handle.open = 1
        if not h.inline:
            handle.payload_req = self.comm.Isend([payload, MPI.BYTE], peer, 2 * channel + 1)
            self._add(handle.payload_req, handle, "send")
            handle.open = 2
        s.sends_open += 1
        self._sends.add(handle)
        return handle

    def irecv(self, peer: int, *, channel: int = 0, shape: tuple[int, ...] | None = None,
              dtype: torch.dtype | None = None, out: torch.Tensor | None = None,
              expect: dict | None = None) -> RecvHandle:
        """Post a receive for the next message from ``peer`` on ``channel``.

        Give ``shape`` and ``dtype`` (or a contiguous ``out`` tensor to fill) when known: the payload
        is then received straight into that memory and the header must agree. ``expect`` maps header
        fields (``kind``, ``mb``, ``chunk``, ``dir``) to required values; a mismatch raises
        EnvelopeError naming the field.
        """
        if out is not None:
            if not out.is_cpu or not out.is_contiguous():
                raise ValueError("irecv: out must be a contiguous CPU tensor")
            shape, dtype = tuple(out.shape), out.dtype
        if (shape is None) != (dtype is None):
            raise ValueError("irecv: give both shape and dtype, or neither")
        if dtype is not None:
            dtype_code(dtype)
        s = self._streams.get((peer, channel)) or self._stream(peer, channel)
        h = RecvHandle(peer, channel, tuple(shape) if shape is not None else None, dtype, out, expect)
        h.hdr_buf = self._buf_pool.pop() if self._buf_pool else np.empty(_HDR_BUF, np.uint8)
        self._add(self.comm.Irecv([h.hdr_buf, MPI.BYTE], peer, 2 * channel), h, "hdr")
        h.open = 1
        s.recvs.append(h)
        self._post_payloads(s)
        return h

    def _post_payloads(self, s: _Stream) -> None:
        """Post payload receives in stream order for every receive whose size is now known."""
        for h in s.recvs:
            if h.payload_posted:
                continue
            if h.header is None and not h.known:
                break  # its size is unknown until its header lands; later ones must wait behind it
            size_known_inline = h.header.inline if h.header is not None else h.known_inline
            h.payload_posted = True
            if size_known_inline:
                continue
            if h.tensor is None:
                h.tensor = torch.empty(h.shape if h.header is None else h.header.shape,
                                       dtype=h.dtype if h.header is None else h.header.dtype)
            h.payload_req = self.comm.Irecv([_wire(h.tensor), MPI.BYTE], h.peer, 2 * h.channel + 1)
            self._add(h.payload_req, h, "payload")
            h.open += 1

    # ------------------------------------------------------------------ completion
    def progress(self) -> int:
        """Complete every operation that is ready now; returns how many MPI requests finished."""
        if not self._reqs:
            return 0
        n = len(self._reqs)
        if n > len(self._status):
            self._status.extend(MPI.Status() for _ in range(n - len(self._status)))
        idx = MPI.Request.Testsome(self._reqs, self._status)
        if not idx:
            return 0
        # MPI fills statuses compactly: the k-th status belongs to the k-th completed index.
        owners, statuses = self._owners, self._status
        finished = [(owners[i], statuses[k]) for k, i in enumerate(idx)]
        if len(idx) == n:  # the common case on a latency-bound path: everything open completed
            self._reqs, self._owners = [], []
        else:
            done = set(idx)
            self._reqs = [r for i, r in enumerate(self._reqs) if i not in done]
            self._owners = [o for i, o in enumerate(owners) if i not in done]
        for (owner, what), status in finished:
            if what == "send":
                self._send_part_done(owner)
            elif what == "send_hdr":
                self._send_part_done(owner)
                if not owner.done:
                    self._matched_payloads.append(owner)
            elif what == "hdr":
                self._header_arrived(owner, status.Get_count(MPI.BYTE))
            else:
                owner.open -= 1
                if owner.done:
                    self._recv_done(owner)
        return len(idx)

    def _send_part_done(self, h: SendHandle) -> None:
        h.open -= 1
        if h.open == 0:
            h.t_done = time.monotonic_ns()
            h.keep = ()
            self._sends.discard(h)
            self._streams[(h.peer, h.header.channel)].sends_open -= 1
            if self._on_span is not None:
                self._span(spans.SEND, h.t_post, h.t_done, h.header)

    def _header_arrived(self, h: RecvHandle, count: int) -> None:
        h.open -= 1
        s = self._streams[(h.peer, h.channel)]
        header, inline = unpack_header(h.hdr_buf, count, src=h.peer, tag=2 * h.channel)
        if header.dst != self.rank or header.channel != h.channel or header.seq != s.recv_seq:
            self._reject(h, header, "dst", self.rank)
            self._reject(h, header, "channel", h.channel)
            self._reject(h, header, "seq", s.recv_seq, " (lost or crossed message)")
        s.recv_seq += 1
        if h.shape is not None and (header.shape != h.shape or header.dtype != h.dtype):
            self._reject(h, header, "shape", h.shape, f" (dtype {header.dtype}; the receive was posted for {h.dtype})")
        if h.expect:
            for field, want in h.expect.items():
                self._reject(h, header, field, want)
        h.header = header
        if header.inline:
            if h.tensor is not None:
                _wire(h.tensor)[:] = inline
            elif header.nbytes:
                h.tensor = torch.frombuffer(bytearray(inline), dtype=header.dtype).reshape(header.shape)
            else:
                h.tensor = torch.empty(header.shape, dtype=header.dtype)
        self._buf_pool.append(h.hdr_buf)
        h.hdr_buf = None
        self._post_payloads(s)
        if h.done:
            self._recv_done(h)

    @staticmethod
    def _reject(h: RecvHandle, header: Header, field: str, want, note: str = "") -> None:
        """Raise EnvelopeError if ``header.field`` is not ``want`` (messages built only on error)."""
        got = getattr(header, field)
        if got != want:
            raise EnvelopeError(f"message from rank {h.peer} channel {h.channel} seq {header.seq}: field "
                                f"{field!r} is {got!r}, expected {want!r}{note}")

    def _recv_done(self, h: RecvHandle) -> None:
        h.t_done = time.monotonic_ns()
        s = self._streams[(h.peer, h.channel)]
        # Receives complete in stream order: the payload tag is FIFO and headers precede payloads.
        while s.recvs and s.recvs[0].done:
            s.recvs.popleft()
        if self._on_span is not None:
            self._span(spans.RECV, h.t_post, h.t_done, h.header)
        if h.on_done is not None:
            h.on_done(h)

    def _span(self, name: str, t0: int, t1: int, header: Header) -> None:
        self._on_span(name, t0, t1, peer=header.dst if name == spans.SEND else header.src, channel=header.channel,
                      kind=header.kind, mb=header.mb, chunk=header.chunk, dir=header.dir, nbytes=header.nbytes,
                      seq=header.seq)

    # ------------------------------------------------------------------ waiting
    def _wait_until(self, cond: Callable[[], bool], what: Callable[[], str], timeout: float | None = None) -> None:
        """Drive progress until ``cond()``; past the deadline raise CommTimeout saying ``what()``
        (a callable, so that the message is only formatted when it is needed)."""
        if cond():
            return
        deadline = time.monotonic() + (self.config.timeout_s if timeout is None else timeout)
        spins = 0
        idle_since = 0.0
        while not cond():
            if self.progress() == 0:
                if self._matched_payloads:
                    self._finish_blocking(self._matched_payloads.pop().payload_req)
                    continue
                spins += 1
                # Ranks are often oversubscribed on small machines: after a short spin, yield the
                # core on every poll; only after _SPIN_S of idling sleep, since a sleep wakes late
                # (0.1 ms asked, ~0.5 ms seen on a VM), which would add that much latency to the
                # end of a multi-millisecond transfer.
                if spins > 200:
                    now = time.monotonic()
                    if spins == 201:
                        idle_since = now
                    time.sleep(0 if now - idle_since < _SPIN_S else 1e-4)
                    if now > deadline:
                        raise CommTimeout(f"rank {self.rank}: {what()} for more than "
                                          f"{self.config.timeout_s if timeout is None else timeout:g} s", self.pending())
            else:
                spins = 0

    def wait(self, handle: RecvHandle | SendHandle, timeout: float | None = None) -> torch.Tensor | None:
        """Drive progress until ``handle`` is done; returns the received tensor (None for a send)."""
        if isinstance(handle, RecvHandle):
            # Poll until the header is in; then the payload's sender has already posted its send,
            # so a blocking MPI wait is safe and far faster than polling from Python between the
            # chunks of a large shared-memory transfer.
            self._wait_until(lambda: handle.header is not None, lambda: f"receive from rank {handle.peer} channel "
                             f"{handle.channel} (expect {handle.expect}) got nothing", timeout)
            if not handle.done:
                self._finish_blocking(handle.payload_req)
            return handle.tensor
        self._wait_until(lambda: handle.done, lambda: f"send to rank {handle.peer} channel {handle.header.channel} "
                         f"mb {handle.header.mb} was not received", timeout)
        return None

    def _finish_blocking(self, req: MPI.Request) -> None:
        """Complete one payload request inside MPI (no Python between its chunks)."""
        try:
            i = self._reqs.index(req)
        except ValueError:
            return  # already completed by an earlier progress call
        req.Wait()
        owner, what = self._owners[i]
        del self._reqs[i], self._owners[i]
        if what == "send":
            self._send_part_done(owner)
        else:
            owner.open -= 1
            if owner.done:
                self._recv_done(owner)

    def recv(self, peer: int, **kwargs) -> torch.Tensor:
        """Blocking convenience: post a receive and wait for it."""
        return self.wait(self.irecv(peer, **kwargs))

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every send posted so far has been received."""
        self._wait_until(lambda: not self._sends, lambda: f"{len(self._sends)} sends were not received", timeout)

    def pending(self) -> list[dict]:
        """Every open operation: op, peer, channel, kind, microbatch, seq, state, age in seconds."""
        now = time.monotonic_ns()
        out = []
        for h in self._sends:
            hd = h.header
            out.append({"op": "send", "peer": h.peer, "channel": hd.channel, "kind": hd.kind, "mb": hd.mb,
                        "dir": hd.dir, "chunk": hd.chunk, "seq": hd.seq, "nbytes": hd.nbytes,
                        "state": "unmatched", "age_s": round((now - h.t_post) / 1e9, 3)})
        for (peer, channel), s in self._streams.items():
            for h in s.recvs:
                if h.done:
                    continue
                e = h.expect or {}
                out.append({"op": "recv", "peer": peer, "channel": channel, "kind": e.get("kind"),
                            "mb": e.get("mb", h.header.mb if h.header else None), "dir": e.get("dir"),
                            "chunk": e.get("chunk"), "seq": h.header.seq if h.header else None,
                            "state": "payload" if h.header else "header",
                            "age_s": round((now - h.t_post) / 1e9, 3)})
        return out

    def close(self, timeout: float | None = None) -> None:
        """Flush sends, then cancel receives nobody will answer. Raises if receives were still open."""
        self.flush(timeout)
        open_recvs = [p for p in self.pending() if p["op"] == "recv"]
        for req in self._reqs:
            req.Cancel()
        if self._reqs:
            MPI.Request.Waitall(self._reqs)
        self._reqs.clear()
        self._owners.clear()
        self._matched_payloads.clear()
        self._streams.clear()
        if open_recvs:
            raise RuntimeError(f"rank {self.rank}: transport closed with {len(open_recvs)} receives never "
                               f"answered: {open_recvs[:8]}")
