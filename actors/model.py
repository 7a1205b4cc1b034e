"""A small DeepSeek-V3-shaped causal language model, cut into pipeline stages.

Shape (sizes from :class:`ModelConfig`): token embedding; ``num_layers`` pre-norm blocks of
RMSNorm → multi-head causal attention with rotary position embeddings → RMSNorm → feed-forward,
where the first ``num_dense_layers`` blocks use a dense SwiGLU and the rest a mixture of experts;
a final RMSNorm and the output head.

The MoE layer follows DeepSeek-V3:

* sigmoid affinity scores ``s = σ(h · Gᵀ)`` per routed expert;
* auxiliary-loss-free balancing: a per-expert bias ``b`` is added to the scores *only to select*
  experts (group-limited: the experts form ``num_groups`` groups, a group's score is the sum of its
  two best biased scores, only the best ``topk_groups`` groups are eligible, then top-``top_k``);
  the gate weights are the unbiased scores of the chosen experts, normalised to sum 1 and
  multiplied by ``route_scale``. After each optimizer step the bias moves by
  ``bias_update_speed · sign(mean load − load)`` (:meth:`Stage.update_gate_bias`), no gradient;
* a small sequence-wise balance loss ``α Σᵢ fᵢ Pᵢ`` (V3's complementary loss; ``seq_aux_alpha``);
* ``num_shared_experts`` shared experts every token passes through.

Expert compute is deterministic: token slots are sorted by expert (stable), run through
:func:`kernels.grouped_linear`, and summed back per token in a fixed order — so the same inputs
give bit-identical outputs wherever the stage runs. The GEMMs of attention projections, dense FFNs
and experts run on the configured precision backend; the embedding, norms, gate and output head
stay float32, as in V3's FP8 recipe.

Parameters are seeded per ``(seed, layer)``: a layer's initial weights do not depend on how the
model is cut into stages, so a single-process model and any pipeline split start identical.
Parameter names use *global* layer indices (``layers.5.attn.wq``), so a stage's names are a subset
of the full model's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels import BACKENDS, grouped_linear, linear
from topology.routing import select_experts

__all__ = ["ModelConfig", "Stage", "layer_split", "build_stage", "loss_fn"]


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    """Model shape and precision. Presets: :meth:`tiny` (tests) and :meth:`small` (``make run``)."""

    vocab_size: int = 256
    """Token ids are ``0 .. vocab_size-1``."""
    seq_len: int = 64
    """Tokens per sequence (the attention context)."""
    hidden: int = 128
    """Model width."""
    num_layers: int = 8
    """Transformer blocks; must be at least the number of pipeline stages."""
    num_dense_layers: int = 1
    """The first blocks use a dense SwiGLU feed-forward (V3: 3 of 61); the rest are MoE."""
    num_heads: int = 4
    """Attention heads; must divide ``hidden`` with an even head size (rotary embeddings)."""
    ffn_hidden: int = 256
    """Inner width of the dense SwiGLU feed-forward."""
    moe_hidden: int = 64
    """Inner width of each expert (routed and shared)."""
    num_routed_experts: int = 8
    """Routed experts per MoE layer."""
    num_shared_experts: int = 1
    """Shared experts per MoE layer (0 for none)."""
    top_k: int = 2
    """Routed experts per token."""
    num_groups: int = 4
    """Expert groups for group-limited routing (1 disables the limit)."""
    topk_groups: int = 2
    """Groups a token may pick experts from."""
    route_scale: float = 1.0
    """Factor on the normalised gate weights (V3: 2.5)."""
    bias_update_speed: float = 1e-3
    """Step of the balancing bias per optimizer step (V3's γ)."""
    seq_aux_alpha: float = 1e-4
    """Weight of the sequence-wise balance loss (V3's α); 0 disables it."""
    init_std: float = 0.02
    """Standard deviation of the initial weights."""
    norm_eps: float = 1e-6
    """RMSNorm epsilon."""
    rope_theta: float = 10000.0
    """Rotary embedding base."""
    precision: str = "fp32"
    """GEMM backend: fp32 (exact; what the tests compare), bf16, fp8 (see kernels), or auto: each
    rank picks from its device (kernels.backend_for: fp8 on Hopper, bf16 elsewhere) at launch."""

    def __post_init__(self) -> None:
        positive = ("vocab_size", "seq_len", "hidden", "num_layers", "num_heads", "ffn_hidden", "moe_hidden",
                    "num_routed_experts", "top_k", "num_groups", "topk_groups")
        for name in positive:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"model.{name}={v!r}: must be a positive integer")
        for name in ("num_dense_layers", "num_shared_experts"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"model.{name}={v!r}: must be a non-negative integer")
        if self.num_dense_layers > self.num_layers:
            raise ValueError(f"model.num_dense_layers={self.num_dense_layers} exceeds num_layers={self.num_layers}")
        if self.hidden % self.num_heads or (self.hidden // self.num_heads) % 2:
            raise ValueError(f"model.num_heads={self.num_heads}: must divide hidden={self.hidden} into an even "
                             f"head size (rotary embeddings rotate pairs)")
        if self.num_routed_experts % self.num_groups:
            raise ValueError(f"model.num_groups={self.num_groups}: must divide num_routed_experts="
                             f"{self.num_routed_experts}")
        if self.topk_groups > self.num_groups:
            raise ValueError(f"model.topk_groups={self.topk_groups}: at most num_groups={self.num_groups}")
        eligible = self.topk_groups * (self.num_routed_experts // self.num_groups)
        if self.top_k > eligible:
            raise ValueError(f"model.top_k={self.top_k}: only {eligible} experts are eligible per token "
                             f"(topk_groups x experts per group); lower top_k or raise topk_groups")
        for name in ("route_scale", "init_std", "norm_eps", "rope_theta"):
            if not getattr(self, name) > 0:
                raise ValueError(f"model.{name}={getattr(self, name)!r}: must be > 0")
        for name in ("bias_update_speed", "seq_aux_alpha"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"model.{name}={getattr(self, name)!r}: must be >= 0")
        if self.precision not in (*BACKENDS, "auto"):
            raise ValueError(f"model.precision={self.precision!r}: choose one of {', '.join(BACKENDS)} or auto")

    @classmethod
    def tiny(cls, **overrides) -> ModelConfig:
        """8 narrow layers, cheap enough for multi-rank tests (pass num_layers=16 for DualPipeV on 8 ranks)."""
        base = dict(vocab_size=32, seq_len=8, hidden=16, num_layers=8, num_dense_layers=1, num_heads=2,
                    ffn_hidden=32, moe_hidden=8, num_routed_experts=4, num_shared_experts=1, top_k=2,
                    num_groups=2, topk_groups=1, seq_aux_alpha=1e-2)
        return cls(**{**base, **overrides})

    @classmethod
    def small(cls, **overrides) -> ModelConfig:
        """The ``make run`` default: 8 layers of width 128, 8 routed experts + 1 shared per MoE layer."""
        return cls(**overrides)

    @property
    def num_moe_layers(self) -> int:
        return self.num_layers - self.num_dense_layers


def layer_split(config: ModelConfig, num_stages: int) -> list[range]:
    """The global layer indices of each stage: contiguous, sizes differing by at most one (the
    first stages take the extra layers). Stage 0 also holds the embedding, the last the head."""
    if not 1 <= num_stages <= config.num_layers:
        raise ValueError(f"num_stages={num_stages}: must be between 1 and model.num_layers={config.num_layers}")
    base, extra = divmod(config.num_layers, num_stages)
    out, start = [], 0
    for s in range(num_stages):
        n = base + (1 if s < extra else 0)
        out.append(range(start, start + n))
        start += n
    return out


def _generator(seed: int, slot: int) -> torch.Generator:
    # slot 0: embedding, 1 + i: layer i, num_layers + 1: output head
    return torch.Generator().manual_seed(seed * 1_000_003 + slot)


def _param(gen: torch.Generator, std: float, *shape: int) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.randn(*shape, generator=gen) * std)


class RMSNorm(torch.nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class Attention(torch.nn.Module):
    """Multi-head causal self-attention with rotary embeddings; projections on the precision backend."""

    def __init__(self, c: ModelConfig, gen: torch.Generator):
        super().__init__()
        self.num_heads, self.head_dim, self.backend = c.num_heads, c.hidden // c.num_heads, c.precision
        self.wq = _param(gen, c.init_std, c.hidden, c.hidden)
        self.wk = _param(gen, c.init_std, c.hidden, c.hidden)
        self.wv = _param(gen, c.init_std, c.hidden, c.hidden)
        self.wo = _param(gen, c.init_std / math.sqrt(2 * c.num_layers), c.hidden, c.hidden)
        inv = 1.0 / (c.rope_theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float64) / self.head_dim))
        ang = torch.arange(c.seq_len, dtype=torch.float64)[:, None] * inv[None, :]  # [seq, head_dim/2]
        self.register_buffer("cos", ang.cos().float(), persistent=False)
        self.register_buffer("sin", ang.sin().float(), persistent=False)

    def _rope(self, x: torch.Tensor) -> torch.Tensor:
        """x: [batch, heads, seq, head_dim] -> rotated pairs (x[2i], x[2i+1])."""
        seq = x.shape[2]
        cos, sin = self.cos[:seq], self.sin[:seq]
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [batch, seq, hidden] -> [batch, seq, hidden]."""
        b, s, h = x.shape

        def heads(w: torch.Tensor) -> torch.Tensor:
            return linear(x, w, backend=self.backend).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)

        q, k, v = self._rope(heads(self.wq)), self._rope(heads(self.wk)), heads(self.wv)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return linear(o.transpose(1, 2).reshape(b, s, h), self.wo, backend=self.backend)


class DenseFFN(torch.nn.Module):
    """SwiGLU: ``w2(silu(w1 x) * w3 x)``; w1 and w3 are one fused [2·inner, hidden] weight."""

    def __init__(self, c: ModelConfig, inner: int, gen: torch.Generator):
        super().__init__()
        self.backend = c.precision
        self.w13 = _param(gen, c.init_std, 2 * inner, c.hidden)
        self.w2 = _param(gen, c.init_std / math.sqrt(2 * c.num_layers), c.hidden, inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, g = linear(x, self.w13, backend=self.backend).chunk(2, dim=-1)
        return linear(F.silu(a) * g, self.w2, backend=self.backend)


class MoE(torch.nn.Module):
    """Routed experts (sigmoid gate, bias-balanced group-limited top-k) plus shared experts."""

    def __init__(self, c: ModelConfig, gen: torch.Generator):
        super().__init__()
        self.c = c
        e = c.num_routed_experts
        self.gate = _param(gen, c.init_std, e, c.hidden)
        self.w13 = _param(gen, c.init_std, e, 2 * c.moe_hidden, c.hidden)
        self.w2 = _param(gen, c.init_std / math.sqrt(2 * c.num_layers), e, c.hidden, c.moe_hidden)
        self.shared = DenseFFN(c, c.num_shared_experts * c.moe_hidden, gen) if c.num_shared_experts else None
        # Balancing bias, added to the scores for selection only; moved by update_gate_bias.
        self.register_buffer("bias", torch.zeros(e))
        # Token slots routed to each expert since the last bias update (training forwards only).
        self.register_buffer("load", torch.zeros(e), persistent=False)

    def route(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """h: [tokens, hidden] -> (expert ids [tokens, top_k], gate weights [tokens, top_k], scores [tokens, E])."""
        c = self.c
        scores = torch.sigmoid(linear(h, self.gate))  # float32 gate, as in V3
        w, idx = select_experts(scores, self.bias, num_groups=c.num_groups, topk_groups=c.topk_groups,
                                top_k=c.top_k, route_scale=c.route_scale)
        return idx, w, scores

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [batch, seq, hidden] -> (y [batch, seq, hidden], sequence-balance loss, 0-dim)."""
        c = self.c
        b, s, hdim = x.shape
        h = x.reshape(b * s, hdim)
        idx, weights, scores = self.route(h)
        flat = idx.reshape(-1)  # [tokens * top_k], slot t*k + j
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=c.num_routed_experts)
        if self.training:
            self.load += counts.to(self.load.dtype)
        xs = h.repeat_interleave(c.top_k, dim=0)[order]  # [slots, hidden], grouped by expert
        a, g = grouped_linear(xs, self.w13, counts, backend=c.precision).chunk(2, dim=-1)
        ys = grouped_linear(F.silu(a) * g, self.w2, counts, backend=c.precision)
        # Back to slot order, then a fixed-order sum over each token's k experts: deterministic.
        slots = torch.empty_like(ys).index_copy(0, order, ys).view(b * s, c.top_k, hdim)
        y = (slots * weights[..., None]).sum(1)
        if self.shared is not None:
            y = y + self.shared(h)
        aux = x.new_zeros(())
        if c.seq_aux_alpha > 0 and self.training:
            # V3 eq. 17-20 per sequence: f_i = E/(K·T)·count_i, P_i = mean_t normalised score_i.
            onehot = torch.zeros(b * s, c.num_routed_experts, device=x.device).scatter_(1, idx, 1.0).view(b, s, -1)
            f = onehot.sum(1) * (c.num_routed_experts / (c.top_k * s))  # [batch, E]
            p = (scores / scores.sum(-1, keepdim=True)).view(b, s, -1).mean(1)  # [batch, E]
            aux = c.seq_aux_alpha * (f * p).sum(-1).mean()
        return y.view(b, s, hdim), aux


