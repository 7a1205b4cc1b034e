"""Variable-size, non-blocking all-to-all exchange over a sub-communicator (no model knowledge).

An :class:`Exchange` is a collective over its communicator: every rank calls :meth:`Exchange.start`
once per exchange, in the same order. Each call moves, to every peer of a *peer set* (a
neighbourhood: e.g. a rank's rail peers, or the ranks of its node), a number of rows that only the
sender knows, as one or more *fields* sharing that row count (``[rows, *row_shape]`` each, their
own dtype: hidden states, slot ids, gate weights, ...):

1. **counts first**: the sender posts one int64 count to every peer of its send set (zeros too:
   the receiver cannot otherwise know it is done), with the *format* of the fields it sends (a
   fingerprint of their names, row shapes and dtypes); a receiver that already knows what comes
   (combine and backward reuse the dispatch's counts) passes ``recv_rows`` and skips this round;
2. **payloads** into buffers sized from the counts: each count that lands posts the receives of
   that peer's fields straight into freshly allocated tensors; the sender posts its payloads at
   start (a peer's fields travel in field order on one tag, so they match in order).

Fields may differ per peer and per direction (``fields`` for what arrives, ``send_fields`` for
what leaves): an FP8 rank and a BF16 rank receive their rows in different dtypes. Both sides must
agree before anything moves; a disagreement is an error, never a reinterpretation of bytes: a
count whose format fingerprint is not the receiver's raises :class:`WireMismatch`, and so does a
payload whose byte count is not the buffer's (MPI itself refuses a longer one).

Point-to-point, not ``Ialltoallv``: ``bench/moe.py`` measures both for the same two-hop traffic
(the p2p exchange only talks to its neighbourhood, ``Ialltoallv`` is a collective over the whole
communicator per field and needs the counts collective first); and p2p lets the failure report
name the peers not yet heard from, which a collective request cannot.

Requests go on the rank's :class:`~runtime.progress.Progress` engine, so pipeline queues and
exchanges progress together, waits have deadlines, and every open exchange is listed by
``Progress.pending()`` (name, communicator, the caller's labels such as layer / microbatch /
phase, state, and the world ranks of the peers whose counts or payloads have not arrived).
A rank's rows to itself never touch MPI: they are handed over as they are.
"""

from __future__ import annotations

import functools
import time
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from mpi4py import MPI

from runtime.progress import Progress
from runtime.transport import _wire  # the op keeps each wired tensor alive until MPI is done

__all__ = ["Field", "Fields", "Exchange", "ExchangeOp", "WireMismatch", "wait_any"]

_MAX_INFLIGHT = 4096
"""Exchange ``seq`` modulo this picks the tag pair, so up to this many exchanges of one
:class:`Exchange` may be open at once without their messages matching each other's receives."""


@dataclass(frozen=True, slots=True)
class Field:
    """One per-row tensor an exchange carries: ``[rows, *row_shape]`` of ``dtype``."""

    name: str
    row_shape: tuple[int, ...]
    dtype: torch.dtype

    def empty(self, rows: int) -> torch.Tensor:
        return torch.empty((rows, *self.row_shape), dtype=self.dtype)

    def describe(self) -> str:
        return f"{self.name}:{str(self.dtype).removeprefix('torch.')}{list(self.row_shape)}"


Fields = Sequence[Field] | Mapping[int, Sequence[Field]]
"""One field list for every peer, or per peer (this communicator's ranks)."""


class WireMismatch(ValueError):
    """Two ranks disagree on what an exchange carries (format or bytes)."""


@functools.lru_cache(maxsize=256)
def _format(fields: tuple[Field, ...]) -> tuple[int, str]:
    """(fingerprint, text) of a field list: what the counts message carries and an error names."""
    text = " ".join(f.describe() for f in fields)
    return zlib.crc32(text.encode()), text


def _per_peer(fields: Fields) -> Mapping[int, tuple[Field, ...]] | tuple[Field, ...]:
    if isinstance(fields, Mapping):
        return {p: tuple(f) for p, f in fields.items()}
    return tuple(fields)


