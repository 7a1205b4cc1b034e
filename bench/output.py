"""Where a bench's result goes: one JSON file under bench/results/, and a line saying where."""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["write_result"]


def write_result(path: str | Path, result: dict) -> Path:
    """Write ``result`` as indented JSON to ``path`` (parent folders made) and print where."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return out
