"""The lowrank-layers checkpoint format: the description of a model's low-rank layers.

A checkpoint (see docs/checkpoints.md) is ordinary safetensors files whose tensors are the
model's state dict — a low-rank layer ``name`` stores ``name.U`` (out, r), ``name.S``
(r,), ``name.Vh`` (r, in), optionally ``name.D`` (out,), and ``name.bias``, beside a guard
``name.weight`` that dense loaders cannot load (:func:`guard`) — and whose header metadata
holds::

    format          "lowrank-layers"
    format_version  "2"   ("1": the same, with ``name.V`` (in, r) = Vhᵀ; still read)
    layers          JSON {name: {"type", "in_features", "out_features", "rank",
                                 "balance", "bias", ["active_rank"]}}
                    and, for a narrowed dense layer (an ``nn.Linear`` of fewer features than
                    the layer it replaced, :func:`mark_narrowed`), {name: {"type": "Linear",
                    "in_features", "out_features", "original_in_features",
                    "original_out_features", "bias"}}: its weight is stored as
                    ``name.narrowed_weight``, with the guard as ``name.weight``
    aliases         JSON {key: key stored instead} (tied tensors are stored once)

The same ``layers`` description is a transformers model folder's ``quantization_config``
(:func:`lowrank_quantization_config`). This module describes a model's layers
(:func:`lowrank_layers_of`), reads and checks a checkpoint's metadata
(:func:`read_metadata`, :func:`check_format`), and rebuilds the described layers in a
dense model (:func:`restructure`). Saving and loading the tensors is
:mod:`lowrank_layers.checkpoint`; the transformers round trip,
:mod:`lowrank_layers.hf_quantizer`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .adaptive import AdaptiveLowRankLinear
from .common import InputError, InputTypeError
from .dynamic import DynamicLowRankLinear
from .linear import LowRankLinear, make_linear
from .linears import features
from .safetensors_io import CheckpointError, CheckpointFiles, file_metadata, locate_files
from .selection import module_holders

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "NARROWED_ATTR",
    "NARROWED_TYPE",
    "NARROWED_WEIGHT",
    "QUANT_METHOD",
    "READABLE_VERSIONS",
    "CheckpointError",
    "check_format",
    "format_metadata",
    "guard",
    "guard_key",
    "is_guard_entry",
    "is_narrowed",
    "is_narrowed_entry",
    "lowrank_layers_of",
    "lowrank_quantization_config",
    "mark_narrowed",
    "open_checkpoint",
    "read_metadata",
    "restore_narrowed",
    "restructure",
    "stored_dtype",
    "stored_keys",
]

FORMAT_NAME = "lowrank-layers"
FORMAT_VERSION = 2
# format 1 stored V (in, r) where format 2 stores Vh = Vᵀ (r, in); load_lowrank reads both
READABLE_VERSIONS = ("1", "2")

QUANT_METHOD = "lowrank-layers"
"""The ``quant_method`` of a low-rank model's ``quantization_config`` in ``config.json``."""

_LAYER_TYPES: dict[str, type[nn.Module]] = {
    "LowRankLinear": LowRankLinear,
    "AdaptiveLowRankLinear": AdaptiveLowRankLinear,
    "DynamicLowRankLinear": DynamicLowRankLinear,
}


NARROWED_ATTR = "lowrank_original_features"
"""The attribute marking a narrowed ``nn.Linear`` (:func:`mark_narrowed`): the
``(in_features, out_features)`` of the layer it replaced."""

NARROWED_TYPE = "Linear"
"""The ``type`` of a narrowed layer's entry in the format's ``layers``."""

NARROWED_WEIGHT = "narrowed_weight"
"""The name under which a narrowed layer's weight is stored: ``<layer>.narrowed_weight``,
its ``<layer>.weight`` being the guard (:func:`guard`)."""


# ------------------------------------------------------------------------------------------
# narrowed dense layers
# ------------------------------------------------------------------------------------------


