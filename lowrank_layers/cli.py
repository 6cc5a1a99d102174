"""The ``lowrank-layers`` command line.

``lowrank-layers demo`` runs the demo job. User mistakes give one line on stderr
and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

import torch
from torch import nn

from . import __version__
from .factorize import relative_error
from .linear import LowRankLinear

__all__ = ["main", "run_demo", "train_digits_mlp"]


class UsageError(Exception):
    """A mistake of the user's: reported as one line, exit code 2."""


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2]


def train_digits_mlp(
    *, hidden: int = 1024, epochs: int = 30, seed: int = 0
) -> tuple[nn.Sequential, tuple[torch.Tensor, ...]]:
    """A 64-hidden-hidden-10 MLP trained with AdamW on scikit-learn's digits (70/30 split).

    Returns the model (in eval mode) and ``(x_train, x_test, y_train, y_test)``.
    """
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise UsageError("the demo needs scikit-learn: pip install 'lowrank-layers[demo]'") from exc

    torch.manual_seed(seed)
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.3, random_state=seed, stratify=y)
    model = nn.Sequential(
        nn.Linear(64, hidden),
        nn.GELU(),
        nn.Linear(hidden, hidden),
        nn.GELU(),
        nn.Linear(hidden, 10),
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(x_tr), generator=gen).split(128):
            loss = nn.functional.cross_entropy(model(x_tr[idx]), y_tr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model.eval(), (x_tr, x_te, y_tr, y_te)


def run_demo(*, hidden: int = 1024, epochs: int = 30, seed: int = 0) -> str:
    """Train an MLP on scikit-learn's digits, replace its hidden layer at several ranks.

    Returns a markdown report: parameters, relative weight error, test accuracy and
    forward latency of the hidden layer for the dense model and each rank.
    """
    model, (x_tr, x_te, _, y_te) = train_digits_mlp(hidden=hidden, epochs=epochs, seed=seed)

    def accuracy(m: nn.Module) -> float:
        with torch.no_grad():
            return float((m(x_te).argmax(-1) == y_te).float().mean())

    dense = model[2]
    batch = torch.randn(4096, hidden)
    rows = []

    def measure(name: str, layer: nn.Module, rank: str, err: float) -> None:
        model[2] = layer
        with torch.no_grad():
            latency = _median_seconds(lambda: layer(batch), repeats=9)
        params = sum(p.numel() for p in layer.parameters())
        rows.append((name, rank, params, err, accuracy(model), latency * 1e3))

    measure("nn.Linear (dense)", dense, "-", 0.0)
    for ratio in (0.5, 0.25, 0.1):
        low = LowRankLinear.from_linear(dense, param_ratio=ratio)
        err = relative_error(dense.weight, low.factors())
        measure(f"LowRankLinear param_ratio={ratio}", low, str(low.rank), err)
    model[2] = dense

    base_latency = rows[0][5]
    lines = [
        f"# lowrank-layers {__version__} demo: MLP on scikit-learn digits",
        "",
        f"Hidden layer {hidden}x{hidden} of a 64-{hidden}-{hidden}-10 MLP trained {epochs} "
        f"epochs on {len(x_tr)} images, replaced by LowRankLinear.from_linear (exact SVD); "
        f"accuracy on {len(x_te)} held-out images; latency: median forward of the layer on "
        f"a {tuple(batch.shape)} batch, {torch.get_num_threads()} threads.",
        "",
        "| layer | rank | params | rel. weight error | test accuracy | latency ms | speed-up |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, rank, params, err, acc, ms in rows:
        lines.append(
            f"| {name} | {rank} | {params:,} | {err:.3f} | {acc:.3f} | {ms:.2f} | "
            f"{base_latency / ms:.2f}x |"
        )
    return "\n".join(lines)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lowrank-layers", description="Low-rank replacements for nn.Linear."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the demo job and print its report")
    demo.add_argument("--hidden", type=int, default=1024, help="hidden width (default 1024)")
    demo.add_argument("--epochs", type=int, default=30, help="training epochs (default 30)")
    demo.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lowrank-layers`` console script; returns the exit code."""
    args = _build_parser().parse_args(argv)
    try:
        if args.command == "demo":
            if args.hidden < 16:
                raise UsageError(f"--hidden must be >= 16, got {args.hidden}")
            if args.epochs < 1:
                raise UsageError(f"--epochs must be >= 1, got {args.epochs}")
            print(run_demo(hidden=args.hidden, epochs=args.epochs, seed=args.seed))
    except (UsageError, ValueError, TypeError, FileNotFoundError) as exc:
        print(f"lowrank-layers: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
