"""Non-blocking, ordered, bounded tensor queues between ranks over MPI point-to-point (dynamic messages).

One :class:`Transport` per actor and communicator. It carries two kinds of traffic:

* **dynamic messages** (this module: unknown shape, control, counts): every (peer, channel) pair
  is an ordered stream with a small header per message (:mod:`runtime.envelope`);
* **schedule-known channels** (:mod:`runtime.channels`, made by :meth:`Transport.send_channel` /
  :meth:`Transport.recv_channel`): shape, dtype, kind and microbatch order known to both sides,
  so no header travels — only the payload, checked by a 16-byte trailer glued to a small one
  and by its tag (position and microbatch) for a large one.

Both post their MPI requests on one :class:`~runtime.progress.Progress` engine (``self.engine``),
which other exchanges may use too; ``progress()``, ``wait()`` and the pending-operation report
cover all of them. Dynamic messages:

* :meth:`Transport.isend` posts the header message (and the payload message for large tensors)
  and returns a handle (a shared, already-done one when MPI completed the message at once).
  Headers go as plain ``Isend``, except every ``max_inflight``-th message of a stream, which goes
  synchronous (``Issend``, completes once the receiver matched it): before
  the next such marker is posted the previous one must have been matched, so a slow receiver
  throttles its sender after at most ``2 * max_inflight`` unmatched messages (backpressure)
  without a round trip on every message.
* :meth:`Transport.irecv` posts a receive ahead of time and stamps it with the sequence number the
  stream's next message must carry (MPI orders *matching* on a tag, not completion, so the stamp
  is taken at posting, not at arrival). With the shape and dtype (or a preallocated ``out``
  tensor) the payload receive is posted at once, straight into that memory; otherwise when the
  header arrives.
* :meth:`Transport.progress` completes whatever is ready and returns at once;
  :meth:`Transport.wait` blocks inside MPI until a handle completes or its deadline passes, then
  raises :class:`CommTimeout` carrying the report of every pending operation.

Payload receives on a stream must be posted in stream order (a payload message matches the
oldest posted receive on its tag), so a receive whose shape is known can only post its payload
receive once every earlier receive on the stream has posted its own.
"""

from __future__ import annotations

import math
import struct
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch
from mpi4py import MPI

from runtime import spans
from runtime.envelope import (
    HEADER,
    HEADER_SIZE,
    INLINE_MAX,
    KINDS,
    MAGIC,
    MAX_NDIM,
    VERSION,
    EnvelopeError,
    Header,
    dtype_code,
    itemsize,
    pack_header_into,
    unpack_header,
)
from runtime.progress import CommTimeout, Progress

__all__ = ["TransportConfig", "Transport", "SendHandle", "RecvHandle", "CommTimeout"]

_HDR_BUF = HEADER_SIZE + INLINE_MAX
_SEQ_KEY = struct.Struct("<Q3i")
"""seq and key, where :data:`~runtime.envelope.HEADER` has them (byte 16): all a send writes into
its stream's header template."""
_SEQ_KEY_OFFSET = struct.calcsize("<HBBBBHii")  # magic .. dst: the fields before seq
_CHANNEL_BLOCK_BITS = 10
"""A schedule-known channel's tags: 2**this at most (position bits + microbatch bits)."""
_CHANNEL_MB_BITS = 6
"""Of those, the microbatch's (a window of 64 microbatches; the rest, 16 positions, the sequence's)."""
_CHANNEL_MIN_BITS = 6
"""Fewest bits a block may have where the tag bound is low: 4 for the microbatch, 2 for the position."""
KEY_FIELDS = ("mb", "chunk", "dir")
"""What this transport's API, spans and reports call the header's ``key`` integers, in order:
microbatch (-1: none), the sender's model chunk, pipeline direction."""
_KEY_INDEX = {name: i for i, name in enumerate(KEY_FIELDS)}
_EXPECT_FIELDS = frozenset({"kind", *KEY_FIELDS})


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
    """Every this many messages a stream's header goes synchronous; the sender waits before the next
    such marker until the previous one was matched: at most 2x this many unmatched messages."""
    timeout_s: float = 120.0
    """Deadline for any single wait (a receive or a backpressured send); then CommTimeout."""
    max_channels: int = 1024
    """Channels per peer for each kind of traffic. Dynamic channel c uses tags 2c and 2c+1; a
    schedule-known channel c owns a block of up to 1024 tags above 2 * max_channels (one per
    message position and microbatch, see :mod:`runtime.channels`), smaller where this MPI's tag
    bound is lower (the standard guarantees only 32767)."""

    def __post_init__(self) -> None:
        if self.max_inflight < 1:
            raise ValueError(f"TransportConfig.max_inflight={self.max_inflight}: must be >= 1")
        if not self.timeout_s > 0:
            raise ValueError(f"TransportConfig.timeout_s={self.timeout_s}: must be > 0 seconds")
        if not 1 <= self.max_channels <= 8191:
            raise ValueError(f"TransportConfig.max_channels={self.max_channels}: must be in 1..8191 (MPI guarantees tags up to 32767)")


