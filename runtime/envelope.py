"""The wire format of dynamic messages: a fixed-layout binary header followed by the tensor's raw bytes.

A message on channel ``c`` between two ranks is one or two MPI messages:

* the *header message* on tag ``2c``: ``[header, HEADER_SIZE bytes][inline payload]``;
* for payloads larger than :data:`INLINE_MAX` bytes, a *payload message* on tag ``2c + 1`` that
  holds the tensor's contiguous bytes, received straight into the destination tensor.

Small payloads ride inside the header message so that a latency-bound message costs one MPI
message, not two. Whether a payload is inline depends only on its size, so a receiver that knows
the shape in advance knows which form will arrive. Tensors are never pickled: the header carries
dtype and shape, the payload is the tensor's memory.

The header is one little-endian C struct (:data:`HEADER`), written with one ``pack_into`` into a
buffer the sender reuses and read with one ``unpack_from``: a self-describing encoding (msgpack)
cost ~20 us per message in Python, most of a small message's time. Its vocabulary is the
transport's, not any one user's: a ``channel`` (stream id), a per-stream ``seq``, a ``kind`` code
and a ``key`` of :data:`KEY_LEN` integers whose meaning the sender and receiver agree on (the
pipeline puts microbatch, chunk and direction there). Fields, in order (see ``docs/runtime.md``):
``magic, version, kind, dtype, ndim, channel, src, dst, seq, key[3], nbytes, shape[MAX_NDIM]``.
"""

from __future__ import annotations

import math
import struct
from operator import itemgetter
from typing import NoReturn

import numpy as np
import torch

__all__ = [
    "VERSION",
    "MAGIC",
    "INLINE_MAX",
    "HEADER",
    "HEADER_SIZE",
    "MAX_NDIM",
    "KEY_LEN",
    "KINDS",
    "DTYPES",
    "Header",
    "EnvelopeError",
    "pack_header_into",
    "unpack_header",
    "tensor_bytes",
    "dtype_code",
    "itemsize",
]

VERSION = 2
"""Wire-format version; a receiver rejects any other (1 was the msgpack header)."""

MAGIC = 0x5048
"""First two bytes of every header ('HP'): a message that is not a header is named as such."""

INLINE_MAX = 16 * 1024
"""Payloads up to this many bytes travel inside the header message."""

MAX_NDIM = 8
"""Most dims a dynamic message's tensor may have (unused shape slots travel as zeros)."""

KEY_LEN = 3
"""Integers in a header's ``key`` (int32 each)."""

HEADER = struct.Struct(f"<HBBBBHiiQ{KEY_LEN}iq{MAX_NDIM}q")
"""magic, version, kind, dtype, ndim, channel, src, dst, seq, key[KEY_LEN], nbytes, shape[MAX_NDIM]."""
HEADER_SIZE = HEADER.size

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
_ITEMSIZE = {dt: torch.empty((), dtype=dt).element_size() for dt in DTYPES}
_ITEMSIZE_BY_CODE = tuple(_ITEMSIZE[dt] for dt in DTYPES)
_PAD = tuple((0,) * (MAX_NDIM - n) for n in range(MAX_NDIM + 1))  # unused shape slots, by ndim
_NUM_KINDS, _NUM_DTYPES = len(KINDS), len(DTYPES)
_KEY_END = 9 + KEY_LEN  # index of nbytes in the unpacked tuple; shape follows


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


def itemsize(dtype: torch.dtype) -> int:
    """Bytes per element of a dtype the format carries."""
    return _ITEMSIZE[dtype]


class Header(tuple):
    """What a received message says about itself (made by :func:`unpack_header`): the tuple of
    :data:`HEADER`'s fields in wire order, read through properties, so that decoding builds no
    object field by field (a slots class cost ~2 us per message to build here).

    Fields: ``kind`` (one of :data:`KINDS`), ``src``/``dst`` (ranks in the communicator),
    ``channel`` (logical stream; messages on one channel arrive in send order), ``seq``
    (per-(src, dst, channel) sequence number 0, 1, 2, ...; a gap means a lost or crossed message),
    ``key`` (:data:`KEY_LEN` ints the two ends agree on), ``dtype`` and ``shape`` of the payload,
    and the derived ``nbytes``.
    """

    __slots__ = ()

    channel = property(itemgetter(5))
    src = property(itemgetter(6))
    dst = property(itemgetter(7))
    seq = property(itemgetter(8))
    nbytes = property(itemgetter(_KEY_END))
    key = property(itemgetter(slice(9, _KEY_END)))

    @property
    def kind(self) -> str:
        return KINDS[self[2]]

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self[3]]

    @property
    def shape(self) -> tuple[int, ...]:
        return self[_KEY_END + 1 : _KEY_END + 1 + self[4]]

    @property
    def inline(self) -> bool:
        return self[_KEY_END] <= INLINE_MAX

    def __repr__(self) -> str:
        return (f"Header(kind={self.kind!r}, src={self.src}, dst={self.dst}, channel={self.channel}, seq={self.seq}, "
                f"key={self.key}, dtype={self.dtype}, shape={self.shape}, nbytes={self.nbytes})")


