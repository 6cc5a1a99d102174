"""Shared helpers for the benchmarks: timing by medians, machine description, tables."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from lowrank_layers.speed import median_seconds

# glibc serves allocations above its mmap threshold (at most 32 MiB by default) with
# fresh pages from the OS and returns them on free: every large tensor then pays page
# faults. These settings keep freed memory in the heap instead.
TUNED_MALLOC_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(1 << 32),
    "MALLOC_TRIM_THRESHOLD_": str(1 << 36),
    "MALLOC_TOP_PAD_": str(1 << 30),
}


# median wall-clock seconds of fn() over `repeats` runs after `warmup` runs: the library's
# own timer (its speed model is measured with it)
median_time = median_seconds


def paired_median_times(
    fns: Sequence[Callable[[], object]], repeats: int, warmup: int = 1
) -> list[float]:
    """Median seconds of each function, run interleaved so drift affects all alike."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            times[i].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def issue_time_forward(
    x: torch.Tensor,
    U: torch.Tensor,
    S: torch.Tensor,
    V: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """The low-rank forward of commit f55c323, before issue 10: ``S`` folded into ``U`` and
    the rank zero-padded to a multiple of 8 on every call, ``V`` given as ``(in, r)``."""
    weight = U * S
    pad = -S.shape[0] % 8
    if pad:
        V = F.pad(V, (0, pad))
        weight = F.pad(weight, (0, pad))
    return F.linear(F.linear(x, V.mT), weight, bias)


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    allocator = "tuned glibc malloc" if os.environ.get("MALLOC_MMAP_THRESHOLD_") else "default"
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), Python {platform.python_version()}, "
        f"allocator: {allocator}"
    )


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def rerun_with_env(env: dict[str, str], argv: Sequence[str]) -> str:
    """Run this script again in a child process with extra environment variables."""
    child_env = {**os.environ, **env}
    return subprocess.run(
        [sys.executable, *argv], env=child_env, check=True, capture_output=True, text=True
    ).stdout