class SendHandle:
    """An in-flight send. ``done`` once its MPI messages completed locally (buffers reusable)."""

    __slots__ = ("peer", "channel", "kind", "seq", "key", "nbytes", "open", "keep", "t_post", "_tp", "_sync")

    def __init__(self, tp: Transport | None, peer: int, channel: int, kind: str, seq: int, key: tuple, nbytes: int,
                 keep: tuple, sync: bool):
        self._tp = tp
        self.peer = peer
        self.channel = channel
        self.kind = kind
        self.seq = seq
        self.key = key
        self.nbytes = nbytes
        self.open = 0
        self.keep = keep  # buffers MPI reads from; must outlive the requests
        self._sync = sync
        self.t_post = time.monotonic_ns()

    @property
    def done(self) -> bool:
        return self.open == 0

    def _part_done(self, part: int, status: MPI.Status) -> None:
        self.open -= 1
        if self.open == 0:
            self._tp._send_done(self)

    def describe(self) -> dict:
        """This send's line in the pending-operation report."""
        mb, chunk, dir = self.key
        return {"op": "send", "peer": self.peer, "channel": self.channel, "kind": self.kind, "mb": mb,
                "dir": dir, "chunk": chunk, "seq": self.seq, "nbytes": self.nbytes,
                "state": "unmatched" if self._sync else "posted",
                "age_s": round((time.monotonic_ns() - self.t_post) / 1e9, 3)}


_SENT = SendHandle(None, -1, -1, "data", -1, (-1, 0, 0), 0, (), False)
"""What :meth:`Transport.isend` returns for a message MPI completed at once (eager): done, no
handle of its own (its span, if spans are on, is recorded before returning)."""


class RecvHandle:
    """A posted receive. ``done`` once the tensor is in ``tensor``; ``header`` is set on arrival."""

    __slots__ = ("peer", "channel", "shape", "dtype", "nbytes", "expect", "seq", "tensor", "header", "hdr",
                 "exp", "open", "t_post", "_tp", "_stream")

    def __init__(self, tp: Transport, stream: _Stream, peer: int, channel: int, shape, dtype, out, expect, seq: int,
                 exp: tuple | None):
        self._tp = tp
        self._stream = stream
        self.peer = peer
        self.channel = channel
        self.shape = shape
        self.dtype = dtype
        # payload size when the shape is known (decides inline or not before the header lands), else -1
        self.nbytes = -1 if exp is None else exp[1][0]
        self.expect = expect
        self.seq = seq  # the stream position this receive matches: stamped when posted
        self.tensor: torch.Tensor | None = out
        self.header: Header | None = None
        self.hdr: list | None = None  # [buffer, persistent request] of the header receive, until it lands
        self.exp = exp  # the header fields a known shape fixes (see Transport._expected)
        self.open = 0
        self.t_post = time.monotonic_ns()

    @property
    def done(self) -> bool:
        return self.header is not None and self.open == 0

    def _part_done(self, part: int, status: MPI.Status) -> None:
        if part == 0:
            self._tp._header_arrived(self, status.Get_count(MPI.BYTE))
        else:
            # MPI accepts a shorter message into a larger receive: without this a truncated payload
            # would leave stale bytes in the tensor, silently
            count = status.Get_count(MPI.BYTE)
            if count != self.tensor.nbytes:
                raise EnvelopeError(f"message from rank {self.peer} channel {self.channel} seq {self.seq}: payload "
                                    f"message has {count} bytes, the header and the posted receive say "
                                    f"{self.tensor.nbytes} (truncated payload)")
            self.open -= 1
            if self.done:
                self._tp._recv_done(self)

    def describe(self) -> dict:
        """This receive's line in the pending-operation report."""
        e = self.expect or {}
        return {"op": "recv", "peer": self.peer, "channel": self.channel, "kind": e.get("kind"),
                "mb": e.get("mb", self.header.key[0] if self.header else None), "dir": e.get("dir"),
                "chunk": e.get("chunk"), "seq": self.seq, "state": "payload" if self.header else "header",
                "age_s": round((time.monotonic_ns() - self.t_post) / 1e9, 3)}


