"""The transformers round trip of a converted model: the ``lowrank-layers`` quantizer.

A converted transformers model describes its low-rank layers in its config, as a
``quantization_config`` with ``quant_method`` ``"lowrank-layers"``
(:func:`mark_lowrank_config`), so ``save_pretrained`` writes the description into
``config.json``; :func:`load_pretrained` reloads the folder (written by ``save_pretrained``,
by :func:`~lowrank_layers.hf.convert_pretrained` or by
:func:`~lowrank_layers.offline.convert_checkpoint`) as the low-rank model. The quantization
method is registered with transformers (``transformers.quantizers.auto.register_quantizer``,
transformers 4.50 and later) as soon as both libraries are imported, whichever first, so
``AutoModel.from_pretrained(folder)`` itself returns the low-rank model once
``lowrank_layers`` is imported. Importing ``lowrank_layers`` never imports transformers:
until transformers loads its quantizers, an import hook (at the end of this module) waits
for it.

The quantizer's classes subclass transformers' own, so they are made when transformers is
first needed (:func:`register_with_transformers`); their methods are the functions below.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import json
import os
import re
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint_format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    QUANT_METHOD,
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
from .safetensors_io import CheckpointError

__all__ = [
    "QUANT_METHOD",
    "load_pretrained",
    "lowrank_quantization_config",
    "mark_lowrank_config",
    "register_with_transformers",
]

_QUANTIZERS_MODULE = "transformers.quantizers.auto"

# quantization methods whose weights transformers dequantizes when it loads the model (a
# GGUF file becomes float tensors): the quantization_config is a record of the source
# file, and a converted model's own description replaces it
DEQUANTIZED_ON_LOAD = frozenset({"gguf"})


def mark_lowrank_config(model: nn.Module) -> bool:
    """Make ``model.save_pretrained`` write a folder that reloads as the low-rank model.

    For a transformers model (one with a ``config`` holding ``to_dict``) with low-rank
    or narrowed layers (:func:`~lowrank_layers.checkpoint_format.mark_narrowed`; a
    narrowed layer's weight is saved as ``<name>.narrowed_weight``): sets
    ``model.config.quantization_config`` (see
    :func:`~lowrank_layers.checkpoint_format.lowrank_quantization_config`) and attaches the
    ``lowrank-layers`` quantizer as ``model.hf_quantizer``, which ``save_pretrained``
    consults: it refreshes the layer description at save time (so later rank changes are
    saved too) and stores, for each low-rank or narrowed layer ``<name>``, a guard tensor
    ``<name>.weight`` (:func:`~lowrank_layers.checkpoint_format.guard`), so that a dense load
    without lowrank-layers fails, ``ignore_mismatched_sizes=True`` or not, rather than
    initialising the layer at random. A no-op returning
    False for other models, or models without low-rank layers. Called by
    :func:`~lowrank_layers.convert_model`.

    A model loaded from a GGUF file (dequantized on load) has its ``gguf``
    ``quantization_config`` replaced. A model of another quantization method keeps its
    own, with a ``UserWarning`` (its ``save_pretrained`` will not describe the low-rank
    layers: use :func:`~lowrank_layers.save_lowrank`); so does any model when transformers
    is too old to register the quantizer (before 4.50).

    Returns:
        Whether the model was marked.
    """
    config = getattr(model, "config", None)
    if config is None or not callable(getattr(config, "to_dict", None)):
        return False
    if "transformers" not in sys.modules:
        return False  # a model with a config-like attribute, not a transformers model
    layers = lowrank_layers_of(model)
    existing = getattr(config, "quantization_config", None)
    if not layers:
        return False
    method = None if existing is None else str(getattr(_quant_method(existing), "value",
                                                         _quant_method(existing)))  # fmt: skip
    if method is not None and method != QUANT_METHOD and method not in DEQUANTIZED_ON_LOAD:
        warnings.warn(
            f"model.config.quantization_config has quant_method {method!r}, which stays: "
            "save_pretrained of this model will not describe its low-rank layers; save it "
            "with save_lowrank instead",
            UserWarning,
            stacklevel=3,
        )
        return False
    try:
        config_cls, quantizer_cls = register_with_transformers()
    except ImportError as exc:  # a transformers older than 4.50: the model still converts
        warnings.warn(
            f"{exc}: save_pretrained of this model will not describe its low-rank layers; "
            "save it with save_lowrank instead",
            UserWarning,
            stacklevel=3,
        )
        return False
    qconfig = config_cls.from_dict(lowrank_quantization_config(layers))
    config.quantization_config = qconfig
    model.hf_quantizer = quantizer_cls(qconfig, pre_quantized=True)
    return True


def _quant_method(qconfig: Any) -> Any:
    if isinstance(qconfig, Mapping):
        return qconfig.get("quant_method")
    return getattr(qconfig, "quant_method", None)


def _layers_from_qconfig(qconfig: Any, where: str) -> dict[str, dict[str, Any]]:
    data = dict(qconfig) if not isinstance(qconfig, Mapping) else qconfig
    if data.get("format") != FORMAT_NAME:
        raise CheckpointError(
            f"{where}: quantization_config has format {data.get('format')!r}, expected "
            f"{FORMAT_NAME!r}"
        )
    version = data.get("format_version")
    if str(version) == "1":
        raise CheckpointError(
            f"{where}: quantization_config has format_version 1, whose tensors <layer>.V "
            "(in, r) transformers cannot load into this version's <layer>.Vh (r, in): "
            "convert the original model again (lowrank_layers.load_lowrank reads format-1 "
            "files written by save_lowrank or lowrank-layers convert)"
        )
    if str(version) != str(FORMAT_VERSION):
        raise CheckpointError(
            f"{where}: quantization_config has format_version {version!r}; this version of "
            f"lowrank-layers reads format_version {FORMAT_VERSION!r}"
        )
    layers = data.get("layers")
    if not isinstance(layers, Mapping):
        raise CheckpointError(f"{where}: quantization_config has no 'layers' object")
    return {str(k): dict(v) for k, v in layers.items()}


_CLASSES: dict[str, type] = {}


def register_with_transformers() -> tuple[type, type]:
    """Register the ``lowrank-layers`` quantization method with transformers (idempotent).

    Imports transformers. Called automatically when both libraries are loaded (see the
    module docstring); call it yourself only if an import hook cannot run (e.g. a frozen
    application).

    Returns:
        ``(LowRankQuantizationConfig, LowRankHfQuantizer)``, the registered classes.

    Raises:
        ImportError: transformers is not installed, or too old to register quantizers
            (before 4.50).
        ValueError: another library registered the name ``lowrank-layers``.
    """
    if _CLASSES:
        return _CLASSES["config"], _CLASSES["quantizer"]
    try:
        from transformers.quantizers import auto
        from transformers.quantizers.base import HfQuantizer
        from transformers.utils.quantization_config import QuantizationConfigMixin
    except ImportError as exc:
        raise ImportError(
            "loading low-rank transformers models needs transformers>=4.50: pip install "
            "'lowrank-layers[hf]'"
        ) from exc
    if not hasattr(auto, "register_quantizer"):
        raise ImportError(
            "this transformers has no register_quantizer (transformers.quantizers.auto, "
            "added in 4.50); upgrade transformers to load low-rank models with from_pretrained"
        )
    config_cls, quantizer_cls = _define_classes(QuantizationConfigMixin, HfQuantizer)
    _register(config_cls, auto.AUTO_QUANTIZATION_CONFIG_MAPPING, auto.register_quantization_config)
    _register(quantizer_cls, auto.AUTO_QUANTIZER_MAPPING, auto.register_quantizer)
    _CLASSES["config"], _CLASSES["quantizer"] = config_cls, quantizer_cls
    return config_cls, quantizer_cls


def _register(cls: type, mapping: dict[str, type], register: Any) -> None:
    """Register ``cls`` under ``QUANT_METHOD`` unless it is there; refuse another's class."""
    present = mapping.get(QUANT_METHOD)
    if present is None:
        register(QUANT_METHOD)(cls)
    elif present.__module__ == __name__ and present.__name__ == cls.__name__:
        mapping[QUANT_METHOD] = cls  # this module reloaded: replace our own registration
    else:
        raise InputError(
            f"quant_method {QUANT_METHOD!r} is already registered with transformers by "
            f"{present.__module__}.{present.__qualname__}"
        )


def _define_classes(config_base: type, quantizer_base: type) -> tuple[type, type]:
    """The quantization config and quantizer classes, on transformers' base classes."""

    class LowRankQuantizationConfig(config_base):  # type: ignore[misc, valid-type]
        """``quantization_config`` of a lowrank-layers model: the description of its layers."""

        __init__ = _config_init
        to_dict = _config_to_dict

    class LowRankHfQuantizer(quantizer_base):  # type: ignore[misc, valid-type]
        """Builds the low-rank layers named in the config before transformers loads weights."""

        requires_calibration = False
        validate_environment = _validate_environment
        _process_model_before_weight_loading = _before_weight_loading
        _process_model_after_weight_loading = _after_weight_loading
        get_state_dict_and_metadata = _state_dict_and_metadata
        is_serializable = _always_true
        is_trainable = property(_always_true)
        is_qat_trainable = property(_always_true)

    return LowRankQuantizationConfig, LowRankHfQuantizer


# ------------------------------------------------------------------------------------------
# the methods of LowRankQuantizationConfig and LowRankHfQuantizer
# ------------------------------------------------------------------------------------------


def _config_init(
    self: Any,
    layers: Mapping[str, Mapping[str, Any]] | None = None,
    format: str = FORMAT_NAME,
    format_version: int | str = FORMAT_VERSION,
    **kwargs: Any,
) -> None:
    self.quant_method = QUANT_METHOD
    self.format = format
    self.format_version = format_version
    self.layers = {str(k): dict(v) for k, v in (layers or {}).items()}


def _config_to_dict(self: Any) -> dict[str, Any]:
    return lowrank_quantization_config(self.layers) | {
        "format": self.format,
        "format_version": self.format_version,
    }


def _validate_environment(self: Any, *args: Any, **kwargs: Any) -> None:
    _layers_from_qconfig(self.quantization_config.to_dict(), "config.json")


def _before_weight_loading(self: Any, model: nn.Module, **kwargs: Any) -> None:
    layers = _layers_from_qconfig(self.quantization_config.to_dict(), "config.json")
    restructure(model, layers, "config.json")
    # the dense-load guards (see mark_lowrank_config) and the active rank of dynamic
    # layers (set from the config) are not loaded
    guards = [rf"(^|\.){re.escape(name)}\.weight$" for name in layers]
    model._keys_to_ignore_on_load_unexpected = _patterns(
        model._keys_to_ignore_on_load_unexpected, guards
    )
    model._keys_to_ignore_on_load_missing = _patterns(
        model._keys_to_ignore_on_load_missing, [r"\._extra_state$"]
    )


def _patterns(existing: Any, added: list[str]) -> set[str] | list[str]:
    """``existing`` key patterns (None, a set or a list) with ``added``, in the container
    transformers expects: 5.x makes them a set and joins a set to them, 4.5x keeps the
    class's list (or None) and adds a list to it."""
    if isinstance(existing, set):
        return existing | set(added)
    return list(dict.fromkeys([*(existing or ()), *added]))


def _after_weight_loading(self: Any, model: nn.Module, **kwargs: Any) -> None:
    restore_narrowed(model)  # the loading slots of narrowed layers: nn.Linear again
    # an ordinary model: half(), to(dtype) and Trainer work as for a dense one
    model.is_quantized = False
    model.config._is_quantized = False


def _state_dict_and_metadata(self: Any, model: nn.Module, *args: Any) -> tuple[dict, dict]:
    layers = lowrank_layers_of(model)
    dynamic = [n for n, e in layers.items() if e["type"] == "DynamicLowRankLinear"]
    if dynamic:
        raise InputError(
            f"save_pretrained cannot save DynamicLowRankLinear layers ({dynamic[0]!r}"
            f"{' and others' if len(dynamic) > 1 else ''}): transformers cannot load "
            "their active rank; save with lowrank_layers.save_lowrank, or set each "
            "layer's rank and replace it by a LowRankLinear first"
        )
    self.quantization_config.layers = layers  # save_pretrained writes the config next
    model.config.quantization_config = self.quantization_config
    renamed = stored_keys(layers)  # narrowed layers' weights: <name>.weight is the guard
    state = {
        renamed.get(k, k): v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)
    }
    for name in layers:
        state[guard_key(name)] = guard(stored_dtype(model.get_submodule(name)))
    return state, {}