class Block(torch.nn.Module):
    def __init__(self, c: ModelConfig, layer: int, gen: torch.Generator):
        super().__init__()
        self.attn_norm = RMSNorm(c.hidden, c.norm_eps)
        self.attn = Attention(c, gen)
        self.ffn_norm = RMSNorm(c.hidden, c.norm_eps)
        self.ffn = DenseFFN(c, c.ffn_hidden, gen) if layer < c.num_dense_layers else MoE(c, gen)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = x + self.attn(self.attn_norm(x))
        out = self.ffn(self.ffn_norm(x))
        if isinstance(out, tuple):
            return x + out[0], out[1]
        return x + out, None


class Stage(torch.nn.Module):
    """Layers ``layers`` of the model (plus the embedding on stage 0, the head on the last stage).

    ``forward(x)``: x is token ids ``[batch, seq]`` (int64) on the first stage, else hidden states
    ``[batch, seq, hidden]``; returns ``(y, aux)`` with y the logits ``[batch, seq, vocab]`` on the
    last stage, else hidden states, and aux the stage's balance loss (0-dim).
    """

    def __init__(self, c: ModelConfig, stage: int, num_stages: int, seed: int):
        super().__init__()
        if c.precision == "auto":
            raise ValueError("model.precision='auto' must be resolved per rank before building a stage "
                             "(kernels.backend_for(device, None)); launch.train does this")
        self.config, self.stage, self.num_stages = c, stage, num_stages
        self.layer_ids = layer_split(c, num_stages)[stage]
        if self.is_first:
            self.embed = _param(_generator(seed, 0), 1.0, c.vocab_size, c.hidden)
        self.layers = torch.nn.ModuleDict({str(i): Block(c, i, _generator(seed, 1 + i)) for i in self.layer_ids})
        if self.is_last:
            gen = _generator(seed, c.num_layers + 1)
            self.norm = RMSNorm(c.hidden, c.norm_eps)
            self.head = _param(gen, c.init_std, c.vocab_size, c.hidden)

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.num_stages - 1

    def blocks(self) -> list[torch.nn.Module]:
        """The transformer blocks in order (the executor hooks communication progress onto them)."""
        return list(self.layers.values())

    def moe_layers(self) -> list[MoE]:
        return [b.ffn for b in self.layers.values() if isinstance(b.ffn, MoE)]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.is_first:
            if x.dtype != torch.int64 or x.dim() != 2:
                raise ValueError(f"stage 0 takes token ids [batch, seq] int64, got {x.dtype} {tuple(x.shape)}")
            if x.numel() and (int(x.min()) < 0 or int(x.max()) >= self.config.vocab_size):
                raise ValueError(f"token ids must lie in [0, {self.config.vocab_size}); got "
                                 f"[{int(x.min())}, {int(x.max())}]")
            x = F.embedding(x, self.embed)
        aux = x.new_zeros(())
        for block in self.layers.values():
            x, a = block(x)
            if a is not None:
                aux = aux + a
        if self.is_last:
            x = linear(self.norm(x), self.head)  # float32 head, as in V3
        return x, aux

    def expert_load(self) -> torch.Tensor:
        """Token slots per routed expert since the last update: ``[num_moe_layers_here, experts]``."""
        moe = self.moe_layers()
        if not moe:
            return torch.zeros(0, self.config.num_routed_experts)
        return torch.stack([m.load for m in moe])

    def reset_expert_load(self) -> None:
        for m in self.moe_layers():
            m.load.zero_()

    @torch.no_grad()
    def update_gate_bias(self, load: torch.Tensor) -> None:
        """Auxiliary-loss-free balancing: ``bias += speed · sign(mean(load) − load)`` per MoE layer
        (``load``: ``[num_moe_layers_here, experts]``, the step's load over all microbatches), then
        reset the counters."""
        moe = self.moe_layers()
        if load.shape != (len(moe), self.config.num_routed_experts):
            raise ValueError(f"stage {self.stage}: load must be [{len(moe)}, {self.config.num_routed_experts}], "
                             f"got {tuple(load.shape)}")
        for m, row in zip(moe, load):
            row = row.to(torch.float64)
            m.bias += (self.config.bias_update_speed * torch.sign(row.mean() - row)).to(m.bias.dtype)
        self.reset_expert_load()


def build_stage(config: ModelConfig, stage: int, num_stages: int, *, seed: int) -> Stage:
    """Stage ``stage`` of ``num_stages`` with parameters seeded per ``(seed, layer)``."""
    if not 0 <= stage < num_stages:
        raise ValueError(f"stage={stage}: must be in [0, {num_stages})")
    return Stage(config, stage, num_stages, seed)


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy: logits ``[batch, seq, vocab]``, targets ``[batch, seq]`` int64."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
