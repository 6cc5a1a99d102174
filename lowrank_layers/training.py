"""Structural changes during training, with the optimizer kept in step:
:func:`switch_to_lowrank` (adaptive layers from dense to low rank) and
:func:`prune_dynamic` (dynamic layers shed their unused components)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from .adaptive import AdaptiveLowRankLinear, SwitchResult
from .common import InputError, InputTypeError, check_module
from .dynamic import DynamicLowRankLinear, ParamSwap
from .factorize import Balance, Method
from .hf_quantizer import mark_lowrank_config
from .linear import FACTOR_NAMES
from .policy import RankPolicy, as_policy, layer_seed
from .stale import retire

__all__ = [
    "apply_param_swaps",
    "check_optimizer",
    "prune_dynamic",
    "refuse_missing",
    "switch_to_lowrank",
]


def check_optimizer(optimizer: object) -> None:
    """``optimizer`` must be a ``torch.optim.Optimizer`` or ``None``."""
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise InputTypeError(
            f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}"
        )


def refuse_missing(
    optimizer: torch.optim.Optimizer | None,
    weights: list[tuple[str, torch.Tensor]],
    caller: str,
    verb: str,
    fix: str,
) -> None:
    """Refuse, before anything changes, an ``optimizer`` that lacks the trainable weight of
    some of the ``(layer name, weight)`` to change: their new parameters would never train
    (frozen weights are not expected in it)."""
    if optimizer is None:
        return
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    missing = [name for name, w in weights if w.requires_grad and id(w) not in held]
    if missing:
        raise InputError(
            f"{caller}: the optimizer holds no weight of {len(missing)} of the "
            f"{len(weights)} layers to {verb} ({', '.join(missing[:3])}"
            f"{', ...' if len(missing) > 3 else ''}): their factors would never train. {fix}"
        )


def apply_param_swaps(optimizer: torch.optim.Optimizer, swaps: Iterable[ParamSwap]) -> int:
    """Replace parameters inside ``optimizer``'s param groups, in place.

    Each ``swap.old`` is replaced, at its position in its group, by ``swap.new`` (same
    group, same hyper-parameters). Its state is dropped, or sliced with ``swap.index``
    and carried to the single new parameter when an index is given. Every other
    parameter's state is untouched. Returns how many swaps found their parameter.
    """
    found = 0
    for swap in swaps:
        for group in optimizer.param_groups:
            params = group["params"]
            pos = next((i for i, p in enumerate(params) if p is swap.old), None)
            if pos is None:
                continue
            params[pos : pos + 1] = list(swap.new)
            state = optimizer.state.pop(swap.old, None)
            if state and swap.index is not None and len(swap.new) == 1:
                optimizer.state[swap.new[0]] = {
                    k: v[swap.index].clone()
                    if isinstance(v, torch.Tensor) and v.shape == swap.old.shape
                    else v
                    for k, v in state.items()
                }
            found += 1
            break
    return found


def switch_to_lowrank(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    policy: RankPolicy | None = None,
    *,
    rank: int | None = None,
    rank_ratio: float | None = None,
    energy: float | None = None,
    param_ratio: float | None = None,
    method: Method = "svd",
    balance: Balance | None = None,
    seed: int = 0,
) -> dict[str, SwitchResult]:
    """Switch every dense-phase :class:`~lowrank_layers.AdaptiveLowRankLinear` in ``model``.

    Given the ``optimizer``, each old ``weight`` is removed from its param group (and its
    state dropped) and the new factors take its place in the same group, with the same
    hyper-parameters; every other parameter keeps its state (biases included), so the LR
    scheduler and the training loop continue unchanged. Works with SGD (momentum), Adam
    and AdamW, foreach or fused.

    With no rank policy (``policy``, a :class:`~lowrank_layers.RankPolicy`, or its keyword
    form), each layer uses the one it was built with. With ``method="randomized"``, each
    layer's sketch is seeded by :func:`~lowrank_layers.policy.layer_seed` ``(seed, name)``,
    as in :func:`~lowrank_layers.convert_model`: the result does not depend on the order of
    the layers.
    (The layer method :meth:`AdaptiveLowRankLinear.switch_to_lowrank
    <lowrank_layers.AdaptiveLowRankLinear.switch_to_lowrank>` takes a ``generator``: one
    matrix, one generator; model-level functions take a ``seed``.)

    Returns:
        ``{module name: SwitchResult}``.

    Raises:
        ValueError: no dense-phase ``AdaptiveLowRankLinear`` in the model; an ``optimizer``
            that lacks the weight of a layer to switch (nothing is switched then).

    Example:
        >>> model = nn.Sequential(AdaptiveLowRankLinear(64, 64), nn.ReLU())
        >>> opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        >>> results = switch_to_lowrank(model, opt, rank_ratio=0.25)
        >>> results["0"].rank, len(opt.param_groups[0]["params"])
        (16, 4)
    """
    check_module("model", model, "switch_to_lowrank(model, optimizer)")
    layers = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, AdaptiveLowRankLinear) and not m.is_lowrank
    ]
    if not layers:
        raise InputError(
            "switch_to_lowrank: the model holds no AdaptiveLowRankLinear in its dense phase"
        )
    check_optimizer(optimizer)
    refuse_missing(
        optimizer, [(name, layer.weight) for name, layer in layers], "switch_to_lowrank",
        "switch", "Pass the optimizer that trains this model, or optimizer=None and add the "
        "new factors yourself",
    )  # fmt: skip
    policy = as_policy(policy, rank, rank_ratio, energy, param_ratio, required=False)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InputTypeError(f"seed must be an int, got {seed!r}")
    results: dict[str, SwitchResult] = {}
    for name, layer in layers:
        old = layer.weight
        generator = torch.Generator(old.device).manual_seed(layer_seed(seed, name))
        results[name] = layer.switch_to_lowrank(
            policy, method=method, balance=balance, generator=generator
        )
        if optimizer is not None:
            new = tuple(p for n, p in layer.named_parameters() if n in FACTOR_NAMES)
            apply_param_swaps(optimizer, [ParamSwap(old, new)])
        retire([(f"{name}.weight", old)], by="switch_to_lowrank")
    mark_lowrank_config(model)
    return results


def prune_dynamic(
    model: nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> dict[str, int]:
    """:meth:`~lowrank_layers.DynamicLowRankLinear.prune` every dynamic layer, keeping the
    optimizer in step: the pruned ``U``, ``S``, ``Vh`` replace the old ones in their groups,
    with the optimizer state of the kept components carried over.

    Returns:
        ``{module name: new max_rank}``.
    """
    check_module("model", model, "prune_dynamic(model, optimizer)")
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, DynamicLowRankLinear)]
    if not layers:
        raise InputError("prune_dynamic: the model holds no DynamicLowRankLinear")
    check_optimizer(optimizer)
    out = {}
    for name, layer in layers:
        names = {id(p): n for n, p in layer.named_parameters()}
        swaps = layer.prune()
        if optimizer is not None:
            apply_param_swaps(optimizer, swaps)
        retire([(f"{name}.{names[id(s.old)]}", s.old) for s in swaps], by="prune_dynamic")
        out[name] = layer.max_rank
    return out
