"""Bad messages on header-carrying queues are rejected with an error naming sender, field and value.

Each row forges one message byte by byte (the format of ``docs/runtime.md``: the fixed-layout
header written field by field with ``struct``, not by the encoder under test, then the inline
payload; a separate payload message on tag 2c+1 for large tensors),
sends it with raw MPI to this very rank (``COMM_SELF``: no mpiexec needed), posts the receive the
way the pipeline does (shape and dtype known, ``expect`` kind and microbatch) and checks that the
wait raises :class:`~runtime.envelope.EnvelopeError` with the expected words. The last test sends
the same message well-formed, so a row cannot pass because every message fails.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from mpi4py import MPI

from runtime.envelope import HEADER, HEADER_SIZE, INLINE_MAX, MAGIC, MAX_NDIM, EnvelopeError
from runtime.transport import Transport, TransportConfig

SHAPE, DTYPE = (2, 3), torch.float32
_channels = iter(range(1, 1000))  # a fresh channel per message: a rejected one leaves no state behind


def _header(ch: int, **over) -> bytes:
    """The header of a float32 (2, 3) activation of microbatch 7 (key = mb, chunk, dir), with ``over``
    replacing fields; ``ndim`` follows ``shape`` unless given."""
    f = {"magic": MAGIC, "version": 2, "kind": 1, "dtype": 0, "ndim": None, "channel": ch, "src": 0, "dst": 0,
         "seq": 0, "key": (7, 0, 0), "nbytes": 24, "shape": SHAPE}
    f.update(over)
    ndim = len(f["shape"]) if f["ndim"] is None else f["ndim"]
    shape = tuple(f["shape"]) + (0,) * (MAX_NDIM - len(f["shape"]))
    return HEADER.pack(f["magic"], f["version"], f["kind"], f["dtype"], ndim, f["channel"], f["src"], f["dst"],
                       f["seq"], *f["key"], f["nbytes"], *shape)


def _message(header: bytes, payload: bytes = bytes(24)) -> bytes:
    return header + payload


def _exchange(raw: bytes, channel: int, *, payload: bytes | None = None, shape=SHAPE, dtype=DTYPE) -> torch.Tensor:
    comm = MPI.COMM_SELF
    tp = Transport(comm, TransportConfig(timeout_s=2.0))
    reqs = [comm.Isend([raw, MPI.BYTE], 0, 2 * channel)]
    if payload is not None:
        reqs.append(comm.Isend([payload, MPI.BYTE], 0, 2 * channel + 1))
    h = tp.irecv(0, channel=channel, shape=shape, dtype=dtype, expect={"kind": "act", "mb": 7})
    try:
        return tp.wait(h)
    finally:
        MPI.Request.Waitall(reqs)
        # close frees the transport's persistent requests (MPICH lists unfreed ones at exit); it
        # raises after freeing when the rejected receive is still open, which is this test's case
        with contextlib.suppress(RuntimeError):
            tp.close(timeout=2.0)


BIG = (64, 128)  # 32 KiB of float32: the payload travels as its own message
ROWS = {
    "unknown version": (lambda c: _message(_header(c, version=9)), {}, ["field 'version' is 9"]),
    "unknown kind": (lambda c: _message(_header(c, kind=9)), {}, ["field 'kind'", "9"]),
    "unknown dtype code": (lambda c: _message(_header(c, dtype=42)), {}, ["field 'dtype'", "42"]),
    "wrong dtype for the slot": (lambda c: _message(_header(c, dtype=1, nbytes=48), bytes(48)), {},
                                 ["field 'dtype' is torch.float64, expected torch.float32"]),
    "wrong shape for the slot": (lambda c: _message(_header(c, shape=[3, 2])), {}, ["field 'shape'", "(3, 2)", "(2, 3)"]),
    "message of a few bytes": (lambda c: b"\x48\x50\x02", {}, ["truncated header", "3 bytes"]),
    "truncated header": (lambda c: _message(_header(c))[:60], {}, ["truncated header", "60 bytes"]),
    "truncated inline payload": (lambda c: _message(_header(c), bytes(20)), {}, ["payload size 20", "'nbytes'=24"]),
    "nbytes disagrees with shape": (lambda c: _message(_header(c, nbytes=28), bytes(28)), {}, ["field 'nbytes' is 28", "24 bytes"]),
    "out-of-order sequence": (lambda c: _message(_header(c, seq=3)), {}, ["field 'seq' is 3, expected 0", "lost or crossed"]),
    "sender field lies": (lambda c: _message(_header(c, src=5)), {}, ["field 'src'", "5"]),
    "addressed to another rank": (lambda c: _message(_header(c, dst=4)), {}, ["field 'dst' is 4, expected 0"]),
    "wrong channel field": (lambda c: _message(_header(c, channel=c + 500)), {}, ["field 'channel'"]),
    "unexpected kind": (lambda c: _message(_header(c, kind=2)), {}, ["field 'kind' is 'grad', expected 'act'"]),
    "unexpected microbatch": (lambda c: _message(_header(c, key=(8, 0, 0))), {}, ["field 'mb' is 8, expected 7"]),
    "not a header (no magic)": (lambda c: _message(b"\xc1" * HEADER_SIZE), {}, ["field 'magic'", "not a message header"]),
    "more dims than the format has": (lambda c: _message(_header(c, ndim=MAX_NDIM + 1)), {}, ["field 'ndim' is 9"]),
    "size beyond ndim": (lambda c: _message(_header(c, ndim=1)), {}, ["field 'shape'", "[2, 3, 0"]),
    "negative dimension": (lambda c: _message(_header(c, shape=[-2, 3])), {}, ["shape"]),
    "truncated separate payload": (
        lambda c: _message(_header(c, shape=BIG, nbytes=4 * 64 * 128), b""),
        {"payload": bytes(100), "shape": BIG}, ["payload message has 100 bytes", "32768", "truncated payload"]),
    "stray bytes after a large header": (
        lambda c: _message(_header(c, shape=BIG, nbytes=4 * 64 * 128), bytes(8)),
        {"payload": bytes(4 * 64 * 128), "shape": BIG}, ["8 stray bytes"]),
}


@pytest.mark.parametrize("name", sorted(ROWS))
def test_bad_message_is_rejected_naming_the_field(name):
    make, kwargs, words = ROWS[name]
    channel = next(_channels)
    with pytest.raises(EnvelopeError) as err:
        _exchange(make(channel), channel, **kwargs)
    msg = str(err.value)
    assert "rank 0" in msg, msg
    for w in words:
        assert w in msg, f"{name}: {w!r} not in {msg!r}"


def test_table_size_and_the_well_formed_message_passes():
    assert len(ROWS) == 21
    channel = next(_channels)
    data = np.arange(6, dtype=np.float32)
    got = _exchange(_message(_header(channel), data.tobytes()), channel)
    assert torch.equal(got, torch.from_numpy(data).reshape(SHAPE))
    channel = next(_channels)
    big = np.arange(64 * 128, dtype=np.float32)
    got = _exchange(_message(_header(channel, shape=BIG, nbytes=big.nbytes), b""), channel,
                    payload=big.tobytes(), shape=BIG)
    assert torch.equal(got, torch.from_numpy(big).reshape(BIG)) and big.nbytes > INLINE_MAX
