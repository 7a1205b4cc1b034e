"""The span schema: what the per-rank JSON logs record, defined once for writers and reader.

The writers (:mod:`runtime.log`, :mod:`runtime.transport`, :mod:`actors.pipeline`, ``launch.train``)
name records with the constants below; the reader (:mod:`runtime.analysis.load`) checks every
record against :data:`FIELDS` and refuses logs whose :data:`SCHEMA_VERSION` it does not know.
Change a field's meaning or remove one: bump the version (and teach the reader the old one if old
logs must stay readable). Adding an optional field or a new span name needs no bump: the reader
ignores fields and span names it does not use.

Every line is a JSON object with ``event``, ``timestamp`` (ISO, UTC), ``level``, ``run_id``,
``rank``, ``host``, ``role``, ``pid``. The events:

* ``log_start`` (first line of every file): ``schema`` (this version), ``t_mono`` (monotonic ns),
  ``t_wall`` (Unix seconds).
* ``clock``: ``offset_ns`` (add it to this rank's monotonic times to get rank 0's clock; the
  reader applies it to ranks on other hosts than rank 0's only, which share rank 0's clock),
  ``rtt_ns`` (round trip of the sample it came from: the estimate is good to about half of it),
  ``rounds`` (ping-pongs tried). See :mod:`runtime.clock`.
* ``config`` (rank 0): ``schedule``, ``pp``, ``microbatches``, ``stages``, ``tokens_per_step``, ...
* ``span``: timed work, ``span`` = one of :data:`FIELDS`' keys, ``t0``/``t1`` monotonic ns
  (``t1 >= t0``), ``dur_us``, plus the span's fields:

  - ``step`` (``step``; optional ``peak_mem_bytes``: the rank's peak resident memory so far),
  - ``tail`` (step-end work after the last action: ``step``, ``mirror_us``, ``norm_us``,
    ``optim_us``, ``gather_us``),
  - ``compute`` (one F/B/W: ``op``, ``dir``, ``mb``, ``chunk``, ``stage``, ``step``; an FB pair is
    logged as its two halves),
  - ``wait`` (a compute blocked on its input: ``kind`` act/grad, ``dir``, ``mb``, ``chunk`` = the
    waiting compute's chunk),
  - ``send`` / ``recv`` (one message, post to completion: ``peer``, ``channel``, ``kind``, ``mb``,
    ``chunk`` = the sender's (-1 on a receive of a large channel message, whose chunk does not
    travel), ``dir``, ``nbytes``, ``seq`` = its number on the (src, dst, channel)
    stream, so a send and its receive pair up exactly),
  - ``exchange`` (one expert-parallel exchange hop of this rank, post to completion, logged by
    :class:`actors.fb_overlap.WaitClock`: ``exchange`` = the stream, ``phase`` such as ``dispatch
    hop1`` / ``combine-bwd hop2``, ``link`` = ``inter-node`` (hop 1, to rail peers) or
    ``intra-node`` (hop 2), ``layer``, ``mb`` = [dir, mb, chunk], ``nbytes`` sent by this rank,
    ``peers`` sent to (itself excluded), ``context`` = ``fb`` inside an overlapped F&B pair else
    ``other``, ``wait_us`` = time this rank spent blocked on it).

* ``ep_step`` (every rank, once per step with expert parallelism): ``step``, ``bytes`` (sent by this
  rank in the step per ``<phase>_<inter|intra>`` and ``..._meta``), ``expert_load`` (per chunk, per
  MoE layer: tokens per expert summed over the EP group), ``exchange_wait_s`` (``fb`` / ``other``).
"""

from __future__ import annotations

__all__ = ["SCHEMA_VERSION", "KNOWN_VERSIONS", "LOG_START", "CLOCK", "CONFIG", "SPAN",
           "STEP", "TAIL", "COMPUTE", "WAIT", "SEND", "RECV", "EXCHANGE", "EP_STEP", "FIELDS", "missing_fields"]

SCHEMA_VERSION = 1
"""Written in every ``log_start`` record."""
KNOWN_VERSIONS = frozenset({1})
"""Versions the reader understands."""

# events
LOG_START = "log_start"
CLOCK = "clock"
CONFIG = "config"
SPAN = "span"
EP_STEP = "ep_step"

# span names
STEP = "step"
TAIL = "tail"
COMPUTE = "compute"
WAIT = "wait"
SEND = "send"
RECV = "recv"
EXCHANGE = "exchange"

_MESSAGE = ("peer", "channel", "kind", "mb", "chunk", "dir", "nbytes", "seq")
FIELDS: dict[str, tuple[str, ...]] = {
    STEP: ("step",),
    TAIL: ("step", "mirror_us", "norm_us", "optim_us", "gather_us"),
    COMPUTE: ("op", "dir", "mb", "chunk", "stage", "step"),
    WAIT: ("kind", "dir", "mb", "chunk"),
    SEND: _MESSAGE,
    RECV: _MESSAGE,
    EXCHANGE: ("exchange", "phase", "link", "layer", "mb", "nbytes", "context", "wait_us"),
}
"""Required fields of every span name besides ``t0`` and ``t1``."""


def missing_fields(rec: dict) -> str | None:
    """Why span record ``rec`` breaks the schema (None if it does not); unknown span names pass."""
    t0, t1 = rec.get("t0"), rec.get("t1")
    if not isinstance(t0, int) or not isinstance(t1, int):
        return "t0/t1 missing or not integers"
    if t1 < t0:
        return f"t1 {t1} before t0 {t0}"
    missing = [f for f in FIELDS.get(rec.get("span"), ()) if f not in rec]
    return f"{rec.get('span')} span lacks {', '.join(missing)}" if missing else None
