"""Host-side launch arithmetic for the kernel modules.

At ViT sizes a fused op's wall time is mostly host time, so the per-call path avoids ``triton.cdiv`` and
``triton.next_power_of_2`` (ConstexprFunctions: about 4 us a call on the host, against 0.1 us for the integer
expressions) and asks for a device's SM count once.
"""
import functools

import torch


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for a >= 0, b > 0 (what triton.cdiv computes)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n, for n >= 1 (what triton.next_power_of_2 computes)."""
    return 1 << (n - 1).bit_length()


@functools.lru_cache(maxsize=None)
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 4 for CPU tensors (the interpreter), so tests split work too."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def row_programs(n_rows: int, device: torch.device) -> int:
    """Programs of a row-wise backward kernel: a few per SM, each folding its rows into one fp32 partial sum of
    the weight/bias gradients, reduced after (fewer partials than rows, and no atomics)."""
    return min(n_rows, 4 * sm_count(device))
