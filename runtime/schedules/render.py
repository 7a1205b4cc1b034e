"""Text views of schedules: a per-rank timeline like the DualPipe figure, and figure tables."""

from __future__ import annotations

import math
from collections.abc import Iterable

from .actions import FB, Compute, Schedule
from .generators import build
from .layout import KINDS_TABLE
from .simulator import Costs, SimResult, closed_form, simulate

__all__ = ["cell_label", "render_timeline", "render_simulation", "bubble_table", "LEGEND"]

LEGEND = (
    "cells: F forward, B backward, W deferred weight-gradient pass, with the microbatch number; "
    "UPPERCASE = chunk 0 (direction 0 in dualpipe: rank 0 -> last), lowercase = chunk 1 (direction 1 in "
    "dualpipe, the way back in dualpipev); X+y = one overlapped F&B pair; '.' = idle"
)


def cell_label(c: Compute | FB) -> str:
    """Short text of a compute cell, e.g. ``F3``, ``b0``, ``F7+b3``."""
    if isinstance(c, FB):
        return f"{cell_label(c.f)}+{cell_label(c.b)}"
    text = f"{c.op}{c.mb}"
    return text.lower() if c.chunk == 1 else text


def render_timeline(schedule: Schedule, result: SimResult, scale: float = 4.0) -> str:
    """One row per rank; each compute is a cell ``scale`` characters per time unit wide."""
    if not scale > 0:
        raise ValueError(f"scale={scale!r}: must be > 0 (characters per time unit)")
    width = math.ceil(result.makespan * scale)
    ruler = [" "] * (width + 8)
    step = max(1, math.ceil(8 / scale))  # keep tick labels from running into each other
    for t in range(0, math.floor(result.makespan) + 1, step):
        col = round(t * scale)
        for i, ch in enumerate(str(t)):
            ruler[col + i] = ch
    lines = [f"{schedule.name}: pp={schedule.pp} ranks, {schedule.num_stages} stages, "
             f"{schedule.microbatches} microbatches; makespan {result.makespan:g}",
             "time    " + "".join(ruler).rstrip()]
    for rank, spans in enumerate(result.spans):
        row = ["."] * width
        for sp in spans:
            a, e = round(sp.start * scale), round(sp.end * scale)
            if e <= a:
                continue
            text = cell_label(sp.action)[: e - a - 1].ljust(e - a - 1) + "|"
            row[a:e] = text
        lines.append(f"rank {rank:>2} " + "".join(row))
    lines.append(LEGEND)
    return "\n".join(lines)


def render_simulation(schedule: Schedule, result: SimResult, costs: Costs) -> str:
    """Per-rank busy/idle/peak activations/parameter copies next to the closed-form figures."""
    cf = closed_form(schedule.name, schedule.num_stages, costs)
    lines = [
        f"{schedule.name}: {schedule.pp} ranks, PP = {schedule.num_stages} stages, "
        f"{schedule.microbatches} microbatches; costs F={costs.f:g} B={costs.b:g} W={costs.w:g} "
        f"F&B={costs.fb:g} comm={costs.comm:g}",
        f"{'rank':>4} {'busy':>9} {'idle(bubble)':>12} {'peak act':>8} {'params':>6}",
    ]
    for r in range(schedule.pp):
        lines.append(
            f"{r:>4} {result.busy[r]:>9.3f} {result.idle[r]:>12.3f} "
            f"{result.peak_activations[r]:>8} {result.param_copies[r]:>5}x"
        )
    lines += [
        f"makespan {result.makespan:.3f}",
        f"{'':<22}{'simulated':>10} {'closed form':>12}",
        f"{'bubble (max idle)':<22}{result.bubble:>10.3f} {cf.bubble:>12.3f}",
        f"{'activations (max)':<22}{max(result.peak_activations):>10} {cf.activations:>12}",
        f"{'parameters (max)':<22}{max(result.param_copies):>9}x {cf.params:>11}x",
        f"{'devices':<22}{schedule.pp:>10} {cf.devices:>12}",
    ]
    if not cf.holds:
        lines.append(f"the closed-form bubble assumes {cf.assumption}; these costs do not meet that, "
                     "so only the simulated bubble applies (docs/schedules.md)")
    elif not math.isclose(result.bubble, cf.bubble, abs_tol=1e-9):
        lines.append("simulated bubble differs from the closed form: see docs/schedules.md "
                     "(cost assumptions of the formulas)")
    return "\n".join(lines)


def bubble_table(stages: Iterable[int], costs: Costs, microbatches: int | None = None) -> str:
    """Simulated vs closed-form bubble of every schedule for each PP (stages) in ``stages``.

    DualPipeV runs PP stages on PP/2 ranks; the others on PP ranks. ``microbatches`` defaults to
    2*PP per row (the smallest count DualPipe accepts).
    """
    lines = [
        f"costs F={costs.f:g} B={costs.b:g} W={costs.w:g} F&B={costs.fb:g} comm={costs.comm:g}",
        f"{'PP':>3} {'schedule':<10}{'ranks':>6}{'mbs':>5}{'sim bubble':>12}{'closed form':>12}"
        f"{'act sim/tab':>12}{'params sim/tab':>15}",
    ]
    unmet: dict[str, str] = {}
    for pp_stages in stages:
        m = microbatches if microbatches is not None else 2 * pp_stages
        for name in ("1f1b", "zb1p", "dualpipe", "dualpipev"):
            ranks = KINDS_TABLE[name].ranks_for(pp_stages)
            result = simulate(build(name, ranks, m), costs)
            cf = closed_form(name, pp_stages, costs)
            if not cf.holds:
                unmet[name] = cf.assumption
            lines.append(
                f"{pp_stages:>3} {name:<10}{ranks:>6}{m:>5}{result.bubble:>12.3f}{cf.bubble:>11.3f}"
                f"{' ' if cf.holds else '*'}{max(result.peak_activations):>7}/{cf.activations:<4}"
                f"{max(result.param_copies):>10}x/{cf.params}x"
            )
    lines += [f"* {name}: its formula assumes {a}; these costs do not meet that, so only the simulated "
              "bubble applies (docs/schedules.md)" for name, a in unmet.items()]
    return "\n".join(lines)
