"""Per-rank structured logs: JSON lines in ``<log_dir>/<run_id>/rank-<r>.jsonl``.

Configured once per process by :func:`configure`; every line carries ``run_id``, ``rank``, ``host``
and ``role``, an ISO wall-clock ``timestamp`` and the ``event`` name. Timed work is logged as
``event="span"`` lines (schema and its version: :mod:`runtime.spans`) with ``t0``/``t1`` from
``time.monotonic_ns()`` — one clock per host; the ``clock`` record (:mod:`runtime.clock`) puts the
ranks of other hosts on rank 0's time axis. Every run gets its own folder (:func:`create_run_dir`).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import secrets
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import structlog

from runtime import spans

__all__ = ["configure", "get_logger", "span", "record_span", "log_path", "flush", "fresh_run_id", "create_run_dir"]

_configured: dict = {}


def log_path(log_dir: str | os.PathLike, run_id: str, rank: int) -> Path:
    """Where rank ``rank`` of run ``run_id`` writes its log."""
    return Path(log_dir) / run_id / f"rank-{rank}.jsonl"


def fresh_run_id(prefix: str = "train") -> str:
    """``PREFIX-YYYYmmdd-HHMMSS-xxxxxx``: sortable by start time, and a random suffix so that two
    runs started in the same second (or on two machines) never get the same id."""
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def create_run_dir(log_dir: str | os.PathLike, run_id: str) -> Path:
    """Create ``log_dir/run_id`` (absolute), failing if it exists: two runs never share log files.

    Call it once per job (rank 0) and hand the path to the other ranks.
    """
    path = Path(log_dir).resolve() / run_id
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        path.mkdir()
    except FileExistsError:
        raise FileExistsError(f"log folder {path} exists (another run wrote there): pass a new --run-id, "
                              f"or none for a fresh one") from None
    return path


def configure(*, run_id: str, rank: int, role: str, log_dir: str | os.PathLike = "logs",
              level: str = "info", echo: bool = False) -> structlog.typing.FilteringBoundLogger:
    """Set up this process's logger (once; a second call with other values raises).

    ``echo`` also writes warnings and errors to stderr, where mpiexec shows them.
    """
    key = (run_id, rank, role, str(log_dir), level, echo)
    if _configured:
        if _configured["key"] != key:
            raise RuntimeError(f"logging already configured for {_configured['key']}, not {key}")
        return _configured["logger"]
    levels = {"debug": 10, "info": 20, "warning": 30, "error": 40}
    if level not in levels:
        raise ValueError(f"level={level!r}: must be one of {list(levels)}")
    path = log_path(log_dir, run_id, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = path.open("ab", buffering=1 << 16)
    processors = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if echo:
        processors.append(_echo_to_stderr)
    processors.append(structlog.processors.JSONRenderer(serializer=_dumps))
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(levels[level]),
        logger_factory=structlog.BytesLoggerFactory(fh),
        cache_logger_on_first_use=True,
    )
    context = {"run_id": run_id, "rank": rank, "host": socket.gethostname(), "role": role, "pid": os.getpid()}
    structlog.contextvars.bind_contextvars(**context)
    logger = structlog.get_logger()
    # Spans (several per pipeline action, on the step's critical path) skip the processor chain:
    # the same line, built directly, costs about half (see record_span).
    span_out = structlog.BytesLogger(fh).msg if levels[level] <= levels["info"] else None
    _configured.update(key=key, logger=logger, file=fh, span_context=context, span_out=span_out)
    logger.info(spans.LOG_START, schema=spans.SCHEMA_VERSION, t_mono=time.monotonic_ns(), t_wall=time.time())
    return logger


_ENCODER = json.JSONEncoder(default=str, separators=(",", ":"))


def _dumps(obj, **kw) -> bytes:
    # BytesLogger writes bytes; unknown objects (dtypes, paths) are logged by their str().
    return _ENCODER.encode(obj).encode()


def _echo_to_stderr(logger, method: str, event: dict) -> dict:
    if method in ("warning", "error", "critical", "exception"):
        extra = {k: v for k, v in event.items() if k not in ("event", "timestamp", "run_id", "pid", "level")}
        print(f"[{method}] {event.get('event')}: {extra}", file=sys.stderr, flush=True)
    return event


def get_logger() -> structlog.typing.FilteringBoundLogger:
    """The configured logger (a stderr logger when :func:`configure` was not called)."""
    return _configured["logger"] if _configured else structlog.get_logger()


def flush() -> None:
    """Push buffered log lines to disk (call before an abort)."""
    fh = _configured.get("file")
    if fh is not None:
        fh.flush()


def record_span(name: str, t0: int, t1: int, **fields) -> None:
    """Log one finished span ``name`` (a :mod:`runtime.spans` name) from monotonic ``t0`` to ``t1`` (ns).

    Once :func:`configure` ran, the line is written directly: the same keys and values the logger's
    processors would add (context, level, UTC ISO timestamp), through the same locked, flushed file
    writer, at a fraction of the cost of the structlog chain.
    """
    if not _configured:
        get_logger().info(spans.SPAN, span=name, t0=t0, t1=t1, dur_us=(t1 - t0) / 1e3, **fields)
        return
    out = _configured["span_out"]
    if out is None:  # spans are info lines: filtered out below the configured level
        return
    event = {**_configured["span_context"], "span": name, "t0": t0, "t1": t1, "dur_us": (t1 - t0) / 1e3, **fields,
             "event": spans.SPAN, "level": "info",
             "timestamp": datetime.datetime.now(tz=datetime.timezone.utc).isoformat().replace("+00:00", "Z")}
    out(_dumps(event))


@contextlib.contextmanager
def span(name: str, **fields) -> Iterator[None]:
    """Time the block and log it as a span (logged even when the block raises)."""
    t0 = time.monotonic_ns()
    try:
        yield
    finally:
        record_span(name, t0, time.monotonic_ns(), **fields)
