"""Chrome trace-event JSON of a run, for Perfetto (ui.perfetto.dev) or chrome://tracing.

One process per rank (named ``rank R (host)``), and within it separate tracks (threads), because
Perfetto does not draw overlapping events on one track: ``step``; ``compute`` (F/B/W, the waits
before them and the step-end tail); ``send``; ``recv``; with expert parallelism ``ep inter-node``
and ``ep intra-node`` (each dispatch / combine hop, post to completion, by its link class; named
like ``dispatch hop1 L3 mb2 d0 c1``, ``wait_us`` in its args = the time the rank blocked on it). Events of one kind that overlap in time
(several sends in flight at once) get extra tracks (``send #2``, ...) so no two events on a track
overlap. Every logged span is one complete (``X``) event on rank 0's clock, in µs from the earliest
span; computes are named ``F mb3 d0 c1`` (op, microbatch, direction, chunk; ``[FB]`` marks a half
of an overlapped pair), every field of the span is in ``args``. Every send is tied to its receive
by a flow arrow (matched by source, destination, channel and stream sequence number).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from runtime import spans

__all__ = ["chrome_trace", "write_trace", "span_label"]

_GROUP = {spans.STEP: ("step", 1), spans.COMPUTE: ("compute", 100), spans.WAIT: ("compute", 100),
          spans.TAIL: ("compute", 100), spans.SEND: ("send", 200), spans.RECV: ("recv", 300)}
_OTHER = ("other", 400)
_EP_LINKS = {"inter-node": ("ep inter-node", 500), "intra-node": ("ep intra-node", 600)}


def _group(rec: dict) -> tuple[str, int]:
    """(track name, first thread id) of a span: EP exchanges get a track per link class."""
    if rec["span"] == spans.EXCHANGE:
        return _EP_LINKS.get(rec.get("link"), (f"ep {rec.get('link')}", 700))
    return _GROUP.get(rec["span"], _OTHER)


def span_label(rec: dict, fb_halves: frozenset = frozenset(), rank: int | None = None) -> str:
    """Display name of a span record."""
    kind = rec["span"]
    if kind == spans.COMPUTE:
        pair = " [FB]" if (rank, rec["op"], rec["dir"], rec["mb"], rec["chunk"]) in fb_halves else ""
        return f"{rec['op']} mb{rec['mb']} d{rec['dir']} c{rec['chunk']}{pair}"
    if kind == spans.WAIT:
        return f"wait {rec['kind']} for {'F' if rec['kind'] == 'act' else 'B'} mb{rec['mb']} d{rec['dir']} c{rec['chunk']}"
    if kind == spans.SEND:
        return f"send {rec['kind']} mb{rec['mb']} d{rec['dir']} -> r{rec['peer']}"
    if kind == spans.RECV:
        return f"recv {rec['kind']} mb{rec['mb']} d{rec['dir']} <- r{rec['peer']}"
    if kind == spans.EXCHANGE:
        mb = rec["mb"]
        where = f"mb{mb[1]} d{mb[0]} c{mb[2]}" if isinstance(mb, list) and len(mb) == 3 else f"mb{mb}"
        return f"{rec['phase']} L{rec['layer']} {where}"
    if kind in (spans.STEP, spans.TAIL):
        return f"{kind} {rec['step']}"
    return str(kind)


def _lanes(recs: list[dict]) -> list[int]:
    """Lane per record (same order) such that records in one lane do not overlap: greedy by start."""
    order = sorted(range(len(recs)), key=lambda i: (recs[i]["t0"], recs[i]["t1"]))
    ends: list[int] = []
    lane = [0] * len(recs)
    for i in order:
        for k, end in enumerate(ends):
            if end <= recs[i]["t0"]:
                ends[k] = recs[i]["t1"]
                lane[i] = k
                break
        else:
            lane[i] = len(ends)
            ends.append(recs[i]["t1"])
    return lane


def chrome_trace(records: dict[int, list[dict]], *, hosts: dict[int, str] | None = None,
                 fb_halves: frozenset = frozenset(), window: tuple[int, int] | None = None,
                 peer_rank: Callable[[int, int], int] | None = None, metadata: dict | None = None) -> dict:
    """The trace of ``records`` (span records per rank, aligned ns); only spans starting inside
    ``window`` if given. ``fb_halves``: (rank, op, dir, mb, chunk) of FB-pair halves.
    ``peer_rank(rank, peer)``: the key of ``records`` that a span's ``peer`` names (default: the
    same number; with expert parallelism the pipeline names peers by pipeline rank)."""
    sel = {r: [s for s in recs if window is None or window[0] <= s["t0"] < window[1]] for r, recs in records.items()}
    base = min((s["t0"] for recs in sel.values() for s in recs), default=0)
    us = lambda t: (t - base) / 1e3  # noqa: E731
    events: list[dict] = []
    where: dict[tuple, tuple[int, int, float]] = {}  # message key -> (pid, tid, mid ts) per side
    for rank in sorted(sel):
        name = f"rank {rank}" + (f" ({hosts[rank]})" if hosts and hosts.get(rank) else "")
        events.append({"ph": "M", "name": "process_name", "pid": rank, "tid": 0, "args": {"name": name}})
        events.append({"ph": "M", "name": "process_sort_index", "pid": rank, "tid": 0, "args": {"sort_index": rank}})
        groups: dict[tuple[str, int], list[dict]] = {}
        for s in sel[rank]:
            groups.setdefault(_group(s), []).append(s)
        for (gname, tid0), recs in sorted(groups.items(), key=lambda g: g[0][1]):
            lanes = _lanes(recs)
            for k in sorted(set(lanes)):
                events.append({"ph": "M", "name": "thread_name", "pid": rank, "tid": tid0 + k,
                               "args": {"name": gname if k == 0 else f"{gname} #{k + 1}"}})
                events.append({"ph": "M", "name": "thread_sort_index", "pid": rank, "tid": tid0 + k,
                               "args": {"sort_index": tid0 + k}})
            for s, k in zip(recs, lanes):
                args = {f: v for f, v in s.items() if f not in ("event", "span", "t0", "t1", "timestamp", "level",
                                                                 "run_id", "pid", "host", "role", "rank")}
                events.append({"ph": "X", "name": span_label(s, fb_halves, rank), "cat": s["span"],
                               "ts": us(s["t0"]), "dur": (s["t1"] - s["t0"]) / 1e3, "pid": rank, "tid": tid0 + k,
                               "args": args})
                if s["span"] in (spans.SEND, spans.RECV):
                    peer = s["peer"] if peer_rank is None else peer_rank(rank, s["peer"])
                    src, dst = (rank, peer) if s["span"] == spans.SEND else (peer, rank)
                    where[(s["span"], src, dst, s["channel"], s["seq"])] = (rank, tid0 + k,
                                                                            us((s["t0"] + s["t1"]) // 2))
    flow = 0
    for (side, src, dst, channel, seq), (pid, tid, ts) in sorted(where.items(), key=lambda kv: kv[0][1:]):
        if side != spans.SEND or (spans.RECV, src, dst, channel, seq) not in where:
            continue
        rpid, rtid, rts = where[(spans.RECV, src, dst, channel, seq)]
        flow += 1
        common = {"name": f"r{src}->r{dst} ch{channel} #{seq}", "cat": "message", "id": flow}
        events.append({"ph": "s", "pid": pid, "tid": tid, "ts": ts, **common})
        events.append({"ph": "f", "bp": "e", "pid": rpid, "tid": rtid, "ts": rts, **common})
    return {"traceEvents": events, "displayTimeUnit": "ms",
            "otherData": {"time_origin_ns": base, "clock": "rank 0 monotonic", **(metadata or {})}}


def write_trace(path: str | Path, trace: dict) -> Path:
    """Write ``trace`` as JSON to ``path`` (parent folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(trace, separators=(",", ":")))
    return path

