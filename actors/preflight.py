"""Every check a training run can make before any work, each failing with the field and the fix.

:func:`preflight` runs on each rank straight after the configuration is parsed and before a model,
a log folder or a message exists. The configuration tree has already checked each value on its own
(``__post_init__``); here go the checks that need the job or the disk: ranks against the layout,
the schedule generator's constraints, the token file (readable, integer ids inside the vocabulary,
long enough) and the checkpoint folder (a checkpoint to resume from, of the same layout; no
checkpoints of another run to overwrite). Every rank reaches the same verdict from the same inputs.
"""

from __future__ import annotations

from pathlib import Path

from actors import checkpoint
from actors.config import TrainConfig
from actors.data import TokenFile
from runtime.schedules import Schedule, build

__all__ = ["preflight"]


def preflight(cfg: TrainConfig, world_size: int) -> tuple[Schedule, tuple[Path, dict] | None]:
    """Check ``cfg`` against a job of ``world_size`` ranks and the files it names.

    Returns the schedule and, with ``cfg.resume``, the checkpoint to resume from (folder, manifest).
    Raises ValueError whose message names the field and the fix.
    """
    pp, ep = cfg.pipeline.pp, cfg.pipeline.ep
    if world_size != pp * ep:
        layout = f"--pp {pp}" if ep == 1 else f"--pp {pp} x --ep {ep}"
        other = f"--pp {world_size}" if ep == 1 else "another --pp / --ep"
        raise ValueError(f"{layout} needs {pp * ep} MPI ranks, the job has {world_size}: run with -n {pp * ep} "
                         f"(make run RANKS={pp * ep}) or pass {other}")
    if ep > 1:
        _check_expert_parallel(cfg)
    try:
        schedule = build(cfg.pipeline.schedule, pp, cfg.pipeline.microbatches)
    except ValueError as exc:
        raise ValueError(f"pipeline: {exc}") from None
    if cfg.data is not None:
        _check_token_file(cfg)
    return schedule, _check_checkpoints(cfg)


def _check_expert_parallel(cfg: TrainConfig) -> None:
    m, ep, nodes = cfg.model, cfg.pipeline.ep, cfg.pipeline.nodes
    if m.num_routed_experts % ep:
        raise ValueError(f"--ep {ep}: must divide model.num_routed_experts={m.num_routed_experts} (each ep rank "
                         f"holds experts / ep slots); choose ep among "
                         f"{[d for d in range(1, m.num_routed_experts + 1) if m.num_routed_experts % d == 0]}")
    if m.num_groups % nodes:
        raise ValueError(f"--nodes {nodes}: must divide model.num_groups={m.num_groups} (node-limited routing "
                         f"homes whole expert groups on the EP group's nodes); choose nodes dividing {m.num_groups}")
    per_rank = cfg.rank_precision if cfg.rank_precision and len(cfg.rank_precision) > cfg.pipeline.pp else None
    if per_rank:  # the two-hop dispatch sends a node one format (actors.ep_wire): one precision per node
        size = ep // nodes
        for first in range(0, len(per_rank), size):
            on_node = set(per_rank[first:first + size]) - {"auto"}
            if len(on_node) > 1:
                raise ValueError(f"rank_precision: ranks {first}..{first + size - 1} share an emulated node (--nodes "
                                 f"{nodes}: {size} ranks per node) but have precisions {sorted(on_node)}; give the "
                                 f"ranks of one node one precision")


def _check_token_file(cfg: TrainConfig) -> None:
    try:
        data = TokenFile(cfg.data, cfg.model.seq_len, seed=cfg.seed)
        top = data.max_token()
    except ValueError as exc:
        raise ValueError(f"data: {exc}") from None
    if data.tokens.min() < 0:
        raise ValueError(f"data={cfg.data!r}: holds negative token id {int(data.tokens.min())}; ids must be "
                         f"0..model.vocab_size-1")
    if top >= cfg.model.vocab_size:
        raise ValueError(f"data={cfg.data!r}: holds token id {top} but model.vocab_size is {cfg.model.vocab_size}: "
                         f"raise the vocabulary (config [model] vocab_size)")


def _check_checkpoints(cfg: TrainConfig) -> tuple[Path, dict] | None:
    skipped: list[str] = []
    found = checkpoint.latest(cfg.checkpoint_dir, skipped=skipped)
    if not cfg.resume:
        if cfg.checkpoint_every and found is not None:
            raise ValueError(f"checkpoint_dir={cfg.checkpoint_dir!r} already holds {found[0].name} of another run: "
                             f"pass --resume to continue it, or choose another --checkpoint-dir")
        return None
    if found is None:
        why = f" (incomplete: {'; '.join(skipped)})" if skipped else ""
        raise ValueError(f"resume: no complete checkpoint in checkpoint_dir={cfg.checkpoint_dir!r}{why}; "
                         f"drop --resume to start afresh or point --checkpoint-dir at the run's checkpoints")
    step_dir, manifest = found
    if manifest.get("format") != checkpoint.FORMAT:
        raise ValueError(f"resume: {step_dir} has checkpoint format {manifest.get('format')!r}, this version "
                         f"reads {checkpoint.FORMAT}: resume with the version that wrote it")
    diff = checkpoint.layout_diff(manifest["layout"], checkpoint.layout_of(cfg))
    if diff:
        raise ValueError(f"resume: {step_dir} was written for another layout ({'; '.join(diff)}): run with "
                         f"the checkpoint's settings or start afresh in another --checkpoint-dir")
    if manifest["next_step"] >= cfg.steps:
        raise ValueError(f"resume: {step_dir} is already at step {manifest['next_step']} of steps={cfg.steps}: "
                         f"raise --steps to train further")
    return found
