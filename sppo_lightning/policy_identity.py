"""Which policy drew a set of samples: a fingerprint of its weights, recorded with the generations.

A self-play iteration's samples are only valid for the π_t that drew them. A run restarted without
its checkpoint, or with another learning rate, reaches iteration t with other weights; the samples
on disk then belong to a policy the run no longer has and must be redone. Each generation stage
therefore records ``weights_fingerprint(π_t)`` as its input (``IterationArtifacts.finished``
compares it), and the data module keeps the fingerprint of the current iteration's π_t in its
checkpoint state, since a run resumed in the middle of an iteration holds later weights than π_t.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

_CHUNK = 1 << 22  # elements widened to int64 at a time: bounded extra memory on any model

_KNUTH = 2654435761  # Knuth's multiplicative hashing constant

_INTS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def weights_fingerprint(model: nn.Module) -> str:
    """16 hex digits naming the trainable weights of ``model`` (every weight if none trains).

    Exact and cheap on any device: each tensor's bits, read as integers, are summed (plainly, squared,
    and weighted by a hash of their position) in wrapping int64 arithmetic, which does not depend on
    the order of the reduction: the same weights give the same digits on any thread count or GPU, and one
    flipped bit changes them. Reductions run where the weights are; only 3 numbers a tensor move
    to the host. An FSDP-sharded (DTensor) weight contributes this rank's shard.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad] or list(model.named_parameters())
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, param in named:
            tensor = param.detach()
            tensor = tensor.to_local() if hasattr(tensor, "to_local") else tensor
            flat = tensor.contiguous().reshape(-1).view(_INTS[tensor.element_size()])
            sums = torch.zeros(3, dtype=torch.int64, device=flat.device)
            positions = torch.arange(min(flat.numel(), _CHUNK), dtype=torch.int64, device=flat.device)
            for start in range(0, flat.numel(), _CHUNK):
                chunk = flat[start:start + _CHUNK].to(torch.int64)
                # a multiplicative hash of each element's position: the same values in another order differ
                weights = (positions[: chunk.numel()] + start) * _KNUTH + 1
                sums += torch.stack([chunk.sum(), (chunk * chunk).sum(), (chunk * weights).sum()])
            digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}:".encode())
            digest.update(sums.cpu().numpy().tobytes())
    return digest.hexdigest()[:16]