def mark_narrowed(module: nn.Linear, original: tuple[int, int]) -> None:
    """Mark ``module`` as a narrowed dense layer: a plain ``nn.Linear`` with fewer input or
    output features than the layer it replaced, whose shape is ``original`` =
    ``(in_features, out_features)`` (an MLP whose intermediate width was cut: the model's
    config still gives the original width).

    The checkpoint format records it (a ``"Linear"`` entry of ``layers``) and stores its
    weight as ``<name>.narrowed_weight`` beside a guard ``<name>.weight``, so that a loader
    without lowrank-layers fails rather than loading the original shape at random; the
    library's loaders rebuild it as a marked ``nn.Linear`` of the narrowed shape.

    Raises:
        TypeError: ``module`` is not an ``nn.Linear``.
        ValueError: ``original`` is not two positive ints at least the module's features.

    Example:
        >>> layer = nn.Linear(64, 24)  # replaces a 64 -> 96 layer
        >>> mark_narrowed(layer, (64, 96))
        >>> is_narrowed(layer), getattr(layer, NARROWED_ATTR)
        (True, (64, 96))
    """
    if not isinstance(module, nn.Linear):
        raise InputTypeError(f"module must be an nn.Linear, got {type(module).__name__}")
    out_f, in_f = module.weight.shape
    if (
        not isinstance(original, (tuple, list))
        or len(original) != 2
        or not all(isinstance(n, int) and not isinstance(n, bool) for n in original)
        or original[0] < in_f
        or original[1] < out_f
    ):
        raise InputError(
            "original must be (in_features, out_features) of the layer the module replaced, "
            f"each at least the module's ({in_f}, {out_f}), got {original!r}"
        )
    setattr(module, NARROWED_ATTR, (int(original[0]), int(original[1])))


def is_narrowed(module: nn.Module) -> bool:
    """Whether ``module`` is a narrowed dense layer: an ``nn.Linear`` marked by
    :func:`mark_narrowed`."""
    return isinstance(module, nn.Linear) and getattr(module, NARROWED_ATTR, None) is not None


def stored_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of a described layer's stored weights: its factors', or a narrowed layer's
    weight's (the dtype of an empty guard, :func:`guard`, for a torch without FP4)."""
    if isinstance(module, _NarrowedSlot):
        return getattr(module, NARROWED_WEIGHT).dtype
    if is_narrowed(module):
        return module.weight.dtype
    return module.S.dtype


def is_narrowed_entry(entry: Mapping[str, Any]) -> bool:
    """Whether a ``layers`` entry of the format describes a narrowed dense layer."""
    return entry.get("type") == NARROWED_TYPE


