"""Stage costs (issue 22, item 4): wall time and peak memory per stage, in compress's
report."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowrank_layers import compress
from lowrank_layers.memory import (
    StageCost,
    format_bytes,
    measure_stage,
    peak_rss,
    release_free_heap,
    reset_peak_rss,
)

MIB = 2**20


def test_a_stage_records_its_own_peak():
    if not reset_peak_rss():
        pytest.skip("this kernel cannot reset the peak resident memory (/proc/self/clear_refs)")
    costs: dict[str, StageCost] = {}
    # glibc serves even a 256 MiB block from free heap space when it has some, already
    # resident after earlier tests: hand the free pages back before and after, so that the
    # block's pages are touched in this stage and gone in the next
    release_free_heap()
    with measure_stage(costs, "big"):
        big = torch.ones(256 * MIB // 4)  # 256 MiB, touched
        del big
        release_free_heap()
    with measure_stage(costs, "small"):
        small = torch.ones(MIB // 4)
        del small
    assert costs["big"].peak_rss - costs["small"].peak_rss >= 200 * MIB  # 256 MiB, less noise
    assert not costs["big"].since_start and costs["big"].peak_cuda is None
    assert costs["big"].seconds > 0


def test_a_stage_that_raises_is_still_recorded():
    costs: dict[str, StageCost] = {}
    with pytest.raises(RuntimeError, match="boom"), measure_stage(costs, "failing"):
        raise RuntimeError("boom")
    assert set(costs) == {"failing"} and costs["failing"].peak_rss is not None


def test_peak_rss_reads_the_resident_peak():
    rss = peak_rss()
    assert rss is not None and rss > 10 * MIB  # a process with torch imported
    assert format_bytes(3 * 2**30) == "3.00 GiB" and format_bytes(5 * MIB) == "5 MiB"
    assert str(StageCost(1.25, 3 * MIB)) == "1.2 s, peak RSS 3 MiB"
    assert str(StageCost(2.0, 3 * MIB, since_start=True, peak_cuda=2**30)) == (
        "2.0 s, peak RSS 3 MiB, since start, peak CUDA 1.00 GiB"
    )


def test_compress_reports_each_stage_cost():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 256), nn.GELU(), nn.Linear(256, 128), nn.GELU(),
                          nn.Linear(128, 8))  # fmt: skip
    batches = [torch.randn(64, 128, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    report = compress(model, batches, budget=0.6)
    assert set(report.costs) == {"allocation", "conversion"}
    assert report.seconds == {k: c.seconds for k, c in report.costs.items()}
    assert all(c.peak_rss is not None and c.peak_rss > 10 * MIB for c in report.costs.values())
    assert "stages: allocation " in str(report) and "peak RSS" in str(report)
