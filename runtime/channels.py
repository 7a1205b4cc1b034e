"""Schedule-known channels: header-less tensor streams whose shape, dtype and order both ends know.

Pipeline activations and gradients and DualPipe's mirror-gradient exchange are planned: before
anything moves, both ranks know the kind, direction, shape and dtype of every message on a
channel and the order of the microbatches. So nothing is encoded or decoded per message, and two
messages of the same size still cannot be crossed unnoticed:

* a payload of at most :data:`SMALL_MAX` bytes is copied into one message together with a
  16-byte **trailer** (``seq``, ``mb``, ``channel``, ``kind``, ``dir``, ``chunk``, a magic byte),
  sent on the channel's first tag and received with a persistent request; the receiver checks the
  trailer against what it stamped at posting;
* a larger payload is posted as it is (``Isend`` of the tensor's memory, no copy) as *one*
  message whose **tag carries the check**: the channel's block of tags is indexed by the message's
  sequence number on the channel (modulo a window) and its microbatch (modulo a window), so a
  message only matches the receive posted for that position and microbatch. A second trailer
  message cost 3-8 us per message at 256 KiB-1 MiB here (MPI's per-message cost, not Python's);
  the tag costs nothing. A message that matches no receive (microbatches sent in another order, a
  lost or extra message, a message of another size) leaves its receive waiting: when that wait
  passes its deadline the channel probes its tags and raises
  :class:`~runtime.envelope.EnvelopeError` naming the sender, the channel and the field (``mb``,
  ``seq``) or the sizes, and the pending-operation report says the same;
* the receiver owns a **ring** of receive buffers; :meth:`RecvChannel.post` takes a free buffer
  and starts a persistent request on it (``Recv_init``, made once per buffer and tag; nothing is
  allocated per message). A received tensor is a view of its buffer: it may become an autograd
  leaf whose storage the backward still reads, so a buffer returns to the ring only through
  :meth:`RecvChannel.release` (the stage actor releases after that microbatch's last B / W), and
  posting with every buffer held is an error, never a silent reuse;
* every completed receive checks its byte count: a shorter message is an EnvelopeError naming
  ``nbytes``, a longer one an MPI error the engine turns into an EnvelopeError.

The MPI tags of channel ``c`` are a block of their own, apart from the dynamic queues' (see
:meth:`Transport.channel_tag`); requests go on the transport's progress engine, so progress,
waits, deadlines and the pending-operation report cover channels too.
"""

from __future__ import annotations

import math
import struct
import time

import torch
from mpi4py import MPI

from runtime import spans
from runtime.envelope import INLINE_MAX, KINDS, EnvelopeError, itemsize
from runtime.progress import CommTimeout
from runtime.transport import Transport, _wire  # transport imports this module only inside its methods

__all__ = ["SendChannel", "RecvChannel", "ChannelSend", "ChannelRecv", "TRAILER", "SMALL_MAX"]

TRAILER = struct.Struct("<iiHBBBBxx")
"""seq, mb, channel, kind code, dir, chunk, magic; 16 bytes after the payload of a small message."""
_MAGIC = 0xA5
SMALL_MAX = INLINE_MAX
"""Payloads up to this many bytes travel in one message together with their trailer."""
_KIND_CODE = {k: i for i, k in enumerate(KINDS)}
_DIAGNOSE_AFTER_S = 5.0
"""A receive open this long gets its channel's tags probed in the pending report (``unmatched``)."""
_MAX_PERSISTENT = 64
"""Persistent receives a ring buffer of a large channel keeps (one per tag it has seen); beyond
that a receive is a plain ``Irecv`` (a schedule with many microbatches, about 0.5 us more)."""


