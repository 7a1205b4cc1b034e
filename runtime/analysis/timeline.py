"""PNG timeline of a few steps: ranks on the y axis, time (ms, rank 0's clock) on the x axis.

Each rank's row shows its computes coloured by op — F, B (full or split), W, and the two halves of
an overlapped FB pair — darker for direction 0 and lighter for direction 1 (DualPipe's two
directions meet in the middle), labelled with the microbatch when wide enough; its waits for an
input (idle) below them; and under the row a thin band with the time its messages were in flight
(from the later of send and receive posting to landing). White is idle that is not a wait:
drain and executor overhead. Needs matplotlib (drawn off-screen with the Agg backend).
"""

from __future__ import annotations

from pathlib import Path

from runtime.analysis.steps import NS_PER_MS, StepLog

__all__ = ["COLOURS", "draw_timeline"]

COLOURS = {
    ("F", 0): "#1f5fa8", ("F", 1): "#7fb2e5",
    ("B", 0): "#2c8a2c", ("B", 1): "#9ad89a",
    ("W", 0): "#6f4a9e", ("W", 1): "#c2aee0",
    ("FB", 0): "#c0392b", ("FB", 1): "#f1948a",
    "comm": "#555555",
    "idle": "#f5b041",
}
"""Fill colour per (op, direction), for communication in flight and for waiting (idle)."""


def draw_timeline(path: str | Path, steps: list[StepLog], *, fb_halves: frozenset = frozenset(),
                  title: str = "") -> Path:
    """Draw ``steps`` (consecutive steps of one run) into the PNG ``path``; returns the path."""
    if not steps:
        raise ValueError("steps: need at least one step to draw")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    ranks = sorted(steps[0].ranks)
    base = min(st.start for st in steps)
    end = max(st.end for st in steps)
    width_ms = (end - base) / NS_PER_MS
    fig, ax = plt.subplots(figsize=(14, 1.0 + 0.75 * len(ranks)), dpi=110)
    ms = lambda t: (t - base) / NS_PER_MS  # noqa: E731
    sent = {(r, s["peer"], s["channel"], s["seq"]): s["t0"] for st in steps for r, rs in st.ranks.items()
            for s in rs.send}
    for r in ranks:
        y = len(ranks) - 1 - r
        for st in steps:
            rs = st.ranks[r]
            for c in rs.compute:
                op = "FB" if (r, c["op"], c["dir"], c["mb"], c["chunk"]) in fb_halves else c["op"]
                x0, w = ms(c["t0"]), (c["t1"] - c["t0"]) / NS_PER_MS
                ax.broken_barh([(x0, w)], (y - 0.3, 0.6), facecolors=COLOURS[(op, c["dir"] % 2)],
                               edgecolor="white", linewidth=0.4)
                if w > width_ms / 90:
                    ax.text(x0 + w / 2, y, str(c["mb"]), ha="center", va="center", fontsize=6,
                            color="white" if c["dir"] % 2 == 0 else "black")
            idle = [(ms(w["t0"]), (w["t1"] - w["t0"]) / NS_PER_MS) for w in rs.wait]
            ax.broken_barh(idle, (y - 0.3, 0.6), facecolors=COLOURS["idle"], alpha=0.6)
            flight = [(max(s["t0"], sent.get((s["peer"], r, s["channel"], s["seq"]), s["t0"])), s["t1"])
                      for s in rs.recv if s["kind"] in ("act", "grad")]
            comm = [(ms(t0), (t1 - t0) / NS_PER_MS) for t0, t1 in flight if t1 > t0]
            ax.broken_barh(comm, (y - 0.42, 0.08), facecolors=COLOURS["comm"])
            ax.axvline(ms(rs.step_span["t1"]), ymin=0, ymax=1, color="#bbbbbb", linewidth=0.5, linestyle=":")
    ax.set_yticks(range(len(ranks)), [f"rank {r}" for r in reversed(ranks)])
    ax.set_xlim(0, width_ms)
    ax.set_ylim(-0.6, len(ranks) - 0.4)
    ax.set_xlabel("ms since the start of step " + str(steps[0].step))
    ax.set_title(title, fontsize=10, pad=24)
    legend = [Patch(color=COLOURS[(op, 0)], label=op) for op in ("F", "B", "W", "FB")]
    legend += [Patch(color=COLOURS[("F", 1)], label="lighter: direction 1"),
               Patch(color=COLOURS["idle"], alpha=0.6, label="waiting for input"),
               Patch(color=COLOURS["comm"], label="receive in flight")]
    ax.legend(handles=legend, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=7, fontsize=8, frameon=False)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
