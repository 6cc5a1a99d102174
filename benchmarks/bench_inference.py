"""LowRankLinear against nn.Linear in inference, from one token per call to 4096.

For each shape, param_ratio and token count, nn.Linear, LowRankLinear as stored (``Vh``
and ``U`` row-major, format 2) and after ``inference_layout_`` (``U`` stored transposed,
float32 only), and, for reference, the forward this library had before issue 10 (which
folded and padded the factors on every call) run side by side in
``torch.inference_mode`` (interleaved repeats, medians). The limit of the speed-up is
``in·out / (r·(in+out))``: the ratio of weights read at few tokens, and of FLOPs at many.
The last columns are what ``expected_speedup`` (the conversion reports' ``x@N``) predicts
for each layout, and the summary how far those predictions are from the measurements.

At few tokens a call is bound by reading the weights, so a benchmark that calls one
layer over and over measures a layer that sits in the CPU's caches, unlike a layer in a
model, whose weights come from memory. Each timing therefore runs a pool of copies of
the layer, as many as make 128 MiB of dense weights (4x this machine's 32 MiB L3), and
reports the time per layer.

    python benchmarks/bench_inference.py [--quick] [--threads 2] [--dtype float32|bfloat16]
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
from functools import partial
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    issue_time_forward,
    machine_description,
    markdown_table,
    paired_median_times,
)

from lowrank_layers import LowRankLinear, inference_layout_
from lowrank_layers.speed import expected_speedup

SHAPES = [(576, 576), (576, 1536), (1536, 576), (1024, 1024), (768, 3072), (3072, 768)]
RATIOS = [0.9, 0.8, 0.5]
TOKENS = [1, 2, 4, 8, 64, 512, 4096]
POOL_BYTES = 128 << 20


def previous_forward(layer: LowRankLinear, x: torch.Tensor) -> torch.Tensor:
    """The forward before issue 10, on this layer's factors as stored (``V`` a view)."""
    return issue_time_forward(x, layer.U, layer.S, layer.V, layer.bias)


def run_pool(fn, layers: list[nn.Module], x: torch.Tensor) -> None:
    for layer in layers:
        fn(layer, x)


def measure(threads: int, quick: bool, dtype: torch.dtype) -> list[dict]:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    shapes = SHAPES[:3] if quick else SHAPES
    tokens_list = [1, 8, 512] if quick else TOKENS
    results = []
    for in_f, out_f in shapes:
        dense_bytes = in_f * out_f * torch.finfo(dtype).bits // 8
        for ratio in RATIOS:
            base = nn.Linear(in_f, out_f, dtype=dtype)
            low = LowRankLinear.from_linear(base, param_ratio=ratio, method="randomized")
            r = low.rank
            limit = in_f * out_f / (r * (in_f + out_f))
            for n in tokens_list:
                # a pool large enough to leave the caches only matters while weights dominate
                copies = max(1, POOL_BYTES // dense_bytes) if n <= 64 else 1
                denses = [nn.Linear(in_f, out_f, dtype=dtype) for _ in range(copies)]
                lows = [LowRankLinear(in_f, out_f, r, dtype=dtype) for _ in range(copies)]
                laid_out = copy.deepcopy(lows)
                inference_layout_(nn.ModuleList(laid_out))
                x = torch.randn(n, in_f, dtype=dtype)
                flops = 2 * n * in_f * out_f * copies
                reps = 15 if flops < 2e9 else 7 if flops < 2e10 else 5
                with torch.inference_mode():
                    t_dense, t_low, t_layout, t_prev = paired_median_times(
                        [
                            partial(run_pool, nn.Linear.__call__, denses, x),
                            partial(run_pool, LowRankLinear.__call__, lows, x),
                            partial(run_pool, LowRankLinear.__call__, laid_out, x),
                            partial(run_pool, previous_forward, lows, x),
                        ],
                        reps,
                    )
                results.append(
                    {
                        "shape": f"{in_f}x{out_f}",
                        "ratio": ratio,
                        "rank": r,
                        "N": n,
                        "limit": limit,
                        "dense_us": t_dense / copies * 1e6,
                        "speedup": t_dense / t_low,
                        "layout": t_dense / t_layout,
                        "previous": t_dense / t_prev,
                        # what conversion reports show (x@N), for each layout
                        "model": expected_speedup(in_f, out_f, r, n, dtype=dtype),
                        "model_layout": expected_speedup(
                            in_f, out_f, r, n, dtype=dtype, inference_layout=True
                        ),
                    }
                )
                print(f"{in_f}x{out_f} ratio={ratio} N={n}", file=sys.stderr, flush=True)
    return results


def table(results: list[dict]) -> str:
    rows = [
        (
            r["shape"],
            r["ratio"],
            r["rank"],
            r["N"],
            f"{r['limit']:.2f}",
            f"{r['dense_us']:.0f}",
            f"{r['speedup']:.2f}",
            f"{100 * r['speedup'] / r['limit']:.0f}%",
            f"{r['layout']:.2f}",
            f"{100 * r['layout'] / r['limit']:.0f}%",
            f"{r['previous']:.2f}",
            f"{r['model']:.2f}",
            f"{r['model_layout']:.2f}",
        )
        for r in results
    ]
    header = [
        "in x out",
        "param_ratio",
        "rank",
        "tokens",
        "limit",
        "nn.Linear µs",
        "speed-up",
        "of limit",
        "inference_layout_",
        "of limit",
        "previous forward",
        "model",
        "model, inference_layout_",
    ]
    summary = []
    for key, label in (("speedup", "as stored"), ("layout", "inference_layout_")):
        few = [r[key] / r["limit"] for r in results if r["N"] <= 8]
        slower = [r for r in results if r[key] < 1]
        summary += [
            f"{label}: tokens 1-8: median {100 * statistics.median(few):.0f}% of the limit, "
            f"min {100 * min(few):.0f}% ({len(few)} configurations); slower than nn.Linear "
            f"in {len(slower)} of {len(results)}: "
            + ", ".join(f"{r['shape']}/{r['ratio']}/{r['N']} {r[key]:.2f}" for r in slower)
        ]
    for label, keep in (
        ("1 token", lambda n: n == 1),
        ("2-8 tokens", lambda n: 1 < n <= 8),
        ("64+ tokens", lambda n: n >= 64),
    ):
        part = [r for r in results if keep(r["N"])]
        if not part:
            continue
        errors = []
        for key, model in (("speedup", "model"), ("layout", "model_layout")):
            logs = [math.log(r[model] / r[key]) for r in part]
            errors.append(
                f"{math.sqrt(statistics.fmean(x * x for x in logs)):.3f} "
                f"(mean {statistics.fmean(logs):+.3f})"
            )
        summary.append(
            f"speed model (expected_speedup) at {label}: root mean square of "
            f"log(model / measured) {errors[0]} as stored, {errors[1]} after "
            f"inference_layout_ ({len(part)} configurations)"
        )
    return markdown_table(header, rows) + "\n\n" + "\n".join(summary)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="three shapes, tokens 1, 8, 512")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    results = measure(args.threads, args.quick, dtype)
    print(f"Machine: {machine_description()}, dtype {args.dtype}\n")
    print(table(results))


if __name__ == "__main__":
    main()
