"""Which checkpoint is loadable (pure file logic; the save/resume round trip runs under mpiexec in
tests/test_reliability_mpi.py)."""

from __future__ import annotations

import json

import pytest

from actors import checkpoint
from launch.train import parse_config

CFG = parse_config(["--model", "tiny", "--pp", "2", "--schedule", "dualpipe", "--microbatches", "4"])


def _fake(root, step: int, *, manifest: bool = True, sizes=(10, 10), written=(10, 10)):
    d = root / f"step-{step:08d}"
    d.mkdir(parents=True)
    for r, n in enumerate(written):
        if n is not None:
            (d / f"rank-{r}.pt").write_bytes(b"x" * n)
    if manifest:
        shards = [{"rank": r, "file": f"rank-{r}.pt", "bytes": n, "sha256": ""} for r, n in enumerate(sizes)]
        (d / "manifest.json").write_text(json.dumps({"format": checkpoint.FORMAT, "next_step": step,
                                                     "layout": checkpoint.layout_of(CFG), "shards": shards}))
    return d


def test_latest_skips_checkpoints_without_manifest_or_with_short_shards(tmp_path):
    assert checkpoint.latest(tmp_path / "none") is None
    _fake(tmp_path, 5)
    ten = _fake(tmp_path, 10)
    _fake(tmp_path, 15, manifest=False)  # killed before the manifest
    _fake(tmp_path, 20, written=(10, 4))  # a shard shorter than its manifest says
    _fake(tmp_path, 25, written=(10, None))  # a shard missing
    (tmp_path / "step-00000030").mkdir()
    (tmp_path / "step-00000030" / "manifest.json").write_text("{not json")
    skipped = []
    found = checkpoint.latest(tmp_path, skipped=skipped)
    assert found is not None and found[0] == ten and found[1]["next_step"] == 10
    assert [s.split(":", 1)[0] for s in skipped] == [f"step-{n:08d}" for n in (30, 25, 20, 15)]
    assert "JSONDecodeError" in skipped[0] and "rank-1.pt missing" in skipped[1]
    assert "rank-1.pt has 4 bytes, the manifest says 10" in skipped[2] and "manifest.json missing" in skipped[3]


def test_layout_diff_names_every_differing_field():
    other = parse_config(["--model", "tiny", "--pp", "2", "--schedule", "1f1b", "--microbatches", "4",
                          "--hidden", "32", "--precision", "bf16"])
    diff = checkpoint.layout_diff(checkpoint.layout_of(CFG), checkpoint.layout_of(other))
    assert diff == ["model.hidden: checkpoint 16, this run 32", "schedule: checkpoint 'dualpipe', this run '1f1b'"]


def test_restore_refuses_a_shard_whose_bytes_do_not_match_the_manifest(tmp_path):
    d = _fake(tmp_path, 5)
    manifest = json.loads((d / "manifest.json").read_text())
    with pytest.raises(ValueError, match="does not match its manifest checksum"):
        checkpoint.restore(d, manifest, actor=None, rank=1)


def test_atomic_write_leaves_only_the_final_file(tmp_path):
    checkpoint._write_atomic(tmp_path / "a.bin", b"abc")
    checkpoint._write_atomic(tmp_path / "a.bin", b"defg")
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"] and (tmp_path / "a.bin").read_bytes() == b"defg"
