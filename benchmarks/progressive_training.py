"""The original design's headline claim, measured: progressive low-rank training vs dense.

Trains a small byte-level transformer LM (4 layers, d_model 512, FFN 2048, 8 heads,
context 128, batch 8; the attention and MLP projections are the library's layers,
embeddings, layer norms and the output head stay dense) on the CPython standard library's
source (90/10 split by position) in four regimes with the same data, steps and seed:

- ``dense``: ``nn.Linear`` everywhere;
- ``progressive``: ``AdaptiveLowRankLinear`` trained dense for the first 20% of the steps,
  then ``switch_to_lowrank(model, optimizer)`` at rank ratio 0.25 (the original design's
  recommendation);
- ``lowrank``: ``LowRankLinear`` at rank ratio 0.25 from the start;
- ``dynamic``: ``DynamicLowRankLinear`` with the original's schedule (0.20 -> 0.15 -> 0.10
  of ``min(in, out)`` at 0%, 20% and 60% of the steps).

Reports wall-clock, tokens/s and final validation loss, writes a loss-curve plot, and
profiles a few steps of the dense and low-rank models. ``--regimes`` runs a subset (one
regime alone: its losses and speed, without the comparison).

    python benchmarks/progressive_training.py [--steps 400] [--out out/progressive]
    python benchmarks/progressive_training.py --regimes progressive --steps 300
"""

from __future__ import annotations

import argparse
import math
import sys
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_description, markdown_table

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
    seconds = time.perf_counter() - start
    return {
        "regime": regime,
        "seconds": seconds,
        "tokens_per_s": steps * batch * context / seconds,
        "val_loss": val_curve[-1][1],
        "curve": curve,
        "val_curve": val_curve,
        "params": sum(p.numel() for p in model.parameters()),
    }


def profile(regime: str, rank_ratio: float, steps: int = 4) -> list[tuple[str, float]]:
    """Self CPU time per operator over a few training steps (the top eight)."""
    from torch.profiler import profile as torch_profile

    torch.manual_seed(0)
    model = ByteLM(make_linear(regime, rank_ratio))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    stream = batches(stdlib_bytes(), 8, 128, torch.Generator().manual_seed(0))

    def step() -> None:
        x, y = next(stream)
        loss = F.cross_entropy(model(x).reshape(-1, 256), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()
    with torch_profile() as prof:
        for _ in range(steps):
            step()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    return [(e.key, 100 * e.self_cpu_time_total / total) for e in events[:8]]


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for r in results:
        curve = torch.tensor(r["curve"])
        smooth = torch.nn.functional.avg_pool1d(curve[None, None], 10, 1).flatten()
        ax1.plot(range(10, len(curve) + 1), smooth, label=r["regime"])
        seconds = [s * r["seconds"] / len(r["curve"]) for s, _ in r["val_curve"]]
        ax2.plot(seconds, [v for _, v in r["val_curve"]], marker="o", label=r["regime"])
    ax1.set(xlabel="step", ylabel="training loss (10-step mean)", title="per step")
    ax2.set(xlabel="wall-clock seconds", ylabel="validation loss", title="per second")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--regimes", nargs="+", choices=REGIMES, default=list(REGIMES))
    parser.add_argument("--rank-ratio", type=float, default=0.25)
    parser.add_argument("--out", type=Path, default=Path("out/progressive"))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    results = [
        train(regime, steps=args.steps, rank_ratio=args.rank_ratio, log=log)
        for regime in args.regimes
    ]
    dense = next((r for r in results if r["regime"] == "dense"), None)

    def versus(r: dict) -> tuple[str, str]:
        if dense is None:
            return "-", "-"
        return (
            f"{dense['seconds'] / r['seconds']:.2f}x",
            f"{100 * (r['val_loss'] / dense['val_loss'] - 1):+.1f}%",
        )

    rows = [
        (
            r["regime"],
            f"{r['params']:,}",
            f"{r['seconds']:.0f}",
            f"{r['tokens_per_s']:.0f}",
            versus(r)[0],
            f"{r['val_loss']:.4f}",
            versus(r)[1],
        )
        for r in results
    ]
    plot(results, args.out / "loss_curves.png")
    print(f"Machine: {machine_description()}\n")
    print(
        f"{args.steps} steps of 8 x 128 bytes, AdamW lr 1e-3 (warm-up 20, cosine), seed 0, "
        f"rank ratio {args.rank_ratio:g}.\n"
    )
    header = ["regime", "params", "seconds", "tokens/s", "speed-up", "val loss", "vs dense"]
    print(markdown_table(header, rows))
    print(f"\nLoss curves: {args.out / 'loss_curves.png'}\n")
    for regime in ("dense", "lowrank"):
        if regime not in args.regimes:
            continue
        top = profile(regime, args.rank_ratio)
        print(f"Profile, {regime} (self CPU time, top operators over 4 steps):\n")
        print(markdown_table(["operator", "% of time"], [(k, f"{v:.1f}") for k, v in top]))
        print()


if __name__ == "__main__":
    main()