class _Channel:
    __slots__ = ("tp", "peer", "channel", "shape", "size", "dtype", "kind", "dir", "nbytes", "tag", "seq", "small",
                 "seq_mask", "mb_bits", "mb_mask")

    def __init__(self, tp: Transport, peer: int, channel: int, *, shape, dtype, kind: str, dir: int):
        if kind not in KINDS:
            raise ValueError(f"kind={kind!r}: must be one of {KINDS}")
        if not 0 <= dir < 256:
            raise ValueError(f"dir={dir}: must be in 0..255")
        self.tp = tp
        self.peer = peer
        self.channel = channel
        self.tag = tp.channel_tag(peer, channel)
        self.shape = tuple(shape)
        self.size = torch.Size(self.shape)
        self.dtype = dtype
        self.kind = kind
        self.dir = dir
        self.nbytes = math.prod(self.shape) * itemsize(dtype)
        self.small = self.nbytes <= SMALL_MAX
        self.seq = 0
        seq_bits, self.mb_bits = tp.channel_tag_bits
        self.seq_mask, self.mb_mask = (1 << seq_bits) - 1, (1 << self.mb_bits) - 1

    def _tag(self, seq: int, mb: int) -> int:
        """The tag of message ``seq`` (microbatch ``mb``) of a large channel: its place in the block."""
        return self.tag + ((seq & self.seq_mask) << self.mb_bits) + (mb & self.mb_mask)

    def _where(self, seq: int) -> str:
        return f"rank {self.peer} channel {self.channel} ({self.kind} dir {self.dir}) seq {seq}"

    @property
    def sends_open(self) -> int:
        return 0


class ChannelSend:
    """One message in flight on a :class:`SendChannel`; ``done`` once MPI no longer reads its memory."""

    __slots__ = ("ch", "mb", "chunk", "seq", "open", "keep", "t_post")

    def __init__(self, ch: SendChannel, mb: int, chunk: int, seq: int, keep: bytearray | torch.Tensor | None):
        self.ch, self.mb, self.chunk, self.seq, self.keep = ch, mb, chunk, seq, keep
        self.open = 1
        self.t_post = time.monotonic_ns()

    @property
    def done(self) -> bool:
        return self.open == 0

    def _part_done(self, part: int, status: MPI.Status) -> None:
        self.open = 0
        self.ch._done(self)

    def describe(self) -> dict:
        """This send's line in the pending-operation report."""
        ch = self.ch
        return {"op": "send", "peer": ch.peer, "channel": ch.channel, "kind": ch.kind, "mb": self.mb,
                "dir": ch.dir, "chunk": self.chunk, "seq": self.seq, "nbytes": ch.nbytes, "state": "posted",
                "age_s": round((time.monotonic_ns() - self.t_post) / 1e9, 3)}


_SENT = ChannelSend(None, -1, -1, -1, None)
_SENT.open = 0
"""What :meth:`SendChannel.send` returns for a message MPI completed at once (eager): done."""


