"""runtime.log: the direct span writer against the logger's own processor chain."""

from __future__ import annotations

import json
import subprocess
import sys

SCRIPT = """
import sys
from runtime import log, spans
log.configure(run_id="r", rank=3, role="stage", log_dir=sys.argv[1], level=sys.argv[2])
log.get_logger().info(spans.SPAN, span="compute", t0=1, t1=2500, dur_us=2.499, op="F", mb=1, what=type)
log.record_span("compute", 1, 2500, op="F", mb=1, what=type)
log.flush()
"""


def _lines(tmp_path, level: str) -> list[dict]:
    subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / level), level], check=True)
    text = (tmp_path / level / "r" / "rank-3.jsonl").read_text()
    return [json.loads(x) for x in text.splitlines() if '"span"' in x]


def test_record_span_writes_what_the_processor_chain_writes(tmp_path):
    """Catches the fast path dropping or renaming a context key (run_id, rank, host, role, pid, level)
    or mangling a field: the analysis would then lose or misplace the span."""
    chain, direct = _lines(tmp_path, "info")
    assert chain.pop("timestamp")[:4] == direct.pop("timestamp")[:4] and direct == chain
    assert direct["rank"] == 3 and direct["what"] == str(type)


def test_record_span_respects_the_level(tmp_path):
    assert _lines(tmp_path, "warning") == []
