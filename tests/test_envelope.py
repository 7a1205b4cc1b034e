"""Envelope: round trip for every dtype and layout; corrupt and truncated headers are rejected."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
import torch

from runtime.envelope import DTYPES, INLINE_MAX, EnvelopeError, Header, pack_header, tensor_bytes, unpack_header


def _tensors(dtype: torch.dtype) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(hash(str(dtype)) % 1000)
    base = torch.randn(6, 10, generator=g) * 20
    t = (base > 0) if dtype == torch.bool else base.to(dtype) if dtype.is_floating_point else base.abs().to(dtype)
    big = torch.arange(INLINE_MAX + 8).to(dtype)
    return [t, t.t(), t[:0], t[2, 3], t[:, ::3], big]


def _roundtrip(t: torch.Tensor) -> tuple[Header, torch.Tensor]:
    h = Header(kind="act", src=3, dst=1, channel=9, dtype=t.dtype, shape=tuple(t.shape), seq=17, mb=5, chunk=1, dir=1)
    payload = tensor_bytes(t)
    msg = pack_header(h, payload if h.inline else None)
    buf = np.zeros(len(msg) + 100, np.uint8)  # receive buffers are larger than the message
    buf[: len(msg)] = np.frombuffer(msg, np.uint8)
    got, inline = unpack_header(buf, len(msg), src=3, tag=18)
    out = torch.empty(got.shape, dtype=got.dtype)
    # the separate payload message is the tensor's raw bytes: emulate it with the sender's bytes
    tensor_bytes(out)[:] = np.frombuffer(bytes(inline), np.uint8) if got.inline else payload
    return got, out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_round_trip_every_dtype_and_layout(dtype):
    for t in _tensors(dtype):
        h, out = _roundtrip(t)
        assert (h.kind, h.src, h.dst, h.channel, h.seq, h.mb, h.chunk, h.dir) == ("act", 3, 1, 9, 17, 5, 1, 1)
        assert h.dtype == dtype and out.shape == t.shape
        assert np.array_equal(tensor_bytes(out), tensor_bytes(t.contiguous()))
        assert h.inline == (t.numel() * t.element_size() <= INLINE_MAX)


def test_float8_bit_patterns_survive():
    raw = torch.arange(256, dtype=torch.uint8)  # every e4m3 / e5m2 pattern, NaNs included
    for dt in (torch.float8_e4m3fn, torch.float8_e5m2):
        _, out = _roundtrip(raw.view(dt))
        assert torch.equal(out.view(torch.uint8), raw)


def _msg(fields: list, extra: bytes = b"") -> bytes:
    body = msgpack.packb(fields)
    return len(body).to_bytes(2, "little") + body + extra


GOOD = [1, 1, 3, 1, 9, 5, 1, 1, 0, [2], 17, 8]  # float32 [2] = 8 bytes inline


@pytest.mark.parametrize(
    "msg, field",
    [
        (b"\x05", "truncated"),
        (b"\x40\x00abc", "truncated header"),
        ((3).to_bytes(2, "little") + b"\xc1\xc1\xc1", "msgpack"),
        (_msg([1, 2, 3]), "12-field"),
        (_msg([2] + GOOD[1:], b"\0" * 8), "'version'"),
        (_msg(GOOD[:1] + [99] + GOOD[2:], b"\0" * 8), "'kind'"),
        (_msg(GOOD[:8] + [77] + GOOD[9:], b"\0" * 8), "'dtype'"),
        (_msg(GOOD[:2] + [4] + GOOD[3:], b"\0" * 8), "'src'"),
        (_msg(GOOD[:9] + [[-1]] + GOOD[10:], b"\0" * 8), "'shape'"),
        (_msg(GOOD[:11] + [12], b"\0" * 8), "'nbytes'"),
        (_msg(GOOD, b"\0" * 5), "payload size 5"),
        (_msg(GOOD[:5] + ["x"] + GOOD[6:], b"\0" * 8), "'mb'"),
        (_msg(GOOD[:1] + [True] + GOOD[2:], b"\0" * 8), "'kind'"),  # msgpack bools are not ints here
        (_msg(GOOD[:9] + [2] + GOOD[10:], b"\0" * 8), "'shape'"),
        (_msg(GOOD[:9] + [[4097]] + GOOD[10:11] + [16388], b"\0" * 3), "3 stray bytes"),
        (_msg(GOOD[:11] + [8.0], b"\0" * 8), "'nbytes'"),
    ],
)
def test_corrupt_headers_rejected_naming_sender_tag_and_field(msg, field):
    with pytest.raises(EnvelopeError) as err:
        unpack_header(msg, len(msg), src=3, tag=18)
    assert "rank 3" in str(err.value) and "tag 18" in str(err.value)
    assert field in str(err.value)


def test_good_message_decodes():
    h, inline = unpack_header(_msg(GOOD, b"\1" * 8), 2 + len(msgpack.packb(GOOD)) + 8, src=3, tag=18)
    assert h.shape == (2,) and h.dtype == torch.float32 and bytes(inline) == b"\1" * 8


def test_unsupported_dtype_named():
    with pytest.raises(ValueError, match="complex64"):
        _roundtrip(torch.zeros(2, dtype=torch.complex64))
