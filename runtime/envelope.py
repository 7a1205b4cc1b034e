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
from typing import NoReturn

import msgpack
import numpy as np
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
_NUMPY_NATIVE = frozenset({torch.float32, torch.float64, torch.float16, torch.int8, torch.uint8, torch.int16,
                           torch.int32, torch.int64, torch.bool})
_KIND_CODE = {k: i for i, k in enumerate(KINDS)}
_NUM_KINDS, _NUM_DTYPES = len(KINDS), len(DTYPES)
_LEN = struct.Struct("<H")
_packer = msgpack.Packer(use_bin_type=True)


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


class Header:
    """What a message says about itself. A plain slots class: it is built twice per message on
    the latency-critical path, where a frozen dataclass's ``__init__`` costs several microseconds.

    Fields: ``kind`` (one of :data:`KINDS`), ``src``/``dst`` (ranks in the communicator),
    ``channel`` (logical stream; messages on one channel arrive in send order), ``dtype`` and
    ``shape`` of the payload, ``seq`` (per-(src, dst, channel) sequence number 0, 1, 2, ...; a gap
    means a lost or crossed message), ``mb`` (microbatch id, -1: none), ``chunk`` (model chunk on
    the rank), ``dir`` (pipeline direction: 0 first rank -> last, 1 last -> first), and the derived
    ``nbytes``.
    """

    __slots__ = ("kind", "src", "dst", "channel", "dtype", "shape", "seq", "mb", "chunk", "dir", "nbytes")

    def __init__(self, *, kind: str, src: int, dst: int, channel: int, dtype: torch.dtype,
                 shape: tuple[int, ...], seq: int, mb: int = -1, chunk: int = 0, dir: int = 0):
        size = _ITEMSIZE.get(dtype)
        if size is None:
            dtype_code(dtype)  # raises, naming the dtype and the supported ones
        # one assignment per slot: tuple-packed assignments cost ~0.3 us more per header
        self.kind = kind
        self.src = src
        self.dst = dst
        self.channel = channel
        self.dtype = dtype
        self.shape = shape
        self.seq = seq
        self.mb = mb
        self.chunk = chunk
        self.dir = dir
        self.nbytes = math.prod(shape) * size

    @property
    def inline(self) -> bool:
        return self.nbytes <= INLINE_MAX

    def _key(self) -> tuple:
        return tuple(getattr(self, f) for f in self.__slots__)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Header) and self._key() == other._key()

    def __repr__(self) -> str:
        return "Header(" + ", ".join(f"{f}={getattr(self, f)!r}" for f in self.__slots__) + ")"


_ITEMSIZE = {dt: torch.empty((), dtype=dt).element_size() for dt in DTYPES}


def itemsize(dtype: torch.dtype) -> int:
    """Bytes per element of a dtype the format carries."""
    return _ITEMSIZE[dtype]


def tensor_bytes(t: torch.Tensor) -> np.ndarray:
    """The tensor's bytes as a flat uint8 numpy array sharing its memory (copies only if the
    tensor is not contiguous). Works for every dtype in :data:`DTYPES`, including bfloat16 and
    float8 that neither numpy nor MPI has a type for.
    """
    if not t.is_contiguous():
        t = t.contiguous()
    if t.dtype in _NUMPY_NATIVE:  # the cheaper route on the hot path: no torch view op
        return t.numpy().reshape(-1).view(np.uint8)
    return t.reshape(-1).view(torch.uint8).numpy()


def pack_header(h: Header, payload=None) -> bytes:
    """Encode ``h`` into a header message; appends ``payload`` when inline.

    ``payload`` is the tensor's bytes as any flat buffer: :func:`tensor_bytes`, or an mpi4py buffer.
    """
    body = _packer.pack([VERSION, _KIND_CODE[h.kind], h.src, h.dst, h.channel, h.mb, h.chunk, h.dir,
                         _DTYPE_CODE[h.dtype], h.shape, h.seq, h.nbytes])
    if len(body) > HEADER_MAX:
        raise ValueError(f"header of {len(body)} bytes exceeds HEADER_MAX={HEADER_MAX}: shape {h.shape} has too many dims")
    if h.inline:
        raw = b"" if payload is None else bytes(payload)
        if len(raw) != h.nbytes:
            raise ValueError(f"inline payload has {len(raw)} bytes, header says {h.nbytes}")
        return b"".join((_LEN.pack(len(body)), body, raw))
    return _LEN.pack(len(body)) + body


