"""How fast a one-token product reads its weight, by the weight's row length.

For each row length n, eight float32 weights of 8 MiB each ((2M / n) x n) are read in
turn by ``F.linear`` of one token, so that they come from memory, not from cache, as in
a model; the same weights stored transposed (strides (1, rows)) are read the same way.
A low-rank layer's ``U (out, r)`` has rows of only ``r`` numbers, which is why the speed
model (``SpeedModel.half_row``) prices row length. The table gives GB/s per layout; the
last lines fit ``bandwidth · n / (n + half_row)`` to both columns, ``n`` the length of a
contiguous run (a row of the row-major weight, a column of the transposed one; what
``SpeedModel``'s defaults are), and run ``measure_speed_model`` for comparison.

    python benchmarks/bench_read_speed.py [--threads 2] [--repeats 9]
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_description, markdown_table, paired_median_times

from lowrank_layers.speed import fit_read_bandwidth, measure_speed_model

ROWS = (128, 256, 512, 1024, 2048, 4096, 8192)
ELEMENTS = 2 << 20  # 8 MiB of float32 per weight
COPIES = 8


def read_all(x: torch.Tensor, weights: list[torch.Tensor]) -> None:
    for w in weights:
        F.linear(x, w)


@torch.inference_mode()
def measure(repeats: int) -> list[tuple[int, float, float]]:
    torch.manual_seed(0)
    results = []
    for row in ROWS:
        weights = [torch.randn(ELEMENTS // row, row) for _ in range(COPIES)]
        transposed = [w.mT.contiguous().mT for w in weights]
        x = torch.randn(1, row)
        times = paired_median_times(
            [partial(read_all, x, weights), partial(read_all, x, transposed)], repeats
        )
        nbytes = ELEMENTS * 4 * COPIES
        results.append((row, nbytes / times[0] / 1e9, nbytes / times[1] / 1e9))
        print(f"rows of {row}", file=sys.stderr, flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = measure(args.repeats)
    print(f"Machine: {machine_description()}, float32\n")
    rows = [
        (f"{COPIES} x {ELEMENTS // row}x{row}", row, f"{fast:.1f}", ELEMENTS // row, f"{slow:.1f}")
        for row, fast, slow in results
    ]
    header = ["weights", "row-major: run", "GB/s", "transposed: run", "GB/s"]
    print(markdown_table(header, rows))
    # a contiguous run is a row of the row-major weight, a column of the transposed one
    runs = [row for row, _, _ in results] + [ELEMENTS // row for row, _, _ in results]
    speeds = [fast for _, fast, _ in results] + [slow for _, _, slow in results]
    bandwidth, half_row = fit_read_bandwidth(tuple(runs), [1 / (g * 1e9) for g in speeds])
    print(
        f"\nfit of bandwidth · n / (n + half_row) over both layouts (n: run length): "
        f"bandwidth {bandwidth / 1e9:.1f} GB/s, half_row {half_row:.0f}"
    )
    model = measure_speed_model()
    print(
        f"measure_speed_model(): bandwidth {model.bandwidth / 1e9:.1f} GB/s, "
        f"half_row {model.half_row:.0f}, peak {model.peak / 1e9:.0f} GFLOP/s, "
        f"call {model.call * 1e6:.1f} µs"
    )


if __name__ == "__main__":
    main()
