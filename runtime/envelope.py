"""The wire format: a small msgpack header followed by the tensor's raw bytes.

A message on channel ``c`` between two ranks is one or two MPI messages:

* the *header message* on tag ``2c``: ``[u16 header length][msgpack header][inline payload]``;
* for payloads larger than :data:`INLINE_MAX` bytes, a *payload message* on tag ``2c + 1`` that
  holds the tensor's contiguous bytes, received straight into the destination tensor.

Small payloads ride inside the header message so that a latency-bound message costs one MPI
message, not two. Whether a payload is inline depends only on its size, so a receiver that knows
the shape in advance knows which form will arrive. Tensors are never pickled: the header carries
dtype and shape, the payload is the tensor's memory.

Header fields (a msgpack array, in this order; see ``docs/runtime.md``):
``version, kind, src, dst, channel, mb, chunk, dir, dtype, shape, seq, nbytes``.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import msgpack
import torch

__all__ = [
    "VERSION",
    "INLINE_MAX",
    "HEADER_MAX",
    "KINDS",
    "DTYPES",
    "Header",
    "EnvelopeError",
    "pack_header",
    "unpack_header",
    "tensor_bytes",
    "dtype_code",
    "itemsize",
]

VERSION = 1
"""Wire-format version; a receiver rejects any other."""

INLINE_MAX = 16 * 1024
"""Payloads up to this many bytes travel inside the header message."""

HEADER_MAX = 1024
"""Upper bound of the encoded header itself (a shape of up to ~60 dims fits)."""

KINDS = ("data", "act", "grad", "ctrl", "error")
"""Message kinds: generic data, pipeline activation, pipeline gradient, control, error report."""

# Index in this tuple is the dtype's wire code. Append only: codes are part of the format.
DTYPES: tuple[torch.dtype, ...] = (
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
    torch.int8,
    torch.uint8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.bool,
)
_DTYPE_CODE = {dt: i for i, dt in enumerate(DTYPES)}
_LEN = struct.Struct("<H")


class EnvelopeError(ValueError):
    """A message that cannot be decoded or does not match what was expected."""


def dtype_code(dtype: torch.dtype) -> int:
    """Wire code of ``dtype``; ValueError for a dtype the format does not carry."""
    try:
        return _DTYPE_CODE[dtype]
    except KeyError:
        raise ValueError(
            f"dtype {dtype} cannot be sent: supported dtypes are {[str(d) for d in DTYPES]}"
        ) from None


@dataclass(slots=True, frozen=True)
class Header:
    """What a message says about itself."""

    kind: str
    """One of :data:`KINDS`."""
    src: int
    """Sending rank in the communicator."""
    dst: int
    """Receiving rank in the communicator."""
    channel: int
    """Logical stream between the two ranks; messages on one channel arrive in send order."""
    dtype: torch.dtype
    """Payload element type."""
    shape: tuple[int, ...]
    """Payload shape."""
    seq: int
    """Per-(src, dst, channel) sequence number, 0, 1, 2, ...; a gap means a lost or crossed message."""
    mb: int = -1
    """Microbatch id (-1: none)."""
    chunk: int = 0
    """Model chunk on the rank that the message belongs to."""
    dir: int = 0
    """Pipeline direction: 0 first rank -> last, 1 last -> first."""

    def __post_init__(self) -> None:
        dtype_code(self.dtype)  # refuse a dtype the format cannot carry, naming it

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _ITEMSIZE[self.dtype]

    @property
    def inline(self) -> bool:
        return self.nbytes <= INLINE_MAX


_ITEMSIZE = {dt: torch.empty((), dtype=dt).element_size() for dt in DTYPES}


def itemsize(dtype: torch.dtype) -> int:
    """Bytes per element of a dtype the format carries."""
    return _ITEMSIZE[dtype]


def tensor_bytes(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as a flat uint8 tensor sharing memory (copies only if non-contiguous).

    Works for every dtype in :data:`DTYPES`, including bfloat16 and float8 that have no MPI type.
    """
    if not t.is_contiguous():
        t = t.contiguous()
    flat = t.reshape(-1)
    return flat.view(torch.uint8) if flat.dtype != torch.uint8 else flat


