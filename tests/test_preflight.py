"""Bad input is rejected before any work, each with a message naming the field and the fix.

The table runs the training entry's own parsing and :func:`actors.preflight.preflight` in this
process (no MPI): each row is a command line (plus the files it names) and the words its error
must contain. One real ``mpiexec`` launch checks that a missing config prints one line per job.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from actors import checkpoint
from actors.preflight import preflight
from launch.train import parse_config

TINY = ["--model", "tiny", "--pp", "2", "--schedule", "dualpipe", "--microbatches", "4"]


def _files(tmp_path):
    """The files the rows refer to, by name."""
    (tmp_path / "syntax.toml").write_text("[model\nhidden = 3\n")
    (tmp_path / "typo.toml").write_text("[model]\nhiddn = 32\n")
    (tmp_path / "string.toml").write_text("[pipeline]\nmicro_batch = \"2\"\n")
    (tmp_path / "section.toml").write_text("model = 3\n")
    (tmp_path / "betas.toml").write_text("[optim]\nbetas = [0.9, 1.5]\n")
    (tmp_path / "groups.toml").write_text("[model]\npreset = \"tiny\"\nnum_groups = 3\n")
    (tmp_path / "topk.toml").write_text("[model]\npreset = \"tiny\"\ntop_k = 3\n")
    (tmp_path / "binary.toml").write_bytes(b"\xff\xfe\x00bad")
    (tmp_path / "adir.toml").mkdir()
    np.save(tmp_path / "floats.npy", np.zeros(100, np.float32))
    np.save(tmp_path / "big.npy", np.arange(100) % 40)  # ids up to 39, tiny vocab is 32
    np.save(tmp_path / "neg.npy", np.arange(100) % 8 - 1)
    np.save(tmp_path / "short.npy", np.arange(5) % 8)
    (tmp_path / "garbage.npy").write_bytes(b"not a numpy file at all")
    # a complete checkpoint of another layout (pp=2, 1f1b, 4 layers), and an empty folder
    other = parse_config(["--model", "tiny", "--pp", "2", "--schedule", "1f1b", "--microbatches", "2",
                          "--layers", "4"])
    step = tmp_path / "ck-other" / "step-00000002"
    step.mkdir(parents=True)
    shards = []
    for r in range(2):
        (step / f"rank-{r}.pt").write_bytes(b"x" * 10)
        shards.append({"rank": r, "file": f"rank-{r}.pt", "bytes": 10, "sha256": ""})
    (step / "manifest.json").write_text(json.dumps({"format": checkpoint.FORMAT, "next_step": 2,
                                                    "layout": checkpoint.layout_of(other), "shards": shards}))
    (tmp_path / "ck-empty").mkdir()


# (row name, argv after TINY, world size, words the message must contain)
ROWS = [
    ("config missing", ["--config", "missing.toml"], 2, ["config 'missing.toml'", "no such file", "--config path"]),
    ("config is a directory", ["--config", "{d}/adir.toml"], 2, ["cannot read it", "readable TOML"]),
    ("config not UTF-8", ["--config", "{d}/binary.toml"], 2, ["cannot read it"]),
    ("config syntax", ["--config", "{d}/syntax.toml"], 2, ["not valid TOML", "fix the file"]),
    ("config unknown key", ["--config", "{d}/typo.toml"], 2, ["[model]", "unknown keys ['hiddn']", "known:"]),
    ("config wrong type", ["--config", "{d}/string.toml"], 2, ["micro_batch='2'", "must be int", "without quotes"]),
    ("config section not a table", ["--config", "{d}/section.toml"], 2, ["model=3", "[model] table"]),
    ("flag not a number", ["--pp", "two"], 2, ["--pp", "invalid int value", "--help"]),
    ("unknown schedule", ["--schedule", "gpipe"], 2, ["--schedule", "invalid choice", "dualpipe"]),
    ("unknown flag", ["--stepz", "3"], 2, ["unrecognized arguments: --stepz"]),
    ("pp zero", ["--pp", "0"], 2, ["pipeline.pp=0", "positive integer"]),
    ("dualpipe odd microbatches", ["--microbatches", "5"], 2, ["microbatches=5", "even"]),
    ("dualpipe too few microbatches", ["--microbatches", "2"], 2, ["microbatches=2", "2*pp=4"]),
    ("dualpipev too few microbatches", ["--schedule", "dualpipev", "--microbatches", "3"], 2, ["microbatches=3", "2*pp"]),
    ("dualpipe odd ranks", ["--pp", "3", "--microbatches", "6"], 3, ["dualpipe: pp=3 must be even", "dualpipev"]),
    ("layout vs ranks", ["--pp", "4", "--microbatches", "8"], 2, ["--pp 4 needs 4 MPI ranks", "the job has 2", "-n 4"]),
    ("stages vs layers", ["--layers", "1"], 2, ["model.num_layers=1", "more layers or fewer ranks"]),
    ("experts vs expert groups", ["--config", "{d}/groups.toml"], 2, ["model.num_groups=3", "num_routed_experts=4"]),
    ("top_k vs eligible experts", ["--config", "{d}/topk.toml"], 2, ["model.top_k=3", "raise topk_groups"]),
    ("rank precision count", ["--rank-precision", "fp32,fp32,bf16"], 2, ["rank_precision has 3 entries", "one per rank"]),
    ("rank precision kind", ["--rank-precision", "fp32,fp16"], 2, ["rank_precision[1]='fp16'", "fp32, bf16, fp8 or auto"]),
    ("unknown precision", ["--precision", "fp4"], 2, ["--precision", "invalid choice"]),
    ("unknown device kind", ["--device", "tpu:0"], 2, ["device='tpu:0'", "choose auto, cpu, cuda, cuda:N, npu or npu:N"]),
    ("zero steps", ["--steps", "0"], 2, ["steps=0", "positive integer"]),
    ("negative lr", ["--lr", "-1"], 2, ["optim.lr=-1.0", "> 0"]),
    ("betas out of range", ["--config", "{d}/betas.toml"], 2, ["optim.betas", "[0, 1)"]),
    ("data file missing", ["--data", "{d}/none.npy"], 2, ["none.npy", "no such file", "synthetic task"]),
    ("data file unreadable", ["--data", "{d}/garbage.npy"], 2, ["garbage.npy", "readable .npy"]),
    ("data not integer ids", ["--data", "{d}/floats.npy"], 2, ["1-D integer array", "float32"]),
    ("token ids outside vocabulary", ["--data", "{d}/big.npy"], 2, ["token id 39", "vocab_size is 32", "raise the vocabulary"]),
    ("negative token ids", ["--data", "{d}/neg.npy"], 2, ["negative token id -1", "0..model.vocab_size-1"]),
    ("data shorter than a sequence", ["--data", "{d}/short.npy"], 2, ["5 tokens is fewer than seq_len + 1 = 9"]),
    ("negative checkpoint interval", ["--checkpoint-every", "-1"], 2, ["checkpoint_every=-1", ">= 0"]),
    ("resume with nothing saved", ["--resume", "--checkpoint-dir", "{d}/ck-empty"], 2,
     ["no complete checkpoint", "drop --resume"]),
    ("resume another layout", ["--resume", "--checkpoint-dir", "{d}/ck-other", "--steps", "5"], 2,
     ["another layout", "model.num_layers: checkpoint 4, this run 8", "schedule: checkpoint '1f1b', this run 'dualpipe'"]),
    ("would overwrite another run", ["--checkpoint-every", "2", "--checkpoint-dir", "{d}/ck-other"], 2,
     ["already holds step-00000002", "pass --resume"]),
    ("resume past the end", ["--resume", "--checkpoint-dir", "{d}/ck-other", "--steps", "2", "--schedule", "1f1b",
                             "--microbatches", "2", "--layers", "4"], 2, ["already at step 2 of steps=2", "raise --steps"]),
]


@pytest.mark.parametrize("name,argv,world,words", ROWS, ids=[r[0] for r in ROWS])
def test_bad_configuration_is_rejected_with_field_and_fix(tmp_path, monkeypatch, name, argv, world, words):
    _files(tmp_path)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError) as err:
        preflight(parse_config(TINY + [a.format(d=tmp_path) for a in argv]), world)
    for w in words:
        assert w in str(err.value), f"{name}: {w!r} not in {err.value}"


def test_the_table_is_large_enough_and_the_good_config_passes(tmp_path, monkeypatch):
    assert len(ROWS) >= 20
    monkeypatch.chdir(tmp_path)
    np.save(tmp_path / "ok.npy", np.arange(100) % 32)
    schedule, resume_from = preflight(parse_config(TINY + ["--data", str(tmp_path / "ok.npy")]), 2)
    assert schedule.pp == 2 and resume_from is None
