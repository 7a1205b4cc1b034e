"""Expert-parallel communication in a run's logs: the dispatch / combine hops by link class
(``exchange`` spans) and the per-step bytes and expert loads every rank logs (``ep_step`` records).

* :func:`step_of_spans`: a span counts for the step whose ``step`` span *on the same rank* contains
  its start (each rank's own step boundaries, so every EP rank is counted, not just one replica's).
* :func:`exchange_table`: per (phase, link class) — ``dispatch hop1`` / ``inter-node``, ...
  — exchanges, bytes sent, *in flight* (post to completion, summed over ranks), *blocked* (time
  the rank spent waiting for it) and *hidden* = 1 − blocked / in flight: the part of the exchange's
  flight during which its rank computed (clamped at 0: a wait also pays the resume). Plus one total
  row per link class and the same split for exchanges inside overlapped F&B pairs (``context``
  ``fb``), the figure the V3 pairing is about.
* :func:`ep_step_figures`: from ``ep_step`` records — bytes per step per link class (token rows and
  what rides along: gate weights, slot ids, scales), summed over the ranks, and the expert-load
  balance: per MoE layer and step ``max / mean`` tokens per expert (1.0 = perfectly even), taken
  once per stage (every rank of an EP group logs the same, group-summed loads).
"""

from __future__ import annotations

import bisect
from collections import defaultdict

from runtime import spans
from runtime.analysis.steps import NS_PER_MS

__all__ = ["step_of_spans", "exchange_table", "ep_step_figures", "LINKS"]

LINKS = ("inter-node", "intra-node")
"""Link classes of the two hops: hop 1 crosses nodes (rail peers), hop 2 stays inside one."""
_PHASES = ("dispatch", "combine", "combine-bwd", "dispatch-bwd")


def step_of_spans(records: list[dict], name: str) -> dict[int, list[dict]]:
    """One rank's ``name`` spans by step (the rank's step span containing the span's start);
    spans outside every step are dropped."""
    steps = sorted((s["t0"], s["t1"], s["step"]) for s in records if s["span"] == spans.STEP)
    starts = [t0 for t0, _, _ in steps]
    out: dict[int, list[dict]] = defaultdict(list)
    for s in records:
        if s["span"] != name:
            continue
        k = bisect.bisect_right(starts, s["t0"]) - 1
        if k >= 0 and s["t0"] <= steps[k][1]:
            out[steps[k][2]].append(s)
    return out


def _order(key: tuple[str, str]) -> tuple:
    phase, link = key
    base, _, hop = phase.partition(" ")
    return (_PHASES.index(base) if base in _PHASES else len(_PHASES), base, hop, link)


def _row(phase: str, link: str, acc: list, num_steps: int) -> dict:
    n, nbytes, flight, blocked = acc
    return {"phase": phase, "link": link, "exchanges": n / num_steps, "bytes": nbytes / num_steps,
            "in_flight_ms": flight / num_steps / NS_PER_MS, "blocked_ms": blocked / num_steps / NS_PER_MS,
            "hidden_pct": 100.0 * max(0.0, 1.0 - blocked / flight) if flight else None}


def exchange_table(records: dict[int, list[dict]], steps: set[int]) -> dict:
    """EP exchange figures over ``steps`` of every rank in ``records`` (per step, summed over
    ranks): ``rows`` per (phase, link), ``links`` per link class, ``fb`` / ``other`` per context
    (inside overlapped F&B pairs or not). Empty lists / None when no exchange span was logged."""
    acc: dict[tuple[str, str], list] = defaultdict(lambda: [0, 0, 0, 0])
    per_link: dict[str, list] = defaultdict(lambda: [0, 0, 0, 0])
    per_ctx: dict[str, list] = defaultdict(lambda: [0, 0, 0, 0])
    for recs in records.values():
        for step, got in step_of_spans(recs, spans.EXCHANGE).items():
            if step not in steps:
                continue
            for s in got:
                vals = (1, s["nbytes"], s["t1"] - s["t0"], s["wait_us"] * 1e3)
                for a in (acc[(s["phase"], s["link"])], per_link[s["link"]], per_ctx[s["context"]]):
                    for i, v in enumerate(vals):
                        a[i] += v
    n = max(len(steps), 1)
    return {"rows": [_row(p, link, acc[(p, link)], n) for p, link in sorted(acc, key=_order)],
            "links": [_row("all", link, per_link[link], n) for link in sorted(per_link, key=lambda x: (
                LINKS.index(x) if x in LINKS else len(LINKS), x))],
            "contexts": {ctx: _row(ctx, "all", per_ctx[ctx], n) for ctx in sorted(per_ctx)}}


def ep_step_figures(ep_steps: dict[int, list[dict]], steps: set[int], ep: int) -> dict | None:
    """Figures of the ``ep_step`` records of ``steps`` (world rank -> records; ``ep`` ranks per
    stage, world rank ``p * ep + e``): ``bytes_per_step`` per link class (``inter`` / ``intra``:
    ``tokens`` and ``meta``, summed over ranks, mean over steps), ``bytes_by_phase`` per
    ``<phase>_<link>`` key as logged, and ``load``: per (pipeline rank, chunk, layer) the mean over
    steps of ``max / mean`` expert load, with the worst single (step, layer). None without records."""
    got = {r: [x for x in recs if x.get("step") in steps] for r, recs in ep_steps.items()}
    got = {r: recs for r, recs in got.items() if recs}
    if not got:
        return None
    num_steps = len({x["step"] for recs in got.values() for x in recs})
    by_key: dict[str, float] = defaultdict(float)
    links: dict[str, dict[str, float]] = {}
    for recs in got.values():
        for x in recs:
            for key, v in x.get("bytes", {}).items():
                by_key[key] += v / num_steps
                parts = key.split("_")
                link, kind = parts[1], ("meta" if parts[-1] == "meta" else "tokens")
                links.setdefault(link, {"tokens": 0.0, "meta": 0.0})[kind] += v / num_steps
    ratios: dict[tuple[int, str, int], list[tuple[float, int]]] = defaultdict(list)
    for r, recs in got.items():
        if r % ep:  # one rank per stage: the loads are the group's sums, the same on every rank
            continue
        for x in recs:
            for chunk, layers in x.get("expert_load", {}).items():
                for i, load in enumerate(layers):
                    mean = sum(load) / len(load) if load else 0.0
                    if mean > 0:
                        ratios[(r // ep, chunk, i)].append((max(load) / mean, x["step"]))
    load = [{"pp_rank": p, "chunk": c, "moe_layer": i, "max_over_mean": sum(v for v, _ in xs) / len(xs),
             "worst": max(xs)[0], "worst_step": max(xs)[1]} for (p, c, i), xs in sorted(ratios.items())]
    return {"steps": num_steps, "bytes_per_step": dict(sorted(links.items())),
            "bytes_by_phase": dict(sorted(by_key.items())), "load": load}