def _always_true(self: Any, *args: Any, **kwargs: Any) -> bool:
    return True


# ------------------------------------------------------------------------------------------
# loading a model folder
# ------------------------------------------------------------------------------------------


def load_pretrained(path: str | os.PathLike, *, auto_class: Any = None, **kwargs: Any) -> nn.Module:
    """Reload a low-rank transformers model folder: the model that was saved, in eval mode.

    ``path`` is a folder written by ``save_pretrained`` of a converted model, by
    :func:`~lowrank_layers.hf.convert_pretrained` (``lowrank-layers convert
    --calibrate/--budget``), or by :func:`~lowrank_layers.offline.convert_checkpoint` from a
    model folder: the low-rank layers are read from ``config.json``'s
    ``quantization_config`` or, failing that, from the checkpoint's metadata, and built
    before transformers loads the weights.

    Args:
        path: the model folder.
        auto_class: the transformers class to load with: ``AutoModelForCausalLM`` when
            ``config.architectures`` names a ``*ForCausalLM``, else ``AutoModel`` (the choice
            of ``convert_pretrained``); or any class with ``from_pretrained`` (e.g.
            ``AutoModelForSequenceClassification``, ``BertModel``).
        **kwargs: passed to ``from_pretrained`` (``dtype``, ``device_map``, ...). With
            ``disable_mmap=True`` the tensors are read here, with plain file reads, and
            passed as ``state_dict`` (transformers' own ``disable_mmap`` reads whole files
            with ``safetensors.torch.load``, which cannot read the guards).

    Raises:
        FileNotFoundError: ``path`` has no ``config.json``.
        CheckpointError (a ``ValueError``): the folder describes no low-rank layer (a dense
            folder loads with transformers' ``from_pretrained``), an unknown
            ``format_version``, or a listed layer the model lacks.
        TypeError: ``auto_class`` has no ``from_pretrained``.

    Returns:
        The model, in eval mode.
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"path must be a transformers model folder, {path} has no config.json"
        )
    if auto_class is not None and not callable(getattr(auto_class, "from_pretrained", None)):
        raise InputTypeError(
            f"auto_class must be a transformers class with from_pretrained (e.g. "
            f"transformers.AutoModel), got {auto_class!r}"
        )
    register_with_transformers()
    import transformers

    config = kwargs.pop("config", None)
    if config is None:
        config = transformers.AutoConfig.from_pretrained(path)
    qconfig = getattr(config, "quantization_config", None)
    if qconfig is None:
        metadata = _checkpoint_metadata(path)
        if metadata.get("format") != FORMAT_NAME:
            raise CheckpointError(
                f"{path} is not a lowrank-layers model folder: config.json has no "
                f"quantization_config with quant_method {QUANT_METHOD!r} and its weights no "
                f"{FORMAT_NAME} metadata (a dense folder loads with transformers' from_pretrained)"
            )
        try:
            layers = json.loads(metadata["layers"])
        except (KeyError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path}: malformed layers metadata ({exc})") from exc
        config.quantization_config = lowrank_quantization_config(layers) | {
            "format_version": metadata.get("format_version")
        }
    elif _quant_method(qconfig) != QUANT_METHOD:
        raise CheckpointError(
            f"{path}: config.json's quantization_config has quant_method "
            f"{_quant_method(qconfig)!r}, not {QUANT_METHOD!r}: not a lowrank-layers model"
        )
    if auto_class is None:
        auto_class = auto_class_for(config)
    if kwargs.pop("disable_mmap", False):
        model = _load_without_map(auto_class, path, config, kwargs)
    else:
        model = auto_class.from_pretrained(path, config=config, **kwargs)
    return model.eval()


def auto_class_for(config: Any) -> Any:
    """The transformers class a model folder of this ``config`` loads with, everywhere in
    the library: ``AutoModelForCausalLM`` when ``config.architectures`` names a
    ``*ForCausalLM``, else ``AutoModel``."""
    import transformers

    causal = any(a.endswith("ForCausalLM") for a in (config.architectures or []))
    return transformers.AutoModelForCausalLM if causal else transformers.AutoModel


def _load_without_map(cls: Any, path: Path, config: Any, kwargs: dict[str, Any]) -> nn.Module:
    """``cls.from_pretrained`` of the folder ``path`` for ``disable_mmap=True``, from its
    tensors read here with plain file reads, the guards left unread: transformers would
    read whole files with ``safetensors.torch.load``, which does not read the guards' FP4
    (safetensors 0.8)."""
    qconfig = config.quantization_config
    data = qconfig if isinstance(qconfig, Mapping) else qconfig.to_dict()
    guards = {guard_key(name) for name in data.get("layers") or {}}
    ckpt = open_checkpoint(path)
    state = dict(ckpt.read_tensors(skip=lambda key, e: key in guards and is_guard_entry(e)))
    mapping = getattr(cls, "_model_mapping", None)  # an Auto class: its class for this config
    if mapping is not None and type(config) in mapping:
        cls = mapping[type(config)]
    # transformers takes a state_dict only without a folder
    model = cls.from_pretrained(None, config=config, state_dict=state, **kwargs)
    model.config.name_or_path = str(path)
    return model


def _checkpoint_metadata(path: Path) -> dict[str, str]:
    try:
        return read_metadata(path)
    except (CheckpointError, FileNotFoundError):
        return {}


# ------------------------------------------------------------------------------------------
# the import hook: register when transformers loads its quantizers
# ------------------------------------------------------------------------------------------


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Registers the quantization method right after transformers imports its quantizers."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != _QUANTIZERS_MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return None
        spec.loader = _RegisteringLoader(spec.loader)
        return spec


class _RegisteringLoader(importlib.abc.Loader):
    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def create_module(self, spec: Any) -> Any:
        return self.loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self.loader.exec_module(module)
        _remove_hook()
        try:
            register_with_transformers()
        except (ImportError, ValueError) as exc:  # never break transformers' own import
            warnings.warn(
                f"lowrank-layers could not register with transformers: {exc}", stacklevel=2
            )

    def __getattr__(self, name: str) -> Any:  # get_resource_reader, is_package, ...
        return getattr(self.loader, name)


def _remove_hook() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _RegisterAfterImport)]


def _enable_transformers_integration() -> None:
    """Register now if transformers' quantizers are loaded, else when they are (no import)."""
    if _QUANTIZERS_MODULE in sys.modules:
        try:
            register_with_transformers()
        except (ImportError, ValueError) as exc:
            warnings.warn(
                f"lowrank-layers could not register with transformers: {exc}", stacklevel=2
            )
    elif not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())


_enable_transformers_integration()