def pack_header_into(buf, *, kind: str, src: int, dst: int, channel: int, seq: int, key: tuple[int, ...],
                     dtype: torch.dtype, shape: tuple[int, ...], payload=None) -> tuple[int, int]:
    """Encode a header at the start of writable ``buf`` (one ``pack_into``, nothing built per
    field), then ``payload`` when inline; returns the message's length and the payload's nbytes.

    ``payload`` is the tensor's bytes as a flat byte buffer (:func:`tensor_bytes`, an mpi4py buffer);
    ``buf`` must hold ``HEADER_SIZE`` bytes, plus ``nbytes`` for an inline payload.
    """
    dt = _DTYPE_CODE.get(dtype)
    if dt is None:
        dtype_code(dtype)  # raises, naming the dtype and the supported ones
    kc = _KIND_CODE.get(kind)
    if kc is None:
        raise ValueError(f"kind={kind!r}: must be one of {KINDS}")
    ndim = len(shape)
    if ndim > MAX_NDIM:
        raise ValueError(f"shape {shape} has {ndim} dims: a message carries at most MAX_NDIM={MAX_NDIM} "
                         f"(reshape before sending)")
    if len(key) != KEY_LEN:
        raise ValueError(f"key {key}: must be {KEY_LEN} integers")
    nbytes = math.prod(shape) * _ITEMSIZE_BY_CODE[dt]
    HEADER.pack_into(buf, 0, MAGIC, VERSION, kc, dt, ndim, channel, src, dst, seq, *key, nbytes, *shape, *_PAD[ndim])
    if nbytes > INLINE_MAX:
        return HEADER_SIZE, nbytes
    end = HEADER_SIZE + nbytes
    if nbytes:
        if len(payload) != nbytes:
            raise ValueError(f"inline payload has {len(payload)} bytes, header says {nbytes}")
        memoryview(buf)[HEADER_SIZE:end] = payload
    return end, nbytes


def unpack_header(buf, count: int, *, src: int, tag: int) -> tuple[Header, memoryview]:
    """Decode a received header message of ``count`` bytes.

    Returns the header and the inline payload bytes (empty for a separate payload). Raises
    :class:`EnvelopeError` naming the sender, tag and offending field for anything malformed.
    """
    if count < HEADER_SIZE:
        raise EnvelopeError(f"message from rank {src} tag {tag}: truncated header, {count} bytes where a header "
                            f"has {HEADER_SIZE}")
    f = HEADER.unpack_from(buf, 0)
    magic, version, kind, dt, ndim, _, hsrc = f[:7]
    # One combined test on the hot path; _explain re-runs the checks one by one to name the field.
    if not (magic == MAGIC and version == VERSION and kind < _NUM_KINDS and dt < _NUM_DTYPES and ndim <= MAX_NDIM
            and hsrc == src):
        _explain(f, src, tag)
    shape = f[_KEY_END + 1 : _KEY_END + 1 + ndim]
    if (ndim and min(shape) < 0) or (ndim < MAX_NDIM and any(f[_KEY_END + 1 + ndim :])):
        _explain(f, src, tag)
    nbytes = f[_KEY_END]
    size = math.prod(shape) * _ITEMSIZE_BY_CODE[dt]
    if size != nbytes:
        raise EnvelopeError(f"message from rank {src} tag {tag}: field 'nbytes' is {nbytes} but shape {shape} x "
                            f"{DTYPES[dt]} is {size} bytes")
    if count - HEADER_SIZE != (nbytes if nbytes <= INLINE_MAX else 0):
        if nbytes <= INLINE_MAX:
            raise EnvelopeError(f"message from rank {src} tag {tag}: payload size {count - HEADER_SIZE} bytes "
                                f"disagrees with field 'nbytes'={nbytes}")
        raise EnvelopeError(f"message from rank {src} tag {tag}: {count - HEADER_SIZE} stray bytes after a header "
                            f"whose payload travels separately")
    return tuple.__new__(Header, f), memoryview(buf)[HEADER_SIZE:count]


def _explain(f: tuple, src: int, tag: int) -> NoReturn:
    """Raise the EnvelopeError naming the first header field that :func:`unpack_header`'s combined check rejected."""
    where = f"message from rank {src} tag {tag}"
    magic, version, kind, dt, ndim, _, hsrc = f[:7]
    if magic != MAGIC:
        raise EnvelopeError(f"{where}: field 'magic' is {magic:#06x}, expected {MAGIC:#06x} (not a message header)")
    if version != VERSION:
        raise EnvelopeError(f"{where}: field 'version' is {version!r}, this runtime speaks version {VERSION}")
    if kind >= _NUM_KINDS:
        raise EnvelopeError(f"{where}: field 'kind' code {kind} is unknown")
    if dt >= _NUM_DTYPES:
        raise EnvelopeError(f"{where}: field 'dtype' code {dt} is unknown")
    if ndim > MAX_NDIM:
        raise EnvelopeError(f"{where}: field 'ndim' is {ndim}, at most {MAX_NDIM}")
    if hsrc != src:
        raise EnvelopeError(f"{where}: field 'src' says rank {hsrc}")
    dims = f[_KEY_END + 1 :]
    raise EnvelopeError(f"{where}: field 'shape' must be {ndim} non-negative sizes followed by zeros, got "
                        f"{list(dims)}")


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