class _Stream:
    """State of one (peer, channel): sequence numbers, the FIFO of receives, the open sync marker."""

    __slots__ = ("send_seq", "recv_seq", "recvs", "unposted", "sync", "hdr_free", "hdr_all", "send_as", "send_tpl",
                 "recv_as", "recv_exp")

    def __init__(self) -> None:
        self.send_seq = 0
        self.recv_seq = 0  # sequence number the next posted receive will expect
        self.recvs: deque[RecvHandle] = deque()  # posted, header not yet arrived or payload open
        self.unposted: deque[RecvHandle] = deque()  # in stream order: payload receive not yet posted
        self.sync: SendHandle | None = None  # the last synchronous header send, until matched
        # header receives: [buffer, persistent request] pairs, made once, reused (Start costs ~0.2 us
        # where an Irecv costs ~1 us); free ones, and all of them (freed by close)
        self.hdr_free: list[list] = []
        self.hdr_all: list[list] = []
        # the last (kind, dtype, shape) sent and its packed header with seq and key left to fill:
        # a stream's messages mostly repeat one form, and packing all 21 fields cost ~3 us
        self.send_as: tuple | None = None
        self.send_tpl = b""
        # the last (dtype, shape) received with a known shape and the header fields it fixes
        self.recv_as: tuple | None = None
        self.recv_exp: tuple | None = None


