"""Train a small byte-level transformer LM on the CPython standard library's source.

Regimes (same data, steps and seed in each):

- ``dense``: ``nn.Linear`` everywhere;
- ``progressive``: ``AdaptiveLowRankLinear`` trained dense for the first ``--switch-frac``
  of the steps, then ``switch_to_lowrank(model, optimizer)`` — the original design's
  recommendation;
- ``lowrank``: ``LowRankLinear`` from the start;
- ``dynamic``: ``DynamicLowRankLinear`` with the original's schedule (0.20 → 0.15 → 0.10 of
  ``min(in, out)`` at 0%, 20% and 60% of the steps).

The attention and MLP projections are the library's layers; embeddings, layer norms and
the output head stay dense.

    python examples/train_progressive.py --regime progressive --steps 300
"""

from __future__ import annotations

import argparse
import math
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lowrank_layers import (
    AdaptiveLowRankLinear,
    DynamicLowRankLinear,
    LowRankLinear,
    RankScheduler,
    switch_to_lowrank,
)

REGIMES = ("dense", "progressive", "lowrank", "dynamic")


def stdlib_bytes(limit: int = 4_000_000) -> torch.Tensor:
    """The first ``limit`` bytes of the standard library's .py files, in sorted path order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, size = [], 0
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts or "test" in path.parts:
            continue
        data = path.read_bytes()
        chunks.append(data)
        size += len(data)
        if size >= limit:
            break
    return torch.frombuffer(bytearray(b"".join(chunks)[:limit]), dtype=torch.uint8).long()


class Block(nn.Module):
    def __init__(self, d: int, ffn: int, heads: int, linear: Callable[[int, int], nn.Module]):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = linear(d, 3 * d), linear(d, d)
        self.fc1, self.fc2 = linear(d, ffn), linear(ffn, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class ByteLM(nn.Module):
    def __init__(self, linear: Callable[[int, int], nn.Module], *, d: int = 512, ffn: int = 2048,
                 layers: int = 4, heads: int = 8, context: int = 128) -> None:  # fmt: skip
        super().__init__()
        self.tok = nn.Embedding(256, d)
        self.pos = nn.Embedding(context, d)
        self.blocks = nn.ModuleList(Block(d, ffn, heads, linear) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, 256)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def make_linear(regime: str, rank_ratio: float) -> Callable[[int, int], nn.Module]:
    if regime == "dense":
        return nn.Linear
    if regime == "progressive":
        return lambda i, o: AdaptiveLowRankLinear(i, o, rank_ratio=rank_ratio)
    if regime == "lowrank":
        return lambda i, o: LowRankLinear(i, o, max(1, round(rank_ratio * min(i, o))))
    return lambda i, o: DynamicLowRankLinear(i, o, max_rank_ratio=0.2)


def batches(data: torch.Tensor, batch: int, context: int, gen: torch.Generator):
    while True:
        starts = torch.randint(0, len(data) - context - 1, (batch,), generator=gen)
        idx = torch.stack([data[s : s + context + 1] for s in starts.tolist()])
        yield idx[:, :-1], idx[:, 1:]


@torch.no_grad()
def evaluate(model: nn.Module, data: torch.Tensor, context: int, windows: int = 32) -> float:
    model.eval()
    gen = torch.Generator().manual_seed(1234)
    x, y = next(batches(data, windows, context, gen))
    loss = F.cross_entropy(model(x).reshape(-1, 256), y.reshape(-1))
    model.train()
    return float(loss)


def train(regime: str, *, steps: int = 300, batch: int = 8, context: int = 128,
          rank_ratio: float = 0.25, switch_frac: float = 0.2, lr: float = 1e-3,
          seed: int = 0, eval_every: int = 50, log: Callable[[str], None] | None = None,
          ) -> dict:  # fmt: skip
    """Train one regime; returns wall-clock, tokens/s, the loss curves and the final val loss."""
    if regime not in REGIMES:
        raise ValueError(f"regime must be one of {', '.join(REGIMES)}, got {regime!r}")
    data = stdlib_bytes()
    split = int(0.9 * len(data))
    train_data, val_data = data[:split], data[split:]
    torch.manual_seed(seed)
    model = ByteLM(make_linear(regime, rank_ratio), context=context)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    ranks = None
    if regime == "dynamic":
        ranks = RankScheduler(
            model, {0: 0.20, int(0.2 * steps): 0.15, int(0.6 * steps): 0.10}, optimizer=opt
        )
    gen = torch.Generator().manual_seed(seed)
    stream = batches(train_data, batch, context, gen)
    curve, val_curve = [], []
    switch_step = int(switch_frac * steps)
    start = time.perf_counter()
    for step in range(steps):
        if regime == "progressive" and step == switch_step:
            switch_to_lowrank(model, opt)
        if ranks is not None:
            ranks.step(step)
        x, y = next(stream)
        loss = F.cross_entropy(model(x).reshape(-1, 256), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        curve.append(float(loss.detach()))
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            val_curve.append((step + 1, evaluate(model, val_data, context)))
            if log is not None:
                log(f"{regime} step {step + 1}: train {curve[-1]:.3f}, val {val_curve[-1][1]:.3f}")
    seconds = time.perf_counter() - start - 0.0
    return {
        "regime": regime,
        "seconds": seconds,
        "tokens_per_s": steps * batch * context / seconds,
        "val_loss": val_curve[-1][1],
        "curve": curve,
        "val_curve": val_curve,
        "params": sum(p.numel() for p in model.parameters()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--regime", choices=REGIMES, default="progressive")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rank-ratio", type=float, default=0.25)
    args = parser.parse_args()
    torch.set_num_threads(2)
    result = train(args.regime, steps=args.steps, rank_ratio=args.rank_ratio, log=print)
    print(
        f"{result['regime']}: {result['seconds']:.0f} s, {result['tokens_per_s']:.0f} tokens/s, "
        f"val loss {result['val_loss']:.4f}, {result['params']:,} parameters"
    )


if __name__ == "__main__":
    main()
