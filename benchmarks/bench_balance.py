"""Row balancing variants ("none", "rownorm", "rowsum") at equal rank: weight and output error.

Three weights, each factorized with the exact SVD at rank ratios 0.1 and 0.25:

- ``scaled-rows``: a 1024x1024 Gaussian weight whose rows are scaled log-uniformly over
  two decades (rows of very different importance), on standard Gaussian inputs;
- ``zero-mean-rows``: the same with every row shifted to sum to zero, the case the
  original's row sums cannot handle;
- ``digits-mlp``: the 1024x1024 hidden layer of an MLP trained 30 epochs on scikit-learn's
  digits, on its real inputs: the first layer's activations on
  the held-out images.

Weight error is ||W - W_r||_F / ||W||_F; output error is ||(W - W_r) X||_F / ||W X||_F.

    python benchmarks/bench_balance.py [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_description, markdown_table

from lowrank_layers import factorize
from lowrank_layers.factorize import relative_error


def train_digits_mlp(*, hidden: int, epochs: int, seed: int) -> tuple[nn.Sequential, tuple]:
    """A 64-hidden-hidden-10 MLP trained with AdamW on scikit-learn's digits (70/30 split)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

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


def cases(gen: torch.Generator) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    n = 1024
    scales = 10 ** (2 * torch.rand(n, 1, generator=gen) - 1)
    scaled = torch.randn(n, n, generator=gen) * scales / n**0.5
    zero_mean = scaled - scaled.mean(dim=1, keepdim=True)
    gauss_x = torch.randn(n, 4096, generator=gen)
    model, (_, x_te, _, _) = train_digits_mlp(hidden=n, epochs=30, seed=0)
    with torch.no_grad():
        acts = model[1](model[0](x_te)).mT.contiguous()  # (in, samples)
    return {
        "scaled-rows": (scaled, gauss_x),
        "zero-mean-rows": (zero_mean, gauss_x),
        "digits-mlp": (model[2].weight.detach().clone(), acts),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for name, (W, X) in cases(gen).items():
        ref = W.double() @ X.double()
        for ratio in (0.1, 0.25):
            for balance in ("none", "rownorm", "rowsum"):
                f = factorize(W, rank_ratio=ratio, balance=balance)
                out = f.to(torch.float64).dense() @ X.double()
                out_err = float(torch.linalg.norm(out - ref) / torch.linalg.norm(ref))
                rows.append(
                    (name, ratio, f.rank, balance, f"{relative_error(W, f):.4f}", f"{out_err:.4f}")
                )
    print(f"Machine: {machine_description()}\n")
    header = ["weight", "rank ratio", "rank", "balance", "weight error", "output error"]
    print(markdown_table(header, rows))


if __name__ == "__main__":
    main()
