"""Transport benchmark: schedule-known channels and dynamic queues against raw mpi4py, on 2 ranks.

    python -m launch.local -n 2 bench.transport [--rounds 7] [--out bench/results/transport.json]

Ping-pong between ranks 0 and 1 for message sizes 8 B ... 64 MiB, three methods measured
alternately, round after round, in one run (this machine is noisy; only ratios measured side by
side mean anything); the median of the rounds is reported:

* ``raw``: blocking ``comm.Send`` / ``comm.Recv`` of the same buffers;
* ``chan``: a schedule-known channel pair (:mod:`runtime.channels`): header-less send, receive
  posted into a ring buffer while that message travels, wait, release;
* ``dyn``: the dynamic queues (:class:`runtime.transport.Transport`): ``isend`` with its header,
  ``irecv(out=...)`` posted while it travels, ``wait``.

The receiving side posts its next receive (and releases the last buffer) after sending its
reply, as the stage executor posts a schedule's receives before the compute that precedes them:
a hop's critical path is the send call, the transfer and the receiver's wait, and posting is
not on it. Its cost is still measured: it is in the breakdown and in the one-process costs.

one-way time = round trip / 2; bandwidth ratio = raw one-way / method one-way; added = method − raw.
Every side sends from its own buffer, never the one it receives into (a receive posted into a
buffer whose send may still be in flight would race); each measurement is at least
``--min-ms`` long and at least 20 round trips; sends left open are completed after the clock stops.

Then a message-rate row: 64 x 4 KiB in flight from rank 0 to rank 1 (all receives posted ahead,
a raw 1-byte acknowledgement back per batch) for raw ``Isend``/``Irecv`` + ``Waitall``, a channel
with a ring of 64, and the dynamic queues. Then where the time goes per message: rank 0's time
per round trip in each call of the channel and dynamic ping-pongs at 8 B and 4 MiB (Python + MPI
call for post and send; the wait holds the peer's turn), and the same calls in one process
(8 B to itself, no peer), next to raw persistent ``Start`` / ``Isend`` / ``Wait``.

Targets (issue 12): bandwidth ratio >= 0.95 from 1 MiB to 64 MiB and >= 0.85 at 256 KiB; added
one-way latency <= 5 us at 8 B on channels and <= 15 us on the dynamic queues.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from mpi4py import MPI

from bench.output import write_result
from runtime.transport import Transport, TransportConfig

SIZES = [8, 64, 512, 4096, 32768, 262144, 1 << 20, 4 << 20, 16 << 20, 64 << 20]
METHODS = ("raw", "chan", "dyn")
_ACK = 2047  # raw tag of the message-rate acknowledgement: dynamic channel 1023's payload tag, unused here


def _iters(nbytes: int, min_s: float) -> int:
    """Round trips so that one measurement lasts at least ``min_s`` at ~3 GB/s plus ~5 us per hop."""
    rtt = 2 * (nbytes / 3e9 + 5e-6)
    return max(20, int(min_s / rtt) + 1)


def raw_pingpong(comm: MPI.Comm, send_buf, recv_buf, iters: int) -> float:
    peer = 1 - comm.rank
    comm.Barrier()
    t0 = time.perf_counter()
    for _ in range(iters):
        if comm.rank == 0:
            comm.Send([send_buf, MPI.BYTE], peer, 77)
            comm.Recv([recv_buf, MPI.BYTE], peer, 77)
        else:
            comm.Recv([recv_buf, MPI.BYTE], peer, 77)
            comm.Send([send_buf, MPI.BYTE], peer, 77)
    t = time.perf_counter() - t0
    return t / iters / 2


def chan_pingpong(tp: Transport, out_ch, in_ch, x: torch.Tensor, iters: int, times: dict | None = None) -> float:
    """Channel ping-pong; with ``times`` rank 0 adds per-call durations (ns) under post/send/wait/release.

    Each side posts its next receive and releases the last one while its own message travels,
    as the stage executor does (a schedule's Recv is posted before the compute that precedes it):
    the critical path of a hop is the send call, the transfer and the receiver's wait. Microbatch
    ids cycle through 0..7 as in a step of 8 microbatches.
    """
    clock = time.perf_counter_ns
    tp.comm.Barrier()
    t0 = time.perf_counter()
    if tp.rank == 0:
        for i in range(iters):
            mb = i & 7
            if times is None:
                out_ch.send(x, mb=mb)
                op = in_ch.post(mb=mb)
                in_ch.wait(op)
                in_ch.release(op)
            else:
                a = clock()
                out_ch.send(x, mb=mb)
                b = clock()
                op = in_ch.post(mb=mb)
                c = clock()
                in_ch.wait(op)
                d = clock()
                in_ch.release(op)
                e = clock()
                times["send"] += b - a
                times["post"] += c - b
                times["wait"] += d - c
                times["release"] += e - d
    else:
        op = in_ch.post(mb=0)
        for i in range(iters):
            in_ch.wait(op)
            out_ch.send(x, mb=i & 7)
            in_ch.release(op)
            if i + 1 < iters:
                op = in_ch.post(mb=(i + 1) & 7)
    t = time.perf_counter() - t0
    tp.flush()
    return t / iters / 2


def dyn_pingpong(tp: Transport, x: torch.Tensor, out: torch.Tensor, iters: int, times: dict | None = None) -> float:
    """Dynamic-queue ping-pong, receives posted while the own message travels (see :func:`chan_pingpong`)."""
    clock = time.perf_counter_ns
    peer = 1 - tp.rank
    tp.comm.Barrier()
    t0 = time.perf_counter()
    if tp.rank == 0:
        for _ in range(iters):
            if times is None:
                tp.isend(peer, x, channel=0)
                h = tp.irecv(peer, channel=1, out=out)
                tp.wait(h)
            else:
                a = clock()
                tp.isend(peer, x, channel=0)
                b = clock()
                h = tp.irecv(peer, channel=1, out=out)
                c = clock()
                tp.wait(h)
                d = clock()
                times["send"] += b - a
                times["post"] += c - b
                times["wait"] += d - c
    else:
        h = tp.irecv(peer, channel=0, out=out)
        for i in range(iters):
            tp.wait(h)
            tp.isend(peer, x, channel=1)
            if i + 1 < iters:
                h = tp.irecv(peer, channel=0, out=out)
    t = time.perf_counter() - t0
    tp.flush()
    return t / iters / 2


# ------------------------------------------------------------------ per-call costs, one process
def self_loop_costs(batches: int = 60, per_batch: int = 200) -> dict:
    """Rank 0 alone (COMM_SELF, 8 B to itself): microseconds per call of post / send / wait /
    the rest (release, progress) for raw persistent Start/Isend/Wait, the channel and the dynamic
    queues, each the best of ``batches`` interleaved batches (the least disturbed by other
    processes; batches are short so that one fits in a scheduler time slice). What the ping-pong
    adds on top of these is waiting and scheduling."""
    comm = MPI.COMM_SELF
    tp = Transport(comm, TransportConfig(timeout_s=60))
    x, out = torch.ones(8, dtype=torch.uint8), torch.empty(8, dtype=torch.uint8)
    so = tp.send_channel(0, 0, shape=(8,), dtype=torch.uint8)
    ri = tp.recv_channel(0, 0, shape=(8,), dtype=torch.uint8)
    rreq = comm.Recv_init([out.numpy(), MPI.BYTE], 0, 5)
    xb = x.numpy()
    clock = time.perf_counter_ns

    def raw() -> list[int]:
        acc = [0, 0, 0, 0]
        for _ in range(per_batch):
            a = clock(); rreq.Start(); b = clock(); s = comm.Isend([xb, MPI.BYTE], 0, 5); c = clock()
            rreq.Wait(); d = clock(); s.Wait(); e = clock()
            acc[0] += b - a; acc[1] += c - b; acc[2] += d - c; acc[3] += e - d
        return acc

    def chan() -> list[int]:
        acc = [0, 0, 0, 0]
        for i in range(per_batch):
            a = clock(); op = ri.post(mb=i); b = clock(); so.send(x, mb=i); c = clock()
            ri.wait(op); d = clock(); ri.release(op); tp.progress(); e = clock()
            acc[0] += b - a; acc[1] += c - b; acc[2] += d - c; acc[3] += e - d
        return acc

    def dyn() -> list[int]:
        acc = [0, 0, 0, 0]
        for _ in range(per_batch):
            a = clock(); h = tp.irecv(0, channel=1, out=out); b = clock(); tp.isend(0, x, channel=1); c = clock()
            tp.wait(h); d = clock(); tp.progress(); e = clock()
            acc[0] += b - a; acc[1] += c - b; acc[2] += d - c; acc[3] += e - d
        return acc

    runs = {f.__name__: [] for f in (raw, chan, dyn)}
    for _ in range(batches):
        for f in (raw, chan, dyn):
            runs[f.__name__].append(f())
    rreq.Free()
    tp.close()
    return {name: dict(zip(("post", "send", "wait", "rest"), (v / per_batch / 1e3 for v in min(accs, key=sum))))
            for name, accs in runs.items()}


# ------------------------------------------------------------------ message rate: 64 x 4 KiB in flight
def raw_rate(comm: MPI.Comm, bufs, outs, batches: int) -> float:
    ack = bytearray(1)
    comm.Barrier()
    t0 = time.perf_counter()
    for _ in range(batches):
        if comm.rank == 0:
            MPI.Request.Waitall([comm.Isend([b, MPI.BYTE], 1, 5) for b in bufs])
            comm.Recv([ack, MPI.BYTE], 1, _ACK)
        else:
            MPI.Request.Waitall([comm.Irecv([o, MPI.BYTE], 0, 5) for o in outs])
            comm.Send([ack, MPI.BYTE], 0, _ACK)
    return (time.perf_counter() - t0) / batches / len(bufs)


def chan_rate(tp: Transport, out_ch, in_ch, xs, batches: int) -> float:
    comm, ack = tp.comm, bytearray(1)
    comm.Barrier()
    t0 = time.perf_counter()
    for _ in range(batches):
        if comm.rank == 0:
            ops = [out_ch.send(x, mb=i) for i, x in enumerate(xs)]
            comm.Recv([ack, MPI.BYTE], 1, _ACK)
            tp.engine.wait(lambda: all(o.done for o in ops), lambda: "rate sends")
        else:
            ops = [in_ch.post(mb=i) for i in range(len(xs))]
            for op in ops:
                in_ch.wait(op)
                in_ch.release(op)
            comm.Send([ack, MPI.BYTE], 0, _ACK)
    return (time.perf_counter() - t0) / batches / len(xs)


def dyn_rate(tp: Transport, xs, outs, batches: int) -> float:
    comm, ack = tp.comm, bytearray(1)
    comm.Barrier()
    t0 = time.perf_counter()
    for _ in range(batches):
        if comm.rank == 0:
            hs = [tp.isend(1, x, channel=6) for x in xs]
            comm.Recv([ack, MPI.BYTE], 1, _ACK)
            tp.engine.wait(lambda: all(h.done for h in hs), lambda: "rate sends")
        else:
            hs = [tp.irecv(0, channel=6, out=o) for o in outs]
            for h in hs:
                tp.wait(h)
            comm.Send([ack, MPI.BYTE], 0, _ACK)
    return (time.perf_counter() - t0) / batches / len(xs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.local -n 2 bench.transport", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=7, help="alternating measurement rounds per size (median taken; >= 1)")
    p.add_argument("--max-bytes", type=int, default=64 << 20, help="largest message size (default 64 MiB)")
    p.add_argument("--min-ms", type=float, default=30.0, help="minimum length of one measurement in ms (default 30)")
    p.add_argument("--out", default="bench/results/transport.json", help="JSON output path (rank 0 writes)")
    ns = p.parse_args(argv)
    comm = MPI.COMM_WORLD
    if comm.Get_size() != 2:
        print("bench.transport needs exactly 2 ranks: python -m launch.local -n 2 bench.transport", file=sys.stderr)
        return 2
    if ns.rounds < 1 or ns.min_ms <= 0:
        print("--rounds must be >= 1 and --min-ms > 0", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    tp = Transport(comm, TransportConfig(timeout_s=300))
    peer = 1 - comm.rank
    say = print if comm.rank == 0 else (lambda *a, **k: None)
    rows = []
    say(f"{'bytes':>10} {'raw us':>9} {'raw GB/s':>8} | {'chan us':>9} {'ratio':>6} {'added':>8} | "
        f"{'dyn us':>9} {'ratio':>6} {'added':>8}", flush=True)
    for ci, nbytes in enumerate(s for s in SIZES if s <= ns.max_bytes):
        x = torch.ones(nbytes, dtype=torch.uint8)
        out = torch.empty_like(x)
        out_ch = tp.send_channel(peer, ci, shape=(nbytes,), dtype=torch.uint8)
        in_ch = tp.recv_channel(peer, ci, shape=(nbytes,), dtype=torch.uint8, ring=2)
        raw_send, raw_recv = x.numpy(), out.numpy()
        iters = _iters(nbytes, ns.min_ms / 1e3)
        warm = max(2, iters // 4)  # first touch of the buffers, MPI connection setup
        raw_pingpong(comm, raw_send, raw_recv, warm)
        chan_pingpong(tp, out_ch, in_ch, x, warm)
        dyn_pingpong(tp, x, out, warm)
        t = {m: [] for m in METHODS}
        for _ in range(ns.rounds):
            t["raw"].append(raw_pingpong(comm, raw_send, raw_recv, iters))
            t["chan"].append(chan_pingpong(tp, out_ch, in_ch, x, iters))
            t["dyn"].append(dyn_pingpong(tp, x, out, iters))
        med = {m: statistics.median(v) for m, v in t.items()}
        row = {"bytes": nbytes, "iters": iters, "raw_us": med["raw"] * 1e6, "raw_GBps": nbytes / med["raw"] / 1e9}
        for m in ("chan", "dyn"):
            row[f"{m}_us"] = med[m] * 1e6
            row[f"{m}_bw_ratio"] = med["raw"] / med[m]
            row[f"{m}_added_us"] = (med[m] - med["raw"]) * 1e6
        rows.append(row)
        say(f"{nbytes:>10} {row['raw_us']:9.2f} {row['raw_GBps']:8.3f} | {row['chan_us']:9.2f} "
            f"{row['chan_bw_ratio']:6.3f} {row['chan_added_us']:+8.2f} | {row['dyn_us']:9.2f} "
            f"{row['dyn_bw_ratio']:6.3f} {row['dyn_added_us']:+8.2f}", flush=True)

    # message rate
    k, size = 64, 4096
    xs = [torch.full((size,), i, dtype=torch.uint8) for i in range(k)]
    outs = [torch.empty(size, dtype=torch.uint8) for _ in range(k)]
    out_ch = tp.send_channel(peer, 100, shape=(size,), dtype=torch.uint8)
    in_ch = tp.recv_channel(peer, 100, shape=(size,), dtype=torch.uint8, ring=k)
    raw_bufs, raw_outs = [x.numpy() for x in xs], [o.numpy() for o in outs]
    batches = 50
    raw_rate(comm, raw_bufs, raw_outs, 5)
    chan_rate(tp, out_ch, in_ch, xs, 5)
    dyn_rate(tp, xs, outs, 5)
    rt = {m: [] for m in METHODS}
    for _ in range(ns.rounds):
        rt["raw"].append(raw_rate(comm, raw_bufs, raw_outs, batches))
        rt["chan"].append(chan_rate(tp, out_ch, in_ch, xs, batches))
        rt["dyn"].append(dyn_rate(tp, xs, outs, batches))
    rmed = {m: statistics.median(v) for m, v in rt.items()}
    rate = {"messages_in_flight": k, "bytes": size, **{f"{m}_us_per_msg": v * 1e6 for m, v in rmed.items()},
            **{f"{m}_rate_ratio": rmed["raw"] / rmed[m] for m in ("chan", "dyn")}}
    say(f"\nmessage rate, {k} x {size} B in flight: raw {rate['raw_us_per_msg']:.2f} us/msg | chan "
        f"{rate['chan_us_per_msg']:.2f} us/msg (rate ratio {rate['chan_rate_ratio']:.3f}) | dyn "
        f"{rate['dyn_us_per_msg']:.2f} us/msg (rate ratio {rate['dyn_rate_ratio']:.3f})", flush=True)

    # per-message breakdown on rank 0, at 8 B and 4 MiB
    breakdown = {}
    for bi, nbytes in enumerate((8, 4 << 20)):
        if nbytes > ns.max_bytes:
            continue
        x = torch.ones(nbytes, dtype=torch.uint8)
        out = torch.empty_like(x)
        out_ch = tp.send_channel(peer, 200 + bi, shape=(nbytes,), dtype=torch.uint8)
        in_ch = tp.recv_channel(peer, 200 + bi, shape=(nbytes,), dtype=torch.uint8, ring=2)
        iters = _iters(nbytes, ns.min_ms / 1e3) * ns.rounds
        chan_pingpong(tp, out_ch, in_ch, x, 20)
        ct = {k: 0 for k in ("post", "send", "wait", "release")}
        chan_one_way = chan_pingpong(tp, out_ch, in_ch, x, iters, ct)
        dt = {k: 0 for k in ("post", "send", "wait")}
        dyn_one_way = dyn_pingpong(tp, x, out, iters, dt)
        raw_one_way = raw_pingpong(comm, x.numpy(), out.numpy(), iters)
        breakdown[nbytes] = {"chan_us_per_round_trip": {k: v / iters / 1e3 for k, v in ct.items()},
                             "dyn_us_per_round_trip": {k: v / iters / 1e3 for k, v in dt.items()},
                             "one_way_us": {"raw": raw_one_way * 1e6, "chan": chan_one_way * 1e6,
                                            "dyn": dyn_one_way * 1e6}}
        b = breakdown[nbytes]
        say(f"breakdown {nbytes} B, rank 0 per round trip (us): chan " +
            " ".join(f"{k} {v:.2f}" for k, v in b["chan_us_per_round_trip"].items()) + " | dyn " +
            " ".join(f"{k} {v:.2f}" for k, v in b["dyn_us_per_round_trip"].items()) +
            f" | round trip raw {2 * b['one_way_us']['raw']:.2f} chan {2 * b['one_way_us']['chan']:.2f} "
            f"dyn {2 * b['one_way_us']['dyn']:.2f}", flush=True)
    tp.close()
    costs = self_loop_costs() if comm.rank == 0 else {}
    for name, c in costs.items():
        say(f"per call, one process, 8 B to itself (us, best of 60 batches of 200): {name:<4} " +
            " ".join(f"{k} {v:.2f}" for k, v in c.items()) + f"  total {sum(c.values()):.2f}")
    if comm.rank == 0:
        def ratios(key, lo, hi):
            return [r[key] for r in rows if lo <= r["bytes"] <= hi]
        small = rows[0]
        summary = {
            "chan_min_bw_ratio_1MiB_64MiB": min(ratios("chan_bw_ratio", 1 << 20, 64 << 20), default=None),
            "dyn_min_bw_ratio_1MiB_64MiB": min(ratios("dyn_bw_ratio", 1 << 20, 64 << 20), default=None),
            "chan_bw_ratio_256KiB": (ratios("chan_bw_ratio", 262144, 262144) or [None])[0],
            "dyn_bw_ratio_256KiB": (ratios("dyn_bw_ratio", 262144, 262144) or [None])[0],
            "chan_added_us_8B": small["chan_added_us"], "dyn_added_us_8B": small["dyn_added_us"],
            "targets": {"bw_ratio_1MiB_64MiB": 0.95, "bw_ratio_256KiB": 0.85, "chan_added_us_8B": 5.0,
                        "dyn_added_us_8B": 15.0},
            "mpi": MPI.Get_library_version().splitlines()[0], "rounds": ns.rounds}
        print("\nsummary: " + ", ".join(f"{k} = {v:.3f}" if isinstance(v, float) else f"{k} = {v}"
                                       for k, v in summary.items() if k not in ("targets", "mpi")))
        print("targets: bw ratio >= 0.95 (1-64 MiB), >= 0.85 (256 KiB); added at 8 B <= 5 us (chan), <= 15 us (dyn)")
        write_result(ns.out, {"rows": rows, "rate": rate, "breakdown": breakdown,
                              "self_loop_us_per_call": costs, "summary": summary})
    return 0


if __name__ == "__main__":
    sys.exit(main())