class SendChannel(_Channel):
    """Sending end of a schedule-known channel (make it with :meth:`Transport.send_channel`)."""

    __slots__ = ("open", "_stage", "_kind_code")

    def __init__(self, tp: Transport, peer: int, channel: int, *, shape, dtype, kind: str = "data", dir: int = 0):
        super().__init__(tp, peer, channel, shape=shape, dtype=dtype, kind=kind, dir=dir)
        self.open: set[ChannelSend] = set()
        self._kind_code = _KIND_CODE[kind]
        # small messages: payload + trailer are copied here and sent as one message
        self._stage = bytearray(self.nbytes + TRAILER.size) if self.small else None

    @property
    def sends_open(self) -> int:
        return len(self.open)

    def send(self, tensor: torch.Tensor, *, mb: int, chunk: int = 0) -> ChannelSend:
        """Post ``tensor`` (exactly the channel's shape and dtype) as microbatch ``mb``; returns at once.

        The tensor must not be modified until the returned operation is done (sent in place; a
        message of at most SMALL_MAX bytes is copied, and usually done on return).
        """
        if tensor.dtype != self.dtype or tensor.shape != self.size or not tensor.is_cpu:
            raise ValueError(f"send on channel {self.channel} to rank {self.peer}: tensor {tuple(tensor.shape)} "
                             f"{tensor.dtype} on {tensor.device}, the channel carries {self.shape} {self.dtype} on cpu")
        if not tensor.is_contiguous():
            tensor = tensor.contiguous()
        seq = self.seq
        self.seq = seq + 1
        if self.small:
            # A message MPI sends eagerly is complete when Isend returns: tested at once (~0.2 us),
            # it never enters the engine's request list (whose Testsome costs grow with its length)
            # and needs no handle of its own.
            stage = self._stage
            nbytes = self.nbytes
            stage[:nbytes] = MPI.buffer.fromaddress(tensor.data_ptr(), nbytes)
            TRAILER.pack_into(stage, nbytes, seq, mb, self.channel, self._kind_code, self.dir, chunk, _MAGIC)
            req = self.tp.comm.Isend([stage, MPI.BYTE], self.peer, self.tag)
            if req.Test():
                if self.tp._on_span is not None:
                    now = time.monotonic_ns()
                    self._span(now, now, mb, chunk, seq)
                return _SENT
            self._stage = bytearray(len(stage))  # MPI still reads this one: the next send gets a new one
            op = ChannelSend(self, mb, chunk, seq, stage)
        else:
            req = self.tp.comm.Isend([MPI.buffer.fromaddress(tensor.data_ptr(), self.nbytes), MPI.BYTE], self.peer,
                                     self._tag(seq, mb))
            op = ChannelSend(self, mb, chunk, seq, tensor)
        self.tp.engine.add(req, op, 0)
        self.open.add(op)
        return op

    def wait(self, op: ChannelSend, timeout: float | None = None) -> None:
        """Block until MPI no longer reads ``op``'s tensor (it may then be modified)."""
        if op.open:
            self.tp.engine.wait(lambda: op.open == 0, lambda: f"rank {self.tp.rank}: send to rank {self.peer} channel "
                                f"{self.channel} mb {op.mb} was not received", timeout, op)

    def _done(self, op: ChannelSend) -> None:
        op.keep = None
        self.open.discard(op)
        if self.tp._on_span is not None:
            self._span(op.t_post, time.monotonic_ns(), op.mb, op.chunk, op.seq)

    def _span(self, t0: int, t1: int, mb: int, chunk: int, seq: int) -> None:
        self.tp._on_span(spans.SEND, t0, t1, peer=self.peer, channel=self.channel, kind=self.kind, mb=mb,
                         chunk=chunk, dir=self.dir, nbytes=self.nbytes, seq=seq)

    def open_operations(self) -> list[dict]:
        return [op.describe() for op in list(self.open)]

    def free(self) -> None:
        """Nothing to release on the sending side (its requests are not persistent)."""


class ChannelRecv:
    """One buffer of a :class:`RecvChannel`'s ring with its persistent requests, and while posted
    the receive into it: ``tensor`` (a view of the buffer) once ``done``.

    The buffer is ``[nbytes + 16]`` bytes (payload, trailer) on a small channel and ``[nbytes]``
    on a large one.
    """

    __slots__ = ("ch", "buf", "tensor", "trailer", "want", "preqs", "held", "mb", "seq", "open", "t_post")

    def __init__(self, ch: RecvChannel):
        self.ch = ch
        self.buf = torch.empty(ch.want_bytes, dtype=torch.uint8)
        self.tensor = self.buf[: ch.nbytes].view(ch.dtype).view(ch.shape)
        self.trailer = memoryview(self.buf.numpy())[ch.nbytes:] if ch.small else None
        self.want = ch.want_bytes  # bytes the message must bring (read on every completion)
        self.preqs: dict[int, MPI.Prequest] = {}  # tag -> persistent receive into this buffer
        if ch.small:
            self.preqs[ch.tag] = ch.tp.comm.Recv_init([_wire(self.buf), MPI.BYTE], ch.peer, ch.tag)
        self.held = False  # posted and not yet released
        self.mb = self.seq = -1
        self.open = 0
        self.t_post = 0

    @property
    def done(self) -> bool:
        return self.open == 0

    def _part_done(self, part: int, status: MPI.Status) -> None:
        count = status.Get_count(MPI.BYTE)
        self.open = 0
        if count != self.want:
            ch = self.ch
            raise EnvelopeError(f"message from {ch._where(self.seq)}: field 'nbytes' is "
                                f"{count - (TRAILER.size if ch.small else 0)}, expected {ch.nbytes}")
        self.ch._done(self)

    def describe(self) -> dict:
        """This receive's line in the pending-operation report (with what the channel's tags hold
        instead, when a message that matches no posted receive waits there)."""
        ch = self.ch
        d = {"op": "recv", "peer": ch.peer, "channel": ch.channel, "kind": ch.kind, "mb": self.mb,
             "dir": ch.dir, "chunk": None, "seq": self.seq, "nbytes": ch.nbytes, "state": "posted",
             "age_s": round((time.monotonic_ns() - self.t_post) / 1e9, 3)}
        if d["age_s"] >= _DIAGNOSE_AFTER_S:  # the report runs every heartbeat: probe only a receive that is stuck
            unmatched = ch.unmatched(self)
            if unmatched:
                d["unmatched"] = unmatched
        return d


