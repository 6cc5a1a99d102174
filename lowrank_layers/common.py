"""Small helpers every module shares: argument checks, integer coercion, finiteness, a
progress bar. Nothing here knows about layers or ranks."""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

__all__ = [
    "InputError",
    "InputTypeError",
    "all_finite",
    "as_integer",
    "check_choice",
    "check_fraction",
    "parameter_count",
    "progress_bar",
    "weight_parameter_count",
]


class InputError(ValueError):
    """A value passed to lowrank-layers is not allowed; the message names the argument,
    the value and what is allowed. A ``ValueError``: ``except ValueError`` catches it."""


class InputTypeError(TypeError):
    """An argument passed to lowrank-layers has the wrong type (a ``TypeError``)."""


def check_choice(name: str, value: object, allowed: Sequence[str]) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise InputError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")


def check_fraction(name: str, value: object) -> float:
    """``value`` as a float in (0, 1]; a ``TypeError``/``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputTypeError(f"{name} must be a float in (0, 1], got {type(value).__name__}")
    if not (0.0 < value <= 1.0):  # also rejects NaN
        raise InputError(f"{name} must be in (0, 1], got {value}")
    return float(value)


def as_integer(value: object) -> object:
    """``value`` as an ``int`` when it is an integer of another type (``numpy.int64``, a
    0-d integer tensor); anything else unchanged, for the caller to validate."""
    if isinstance(value, bool):
        return value
    if isinstance(value, torch.Tensor):
        if value.dim() == 0 and not (value.is_floating_point() or value.is_complex()):
            return value if value.dtype == torch.bool else int(value)
        return value
    return int(value) if isinstance(value, numbers.Integral) else value


def all_finite(W: torch.Tensor) -> bool:
    """Whether every entry of ``W`` is finite, without a temporary of ``W``'s size.

    ``torch.isfinite(W).all()`` builds ``W.abs()`` and two boolean masks: 1.75x ``W``'s
    bytes for float32, more than the weight itself. The minimum and maximum propagate NaN
    and are ±inf exactly when an entry is, so two scalars decide it (one pass, no copy).
    """
    if W.numel() == 0:
        return True
    lo, hi = torch.aminmax(W)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def progress_bar(items: Iterable[Any], desc: str = "converting", unit: str = "layer") -> Any:
    """A tqdm progress bar over ``items`` (``pip install 'lowrank-layers[progress]'``)."""
    try:
        from tqdm.auto import tqdm
    except ImportError as exc:
        raise ImportError(
            "progress=True needs tqdm: pip install 'lowrank-layers[progress]'"
        ) from exc
    return tqdm(items, desc=desc, unit=unit)


def parameter_count(model: nn.Module) -> int:
    """The parameters of ``model`` (a lazy module's uninitialised ones count 0)."""
    return sum(
        p.numel()
        for p in model.parameters()
        if not isinstance(p, nn.parameter.UninitializedParameter)
    )


def weight_parameter_count(module: nn.Module) -> int:
    """The parameters a module holds directly (with its parametrizations' originals), its
    bias excluded: what conversion reports and summaries count as a layer's weights."""
    parametrized = torch.nn.utils.parametrize.is_parametrized(module)
    return sum(
        p.numel()
        for n, p in module.named_parameters(recurse=parametrized)
        if n != "bias" and not isinstance(p, nn.parameter.UninitializedParameter)
    )
