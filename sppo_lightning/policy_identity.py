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

    Exact and cheap on any device: a weight in host memory is hashed as its bytes (sha256, about
    1 GB/s); a weight on an accelerator has its bits, read as integers, summed (plainly, squared, and
    weighted by a hash of their position) in wrapping int64 arithmetic there, which does not depend
    on the order of the reduction, so only 3 numbers a tensor move to the host. Either way the same
    weights give the same digits on any thread count, and one flipped bit changes them. An
    FSDP-sharded (DTensor) weight contributes this rank's shard.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad] or list(model.named_parameters())
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, param in named:
            tensor = param.detach()
            tensor = tensor.to_local() if hasattr(tensor, "to_local") else tensor
            digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}:".encode())
            if tensor.device.type == "cpu":  # the bytes themselves, hashed where they are (no copy)
                digest.update(memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy()))
                continue
            digest.update(device_sums(tensor))
    return digest.hexdigest()[:16]


def device_sums(tensor: torch.Tensor) -> bytes:
    """24 bytes naming ``tensor``'s bits, computed where it is: its bits read as integers, summed
    plainly, squared and weighted by a hash of each position, in wrapping int64 arithmetic (the
    same on any reduction order); chunked, so the extra memory is bounded on any model."""
    flat = tensor.contiguous().reshape(-1).view(_INTS[tensor.element_size()])
    sums = torch.zeros(3, dtype=torch.int64, device=flat.device)
    positions = torch.arange(min(flat.numel(), _CHUNK), dtype=torch.int64, device=flat.device)
    for start in range(0, flat.numel(), _CHUNK):
        chunk = flat[start:start + _CHUNK].to(torch.int64)
        # a multiplicative hash of each element's position: the same values in another order differ
        weights = (positions[: chunk.numel()] + start) * _KNUTH + 1
        sums += torch.stack([chunk.sum(), (chunk * chunk).sum(), (chunk * weights).sum()])
    return sums.cpu().numpy().tobytes()