class ExchangeOp:
    """One exchange in flight. ``received[peer]`` holds that peer's fields once ``done``."""

    __slots__ = ("_ex", "_fields", "_send_fields", "labels", "tags", "received", "_counts_in", "_counts_out",
                 "_keep", "_recv_parts", "_waiting", "_open", "t_post", "t_done", "sent_bytes")

    def __init__(self, ex: Exchange, fields: Fields, send_fields: Fields, labels: dict, seq: int):
        self._ex = ex
        self._fields = _per_peer(fields)
        self._send_fields = _per_peer(send_fields)
        self.labels = labels
        self.tags = (2 * (seq % _MAX_INFLIGHT), 2 * (seq % _MAX_INFLIGHT) + 1)  # counts, payloads
        self.received: dict[int, tuple[torch.Tensor, ...]] = {}
        self._counts_in: dict[int, np.ndarray] = {}
        self._counts_out: list[np.ndarray] = []
        self._keep: list[torch.Tensor] = []  # send buffers MPI reads from
        self._recv_parts: list[tuple[int, int]] = []  # per posted payload receive: (peer, bytes expected)
        self._waiting: dict[int, int] = {}  # peer -> open receives (its count, then its fields)
        self._open = 0  # all open requests, sends included
        self.t_post = time.monotonic_ns()
        self.t_done: int | None = None
        """Monotonic ns when the last of its requests completed (``t_post`` if it posted none)."""
        self.sent_bytes: dict[int, list[int]] = {}
        """Per peer (this communicator's ranks; self excluded), bytes sent per field."""

    @property
    def done(self) -> bool:
        return self._open == 0

    @property
    def exchange_name(self) -> str:
        """The name of the :class:`Exchange` (stream) it was posted on."""
        return self._ex.name

    def fields_of(self, peer: int) -> tuple[Field, ...]:
        """The fields this rank receives from ``peer``."""
        f = self._fields
        return f[peer] if isinstance(f, Mapping) else f

    def send_fields_of(self, peer: int) -> tuple[Field, ...]:
        """The fields this rank sends to ``peer``."""
        f = self._send_fields
        return f[peer] if isinstance(f, Mapping) else f

    def _post_payload_recv(self, peer: int, rows: int) -> None:
        bufs = tuple(f.empty(rows) for f in self.fields_of(peer))
        self.received[peer] = bufs
        if rows == 0:
            return
        engine, comm = self._ex.engine, self._ex.comm
        for b in bufs:
            self._waiting[peer] = self._waiting.get(peer, 0) + 1
            self._open += 1
            self._recv_parts.append((peer, b.nbytes))
            engine.add(comm.Irecv([_wire(b), MPI.BYTE], peer, self.tags[1]), self, 2 * len(self._recv_parts) - 1)

    def _part_done(self, part: int, status: MPI.Status) -> None:
        self._open -= 1
        if part >= 0:  # a receive: part = 2 * peer (count) or 2 * i + 1 (i-th payload receive posted)
            if part % 2 == 0:
                peer = part // 2
            else:
                peer, want = self._recv_parts[part // 2]
                got = status.Get_count(MPI.BYTE)
                if got != want:
                    raise WireMismatch(f"exchange {self._label()}: rank {self._ex.ranks[peer]} sent {got} bytes for "
                                       f"a field of {want}: the ranks disagree on the rows' format "
                                       f"{_format(self.fields_of(peer))[1]}")
            self._waiting[peer] -= 1
            if not self._waiting[peer]:
                del self._waiting[peer]
            if part % 2 == 0:
                rows, fmt = (int(v) for v in self._counts_in.pop(peer))
                want, text = _format(self.fields_of(peer))
                if fmt != want:
                    raise WireMismatch(f"exchange {self._label()}: rank {self._ex.ranks[peer]} sends rows in another "
                                       f"format than this rank expects ({text}): their precisions disagree")
                self._post_payload_recv(peer, rows)
        if self._open == 0:
            self.t_done = time.monotonic_ns()
            self._keep.clear()
            self._counts_out.clear()
            self._ex.engine.untrack(self)

    def wait(self, timeout: float | None = None) -> dict[int, tuple[torch.Tensor, ...]]:
        """Block (inside MPI, progressing everything on the engine) until done; returns ``received``."""
        self._ex.engine.wait(lambda: self.done, lambda: f"exchange {self._label()} waits for ranks "
                             f"{self._peers_open()}", timeout)
        return self.received

    def _peers_open(self) -> list[int]:
        return sorted(self._ex.ranks[p] for p in self._waiting)

    def _label(self) -> str:
        return " ".join([self._ex.name] + [f"{k}={v}" for k, v in self.labels.items()])

    def describe(self) -> dict:
        return {"op": "exchange", "name": self._ex.name, "comm": self._ex.comm_name, **self.labels,
                "state": "counts" if self._counts_in else "payload", "waiting_for": self._peers_open(),
                "sends_open": self._open - sum(self._waiting.values()),
                "age_s": round((time.monotonic_ns() - self.t_post) / 1e9, 3)}


class Exchange:
    """Variable-size exchanges over ``comm`` (duplicated: its tags never meet other traffic).

    ``ranks``: the world rank of each of ``comm``'s ranks, for reports (default: the translation
    of ``comm``'s group into ``MPI.COMM_WORLD``'s).
    """

    def __init__(self, comm: MPI.Comm, engine: Progress, *, name: str, comm_name: str = ""):
        self.comm = comm.Dup()
        self.rank = self.comm.Get_rank()
        self.engine = engine
        self.name = name
        self.comm_name = comm_name or name
        world = MPI.COMM_WORLD.Get_group()
        self.ranks = tuple(self.comm.Get_group().Translate_ranks(list(range(self.comm.Get_size())), world))
        self._seq = 0

    def start(self, sends: Mapping[int, Sequence[torch.Tensor]], recv_from: Sequence[int],
              fields: Fields, *, send_fields: Fields | None = None, recv_rows: Mapping[int, int] | None = None,
              **labels) -> ExchangeOp:
        """Post one exchange and return at once.

        sends: peer (this communicator's rank) -> its fields' tensors (``[rows, *row_shape]``,
            equal rows, contiguous); every peer that may receive from this rank must be a key
            (with zero rows when nothing goes) unless it passes ``recv_rows``.
        recv_from: the peers this rank receives from (itself included when it sends to itself).
        fields: what arrives from each ``recv_from`` peer (one list for all, or per peer).
        send_fields: what goes to each ``sends`` peer (one list for all, or per peer; default
            ``fields``); the peer must expect the same (its ``fields``), or :class:`WireMismatch`.
        recv_rows: rows per ``recv_from`` peer when known in advance: no counts round.
        labels: what the failure report shows (layer, mb, phase, ...).
        """
        op = ExchangeOp(self, fields, fields if send_fields is None else send_fields, labels, self._seq)
        self._seq += 1
        me, engine, comm = self.rank, self.engine, self.comm
        count_tag, data_tag = op.tags
        # receives first, so an early arrival lands in posted memory
        for peer in recv_from:
            if peer == me:
                continue
            if recv_rows is not None:
                op._post_payload_recv(peer, int(recv_rows[peer]))
            else:
                buf = np.empty(2, dtype=np.int64)  # rows, format fingerprint
                op._counts_in[peer] = buf
                op._waiting[peer] = op._waiting.get(peer, 0) + 1
                op._open += 1
                engine.add(comm.Irecv([buf, MPI.INT64_T], peer, count_tag), op, 2 * peer)
        for peer, tensors in sends.items():
            tensors = tuple(tensors)
            fields = op.send_fields_of(peer)
            if len(tensors) != len(fields):
                raise ValueError(f"exchange {self.name}: {len(tensors)} tensors for peer {peer}; expected one "
                                 f"per field {[f.name for f in fields]}")
            rows = tensors[0].shape[0]
            for f, t in zip(fields, tensors):
                if t.dtype != f.dtype or tuple(t.shape) != (rows, *f.row_shape) or not t.is_contiguous():
                    raise ValueError(f"exchange {self.name}: field {f.name} to peer {peer} is {t.dtype} "
                                     f"{tuple(t.shape)}; expected contiguous {f.dtype} [{rows}, {f.row_shape}]")
            if peer == me:
                if op.fields_of(me) != fields:
                    raise WireMismatch(f"exchange {self.name}: rank {me} sends itself {_format(fields)[1]} but "
                                       f"expects {_format(op.fields_of(me))[1]}")
                op.received[me] = tensors
                continue
            if recv_rows is None:
                cnt = np.array([rows, _format(fields)[0]], dtype=np.int64)
                op._counts_out.append(cnt)
                op._open += 1
                engine.add(comm.Isend([cnt, MPI.INT64_T], peer, count_tag), op, -1)
            op.sent_bytes[peer] = [t.nbytes for t in tensors]
            if rows:
                for t in tensors:
                    op._keep.append(t)
                    op._open += 1
                    engine.add(comm.Isend([_wire(t), MPI.BYTE], peer, data_tag), op, -1)
        if me in recv_from and me not in op.received:
            raise ValueError(f"exchange {self.name}: rank {me} receives from itself but sends itself nothing")
        if op._open:
            engine.track(op)
        else:
            op.t_done = op.t_post
        return op

    def close(self) -> None:
        """Free the duplicated communicator (collective; no exchange may be open)."""
        self.comm.Free()


def wait_any(ops: Sequence[ExchangeOp], timeout: float | None = None) -> int:
    """Block (inside MPI) until one of ``ops`` (all on one engine) is done; returns the index of the
    first one done."""
    engine = ops[0]._ex.engine
    engine.wait(lambda: any(op.done for op in ops),
                lambda: "exchanges " + "; ".join(f"{op._label()} waits for ranks {op._peers_open()}" for op in ops),
                timeout)
    return next(i for i, op in enumerate(ops) if op.done)