def pack_header(h: Header, payload: torch.Tensor | None = None) -> bytes:
    """Encode ``h`` into a header message; appends ``payload`` (uint8) when the payload is inline."""
    body = msgpack.packb(
        [VERSION, KINDS.index(h.kind), h.src, h.dst, h.channel, h.mb, h.chunk, h.dir,
         dtype_code(h.dtype), list(h.shape), h.seq, h.nbytes],
        use_bin_type=True,
    )
    if len(body) > HEADER_MAX:
        raise ValueError(f"header of {len(body)} bytes exceeds HEADER_MAX={HEADER_MAX}: shape {h.shape} has too many dims")
    if h.inline:
        raw = b"" if payload is None or payload.numel() == 0 else payload.numpy().tobytes()
        if len(raw) != h.nbytes:
            raise ValueError(f"inline payload has {len(raw)} bytes, header says {h.nbytes}")
        return _LEN.pack(len(body)) + body + raw
    return _LEN.pack(len(body)) + body


def unpack_header(buf: memoryview | bytes, count: int, *, src: int, tag: int) -> tuple[Header, memoryview]:
    """Decode a received header message of ``count`` bytes.

    Returns the header and the inline payload bytes (empty for a separate payload). Raises
    :class:`EnvelopeError` naming the sender, tag and offending field for anything malformed.
    """
    where = f"message from rank {src} tag {tag}"
    mv = memoryview(buf)[:count]
    if count < _LEN.size:
        raise EnvelopeError(f"{where}: truncated, {count} bytes is shorter than the length prefix")
    (hlen,) = _LEN.unpack_from(mv, 0)
    if hlen > count - _LEN.size:
        raise EnvelopeError(f"{where}: truncated header, length prefix says {hlen} bytes, {count - _LEN.size} present")
    try:
        fields = msgpack.unpackb(mv[_LEN.size : _LEN.size + hlen], use_list=True, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types for garbage input
        raise EnvelopeError(f"{where}: header is not valid msgpack ({type(exc).__name__}: {exc})") from None
    if not isinstance(fields, list) or len(fields) != 12:
        raise EnvelopeError(f"{where}: header must be a 12-field array, got {type(fields).__name__} {fields!r:.80}")
    version, kind, hsrc, hdst, channel, mb, chunk, direction, dt, shape, seq, nbytes = fields
    if version != VERSION:
        raise EnvelopeError(f"{where}: field 'version' is {version!r}, this runtime speaks version {VERSION}")
    for name, value in (("kind", kind), ("src", hsrc), ("dst", hdst), ("channel", channel), ("mb", mb),
                        ("chunk", chunk), ("dir", direction), ("dtype", dt), ("seq", seq), ("nbytes", nbytes)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise EnvelopeError(f"{where}: field {name!r} must be an integer, got {value!r:.40}")
    if not 0 <= kind < len(KINDS):
        raise EnvelopeError(f"{where}: field 'kind' code {kind} is unknown")
    if not 0 <= dt < len(DTYPES):
        raise EnvelopeError(f"{where}: field 'dtype' code {dt} is unknown")
    if hsrc != src:
        raise EnvelopeError(f"{where}: field 'src' says rank {hsrc}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise EnvelopeError(f"{where}: field 'shape' must be a list of non-negative integers, got {shape!r:.80}")
    h = Header(kind=KINDS[kind], src=hsrc, dst=hdst, channel=channel, dtype=DTYPES[dt], shape=tuple(shape),
               seq=seq, mb=mb, chunk=chunk, dir=direction)
    if h.nbytes != nbytes:
        raise EnvelopeError(f"{where}: field 'nbytes' is {nbytes} but shape {h.shape} x {h.dtype} is {h.nbytes} bytes")
    inline = mv[_LEN.size + hlen :]
    if h.inline and len(inline) != nbytes:
        raise EnvelopeError(f"{where}: payload size {len(inline)} bytes disagrees with field 'nbytes'={nbytes}")
    if not h.inline and len(inline):
        raise EnvelopeError(f"{where}: {len(inline)} stray bytes after a header whose payload travels separately")
    return h, inline
