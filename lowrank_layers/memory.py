"""What a stage of a pipeline costs: wall time, the process's peak resident memory and,
on a CUDA device, the allocator's peak.

The resident peak is the kernel's ``VmHWM`` (Linux, ``/proc/self/status``), reset at the
start of each stage by writing ``5`` to ``/proc/self/clear_refs``, so each stage reports
its own peak; anything else reading the process's ``VmHWM`` sees the reset too. Where that
reset is not possible (another OS, a locked-down ``/proc``), the peak is the process's
since it started (``resource.getrusage``), which
:attr:`StageCost.since_start` says. A CUDA peak is ``torch.cuda.max_memory_allocated``
after ``torch.cuda.reset_peak_memory_stats``: tensors, not the driver's reserve.
"""

from __future__ import annotations

import ctypes
import functools
import resource
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "StageCost",
    "format_bytes",
    "measure_stage",
    "peak_rss",
    "pin_mmap_threshold",
    "release_free_heap",
    "reset_peak_rss",
]

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


@dataclass(frozen=True)
class StageCost:
    """One stage's cost.

    Attributes:
        seconds: wall time.
        peak_rss: the process's peak resident memory in bytes during the stage (or since
            the process started, when ``since_start``); None where it cannot be read.
        since_start: ``peak_rss`` could not be reset at the stage's start.
        peak_cuda: the CUDA allocator's peak in bytes during the stage, on a CUDA device;
            else None.
    """

    seconds: float
    peak_rss: int | None
    since_start: bool = False
    peak_cuda: int | None = None

    def __str__(self) -> str:
        text = f"{self.seconds:.1f} s"
        if self.peak_rss is not None:
            since = ", since start" if self.since_start else ""
            text += f", peak RSS {format_bytes(self.peak_rss)}{since}"
        if self.peak_cuda is not None:
            text += f", peak CUDA {format_bytes(self.peak_cuda)}"
        return text


def format_bytes(n: int) -> str:
    """``n`` bytes in MiB or GiB, as a person reads them."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def reset_peak_rss() -> bool:
    """Reset the process's peak resident memory (Linux); whether it could."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def peak_rss() -> int | None:
    """The process's peak resident memory in bytes: ``VmHWM`` (since the last
    :func:`reset_peak_rss`) where the kernel reports it, else ``ru_maxrss`` (since the
    process started), else None."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    except (OSError, ValueError):  # pragma: no cover - getrusage does not fail on POSIX
        return None
    return usage if sys.platform == "darwin" else usage * 1024  # bytes on macOS, else kB


@contextmanager
def measure_stage(
    costs: dict[str, StageCost], name: str, device: torch.device | None = None
) -> Iterator[None]:
    """Record the stage run in the ``with`` block as ``costs[name]`` (also when it raises).

    Args:
        costs: where the cost goes.
        name: the stage's name.
        device: the device the stage computes on; on a CUDA device its allocator's peak is
            recorded too.
    """
    cuda = device is not None and device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    reset = reset_peak_rss()
    start = time.perf_counter()
    try:
        yield
    finally:
        costs[name] = StageCost(
            seconds=time.perf_counter() - start,
            peak_rss=peak_rss(),
            since_start=not reset,
            peak_cuda=torch.cuda.max_memory_allocated(device) if cuda else None,
        )


@functools.cache
def _libc_function(name: str) -> Callable[..., int] | None:
    """``name`` from glibc (``malloc_trim``, ``mallopt``); None under another C library."""
    try:
        lib = ctypes.CDLL(None)
        if not hasattr(lib, "gnu_get_libc_version"):
            return None  # musl, macOS: their allocators behave differently
        return getattr(lib, name)
    except (AttributeError, OSError, TypeError):  # TypeError: CDLL(None) on Windows
        return None


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def pin_mmap_threshold(threshold: int = 1 << 20) -> bool:
    """Serve every C allocation of ``threshold`` bytes or more with its own ``mmap`` (glibc).

    For a process that does nothing but convert: the CLI's ``convert`` and the worker
    processes of :func:`~lowrank_layers.convert_checkpoint` call it. glibc otherwise raises its mmap
    threshold to the size of the largest block freed (up to 32 MiB), and from then on
    serves the factorization's ``(·, rank)`` working matrices from its heap, where, once
    freed, they stay resident and fragmented: 30-60 MiB beside a 4096x8192 float32
    weight, which ``malloc_trim`` between steps does not fully recover. With the
    threshold pinned each such block goes back to the OS when freed, at the price of
    faulting its pages in again when it is next allocated (~40k page faults, ~0.15 s of
    system time per 4096x8192 weight, a few percent of its factorization).
    :func:`~lowrank_layers.convert_checkpoint` and :func:`~lowrank_layers.compress` do not
    call it themselves: a pinned threshold stays for the life of the process, and would
    change the allocator of the caller's own work.

    Returns:
        Whether the threshold was set (False under another C library).
    """
    mallopt = _libc_function("mallopt")
    return mallopt is not None and bool(mallopt(_M_MMAP_THRESHOLD, int(threshold)))


def release_free_heap() -> None:
    """Return the C heap's free pages to the OS: glibc's ``malloc_trim(0)``, else nothing.

    glibc serves blocks below its mmap threshold from the heap, and that threshold rises
    to the size of any large block freed (up to 32 MiB): after the first tensor, the
    factorization's ``(·, rank)`` working matrices come from the heap, and once freed
    they stay resident, fragmented so the heap cannot shrink from its top: 50-80 MiB
    beside the next 4096x8192 float32 tensor, in a process whose mmap threshold is not
    pinned (:func:`pin_mmap_threshold`). Costs 7-15 ms per call after a factorization
    of that size (well under 1% of it), less after smaller ones.
    """
    trim = _libc_function("malloc_trim")
    if trim is not None:
        trim(0)
