"""A 30-second tour of lowrank-layers: factorize a weight, replace a layer, build a model.

python examples/quickstart.py
"""

import torch
from torch import nn

from lowrank_layers import LowRankLinear, factorize, make_efficient_linear
from lowrank_layers.factorize import relative_error

torch.manual_seed(0)

# 1. Factorize a weight: exactly one rank policy (rank, rank_ratio, energy or param_ratio).
W = torch.randn(512, 256)
f = factorize(W, param_ratio=0.5)  # keep at most half the parameters
print(f"factorize: rank {f.rank}, relative error {relative_error(W, f):.3f}")
f = factorize(W, energy=0.9, method="randomized")  # keep 90% of sum(sigma^2)
print(f"factorize: energy 0.9 -> rank {f.rank}, relative error {relative_error(W, f):.3f}")

# 2. Replace an nn.Linear by its low-rank factorization (device, dtype and bias are kept).
dense = nn.Linear(1024, 1024)
low = LowRankLinear.from_linear(dense, rank_ratio=0.25)
x = torch.randn(8, 16, 1024)
print(
    f"{low}: {sum(p.numel() for p in low.parameters()):,} parameters "
    f"(dense: {sum(p.numel() for p in dense.parameters()):,}), output shape {tuple(low(x).shape)}"
)
back = low.to_linear()  # and back to a dense nn.Linear holding the product

# 3. Build a model with low rank where it pays (large layers), nn.Linear elsewhere.
model = nn.Sequential(
    make_efficient_linear(1024, 4096, rank_ratio=0.15),  # -> LowRankLinear, rank 154
    nn.GELU(),
    make_efficient_linear(4096, 1024, rank_ratio=0.15),  # -> LowRankLinear, rank 154
    nn.GELU(),
    make_efficient_linear(1024, 10),  # small: stays nn.Linear
)
print(model)
loss = model(torch.randn(32, 1024)).logsumexp(-1).mean()
loss.backward()  # trains like any module
