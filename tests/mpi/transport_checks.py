"""Transport checks on 4 ranks in one launch (each check is a function; all must pass).

Run: python -m launch.local -n 4 tests.mpi.transport_checks
"""

from __future__ import annotations

import sys

import torch
from mpi4py import MPI

from runtime.envelope import DTYPES, INLINE_MAX, tensor_bytes
from runtime.transport import Transport, TransportConfig

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
tp = Transport(comm, TransportConfig(max_inflight=8, timeout_s=60))


def ping_pong() -> None:
    """Ranks 0 and 1 bounce a tensor 200 times, each side adding one; sizes inline and not."""
    if rank > 1:
        return
    for n in (1, 4097, 70000):
        x = torch.zeros(n, dtype=torch.float64)
        for i in range(100):
            if rank == 0:
                tp.isend(1, x, channel=1, mb=i)
                x = tp.recv(1, channel=1, expect={"mb": i}) + 1
            else:
                y = tp.recv(0, channel=1, shape=(n,), dtype=torch.float64, expect={"mb": i})
                tp.isend(0, y + 1, channel=1, mb=i)
        if rank == 0:
            assert torch.equal(x, torch.full((n,), 200.0, dtype=torch.float64)), (n, x[:4])


def ring() -> None:
    """Every rank passes a rank-stamped tensor around the ring ``size`` times."""
    x = torch.full((3, 5), float(rank))
    right, left = (rank + 1) % size, (rank - 1) % size
    for hop in range(size):
        h = tp.irecv(left, channel=2, shape=(3, 5), dtype=torch.float32)
        tp.isend(right, x, channel=2, mb=hop)
        x = tp.wait(h).clone()
        assert x[0, 0].item() == float((rank - hop - 1) % size), (hop, x[0, 0])
    assert torch.equal(x, torch.full((3, 5), float(rank)))


def many_small_in_order() -> None:
    """3000 small messages 0 -> 1 on one channel arrive in order, receives posted 64 ahead."""
    n = 3000
    if rank == 0:
        for i in range(n):
            tp.isend(1, torch.tensor([i], dtype=torch.int64), channel=3, mb=i)
        tp.flush()
    elif rank == 1:
        posted = [tp.irecv(0, channel=3) for _ in range(64)]
        got = []
        while posted:
            h = posted.pop(0)
            got.append(int(tp.wait(h).item()))
            assert h.header.mb == got[-1]
            if len(got) + len(posted) < n:
                posted.append(tp.irecv(0, channel=3))
        assert got == list(range(n)), got[:10]


def many_large_outstanding() -> None:
    """Rank 2 posts 12 x 4 MiB sends at once to rank 3 (backpressure at 8), received into buffers."""
    if rank not in (2, 3) or size < 4:
        return
    n, elems = 12, 1 << 20
    if rank == 2:
        bufs = [torch.full((elems,), float(i)) for i in range(n)]
        handles = [tp.isend(3, b, channel=4, mb=i) for i, b in enumerate(bufs)]
        for h in handles:
            tp.wait(h)
    else:
        outs = [torch.empty(elems) for _ in range(n)]
        hs = [tp.irecv(2, channel=4, out=o, expect={"mb": i}) for i, o in enumerate(outs)]
        for i, h in enumerate(hs):
            assert tp.wait(h) is outs[i]
            assert torch.equal(outs[i], torch.full((elems,), float(i))), i


def _samples() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    out = []
    for dt in DTYPES:
        base = torch.randn(40, 33, generator=g) * 50
        if dt == torch.bool:
            t = base > 0
        elif dt.is_floating_point:
            t = base.to(dt)
        else:
            t = base.clamp(-100, 100).to(dt) if dt != torch.uint8 else base.abs().clamp(0, 255).to(dt)
        out += [t, t.t(), t[:0], t[3, 4], t[::2, 1:]]  # contiguous, transposed, zero-size, scalar, strided
    out.append(torch.randn(INLINE_MAX, generator=g).to(torch.bfloat16))  # 32 KiB: separate payload
    out.append(torch.randn(300, 300, generator=g).to(torch.float8_e4m3fn).t())
    return out


def mixed_dtypes() -> None:
    """Every dtype and layout 1 -> 0; receives alternate between unknown and known shapes."""
    samples = _samples()
    if rank == 1:
        for i, t in enumerate(samples):
            tp.isend(0, t, channel=5, mb=i, chunk=i % 2, dir=i % 2)
        tp.flush()
    elif rank == 0:
        hs = []
        for i, t in enumerate(samples):
            known = dict(shape=tuple(t.shape), dtype=t.dtype) if i % 2 else {}
            hs.append(tp.irecv(1, channel=5, expect={"mb": i, "chunk": i % 2, "dir": i % 2}, **known))
        for h, t in zip(hs, samples):
            got = tp.wait(h)
            assert got.dtype == t.dtype and got.shape == t.shape, (got.dtype, got.shape, t.dtype, t.shape)
            assert (tensor_bytes(got) == tensor_bytes(t)).all(), (h.header, got.reshape(-1)[:6], t.reshape(-1)[:6])


CHECKS = [ping_pong, ring, many_small_in_order, many_large_outstanding, mixed_dtypes]

if __name__ == "__main__":
    only = sys.argv[1:] or [c.__name__ for c in CHECKS]
    for check in CHECKS:
        if check.__name__ in only:
            check()
            comm.Barrier()
            if rank == 0:
                print(f"check {check.__name__} ok", flush=True)
    tp.close()
    print(f"rank {rank}: all transport checks ok", flush=True)