class Transport:
    """Tensor send/recv queues of one rank on one communicator."""

    def __init__(self, comm: MPI.Comm, config: TransportConfig | None = None,
                 on_span: Callable[..., None] | None = None, engine: Progress | None = None):
        self.comm = comm
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()
        self.config = config or TransportConfig()
        tag_ub = comm.Get_attr(MPI.TAG_UB) or 32767
        mc = self.config.max_channels
        per_channel = (tag_ub + 1 - 2 * mc) // mc  # tags left for each schedule-known channel's block
        if per_channel < 1 << _CHANNEL_MIN_BITS:
            # fewer bits would leave the position or the microbatch of a large message unchecked
            raise ValueError(f"TransportConfig.max_channels={mc} leaves {per_channel} tags per schedule-known "
                             f"channel under this MPI's TAG_UB={tag_ub}, fewer than the {1 << _CHANNEL_MIN_BITS} "
                             f"its check needs: lower max_channels to "
                             f"{(tag_ub + 1) // (2 + (1 << _CHANNEL_MIN_BITS))} or less")
        block_bits = min(_CHANNEL_BLOCK_BITS, per_channel.bit_length() - 1)
        mb_bits = min(_CHANNEL_MB_BITS, block_bits - 2)  # at least 2 position bits
        # bits of a schedule-known channel's tag that carry a message's position on the channel and
        # its microbatch: (4, 6) where the tag bound is large (windows of 16 positions, 64 microbatches)
        self.channel_tag_bits = (block_bits - mb_bits, mb_bits)
        self._max_inflight = self.config.max_inflight
        self._own_engine = engine is None
        self.engine = engine or Progress(self.config.timeout_s)
        self._on_span = on_span
        self._streams: dict[tuple[int, int], _Stream] = {}
        self._stage_pool: list[bytearray] = []  # send buffers of header messages (header + inline payload)
        self._sends: set[SendHandle] = set()
        self._channels: list = []  # schedule-known channels made here (freed by close)
        self.engine.register(self)

    # ------------------------------------------------------------------ schedule-known channels
    def send_channel(self, peer: int, channel: int, *, shape: tuple[int, ...], dtype: torch.dtype,
                     kind: str = "data", dir: int = 0):
        """A header-less channel to ``peer`` for tensors of exactly ``shape`` x ``dtype``
        (see :class:`runtime.channels.SendChannel`)."""
        from runtime.channels import SendChannel

        ch = SendChannel(self, peer, channel, shape=shape, dtype=dtype, kind=kind, dir=dir)
        self._channels.append(ch)
        return ch

    def recv_channel(self, peer: int, channel: int, *, shape: tuple[int, ...], dtype: torch.dtype,
                     kind: str = "data", dir: int = 0, ring: int = 2):
        """The receiving end of :meth:`send_channel`, with ``ring`` reusable receive buffers
        (see :class:`runtime.channels.RecvChannel`)."""
        from runtime.channels import RecvChannel

        ch = RecvChannel(self, peer, channel, shape=shape, dtype=dtype, kind=kind, dir=dir, ring=ring)
        self._channels.append(ch)
        return ch

    def channel_tag(self, peer: int, channel: int) -> int:
        """First MPI tag of schedule-known channel ``channel``'s block (checked against the limits)."""
        if not 0 <= peer < self.size:
            raise ValueError(f"peer={peer}: not a rank of this communicator (size {self.size})")
        if not 0 <= channel < self.config.max_channels:
            raise ValueError(f"channel={channel}: must be in 0..{self.config.max_channels - 1}")
        return 2 * self.config.max_channels + (channel << sum(self.channel_tag_bits))

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

    def isend(self, peer: int, tensor: torch.Tensor, *, channel: int = 0, kind: str = "data",
              mb: int = -1, chunk: int = 0, dir: int = 0) -> SendHandle:
        """Post ``tensor`` to ``peer`` on ``channel``; returns at once (unless backpressured).

        ``mb``, ``chunk``, ``dir`` travel as the header's ``key`` (:data:`KEY_FIELDS`). The tensor
        must not be modified until the handle is done (its memory is sent in place).
        """
        if not tensor.is_cpu:
            raise ValueError(f"isend: tensor on {tensor.device}; this transport moves host memory, copy it to CPU first")
        s = self._streams.get((peer, channel)) or self._stream(peer, channel)
        seq = s.send_seq
        sync = (seq + 1) % self._max_inflight == 0
        if sync and s.sync is not None and not s.sync.done:
            prev = s.sync
            self.engine.wait(lambda: prev.done, lambda: f"rank {self.rank}: send to rank {peer} channel {channel} "
                             f"stayed backpressured ({self.config.max_inflight} messages after seq {prev.seq}, "
                             f"which was not matched)")
        if not tensor.is_contiguous():
            tensor = tensor.contiguous()
        payload = _wire(tensor)
        stage = self._stage_pool.pop() if self._stage_pool else bytearray(_HDR_BUF)
        key = (mb, chunk, dir)
        dtype, shape = tensor.dtype, tensor.shape
        form = s.send_as
        if form is None or form[2] != shape or form[1] != dtype or form[0] != kind:
            # a new form: pack (and validate) every field and the inline payload once, then keep the
            # header as the stream's template
            n, nbytes = pack_header_into(stage, kind=kind, src=self.rank, dst=peer, channel=channel, seq=0,
                                         key=(0, 0, 0), dtype=dtype, shape=tuple(shape), payload=payload)
            s.send_tpl = bytes(stage[:HEADER_SIZE])
            s.send_as = (kind, dtype, shape)
        else:
            stage[:HEADER_SIZE] = s.send_tpl
            nbytes = len(payload)
            n = HEADER_SIZE
            if nbytes <= INLINE_MAX:
                n += nbytes
                stage[HEADER_SIZE:n] = payload
        _SEQ_KEY.pack_into(stage, _SEQ_KEY_OFFSET, seq, mb, chunk, dir)
        s.send_seq = seq + 1
        comm = self.comm
        if not sync and nbytes <= INLINE_MAX:
            # one eager message: complete when Isend returns, tested at once (~0.2 us), it needs no
            # handle and never enters the engine's request list
            req = comm.Isend([stage, n, MPI.BYTE], peer, 2 * channel)
            if req.Test():
                self._stage_pool.append(stage)  # MPI is done with it: the next send reuses it
                if self._on_span is not None:
                    now = time.monotonic_ns()
                    self._span(spans.SEND, now, now, peer, channel, kind, key, nbytes, seq)
                return _SENT
            handle = SendHandle(self, peer, channel, kind, seq, key, nbytes, (stage, tensor), sync)
            self.engine.add(req, handle, 0)
            handle.open = 1
        else:
            handle = SendHandle(self, peer, channel, kind, seq, key, nbytes, (stage, tensor), sync)
            if nbytes > INLINE_MAX:
                self.engine.add(comm.Isend([payload, MPI.BYTE], peer, 2 * channel + 1), handle, 1)
                handle.open = 1
            if sync:
                self.engine.add(comm.Issend([stage, n, MPI.BYTE], peer, 2 * channel), handle, 0)
                s.sync = handle
            else:
                self.engine.add(comm.Isend([stage, n, MPI.BYTE], peer, 2 * channel), handle, 0)
            handle.open += 1
        self._sends.add(handle)
        return handle

    def irecv(self, peer: int, *, channel: int = 0, shape: tuple[int, ...] | None = None,
              dtype: torch.dtype | None = None, out: torch.Tensor | None = None,
              expect: dict | None = None) -> RecvHandle:
        """Post a receive for the next message from ``peer`` on ``channel``.

        Give ``shape`` and ``dtype`` (or a contiguous ``out`` tensor to fill) when known: the payload
        is then received straight into that memory and the header must agree. ``expect`` maps header
        fields (``kind`` and :data:`KEY_FIELDS`: ``mb``, ``chunk``, ``dir``) to required values; a
        mismatch raises EnvelopeError naming the field.
        """
        if expect and not _EXPECT_FIELDS.issuperset(expect):
            raise ValueError(f"irecv: expect={expect}: fields must be among {sorted(_EXPECT_FIELDS)}")
        if out is not None:
            if not out.is_cpu or not out.is_contiguous():
                raise ValueError("irecv: out must be a contiguous CPU tensor")
            shape, dtype = tuple(out.shape), out.dtype
        elif shape is not None:
            shape = tuple(shape)
        if (shape is None) != (dtype is None):
            raise ValueError("irecv: give both shape and dtype, or neither")
        s = self._streams.get((peer, channel)) or self._stream(peer, channel)
        exp = None
        if shape is not None:
            exp = s.recv_exp if s.recv_as == (dtype, shape) else self._expected(s, peer, channel, dtype, shape)
        h = RecvHandle(self, s, peer, channel, shape, dtype, out, expect, s.recv_seq, exp)
        s.recv_seq += 1
        hdr = h.hdr = s.hdr_free.pop() if s.hdr_free else self._header_receive(s, peer, channel)
        hdr[1].Start()
        self.engine.add(hdr[1], h, 0)
        # open parts: the header, and a separate payload from when its size is known (posted or not)
        h.open = 2 if h.nbytes > INLINE_MAX else 1
        s.recvs.append(h)
        if s.unposted or shape is None:
            # nothing to post yet: the stream's oldest unposted receive (this one, or one ahead of it)
            # waits for its header, and _header_arrived posts the queue in order when that lands
            s.unposted.append(h)
        elif h.nbytes > INLINE_MAX:
            self._post_payload(h)
        return h

    def _header_receive(self, s: _Stream, peer: int, channel: int) -> list:
        """A new [buffer, persistent header receive] pair for stream ``s`` (kept by it until close)."""
        buf = bytearray(_HDR_BUF)
        pair = [buf, self.comm.Recv_init([buf, MPI.BYTE], peer, 2 * channel)]
        s.hdr_all.append(pair)
        return pair

    def _expected(self, s: _Stream, peer: int, channel: int, dtype: torch.dtype, shape: tuple[int, ...]) -> tuple:
        """What a header for a receive of known ``shape`` x ``dtype`` must hold, field by field as
        :data:`~runtime.envelope.HEADER` unpacks: (dtype, ndim, channel, src, dst) and (nbytes,
        shape padded with zeros), and the message's byte count; remembered as the stream's. Checks
        the dtype and the number of dims (ValueError)."""
        ndim = len(shape)
        if ndim > MAX_NDIM:
            raise ValueError(f"irecv: shape {shape} has {ndim} dims; a message carries at most {MAX_NDIM}")
        code = dtype_code(dtype)
        nbytes = math.prod(shape) * itemsize(dtype)
        exp = ((code, ndim, channel, peer, self.rank), (nbytes, *shape, *(0,) * (MAX_NDIM - ndim)),
               HEADER_SIZE + (nbytes if nbytes <= INLINE_MAX else 0))
        s.recv_as, s.recv_exp = (dtype, shape), exp
        return exp

    def _post_payloads(self, s: _Stream) -> None:
        """Post payload receives in stream order for every receive whose size is now known."""
        unposted = s.unposted
        while unposted:
            h = unposted[0]
            if h.header is None and h.shape is None:
                return  # its size is unknown until its header lands; later ones must wait behind it
            unposted.popleft()
            if (h.header.nbytes if h.header is not None else h.nbytes) > INLINE_MAX:
                self._post_payload(h)

    def _post_payload(self, h: RecvHandle) -> None:
        """Post ``h``'s separate payload receive (its turn in the stream has come; ``h.open`` counts it already)."""
        if h.tensor is None:
            hd = h.header
            h.tensor = torch.empty(h.shape if hd is None else hd.shape, dtype=h.dtype if hd is None else hd.dtype)
        self.engine.add(self.comm.Irecv([_wire(h.tensor), MPI.BYTE], h.peer, 2 * h.channel + 1), h, 1)

    # ------------------------------------------------------------------ completion
    def progress(self) -> int:
        """Complete every operation that is ready now (on every user of the engine); returns how
        many MPI requests finished."""
        return self.engine.progress()

    def _send_done(self, h: SendHandle) -> None:
        self._stage_pool.append(h.keep[0])
        h.keep = ()
        self._sends.discard(h)
        if self._on_span is not None:
            self._span(spans.SEND, h.t_post, time.monotonic_ns(), h.peer, h.channel, h.kind, h.key, h.nbytes, h.seq)

    def _header_arrived(self, h: RecvHandle, count: int) -> None:
        h.open -= 1
        buf = h.hdr[0]
        f = HEADER.unpack_from(buf)
        exp = h.exp
        # A receive of known shape: the fields its shape, stream and position fix are compared as
        # tuples at once (~0.5 us); anything else, or any disagreement, takes the full decode,
        # which names the field.
        if (exp is not None and count == exp[2] and f[0] == MAGIC and f[1] == VERSION and f[2] < len(KINDS)
                and f[3:8] == exp[0] and f[8] == h.seq and f[12:] == exp[1] and (h.expect is None or self._as_expected(h.expect, f))):
            header, inline = tuple.__new__(Header, f), memoryview(buf)[HEADER_SIZE:count]
        else:
            header, inline = self._decode(h, buf, count)
        h.header = header
        if count > HEADER_SIZE:
            if h.tensor is not None:
                _wire(h.tensor)[:] = inline  # shape and dtype checked: the sizes agree
            else:
                h.tensor = torch.frombuffer(bytearray(inline), dtype=header.dtype).reshape(header.shape)
        elif h.tensor is None and header.inline:
            h.tensor = torch.empty(header.shape, dtype=header.dtype)
        h._stream.hdr_free.append(h.hdr)
        h.hdr = None
        if h.shape is None:  # its size is known now: it and the receives behind it may post payloads
            if not header.inline:
                h.open += 1
            self._post_payloads(h._stream)
        if h.open == 0:
            self._recv_done(h)

    @staticmethod
    def _as_expected(expect: dict, f: tuple) -> bool:
        """Whether unpacked header ``f`` has the kind and key values ``expect`` asks for."""
        for field, want in expect.items():
            if field == "kind":
                if f[2] >= len(KINDS) or KINDS[f[2]] != want:
                    return False
            elif f[9 + _KEY_INDEX[field]] != want:
                return False
        return True

    def _decode(self, h: RecvHandle, buf: bytearray, count: int) -> tuple[Header, memoryview]:
        """Decode and check a header field by field: any malformed or unexpected field raises
        EnvelopeError naming it."""
        header, inline = unpack_header(buf, count, src=h.peer, tag=2 * h.channel)
        if header.dst != self.rank or header.channel != h.channel or header.seq != h.seq:
            self._reject(h, header, "dst", self.rank)
            self._reject(h, header, "channel", h.channel)
            self._reject(h, header, "seq", h.seq, " (lost or crossed message)")
        if h.shape is not None and (header.shape != h.shape or header.dtype != h.dtype):
            self._reject(h, header, "shape", h.shape, f" (dtype {header.dtype}; the receive was posted for {h.dtype})")
            self._reject(h, header, "dtype", h.dtype, f" (shape {header.shape}; the receive was posted for {h.shape})")
        if h.expect:
            for field, want in h.expect.items():
                self._reject(h, header, field, want)
        return header, inline

    @staticmethod
    def _reject(h: RecvHandle, header: Header, field: str, want, note: str = "") -> None:
        """Raise EnvelopeError if ``header.field`` is not ``want`` (messages built only on error)."""
        i = _KEY_INDEX.get(field)
        got = getattr(header, field) if i is None else header.key[i]
        if got != want:
            raise EnvelopeError(f"message from rank {h.peer} channel {h.channel} seq {header.seq}: field "
                                f"{field!r} is {got!r}, expected {want!r}{note}")

    def _recv_done(self, h: RecvHandle) -> None:
        recvs = h._stream.recvs
        # Receives complete in stream order: the payload tag is FIFO and headers precede payloads.
        while recvs and recvs[0].done:
            recvs.popleft()
        if self._on_span is not None:
            hd = h.header
            self._span(spans.RECV, h.t_post, time.monotonic_ns(), hd.src, hd.channel, hd.kind, hd.key, hd.nbytes,
                       hd.seq)

    def _span(self, name: str, t0: int, t1: int, peer: int, channel: int, kind: str, key: tuple, nbytes: int,
              seq: int) -> None:
        mb, chunk, dir = key
        self._on_span(name, t0, t1, peer=peer, channel=channel, kind=kind, mb=mb, chunk=chunk, dir=dir, nbytes=nbytes,
                      seq=seq)

    # ------------------------------------------------------------------ waiting
    def wait(self, handle: RecvHandle | SendHandle, timeout: float | None = None) -> torch.Tensor | None:
        """Block (inside MPI, every transfer advancing) until ``handle`` is done; returns the
        received tensor (None for a send). Past the deadline: CommTimeout with the pending report."""
        if handle.done:
            return handle.tensor if isinstance(handle, RecvHandle) else None
        if isinstance(handle, RecvHandle):
            self.engine.wait(lambda: handle.done, lambda: f"rank {self.rank}: receive from rank {handle.peer} "
                             f"channel {handle.channel} (expect {handle.expect}) got nothing", timeout, handle)
            return handle.tensor
        self.engine.wait(lambda: handle.done, lambda: f"rank {self.rank}: send to rank {handle.peer} channel "
                         f"{handle.channel} key {handle.key} was not received", timeout, handle)
        return None

    def recv(self, peer: int, **kwargs) -> torch.Tensor:
        """Blocking convenience: post a receive and wait for it."""
        return self.wait(self.irecv(peer, **kwargs))

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every send posted so far (dynamic and on channels) is done: its buffer may be
        reused and MPI delivers it once the receiver posts the matching receive."""
        def done() -> bool:
            return not self._sends and not any(ch.sends_open for ch in self._channels)

        self.engine.wait(done, lambda: f"rank {self.rank}: {len(self._sends)} sends were not received", timeout)

    def pending(self) -> list[dict]:
        """Every open operation on the engine (this transport's and any other registered user's):
        op, peer, channel, kind, microbatch, seq, state, age in seconds."""
        return self.engine.pending()

    def open_operations(self) -> list[dict]:
        """This transport's part of the report: dynamic sends and receives, then its channels'."""
        out = [h.describe() for h in list(self._sends)]
        for s in list(self._streams.values()):
            out += [h.describe() for h in list(s.recvs) if not h.done]
        for ch in list(self._channels):
            out += ch.open_operations()
        return out

    def close(self, timeout: float | None = None) -> None:
        """Flush sends, then cancel receives nobody will answer. Raises if receives were still open."""
        self.flush(timeout)
        open_recvs = [p for p in self.pending() if p["op"] == "recv"]
        self.engine.cancel_all()
        for ch in self._channels:
            ch.free()
        self._channels.clear()
        for st in self._streams.values():  # persistent header receives, inactive after cancel_all
            for _, req in st.hdr_all:
                req.Free()
        if self._own_engine:
            self.engine.close()
        self._streams.clear()
        if open_recvs:
            raise RuntimeError(f"rank {self.rank}: transport closed with {len(open_recvs)} receives never "
                               f"answered: {open_recvs[:8]}")
