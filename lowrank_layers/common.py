"""Small helpers every module shares: argument checks, integer coercion, finiteness, a
progress bar. Nothing here knows about layers or ranks."""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Iterable, Iterator, Sequence
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
    "check_int",
    "check_module",
    "check_positive",
    "parameter_count",
    "progress_bar",
    "restored_flags",
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


def check_int(name: str, value: object, low: int = 1, *, optional: bool = False) -> Any:
    """``value`` unchanged when it is an ``int`` (not a bool) ``>= low``, or None with
    ``optional``; else a ``ValueError`` naming ``name``: ``rank must be a positive int, got
    0`` (``low=1``), ``threshold must be an int >= 0, got -1``, ``... or None`` when
    ``optional``. ``name`` may carry the caller's prefix (``"heal: steps"``)."""
    if optional and value is None:
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        allowed = "a positive int" if low == 1 else f"an int >= {low}"
        raise InputError(f"{name} must be {allowed}{' or None' if optional else ''}, got {value!r}")
    return value


def check_module(name: str, value: object, call: str) -> None:
    """Raise ``TypeError`` naming ``name`` unless ``value`` is an ``nn.Module``; ``call`` is
    the entry point's signature, shown as the fix: ``model must be an nn.Module, got AdamW
    (an optimizer: the arguments are switch_to_lowrank(model, optimizer))``."""
    if isinstance(value, nn.Module):
        return
    got = type(value).__name__
    if isinstance(value, torch.optim.Optimizer):
        raise InputTypeError(
            f"{name} must be an nn.Module, got {got} (an optimizer, torch.optim.Optimizer): "
            f"the arguments are {call}"
        )
    raise InputTypeError(f"{name} must be an nn.Module, got {got}; {call}")


def check_positive(name: str, value: object, *, optional: bool = False) -> Any:
    """``value`` unchanged when it is a finite number > 0 (an int or a float, not a bool),
    or None with ``optional``; else a ``ValueError`` naming ``name``: ``lr must be a
    positive number, got 0.0`` (``... or None`` when ``optional``)."""
    if optional and value is None:
        return value
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        allowed = "a positive number or None" if optional else "a positive number"
        raise InputError(f"{name} must be {allowed}, got {value!r}")
    return value


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


def progress_bar(
    items: Iterable[Any] | None = None,
    desc: str = "converting",
    unit: str = "layer",
    *,
    total: int | None = None,
) -> Any:
    """A tqdm progress bar over ``items``, or, with ``items=None``, one the caller advances
    with ``.update()`` towards ``total`` (None: open-ended), and closes. tqdm is an optional
    extra: an ``ImportError`` says ``pip install 'lowrank-layers[progress]'``."""
    try:
        from tqdm.auto import tqdm
    except ImportError as exc:
        raise ImportError(
            "progress=True needs tqdm: pip install 'lowrank-layers[progress]'"
        ) from exc
    return tqdm(items, desc=desc, unit=unit, total=total)


@contextlib.contextmanager
def restored_flags(
    modules: Iterable[nn.Module], params: Iterable[nn.Parameter] = ()
) -> Iterator[None]:
    """Restore each module's own ``training`` flag and each parameter's ``requires_grad``
    on exit, also when an error is raised: for code that runs a caller's model in eval
    mode, or trains only some of its parameters."""
    modes = {m: m.training for m in modules}
    flags = [(p, p.requires_grad) for p in params]
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, training in modes.items():
            m.training = training


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
