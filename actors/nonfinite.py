"""NaN/Inf in training: detected from values the step already brings to the host, located after a hit.

Detection costs nothing extra: the last stage turns every microbatch's loss into a Python float
anyway (``loss.item()``), and every rank receives the step's global gradient norm before AdamW, so
a non-finite loss or norm is one ``math.isfinite`` each — no per-layer check, no device sync.
Only after a hit does :func:`locate` look at every parameter and gradient of the rank's chunks
(one pass, once) to say where: which layer holds non-finite weights (corruption, a bad update)
and which layers got non-finite gradients (the deepest one is where the backward first produced
them). The policy (``stop`` or ``skip``) is applied by the caller.
"""

from __future__ import annotations

import math

import torch

__all__ = ["NonFiniteError", "locate", "describe"]


class NonFiniteError(FloatingPointError):
    """A NaN or Inf stopped training (policy ``stop``); the message says where it was found."""


def _where(name: str) -> str:
    """Parameter name of a :class:`~actors.model.Stage` -> the part of the model it belongs to."""
    head = name.split(".", 2)
    if head[0] == "layers":
        return f"layer {head[1]}"
    return "embedding" if head[0] == "embed" else "head"


def _ranges(parts: list[str]) -> str:
    layers = sorted({int(p.split()[1]) for p in parts if p.startswith("layer ")})
    other = sorted({p for p in parts if not p.startswith("layer ")})
    text = [f"layer {layers[0]}" if len(layers) == 1 else f"layers {layers[0]}-{layers[-1]}"] if layers else []
    if len(layers) > 1 and layers != list(range(layers[0], layers[-1] + 1)):
        text = [f"layers {','.join(map(str, layers))}"]
    return ", ".join(text + other)


@torch.no_grad()
def locate(chunks: dict[int, torch.nn.Module], stage_ids: dict[int, int]) -> list[dict]:
    """Per chunk with a non-finite parameter or gradient: its stage, the parts (``layer N``,
    ``embedding``, ``head``) whose weights and whose gradients are non-finite, and the part where
    the backward produced them first (the deepest part with a non-finite gradient)."""
    found = []
    for c in sorted(chunks):
        bad_w, bad_g = [], []
        for name, p in chunks[c].named_parameters():
            if not bool(torch.isfinite(p).all()):
                bad_w.append(_where(name))
            if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
                bad_g.append(_where(name))
        if bad_w or bad_g:
            order = {w: i for i, w in enumerate(dict.fromkeys(_where(n) for n, _ in chunks[c].named_parameters()))}
            deepest = max(bad_g, key=lambda w: (w == "head", order[w])) if bad_g else None
            found.append({"chunk": c, "stage": stage_ids[c], "weights": sorted(set(bad_w)),
                          "grads": sorted(set(bad_g)), "backward_origin": deepest})
    return found


def describe(step: int, norm: float, rank: int, found: list[dict], bad_losses: dict[int, float]) -> str:
    """One line: step, norm, and this rank's findings (stage, layers, microbatches)."""
    parts = [f"step {step}: gradient norm {norm}" if not math.isfinite(norm) else f"step {step}"]
    for f in found:
        what = []
        if f["weights"]:
            what.append(f"non-finite weights in {_ranges(f['weights'])}")
        if f["grads"]:
            what.append(f"non-finite gradients in {_ranges(f['grads'])} (first in the backward: {f['backward_origin']})")
        parts.append(f"rank {rank} stage {f['stage']}: {'; '.join(what)}")
    if bad_losses:
        parts.append(f"rank {rank}: loss {', '.join(f'{v} at microbatch {mb}' for mb, v in sorted(bad_losses.items()))}")
    elif found:
        parts.append("every loss on this rank finite (microbatch unknown: the values went bad in the backward or "
                     "the update)")
    return "; ".join(parts)
