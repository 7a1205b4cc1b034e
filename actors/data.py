"""Training data: a deterministic synthetic language and a token-file loader.

Every source answers ``batch(step, index, micro_batch) -> (tokens, targets)``, both
``[micro_batch, seq_len]`` int64 with ``targets[:, t] = tokens[:, t+1]`` of the underlying stream.
The answer depends only on ``(seed, step, index)``, so the pipeline rank that embeds a microbatch
and the rank that computes its loss draw the same sequences without talking, and a single-process
reference sees exactly the same data.

The synthetic language (:class:`SyntheticTokens`) is a sparse first-order Markov chain fixed by
the seed: every token has ``branching`` possible successors with random (Dirichlet-like)
probabilities. Its entropy rate (:meth:`SyntheticTokens.entropy_rate`) is the lowest loss any model
can reach; a model that has learnt nothing scores ``ln(vocab_size)``. With the defaults
(256 tokens, 4 successors) those are about 1.1 and 5.55 nats, so learning shows within steps.
"""

from __future__ import annotations

import bisect
import math
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

__all__ = ["TokenSource", "SyntheticTokens", "TokenFile", "RowShard"]


class TokenSource(Protocol):
    """What the pipeline reads microbatches from."""

    seq_len: int

    def batch(self, step: int, index: int, micro_batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Microbatch ``index`` of optimizer step ``step``: (tokens, targets), ``[micro_batch, seq_len]`` int64."""
        ...


def _rng(seed: int, step: int, index: int) -> np.random.Generator:
    # One independent stream per (seed, step, microbatch): PCG64 seeds from the whole tuple.
    return np.random.Generator(np.random.PCG64([seed, step, index]))


class SyntheticTokens:
    """A sparse Markov chain over ``vocab_size`` tokens; each sequence starts from a uniform token."""

    def __init__(self, vocab_size: int, seq_len: int, seed: int = 0, *, branching: int = 4):
        if vocab_size < 2:
            raise ValueError(f"vocab_size={vocab_size}: need at least 2 tokens")
        if seq_len < 1:
            raise ValueError(f"seq_len={seq_len}: must be >= 1")
        if not 1 <= branching <= vocab_size:
            raise ValueError(f"branching={branching}: must be between 1 and vocab_size={vocab_size}")
        self.vocab_size, self.seq_len, self.seed, self.branching = vocab_size, seq_len, seed, branching
        g = torch.Generator().manual_seed(seed * 7919 + 17)
        # successors[v]: the `branching` tokens that may follow v; probs[v]: their probabilities.
        self.successors = torch.stack([torch.randperm(vocab_size, generator=g)[:branching] for _ in range(vocab_size)])
        weights = -torch.rand(vocab_size, branching, generator=g, dtype=torch.float64).log()  # Exp(1): Dirichlet(1)
        self.probs = weights / weights.sum(-1, keepdim=True)
        # Python lists for sampling: the per-position loop runs on the pipeline's critical path
        # (first and last stage draw each microbatch), and on rows this short a bisect over a list
        # is ~4x cheaper than numpy's per-call overhead (the torch ops it replaced were ~5x slower still).
        self._succ = self.successors.tolist()
        self._cum = self.probs.cumsum(-1).tolist()

    def batch(self, step: int, index: int, micro_batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        if micro_batch < 1:
            raise ValueError(f"micro_batch={micro_batch}: must be >= 1")
        g = _rng(self.seed, step, index)
        first = g.integers(0, self.vocab_size, micro_batch).tolist()
        u = g.random((micro_batch, self.seq_len)).tolist()
        cum, succ, top = self._cum, self._succ, self.branching - 1
        stream = []
        for prev, row_u in zip(first, u):
            row = [prev]
            for x in row_u:
                # the count of cumulative probabilities below u (cum is sorted), clamped against
                # rounding at 1.0: the successor u falls on
                pick = bisect.bisect_left(cum[prev], x)
                prev = succ[prev][min(pick, top)]
                row.append(prev)
            stream.append(row)
        out = torch.tensor(stream, dtype=torch.int64)
        return out[:, :-1].contiguous(), out[:, 1:].contiguous()

    def entropy_rate(self) -> float:
        """Expected next-token loss of the true model, in nats, under the chain's stationary
        distribution (a lower bound for any model's loss on long sequences)."""
        trans = torch.zeros(self.vocab_size, self.vocab_size, dtype=torch.float64)
        trans.scatter_add_(1, self.successors, self.probs)
        pi = torch.full((self.vocab_size,), 1.0 / self.vocab_size, dtype=torch.float64)
        for _ in range(2000):
            pi = pi @ trans
        row_entropy = -(self.probs * self.probs.clamp_min(1e-300).log()).sum(-1)
        return float(pi @ row_entropy)

    @property
    def uniform_loss(self) -> float:
        """Loss of a model that predicts every token as equally likely: ln(vocab_size)."""
        return math.log(self.vocab_size)


class TokenFile:
    """Sequences cut from a file of token ids, memory-mapped (never loaded whole).

    ``path``: a ``.npy`` array (any integer dtype, 1-D) or a raw binary file of ``dtype`` ids.
    The file is cut into ``(len - 1) // seq_len`` non-overlapping windows; microbatch ``index`` of
    step ``step`` takes ``micro_batch`` windows chosen by a generator seeded with
    ``(seed, step, index)`` (sampling with replacement; deterministic).
    """

    def __init__(self, path: str | Path, seq_len: int, *, seed: int = 0, dtype: str = "uint16"):
        path = Path(path)
        if not path.exists():
            raise ValueError(f"token file {path}: no such file")
        try:
            if path.suffix == ".npy":
                self.tokens = np.load(path, mmap_mode="r")
            else:
                self.tokens = np.memmap(path, dtype=np.dtype(dtype), mode="r")
        except (OSError, ValueError) as exc:
            raise ValueError(f"token file {path}: cannot read it ({exc}); pass a readable .npy of token ids "
                             f"or a raw {dtype} file") from None
        if self.tokens.ndim != 1 or not np.issubdtype(self.tokens.dtype, np.integer):
            raise ValueError(f"token file {path}: need a 1-D integer array, got {self.tokens.dtype} "
                             f"shape {self.tokens.shape}")
        self.path, self.seq_len, self.seed = path, seq_len, seed
        self.num_windows = (len(self.tokens) - 1) // seq_len
        if self.num_windows < 1:
            raise ValueError(f"token file {path}: {len(self.tokens)} tokens is fewer than seq_len + 1 = {seq_len + 1}")

    def max_token(self) -> int:
        """Largest id in the file (one pass over the map; used to check against the model's vocabulary)."""
        return int(self.tokens.max())

    def batch(self, step: int, index: int, micro_batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        if micro_batch < 1:
            raise ValueError(f"micro_batch={micro_batch}: must be >= 1")
        starts = _rng(self.seed, step, index).integers(0, self.num_windows, micro_batch) * self.seq_len
        rows = np.stack([np.asarray(self.tokens[s:s + self.seq_len + 1], dtype=np.int64) for s in starts.tolist()])
        stream = torch.from_numpy(rows)
        return stream[:, :-1].contiguous(), stream[:, 1:].contiguous()


class RowShard:
    """Part ``part`` of ``parts`` of every microbatch of ``source``: an expert-parallel rank's own
    rows. ``batch(step, index, micro_batch)`` draws the global microbatch of ``micro_batch * parts``
    sequences and returns rows ``part * micro_batch ..`` of it, so the ranks of a stage together
    see exactly the single-process run's global batch."""

    def __init__(self, source: TokenSource, *, part: int, parts: int):
        if not 0 <= part < parts:
            raise ValueError(f"part={part}: must be in 0..parts-1={parts - 1}")
        self.source, self.part, self.parts = source, part, parts
        self.seq_len = source.seq_len

    def batch(self, step: int, index: int, micro_batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        tokens, targets = self.source.batch(step, index, micro_batch * self.parts)
        rows = slice(self.part * micro_batch, (self.part + 1) * micro_batch)
        return tokens[rows], targets[rows]
