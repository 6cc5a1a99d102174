"""First use, measured: the defaults a new user meets (issue 21), each with its figure.

Cases (each prints one table; all on held-out data):

- `mlp`: a 3-layer MLP on scikit-learn's digits (64 -> 1024 -> 1024 -> 10), trained 30
  AdamW steps, then `convert_model(model, param_ratio=0.5)`. Accuracy right after the
  conversion with the defaults (the guard keeps the 10-way head dense), with
  `guard=False` (what the defaults used to do: the head at rank 4) and with the head
  excluded by name; then 200 more training steps with an optimizer built before the
  conversion and not passed (stale: it warns), and with `optimizer=`.
- `minilm`: `compress(model, batches, budget=b)` on all-MiniLM-L6-v2 at 75% and 80%, with
  the guard (BERT's pooler, which the mean-pooled sentence embedding never uses, stays
  dense: no gradient of the hidden-state objective reaches it) and with `guard=False` (the
  pooler takes the budget's own ratio): the pooler's decision, the warnings, and the mean
  cosine of held-out BBC News sentence embeddings to the original's.
- `calibrate`: what `lowrank-layers convert --calibrate DIR --budget 0.75` used to take
  (the first 64 files in sorted order: 64 business articles) against what it takes now
  (64 files sampled across the subfolders, seeds 0 to 3, `lowrank_layers.text.read_texts`),
  the same `compress` on MiniLM with the CLI's batches (8 documents of 256 tokens),
  held-out cosine on 250 articles none of the sets holds.

    python benchmarks/first_use.py [--cases mlp minilm calibrate]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import warnings

import torch
from common import (
    bbc_news_dir,
    load_bbc_news,
    load_minilm,
    machine_description,
    markdown_table,
    sentence_embeddings,
    token_batches,
)
from torch import nn

from lowrank_layers import compress, convert_model
from lowrank_layers.text import read_texts


def digits_case() -> None:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16
    y = torch.tensor(d.target)
    xtr, ytr, xte, yte = x[:1200], y[:1200], x[1200:], y[1200:]
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(64, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
                         nn.Linear(1024, 10))  # fmt: skip

    def accuracy(model: nn.Module) -> float:
        with torch.no_grad():
            return (model(xte).argmax(1) == yte).float().mean().item()

    def train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            idx = torch.randint(0, 1200, (64,), generator=gen)
            loss = nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()

    opt = torch.optim.AdamW(base.parameters(), lr=1e-4)
    train(base, opt, 30, seed=1)
    state = copy.deepcopy(base.state_dict())
    rows = [("dense, after 30 steps", f"{accuracy(base):.3f}", "-", "-")]
    for label, options, stale in (
        ("defaults (guard: head kept dense)", {}, False),
        ("guard=False (the old default: head at rank 4)", {"guard": False}, False),
        ("exclude=['4'] (the head by name)", {"exclude": ["4"]}, False),
        ("defaults, optimizer built before and not passed", {}, True),
    ):
        base.load_state_dict(state)
        model = copy.deepcopy(base)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        kw = {} if stale else {"optimizer": opt}
        report = convert_model(model, param_ratio=0.5, **kw, **options)
        head = next((r for r in report.layers if r.name == "4"), None)
        right_after = accuracy(model)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            train(model, opt, 200, seed=2)
        warned = sum("optimizer" in str(w.message) for w in caught)
        head_s = "excluded" if head is None else f"rank {head.rank}" if head.converted else "dense"
        rows.append((label, f"{right_after:.3f}", f"{accuracy(model):.3f} ({warned} warnings)",
                     head_s))  # fmt: skip
    print(markdown_table(["convert_model(param_ratio=0.5)", "right after", "+200 steps",
                          "head"], rows))  # fmt: skip


def cosine(model: nn.Module, base: torch.Tensor, batches: list) -> float:
    return float((sentence_embeddings(model, batches) * base).sum(-1).mean())


def minilm_case() -> None:
    model, tokenizer = load_minilm()
    texts, _ = load_bbc_news(seed=0)
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(0)).tolist()
    calib = token_batches(tokenizer, [texts[i] for i in order[:64]], 128)
    held_out = token_batches(tokenizer, [texts[i] for i in order[-250:]], 128)
    base = sentence_embeddings(model, held_out)
    rows = []
    for budget in (0.75, 0.8):
        for guard in (True, False):
            converted = copy.deepcopy(model)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                result = compress(converted, calib, budget=budget, guard=guard)
            pooler = next(r for r in result.conversion.layers if r.name == "pooler.dense")
            decision = f"rank {pooler.rank}" if pooler.converted else f"dense: {pooler.reason}"
            rows.append((f"{budget:.0%}", str(guard), decision[:60], str(len(caught)),
                         f"{cosine(converted, base, held_out):.4f}"))  # fmt: skip
    print(markdown_table(["budget", "guard", "pooler", "warnings", "held-out cosine"], rows))


def calibrate_case() -> None:
    root = bbc_news_dir()
    first = [p.read_text(encoding="utf-8", errors="replace").strip()
             for p in sorted(root.rglob("*.txt"))[:64]]  # fmt: skip
    sampled = {seed: read_texts(root, limit=64, seed=seed) for seed in range(4)}
    texts, _ = load_bbc_news(seed=0)
    used = set(first).union(*map(set, sampled.values()))
    rest = [t for t in texts if t not in used]
    order = torch.randperm(len(rest), generator=torch.Generator().manual_seed(1)).tolist()
    model, tokenizer = load_minilm()
    held_out = token_batches(tokenizer, [rest[i] for i in order[:250]], 128)
    base = sentence_embeddings(model, held_out)
    runs = [("first 64 sorted files (before)", first)]
    runs += [(f"64 sampled across subfolders, seed {s} (now)", t) for s, t in sampled.items()]
    rows = []
    for label, chosen in runs:
        converted = copy.deepcopy(model)
        # the CLI's batches: convert_pretrained tokenizes 8 documents of 256 tokens a batch
        compress(converted, token_batches(tokenizer, chosen, 256, batch_size=8), budget=0.75)
        rows.append((label, f"{cosine(converted, base, held_out):.4f}"))
    print(markdown_table(["calibration files", "held-out cosine at 75%"], rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=["mlp", "minilm", "calibrate"],
                        choices=["mlp", "minilm", "calibrate"])  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(2)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(f"Machine: {machine_description()}", file=sys.stderr)
    for case in args.cases:
        print(f"\n### {case}\n")
        {"mlp": digits_case, "minilm": minilm_case, "calibrate": calibrate_case}[case]()


if __name__ == "__main__":
    main()