def stored_keys(layers: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """``{state-dict key: key in the checkpoint}`` for the tensors stored under another
    name than the model's: each narrowed layer's ``<name>.weight`` is stored as
    ``<name>.narrowed_weight`` (its ``<name>.weight`` is the guard)."""
    return {
        _key(name, "weight"): _key(name, NARROWED_WEIGHT)
        for name, entry in layers.items()
        if is_narrowed_entry(entry)
    }


def _key(layer_name: str, tensor: str) -> str:
    return f"{layer_name}.{tensor}" if layer_name else tensor


class _NarrowedSlot(nn.Module):
    """A narrowed layer while its tensors load: the weight under the checkpoint's name
    ``narrowed_weight``, the bias as ``bias``. It computes the layer; :func:`restore_narrowed`
    puts the ``nn.Linear`` back, with these parameters."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.register_parameter(NARROWED_WEIGHT, linear.weight)
        self.register_parameter("bias", linear.bias)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.__dict__["linear"] = linear  # not a submodule: no keys of its own

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, getattr(self, NARROWED_WEIGHT), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, narrowed"

    def restored(self) -> nn.Linear:
        """The ``nn.Linear``, holding the parameters this slot holds now (loading with
        ``assign=True`` replaces them)."""
        linear = self.__dict__["linear"]
        for name, stored in (("weight", NARROWED_WEIGHT), ("bias", "bias")):
            p = self._parameters[stored]
            if p is not None and not isinstance(p, nn.Parameter):
                p = nn.Parameter(p, requires_grad=p.requires_grad)
            linear.register_parameter(name, p)
        linear.train(self.training)
        return linear


def restore_narrowed(model: nn.Module) -> list[str]:
    """Put back, wherever :func:`restructure` left a narrowed layer's loading slot, the
    marked ``nn.Linear`` holding its (now loaded) parameters. A slot that accelerate's
    ``dispatch_model`` hooked (an offloaded or multi-device ``device_map``) stays: its
    hook loads the tensors by the checkpoint's names. It computes the same layer and is
    described and saved as the narrowed layer (:func:`lowrank_layers_of`), but is not an
    ``nn.Linear``.

    Returns:
        The names of the layers restored.
    """
    holders = module_holders(model)
    restored = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, _NarrowedSlot) or hasattr(module, "_hf_hook"):
            continue
        linear = module.restored()
        for parent, child_name, _ in holders.get(id(module), []):
            setattr(parent, child_name, linear)
        restored.append(name)
    return restored


def _narrowed_for(module: nn.Module, entry: dict[str, Any], name: str, path: Path) -> nn.Module:
    """The loading slot of a narrowed layer described by ``entry``, in place of ``module``:
    the dense layer of the original shape, or a narrowed ``nn.Linear`` (kept, in the slot)."""
    try:
        in_f, out_f = int(entry["in_features"]), int(entry["out_features"])
        original = (int(entry["original_in_features"]), int(entry["original_out_features"]))
        bias = bool(entry["bias"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: layer {name!r}: malformed Linear entry ({exc})") from None
    if isinstance(module, _NarrowedSlot):
        module = module.__dict__["linear"]
    if is_narrowed(module):
        have = (module.in_features, module.out_features, module.bias is not None)
        if have == (in_f, out_f, bias) and getattr(module, NARROWED_ATTR) == original:
            return _NarrowedSlot(module)
        raise CheckpointError(
            f"{path}: layer {name!r} is narrowed to {out_f}x{in_f} in the checkpoint but to "
            f"{module.out_features}x{module.in_features} in the model"
        )
    sizes = features(module)
    ref = next(iter(module.parameters()), None)
    if sizes is None or ref is None:
        raise CheckpointError(
            f"{path}: layer {name!r} is a {type(module).__name__} in the model, which cannot "
            "hold a narrowed Linear"
        )
    if tuple(sizes) != original:
        raise CheckpointError(
            f"{path}: layer {name!r} was {original[1]}x{original[0]} before narrowing in the "
            f"checkpoint but is {sizes[1]}x{sizes[0]} in the model"
        )
    linear = nn.Linear(in_f, out_f, bias=bias, device=ref.device, dtype=ref.dtype)
    mark_narrowed(linear, original)
    return _NarrowedSlot(linear)


# ------------------------------------------------------------------------------------------
# describing a model's layers
# ------------------------------------------------------------------------------------------


def _layer_entry(module: nn.Module) -> dict[str, Any] | None:
    """The format's description of a low-rank or narrowed layer; None for any other module."""
    if isinstance(module, _NarrowedSlot):  # left in its loading slot (see restore_narrowed)
        module = module.__dict__["linear"]
    if is_narrowed(module):
        out_f, in_f = module.weight.shape
        original = getattr(module, NARROWED_ATTR)
        return {
            "type": NARROWED_TYPE,
            "in_features": int(in_f),
            "out_features": int(out_f),
            "original_in_features": int(original[0]),
            "original_out_features": int(original[1]),
            "bias": module.bias is not None,
        }
    if isinstance(module, AdaptiveLowRankLinear) and not module.is_lowrank:
        return None  # dense phase: an ordinary Linear-shaped weight
    if not isinstance(module, (LowRankLinear, AdaptiveLowRankLinear, DynamicLowRankLinear)):
        return None
    entry: dict[str, Any] = {
        "type": type(module).__name__,
        "in_features": module.in_features,
        "out_features": module.out_features,
        "rank": int(module.S.shape[0]),
        "balance": module.D is not None,
        "bias": module.bias is not None,
    }
    if isinstance(module, DynamicLowRankLinear):
        entry["active_rank"] = module.rank
    return entry


def lowrank_layers_of(model: nn.Module) -> dict[str, dict[str, Any]]:
    """The checkpoint format's description of every low-rank layer of ``model``, and of
    every narrowed dense layer (:func:`mark_narrowed`), by name."""
    layers = {}
    for name, module in model.named_modules():
        entry = _layer_entry(module)
        if entry is not None:
            layers[name] = entry
    return layers


def lowrank_quantization_config(
    model_or_layers: nn.Module | Mapping[str, Mapping[str, Any]],
) -> dict[str, Any]:
    """The ``quantization_config`` entry of ``config.json`` describing a low-rank model.

    ``{"quant_method": "lowrank-layers", "format": "lowrank-layers", "format_version": 2,
    "layers": {name: {"type", "in_features", "out_features", "rank", "balance", "bias",
    ["active_rank"]}}}``: the ``layers`` of the checkpoint format (docs/checkpoints.md), for
    a model (its current layers) or a ``layers`` mapping as read from a checkpoint.
    """
    if isinstance(model_or_layers, nn.Module):
        layers = lowrank_layers_of(model_or_layers)
    elif isinstance(model_or_layers, Mapping):
        layers = {str(k): dict(v) for k, v in model_or_layers.items()}
    else:
        raise InputTypeError(
            "model_or_layers must be an nn.Module or a mapping of layer descriptions, got "
            f"{type(model_or_layers).__name__}"
        )
    return {
        "quant_method": QUANT_METHOD,
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "layers": dict(sorted(layers.items())),
    }


def format_metadata(layers: Mapping[str, Any], aliases: Mapping[str, str]) -> dict[str, str]:
    """The header metadata of a checkpoint holding ``layers`` with tied ``aliases``."""
    return {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "layers": json.dumps(layers, sort_keys=True),
        "aliases": json.dumps(aliases, sort_keys=True),
    }


def guard_key(layer_name: str) -> str:
    """The ``<layer>.weight`` key under which a low-rank layer's guard tensor is stored (see
    :func:`guard`)."""
    return f"{layer_name}.weight" if layer_name else "weight"


_PACKED_FP4 = getattr(torch, "float4_e2m1fn_x2", None)


def guard(dtype: torch.dtype) -> torch.Tensor:
    """The tensor stored as ``<layer>.weight`` beside a low-rank layer's factors: a
    tripwire for loaders that do not know the format, which would otherwise leave that
    dense weight at its random initialisation.

    One zero byte of packed FP4 (``torch.float4_e2m1fn_x2``, safetensors ``F4``, shape
    ``[2]`` in the header). A dense ``load_state_dict`` fails on its shape; transformers'
    ``from_pretrained`` without lowrank-layers fails when it reads it (safetensors cannot
    slice it, and torch cannot cast a packed pair to a float weight), with
    ``ignore_mismatched_sizes=True`` too, which only forgives shapes. A torch without that
    dtype gets the earlier guard, an empty ``(0,)`` tensor of ``dtype``, which only the
    shape check catches. Loaders of the format never read it (:func:`is_guard_entry`).
    """
    if _PACKED_FP4 is None:
        return torch.empty(0, dtype=dtype)
    return torch.zeros(1, dtype=torch.uint8).view(_PACKED_FP4)


def is_guard_entry(entry: Mapping[str, Any]) -> bool:
    """Whether a safetensors header entry (``dtype``, ``shape``) is a guard (:func:`guard`):
    one packed FP4 byte, or empty ``(0,)`` (written before, or by a torch without FP4)."""
    shape = list(entry.get("shape", ()))
    return shape == [0] or (entry.get("dtype") == "F4" and shape == [2])


# ------------------------------------------------------------------------------------------
# reading and checking a checkpoint's description
# ------------------------------------------------------------------------------------------


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The header metadata of a safetensors file, or the merged metadata of a checkpoint folder."""
    return open_checkpoint(Path(path)).metadata


def open_checkpoint(path: Path) -> CheckpointFiles:
    """The files of a checkpoint (see :func:`~lowrank_layers.safetensors_io.locate_files`)
    and their metadata: for an index written by others, which does not repeat the
    format's metadata, the shards' metadata merged."""
    ckpt = locate_files(path)
    if ckpt.index is not None and "layers" not in ckpt.metadata:
        ckpt.metadata = _merge_metadata([file_metadata(f) for f in ckpt.files])
    return ckpt


def _merge_metadata(parts: Sequence[dict[str, str]]) -> dict[str, str]:
    layers: dict[str, Any] = {}
    aliases: dict[str, str] = {}
    merged: dict[str, str] = {}
    for meta in parts:
        merged.update(meta)
        layers.update(json.loads(meta.get("layers", "{}")))
        aliases.update(json.loads(meta.get("aliases", "{}")))
    if any("format" in m for m in parts):
        merged["layers"] = json.dumps(layers, sort_keys=True)
        merged["aliases"] = json.dumps(aliases, sort_keys=True)
    return merged


def check_format(meta: Mapping[str, str], where: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """The ``layers`` and ``aliases`` of a checkpoint's metadata, once its format and
    version are checked (a :class:`CheckpointError` naming ``where`` otherwise)."""
    if meta.get("format") != FORMAT_NAME:
        raise CheckpointError(
            f"{where} is not a {FORMAT_NAME} checkpoint (metadata format="
            f"{meta.get('format')!r}): a folder saved by save_pretrained from a converted model "
            "reloads with lowrank_layers.load_pretrained(folder); a dense checkpoint loads "
            "with load_state_dict or transformers' from_pretrained"
        )
    version = meta.get("format_version")
    if version not in READABLE_VERSIONS:
        raise CheckpointError(
            f"{where} has format_version {version!r}; this version of lowrank-layers reads "
            f"format_version {' or '.join(READABLE_VERSIONS)}"
        )
    try:
        return json.loads(meta["layers"]), json.loads(meta.get("aliases", "{}"))
    except (KeyError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{where}: malformed layers metadata ({exc})") from exc


# ------------------------------------------------------------------------------------------
# rebuilding the described layers in a model
# ------------------------------------------------------------------------------------------


def restructure(model: nn.Module, layers: Mapping[str, Mapping[str, Any]], where: str) -> None:
    """Replace each listed module of ``model`` (on any device, ``meta`` too) by the low-rank
    layer its entry describes, before the tensors are loaded (``where`` names the source in
    errors).

    A narrowed layer (a ``"Linear"`` entry) gets a loading slot that holds its weight under
    the checkpoint's name ``narrowed_weight``: once the tensors are loaded,
    :func:`restore_narrowed` puts the marked ``nn.Linear`` in its place.
    """
    holders = module_holders(model)
    for name, entry in layers.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(
                f"{where}: layer {name!r} ({entry.get('type')}) is not in the model"
            ) from None
        if is_narrowed_entry(entry):
            new = _narrowed_for(module, dict(entry), name, Path(where))
        else:
            new = _layer_for(module, dict(entry), name, Path(where))
        if isinstance(new, DynamicLowRankLinear) and "active_rank" in entry:
            new.set_extra_state({"rank": int(entry["active_rank"])})
        if new is not module:
            for parent, child_name, _ in holders.get(id(module), []):
                setattr(parent, child_name, new)


def _layer_for(module: nn.Module, entry: dict[str, Any], name: str, path: Path) -> nn.Module:
    kind = entry.get("type")
    cls = _LAYER_TYPES.get(kind)  # type: ignore[arg-type]
    if cls is None:
        raise CheckpointError(f"{path}: layer {name!r} has unknown type {kind!r}")
    rank = int(entry["rank"])
    if (
        type(module) is cls
        and isinstance(module, (LowRankLinear, DynamicLowRankLinear))
        and module.S.shape[0] == rank
        and (module.D is not None) == entry["balance"]
    ):
        return module
    if isinstance(module, AdaptiveLowRankLinear) and cls is AdaptiveLowRankLinear:
        if module.rank != rank or (
            module.is_lowrank and (module.D is not None) != entry["balance"]
        ):
            if module.is_lowrank:
                module.load_state_dict(make_linear(module.dense_weight(), module.bias).state_dict())
            module.restructure(rank, row_scales=entry["balance"])
        return module
    ref = next(iter(module.parameters()), None)
    sizes = features(module)  # GPT-2's Conv1D included (weight stored (in, out))
    if ref is not None and sizes is not None:
        in_f, out_f = sizes
    else:
        raise CheckpointError(
            f"{path}: layer {name!r} is a {type(module).__name__} in the model, which cannot "
            f"hold a {kind}"
        )
    if (in_f, out_f) != (entry["in_features"], entry["out_features"]):
        raise CheckpointError(
            f"{path}: layer {name!r} is {entry['out_features']}x{entry['in_features']} in the "
            f"checkpoint but {out_f}x{in_f} in the model"
        )
    kw = {"bias": entry["bias"], "device": ref.device, "dtype": ref.dtype}
    if cls is LowRankLinear:
        return LowRankLinear(
            entry["in_features"], entry["out_features"], rank, row_scales=entry["balance"], **kw
        )
    if cls is DynamicLowRankLinear:
        return DynamicLowRankLinear(
            entry["in_features"],
            entry["out_features"],
            max_rank=rank,
            row_scales=entry["balance"],
            **kw,
        )
    layer = AdaptiveLowRankLinear(entry["in_features"], entry["out_features"], **kw)
    layer.restructure(rank, row_scales=entry["balance"])
    return layer
