"""No optimizer silently steps parameters a conversion replaced.

:func:`~lowrank_layers.convert_model`, :func:`~lowrank_layers.switch_to_lowrank`,
:func:`~lowrank_layers.prune_dynamic` and :func:`~lowrank_layers.tools.merge_to_dense`
replace parameters by new ones. Given ``optimizer=``, they put the new ones in its param
groups; any other optimizer built before still holds the old ones, and stepping it trains
nothing of the model. Each replaced (trainable) parameter is therefore *retired* here, held
weakly with its name, and one global ``torch.optim`` step pre-hook warns, once per
optimizer, with a :class:`StaleOptimizerWarning` when an optimizer steps a retired
parameter. The hook is registered on the first retirement and returns at once while no
retired parameter is alive, so a process that converts nothing pays nothing.

A warning rather than an error: the step itself is harmless (it updates tensors no longer
in the model), and a long training run should not die on it; the warning names the
layers and the fix, and ``warnings.simplefilter("error", StaleOptimizerWarning)`` makes
it an error.
"""

from __future__ import annotations

import os
import sys
import warnings
import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

__all__ = ["StaleOptimizerWarning", "retire", "stale_parameters"]


class StaleOptimizerWarning(UserWarning):
    """An optimizer stepped parameters that a conversion replaced: the layers' new
    parameters do not train through it."""


# id(parameter) -> (weak reference to it, its name, the function that replaced it)
_retired: dict[int, tuple[weakref.ref[torch.Tensor], str, str]] = {}
# optimizer -> the stale names it was warned about (a new name warns again)
_warned: weakref.WeakKeyDictionary[torch.optim.Optimizer, frozenset[str]] = (
    weakref.WeakKeyDictionary()
)
_hook: Any = None
_INTERNAL = tuple(os.path.dirname(os.path.abspath(f)) + os.sep for f in (torch.__file__, __file__))


def retire(params: Iterable[tuple[str, torch.Tensor]], by: str) -> None:
    """Note that ``by`` replaced each ``(name, parameter)``; frozen ones are left out (an
    optimizer holding them updates nothing either way)."""
    global _hook
    for name, param in params:
        if not param.requires_grad:
            continue
        key = id(param)
        _retired[key] = (weakref.ref(param, lambda ref, key=key: _forget(key, ref)), name, by)
        if _hook is None:
            _hook = register_optimizer_step_pre_hook(_check_step)


def _forget(key: int, ref: weakref.ref[torch.Tensor]) -> None:
    entry = _retired.get(key)
    if entry is not None and entry[0] is ref:
        del _retired[key]


def stale_parameters(optimizer: torch.optim.Optimizer) -> list[tuple[str, str]]:
    """``(name, replaced by)`` of each parameter in ``optimizer``'s groups that a conversion
    replaced."""
    if not _retired:
        return []
    out = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            entry = _retired.get(id(p))
            if entry is not None and entry[0]() is p:
                out.append((entry[1], entry[2]))
    return out


def _check_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    """The global step pre-hook: warn when ``optimizer`` holds retired parameters."""
    if not _retired:
        return
    stale = stale_parameters(optimizer)
    if not stale:
        return
    names = frozenset(name for name, _ in stale)
    if names <= _warned.get(optimizer, frozenset()):
        return
    _warned[optimizer] = names
    shown = ", ".join(name for name, _ in stale[:4]) + (", ..." if len(stale) > 4 else "")
    callers = sorted({by for _, by in stale})
    warnings.warn(
        f"{type(optimizer).__name__}.step(): this optimizer still holds {len(stale)} "
        f"parameters that {' and '.join(callers)} replaced ({shown}); it updates tensors "
        "that are no longer in the model, and their replacements do not train. Pass "
        f"optimizer= to {' / '.join(callers)}, or build the optimizer after converting",
        StaleOptimizerWarning,
        stacklevel=_user_level(),
    )


def _user_level() -> int:
    """The ``stacklevel`` that points at the first frame outside torch and this library
    (the user's ``optimizer.step()``, wherever wrappers such as an LR scheduler's sit)."""
    frame = sys._getframe(1)  # the function that calls warnings.warn
    level = 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_INTERNAL):
        frame = frame.f_back
        level += 1
    return level
