"""The original design's headline claim, measured: progressive low-rank training vs dense.

Trains the byte-level transformer of examples/train_progressive.py (4 layers, d_model 512,
FFN 2048, context 128, batch 8) on the CPython standard library's source (90/10 split by
position) in four regimes with the same data, steps and seed: dense, progressive (dense
for the first 20% of steps, then switch_to_lowrank at rank ratio 0.25), low rank from the
start, and the dynamic-rank schedule. Reports wall-clock, tokens/s and final validation
loss, writes a loss-curve plot, and profiles a few steps of the dense and low-rank models.

    python benchmarks/progressive_training.py [--steps 400] [--out out/progressive]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "examples"))
from common import machine_description, markdown_table  # noqa: E402
from train_progressive import REGIMES, ByteLM, batches, make_linear, stdlib_bytes, train  # noqa: E402


def profile(regime: str, steps: int = 4) -> list[tuple[str, float]]:
    """Self CPU time per operator over a few training steps (the top eight)."""
    from torch.profiler import profile as torch_profile

    torch.manual_seed(0)
    model = ByteLM(make_linear(regime, 0.25))
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
    parser.add_argument("--out", type=Path, default=Path("out/progressive"))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    for regime in REGIMES:
        results.append(
            train(regime, steps=args.steps, log=lambda m: print(m, file=sys.stderr, flush=True))
        )
    dense = results[0]
    rows = [
        (
            r["regime"],
            f"{r['params']:,}",
            f"{r['seconds']:.0f}",
            f"{r['tokens_per_s']:.0f}",
            f"{dense['seconds'] / r['seconds']:.2f}x",
            f"{r['val_loss']:.4f}",
            f"{100 * (r['val_loss'] / dense['val_loss'] - 1):+.1f}%",
        )
        for r in results
    ]
    plot(results, args.out / "loss_curves.png")
    print(f"Machine: {machine_description()}\n")
    print(f"{args.steps} steps of 8 x 128 bytes, AdamW lr 1e-3 (warm-up 20, cosine), seed 0.\n")
    header = ["regime", "params", "seconds", "tokens/s", "speed-up", "val loss", "vs dense"]
    print(markdown_table(header, rows))
    print(f"\nLoss curves: {args.out / 'loss_curves.png'}\n")
    for regime in ("dense", "lowrank"):
        top = profile(regime)
        print(f"Profile, {regime} (self CPU time, top operators over 4 steps):\n")
        print(markdown_table(["operator", "% of time"], [(k, f"{v:.1f}") for k, v in top]))
        print()


if __name__ == "__main__":
    main()
