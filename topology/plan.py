"""A full-scale training plan without the hardware: one step of a DeepSeek-V3-shaped model on a
described cluster, priced and simulated (pure; ``python -m launch.plan`` prints it).

How one step is priced (every assumption also lands in :attr:`Plan.assumptions`):

1. FLOPs per token of every layer from the model dimensions (:class:`ModelSpec`): 2 x each GEMM's
   weights forward (attention projections incl. MLA's low-rank ones, the gate, shared + top-k routed
   experts or the dense FFN, the output head, the MTP module), plus causal attention scores
   ``2 x heads x (qk + v head dims) x (seq + 1) / 2``. Backward = 2 x forward; the weight-gradient
   part W = the forward GEMM FLOPs (attention scores have no weights).
2. Seconds = FLOPs / (:data:`topology.kinds.REFERENCE_FLOPS` -- H800 FP8 dense peak x the cited
   :data:`topology.kinds.REFERENCE_EFFICIENCY` -- x the rank's relative speed from the cluster's table).
3. The layers are split over the schedule's stages in contiguous runs (:func:`split_stages`): by
   FLOPs alone, or *speed-aware*: each stage's FLOPs over the speed of the ranks running it,
   minimising the slowest stage -- among the splits that fit every device's memory (item 8).
4. Expert-parallel dispatch/combine per MoE layer from the link model (:mod:`topology.predict`:
   balanced random routing sampled, two-hop plan, busiest device's bytes / bandwidth + messages x
   latency, IB and NVLink hops of one exchange pipelined, so the slower sets the time). Forward:
   dispatch (FP8) + combine (BF16); backward: both as BF16 combine-sized exchanges.
5. Chunk costs for the schedule simulator: F = F compute + its EP communication, B likewise, W =
   weight-gradient compute, and an overlapped F&B pair = max(compute of both, communication of
   both) -- DualPipe hides one microbatch's all-to-all under the other's compute -- but at least
   max(F, B) (the simulator's rule). One base per stage, scaled by the stage's (F + B) ratio
   (``Costs.stage_scale``) and the rank's 1 / speed (``Costs.rank_scale``).
6. Pipeline messages: one microbatch's BF16 activations over the inter-node link.
7. After the pipeline: ZeRO-1 reduce-scatter (FP32 gradients) and all-gather (BF16 weights) over
   the data-parallel ranks of each stage, ring cost over the inter-node link, not overlapped.
8. Memory per device (:func:`rank_memories`): BF16 weights + FP32 gradients of the stages it holds,
   FP32 master + two BF16 moments sharded over its data-parallel peers (ZeRO-1), plus the activations
   V3 keeps (:func:`model_items`: norms, MLA up-projections and SwiGLU outputs recomputed, GEMM inputs
   in FP8 on FP8 kinds), each stage's times the microbatches the schedule keeps live for it
   (:func:`live_points`). The layer split keeps every device within its kind's memory.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from runtime.schedules import Costs, Schedule, SimResult, build, simulate
from runtime.schedules.actions import FB, Compute
from runtime.schedules import layout as schedule_layout
from topology.cluster import Cluster
from topology.kinds import KINDS, REFERENCE_EFFICIENCY, REFERENCE_EFFICIENCY_SOURCE, REFERENCE_FLOPS, REFERENCE_KIND
from topology.layout import Layout
from topology.placement import imbalance, rebalance
from topology.predict import predict_traffic

__all__ = ["ModelSpec", "V3_MODEL", "Item", "model_items", "RankMemory", "live_points", "rank_memories", "split_stages",
           "stage_speeds", "check_mirror_kinds",
           "EPComm", "ep_comm", "PlanConfig", "Plan", "plan_step"]

_BF16, _FP32 = 2, 4
_OPT = _FP32 + 2 * _BF16  # per parameter, sharded by ZeRO-1: FP32 master + AdamW's two moments in BF16 (V3 3.3.3)


@dataclass(kw_only=True, slots=True, frozen=True)
class ModelSpec:
    """Model dimensions (defaults: DeepSeek-V3, inference/configs/config_671B.json and the report)."""

    hidden: int = 7168
    """Model width."""
    num_layers: int = 61
    """Transformer blocks."""
    num_dense_layers: int = 3
    """Leading blocks with a dense FFN instead of MoE."""
    dense_hidden: int = 18432
    """Dense FFN intermediate size."""
    num_experts: int = 256
    """Routed experts per MoE layer."""
    top_k: int = 8
    """Routed experts per token."""
    num_shared_experts: int = 1
    """Shared experts per MoE layer (every token)."""
    moe_hidden: int = 2048
    """Expert intermediate size."""
    num_heads: int = 128
    """Attention heads."""
    q_lora_rank: int = 1536
    """MLA query latent."""
    kv_lora_rank: int = 512
    """MLA key/value latent."""
    qk_nope_dim: int = 128
    """Per-head query/key dims without rotary."""
    qk_rope_dim: int = 64
    """Per-head rotary dims."""
    v_head_dim: int = 128
    """Per-head value dims."""
    vocab: int = 129280
    """Vocabulary."""
    num_mtp: int = 1
    """Multi-token-prediction modules (V3 trains with depth 1; not counted in the 671B)."""

    def __post_init__(self) -> None:
        for name in self.__dataclass_fields__:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name in ("num_dense_layers", "num_mtp",
                                                                                   "num_shared_experts") else 1):
                raise ValueError(f"model.{name}={v!r}: must be a positive integer")
        if self.num_dense_layers > self.num_layers or self.top_k > self.num_experts:
            raise ValueError(f"model: num_dense_layers={self.num_dense_layers} must be <= num_layers and top_k="
                             f"{self.top_k} <= num_experts={self.num_experts}")

    def attention_params(self) -> int:
        h, n = self.hidden, self.num_heads
        qk = self.qk_nope_dim + self.qk_rope_dim
        return (h * self.q_lora_rank + self.q_lora_rank * n * qk + h * (self.kv_lora_rank + self.qk_rope_dim)
                + self.kv_lora_rank * n * (self.qk_nope_dim + self.v_head_dim) + n * self.v_head_dim * h)

    def expert_params(self) -> int:
        return 3 * self.hidden * self.moe_hidden

    def moe_params(self) -> int:
        """All weights of one MoE FFN (routed + shared experts + gate)."""
        return (self.num_experts + self.num_shared_experts) * self.expert_params() + self.hidden * self.num_experts

    def total_params(self) -> int:
        """Main model, without the MTP module (the report's 671B)."""
        moe_layers = self.num_layers - self.num_dense_layers
        return (self.num_layers * self.attention_params() + self.num_dense_layers * 3 * self.hidden * self.dense_hidden
                + moe_layers * self.moe_params() + 2 * self.vocab * self.hidden)

    def active_params(self) -> int:
        """Weights one token uses, main model (the report's 37B)."""
        moe_layers = self.num_layers - self.num_dense_layers
        active_moe = (self.top_k + self.num_shared_experts) * self.expert_params() + self.hidden * self.num_experts
        return (self.num_layers * self.attention_params() + self.num_dense_layers * 3 * self.hidden * self.dense_hidden
                + moe_layers * active_moe + 2 * self.vocab * self.hidden)


V3_MODEL = ModelSpec()


@dataclass(frozen=True, slots=True)
class Item:
    """One unit the layer split places whole on a stage."""

    name: str
    gemm_flops: float
    """Forward GEMM FLOPs per token."""
    attn_flops: float
    """Forward attention-score FLOPs per token (no weights)."""
    moe_layers: int
    """MoE layers inside (each one dispatch + combine)."""
    replicated_params: int
    """Weights every data-parallel rank of the stage holds."""
    expert_params: int
    """Routed-expert weights, split over the EP group."""
    act_values_fp8: int
    """Activations kept per token that an FP8 rank stores in 1 byte (GEMM inputs it quantises)."""
    act_values_e5m6: int
    """Activations kept per token that an FP8 rank stores in 12 bits (V3 3.3.2: the attention output, the
    input of the Linear after attention, in E5M6); 2 bytes on BF16 ranks."""
    act_values_bf16: int
    """Activations kept per token in BF16 on every kind."""
    routed_flops: float = 0.0
    """Forward FLOPs per token of the routed experts (part of :attr:`gemm_flops`): the work the expert
    placement spreads over an EP group by device speed; the rest runs on each data-parallel rank."""

    @property
    def fwd_flops(self) -> float:
        return self.gemm_flops + self.attn_flops

    def act_bytes(self, precision: str) -> float:
        """Activation bytes kept per token on a rank training in ``precision`` (``fp8`` or ``bf16``)."""
        if precision == "fp8":
            return self.act_values_fp8 + 1.5 * self.act_values_e5m6 + _BF16 * self.act_values_bf16
        return _BF16 * (self.act_values_fp8 + self.act_values_e5m6 + self.act_values_bf16)


def model_items(m: ModelSpec, seq: int) -> list[Item]:
    """The model as split units: the transformer blocks, then the MTP module(s), then the output head.
    The embedding (a lookup, no FLOPs) rides with the first block.

    Activations kept for the backward follow V3's memory savings (report 3.2.3 and 3.3.2): RMSNorm and
    MLA's up-projections are recomputed, so an attention block keeps its input (BF16, for the norm), the
    query and key/value latents with the rotary key (BF16: the recomputed norms' inputs) and the attention
    output (E5M6); every active expert keeps its FP8 input and FP8 SwiGLU input, and recomputes the
    SwiGLU output (the down-projection's input). Dense FFNs keep all three GEMM inputs in FP8."""
    h, n = m.hidden, m.num_heads
    attn_gemm = 2.0 * m.attention_params()
    attn_scores = 2.0 * n * (m.qk_nope_dim + m.qk_rope_dim + m.v_head_dim) * (seq + 1) / 2
    attn_bf16 = h + m.q_lora_rank + m.kv_lora_rank + m.qk_rope_dim
    attn_e5m6 = n * m.v_head_dim
    items = []
    for i in range(m.num_layers):
        if i < m.num_dense_layers:
            ffn_gemm = 2.0 * 3 * h * m.dense_hidden
            ffn_rep, ffn_exp, moe = 3 * h * m.dense_hidden, 0, 0
            fp8 = h + 2 * m.dense_hidden + m.dense_hidden  # FFN input, SwiGLU input, down-proj input
        else:
            active = m.top_k + m.num_shared_experts
            ffn_gemm = 2.0 * (active * m.expert_params() + h * m.num_experts)
            ffn_rep = m.num_shared_experts * m.expert_params() + h * m.num_experts
            ffn_exp, moe = m.num_experts * m.expert_params(), 1
            fp8 = active * (h + 2 * m.moe_hidden)  # expert input, SwiGLU input; its output recomputed (V3 3.3.2)
        items.append(Item(name=f"layer{i}", gemm_flops=attn_gemm + ffn_gemm, attn_flops=attn_scores,
                          routed_flops=2.0 * m.top_k * m.expert_params() * moe, moe_layers=moe, replicated_params=m.attention_params() + ffn_rep + (m.vocab * h if i == 0 else 0),
                          expert_params=ffn_exp, act_values_fp8=fp8, act_values_e5m6=attn_e5m6,
                          act_values_bf16=attn_bf16 + h))  # + h: the FFN block's input (its norm recomputed)
    last = items[-1]
    # the output head runs in BF16 (V3 3.3.1), so its input stays BF16; its BF16 logits feed the loss
    head_gemm = 2.0 * h * m.vocab
    for j in range(m.num_mtp):
        # MTP: projection of [hidden; embedding] (2h -> h), one MoE block, the output head -- embedding and
        # head are the main model's (V3 2.2: shared, physically, because DualPipe puts both on one rank),
        # so only the projection and the block add weights
        items.append(Item(name=f"mtp{j}", gemm_flops=2.0 * 2 * h * h + last.gemm_flops + head_gemm,
                          attn_flops=last.attn_flops, routed_flops=last.routed_flops, moe_layers=1, replicated_params=2 * h * h + last.replicated_params,
                          expert_params=last.expert_params, act_values_fp8=last.act_values_fp8 + 2 * h,
                          act_values_e5m6=last.act_values_e5m6, act_values_bf16=last.act_values_bf16 + h + m.vocab))
    items.append(Item(name="head", gemm_flops=head_gemm, attn_flops=0.0, moe_layers=0, replicated_params=h * m.vocab,
                      expert_params=0, act_values_fp8=0, act_values_e5m6=0, act_values_bf16=h + m.vocab))
    return items


@dataclass(frozen=True, slots=True)
class RankMemory:
    """One device's memory as a function of the layer split: what it keeps for the stages it holds."""

    name: str
    """``r<pipeline rank> (<kind>)``."""
    stages: tuple[int, ...]
    """Model stages it holds (two for DualPipe / DualPipeV)."""
    live: tuple[tuple[int, ...], ...]
    """Microbatches whose activations it keeps, per held stage (same order), at the moments that can be
    its peak (:func:`live_points`)."""
    state_bytes: tuple[float, ...]
    """Per item: weights, gradients and optimizer shard it keeps when the item is on a stage it holds."""
    act_bytes: tuple[float, ...]
    """Per item: activation bytes of one microbatch kept until that microbatch's backward."""
    capacity: float
    """Bytes it has (:attr:`topology.kinds.KindSpec.memory_gb`)."""

    def parts(self, counts: list[int]) -> tuple[float, float]:
        """(state bytes, peak activation bytes) for ``counts`` items per stage."""
        bounds = list(itertools.accumulate(counts, initial=0))
        state = sum(sum(self.state_bytes[bounds[s]:bounds[s + 1]]) for s in self.stages)
        acts = [sum(self.act_bytes[bounds[s]:bounds[s + 1]]) for s in self.stages]
        return state, max(sum(v * a for v, a in zip(p, acts)) for p in self.live)

    def peak(self, counts: list[int]) -> float:
        """Peak bytes for ``counts`` items per stage."""
        return sum(self.parts(counts))


def live_points(schedule: Schedule, rank: int) -> tuple[tuple[int, ...], tuple[tuple[int, ...], ...]]:
    """(held stages ascending, live activations per held stage at the moments that can be the peak).

    The simulator's rule, counted per stage in the rank's list order: a forward keeps one microbatch
    of its stage, a full backward or a weight pass frees it. The peak of any non-negative weighting
    of the stages is at a vertex of the upper convex hull of these count vectors, so only those are
    kept (one or two held stages)."""
    held = sorted({schedule.stage_of(rank, c) for c in schedule.chunks(rank)})
    if len(held) > 2:
        raise ValueError(f"{schedule.name}: rank {rank} holds {len(held)} stages; the memory model handles two")
    pos = {st: k for k, st in enumerate(held)}
    live = [0] * len(held)
    points = {tuple(live)}
    for a in schedule.ranks[rank]:
        halves = (a.f, a.b) if isinstance(a, FB) else (a,) if isinstance(a, Compute) else ()
        for c in halves:
            if c.op == "F":
                live[pos[schedule.stage_of(rank, c.chunk)]] += 1
                points.add(tuple(live))
        for c in halves:
            if c.op == "W" or (c.op == "B" and not c.split):
                live[pos[schedule.stage_of(rank, c.chunk)]] -= 1
    if len(held) == 1:
        return tuple(held), (max(points),)
    front: list[tuple[int, ...]] = []  # Pareto front, first count descending (second ascending)
    for p in sorted(points, reverse=True):
        if not front or p[1] > front[-1][1]:
            front.append(p)
    hull: list[tuple[int, ...]] = []
    for p in reversed(front):  # upper-right hull, left to right: drop points on or below a chord
        while len(hull) >= 2 and ((hull[-1][0] - hull[-2][0]) * (p[1] - hull[-2][1])
                                  - (hull[-1][1] - hull[-2][1]) * (p[0] - hull[-2][0])) >= 0:
            hull.pop()
        hull.append(p)
    return tuple(held), tuple(hull)


def split_stages(costs: list[float], speeds: list[float], memory: list[RankMemory] | tuple = ()) -> list[int]:
    """Items per stage: contiguous runs of ``costs`` onto ``len(speeds)`` stages (each gets at least
    one), minimising the largest ``sum(costs of the stage) / speed of the stage`` (exact, by dynamic
    programming) among the splits where every device of ``memory`` stays within its capacity. Equal
    speeds give the plain FLOPs-balanced split. Raises ValueError naming the fixes when none fits."""
    n, s = len(costs), len(speeds)
    if s < 1 or n < s:
        raise ValueError(f"split: {n} layers (with MTP and head) cannot fill {s} stages with at least one each; "
                         f"use fewer pipeline stages")
    if any(v <= 0 for v in speeds):
        raise ValueError("split: stage speeds must be positive")
    counts = _fastest_split(costs, speeds)
    over = [m for m in memory if m.peak(counts) > m.capacity]
    if not over:
        return counts
    # the fastest split overflows some device: search the splits that fit (exact, slower)
    fitting = _split_within(costs, speeds, memory)
    if fitting is None:
        worst = max(over, key=lambda m: m.peak(counts) / m.capacity)
        raise ValueError(
            f"memory: no split of the {n} layers (with MTP and head) over {s} stages fits every device; the "
            f"fastest split needs {worst.peak(counts) / 1e9:.1f} GB on {worst.name} (capacity "
            f"{worst.capacity / 1e9:.0f} GB). Fix: more pipeline stages (--pp), a larger expert-parallel group "
            f"(--ep: fewer experts per device), fewer sequences per microbatch (--microbatch-seqs), or devices "
            f"with more memory")
    return fitting


def _fastest_split(costs: list[float], speeds: list[float]) -> list[int]:
    """The unconstrained split: dynamic programming over (stages, items), O(stages x items^2)."""
    n, s = len(costs), len(speeds)
    prefix = list(itertools.accumulate(costs, initial=0.0))
    inf = math.inf
    # best[k][i]: min over splits of the first i items into k stages of the slowest stage time
    best = [[inf] * (n + 1) for _ in range(s + 1)]
    cut = [[0] * (n + 1) for _ in range(s + 1)]
    best[0][0] = 0.0
    for k in range(1, s + 1):
        for i in range(k, n - (s - k) + 1):
            for j in range(k - 1, i):
                t = max(best[k - 1][j], (prefix[i] - prefix[j]) / speeds[k - 1])
                if t < best[k][i]:
                    best[k][i], cut[k][i] = t, j
    counts, i = [], n
    for k in range(s, 0, -1):
        j = cut[k][i]
        counts.append(i - j)
        i = j
    return counts[::-1]


def _split_within(costs: list[float], speeds: list[float], memory: list[RankMemory] | tuple) -> list[int] | None:
    """The fastest split within every device's capacity, or None. A device's memory couples the two
    stages it holds, which DualPipe / DualPipeV pair as s and S-1-s, so the dynamic programme fills
    stage pairs from both ends inwards: state (i, j) = items [0, i) on the first stages, [j, n) on the
    last ones; for each state the next pair's ranges are tried together (numpy over i', j', j)."""
    n, num = len(costs), len(speeds)
    for m in memory:
        if len({min(st, num - 1 - st) for st in m.stages}) != 1:
            raise ValueError(f"split: {m.name} holds stages {m.stages}, not a pair s, {num - 1} - s")
    pre = np.concatenate([[0.0], np.cumsum(costs)])
    state_pre = {m.name: np.concatenate([[0.0], np.cumsum(m.state_bytes)]) for m in memory}
    act_pre = {m.name: np.concatenate([[0.0], np.cumsum(m.act_bytes)]) for m in memory}
    idx = np.arange(n + 1)
    best = np.full((n + 1, n + 1), np.inf)
    best[0, n] = 0.0
    back: list[tuple[np.ndarray, np.ndarray]] = []
    for k in range(num // 2):
        lo, hi = k, num - 1 - k  # stage lo takes [i, i'), stage hi takes [j', j)
        rest = num - 2 * (k + 1)
        mine = [m for m in memory if lo in m.stages or hi in m.stages]
        new = np.full((n + 1, n + 1), np.inf)
        from_i = np.full((n + 1, n + 1), -1)
        from_j = np.full((n + 1, n + 1), -1)
        for i in np.flatnonzero(np.isfinite(best).any(1)):
            js = np.flatnonzero(np.isfinite(best[i]))
            ip = idx[i + 1:]
            t_lo = (pre[ip] - pre[i]) / speeds[lo]  # [i']
            t_hi = (pre[js][None, :] - pre[idx][:, None]) / speeds[hi]  # [j', j]
            val = np.maximum(np.maximum(best[i, js][None, None, :], t_lo[:, None, None]), t_hi[None, :, :])
            ok = ((idx[None, :, None] - ip[:, None, None] >= rest) & (idx[None, :, None] < js[None, None, :]))
            for m in mine:
                sp, ap = state_pre[m.name], act_pre[m.name]
                # per held stage: its state and activations over its range, broadcast to [i', j', j]
                rng = {lo: ((sp[ip] - sp[i])[:, None, None], (ap[ip] - ap[i])[:, None, None]),
                       hi: ((sp[js][None, :] - sp[idx][:, None])[None], (ap[js][None, :] - ap[idx][:, None])[None])}
                state = sum(rng[st][0] for st in m.stages)
                act = np.max([sum(v * rng[st][1] for v, st in zip(p, m.stages)) for p in m.live], axis=0)
                ok &= state + act <= m.capacity
            val = np.where(ok, val, np.inf)
            arg = val.argmin(2)
            v = np.take_along_axis(val, arg[..., None], 2)[..., 0]
            better = v < new[i + 1:]
            new[i + 1:] = np.where(better, v, new[i + 1:])
            from_i[i + 1:] = np.where(better, i, from_i[i + 1:])
            from_j[i + 1:] = np.where(better, js[arg], from_j[i + 1:])
        best = new
        back.append((from_i, from_j))
    if num % 2:  # the middle stage takes what is left: [i, j)
        mid = num // 2
        t = np.where(idx[None, :] > idx[:, None], (pre[None, :] - pre[:, None]) / speeds[mid], np.inf)
        val = np.maximum(best, t)
        for m in memory:
            if mid in m.stages:
                sp, ap = state_pre[m.name], act_pre[m.name]
                peak = (sp[None, :] - sp[:, None]) + m.live[0][0] * (ap[None, :] - ap[:, None])
                val = np.where(peak <= m.capacity, val, np.inf)
        i, j = np.unravel_index(int(np.argmin(val)), val.shape)
        if not np.isfinite(val[i, j]):
            return None
        middle = [int(j - i)]
    else:
        diag = best[idx, idx]
        i = j = int(np.argmin(diag))
        if not np.isfinite(diag[i]):
            return None
        middle = []
    front, back_counts = [], []
    for from_i, from_j in reversed(back):
        pi, pj = int(from_i[i, j]), int(from_j[i, j])
        front.append(i - pi)
        back_counts.append(pj - j)
        i, j = pi, pj
    return front[::-1] + middle + back_counts


def _pp_mixes(layout: Layout) -> list[dict[str, int]]:
    """Devices of each kind among every pipeline rank's data-parallel ranks."""
    mixes: list[dict[str, int]] = [{} for _ in range(layout.pp)]
    for p in layout.places:
        mixes[p.pp][p.kind] = mixes[p.pp].get(p.kind, 0) + 1
    return mixes


def _mix_label(mix: dict[str, int]) -> str:
    """``h800``, or ``64 ascend910c + 64 h800`` for a pipeline rank whose devices mix kinds."""
    return next(iter(mix)) if len(mix) == 1 else " + ".join(f"{n} {k}" for k, n in sorted(mix.items()))


def expert_speeds(cluster: Cluster, layout: Layout, num_experts: int, num_replicas: int) -> list[float]:
    """Per pipeline rank: the routed experts' effective speed over its EP groups (the slowest group).

    A group of one kind runs at that kind's speed. A mixed group's placement weighs each device by its
    speed (``rebalance(device_speed=)``, uniform expert load): the slowest device finishes after
    ``imbalance x load / sum(speeds)``, so the group runs at ``mean speed / imbalance``. With one slot
    per expert every device holds the same share whatever its speed (``imbalance`` = fastest / slowest);
    redundant slots (``num_replicas`` > experts) let the placement move load to the fast devices."""
    cache: dict[tuple, float] = {}
    out = [math.inf] * layout.pp
    for ranks in layout.groups("ep"):
        g = layout.ep_group(ranks[0])
        speed = tuple(cluster.device_speed[layout.place(x).kind] for x in g.ranks)
        key = (speed, g.num_nodes)
        if key not in cache:
            if len(set(speed)) == 1:
                cache[key] = speed[0]
            else:
                sp = torch.tensor(speed, dtype=torch.float64)
                load = torch.ones(1, num_experts, dtype=torch.float64)
                phy2log = rebalance(load, num_replicas, g.num_nodes, g.num_nodes, g.size, device_speed=sp)[0]
                cache[key] = float(sp.mean()) / imbalance(load, phy2log, g.size, sp).item()
        r = layout.place(ranks[0]).pp
        out[r] = min(out[r], cache[key])
    return out


def check_mirror_kinds(schedule_name: str, pp_kinds: list[str]) -> None:
    """Ranks that hold the same stages (the schedule layout's mirrors: DualPipe's r and pp-1-r) must be
    of one kind, or one copy of every stage runs slower than the other. Raises ValueError naming the fix."""
    lay = schedule_layout(schedule_name, len(pp_kinds))
    for r, m in enumerate(lay.mirrors):
        if m is not None and r < m and pp_kinds[r] != pp_kinds[m]:
            raise ValueError(
                f"{schedule_name}: pipeline ranks {r} ({pp_kinds[r]}) and {m} ({pp_kinds[m]}) hold the same "
                f"two stages and must be of one kind; order the cluster's nodes so that mirror ranks r and pp-1-r "
                f"match, or use --schedule dualpipev (one copy of each stage)")


def stage_speeds(schedule: Schedule, rank_speed: list[float]) -> list[float]:
    """Speed of each model stage: the slowest rank that runs it (in any direction)."""
    return [min(rank_speed[schedule.place(d, st)[0]] for d in schedule.directions) for st in range(schedule.num_stages)]


@dataclass(frozen=True, slots=True)
class EPComm:
    """Expert-parallel communication of one MoE layer and one microbatch, busiest device, seconds."""

    forward: float
    backward: float
    mean_nodes_per_token: float
    inter_bytes_per_device: float
    """Dispatch bytes the busiest device sends or receives over the inter-node link (scaled)."""


def ep_comm(cluster: Cluster, layout: Layout, m: ModelSpec, *, tokens: int, max_nodes: int, sample_tokens: int,
            redundant: int = 0, seed: int = 0) -> EPComm:
    """Price one MoE layer's dispatch + combine for EP group 0 (see the module docstring, item 4), its
    experts placed in ``num_experts + redundant`` slots by its devices' speeds.

    Routing is sampled for ``sample_tokens`` tokens per device and byte counts scaled to ``tokens``
    (per-message latencies are not scaled: the busiest device's peer count is the same)."""
    group = layout.ep_group(0)
    num_groups = group.num_nodes
    if m.num_experts % num_groups:
        raise ValueError(f"ep={layout.ep}: its group spans {num_groups} nodes, which must divide the "
                         f"{m.num_experts} experts (groups = nodes)")
    topk_groups = num_groups if max_nodes == 0 else min(max_nodes, num_groups)
    speed = torch.tensor([cluster.device_speed[layout.place(x).kind] for x in group.ranks], dtype=torch.float64)
    phy2log, log2phy, logcnt = rebalance(torch.ones(1, m.num_experts), m.num_experts + redundant, num_groups,
                                         group.num_nodes, group.size, device_speed=speed)
    pred = predict_traffic(cluster, group, phy2log=phy2log[0], log2phy=log2phy[0], logcnt=logcnt[0],
                           num_groups=num_groups, topk_groups=topk_groups, top_k=m.top_k,
                           tokens_per_rank=sample_tokens, hidden=m.hidden, moe_hidden=m.moe_hidden, seed=seed)
    scale = tokens / sample_tokens

    def seconds(hops) -> float:
        # the two hops of one exchange are pipelined (forwarded as chunks arrive): the slower sets the time
        out = 0.0
        for hop, link in zip(hops, (cluster.inter, cluster.intra)):
            out = max(out, hop.max_device_bytes * scale / (link.bandwidth_gbs * 1e9)
                      + hop.max_device_messages * link.latency_us * 1e-6)
        return out

    dispatch, combine = seconds(pred.dispatch), seconds(pred.combine)
    return EPComm(forward=dispatch + combine, backward=2 * combine, mean_nodes_per_token=pred.mean_nodes_per_token,
                  inter_bytes_per_device=pred.dispatch[0].max_device_bytes * scale)


@dataclass(kw_only=True, slots=True, frozen=True)
class PlanConfig:
    """What to plan: parallel layout, schedule, batch and run length."""

    pp: int = 16
    """Pipeline ranks."""
    ep: int = 64
    """Expert-parallel group size (spans ep / devices-per-node nodes)."""
    schedule: str = "dualpipe"
    """dualpipe, dualpipev, 1f1b or zb1p."""
    max_nodes: int = 4
    """Node-limited routing: nodes a token may reach; 0 (or >= the EP group's nodes): no limit."""
    global_batch: int = 15360
    """Sequences per optimizer step (V3 report: 15,360 after the batch-size warm-up)."""
    seq: int = 4096
    """Tokens per sequence (V3 pre-training: 4K)."""
    microbatch_seqs: int = 1
    """Sequences per microbatch per data-parallel rank (V3 does not publish it; 1 = 4,096 tokens)."""
    split: str = "speed"
    """Layer split: ``speed`` (weighted by each stage's device speed) or ``flops`` (ignores speed)."""
    train_tokens: float = 14.8e12
    """Tokens of the whole pre-training run (V3: 14.8T)."""
    sample_tokens: int = 512
    """Routing sample per device for the link model (bytes scaled to the microbatch)."""
    redundant_experts: int = 0
    """Expert slots per EP group beyond one per expert (EPLB's redundant experts; a multiple of ep).
    V3 trained without; with devices of several speeds in one EP group they let the placement give
    the fast devices more of the load."""

    def __post_init__(self) -> None:
        for name in ("pp", "ep", "max_nodes", "global_batch", "seq", "microbatch_seqs", "sample_tokens",
                     "redundant_experts"):
            v = getattr(self, name)
            zero_ok = name in ("max_nodes", "redundant_experts")
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if zero_ok else 1):
                raise ValueError(f"plan.{name}={v!r}: must be a positive integer" + (" (0: no node limit)"
                                 if name == "max_nodes" else " or 0" if zero_ok else ""))
        if self.redundant_experts % self.ep:
            raise ValueError(f"plan.redundant_experts={self.redundant_experts}: must be a multiple of ep={self.ep} "
                             f"(every device holds the same number of slots)")
        if self.split not in ("speed", "flops"):
            raise ValueError(f"plan.split={self.split!r}: choose 'speed' or 'flops'")
        if not self.train_tokens > 0:
            raise ValueError(f"plan.train_tokens={self.train_tokens!r}: must be positive")


@dataclass(kw_only=True, slots=True)
class Plan:
    """The priced step and what follows from it (seconds, bytes)."""

    config: PlanConfig
    num_devices: int
    dp: int
    microbatches: int
    tokens_per_step: int
    pp_kinds: list[str]
    stage_layers: list[list[str]]
    """Item names on each stage."""
    costs: Costs
    pipeline_seconds: float
    """Simulated makespan of the pipeline part of a step."""
    bubble_seconds: float
    """Largest per-rank idle time in the pipeline."""
    bubble_fraction: float
    """Mean idle time over ranks / makespan."""
    alt_bubble_fraction: float
    """The same with the other split (``flops`` if planned ``speed`` and vice versa)."""
    alt_pipeline_seconds: float
    dp_sync_seconds: float
    step_seconds: float
    comm: EPComm
    comm_hidden: float
    """Fraction of EP communication time that runs under an overlapped pair's compute."""
    model_flops_per_token: float
    mfu: float
    """Model FLOPs / (step time x sum of every device's dense peak at its precision)."""
    device_hours_per_trillion: float
    memory_gb: dict[str, float]
    """Per pipeline rank and kind 'r<k> (kind)': peak memory estimate, GB."""
    memory_capacity_gb: dict[str, float]
    """Per pipeline rank and kind: the device's memory (``inf`` for a kind without figures), GB."""
    memory_worst: str
    """The device nearest its capacity (a ``memory_gb`` key)."""
    memory_parts: dict[str, float] = field(default_factory=dict)
    """Components of ``memory_worst``'s estimate, GB."""
    assumptions: list[str] = field(default_factory=list)


def rank_memories(items: list[Item], schedule: Schedule, pp_mixes: list[dict[str, int]], *, tokens: int, dp: int,
                  ep: int, num_ep_groups: int, slot_factor: float = 1.0) -> list[RankMemory]:
    """Each pipeline rank's memory model (one per kind it runs on): what V3 keeps per device.

    State (V3 3.3.3 and 3.2.3): BF16 weights and FP32 gradients of every stage it holds; FP32 master
    weights and two BF16 AdamW moments sharded over the stage's data-parallel ranks (ZeRO-1), routed
    experts over the ranks holding the same experts (one per EP group); the parameter EMA lives in
    CPU memory (V3 3.2.3), not here; ``slot_factor`` = expert slots / experts (redundant experts).
    Activations: ``Item.act_bytes`` per token times the microbatch's tokens, live as the schedule keeps
    them (:func:`live_points`: DualPipe's PP+1 at most)."""
    out = []
    for r, kind in ((r, k) for r, mix in enumerate(pp_mixes) for k in sorted(mix)):
        spec = KINDS.get(kind)
        precision = spec.precision if spec is not None else "bf16"
        held, live = live_points(schedule, r)
        out.append(RankMemory(
            name=f"r{r} ({kind})", stages=held, live=live,
            state_bytes=tuple(i.replicated_params * (_BF16 + _FP32 + _OPT / dp)
                              + i.expert_params * slot_factor / ep * (_BF16 + _FP32 + _OPT / num_ep_groups)
                              for i in items),
            act_bytes=tuple(i.act_bytes(precision) * tokens for i in items),
            capacity=spec.memory_gb * 1e9 if spec is not None else math.inf))
    return out


def _costs_for(items: list[Item], counts: list[int], rank_speed: list[float], comm: EPComm, tokens: int,
               ref_flops: float, p2p: float) -> tuple[Costs, list[dict]]:
    """One Costs for the simulator: base = stage mean; stage_scale by (F+B); rank_scale 1/speed."""
    stages, start = [], 0
    for c in counts:
        chunk = items[start:start + c]
        start += c
        fc = sum(i.fwd_flops for i in chunk) * tokens / ref_flops
        wc = sum(i.gemm_flops for i in chunk) * tokens / ref_flops
        moe = sum(i.moe_layers for i in chunk)
        stages.append(dict(fc=fc, bc=2 * fc, wc=wc, cf=moe * comm.forward, cb=moe * comm.backward, items=chunk))
    mean = {k: sum(s[k] for s in stages) / len(stages) for k in ("fc", "bc", "wc", "cf", "cb")}
    f, b = mean["fc"] + mean["cf"], mean["bc"] + mean["cb"]
    fb = max(mean["fc"] + mean["bc"], mean["cf"] + mean["cb"], f, b)
    base = f + b
    scale = tuple(max((s["fc"] + s["cf"] + s["bc"] + s["cb"]) / base, 1e-9) for s in stages)
    costs = Costs(f=f, b=b, w=mean["wc"], fb=fb, comm=p2p, stage_scale=scale,
                  rank_scale=tuple(1.0 / v for v in rank_speed))
    return costs, stages


def _hidden_fraction(schedule: Schedule, sim: SimResult, stages: list[dict], rank_speed: list[float]) -> float:
    """Share of EP communication time that runs under an overlapped pair's compute (per span)."""
    hidden = total = 0.0
    for r, spans in enumerate(sim.spans):
        for sp in spans:
            a = sp.action
            halves = (a.f, a.b) if hasattr(a, "f") else (a,)
            comm = compute = 0.0
            for c in halves:
                st = stages[schedule.stage_of(r, c.chunk)]
                if c.op == "F":
                    comm, compute = comm + st["cf"], compute + st["fc"] / rank_speed[r]
                elif c.op == "B":
                    comm += st["cb"]
                    compute += (st["bc"] - (st["wc"] if c.split else 0.0)) / rank_speed[r]
            total += comm
            if len(halves) == 2:
                hidden += min(comm, compute)
    return hidden / total if total else 1.0


def plan_step(cluster: Cluster, config: PlanConfig, model: ModelSpec = V3_MODEL) -> Plan:
    """Price one optimizer step of ``model`` on ``cluster`` under ``config`` (module docstring)."""
    c = config
    layout = Layout(cluster=cluster, pp=c.pp, ep=c.ep)
    if layout.num_ranks != cluster.num_devices:
        raise ValueError(f"plan: pp={c.pp} x dp={layout.dp} uses {layout.num_ranks} of {cluster.num_devices} devices")
    pp_mixes = _pp_mixes(layout)
    pp_kinds = [_mix_label(mix) for mix in pp_mixes]
    check_mirror_kinds(c.schedule, pp_kinds)
    dp = layout.dp
    if c.global_batch % (dp * c.microbatch_seqs):
        raise ValueError(f"plan.global_batch={c.global_batch}: must be a multiple of dp x microbatch_seqs = "
                         f"{dp} x {c.microbatch_seqs}; pick a batch in steps of {dp * c.microbatch_seqs}")
    microbatches = c.global_batch // (dp * c.microbatch_seqs)
    schedule = build(c.schedule, c.pp, microbatches)
    tokens = c.microbatch_seqs * c.seq
    ref = KINDS[REFERENCE_KIND]
    ref_flops = REFERENCE_FLOPS
    items = model_items(model, c.seq)
    # a pipeline rank's data-parallel ranks each run their own tokens (the slowest kind sets the pace)
    # and share the routed experts by speed (expert_speeds); one effective speed per rank weighs the two
    # by the whole model's FLOPs
    routed = sum(i.routed_flops for i in items)
    local = sum(i.fwd_flops for i in items) - routed
    local_speed = [min(cluster.device_speed[k] for k in mix) for mix in pp_mixes]
    routed_speed = expert_speeds(cluster, layout, model.num_experts, model.num_experts + c.redundant_experts)
    rank_speed = [(local + routed) / (local / a + routed / b) for a, b in zip(local_speed, routed_speed)]
    costs_per_item = [i.fwd_flops for i in items]
    speeds = stage_speeds(schedule, rank_speed)
    slot_factor = (model.num_experts + c.redundant_experts) / model.num_experts
    rank_memory = rank_memories(items, schedule, pp_mixes, tokens=tokens, dp=dp, ep=c.ep,
                                num_ep_groups=layout.num_ep_groups, slot_factor=slot_factor)
    counts_speed = split_stages(costs_per_item, speeds, rank_memory)
    counts_flops = split_stages(costs_per_item, [1.0] * len(speeds), rank_memory)
    counts, alt = (counts_speed, counts_flops) if c.split == "speed" else (counts_flops, counts_speed)
    comm = ep_comm(cluster, layout, model, tokens=tokens, max_nodes=c.max_nodes, sample_tokens=c.sample_tokens,
                   redundant=c.redundant_experts)
    p2p = tokens * model.hidden * _BF16 / (cluster.inter.bandwidth_gbs * 1e9) + cluster.inter.latency_us * 1e-6
    costs, stages = _costs_for(items, counts, rank_speed, comm, tokens, ref_flops, p2p)
    sim = simulate(schedule, costs)
    alt_sim = simulate(schedule, _costs_for(items, alt, rank_speed, comm, tokens, ref_flops, p2p)[0])

    # ZeRO-1 after the pipeline: reduce-scatter FP32 grads + all-gather BF16 weights, ring over the inter-node link
    num_ep_groups = layout.num_ep_groups
    bw = cluster.inter.bandwidth_gbs * 1e9

    def ring(n: int, nbytes: float) -> float:
        return 0.0 if n < 2 else nbytes * (n - 1) / n / bw

    dp_sync = 0.0
    for r in range(c.pp):
        held = sorted({schedule.stage_of(r, ch) for ch in schedule.chunks(r)})
        rep = sum(i.replicated_params for s in held for i in stages[s]["items"])
        exp = sum(i.expert_params for s in held for i in stages[s]["items"]) * slot_factor / c.ep
        dp_sync = max(dp_sync, ring(dp, rep * (_FP32 + _BF16)) + ring(num_ep_groups, exp * (_FP32 + _BF16)))
    peak_gb = {m.name: m.peak(counts) / 1e9 for m in rank_memory}
    capacity_gb = {m.name: m.capacity / 1e9 for m in rank_memory}
    worst = max(rank_memory, key=lambda m: m.peak(counts) / m.capacity)
    state, act = worst.parts(counts)
    held_items = [i for s in worst.stages for i in stages[s]["items"]]
    rep = sum(i.replicated_params for i in held_items)
    exp = sum(i.expert_params for i in held_items) * slot_factor / c.ep
    parts = {"weights (BF16)": (rep + exp) * _BF16, "gradients (FP32)": (rep + exp) * _FP32,
             "optimizer (FP32 master + 2 BF16 moments, ZeRO-1)": rep * _OPT / dp + exp * _OPT / num_ep_groups,
             "activations": act}
    assert abs(sum(parts.values()) - state - act) <= 1e-6 * (state + act), "memory parts disagree with the split's model"

    step = sim.makespan + dp_sync
    flops_token = 3 * sum(i.fwd_flops for i in items)
    tokens_per_step = c.global_batch * c.seq
    peak = sum(KINDS[p.kind].peak_tflops if p.kind in KINDS else ref.peak_tflops * cluster.device_speed[p.kind]
               for p in layout.places) * 1e12
    mfu = flops_token * tokens_per_step / (step * peak)
    hours = step * cluster.num_devices / 3600 * 1e12 / tokens_per_step
    mean_idle = sum(sim.idle) / len(sim.idle)
    alt_idle = sum(alt_sim.idle) / len(alt_sim.idle)
    m = model
    kinds = sorted({k for mix in pp_mixes for k in mix})
    mixed = [r for r, mix in enumerate(pp_mixes) if len(mix) > 1]
    assumptions = [
        f"model: {m.total_params() / 1e9:.1f}B parameters ({m.active_params() / 1e9:.1f}B active per token, embedding "
        f"and head included), {m.num_layers} layers ({m.num_dense_layers} dense), hidden {m.hidden}, {m.num_experts} "
        f"routed experts top-{m.top_k} + {m.num_shared_experts} shared, expert hidden {m.moe_hidden}, MLA heads "
        f"{m.num_heads} q_lora {m.q_lora_rank} kv_lora {m.kv_lora_rank} qk {m.qk_nope_dim}+{m.qk_rope_dim} v "
        f"{m.v_head_dim}, vocab {m.vocab}, MTP depth {m.num_mtp} (V3 config_671B.json and report)",
        f"FLOPs: {flops_token / 1e9:.1f} GFLOP per token fwd+bwd (= 3 x forward: GEMMs 2 x weights, causal attention "
        f"scores at seq {c.seq}); recomputation not counted as model FLOPs",
        f"efficiency: {REFERENCE_EFFICIENCY:.2%} of FP8 dense peak on every chunk of a speed-1.0 device: "
        f"{REFERENCE_EFFICIENCY_SOURCE}",
        f"reference throughput: H800 {ref.peak_tflops:.0f} TFLOPS FP8 x {REFERENCE_EFFICIENCY:.4f} = "
        f"{ref_flops / 1e12:.0f} TFLOPS per speed unit",
        "device speeds (relative, at the precision each kind trains in): " + ", ".join(
            f"{k} {cluster.device_speed[k]:g}" for k in kinds) + " (sources: topology/kinds.py "
        "KINDS or the cluster file's [device_speed])",
        f"batch: {c.global_batch} sequences x {c.seq} tokens per step (V3 report, after the batch warm-up); "
        f"microbatch {c.microbatch_seqs} sequence(s) = {tokens} tokens per device (not published; assumed); "
        f"dp = {dp} ranks per stage -> {microbatches} microbatches per pipeline",
        f"EP: group of {c.ep} ranks over {layout.ep_group(0).num_nodes} node(s), "
        f"{'no node limit' if c.max_nodes == 0 else f'at most {c.max_nodes} nodes per token'}, balanced random routing "
        f"(aux-loss-free balancing assumed perfect), routing sampled on {c.sample_tokens} tokens per device and "
        f"bytes scaled to {tokens}; dispatch FP8, combine BF16; backward = two BF16 combine-sized exchanges; "
        f"IB and NVLink hops of one exchange pipelined (slower sets the time)",
        f"links: intra {cluster.intra.name} {cluster.intra.bandwidth_gbs:g} GB/s {cluster.intra.latency_us:g} us, "
        f"inter {cluster.inter.name} {cluster.inter.bandwidth_gbs:g} GB/s {cluster.inter.latency_us:g} us per device",
        "overlap: an F&B pair costs max(compute, EP communication) of its two halves (DualPipe's claim), but at "
        "least max(F, B); a lone F or B exposes its communication; SMs lent to communication (V3: 20 of 132) are "
        "inside the efficiency figure, not charged again",
        "simulator: per stage one (F, B, W, F&B) scaled by the stage's (F+B) ratio, per rank by 1 / speed "
        "(communication scaled with compute on slower ranks: conservative there)",
        f"pipeline message: {tokens} x {m.hidden} BF16 activations over {cluster.inter.name} = {p2p * 1e3:.2f} ms",
        f"data parallel: ZeRO-1, after the pipeline, not overlapped: reduce-scatter FP32 gradients + all-gather "
        f"BF16 weights, ring over {cluster.inter.name}: {dp_sync * 1e3:.0f} ms; optimizer arithmetic not counted",
        f"memory: BF16 weights + FP32 gradients of the stages a device holds (two in DualPipe: no more than "
        f"that, as embedding and output head are shared with the MTP module on one rank, V3 2.2); FP32 master "
        f"+ two BF16 AdamW moments (V3 3.3.3) sharded over {dp} data-parallel ranks (ZeRO-1), experts' over "
        f"{layout.num_ep_groups}; parameter EMA in CPU memory (V3 3.2.3); no allocator slack",
        "activations kept per token and layer (V3 3.2.3, 3.3.2): RMSNorm and MLA up-projections recomputed, so "
        "block input, FFN input, MLA latents and rotary key in BF16, attention output in E5M6 (1.5 bytes), every "
        "active expert's input and SwiGLU input in FP8, SwiGLU output recomputed (dense FFN: all three GEMM "
        "inputs in FP8); BF16 kinds keep all of it in BF16; head and MTP keep their BF16 inputs and logits; "
        "live microbatches per held stage from the schedule's order (DualPipe: PP+1 at most)",
        "memory capacity per kind (topology/kinds.py KINDS memory_gb): " + ", ".join(
            f"{k} {KINDS[k].memory_gb:g} GB" if k in KINDS else f"{k} unknown (not checked)"
            for k in kinds) + "; the layer split keeps every device within it",
        (f"mixed pipeline ranks {mixed}: each data-parallel rank runs its own tokens (attention, shared expert, "
         f"dense FFN, head at the slowest kind's speed); the routed experts are placed by device speed "
         f"({m.num_experts + c.redundant_experts} slots per EP group): effective speed per rank "
         + ", ".join(f"r{r} {rank_speed[r]:.3f} (experts {routed_speed[r]:.3f})" for r in mixed)
         + "; dispatch priced as FP8 to every holder (BF16 holders receive BF16: not priced)"
         if mixed else f"every pipeline rank is of one kind; {m.num_experts + c.redundant_experts} expert slots "
                       f"per EP group"),
        "not modelled: expert-load imbalance, stragglers, failures/restarts, evaluation, checkpointing",
    ]
    return Plan(config=c, num_devices=cluster.num_devices, dp=dp, microbatches=microbatches,
                tokens_per_step=tokens_per_step, pp_kinds=pp_kinds,
                stage_layers=[[i.name for i in s["items"]] for s in stages], costs=costs,
                pipeline_seconds=sim.makespan, bubble_seconds=sim.bubble, bubble_fraction=mean_idle / sim.makespan,
                alt_bubble_fraction=alt_idle / alt_sim.makespan, alt_pipeline_seconds=alt_sim.makespan,
                dp_sync_seconds=dp_sync, step_seconds=step, comm=comm,
                comm_hidden=_hidden_fraction(schedule, sim, stages, rank_speed),
                model_flops_per_token=flops_token, mfu=mfu, device_hours_per_trillion=hours, memory_gb=peak_gb,
                memory_capacity_gb=capacity_gb, memory_worst=worst.name,
                memory_parts={k: v / 1e9 for k, v in parts.items()}, assumptions=assumptions)
