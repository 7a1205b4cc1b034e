"""Transport checks on 2-8 ranks in one launch (each check is a function; all must pass).

Run: python -m launch.local -n 4 tests.mpi.transport_checks
"""

from __future__ import annotations

import sys
from collections import deque

import torch
from mpi4py import MPI

from runtime import channels
from runtime.channels import SMALL_MAX
from runtime.envelope import DTYPES, INLINE_MAX, EnvelopeError, tensor_bytes
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
            assert h.header.key[0] == got[-1]  # key = (mb, chunk, dir)
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


def _hold_and_check(ch, num_mb: int, lag: int, early: bool) -> bool:
    """Receive ``num_mb`` microbatches on ``ch`` (microbatch i is filled with i), holding each
    received tensor until ``lag`` more have arrived, as a stage holds its input until B; ``early``
    releases every buffer right after arrival instead. Returns whether a held tensor changed."""
    ops, held, corrupted = {}, deque(), False
    next_mb = 0
    while next_mb < num_mb and ch.free_slots:
        ops[next_mb] = ch.post(mb=next_mb)
        next_mb += 1
    for i in range(num_mb):
        op = ops.pop(i)
        held.append((i, op, ch.wait(op)))
        if early:
            ch.release(op)
        while len(held) > lag or (i == num_mb - 1 and held):
            j, op_j, t = held.popleft()
            for later in list(ops.values()):  # whatever was posted into a reused buffer lands first
                ch.wait(later)
            corrupted |= not bool((t == j).all())
            if not early:
                ch.release(op_j)
        while next_mb < num_mb and ch.free_slots:
            ops[next_mb] = ch.post(mb=next_mb)
            next_mb += 1
    return corrupted


