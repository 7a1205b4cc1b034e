"""launch.train's expert-parallel flags: bad combinations are refused before any work, with the
field and the fix in the message (parse_config + preflight, as every rank runs them)."""

from __future__ import annotations

import pytest

from actors.config import rank_speeds, resolve_precision
from actors.preflight import preflight
from launch.train import parse_config

BASE = ["--schedule", "dualpipe", "--pp", "2", "--microbatches", "4", "--model", "tiny"]

BAD = [  # (flags, MPI ranks, phrases the message must hold)
    (["--ep", "2"], 2, ["--pp 2 x --ep 2 needs 4 MPI ranks", "the job has 2", "-n 4"]),
    (["--ep", "3", "--micro-batch", "3"], 6, ["--ep 3", "num_routed_experts=4", "choose ep among [1, 2, 4]"]),
    (["--ep", "2", "--nodes", "4"], 4, ["pipeline.nodes=4", "must divide ep=2"]),
    (["--ep", "4", "--nodes", "4", "--micro-batch", "4"], 8, ["--nodes 4", "model.num_groups=2"]),
    (["--ep", "2", "--micro-batch", "3"], 4, ["pipeline.micro_batch=3", "divisible by ep=2"]),
    (["--ep", "2", "--nodes", "1", "--rank-precision", "fp8,bf16,bf16,bf16"], 4,
     ["ranks 0..1 share an emulated node", "['bf16', 'fp8']", "one precision"]),
    (["--ep", "2", "--rank-precision", "fp8,bf16,bf16"], 4, ["rank_precision has 3 entries", "one per rank (4"]),
    (["--ep", "2", "--resume"], 4, ["no complete checkpoint", "drop --resume"]),
    (["--ep", "0"], 0, ["pipeline.ep=0", "positive integer"]),
    (["--redundant-experts", "2"], 2, ["pipeline.redundant_experts=2", "set ep > 1"]),
    (["--ep", "2", "--redundant-experts", "-1"], 4, ["pipeline.redundant_experts=-1", ">= 0"]),
    (["--ep", "2", "--rank-kind", "h800,h800,h800"], 4, ["rank_kind has 3 entries", "one per rank (4)"]),
    (["--ep", "2", "--rank-kind", "h800,a100"], 4, ["rank_kind[1]='a100'", "known: h800"]),
]


@pytest.mark.parametrize("flags,ranks,phrases", BAD, ids=[" ".join(b[0]) for b in BAD])
def test_bad_expert_parallel_flags_are_refused_naming_the_fix(flags, ranks, phrases, tmp_path):
    with pytest.raises(ValueError) as err:
        cfg = parse_config([*BASE, "--checkpoint-dir", str(tmp_path / "ck"), *flags])
        preflight(cfg, ranks)
    for phrase in phrases:
        assert phrase in str(err.value), (phrase, str(err.value))


def test_a_good_expert_parallel_layout_passes(tmp_path):
    cfg = parse_config([*BASE, "--ep", "2", "--nodes", "2", "--checkpoint-dir", str(tmp_path / "ck")])
    schedule, resume = preflight(cfg, 4)
    assert schedule.pp == 2 and resume is None and cfg.pipeline.ep == 2 and cfg.pipeline.nodes == 2


def test_bf16_fp8_and_mixed_precisions_pass_with_expert_parallelism(tmp_path):
    """No refusal of bf16/fp8 with --ep any more: an EP group may mix FP8 and BF16 ranks, one per node;
    a per-rank list names each MPI rank's precision, a per-pipeline-rank list all its ep ranks'."""
    ck = ["--checkpoint-dir", str(tmp_path / "ck")]
    for flags in (["--precision", "bf16"], ["--precision", "fp8"], ["--rank-precision", "fp8,bf16"],
                  ["--rank-precision", "fp8,bf16,bf16,fp8"]):
        preflight(parse_config([*BASE, "--ep", "2", "--nodes", "2", *ck, *flags]), 4)
    per_rank = parse_config([*BASE, "--ep", "2", "--nodes", "2", *ck, "--rank-precision", "fp8,bf16,bf16,fp8"])
    per_pp = parse_config([*BASE, "--ep", "2", "--nodes", "2", *ck, "--rank-precision", "fp8,bf16"])
    assert [resolve_precision(per_rank, r) for r in range(4)] == ["fp8", "bf16", "bf16", "fp8"]
    assert [resolve_precision(per_pp, r) for r in range(4)] == ["fp8", "fp8", "bf16", "bf16"]


def test_rank_kinds_give_each_rank_its_kind_speed(tmp_path):
    """A per-pipeline-rank kind list covers all its ep ranks, a per-rank one each rank (the expert
    placement's weights; catches a list applied in the wrong order or not expanded over ep)."""
    from topology.kinds import KINDS

    ck = ["--checkpoint-dir", str(tmp_path / "ck")]
    slow, fast = KINDS["ascend910c"].speed, KINDS["h800"].speed
    per_pp = parse_config([*BASE, "--ep", "2", "--nodes", "2", *ck, "--rank-kind", "ascend910c,h800"])
    per_rank = parse_config([*BASE, "--ep", "2", "--nodes", "2", *ck, "--rank-kind", "h800,ascend910c,h800,ascend910c"])
    assert rank_speeds(per_pp) == [slow, slow, fast, fast]
    assert rank_speeds(per_rank) == [fast, slow, fast, slow]
    assert rank_speeds(parse_config([*BASE, *ck])) is None
