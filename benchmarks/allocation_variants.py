"""Allocation variants of `compress`, side by side on held-out data (issue 20, items 2 and 3).

- **grid**: the candidate ranks of each layer (and widths of each MLP) at every 5% of its
  parameters ("grid5", the default before this comparison) against every 1% ("grid1", the
  default since). With a 1% grid a layer's candidate ranks lie a few singular values apart
  (SmolLM2: 1-2 ranks for k and v, 3 for q and o, 4 for the MLPs' layers; MiniLM: 2-3), and the
  knapsack then chooses singular values across all layers by their estimated loss per
  parameter: ZS-SVD's global per-singular-value selection, solved as a knapsack instead of
  greedily. The other variants use the library's default grid.
- **attention**: which attention projections may be factorized. "all" (the default: the
  allocation decides), "v, o dense" (only q and k may be factorized, MoDeGPT-like for
  value-output), "attention dense" (only the MLPs are compressed). The excluded layers keep
  all their parameters; the others get a smaller budget so that every variant keeps the
  same share of all the Linear parameters.

SmolLM2-135M (lm_head excluded): perplexity on the 32 held-out BBC articles of
`budget_routes.py`, calibration on 64 others. all-MiniLM-L6-v2: held-out embedding cosine
on 250 articles, calibration on 64 (as `first_use.py`). Every row is one `compress` call on
a freshly loaded model; "s" is that call's wall time.

    python benchmarks/allocation_variants.py [--models smollm2 minilm]
        [--smollm2-budgets 0.8 0.6] [--minilm-budgets 0.75 0.5]
        [--variants grid5 grid1 vo-dense attention-dense]
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    load_bbc_news,
    load_minilm,
    machine_description,
    markdown_table,
    sentence_embeddings,
    token_batches,
)
from conversion_quality import load_smollm2, perplexity

import lowrank_layers.allocate
from lowrank_layers import compress
from lowrank_layers.text import text_batches

FINE_GRID = tuple(k / 100 for k in range(1, 100))
COARSE_GRID = tuple(k / 20 for k in range(1, 20))
# which attention layers each variant keeps dense, by the end of the name
ATTENTION = {
    "smollm2": {"vo-dense": r"(v_proj|o_proj)", "attention-dense": r"self_attn\..*"},
    "minilm": {"vo-dense": r"attention\.(self\.value|output\.dense)",
               "attention-dense": r"attention\..*"},
}  # fmt: skip


def linear_params(model: nn.Module, pattern: str, skip: str | None) -> int:
    return sum(
        m.weight.numel()
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and re.fullmatch(pattern, n) and not (skip and n == skip)
    )


def run_variant(
    model: nn.Module, calib: list, budget: float, variant: str, kind: str, evaluate: Callable
) -> tuple[str, float, float, str]:
    """One compress call: (budget passed, quality, seconds, what was kept dense)."""
    exclude = ["lm_head"] if kind == "smollm2" else []
    passed = budget
    if variant in ATTENTION[kind]:
        kept = rf".*\.{ATTENTION[kind][variant]}"
        total = linear_params(model, r".*", "lm_head" if kind == "smollm2" else "pooler.dense")
        fixed = linear_params(model, kept, None)
        passed = (budget * total - fixed) / (total - fixed)  # the same share of all of them
        exclude = [*exclude, *(n for n, m in model.named_modules()
                               if isinstance(m, nn.Linear) and re.fullmatch(kept, n))]  # fmt: skip
    grids = {"grid1": FINE_GRID, "grid5": COARSE_GRID}
    grid = grids.get(variant, lowrank_layers.allocate.DEFAULT_GRID)
    saved = lowrank_layers.allocate.DEFAULT_GRID
    lowrank_layers.allocate.DEFAULT_GRID = grid  # compress takes the module's default grid
    try:
        start = time.perf_counter()
        report = compress(model, calib, budget=passed, exclude=exclude or None, seed=0)
        seconds = time.perf_counter() - start
    finally:
        lowrank_layers.allocate.DEFAULT_GRID = saved
    narrowed = len(report.narrowed)
    dense = sum(1 for r in report.conversion.layers if not r.converted)
    return f"{passed:.3f}", evaluate(model), seconds, f"{narrowed} MLPs cut, {dense} dense"


def smollm2_setup(texts: list[str], order: list[int]) -> tuple:
    """(calibration batches, a fresh model each call, the held-out perplexity ratio)."""
    _, tokenizer = load_smollm2()
    calib = text_batches(tokenizer, [texts[i] for i in order[:64]], max_length=256)
    evals = text_batches(tokenizer, [texts[i] for i in order[64:96]], max_length=256)
    base = perplexity(load_smollm2()[0], evals)
    return calib, lambda: load_smollm2()[0], lambda m: perplexity(m, evals) / base


def minilm_setup(texts: list[str], order: list[int]) -> tuple:
    """(calibration batches, a fresh model each call, the held-out embedding cosine)."""
    model, tokenizer = load_minilm()
    calib = token_batches(tokenizer, [texts[i] for i in order[:64]], 128)
    held_out = token_batches(tokenizer, [texts[i] for i in order[-250:]], 128)
    ref = sentence_embeddings(model, held_out)

    def evaluate(m: nn.Module) -> float:
        return float((sentence_embeddings(m, held_out) * ref).sum(-1).mean())

    return calib, lambda: load_minilm()[0], evaluate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["smollm2", "minilm"])
    parser.add_argument("--smollm2-budgets", type=float, nargs="+", default=[0.8, 0.6])
    parser.add_argument("--minilm-budgets", type=float, nargs="+", default=[0.75, 0.5])
    parser.add_argument("--variants", nargs="+",
                        default=["grid5", "grid1", "vo-dense", "attention-dense"])  # fmt: skip
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    texts, _ = load_bbc_news(seed=0)
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(0)).tolist()
    rows = []
    for kind in args.models:
        setup = smollm2_setup if kind == "smollm2" else minilm_setup
        calib, fresh, evaluate = setup(texts, order)
        budgets = args.smollm2_budgets if kind == "smollm2" else args.minilm_budgets
        measure = "perplexity ratio" if kind == "smollm2" else "held-out cosine"
        for budget in budgets:
            for variant in args.variants:
                passed, quality, seconds, plan = run_variant(
                    fresh(), calib, budget, variant, kind, evaluate
                )
                rows.append((kind, f"{budget:.0%}", variant, passed, measure,
                             f"{quality:.4f}", plan, f"{seconds:.0f}"))  # fmt: skip
                print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    print(f"{machine_description()}\n")
    print(markdown_table(["model", "budget", "variant", "budget passed", "measure", "value",
                          "plan", "s"], rows))  # fmt: skip


if __name__ == "__main__":
    main()
