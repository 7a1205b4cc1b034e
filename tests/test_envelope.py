"""Envelope: round trip for every dtype and layout; corrupt and truncated headers are rejected."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from runtime.envelope import (DTYPES, HEADER, HEADER_SIZE, INLINE_MAX, MAGIC, MAX_NDIM, VERSION, EnvelopeError,
                              Header, pack_header_into, tensor_bytes, unpack_header)


def _tensors(dtype: torch.dtype) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(hash(str(dtype)) % 1000)
    base = torch.randn(6, 10, generator=g) * 20
    t = (base > 0) if dtype == torch.bool else base.to(dtype) if dtype.is_floating_point else base.abs().to(dtype)
    big = torch.arange(INLINE_MAX + 8).to(dtype)
    return [t, t.t(), t[:0], t[2, 3], t[:, ::3], big, t.reshape(1, 2, 1, 3, 1, 5, 1, 2)]


def _roundtrip(t: torch.Tensor) -> tuple[Header, torch.Tensor]:
    payload = tensor_bytes(t)
    buf = np.zeros(HEADER_SIZE + INLINE_MAX + 100, np.uint8)  # receive buffers are larger than the message
    n, nbytes = pack_header_into(buf, kind="act", src=3, dst=1, channel=9, seq=17, key=(5, 1, -1), dtype=t.dtype,
                                 shape=tuple(t.shape), payload=payload)
    assert nbytes == payload.nbytes and n == HEADER_SIZE + (nbytes if nbytes <= INLINE_MAX else 0)
    got, inline = unpack_header(buf, n, src=3, tag=18)
    out = torch.empty(got.shape, dtype=got.dtype)
    # the separate payload message is the tensor's raw bytes: emulate it with the sender's bytes
    tensor_bytes(out)[:] = np.frombuffer(bytes(inline), np.uint8) if got.inline else payload
    return got, out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_round_trip_every_dtype_and_layout(dtype):
    for t in _tensors(dtype):
        h, out = _roundtrip(t)
        assert (h.kind, h.src, h.dst, h.channel, h.seq, h.key) == ("act", 3, 1, 9, 17, (5, 1, -1))
        assert h.dtype == dtype and out.shape == t.shape
        assert np.array_equal(tensor_bytes(out), tensor_bytes(t.contiguous()))
        assert h.inline == (t.numel() * t.element_size() <= INLINE_MAX)


def test_float8_bit_patterns_survive():
    raw = torch.arange(256, dtype=torch.uint8)  # every e4m3 / e5m2 pattern, NaNs included
    for dt in (torch.float8_e4m3fn, torch.float8_e5m2):
        _, out = _roundtrip(raw.view(dt))
        assert torch.equal(out.view(torch.uint8), raw)


def _msg(extra: bytes = b"", **over) -> bytes:
    """A header written field by field with ``struct`` (not through pack_header_into), ``over``
    replacing fields; default: float32 [2] = 8 bytes inline."""
    f = {"magic": MAGIC, "version": VERSION, "kind": 1, "dtype": 0, "ndim": 1, "channel": 9, "src": 3, "dst": 1,
         "seq": 17, "key": (5, 1, 0), "nbytes": 8, "shape": (2,)}
    f.update(over)
    shape = tuple(f["shape"]) + (0,) * (MAX_NDIM - len(f["shape"]))
    return HEADER.pack(f["magic"], f["version"], f["kind"], f["dtype"], f["ndim"], f["channel"], f["src"], f["dst"],
                       f["seq"], *f["key"], f["nbytes"], *shape) + extra


P8 = b"\0" * 8


@pytest.mark.parametrize(
    "msg, field",
    [
        (b"\x48", "truncated header, 1 bytes"),
        (_msg(P8)[: HEADER_SIZE - 1], "truncated header"),
        (b"\xc1" * HEADER_SIZE + P8, "'magic'"),
        (_msg(P8, version=1), "'version'"),
        (_msg(P8, kind=99), "'kind'"),
        (_msg(P8, dtype=77), "'dtype'"),
        (_msg(P8, ndim=MAX_NDIM + 1), "'ndim'"),
        (_msg(P8, src=4), "'src'"),
        (_msg(P8, shape=(-1,)), "'shape'"),
        (_msg(P8, shape=(2, 7)), "'shape'"),  # a dim beyond ndim must be zero
        (_msg(P8, nbytes=12), "'nbytes'"),
        (_msg(b"\0" * 5), "payload size 5"),
        (_msg(b"\0" * 3, shape=(4097,), nbytes=16388), "3 stray bytes"),
    ],
)
def test_corrupt_headers_rejected_naming_sender_tag_and_field(msg, field):
    with pytest.raises(EnvelopeError) as err:
        unpack_header(msg, len(msg), src=3, tag=18)
    assert "rank 3" in str(err.value) and "tag 18" in str(err.value)
    assert field in str(err.value)


def test_good_message_decodes():
    msg = _msg(b"\1" * 8)
    h, inline = unpack_header(msg, len(msg), src=3, tag=18)
    assert h.shape == (2,) and h.dtype == torch.float32 and bytes(inline) == b"\1" * 8 and h.key == (5, 1, 0)


def test_unsupported_dtype_named():
    with pytest.raises(ValueError, match="complex64"):
        _roundtrip(torch.zeros(2, dtype=torch.complex64))


def test_too_many_dims_refused_at_send():
    with pytest.raises(ValueError, match="MAX_NDIM"):
        _roundtrip(torch.zeros((1,) * (MAX_NDIM + 1)))
