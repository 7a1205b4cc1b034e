"""The training configuration tree: model, optimizer, pipeline and run settings.

Plain ``@dataclass(kw_only=True, slots=True)`` trees with a docstring per field; each checks
itself in ``__post_init__`` and raises ValueError naming the field and the fix. A TOML file maps
onto the tree section by section (``[model]``, ``[optim]``, ``[pipeline]``, top-level run keys);
``launch.train`` applies command-line flags on top.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from actors.model import ModelConfig
from actors.optim import OptimConfig
from kernels import backend_for
from runtime.schedules import KINDS_TABLE, SCHEDULE_NAMES
from topology.kinds import KINDS

__all__ = ["PipelineConfig", "TrainConfig", "load_toml", "from_dict", "resolve_precision"]


@dataclass(kw_only=True, slots=True)
class PipelineConfig:
    """How the model is cut and scheduled across pipeline ranks."""

    schedule: str = "dualpipe"
    """One of dualpipe, dualpipev, 1f1b, zb1p."""
    pp: int = 4
    """Pipeline ranks (= MPI ranks). dualpipev places 2*pp stages on them, the others pp stages."""
    microbatches: int = 8
    """Microbatches per optimizer step (dualpipe: even and >= 2*pp; dualpipev: >= 2*pp)."""
    micro_batch: int = 2
    """Sequences per microbatch (the global one: each of a stage's ep ranks takes micro_batch / ep)."""
    ep: int = 1
    """Expert-parallel ranks per pipeline stage (MPI ranks = pp x ep): each routes its own rows and
    holds 1/ep of every MoE layer's routed experts."""
    nodes: int = 1
    """Emulated nodes each stage's EP group spans (ep / nodes ranks per node): dispatch crosses them
    (launch.local: the job gets pp x nodes nodes of ep / nodes ranks)."""
    redundant_experts: int = 0
    """Extra routed-expert slots per MoE layer over each EP group (EPLB's redundant experts; needs
    ep > 1): the placement puts replicas where they even out the load, and with rank_kind a slower
    rank gets fewer experts (with one slot per expert every rank holds the same share)."""

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULE_NAMES:
            raise ValueError(f"pipeline.schedule={self.schedule!r}: choose one of {', '.join(SCHEDULE_NAMES)}")
        for name in ("pp", "microbatches", "micro_batch", "ep", "nodes"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"pipeline.{name}={v!r}: must be a positive integer")
        if self.ep % self.nodes:
            raise ValueError(f"pipeline.nodes={self.nodes}: must divide ep={self.ep} (every node of an EP group "
                             f"holds the same number of its ranks); choose nodes among "
                             f"{[d for d in range(1, self.ep + 1) if self.ep % d == 0]}")
        if self.micro_batch % self.ep:
            raise ValueError(f"pipeline.micro_batch={self.micro_batch}: must be divisible by ep={self.ep} (each ep "
                             f"rank takes micro_batch / ep rows); use a multiple of {self.ep}")
        r = self.redundant_experts
        if not isinstance(r, int) or isinstance(r, bool) or r < 0:
            raise ValueError(f"pipeline.redundant_experts={r!r}: must be an integer >= 0")
        if r and self.ep == 1:
            raise ValueError(f"pipeline.redundant_experts={r}: replicas spread experts over an EP group; "
                             f"set ep > 1 or drop it")

    @property
    def num_stages(self) -> int:
        """Model stages the schedule's layout puts on ``pp`` ranks (dualpipev: 2*pp, else pp)."""
        return KINDS_TABLE[self.schedule].num_stages(self.pp)


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    """A whole training run."""

    model: ModelConfig = field(default_factory=ModelConfig.small)
    """Model shape and precision."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """AdamW settings and gradient clipping."""
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    """Schedule, ranks and microbatching."""
    steps: int = 60
    """Optimizer steps to run."""
    seed: int = 0
    """Seeds parameters and the synthetic data."""
    data: str | None = None
    """Token file (numpy array of token ids, see actors.data.TokenFile); None: the synthetic task."""
    log_dir: str = "logs"
    """Per-rank JSON logs go to LOG_DIR/RUN_ID/rank-R.jsonl."""
    run_id: str | None = None
    """Log folder name; None: a fresh time-stamped id."""
    torch_threads: int = 1
    """torch intra-op threads per rank (1 = one core per rank, the setting for timings)."""
    trace: bool = True
    """Log a span for every compute, send, receive and wait (feeds the log analysis)."""
    rank_precision: list[str] | None = None
    """Per-rank override of model.precision (fp32, bf16, fp8 or auto), one entry per pipeline rank
    (all its ep ranks) or, with ep > 1, one per MPI rank (pp x ep, rank order): e.g. FP8 ranks on
    Hopper nodes and BF16 ranks on devices without FP8 in one job, in one EP group too."""
    rank_kind: list[str] | None = None
    """Each rank's device kind from the cluster description (topology.kinds.KINDS: h800, ascend910c,
    ...), one per pipeline rank or, with ep > 1, one per MPI rank; launch.cluster passes it. With
    ep > 1 the expert placement gives every rank load in proportion to its kind's speed (KINDS: at
    the precision the kind trains in) (pipeline.redundant_experts lets it move whole experts to the faster ranks)."""
    checkpoint_dir: str = "checkpoints"
    """Checkpoints go to CHECKPOINT_DIR/step-NNNNNNNN/ (one shard per rank, manifest written last)."""
    checkpoint_every: int = 0
    """Write a checkpoint after every N-th optimizer step (0: never)."""
    resume: bool = False
    """Continue from the newest complete checkpoint in checkpoint_dir (bit-exact in fp32)."""
    device: str = "auto"
    """Where each rank computes: auto (its own CUDA GPU by local rank, else an Ascend NPU, else the
    CPU), cpu, cuda, cuda:N, npu or npu:N (runtime.device)."""
    share_device: bool = False
    """Let several ranks of a node bind the same device when it has fewer devices than ranks
    (e.g. a multi-rank test on a one-GPU machine); off, that is an error."""
    nonfinite: str = "stop"
    """What a NaN/Inf loss or gradient norm does: "stop" the job with a report, or "skip" the step
    (no optimizer update, no bias update; the report is logged and training goes on)."""

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps={self.steps!r}: must be a positive integer")
        if not isinstance(self.torch_threads, int) or self.torch_threads < 1:
            raise ValueError(f"torch_threads={self.torch_threads!r}: must be >= 1")
        if not re.fullmatch(r"auto|cpu|(cuda|npu)(:\d+)?", str(self.device)):
            raise ValueError(f"device={self.device!r}: choose auto, cpu, cuda, cuda:N, npu or npu:N")
        if self.pipeline.num_stages > self.model.num_layers:
            raise ValueError(f"pipeline: {self.pipeline.schedule} on pp={self.pipeline.pp} needs "
                             f"{self.pipeline.num_stages} stages but model.num_layers={self.model.num_layers}: "
                             f"use more layers or fewer ranks")
        if self.rank_precision is not None:
            self.rank_precision = list(self.rank_precision)
            pp, ranks = self.pipeline.pp, self.pipeline.pp * self.pipeline.ep
            if len(self.rank_precision) not in (pp, ranks):
                per_rank = f" or one per rank ({ranks}, ep={self.pipeline.ep})" if ranks != pp else ""
                raise ValueError(f"rank_precision has {len(self.rank_precision)} entries for pp={pp} ranks: give one "
                                 f"per rank{per_rank}")
            for r, p in enumerate(self.rank_precision):
                if p not in ("fp32", "bf16", "fp8", "auto"):
                    raise ValueError(f"rank_precision[{r}]={p!r}: choose fp32, bf16, fp8 or auto")
        if self.rank_kind is not None:
            self.rank_kind = list(self.rank_kind)
            pp, ranks = self.pipeline.pp, self.pipeline.pp * self.pipeline.ep
            if len(self.rank_kind) not in (pp, ranks):
                raise ValueError(f"rank_kind has {len(self.rank_kind)} entries: give one per pipeline rank ({pp})"
                                 + (f" or one per rank ({ranks})" if ranks != pp else ""))
            for r, k in enumerate(self.rank_kind):
                if k not in KINDS:
                    raise ValueError(f"rank_kind[{r}]={k!r}: unknown device kind; known: {', '.join(KINDS)}")
        if not isinstance(self.checkpoint_every, int) or self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every={self.checkpoint_every!r}: must be >= 0 (0 disables checkpoints)")
        if self.nonfinite not in ("stop", "skip"):
            raise ValueError(f"nonfinite={self.nonfinite!r}: choose stop (end the job) or skip (drop the step)")
        if self.data is not None and not Path(self.data).exists():
            raise ValueError(f"data={self.data!r}: no such file (omit it to use the synthetic task)")


def rank_speeds(cfg: TrainConfig) -> list[float] | None:
    """Every MPI rank's relative speed (topology.kinds.KINDS, at the precision its kind trains in), in
    rank order, from rank_kind; None without it (all ranks alike)."""
    kinds = cfg.rank_kind
    if kinds is None:
        return None
    ep = cfg.pipeline.ep
    per_rank = kinds if len(kinds) == cfg.pipeline.pp * ep else [k for k in kinds for _ in range(ep)]
    return [KINDS[k].speed for k in per_rank]


def resolve_precision(cfg: TrainConfig, rank: int, device: str = "cpu") -> str:
    """The GEMM backend rank ``rank`` runs: its rank_precision entry or model.precision, with
    ``auto`` chosen from the device (fp8 on Hopper, bf16 elsewhere) and checked that it can run."""
    per = cfg.rank_precision
    wanted = (per[rank if len(per) > cfg.pipeline.pp else rank // cfg.pipeline.ep] if per else cfg.model.precision)
    return backend_for(device, None if wanted == "auto" else wanted)


# Scalar field annotations checked before construction, so that a TOML value of the wrong type
# (``pp = "4"``) is a ValueError naming the field instead of a TypeError deep in __post_init__.
_SCALAR_TYPES = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,)}


def _build(cls, values: dict, where: str):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(values) - set(fields)
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}; known: {sorted(fields)}")
    for name, value in values.items():
        ann = str(fields[name].type)
        optional = ann.endswith(" | None")
        want = _SCALAR_TYPES.get(ann.removesuffix(" | None"))
        if want is None or (optional and value is None):
            continue
        if not isinstance(value, want) or (bool not in want and isinstance(value, bool)):
            raise ValueError(f"{where} {name}={value!r}: must be {ann.replace(' | None', '')}, "
                             f"got {type(value).__name__} (write it without quotes if it is a number)")
    return values


def load_toml(path: str | Path, overrides: dict | None = None) -> TrainConfig:
    """Read a TOML config and apply ``overrides`` (``{"pipeline": {...}, "model": {...}, "steps": 5}``)."""
    raw = {}
    if path:
        try:
            raw = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ValueError(f"config {str(path)!r}: no such file (check the --config path)") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"config {str(path)!r}: cannot read it ({exc}); pass a readable TOML file") from None
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"config {str(path)!r}: not valid TOML ({exc}); fix the file") from None
    return from_dict(raw, overrides)


def from_dict(raw: dict, overrides: dict | None = None) -> TrainConfig:
    """Build the tree from nested dicts; ``overrides`` win over ``raw`` key by key."""
    for section in ("model", "optim", "pipeline"):
        if section in raw and not isinstance(raw[section], dict):
            raise ValueError(f"{section}={raw[section]!r}: must be a [{section}] table of keys")
    merged = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for k, v in (overrides or {}).items():
        if isinstance(v, dict):
            merged.setdefault(k, {}).update(v)
        else:
            merged[k] = v
    model_kw = dict(merged.pop("model", {}))
    preset = model_kw.pop("preset", "small")
    if preset not in ("tiny", "small"):
        raise ValueError(f"model.preset={preset!r}: choose tiny or small")
    base = dataclasses.asdict(getattr(ModelConfig, preset)())
    model = ModelConfig(**{**base, **_build(ModelConfig, model_kw, "[model]")})
    optim = OptimConfig(**_build(OptimConfig, merged.pop("optim", {}), "[optim]"))
    pipeline = PipelineConfig(**_build(PipelineConfig, merged.pop("pipeline", {}), "[pipeline]"))
    return TrainConfig(model=model, optim=optim, pipeline=pipeline, **_build(TrainConfig, merged, "top level"))
