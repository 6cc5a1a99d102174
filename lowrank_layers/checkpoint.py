"""Saving and loading lowrank-layers checkpoints: ``save_lowrank``, ``load_lowrank``.

A checkpoint is safetensors files holding the model's state dict and, in their metadata,
the description of its low-rank layers (the format: :mod:`lowrank_layers.checkpoint_format`
and docs/checkpoints.md). Checkpoints above ``max_shard_size`` are sharded as transformers
shards them: ``model-00001-of-0000N.safetensors`` and ``model.safetensors.index.json``
with a ``weight_map`` and the same metadata. Every write goes to a temporary name first and
is renamed into place at the end (:mod:`lowrank_layers.atomic`): an interrupted write
leaves nothing at the destination.

The files themselves are read and written by :mod:`lowrank_layers.safetensors_io`; a model
folder's other files and its ``config.json`` entry (``quantization_config``) are handled
here too. Converting a checkpoint without model code is :mod:`lowrank_layers.offline`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .atomic import atomic_destination, files_into_folder
from .checkpoint_format import (
    check_format,
    format_metadata,
    guard,
    guard_key,
    is_guard_entry,
    lowrank_layers_of,
    lowrank_quantization_config,
    open_checkpoint,
    read_metadata,
    restore_narrowed,
    restructure,
    stored_dtype,
    stored_keys,
)
from .common import InputError, InputTypeError
from .hf_quantizer import mark_lowrank_config
from .linear import upgrade_state_dict_
from .model_card import linear_layer_count, with_model_card
from .safetensors_io import (
    FLOAT_DTYPES,
    INDEX_FILE,
    OWN_FILES,
    SINGLE_FILE,
    CheckpointError,
    CheckpointFiles,
    read_header,
    shard_names,
    write_file,
    write_index,
)

__all__ = [
    "DEFAULT_MAX_SHARD_SIZE",
    "CheckpointError",
    "copy_model_folder",
    "load_lowrank",
    "read_metadata",
    "save_lowrank",
    "write_config_entry",
    "write_model_card",
]

DEFAULT_MAX_SHARD_SIZE = 5 * 1024**3


# ------------------------------------------------------------------------------------------
# writing
# ------------------------------------------------------------------------------------------


def _storage_identity(t: torch.Tensor) -> tuple | None:
    """Equal for two state-dict entries that are the same tensor (tied weights)."""
    if t.numel() == 0 or t.is_meta:
        return None
    ptr = t.untyped_storage().data_ptr()
    return (t.device, ptr, t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def _parse_size(value: int | str) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*", value.upper())
        if m:
            scale = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}[m.group(2)]
            size = int(float(m.group(1)) * scale)
            if size > 0:
                return size
    raise InputError(f"max_shard_size must be a positive int or a size like '2GB', got {value!r}")


def save_lowrank(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = True,
) -> list[Path]:
    """Save ``model``'s state dict, with the description of its low-rank layers, as safetensors.

    ``path`` ending in ``.safetensors`` is one file; any other path (``"."`` included) is a
    folder that gets ``model.safetensors``, or shards and ``model.safetensors.index.json``
    when the tensors exceed ``max_shard_size`` (bytes, or a string such as ``"2GB"``). Tied
    tensors are stored once (``aliases`` in the metadata).

    Each file is written under a temporary name beside it and renamed over it at the end.
    In an existing folder only these files are replaced, and those of the same naming left
    by an earlier save (``model.safetensors``, ``model-*-of-*.safetensors``, the index) that
    this one does not write are removed; every other file stays. With ``overwrite=False``
    an existing file of that naming (or ``path`` itself, for one file) is an error.

    Saved into a transformers model folder (its ``config.json`` has a ``model_type``), as
    the folder or a ``.safetensors`` file in it, a model with low-rank layers also marks
    ``config.json`` (``quantization_config``, as :func:`~lowrank_layers.convert_model` does
    for ``save_pretrained``) and writes the model card ``README.md`` (an existing one keeps
    its text, with the card as a section), renamed into place with the weights: after
    ``import lowrank_layers``, ``AutoModel.from_pretrained(folder)`` loads it low-rank.

    Returns:
        The files written (the weights first).

    Example:
        >>> import tempfile
        >>> from lowrank_layers import LowRankLinear
        >>> model = nn.Sequential(LowRankLinear(64, 64, 8))
        >>> with tempfile.TemporaryDirectory() as d:
        ...     files = save_lowrank(model, f"{d}/m.safetensors")
        ...     json.loads(read_metadata(files[0])["layers"])["0"]["rank"]
        8
    """
    path = Path(path)
    if path.suffix != ".safetensors" and path.is_file():
        raise NotADirectoryError(
            f"save_lowrank: path {str(path)!r} is a file, but a path not ending in "
            ".safetensors names a folder to write model.safetensors into"
        )
    limit = _parse_size(max_shard_size)
    layers, entries = stored_entries(model)
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for key, value in entries:
        ident = _storage_identity(value)
        if ident is not None and ident in seen:
            aliases[key] = seen[ident]
            continue
        if ident is not None:
            seen[ident] = key
        tensors[key] = value
    metadata = format_metadata(layers, aliases)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    single_file = path.suffix == ".safetensors"
    if single_file or total <= limit:
        groups = [list(tensors)]
    else:
        groups, current, size = [], [], 0
        for key, t in tensors.items():
            nbytes = t.numel() * t.element_size()
            if current and size + nbytes > limit:
                groups.append(current)
                current, size = [], 0
            current.append(key)
            size += nbytes
        groups.append(current)
    first_file = {k: tensors[k] for k in groups[0]}
    extras = _model_folder_files(path.parent if single_file else path, model, layers, first_file)
    return _write_checkpoint(path, tensors, groups, metadata, total, overwrite, extras)


def stored_entries(
    module: nn.Module, name: str = "", *, keep_vars: bool = False
) -> tuple[dict[str, dict[str, Any]], list[tuple[str, torch.Tensor]]]:
    """What the checkpoint format stores of ``module`` (named ``name`` in its model): the
    description of its low-rank and narrowed layers, and its state as ``(key, tensor)`` in
    state-dict order (tied tensors under each of their names), then each layer's guard.

    A narrowed layer's weight is stored as ``<layer>.narrowed_weight`` (``<layer>.weight``
    is its guard); a ``DynamicLowRankLinear``'s extra state is left out (its active rank is
    in the layer description). ``keep_vars``: the parameters themselves, not detached.

    Raises:
        TypeError: other extra module state, or a state value that is not a tensor.
    """
    prefix = f"{name}." if name else ""
    layers = {f"{prefix}{k}": v for k, v in lowrank_layers_of(module).items()}
    renamed = stored_keys(layers)  # narrowed layers' weights: <name>.weight is the guard
    entries: list[tuple[str, torch.Tensor]] = []
    for key, value in module.state_dict(prefix=prefix, keep_vars=keep_vars).items():
        if key.endswith("._extra_state") or key == "_extra_state":
            owner = key[: -len("._extra_state")] if "." in key else ""
            if owner in layers and layers[owner]["type"] == "DynamicLowRankLinear":
                continue  # the active rank is in the layer description
            raise InputTypeError(f"{key}: extra module state cannot be stored in safetensors")
        if not isinstance(value, torch.Tensor):
            raise InputTypeError(
                f"{key}: state dict value of type {type(value).__name__} is not a tensor"
            )
        entries.append((renamed.get(key, key), value))
    keys = {key for key, _ in entries}
    for sub, layer in module.named_modules(prefix=name):
        if sub in layers and guard_key(sub) not in keys:
            entries.append((guard_key(sub), guard(stored_dtype(layer))))
    return layers, entries


def _write_checkpoint(
    path: Path,
    tensors: dict[str, torch.Tensor],
    groups: list[list[str]],
    metadata: dict[str, str],
    total: int,
    overwrite: bool,
    extras: dict[str, str],
) -> list[Path]:
    """Write ``groups`` of ``tensors`` as one file ``path`` or into the folder ``path``, and
    the texts ``extras`` (file name: text) beside them, all renamed into place together."""
    if path.suffix == ".safetensors":
        folder, names, own = path.parent, [path.name], re.escape(path.name)
    else:
        folder, names, own = path, shard_names(len(groups)), OWN_FILES
    written = names + ([INDEX_FILE] if len(groups) > 1 else [])
    if path.suffix == ".safetensors" and not extras:
        with atomic_destination(path, is_dir=False, overwrite=overwrite) as tmp:
            write_file(tmp, groups[0], (tensors[k] for k in groups[0]), metadata)
        return [path]
    with files_into_folder(
        folder, [*written, *extras], overwrite=overwrite, own=own, index=INDEX_FILE
    ) as temps:
        weight_map: dict[str, str] = {}
        for fname, keys in zip(names, groups, strict=True):
            write_file(temps[fname], keys, (tensors[k] for k in keys), metadata)
            weight_map.update(dict.fromkeys(keys, fname))
        if len(groups) > 1:
            write_index(temps[INDEX_FILE], weight_map, metadata, total)
        for fname, text in extras.items():
            temps[fname].write_text(text, encoding="utf-8")
    return [folder / n for n in [*written, *extras]]


def _model_folder_files(
    folder: Path, model: nn.Module, layers: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]
) -> dict[str, str]:
    """``config.json`` marked (and given the dtype of ``tensors``, those of the first weight
    file, see :func:`_set_dtype`) and the model card, for a save of a low-rank model into a
    transformers model folder; nothing otherwise."""
    config = _transformers_config(folder / "config.json")
    if config is None or not layers:
        return {}
    config["quantization_config"] = lowrank_quantization_config(layers)
    names = (str(tensors[k].dtype).removeprefix("torch.") for k in sorted(tensors))
    _set_dtype(config, next((n for n in names if n in _TORCH_NAMES.values()), None))
    return {
        "config.json": _config_text(config),
        "README.md": _card_text(folder, layers, linear_layer_count(model, layers)),
    }


# ------------------------------------------------------------------------------------------
# reading
# ------------------------------------------------------------------------------------------


def load_lowrank(model: nn.Module, path: str | os.PathLike, *, strict: bool = True) -> nn.Module:
    """Load a checkpoint written by :func:`save_lowrank` or
    :func:`~lowrank_layers.offline.convert_checkpoint`.

    ``model`` is the dense architecture (e.g. a transformers model built from its config),
    on any device or on ``meta``: each layer listed in the checkpoint is replaced by the
    low-rank layer it describes (on the module's device), then every tensor is loaded. On
    ``meta``, tensors are assigned rather than copied, so the model comes out materialised
    on the CPU. Modules already of the right type and rank are kept. A narrowed layer
    (:func:`~lowrank_layers.checkpoint_format.mark_narrowed`) comes back as a marked
    ``nn.Linear`` of its narrowed shape (a narrowed layer of that shape already in the
    model is kept).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError (a ``ValueError``): not a safetensors file, another format, an
            unknown ``format_version``, or, naming the key, a listed layer the model lacks,
            a tensor the model does not have or lacks (with ``strict``), or a wrong shape.

    Returns:
        ``model``, changed in place.
    """
    path = Path(path)
    ckpt = open_checkpoint(path)
    layers, aliases = check_format(ckpt.metadata, path)
    try:
        restructure(model, layers, str(path))
        _load_state(model, ckpt, layers, aliases, path, strict)
    finally:  # narrowed layers: their loading slots become the nn.Linear again
        restore_narrowed(model)
    if layers:
        mark_lowrank_config(model)  # a transformers model's save_pretrained keeps low rank
    return model


def _load_state(
    model: nn.Module,
    ckpt: CheckpointFiles,
    layers: Mapping[str, Any],
    aliases: Mapping[str, str],
    path: Path,
    strict: bool,
) -> None:
    """Read the tensors of ``ckpt`` and load them into ``model``, restructured for ``layers``."""
    guards = {guard_key(name) for name in layers}  # the dense loaders' tripwire, left unread
    state = dict(ckpt.read_tensors(skip=lambda key, e: key in guards and is_guard_entry(e)))
    for alias, target in aliases.items():
        if target not in state:
            raise CheckpointError(f"{path}: alias {alias!r} points to missing tensor {target!r}")
        state[alias] = state[target]
    if ckpt.metadata.get("format_version") == "1":
        for name in layers:  # V (in, r) -> Vh (r, in)
            upgrade_state_dict_(state, f"{name}." if name else "")
    for name, entry in layers.items():
        if entry["type"] == "DynamicLowRankLinear":
            prefix = f"{name}." if name else ""
            state[prefix + "_extra_state"] = {"rank": entry.get("active_rank", entry["rank"])}
    expected = model.state_dict(keep_vars=True)
    non_persistent = {
        (f"{mod_name}." if mod_name else "") + b
        for mod_name, mod in model.named_modules()
        for b in mod._non_persistent_buffers_set
    }
    for key in [k for k in state if k not in expected and k in non_persistent]:
        del state[key]  # e.g. BERT's position_ids, saved by older transformers
    tied: dict[int, list[str]] = {}
    for key, value in expected.items():
        if isinstance(value, torch.Tensor):
            tied.setdefault(id(value), []).append(key)
    for keys in tied.values():  # a tied tensor saved under one of its names fills the others
        present = [k for k in keys if k in state]
        for k in keys:
            if k not in state and present:
                state[k] = state[present[0]]
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"missing from the checkpoint: {', '.join(missing[:10])}")
        if unexpected:
            parts.append(f"not in the model: {', '.join(unexpected[:10])}")
        raise CheckpointError(f"{path}: " + "; ".join(parts))
    for key, value in state.items():
        target = expected.get(key)
        if (
            isinstance(value, torch.Tensor)
            and isinstance(target, torch.Tensor)
            and tuple(value.shape) != tuple(target.shape)
        ):
            raise CheckpointError(
                f"{path}: {key} has shape {tuple(value.shape)} in the checkpoint but "
                f"{tuple(target.shape)} in the model"
            )
    on_meta = any(t.is_meta for t in expected.values() if isinstance(t, torch.Tensor))
    model.load_state_dict(state, strict=strict, assign=on_meta)
    if on_meta:
        left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
        if left:
            raise CheckpointError(
                f"{path}: still on the meta device after loading: {', '.join(left[:5])} "
                "(non-persistent buffers are not saved in checkpoints: build the model with "
                "only its parameters on meta, e.g. accelerate.init_empty_weights())"
            )


# ------------------------------------------------------------------------------------------
# model folders: the files beside the weights, and config.json's description of the layers
# ------------------------------------------------------------------------------------------

# weight files of the converted model itself, at the top of a model folder: replaced
_WEIGHT_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack"}
# top-level folders holding exports of the dense model (sentence-transformers' ONNX and
# OpenVINO backends): copying them would ship the unconverted model beside the converted one
_DENSE_EXPORT_FOLDERS = {"onnx", "openvino"}


def copy_model_folder(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Copy every entry of a model folder ``src`` into ``dst`` except the model's own weights.

    Skipped: the top-level weight files (``model.safetensors``, ``pytorch_model.bin``, their
    shards and ``*.index.json``, and ``.pt``/``.pth``/``.gguf``/``.h5``/``.msgpack`` files),
    which the converted checkpoint replaces, and the top-level ``onnx/`` and ``openvino/``
    folders (exports of the dense model, which would load it unconverted). Subfolders are
    copied whole, weight files included: the modules of a sentence-transformers folder
    (``1_Pooling/``, ``2_Dense/model.safetensors``, ...) are not converted and are needed.
    Entries already in ``dst`` are overwritten.

    Returns:
        The names of the top-level entries copied, sorted.
    """
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise NotADirectoryError(f"src must be a model folder, got {src}")
    copied = []
    for item in sorted(src.iterdir()):
        if item.is_dir():
            if item.name in _DENSE_EXPORT_FOLDERS:
                continue
            shutil.copytree(item, dst / item.name, dirs_exist_ok=True)
        elif item.suffix in _WEIGHT_SUFFIXES or item.name.endswith(".index.json"):
            continue
        else:
            shutil.copy2(item, dst / item.name)
        copied.append(item.name)
    return copied


def _transformers_config(config_json: Path) -> dict[str, Any] | None:
    """The parsed ``config.json`` of a transformers model (it has a ``model_type``), or None."""
    try:
        config = json.loads(config_json.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) and "model_type" in config else None


def _config_text(config: Mapping[str, Any]) -> str:
    return json.dumps(config, indent=2, sort_keys=True) + "\n"


def _card_text(folder: Path, layers: Mapping[str, Any], linear_layers: int | None) -> str:
    readme = folder / "README.md"
    existing = readme.read_text(encoding="utf-8") if readme.is_file() else None
    return with_model_card(existing, layers, linear_layers=linear_layers)


_TORCH_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def _set_dtype(config: dict[str, Any], dtype: str | None) -> None:
    """Give ``config`` the weights' ``dtype`` when it names none (``dtype`` or ``torch_dtype``).

    transformers' default ``dtype="auto"`` otherwise reads the dtype of every tensor of the
    first weight file, and refuses the guards' FP4 as an unknown dtype (see
    :func:`~lowrank_layers.checkpoint_format.guard`). ``dtype`` is what it would have found,
    the first floating-point tensor's, so the model loads in the same dtype as before.
    """
    if dtype is not None and config.get("dtype") is None and config.get("torch_dtype") is None:
        config["dtype"] = dtype


def _weights_dtype(folder: Path) -> str | None:
    """The dtype (torch's name) of the first floating-point tensor, in key order, of the
    first weight file of ``folder`` (``model.safetensors`` or the first shard)."""
    single = folder / SINGLE_FILE
    files = [single] if single.is_file() else sorted(folder.glob("model-*-of-*.safetensors"))
    if not files:
        return None
    header, _ = read_header(files[0])
    codes = [header[k].get("dtype") for k in sorted(header) if k != "__metadata__"]
    return next((_TORCH_NAMES[c] for c in codes if c in FLOAT_DTYPES), None)


def write_config_entry(config_json: Path, entry: Mapping[str, Any]) -> None:
    """Set ``config_json``'s ``quantization_config`` to ``entry``; nothing without the file.

    A config naming no dtype gets that of the weights beside it (see :func:`_set_dtype`).
    The file is replaced atomically (written beside it, then renamed over it).
    """
    if not config_json.exists():
        return
    config = json.loads(config_json.read_text(encoding="utf-8"))
    config["quantization_config"] = entry
    _set_dtype(config, _weights_dtype(config_json.parent))
    with atomic_destination(config_json, is_dir=False) as tmp:
        tmp.write_text(_config_text(config), encoding="utf-8")


def write_model_card(
    folder: Path, layers: Mapping[str, Any], *, linear_layers: int | None = None
) -> None:
    """Write the model card ``folder/README.md`` for these low-rank ``layers`` (see
    :mod:`lowrank_layers.model_card`); an existing README keeps its text, with the card
    appended as a section (or replacing the section an earlier write appended)."""
    text = _card_text(folder, layers, linear_layers)
    with atomic_destination(folder / "README.md", is_dir=False) as tmp:
        tmp.write_text(text, encoding="utf-8")
