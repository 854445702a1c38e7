"""The implicit decoder's matmul precision: ``auto`` takes bfloat16 only where the hardware runs it fast.

On a CPU without native bfloat16 arithmetic (AVX2 only, for example) a bfloat16 matmul is emulated and
several times slower than float32, so bfloat16 there is a trap. ``auto`` picks bfloat16 on CUDA devices that
support it and on CPUs whose flags list ``avx512_bf16`` or ``amx_bf16``; where the flags cannot be read (not
Linux), it times one bfloat16 and one float32 matmul, once per process, and takes the faster.
"""

from __future__ import annotations

import functools
import time

import torch

__all__ = ["PRECISIONS", "cpu_runs_bfloat16_natively", "resolve_precision"]

PRECISIONS = ("auto", "float32", "bfloat16")
_NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def _cpu_flags() -> set[str] | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        return None
    return None


def _bfloat16_matmul_is_faster(size: int = 512, repeats: int = 3) -> bool:
    timings = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        a @ b
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        timings[dtype] = time.perf_counter() - start
    return timings[torch.bfloat16] < timings[torch.float32]


@functools.lru_cache(maxsize=1)
def cpu_runs_bfloat16_natively() -> bool:
    """True when this CPU has native bfloat16 matmul instructions (detected from its flags, else measured)."""
    flags = _cpu_flags()
    if flags is not None:
        return any(flag in flags for flag in _NATIVE_BF16_FLAGS)
    return _bfloat16_matmul_is_faster()


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """``"float32"`` or ``"bfloat16"``: ``precision`` itself, or what ``"auto"`` means on ``device``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return precision
    device = torch.device(device)
    if device.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    if device.type == "cpu":
        return "bfloat16" if cpu_runs_bfloat16_natively() else "float32"
    return "float32"
