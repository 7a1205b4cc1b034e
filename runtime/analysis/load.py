"""Reading a run's logs: every ``rank-*.jsonl`` of one run folder, checked against the span schema
(:mod:`runtime.spans`) and put on rank 0's clock.

* A folder without rank logs, a rank log without a ``log_start`` record, a schema version this
  reader does not know, or a run without rank 0's ``config`` record is a :class:`LogError` (the
  figures would be wrong or meaningless).
* A line that is not JSON (a truncated last line after a crash) or a span that breaks the schema
  is skipped and reported as ``file:line: why`` in :attr:`RunLog.problems`.
* Times: each rank's ``clock`` record gives its offset to rank 0 (:mod:`runtime.clock`); every
  ``t0``/``t1`` of a rank on another host than rank 0 is shifted by it, so all spans share rank 0's
  time axis. Ranks on rank 0's host read the same monotonic clock: their offset is exactly 0, and
  the logged estimate (off by up to half its round trip, a millisecond on a loaded machine) is
  not applied. A rank on another host without a clock record keeps its times, and a problem says
  they are not aligned.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from runtime import spans

__all__ = ["LogError", "RunLog", "read_run", "rank_files", "newest_run"]


class LogError(ValueError):
    """The folder cannot be analysed (the message names the file and what to do)."""


@dataclass(slots=True)
class RunLog:
    """The records of one run, per rank, on rank 0's clock."""

    run_dir: Path
    config: dict
    """Rank 0's ``config`` record (schedule, pp, microbatches, tokens_per_step, ...)."""
    spans: dict[int, list[dict]]
    """Span records per rank, ``t0``/``t1`` shifted onto rank 0's clock."""
    hosts: dict[int, str] = field(default_factory=dict)
    clocks: dict[int, dict] = field(default_factory=dict)
    """Per rank that logged a clock record: ``offset_ns`` (applied: 0 on rank 0's host),
    ``measured_ns`` (the logged estimate), ``rtt_ns``."""
    progress: list[dict] = field(default_factory=list)
    """Rank 0's per-step ``step`` events (loss, grad norm, seconds)."""
    ep_steps: dict[int, list[dict]] = field(default_factory=dict)
    """Per rank, its ``ep_step`` records (expert parallelism: bytes per phase and link, expert loads)."""
    problems: list[str] = field(default_factory=list)
    """``file:line: why`` of every skipped line, and notes on unaligned clocks."""


def rank_files(run_dir: Path) -> dict[int, Path]:
    """``rank-<r>.jsonl`` files of ``run_dir`` by rank."""
    out = {}
    for p in run_dir.glob("rank-*.jsonl"):
        try:
            out[int(p.stem.split("-", 1)[1])] = p
        except ValueError:
            continue
    return dict(sorted(out.items()))


def newest_run(log_dir: str | Path) -> Path:
    """The most recently written run folder directly under ``log_dir`` (one holding rank logs)."""
    root = Path(log_dir)
    runs = [d for d in root.iterdir() if d.is_dir() and rank_files(d)] if root.is_dir() else []
    if not runs:
        raise LogError(f"{root}: no run folders with rank-*.jsonl logs (make run writes them to logs/<run-id>/)")
    return max(runs, key=lambda d: max(p.stat().st_mtime for p in rank_files(d).values()))


def _read_rank(path: Path, rank: int, problems: list[str]) -> dict:
    out = {"spans": [], "config": None, "clock": None, "host": None, "progress": [], "ep_steps": [], "schema": None}
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                rec = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                problems.append(f"{where}: not JSON ({exc.msg if hasattr(exc, 'msg') else exc}; truncated?), skipped")
                continue
            if not isinstance(rec, dict):
                problems.append(f"{where}: not a JSON object, skipped")
                continue
            event = rec.get("event")
            if out["schema"] is None:
                if event != spans.LOG_START:
                    problems.append(f"{where}: {event!r} record before log_start, skipped")
                    continue
                version = rec.get("schema")
                if version is None:
                    raise LogError(f"{where}: log_start carries no span-schema version: the log predates "
                                   f"schema {min(spans.KNOWN_VERSIONS)}; re-run to get a log this reader knows")
                if version not in spans.KNOWN_VERSIONS:
                    raise LogError(f"{where}: span schema version {version!r}; this reader knows "
                                   f"{sorted(spans.KNOWN_VERSIONS)}: analyse it with the heteropipe version "
                                   f"that wrote it")
                out["schema"] = version
                out["host"] = rec.get("host")
                continue
            if event == spans.SPAN:
                why = spans.missing_fields(rec)
                if why:
                    problems.append(f"{where}: {why}, skipped")
                    continue
                out["spans"].append(rec)
            elif event == spans.CLOCK:
                out["clock"] = rec
            elif event == spans.CONFIG and out["config"] is None:
                out["config"] = rec
            elif event == "step" and "loss" in rec:
                out["progress"].append(rec)
            elif event == spans.EP_STEP:
                if isinstance(rec.get("step"), int) and isinstance(rec.get("bytes"), dict):
                    out["ep_steps"].append(rec)
                else:
                    problems.append(f"{where}: ep_step record without an integer step and a bytes table, skipped")
    if out["schema"] is None:
        raise LogError(f"{path}: no log_start record (empty or cut-off log of rank {rank})")
    return out


def read_run(run_dir: str | Path) -> RunLog:
    """Read and check one run folder (``LOG_DIR/<run-id>``); see the module docstring."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise LogError(f"{run_dir}: no such folder (runs are in LOG_DIR/<run-id>/, default logs/)")
    files = rank_files(run_dir)
    if not files:
        raise LogError(f"{run_dir}: no rank-*.jsonl logs (is it a run folder? runs are in LOG_DIR/<run-id>/)")
    problems: list[str] = []
    ranks = {r: _read_rank(p, r, problems) for r, p in files.items()}
    if 0 not in ranks or ranks[0]["config"] is None:
        raise LogError(f"{run_dir}: rank 0's log has no 'config' record (not a launch.train run, or rank 0 "
                       f"died before logging it)")
    log = RunLog(run_dir=run_dir, config=ranks[0]["config"], spans={}, problems=problems,
                 progress=ranks[0]["progress"])
    host0 = ranks[0]["host"]
    for r, got in ranks.items():
        log.hosts[r] = got["host"]
        off = 0
        if got["clock"] is not None:
            measured = int(got["clock"]["offset_ns"])
            off = 0 if got["host"] == host0 else measured
            log.clocks[r] = {"offset_ns": off, "measured_ns": measured, "rtt_ns": int(got["clock"].get("rtt_ns", 0))}
        elif got["host"] != host0:
            problems.append(f"{files[r]}: rank {r} runs on {got['host']}, rank 0 on {host0}, and it logged no "
                            f"clock offset: its times are not aligned with rank 0's")
        if off:
            for rec in got["spans"]:
                rec["t0"] += off
                rec["t1"] += off
        log.spans[r] = got["spans"]
        if got["ep_steps"]:
            log.ep_steps[r] = got["ep_steps"]
    return log