def channel_ring() -> None:
    """Schedule-known channel 0 -> 1, one message (<= SMALL_MAX) and two-message (larger) sizes:
    rank 1 holds every received tensor while 2 more arrive, with a ring of 3 buffers, and each is
    intact when released (a ring that reused a buffer before its release would overwrite it);
    a deliberate early release on the same stream is seen as corruption (the check can fail)."""
    if rank > 1:
        return
    num_mb = 10
    for c, numel in enumerate((3, SMALL_MAX // 4 + 5)):
        for early in (False, True):
            chan = 10 + 2 * c + early
            if rank == 0:
                out = tp.send_channel(1, chan, shape=(numel,), dtype=torch.float32, kind="act", dir=1)
                for mb in range(num_mb):
                    out.send(torch.full((numel,), float(mb)), mb=mb, chunk=1)
                tp.flush()
            else:
                ch = tp.recv_channel(0, chan, shape=(numel,), dtype=torch.float32, kind="act", dir=1, ring=3)
                assert _hold_and_check(ch, num_mb, lag=2, early=early) == early, (numel, early)
                assert len(ch.free_slots) == 3
        if rank == 0:
            tp.send_channel(1, 30 + c, shape=(numel,), dtype=torch.float32).send(torch.ones(numel), mb=0)
            tp.flush()
        else:  # every buffer held: posting one more is an error, not a silent reuse
            ch = tp.recv_channel(0, 30 + c, shape=(numel,), dtype=torch.float32, ring=1)
            op = ch.post(mb=0)
            ch.wait(op)
            try:
                ch.post(mb=1)
                raise AssertionError("a full ring accepted a post")
            except RuntimeError as exc:
                assert "all 1 ring buffers are held" in str(exc), exc
            ch.release(op)


def channel_many_tags() -> None:
    """A large channel whose messages take more tags than a ring buffer keeps persistent requests
    for (100 messages, microbatches 0..49 twice: 100 distinct position/microbatch tags through one
    buffer): the receives past the cap are plain ``Irecv``\ s and every message still lands intact."""
    if rank > 1:
        return
    numel, num = SMALL_MAX // 4 + 3, 100
    if rank == 0:
        out = tp.send_channel(1, 70, shape=(numel,), dtype=torch.float32)
        for i in range(num):
            out.wait(out.send(torch.full((numel,), float(i)), mb=i % 50))
    else:
        ch = tp.recv_channel(0, 70, shape=(numel,), dtype=torch.float32, ring=1)
        tags = set()
        for i in range(num):
            op = ch.post(mb=i % 50)
            tags.add(ch._tag(i, i % 50))
            got = ch.wait(op)
            assert bool((got == i).all()), (i, got[:4])
            ch.release(op)
        assert len(tags) == num and len(ch.slots[0].preqs) == 64, (len(tags), len(ch.slots[0].preqs))


def channel_crossed() -> None:
    """Rank 0 sends microbatch 1 before 0 on a channel that rank 1 reads as 0 then 1: the receives
    fail naming sender, channel and field 'mb' (a small channel at once, from its trailer; a large
    one, whose tag carries the microbatch so that nothing matches, at its wait's deadline, and the
    pending report names the waiting message); a message of the wrong size fails naming 'nbytes'."""
    if rank > 1:
        return
    for c, numel in enumerate((2, SMALL_MAX // 4 + 1)):
        chan = 40 + c
        if rank == 0:
            out = tp.send_channel(1, chan, shape=(numel,), dtype=torch.float32, kind="grad")
            out.send(torch.ones(numel), mb=1)
            out.send(torch.zeros(numel), mb=0)
            short = tp.send_channel(1, 50 + c, shape=(numel - 1,), dtype=torch.float32)
            short.send(torch.ones(numel - 1), mb=0)
            tp.flush()
        else:
            ch = tp.recv_channel(0, chan, shape=(numel,), dtype=torch.float32, kind="grad", ring=2)
            ops = [ch.post(mb=0), ch.post(mb=1)]
            for want, got, op in ((0, 1, ops[0]), (1, 0, ops[1])):
                try:
                    ch.wait(op, timeout=1.0)
                    raise AssertionError("crossed microbatches were accepted")
                except EnvelopeError as exc:
                    assert f"rank 0 channel {chan} (grad dir 0)" in str(exc) and \
                        f"field 'mb' is {got}, expected {want}" in str(exc), exc
                if not ch.small:  # the report of a receive stuck this long (here: any age) names it too
                    after, channels._DIAGNOSE_AFTER_S = channels._DIAGNOSE_AFTER_S, 0.0
                    report = [p for p in tp.pending() if p.get("channel") == chan and p["mb"] == want]
                    channels._DIAGNOSE_AFTER_S = after
                    assert f"field 'mb' is {got}" in report[0]["unmatched"], report
            if not ch.small:  # nothing matched: take the two messages off their tags, so that the sender's flush ends
                tp.engine.cancel_all()
                for seq, mb in ((0, 1), (1, 0)):
                    tp.comm.Recv([torch.empty(numel).numpy(), MPI.FLOAT], 0, ch._tag(seq, mb))
                for op in ops:
                    op.open = 0
            for op in ops:
                ch.release(op)
            bad = tp.recv_channel(0, 50 + c, shape=(numel,), dtype=torch.float32, ring=1)
            op = bad.post(mb=0)
            try:
                bad.wait(op)
                raise AssertionError("a short message was accepted")
            except EnvelopeError as exc:
                # one message of the wrong length is named by the count check; a message sent as
                # one small message but expected as a large one (the sizes straddle SMALL_MAX) by MPI
                assert (f"rank 0 channel {50 + c}" in str(exc) and "field 'nbytes'" in str(exc)) or \
                    ("larger than its posted receive" in str(exc) and f"'channel': {50 + c}" in str(exc)), exc
            op.open = 0  # the run would end here; this check goes on, so forget the failed receive
            bad.release(op)


def recv_seq_stamped_at_post() -> None:
    """Two receives posted on one stream, the second header completed first (completion order is
    not matching order): each must be checked against the sequence number it was posted with."""
    if rank > 1:
        return
    if rank == 0:
        for i in range(2):
            tp.isend(1, torch.tensor([float(i)]), channel=60, mb=i)
        tp.flush()
    else:
        first, second = tp.irecv(0, channel=60, expect={"mb": 0}), tp.irecv(0, channel=60, expect={"mb": 1})
        eng = tp.engine
        i = next(k for k, (op, part) in enumerate(eng._owners) if op is second and part == 0)
        status = MPI.Status()
        eng._reqs[i].Wait(status)  # complete the second header before the first one is looked at
        del eng._reqs[i], eng._owners[i]
        second._part_done(0, status)
        assert tp.wait(first).item() == 0.0 and tp.wait(second).item() == 1.0


CHECKS = [ping_pong, ring, many_small_in_order, many_large_outstanding, mixed_dtypes, channel_ring,
          channel_many_tags, channel_crossed, recv_seq_stamped_at_post]

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
