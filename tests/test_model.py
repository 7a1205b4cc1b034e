"""The model, data, optimizer and config pieces, single process, against independent float64 math."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from actors.config import TrainConfig, from_dict, load_toml, resolve_precision
from actors.data import SyntheticTokens, TokenFile
from actors.model import MoE, ModelConfig, build_stage, layer_split, loss_fn
from actors.optim import AdamW, OptimConfig, grad_sq_sum
from actors.reference import Reference
from kernels.testing import calc_diff


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _tiny(**kw) -> ModelConfig:
    return ModelConfig.tiny(**kw)


# ---------------------------------------------------------------- stages


def test_layer_split_is_contiguous_and_balanced():
    c = _tiny(num_layers=10)
    for s in range(1, 11):
        parts = layer_split(c, s)
        assert [i for r in parts for i in r] == list(range(10))
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
    with pytest.raises(ValueError, match="num_stages=11"):
        layer_split(c, 11)


@pytest.mark.parametrize("num_stages", [1, 2, 3, 8])
def test_any_split_is_bit_identical_to_the_whole_model(num_stages):
    c = _tiny()
    full = build_stage(c, 0, 1, seed=5)
    named = dict(full.named_parameters())
    stages = [build_stage(c, s, num_stages, seed=5) for s in range(num_stages)]
    seen = []
    for st in stages:
        for n, p in st.named_parameters():
            assert torch.equal(p, named[n]), n
            seen.append(n)
    assert sorted(seen) == sorted(named)  # every parameter in exactly one stage
    tokens = SyntheticTokens(c.vocab_size, c.seq_len, 1).batch(0, 0, 3)[0]
    y_full, aux_full = full(tokens)
    x, aux = tokens, torch.zeros(())
    for st in stages:
        x, a = st(x)
        aux = aux + a
    assert torch.equal(x, y_full)
    assert torch.allclose(aux, aux_full, rtol=1e-6, atol=0)


def test_attention_is_causal():
    c = _tiny()
    model = build_stage(c, 0, 1, seed=0).eval()
    tokens = SyntheticTokens(c.vocab_size, c.seq_len, 0).batch(0, 0, 2)[0]
    changed = tokens.clone()
    changed[:, 5] = (changed[:, 5] + 1) % c.vocab_size
    with torch.no_grad():
        a, b = model(tokens)[0], model(changed)[0]
    assert torch.equal(a[:, :5], b[:, :5])
    assert not torch.equal(a[:, 5:], b[:, 5:])


def test_first_stage_rejects_out_of_range_tokens():
    c = _tiny()
    model = build_stage(c, 0, 1, seed=0)
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 32\)"):
        model(torch.full((1, c.seq_len), 32))


# ---------------------------------------------------------------- MoE routing, against float64 loops


def _route64(c: ModelConfig, scores: np.ndarray, bias: np.ndarray):
    """Group-limited top-k with the bias for selection only (DeepSeek-V3 section 2.1.2), per token."""
    per_group = c.num_routed_experts // c.num_groups
    out_idx, out_w = [], []
    for s in scores:
        biased = s + bias
        group_score = [sorted(biased[g * per_group:(g + 1) * per_group])[-2:] for g in range(c.num_groups)]
        group_score = [sum(v) for v in group_score]
        groups = sorted(range(c.num_groups), key=lambda g: -group_score[g])[:c.topk_groups]
        eligible = [e for e in range(c.num_routed_experts) if e // per_group in groups]
        chosen = sorted(eligible, key=lambda e: -biased[e])[:c.top_k]
        w = np.array([s[e] for e in chosen])
        out_idx.append(sorted(chosen))
        out_w.append(dict(zip(chosen, w / w.sum() * c.route_scale)))
    return out_idx, out_w


def _moe_layer(c: ModelConfig) -> MoE:
    model = build_stage(c, 0, 1, seed=2)
    return model.moe_layers()[0]


def test_routing_matches_float64_reference():
    c = _tiny(num_routed_experts=8, num_groups=4, topk_groups=2, top_k=3, route_scale=2.5)
    moe = _moe_layer(c)
    moe.bias.copy_(torch.randn(8, generator=torch.Generator().manual_seed(0)) * 0.05)
    h = torch.randn(64, c.hidden, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        idx, w, scores = moe.route(h)
    s64 = torch.sigmoid(h.double() @ moe.gate.detach().double().t()).numpy()
    ref_idx, ref_w = _route64(c, s64, moe.bias.double().numpy())
    for t in range(64):
        assert sorted(idx[t].tolist()) == ref_idx[t], t
        for j, e in enumerate(idx[t].tolist()):
            assert abs(float(w[t, j]) - ref_w[t][e]) < 1e-6
    assert torch.allclose(scores.double(), torch.from_numpy(s64), atol=1e-6)


def test_moe_output_and_balance_loss_match_a_per_token_loop():
    c = _tiny(num_routed_experts=4, num_groups=2, topk_groups=1, top_k=2, seq_aux_alpha=0.1)
    moe = _moe_layer(c).train()
    x = torch.randn(2, c.seq_len, c.hidden, generator=torch.Generator().manual_seed(3))
    y, aux = moe(x)
    h = x.reshape(-1, c.hidden).double()
    with torch.no_grad():
        idx, w, scores = moe.route(x.reshape(-1, c.hidden))
    w13, w2 = moe.w13.detach().double(), moe.w2.detach().double()

    def swiglu(v, a_w, b_w):
        a, g = (a_w @ v).chunk(2)
        return b_w @ (torch.nn.functional.silu(a) * g)

    sh = moe.shared
    for t in range(h.shape[0]):
        expect = sum(float(w[t, j]) * swiglu(h[t], w13[e], w2[e]) for j, e in enumerate(idx[t].tolist()))
        expect = expect + swiglu(h[t], sh.w13.detach().double(), sh.w2.detach().double())
        assert torch.allclose(y.reshape(-1, c.hidden)[t].double(), expect, atol=1e-5), t
    # V3 eq. 17-20, per sequence, then averaged over the batch
    total = 0.0
    s = scores.detach().double().view(2, c.seq_len, -1)
    chosen = idx.view(2, c.seq_len, -1)
    for b in range(2):
        f = [c.num_routed_experts / (c.top_k * c.seq_len) * int((chosen[b] == i).any(-1).sum()) for i in range(4)]
        p = [float((s[b, :, i] / s[b].sum(-1)).mean()) for i in range(4)]
        total += c.seq_aux_alpha * sum(fi * pi for fi, pi in zip(f, p))
    assert abs(aux.item() - total / 2) < 1e-7


def test_expert_load_counts_training_forwards_and_bias_moves_against_load():
    c = _tiny(bias_update_speed=0.01)
    model = build_stage(c, 0, 1, seed=0).train()
    tokens = SyntheticTokens(c.vocab_size, c.seq_len, 0).batch(0, 0, 4)[0]
    model(tokens)
    load = model.expert_load()
    assert load.shape == (c.num_moe_layers, c.num_routed_experts)
    assert torch.equal(load.sum(1), torch.full((c.num_moe_layers,), float(4 * c.seq_len * c.top_k)))
    with torch.no_grad():
        model.eval()(tokens)
    assert torch.equal(model.expert_load(), load), "eval forwards must not count load"
    before = [m.bias.clone() for m in model.moe_layers()]
    model.update_gate_bias(load)
    for m, b0, row in zip(model.moe_layers(), before, load):
        step = m.bias - b0
        expect = 0.01 * torch.sign(row.mean() - row)
        assert torch.allclose(step, expect.float(), atol=1e-9)
    assert not model.expert_load().any(), "update resets the counters"
    with pytest.raises(ValueError, match="load must be"):
        model.update_gate_bias(torch.zeros(1, 2))


@pytest.mark.parametrize("precision", ["bf16", "fp8"])
def test_low_precision_model_tracks_fp32(precision):
    c32 = ModelConfig.small(num_layers=2, seq_len=16)
    clow = ModelConfig.small(num_layers=2, seq_len=16, precision=precision)
    tokens, targets = SyntheticTokens(c32.vocab_size, c32.seq_len, 0).batch(0, 0, 2)
    outs = []
    for c in (c32, clow):
        m = build_stage(c, 0, 1, seed=0)
        logits, _ = m(tokens)
        loss_fn(logits, targets).backward()
        outs.append((logits.detach(), m.layers["1"].ffn.w13.grad))
    assert calc_diff(outs[0][0], outs[1][0]) < 1e-3
    assert calc_diff(outs[0][1], outs[1][1]) < 1e-2


# ---------------------------------------------------------------- data


def test_synthetic_tokens_are_deterministic_markov_sequences():
    d = SyntheticTokens(64, 32, seed=7)
    a, ta = d.batch(3, 5, 4)
    b, tb = SyntheticTokens(64, 32, seed=7).batch(3, 5, 4)
    assert torch.equal(a, b) and torch.equal(ta, tb)
    assert a.shape == ta.shape == (4, 32) and a.dtype == torch.int64
    assert torch.equal(a[:, 1:], ta[:, :-1])
    assert not torch.equal(a, d.batch(3, 6, 4)[0]) and not torch.equal(a, d.batch(4, 5, 4)[0])
    # every transition is one of the chain's successors, with the chain's frequencies
    counts = torch.zeros(64, 64)
    x, t = d.batch(0, 0, 4000)
    counts.index_put_((x.reshape(-1), t.reshape(-1)), torch.ones(x.numel()), accumulate=True)
    allowed = torch.zeros(64, 64, dtype=torch.bool)
    allowed.scatter_(1, d.successors, True)
    assert not counts[~allowed].any()
    rows = counts.sum(1, keepdim=True)
    freq = counts.gather(1, d.successors) / rows
    p = d.probs.float()
    sigma = (p * (1 - p) / rows).sqrt()  # binomial standard error per row
    assert ((freq - p).abs() <= 5 * sigma + 1e-3).all()


def test_entropy_rate_matches_the_empirical_loss_of_the_true_model():
    d = SyntheticTokens(16, 64, seed=1)
    x, t = d.batch(0, 0, 2000)
    trans = torch.zeros(16, 16, dtype=torch.float64).scatter_add_(1, d.successors, d.probs)
    nll = -trans[x.reshape(-1), t.reshape(-1)].log().mean()
    assert 0 < d.entropy_rate() < math.log(16)
    assert abs(float(nll) - d.entropy_rate()) < 0.03


def test_token_file_windows(tmp_path):
    ids = np.arange(1000, dtype=np.int32) % 50
    np.save(tmp_path / "tok.npy", ids)
    f = TokenFile(tmp_path / "tok.npy", 16, seed=2)
    x, t = f.batch(1, 2, 3)
    assert x.shape == (3, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], t[:, :-1])
    for row, trow in zip(x, t):
        start = int(row[0])
        assert torch.equal(row, torch.arange(start, start + 16) % 50) or (row.diff() % 50 == 1).all()
        assert int(trow[-1]) == (int(row[-1]) + 1) % 50
    assert torch.equal(x, TokenFile(tmp_path / "tok.npy", 16, seed=2).batch(1, 2, 3)[0])
    assert f.max_token() == 49
    ids.astype(np.uint16).tofile(tmp_path / "tok.bin")
    assert TokenFile(tmp_path / "tok.bin", 16).num_windows == 999 // 16
    with pytest.raises(ValueError, match="no such file"):
        TokenFile(tmp_path / "missing.npy", 16)
    np.save(tmp_path / "short.npy", ids[:10])
    with pytest.raises(ValueError, match="fewer than seq_len"):
        TokenFile(tmp_path / "short.npy", 16)


# ---------------------------------------------------------------- optimizer


def test_adamw_with_clipping_matches_the_formula():
    cfg = OptimConfig(lr=0.1, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, grad_clip=1.0, warmup_steps=2)
    w = torch.nn.Parameter(torch.randn(3, 4, generator=torch.Generator().manual_seed(0)))
    n = torch.nn.Parameter(torch.ones(4))
    opt = AdamW([w, n], cfg)
    w64, n64 = w.detach().double().clone(), n.detach().double().clone()
    m = {id(w): torch.zeros_like(w64), id(n): torch.zeros_like(n64)}
    v = {id(w): torch.zeros_like(w64), id(n): torch.zeros_like(n64)}
    gen = torch.Generator().manual_seed(1)
    for step in range(3):
        gw, gn = torch.randn(3, 4, generator=gen) * 3, torch.randn(4, generator=gen) * 3
        w.grad, n.grad = gw.clone(), gn.clone()
        norm = float(grad_sq_sum([w, n]).sqrt())
        assert abs(norm - math.sqrt(float((gw.double() ** 2).sum() + (gn.double() ** 2).sum()))) < 1e-9
        opt.step(norm)
        lr = 0.1 * min(1.0, (step + 1) / 2)
        coef = min(1.0, 1.0 / (norm + 1e-6))
        for p64, g, decay, key in ((w64, gw, 0.1, id(w)), (n64, gn, 0.0, id(n))):
            g = g.double() * coef
            p64.mul_(1 - lr * decay)
            m[key] = 0.9 * m[key] + 0.1 * g
            v[key] = 0.95 * v[key] + 0.05 * g * g
            mhat, vhat = m[key] / (1 - 0.9 ** (step + 1)), v[key] / (1 - 0.95 ** (step + 1))
            p64.sub_(lr * mhat / (vhat.sqrt() + 1e-8))
        assert torch.allclose(w.detach().double(), w64, atol=1e-6)
        assert torch.allclose(n.detach().double(), n64, atol=1e-6)


def test_reference_training_learns_the_synthetic_language():
    c = _tiny(num_layers=4)
    d = SyntheticTokens(c.vocab_size, c.seq_len, 0)
    ref = Reference(model=c, optim=OptimConfig(lr=1e-2, warmup_steps=2), data=d, microbatches=4, micro_batch=8,
                    seed=0)
    losses = [sum(ref.train_step(s).losses) / 4 for s in range(25)]
    assert losses[0] > math.log(c.vocab_size) - 0.1
    assert losses[-1] < losses[0] - 0.8, losses


# ---------------------------------------------------------------- config


@pytest.mark.parametrize("kw, match", [
    (dict(num_heads=3), "model.num_heads=3"),
    (dict(top_k=5), "model.top_k=5"),
    (dict(num_groups=3), "model.num_groups=3"),
    (dict(precision="fp16"), "model.precision='fp16'"),
    (dict(hidden=0), "model.hidden=0"),
])
def test_model_config_errors_name_the_field(kw, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig.tiny(**kw)


def test_optim_config_errors_name_the_field():
    with pytest.raises(ValueError, match="optim.lr"):
        OptimConfig(lr=0)
    with pytest.raises(ValueError, match="optim.betas"):
        OptimConfig(betas=(0.9, 1.0))


def test_train_config_from_toml_and_overrides(tmp_path):
    (tmp_path / "run.toml").write_text(
        'steps = 7\n[model]\npreset = "tiny"\nhidden = 32\n[pipeline]\nschedule = "zb1p"\npp = 2\n[optim]\nlr = 0.5\n')
    cfg = load_toml(tmp_path / "run.toml", {"pipeline": {"microbatches": 6}, "steps": 9})
    assert isinstance(cfg, TrainConfig)
    assert (cfg.steps, cfg.model.hidden, cfg.model.num_layers, cfg.pipeline.schedule) == (9, 32, 8, "zb1p")
    assert (cfg.pipeline.microbatches, cfg.optim.lr) == (6, 0.5)
    with pytest.raises(ValueError, match=r"\[model\]: unknown keys \['hiden'\]"):
        from_dict({"model": {"hiden": 3}})
    with pytest.raises(ValueError, match="needs 8 stages but model.num_layers=4"):
        from_dict({"model": {"preset": "tiny", "num_layers": 4}, "pipeline": {"schedule": "dualpipev", "pp": 4}})


def test_rank_precision_resolves_per_rank():
    cfg = from_dict({"pipeline": {"pp": 3, "schedule": "1f1b", "microbatches": 3}, "rank_precision": ["fp8", "auto", "fp32"]})
    assert [resolve_precision(cfg, r, "cpu") for r in range(3)] == ["fp8", "bf16", "fp32"]
    assert resolve_precision(from_dict({"model": {"precision": "auto"}}), 0, "cpu") == "bf16"
    with pytest.raises(ValueError, match="give one per rank"):
        from_dict({"rank_precision": ["fp8"]})
    with pytest.raises(ValueError, match=r"rank_precision\[1\]='fp16'"):
        from_dict({"pipeline": {"pp": 2}, "rank_precision": ["fp8", "fp16"]})
    with pytest.raises(ValueError, match="must be resolved per rank"):
        build_stage(ModelConfig.tiny(precision="auto"), 0, 1, seed=0)
