"""Log analysis: what a run's per-rank JSON logs say (pure functions; no MPI, no torch).

Split by concern: :mod:`~runtime.analysis.load` (reading, schema check, clock alignment),
:mod:`~runtime.analysis.steps` (per-step idle split), :mod:`~runtime.analysis.messages`
(communication, overlap, traffic by link class), :mod:`~runtime.analysis.predict` (the schedule
simulator with measured costs), :mod:`~runtime.analysis.attribution` (bubble time per schedule
action), :mod:`~runtime.analysis.summary` (the figures), :mod:`~runtime.analysis.trace` (Chrome /
Perfetto trace) and :mod:`~runtime.analysis.timeline` (PNG; needs matplotlib). The command line is
``python -m launch.analyze``.
"""

from runtime.analysis.load import LogError, RunLog, newest_run, read_run
from runtime.analysis.steps import StepLog, select_steps, split_steps
from runtime.analysis.summary import Replica, replica, report, summarize

__all__ = ["LogError", "Replica", "RunLog", "StepLog", "newest_run", "read_run", "replica", "report", "select_steps",
           "split_steps", "summarize"]
