"""transformers model folders: calibrated conversion with model code (``lowrank-layers convert
--calibrate``).

``convert_checkpoint`` works on tensors alone; activation-aware conversion and a global
budget need the model to run on calibration text, so this loads the folder with
transformers, converts with :func:`~lowrank_layers.convert_model`, and saves a
lowrank-layers checkpoint next to copies of the folder's config and tokenizer files.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .checkpoint import SINGLE_FILE, _atomic_destination, save_lowrank
from .convert import ConversionReport, convert_model
from .pipeline import CompressionReport, compress

__all__ = ["convert_pretrained", "read_texts", "text_batches"]


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
        raise ValueError(f"calibration text {path} holds no non-empty document")
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


def convert_pretrained(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    calibration_texts: Sequence[str] | None = None,
    max_length: int = 256,
    overwrite: bool = False,
    compress_options: dict[str, Any] | None = None,
    **convert_kwargs: Any,
) -> ConversionReport | CompressionReport:
    """Load a transformers model folder, convert it, save it to ``dst``.

    ``calibration_texts`` (tokenized with the folder's tokenizer, ``max_length`` tokens
    each) makes the conversion activation-aware. Without ``compress_options``,
    ``convert_kwargs`` go to :func:`~lowrank_layers.convert_model` (a rank policy or
    ``budget=``, ``include``, ``method``, ...). With them (a dict, possibly empty), the
    model goes through :func:`~lowrank_layers.compress` (loss-aware allocation,
    propagation, optional healing), with ``compress_options`` and ``convert_kwargs`` as its
    keyword arguments; this needs ``calibration_texts``. ``dst`` gets ``model.safetensors``
    (see :func:`save_lowrank`) and copies of the folder's other files except its weights;
    written atomically.
    """
    try:
        import transformers
    except ImportError as exc:
        raise ImportError("converting a model folder needs transformers: pip install "
                          "'lowrank-layers[hf]'") from exc  # fmt: skip
    src, dst = Path(src), Path(dst)
    if not (src / "config.json").exists():
        raise ValueError(
            f"{src} is not a transformers model folder (no config.json); calibration and "
            "budget need the model's code to run"
        )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    config = transformers.AutoConfig.from_pretrained(src)
    causal = any(a.endswith("ForCausalLM") for a in (config.architectures or []))
    cls = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
    model = cls.from_pretrained(src).eval()
    batches = None
    if calibration_texts is not None:
        tokenizer = transformers.AutoTokenizer.from_pretrained(src)
        batches = text_batches(tokenizer, calibration_texts, max_length=max_length)
    report: ConversionReport | CompressionReport
    if compress_options is not None:
        if batches is None:
            raise ValueError("compress_options need calibration_texts")
        report = compress(model, batches, **compress_options, **convert_kwargs)
    else:
        if batches is not None:
            convert_kwargs["calibration"] = batches
        report = convert_model(model, **convert_kwargs)
    weights = {".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack"}
    with _atomic_destination(dst, is_dir=True, overwrite=overwrite) as tmp:
        save_lowrank(model, tmp / SINGLE_FILE)
        for item in sorted(src.iterdir()):
            if (
                item.is_file()
                and item.suffix not in weights
                and not item.name.endswith(".index.json")
            ):
                shutil.copy2(item, tmp / item.name)
    return report
