"""Shared by the benchmark scripts: timing medians and the machine's matmul rate as a yardstick."""

from __future__ import annotations

import statistics

import torch
from torch.utils.benchmark import Timer
from torch.utils.flop_counter import FlopCounterMode


def median_seconds(fn, repeats: int, budget_s: float | None = None) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls, after one warm-up call, timed by torch's benchmark
    ``Timer`` with torch's current thread count (the Timer's own default is one thread).

    ``budget_s``: fewer timed calls (at least one) when ``repeats`` of them would take longer, as the warm-up
    call predicts: on a slow CPU a long row then costs its budget, not ``repeats`` times a long call.
    """
    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    warm_up = timer.timeit(1).median
    if budget_s is not None:
        repeats = max(1, min(repeats, int(budget_s / max(warm_up, 1e-9))))
    return statistics.median(timer.timeit(1).median for _ in range(repeats))


def cpu_summary() -> str:
    """The CPU's model name and the vector flags that decide matmul speed, from /proc/cpuinfo."""
    name, flags = "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and name == "unknown CPU":
                    name = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile")
    return f"{name}, flags: {' '.join(flag for flag in wanted if flag in flags) or 'none of ' + '/'.join(wanted)}"


def matmul_gflops(dtype: torch.dtype = torch.float32, size: int = 2048, repeats: int = 10) -> float:
    """GFLOP/s of a ``size x size`` matmul in ``dtype``: what this machine's cores do at best."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    seconds = median_seconds(lambda: a @ b, repeats)
    return 2 * size**3 / seconds / 1e9


def count_gflop(fn, inference: bool = False) -> float:
    """GFLOP of one ``fn()`` call, as torch counts them (matmuls and convolutions)."""
    # inference_mode: under plain no_grad, views of parameters still "require grad" and trip the counter
    with torch.inference_mode(inference), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e9
