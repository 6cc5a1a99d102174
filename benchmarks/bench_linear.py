"""LowRankLinear against nn.Linear: forward+backward speed-up as a fraction of the FLOP limit.

For each (in, out), token count N and rank ratio, nn.Linear and LowRankLinear (rank =
ratio * min(in, out)) run forward + backward side by side (interleaved repeats, medians),
with an input that requires grad, as for any layer inside a network. The FLOP-ratio
limit of the speed-up is in*out / (r*(in+out)); the table reports the measured speed-up
and its fraction of that limit, plus the forward-only (inference) speed-up.

Next to them runs the forward this project had when issue 10 was filed (commit f55c323:
V stored as (in, r), S and D folded into U and the rank zero-padded to a multiple of 8 on
every call), on the same factors. The machine's speed drifts between runs (nn.Linear's
own time for one product varied by up to 1.9x), so whether training speed is kept is
read from the ratio of the two forwards within one run, not from percentages of
separate runs.

The run is repeated in a child process with glibc's malloc tuned (MALLOC_MMAP_THRESHOLD_
and MALLOC_TRIM_THRESHOLD_ raised), since by default every allocation over 32 MiB gets
fresh pages from the OS, which costs both layers page faults on large outputs.

    python benchmarks/bench_linear.py [--quick] [--threads 2] [--allocator both|default|tuned]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from functools import partial
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    TUNED_MALLOC_ENV,
    issue_time_forward,
    machine_description,
    markdown_table,
    paired_median_times,
    rerun_with_env,
)

from lowrank_layers import LowRankLinear

SHAPES = [(1024, 1024), (768, 3072), (3072, 768), (4096, 4096)]
TOKENS = [32, 512, 4096]
RATIOS = [0.1, 0.25]


class IssueTimeLowRank(nn.Module):
    """The forward of commit f55c323 (before issue 10) on a LowRankLinear's factors."""

    def __init__(self, layer: LowRankLinear) -> None:
        super().__init__()
        self.U = nn.Parameter(layer.U.detach().clone())
        self.S = nn.Parameter(layer.S.detach().clone())
        self.V = nn.Parameter(layer.Vh.detach().t().contiguous())  # format 1: V (in, r)
        self.bias = nn.Parameter(layer.bias.detach().clone())

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return issue_time_forward(input, self.U, self.S, self.V, self.bias)


def repeats_for(flops: float) -> int:
    return 15 if flops < 5e9 else 7 if flops < 5e10 else 5


def train_step(layer: nn.Module, x: torch.Tensor, grad_out: torch.Tensor) -> None:
    layer(x).backward(grad_out)
    x.grad = None
    for p in layer.parameters():
        p.grad = None


def inference(layer: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        layer(x)


def measure(threads: int, quick: bool) -> list[dict]:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    shapes = SHAPES[:2] if quick else SHAPES
    tokens = [512] if quick else TOKENS
    results = []
    for in_f, out_f in shapes:
        dense = nn.Linear(in_f, out_f)
        for n in tokens:
            x = torch.randn(n, in_f, requires_grad=True)
            grad_out = torch.randn(n, out_f)
            for ratio in RATIOS:
                low = LowRankLinear.from_linear(dense, rank_ratio=ratio, method="randomized")
                r = low.rank
                limit = in_f * out_f / (r * (in_f + out_f))

                old = IssueTimeLowRank(low)
                reps = repeats_for(6 * n * in_f * out_f)
                t_dense, t_low, t_old = paired_median_times(
                    [partial(train_step, m, x, grad_out) for m in (dense, low, old)], reps
                )
                f_dense, f_low = paired_median_times(
                    [partial(inference, m, x) for m in (dense, low)], reps
                )
                results.append(
                    {
                        "in": in_f,
                        "out": out_f,
                        "N": n,
                        "ratio": ratio,
                        "rank": r,
                        "limit": limit,
                        "dense_ms": t_dense * 1e3,
                        "lowrank_ms": t_low * 1e3,
                        "speedup": t_dense / t_low,
                        "fraction": t_dense / t_low / limit,
                        "old_ms": t_old * 1e3,
                        "old_fraction": t_dense / t_old / limit,
                        "fwd_speedup": f_dense / f_low,
                    }
                )
                print(f"{in_f}x{out_f} N={n} ratio={ratio}", file=sys.stderr)
    return results


def table(results: list[dict]) -> str:
    rows = [
        (
            f"{r['in']}x{r['out']}",
            r["N"],
            r["ratio"],
            r["rank"],
            f"{r['limit']:.2f}",
            f"{r['dense_ms']:.2f}",
            f"{r['lowrank_ms']:.2f}",
            f"{r['speedup']:.2f}",
            f"{100 * r['fraction']:.0f}%",
            f"{r['fwd_speedup']:.2f}",
            f"{r['old_ms']:.2f}",
            f"{100 * r['old_fraction']:.0f}%",
            f"{r['old_ms'] / r['lowrank_ms']:.2f}",
        )
        for r in results
    ]
    header = [
        "in x out",
        "N",
        "ratio",
        "rank",
        "FLOP limit",
        "dense fwd+bwd ms",
        "low-rank fwd+bwd ms",
        "speed-up",
        "of limit",
        "fwd-only speed-up",
        "issue-time fwd+bwd ms",
        "issue-time of limit",
        "now vs issue-time",
    ]
    big = [r for r in results if r["N"] >= 512]
    now = [r["fraction"] for r in big]
    old = [r["old_fraction"] for r in big]
    summary = (
        f"\nN >= 512: median {100 * statistics.median(now):.0f}% of the FLOP limit, "
        f"min {100 * min(now):.0f}%, max {100 * max(now):.0f}% ({len(now)} configurations); "
        f"issue-time forward {100 * statistics.median(old):.0f}%; now vs issue-time: median "
        f"{statistics.median(r['old_ms'] / r['lowrank_ms'] for r in big):.2f}x"
    )
    return markdown_table(header, rows) + summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="two shapes, N=512 only")
    parser.add_argument("--allocator", choices=["both", "default", "tuned"], default="both")
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.json:  # child mode: measure in this process's environment, print JSON
        print(
            json.dumps(
                {"machine": machine_description(), "results": measure(args.threads, args.quick)}
            )
        )
        return
    child = [__file__, "--json", "--threads", str(args.threads)] + (
        ["--quick"] if args.quick else []
    )
    modes = ["default", "tuned"] if args.allocator == "both" else [args.allocator]
    for mode in modes:
        out = rerun_with_env(TUNED_MALLOC_ENV if mode == "tuned" else {}, child)
        data = json.loads(out)
        print(f"### allocator: {mode}\n\nMachine: {data['machine']}\n")
        print(table(data["results"]) + "\n")


if __name__ == "__main__":
    main()
