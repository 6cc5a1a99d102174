"""Calibration text: documents read from files, and the tokenized batches a model runs on.

What ``lowrank-layers convert --calibrate`` reads (:func:`read_texts`), and the batches of
``{"input_ids", "attention_mask"}`` that :func:`~lowrank_layers.compress` and
``convert_model(calibration=)`` take (:func:`text_batches`, with any transformers
tokenizer).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .common import InputError

__all__ = ["read_texts", "text_batches"]


def read_texts(path: str | os.PathLike, *, limit: int | None = None) -> list[str]:
    """Calibration documents: every ``*.txt`` under a folder (sorted, one document each), or
    one text file split into documents at blank lines. Empty documents are dropped."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"calibration text {path} does not exist")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        docs = [p.read_text(encoding="utf-8", errors="replace").strip() for p in files]
    else:
        text = path.read_text(encoding="utf-8", errors="replace")
        docs = [d.strip() for d in text.split("\n\n")]
    docs = [d for d in docs if d]
    if not docs:
        raise InputError(f"calibration text {path} holds no non-empty document")
    return docs[:limit] if limit is not None else docs


def text_batches(
    tokenizer: Any, texts: Sequence[str], *, max_length: int = 256, batch_size: int = 8
) -> list[dict[str, Any]]:
    """Tokenized, padded and truncated batches ``{"input_ids", "attention_mask"}``."""
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
