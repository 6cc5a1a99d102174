"""GradientProjector's per-step overhead against no projection and an SVD every step.

The model has the Linear layers of a 4-layer transformer with d_model 512 and FFN 2048
(per layer: four 512x512 projections, 512->2048 and 2048->512; 12.6M weights), trained
with AdamW on 8 x 256 tokens per step (attention's token mixing is left out: only the
Linear layers' cost matters here).
Measured side by side, medians of repeats:

- the step time without projection, and with projection between refreshes;
- the time of a refresh step (randomized SVD of every gradient);
- the original's way: a low-rank approximation of every gradient at every step, with the
  exact SVD (as the original) and with the randomized one.

The amortized overhead at update_every=U is (projection + refresh / U) / plain step.

    python benchmarks/bench_grad.py [--steps 12] [--rank-ratio 0.25]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_description, markdown_table

from lowrank_layers.grad import GradientProjector


def make_model() -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(4):
        layers += [nn.Linear(512, 512) for _ in range(4)]
        layers += [nn.Linear(512, 2048), nn.GELU(), nn.Linear(2048, 512)]
    return nn.Sequential(*layers)


def step_times(model, opt, x, steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        loss = model(x).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rank-ratio", type=float, default=0.25)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    x = torch.randn(8 * 256, 512, generator=torch.Generator().manual_seed(0))
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    step_times(model, opt, x, 2)  # warm-up
    plain = statistics.median(step_times(model, opt, x, args.steps))

    # projection between refreshes: a huge update_every, after the first (refresh) step
    projector = GradientProjector(model, rank_ratio=args.rank_ratio, update_every=10**9)
    refresh = step_times(model, opt, x, 1)[0]
    projected = statistics.median(step_times(model, opt, x, args.steps))
    projector.remove()

    every_step = {}
    for method in ("svd", "randomized"):
        every = GradientProjector(model, rank_ratio=args.rank_ratio, update_every=1, method=method)
        every_step[method] = statistics.median(step_times(model, opt, x, max(3, args.steps // 3)))
        every.remove()

    refresh_cost = refresh - projected
    rows = [
        ("no projection", f"{plain * 1e3:.0f}", "1.00", "-"),
        ("projection, between refreshes", f"{projected * 1e3:.0f}", f"{projected / plain:.3f}",
         "-"),
        ("refresh step (randomized SVD of each gradient)", f"{refresh * 1e3:.0f}",
         f"{refresh / plain:.2f}", "-"),
    ]  # fmt: skip
    for every_n in (200, 50):
        amortized = projected + refresh_cost / every_n
        rows.append(
            (f"update_every={every_n} (amortized)", f"{amortized * 1e3:.0f}",
             f"{amortized / plain:.3f}", f"{100 * (amortized / plain - 1):.1f}%")
        )  # fmt: skip
    for method, seconds in every_step.items():
        label = (
            "exact SVD every step (the original's way)"
            if method == "svd"
            else ("randomized SVD every step")
        )
        rows.append(
            (label, f"{seconds * 1e3:.0f}", f"{seconds / plain:.2f}",
             f"{100 * (seconds / plain - 1):.0f}%")
        )  # fmt: skip
    print(f"Machine: {machine_description()}\n")
    print(
        f"Model: 24 Linear layers (12.6M weights), 2048 tokens per step, AdamW; projection "
        f"rank ratio {args.rank_ratio}; medians of {args.steps} steps.\n"
    )
    print(markdown_table(["run", "ms per step", "vs plain", "overhead"], rows))


if __name__ == "__main__":
    main()