def unpack_header(buf: memoryview | bytes | np.ndarray, count: int, *, src: int, tag: int) -> tuple[Header, memoryview]:
    """Decode a received header message of ``count`` bytes.

    Returns the header and the inline payload bytes (empty for a separate payload). Raises
    :class:`EnvelopeError` naming the sender, tag and offending field for anything malformed.
    """
    if count < _LEN.size:
        raise EnvelopeError(f"message from rank {src} tag {tag}: truncated, {count} bytes is shorter than the length prefix")
    (hlen,) = _LEN.unpack_from(buf, 0)
    end = _LEN.size + hlen
    if end > count:
        raise EnvelopeError(f"message from rank {src} tag {tag}: truncated header, length prefix says {hlen} bytes, "
                            f"{count - _LEN.size} present")
    try:
        fields = msgpack.unpackb(buf[_LEN.size : end])
    except Exception as exc:  # msgpack raises several unrelated types for garbage input
        raise EnvelopeError(f"message from rank {src} tag {tag}: header is not valid msgpack "
                            f"({type(exc).__name__}: {exc})") from None
    # One cheap combined test on the hot path; _explain re-runs the checks one by one to name the field.
    if type(fields) is not list or len(fields) != 12:
        _explain(fields, src, tag)
    version, kind, hsrc, hdst, channel, mb, chunk, direction, dt, shape, seq, nbytes = fields
    if not (type(version) is type(kind) is type(hsrc) is type(hdst) is type(channel) is type(mb) is type(chunk)
            is type(direction) is type(dt) is type(seq) is type(nbytes) is int and type(shape) is list
            and version == VERSION and 0 <= kind < _NUM_KINDS and 0 <= dt < _NUM_DTYPES and hsrc == src):
        _explain(fields, src, tag)
    for d in shape:
        if type(d) is not int or d < 0:
            _explain(fields, src, tag)
    h = Header(kind=KINDS[kind], src=hsrc, dst=hdst, channel=channel, dtype=DTYPES[dt], shape=tuple(shape),
               seq=seq, mb=mb, chunk=chunk, dir=direction)
    if h.nbytes != nbytes:
        raise EnvelopeError(f"message from rank {src} tag {tag}: field 'nbytes' is {nbytes} but shape {h.shape} x "
                            f"{h.dtype} is {h.nbytes} bytes")
    inline = memoryview(buf)[end:count]
    if len(inline) != (nbytes if nbytes <= INLINE_MAX else 0):
        if nbytes <= INLINE_MAX:
            raise EnvelopeError(f"message from rank {src} tag {tag}: payload size {len(inline)} bytes disagrees "
                                f"with field 'nbytes'={nbytes}")
        raise EnvelopeError(f"message from rank {src} tag {tag}: {len(inline)} stray bytes after a header whose "
                            f"payload travels separately")
    return h, inline


_INT_FIELDS = ("version", "kind", "src", "dst", "channel", "mb", "chunk", "dir", "dtype", None, "seq", "nbytes")


def _explain(fields: object, src: int, tag: int) -> NoReturn:
    """Raise the EnvelopeError naming the first header field that :func:`unpack_header`'s combined check rejected."""
    where = f"message from rank {src} tag {tag}"
    if type(fields) is not list or len(fields) != 12:
        raise EnvelopeError(f"{where}: header must be a 12-field array, got {type(fields).__name__} {fields!r:.80}")
    for name, value in zip(_INT_FIELDS, fields):
        if name is not None and type(value) is not int:
            raise EnvelopeError(f"{where}: field {name!r} must be an integer, got {value!r:.40}")
    version, kind, hsrc, _, _, _, _, _, dt, shape, _, _ = fields
    if version != VERSION:
        raise EnvelopeError(f"{where}: field 'version' is {version!r}, this runtime speaks version {VERSION}")
    if not 0 <= kind < len(KINDS):
        raise EnvelopeError(f"{where}: field 'kind' code {kind} is unknown")
    if not 0 <= dt < len(DTYPES):
        raise EnvelopeError(f"{where}: field 'dtype' code {dt} is unknown")
    if hsrc != src:
        raise EnvelopeError(f"{where}: field 'src' says rank {hsrc}")
    raise EnvelopeError(f"{where}: field 'shape' must be a list of non-negative integers, got {shape!r:.80}")
