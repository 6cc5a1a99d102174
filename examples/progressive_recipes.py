"""The original design's training recipes on scikit-learn's digits.

progressive: dense for the first epochs, then switch_to_lowrank (optimizer kept in step,
             optional LR halving), as the original recommends (switch at epoch 10 of 50);
dynamic:     DynamicLowRankLinear with the rank schedule {0: 0.20, 10: 0.15, 30: 0.10};
dense:       the same model with plain nn.Linear layers, for comparison.

    python examples/progressive_recipes.py --mode progressive [--epochs 50 --switch-epoch 10]
    python examples/progressive_recipes.py --mode dynamic
"""

from __future__ import annotations

import argparse
import time

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from lowrank_layers import (
    AdaptiveLowRankLinear,
    DynamicLowRankLinear,
    RankScheduler,
    switch_to_lowrank,
)


def build(mode: str, hidden: int) -> nn.Sequential:
    if mode == "progressive":
        layer = lambda i, o: AdaptiveLowRankLinear(i, o, rank_ratio=0.1)  # noqa: E731
    elif mode == "dynamic":
        layer = lambda i, o: DynamicLowRankLinear(i, o, max_rank_ratio=0.2)  # noqa: E731
    else:
        layer = nn.Linear
    return nn.Sequential(
        nn.Linear(64, hidden),
        nn.ReLU(),
        layer(hidden, hidden),
        nn.ReLU(),
        layer(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, 10),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--mode", choices=["progressive", "dynamic", "dense"], default="progressive"
    )
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--switch-epoch", type=int, default=10)
    parser.add_argument("--halve-lr", action="store_true", help="halve the LR at the switch")
    parser.add_argument("--hidden", type=int, default=1024)
    args = parser.parse_args()

    torch.manual_seed(0)
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.3, random_state=0, stratify=y)

    model = build(args.mode, args.hidden)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    lr_sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs)
    rank_sched = (
        RankScheduler(model, {0: 0.20, 10: 0.15, 30: 0.10}, optimizer=opt)
        if args.mode == "dynamic"
        else None
    )
    gen = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for epoch in range(args.epochs):
        if args.mode == "progressive" and epoch == args.switch_epoch:
            results = switch_to_lowrank(model, opt)  # each layer's own policy: rank_ratio=0.1
            if args.halve_lr:
                for group in opt.param_groups:
                    group["lr"] /= 2
            errors = ", ".join(
                f"{n}: rank {r.rank}, err {r.relative_error:.3f}" for n, r in results.items()
            )
            print(f"epoch {epoch}: switched to low rank ({errors})")
        if rank_sched is not None:
            rank_sched.step(epoch)
        model.train()
        for idx in torch.randperm(len(x_tr), generator=gen).split(64):
            loss = nn.functional.cross_entropy(model(x_tr[idx]), y_tr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        lr_sched.step()
        if epoch % 10 == 9 or epoch == args.epochs - 1:
            model.eval()
            with torch.no_grad():
                acc = float((model(x_te).argmax(-1) == y_te).float().mean())
            ranks = [m.rank for m in model.modules() if hasattr(m, "rank") and m.rank is not None]
            print(
                f"epoch {epoch + 1:3d}: loss {float(loss):.4f}, accuracy {acc:.4f}, ranks {ranks}"
            )
    params = sum(p.numel() for p in model.parameters())
    print(f"{args.mode}: {params:,} parameters, {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
