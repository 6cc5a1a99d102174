"""Calibration text: documents read from files, and the tokenized batches a model runs on.

What ``lowrank-layers convert --calibrate`` reads (:func:`read_texts`), and the batches of
``{"input_ids", "attention_mask"}`` that :func:`~lowrank_layers.compress` and
``convert_model(calibration=)`` take (:func:`text_batches`, with any transformers
tokenizer).
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .common import InputError, InputTypeError, check_int

__all__ = ["TextSample", "read_texts", "sample_texts", "text_batches"]


@dataclass
class TextSample:
    """The documents :func:`read_texts` took, and where from (for the CLI's line)."""

    texts: list[str]
    path: Path
    seed: int
    files: int = 0  # files the documents came from (0 for one file split at blank lines)
    available: int = 0  # .txt files under the folder, or documents in the file
    folders: int = 0  # folders holding those files

    def describe(self) -> str:
        """One line: how many documents, from how many files or folders, the seed."""
        n = len(self.texts)
        if self.files == 0:
            return (
                f"calibration: {n} of the {self.available} documents of {self.path} "
                f"(drawn with seed {self.seed})"
            )
        return (
            f"calibration: {n} documents from {self.files} of the {self.available} .txt files "
            f"in {self.folders} folder{'s' if self.folders != 1 else ''} under {self.path} "
            f"(drawn round-robin over the folders with seed {self.seed})"
        )


def read_texts(path: str | os.PathLike, *, limit: int | None = None, seed: int = 0) -> list[str]:
    """Calibration documents: ``*.txt`` files under a folder (one document each), or one
    text file split into documents at blank lines. Empty documents are dropped.

    ``limit`` documents at most, drawn so that they represent the whole corpus rather
    than its first files: in a folder, the ``.txt`` files are grouped by the folder that
    holds them (a class per subfolder, as in most corpora), each group shuffled and the
    groups ordered by a random draw from ``seed``, then taken round-robin, one file from
    each group in turn, until ``limit`` non-empty documents are read; every folder is
    represented when ``limit`` is at least the number of folders. In one file, ``limit``
    documents are drawn from ``seed`` and kept in file order. The same ``seed`` gives the
    same documents. Without ``limit``, every document is taken (a folder's in the same
    round-robin order).
    """
    return sample_texts(path, limit, seed).texts


def sample_texts(path: str | os.PathLike, limit: int | None, seed: int) -> TextSample:
    """:func:`read_texts`'s documents, with where they came from (the CLI prints it)."""
    check_int("limit", limit, optional=True)
    check_int("seed", seed, 0)
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"calibration text {path} does not exist")
    rng = random.Random(seed)
    if path.is_dir():
        groups: dict[Path, list[Path]] = {}
        for p in sorted(path.rglob("*.txt")):
            if p.is_file():
                groups.setdefault(p.parent, []).append(p)
        queues = [groups[folder] for folder in sorted(groups)]
        for files in queues:
            rng.shuffle(files)
        rng.shuffle(queues)
        sample = TextSample([], path, seed, available=sum(map(len, queues)))
        folders: set[Path] = set()
        for p in _round_robin(queues):
            if limit is not None and len(sample.texts) >= limit:
                break
            doc = p.read_text(encoding="utf-8", errors="replace").strip()
            if doc:
                sample.texts.append(doc)
                sample.files += 1
                folders.add(p.parent)
        sample.folders = len(folders)
    else:
        text = path.read_text(encoding="utf-8", errors="replace")
        docs = [d for d in (d.strip() for d in text.split("\n\n")) if d]
        sample = TextSample(docs, path, seed, available=len(docs))
        if limit is not None and limit < len(docs):
            sample.texts = [docs[i] for i in sorted(rng.sample(range(len(docs)), limit))]
    if not sample.texts:
        raise InputError(f"calibration text {path} holds no non-empty document")
    return sample


def _round_robin(queues: list[list[Path]]) -> Iterator[Path]:
    """One item of each queue in turn, skipping the queues that ran out."""
    for i in range(max(map(len, queues), default=0)):
        for queue in queues:
            if i < len(queue):
                yield queue[i]


def text_batches(
    tokenizer: Any, texts: Sequence[str], *, max_length: int = 256, batch_size: int = 8
) -> list[dict[str, Any]]:
    """Tokenized, padded and truncated batches ``{"input_ids", "attention_mask"}``, from a
    list of documents (a bare string is refused: it is one document, ``[text]``)."""
    if isinstance(texts, (str, bytes)):
        raise InputTypeError(
            f"texts must be a list of documents, got a {type(texts).__name__}: pass a list, "
            "text_batches(tokenizer, [text])"
        )
    if getattr(tokenizer, "pad_token", None) is None:
        tokenizer.pad_token = tokenizer.eos_token
    batches = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(
            list(texts[i : i + batch_size]),
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=max_length,
        )
        batches.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return batches
