"""The machine's matmul ceiling: the denominator of every utilisation figure in bench/."""

from __future__ import annotations

import time

import torch


def matmul_ceiling(shapes: list[tuple[int, int, int]], device: torch.device = torch.device("cpu"),
                   dtype: torch.dtype = torch.float32, seconds: float = 2.0) -> float:
    """The best matmul rate in FLOP/s over ``shapes`` (m, k, n), each multiplied repeatedly for
    ``seconds / len(shapes)`` after one warm-up call."""
    best = 0.0
    for m, k, n in shapes:
        a = torch.randn(m, k, device=device, dtype=dtype)
        b = torch.randn(k, n, device=device, dtype=dtype)
        torch.mm(a, b)
        sync(device)
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / len(shapes):
            torch.mm(a, b)
            count += 1
        sync(device)
        best = max(best, 2 * m * k * n * count / (time.perf_counter() - start))
    return best


def sync(device: torch.device) -> None:
    """Wait for queued CUDA work, so that a timer stops when the work does."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
