"""transformers model folders: calibrated conversion with model code (``lowrank-layers convert
--calibrate``).

``convert_checkpoint`` works on tensors alone; activation-aware conversion and a global
budget need the model to run on calibration text, so :func:`convert_pretrained` loads the
folder with transformers, converts with :func:`~lowrank_layers.convert_model` (or
:func:`~lowrank_layers.compress`), and saves a lowrank-layers checkpoint next to copies of
the folder's other files, with the description of the layers in ``config.json``.

The calibration text helpers are :mod:`lowrank_layers.text`; reloading such a folder (and
``save_pretrained`` of a converted model) is :mod:`lowrank_layers.hf_quantizer`. Their
public names are importable from here too.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from .atomic import atomic_destination
from .checkpoint import copy_model_folder, save_lowrank, write_config_entry, write_model_card
from .checkpoint_format import QUANT_METHOD, lowrank_layers_of, lowrank_quantization_config
from .common import InputError, InputTypeError
from .config import ConversionConfig, HealConfig
from .convert import check_convert_config, convert_model
from .hf_quantizer import (
    auto_class_for,
    load_pretrained,
    mark_lowrank_config,
    register_with_transformers,
)
from .model_card import linear_layer_count
from .offload import compress_offloaded
from .pipeline import CompressionReport, check_compress_config, compress
from .report import ConversionReport
from .safetensors_io import SINGLE_FILE
from .text import read_texts, text_batches

__all__ = [
    "QUANT_METHOD",
    "convert_pretrained",
    "load_pretrained",
    "lowrank_quantization_config",
    "mark_lowrank_config",
    "read_texts",
    "register_with_transformers",
    "text_batches",
]


def convert_pretrained(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    config: ConversionConfig,
    *,
    calibration_texts: Sequence[str] | None = None,
    max_length: int = 256,
    heal: HealConfig | None = None,
    propagate: bool = True,
    narrow_mlps: bool = True,
    offload: bool = False,
    overwrite: bool = False,
    progress: bool = False,
) -> ConversionReport | CompressionReport:
    """Load a transformers model folder, convert it as ``config`` says, save it to ``dst``.

    With ``calibration_texts`` (tokenized with the folder's tokenizer, ``max_length``
    tokens each) the model goes through :func:`~lowrank_layers.compress` (loss-aware
    allocation, ``propagate``, ``narrow_mlps``, optional ``heal``); without, through
    :func:`~lowrank_layers.convert_model` (a rank policy, or a budget shared from the
    spectra). ``dst`` gets ``model.safetensors`` (see :func:`save_lowrank`), copies of
    the folder's other files except its weights, and the model card ``README.md`` (added
    as a section to a copied README); written atomically.

    With ``offload`` (and ``calibration_texts``), the weights stay on disk and the model is
    compressed one block at a time (:func:`~lowrank_layers.offload.compress_offloaded`),
    for a model larger than memory: the same result, the layers outside the model's
    repeated blocks kept dense, no healing.
    """
    if not isinstance(config, ConversionConfig):
        raise InputTypeError(
            f"convert_pretrained: config must be a ConversionConfig, got {type(config).__name__}"
        )
    if calibration_texts is None and (heal is not None or not propagate or offload):
        raise InputError(
            "convert_pretrained: heal, propagate=False and offload need calibration_texts"
        )
    if offload and (heal is not None or not propagate):
        raise InputError(
            "convert_pretrained: offload (one block at a time from disk) neither heals nor "
            "turns propagation off: heal=None, propagate=True"
        )
    if calibration_texts is not None:
        check_compress_config(config)
    else:
        check_convert_config(config, calibrated=False)
    try:
        import transformers
    except ImportError as exc:
        raise ImportError("converting a model folder needs transformers: pip install "
                          "'lowrank-layers[hf]'") from exc  # fmt: skip
    src, dst = Path(src), Path(dst)
    if not (src / "config.json").exists():
        raise InputError(
            f"{src} is not a transformers model folder (no config.json); calibration and "
            "budget need the model's code to run"
        )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    batches = None
    if calibration_texts is not None:
        tokenizer = transformers.AutoTokenizer.from_pretrained(src)
        batches = text_batches(tokenizer, calibration_texts, max_length=max_length)
    if offload:
        return compress_offloaded(
            src, dst, batches, config, narrow_mlps=narrow_mlps, overwrite=overwrite,
            progress=progress,
        )  # fmt: skip
    model = auto_class_for(transformers.AutoConfig.from_pretrained(src)).from_pretrained(src)
    model.eval()
    report: ConversionReport | CompressionReport
    if batches is not None:
        report = compress(
            model, batches, config, heal=heal, propagate=propagate, narrow_mlps=narrow_mlps,
            progress=progress,
        )  # fmt: skip
    else:
        report = convert_model(model, config, progress=progress)
    with atomic_destination(dst, is_dir=True, overwrite=overwrite) as tmp:
        save_lowrank(model, tmp / SINGLE_FILE)
        copy_model_folder(src, tmp)
        write_config_entry(tmp / "config.json", lowrank_quantization_config(model))
        layers = lowrank_layers_of(model)
        write_model_card(tmp, layers, linear_layers=linear_layer_count(model, layers))
    return report
