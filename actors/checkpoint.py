"""Checkpoints: one shard per rank, written atomically, a manifest written last, resumed bit-exactly.

``DIR/step-00000010/`` holds ``rank-R.pt`` for every rank of the job (R: its COMM_WORLD rank; under
expert parallelism each rank of a stage's expert group holds its own expert slots) and
``manifest.json``. A shard is everything rank R's future depends on: its chunks' parameters, expert
slots and balancing biases (the modules' state dicts), AdamW's moments and step counts, torch's (and CUDA's) RNG state and the
next step (the data position: every microbatch is a pure function of ``(seed, step, index)``).
Each file is
written to a temporary name, fsynced and renamed, so a reader sees a whole file or none; rank 0
writes the manifest (layout, run settings, size and SHA-256 of every shard) only after every rank
has reported its shard, so a checkpoint without a manifest was interrupted and is never loaded —
:func:`latest` falls back to the previous complete one.

A checkpoint is tied to the layout its shards were cut for (schedule, pipeline and expert-parallel
ranks, emulated nodes, model shape); resuming under another layout is refused naming every field
that differs. The expert placement needs no shard: it is a pure function of that layout.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import shutil
from pathlib import Path

import torch
from mpi4py import MPI

from actors.config import TrainConfig

__all__ = ["FORMAT", "layout_of", "layout_diff", "latest", "save", "restore"]

FORMAT = 1
"""Shard and manifest format version; a checkpoint of another version is refused."""
_KEEP = 2
"""Complete checkpoints kept: the newest and one before it (the fallback if the newest is damaged)."""
_NOT_LAYOUT = ("precision",)
"""Model fields a resume may change: they alter the arithmetic, not the shards' contents."""


def layout_of(cfg: TrainConfig) -> dict:
    """What a shard's contents depend on: schedule, pipeline and expert-parallel ranks, nodes, model shape."""
    model = {k: v for k, v in dataclasses.asdict(cfg.model).items() if k not in _NOT_LAYOUT}
    return {"format": FORMAT, "schedule": cfg.pipeline.schedule, "pp": cfg.pipeline.pp, "ep": cfg.pipeline.ep,
            "nodes": cfg.pipeline.nodes, "model": model}