class RecvChannel(_Channel):
    """Receiving end of a schedule-known channel with a ring of ``ring`` reusable buffers
    (make it with :meth:`Transport.recv_channel`)."""

    __slots__ = ("slots", "free_slots", "_tail")

    def __init__(self, tp: Transport, peer: int, channel: int, *, shape, dtype, kind: str = "data", dir: int = 0,
                 ring: int = 2):
        super().__init__(tp, peer, channel, shape=shape, dtype=dtype, kind=kind, dir=dir)
        if ring < 1:
            raise ValueError(f"ring={ring}: a receive channel needs at least one buffer")
        self.slots = [ChannelRecv(self) for _ in range(ring)]
        self.free_slots = list(reversed(self.slots))
        self._tail = (channel, _KIND_CODE[kind], dir)  # trailer fields every message on the channel carries

    def post(self, *, mb: int) -> ChannelRecv:
        """Post the receive of the channel's next message, which must be microbatch ``mb``, into a
        free ring buffer; returns that buffer (the receive's handle until it is released)."""
        if not self.free_slots:
            raise RuntimeError(f"receive channel {self.channel} from rank {self.peer} ({self.kind} dir {self.dir}): all "
                               f"{len(self.slots)} ring buffers are held (mbs {[s.mb for s in self.slots]} not released) "
                               f"when posting mb {mb}: release received tensors once nothing reads them, or make the "
                               f"ring larger")
        op = self.free_slots.pop()
        seq = self.seq
        self.seq = seq + 1
        op.held = True
        op.mb = mb
        op.seq = seq
        op.open = 1
        op.t_post = time.monotonic_ns()
        if self.small:
            req = op.preqs[self.tag]
        else:
            tag = self._tag(seq, mb)
            req = op.preqs.get(tag)
            if req is None:
                comm = self.tp.comm
                if len(op.preqs) < _MAX_PERSISTENT:
                    req = op.preqs[tag] = comm.Recv_init([_wire(op.buf), MPI.BYTE], self.peer, tag)
                else:
                    self.tp.engine.add(comm.Irecv([_wire(op.buf), MPI.BYTE], self.peer, tag), op, 0)
                    return op
        req.Start()
        self.tp.engine.add(req, op, 0)
        return op

    def wait(self, op: ChannelRecv, timeout: float | None = None) -> torch.Tensor:
        """Block until ``op`` has landed (and passed its checks); returns its tensor (a ring buffer view).

        Past the deadline: :class:`EnvelopeError` naming the field when a message that matches
        no posted receive waits on the channel (microbatches sent in another order, a message
        skipped), else :class:`CommTimeout`.
        """
        if op.open:
            try:
                self.tp.engine.wait(lambda: op.open == 0, lambda: f"rank {self.tp.rank}: receive from "
                                    f"{self._where(op.seq)} mb {op.mb} got nothing", timeout, op)
            except CommTimeout as exc:
                unmatched = self.unmatched(op)
                if unmatched:
                    raise EnvelopeError(f"message from {self._where(op.seq)}: {unmatched}") from exc
                raise
        return op.tensor

    def unmatched(self, op: ChannelRecv) -> str | None:
        """What waits on this channel's tags for posted receive ``op`` without matching it, or None.

        Probes the channel's block of tags (``Iprobe``, no message is taken): a message of another
        size means the two ends disagree on the shape or dtype (one may think the channel small,
        the other large); one at ``op``'s position with another microbatch means microbatches sent
        in another order; ``op``'s microbatch at another position, a message lost or added.
        Called on failure paths only (a deadline, the pending report of an old receive).
        """
        if not op.open:
            return None
        comm, status = self.tp.comm, MPI.Status()
        want = self.want_bytes
        seq_pos, mb_pos = op.seq & self.seq_mask, op.mb & self.mb_mask
        own = self.tag if self.small else self._tag(op.seq, op.mb)
        found: dict[str, str] = {}
        for offset in range(1 << (self.seq_mask.bit_length() + self.mb_bits)):
            tag = self.tag + offset
            if tag == own or not comm.Iprobe(self.peer, tag, status):
                continue
            count = status.Get_count(MPI.BYTE)
            seq, mb = offset >> self.mb_bits, offset & self.mb_mask
            if count != want:
                return (f"a message of {count} bytes waits on the channel, which carries {want}: the two ends "
                        f"disagree on its shape or dtype")
            window = f" (mod {self.mb_mask + 1} and {self.seq_mask + 1}: the tag carries both)"
            if seq == seq_pos:
                found.setdefault("mb", f"field 'mb' is {mb}, expected {mb_pos}{window}: microbatches sent in "
                                       f"another order (crossed messages)")
            elif mb == mb_pos:
                found.setdefault("seq", f"field 'seq' is {seq}, expected {seq_pos}{window}: a message lost or "
                                        f"added on the channel")
        return found.get("mb") or found.get("seq")

    @property
    def want_bytes(self) -> int:
        """Bytes one message of this channel brings: the payload, and the trailer on a small one."""
        return self.nbytes + (TRAILER.size if self.small else 0)

    def release(self, op: ChannelRecv) -> None:
        """Return ``op``'s buffer to the ring: nothing may read its tensor afterwards."""
        if op.open or not op.held:
            raise RuntimeError(f"release of mb {op.mb} on receive channel {self.channel} from rank {self.peer}: "
                               f"{'still in flight' if op.open else 'not posted or already released'}")
        op.held = False
        self.free_slots.append(op)

    def _done(self, op: ChannelRecv) -> None:
        if self.small:
            seq, mb, channel, kind, dir, chunk, magic = TRAILER.unpack_from(op.trailer)
            if seq != op.seq or mb != op.mb or magic != _MAGIC or (channel, kind, dir) != self._tail:
                self._reject(op, seq, mb, channel, kind, dir, magic)
        else:  # the tag matched: position and microbatch agree (modulo the windows)
            seq, mb, chunk = op.seq, op.mb, -1
        tp = self.tp
        if tp._on_span is not None:
            tp._on_span(spans.RECV, op.t_post, time.monotonic_ns(), peer=self.peer, channel=self.channel,
                        kind=self.kind, mb=mb, chunk=chunk, dir=self.dir, nbytes=self.nbytes, seq=seq)

    def _reject(self, op: ChannelRecv, seq: int, mb: int, channel: int, kind: int, dir: int, magic: int) -> None:
        """Raise the EnvelopeError naming the first trailer field that disagrees."""
        for field, got, want in (("magic", magic, _MAGIC), ("channel", channel, self.channel),
                                 ("kind", kind, _KIND_CODE[self.kind]), ("dir", dir, self.dir),
                                 ("seq", seq, op.seq), ("mb", mb, op.mb)):
            if got != want:
                if field == "kind":
                    got, want = KINDS[got] if got < len(KINDS) else got, self.kind
                raise EnvelopeError(f"message from {self._where(op.seq)}: field {field!r} is {got!r}, "
                                    f"expected {want!r}" + (" (lost or crossed message)" if field in ("seq", "mb") else ""))

    def open_operations(self) -> list[dict]:
        return [op.describe() for op in list(self.slots) if op.held and op.open]

    def free(self) -> None:
        """Free the persistent requests (after the engine cancelled any still active)."""
        for slot in self.slots:
            for req in slot.preqs.values():
                req.Free()
        self.slots, self.free_slots = [], []
