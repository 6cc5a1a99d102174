"""Which modules a call applies to: name patterns, and where each module is held.

peft's rule for names (``include`` / ``exclude`` / ``target_modules``): a string is a regex
matching the whole dotted name, a list holds exact names or dotted suffixes.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from torch import nn

from .common import InputError, InputTypeError

__all__ = ["check_patterns", "module_holders", "name_matches", "weight_owners"]


def check_patterns(name: str, value: object) -> None:
    """Validate ``include``/``exclude``-like patterns: a regex string, or a list of names."""
    if value is None or isinstance(value, str):
        if isinstance(value, str):
            try:
                re.compile(value)
            except re.error as exc:
                raise InputError(f"{name} is not a valid regular expression: {exc}") from exc
        return
    if isinstance(value, (list, tuple, set, frozenset)) and all(isinstance(v, str) for v in value):
        return
    raise InputTypeError(f"{name} must be a regex string or a list of module names, got {value!r}")


def name_matches(fqn: str, patterns: str | Iterable[str]) -> bool:
    """peft's rule: a string is a regex that must match the whole dotted name; a list holds
    exact names or dotted suffixes (``"q_proj"`` matches ``"model.layers.0.self_attn.q_proj"``).
    """
    if isinstance(patterns, str):
        return re.fullmatch(patterns, fqn) is not None
    return any(fqn == p or fqn.endswith("." + p) for p in patterns)


def module_holders(model: nn.Module) -> dict[int, list[tuple[nn.Module, str, str]]]:
    """For each module id: every (parent, attribute name, full name) that holds it."""
    holders: dict[int, list[tuple[nn.Module, str, str]]] = {}
    for parent_name, parent in model.named_modules(remove_duplicate=False):
        for child_name, child in parent._modules.items():  # named_children() dedups
            if child is None:
                continue
            fqn = f"{parent_name}.{child_name}" if parent_name else child_name
            holders.setdefault(id(child), []).append((parent, child_name, fqn))
    return holders


def weight_owners(model: nn.Module) -> dict[int, list[str]]:
    """For each parameter id: the full names of every module that holds it."""
    owners: dict[int, list[str]] = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        for p in module._parameters.values():
            if p is not None:
                owners.setdefault(id(p), []).append(mod_name)
    return owners