def layout_diff(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """``field: checkpoint X, this run Y`` for every leaf where two layouts differ (sorted)."""
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += layout_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: checkpoint {a!r}, this run {b!r}")
    return out


def _step_dirs(root: Path) -> list[Path]:
    return sorted((p for p in root.glob("step-*") if p.is_dir() and p.name[5:].isdigit()), reverse=True)


def _complete(step_dir: Path) -> tuple[dict | None, str]:
    """``(manifest, "")`` if the checkpoint in ``step_dir`` is whole (manifest present, every shard
    there with its recorded size), else ``(None, why not)``."""
    try:
        manifest = json.loads((step_dir / "manifest.json").read_text())
        shards = manifest["shards"]
        expected = manifest["layout"]["pp"] * manifest["layout"]["ep"]
        if len(shards) != expected:
            return None, f"manifest lists {len(shards)} shards, its layout needs {expected}"
        for s in shards:
            size = (step_dir / s["file"]).stat().st_size
            if size != s["bytes"]:
                return None, f"{s['file']} has {size} bytes, the manifest says {s['bytes']}"
    except FileNotFoundError as exc:
        return None, f"{Path(exc.filename).name} missing"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return None, f"unreadable manifest or shard ({type(exc).__name__}: {exc})"
    return manifest, ""


def latest(root: str | os.PathLike, *, skipped: list[str] | None = None) -> tuple[Path, dict] | None:
    """The newest complete checkpoint under ``root`` as ``(folder, manifest)``; None if there is none.
    ``skipped``: if given, gets ``"step-N: why"`` for every newer checkpoint passed over as incomplete."""
    root = Path(root)
    if not root.is_dir():
        return None
    for d in _step_dirs(root):
        manifest, why = _complete(d)
        if manifest is not None:
            return d, manifest
        if skipped is not None:
            skipped.append(f"{d.name}: {why}")
    return None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def save(root: str | os.PathLike, actor, cfg: TrainConfig, next_step: int, comm: MPI.Comm = MPI.COMM_WORLD) -> Path:
    """Write the checkpoint taken after ``next_step`` optimizer steps (collective over ``comm``,
    the whole job: one shard per rank of it).

    ``actor`` is the rank's :class:`~actors.pipeline.StageActor`. Returns the checkpoint folder.
    """
    step_dir = Path(root) / f"step-{next_step:08d}"
    step_dir.mkdir(parents=True, exist_ok=True)
    shard = {
        "format": FORMAT,
        "rank": comm.rank,
        "next_step": next_step,
        "stages": dict(actor.stage_ids),
        "chunks": {c: mod.state_dict() for c, mod in actor.chunks.items()},
        "optimizer": actor.optimizer.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state(actor.device) if actor.device.type == "cuda" else None,
    }
    buf = io.BytesIO()
    torch.save(shard, buf)
    data = buf.getvalue()
    name = f"rank-{comm.rank}.pt"
    _write_atomic(step_dir / name, data)
    entries = comm.gather({"rank": comm.rank, "file": name, "bytes": len(data),
                           "sha256": hashlib.sha256(data).hexdigest()}, root=0)
    if comm.rank == 0:
        manifest = {"format": FORMAT, "next_step": next_step, "layout": layout_of(cfg),
                    "run": {"seed": cfg.seed, "data": cfg.data, "microbatches": cfg.pipeline.microbatches,
                            "micro_batch": cfg.pipeline.micro_batch},
                    "shards": sorted(entries, key=lambda e: e["rank"])}
        _write_atomic(step_dir / "manifest.json", json.dumps(manifest, indent=1).encode())
        # Keep this checkpoint and the newest complete one before it (the fallback); drop older
        # ones and interrupted ones older than this.
        older = [d for d in _step_dirs(Path(root)) if d.name < step_dir.name]
        keep = [d for d in older if _complete(d)[0] is not None][:_KEEP - 1]
        for d in older:
            if d not in keep:
                shutil.rmtree(d, ignore_errors=True)
    return step_dir


def restore(step_dir: Path, manifest: dict, actor, rank: int) -> int:
    """Load rank ``rank``'s shard (its COMM_WORLD rank) of a complete checkpoint into ``actor``;
    returns the next step.

    The layout must already have been checked (:func:`layout_diff`, done before any work by
    :func:`actors.preflight.preflight`). Raises ValueError if the shard's bytes do not match the
    manifest (a damaged file).
    """
    entry = manifest["shards"][rank]
    data = (step_dir / entry["file"]).read_bytes()
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise ValueError(f"checkpoint {step_dir}: {entry['file']} does not match its manifest checksum "
                         f"(damaged); delete {step_dir} to resume from the one before it")
    # tensors straight onto this rank's device, whichever device index wrote them
    shard = torch.load(io.BytesIO(data), map_location=actor.device, weights_only=True)
    if shard["stages"] != dict(actor.stage_ids):
        raise ValueError(f"checkpoint {step_dir}: rank {rank} held stages {shard['stages']}, this run places "
                         f"{dict(actor.stage_ids)} on it")
    for c, mod in actor.chunks.items():
        mod.load_state_dict(shard["chunks"][c])  # copies in place: the .grad views stay valid
    actor.optimizer.load_state_dict(shard["optimizer"])
    torch.set_rng_state(shard["torch_rng"].cpu())
    if shard["cuda_rng"] is not None and actor.device.type == "cuda":
        torch.cuda.set_rng_state(shard["cuda_rng"].cpu(), actor.device)
    return int(shard["next_step"])
