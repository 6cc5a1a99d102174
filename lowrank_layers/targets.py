"""Which layers of a model a conversion targets: the modules a selection matches, and the
structural obstacles (hooks, shared weights, a parent reading ``.weight``, subclasses,
meta tensors, fused experts) that keep a matched module as it is."""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from .adaptive import AdaptiveLowRankLinear
from .common import InputError
from .dynamic import DynamicLowRankLinear
from .linear import LowRankLinear
from .linears import as_linear, is_conv1d, is_linear_like
from .readers import weight_reader_policy
from .selection import module_holders, name_matches, weight_owners

if TYPE_CHECKING:
    from .config import ConversionConfig

__all__ = [
    "LOWRANK_TYPES",
    "Selection",
    "convertible_layers",
    "fused_tensors",
    "is_embedding_name",
    "output_layer_name",
    "select_layers",
    "structural_reason",
    "warn_unmatched_exclude",
]

LOWRANK_TYPES = (LowRankLinear, AdaptiveLowRankLinear, DynamicLowRankLinear)

# module names treated as embeddings (kept unless embeddings=True)
_EMBEDDING_COMPONENT = re.compile(r"(.*embed.*|emb|.*_emb|wte|wpe|shared)")

Holders = dict[int, list[tuple[nn.Module, str, str]]]
Owners = dict[int, list[str]]


def is_embedding_name(module_name: str) -> bool:
    """Whether a module name looks like an embedding (``embed_tokens``, ``wte``, ``shared``,
    ...): such weights are kept unless a conversion's ``embeddings=True``."""
    return any(_EMBEDDING_COMPONENT.fullmatch(part) for part in module_name.split("."))


def _has_matrix(module: nn.Module) -> bool:
    """Whether the module holds a weight matrix of its own (Embedding, Conv, Linear...) or
    fused 3-D expert tensors."""
    weight = module._parameters.get("weight")
    return (weight is not None and weight.dim() >= 2) or bool(fused_tensors(module))


def fused_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """The 3-D parameters a module holds directly: the stacked per-expert matrices of a
    mixture of experts (transformers 5's ``MixtralExperts``, ``Qwen2MoeExperts``: one
    ``(experts, out, in)`` tensor per projection). Convolutions are not counted."""
    if isinstance(module, nn.modules.conv._ConvNd):
        return {}
    return {
        n: p
        for n, p in module._parameters.items()
        if p is not None and not isinstance(p, nn.parameter.UninitializedParameter) and p.dim() == 3
    }


def _is_plain_linear(module: nn.Module) -> bool:
    """An nn.Linear whose forward is nn.Linear's (subclasses that override it are not safe),
    or transformers' Conv1D."""
    if is_conv1d(module):
        return True
    return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward


# the attribute marking a meta parameter whose values are read from disk when its module
# runs, and the hooks that read them (lowrank_layers.offload): such a layer can be converted
ON_DISK = "lowrank_on_disk"


def _hooks_reason(module: nn.Module) -> str | None:
    """Why a module with hooks or parametrizations cannot be replaced, or None.

    A replacement would silently drop them: a forward hook that logs or edits outputs, a
    ``weight_norm``/``spectral_norm`` parametrization (or the older hook-based versions),
    ``torch.nn.utils.prune``'s mask. The user removes them and, if wanted, registers them
    on the new layer.
    """
    if torch.nn.utils.parametrize.is_parametrized(module):
        names = ", ".join(sorted(module.parametrizations.keys()))  # type: ignore[union-attr]
        return (
            f"its {names} is parametrized (weight_norm, spectral_norm, ...), which a "
            "low-rank layer would drop: remove the parametrization first "
            "(torch.nn.utils.parametrize.remove_parametrizations)"
        )
    kinds = {
        "forward pre-hook": module._forward_pre_hooks,
        "forward hook": module._forward_hooks,
        "backward hook": module._backward_hooks,
        "backward pre-hook": module._backward_pre_hooks,
        "state-dict hook": module._state_dict_hooks,
        "load-state-dict pre-hook": module._load_state_dict_pre_hooks,
    }
    found = []
    for kind, hooks in kinds.items():
        for hook in hooks.values():
            if isinstance(hook, tuple):  # (hook, with_module) in older state-dict hooks
                hook = hook[0]
            if getattr(hook, ON_DISK, False):  # reads the weights from disk: not the layer's
                continue
            what = getattr(hook, "__qualname__", None) or type(hook).__name__
            found.append(f"{kind} {what}")
    if found:
        return (
            f"it has {', '.join(found)}, which a low-rank layer would drop: remove them "
            "(handle.remove()) before converting and register them on the new layer"
        )
    return None


def structural_reason(
    fqn: str,
    module: nn.Module,
    holders: dict[int, list[tuple[nn.Module, str, str]]],
    owners: dict[int, list[str]],
) -> str | None:
    """Why a matched module cannot be converted whatever its rank, or None."""
    if isinstance(module, LOWRANK_TYPES):
        return f"already a {type(module).__name__}"
    fused = fused_tensors(module)
    if fused:
        shapes = ", ".join(f"{n} {'x'.join(map(str, p.shape))}" for n, p in fused.items())
        return f"fused 3-D expert tensors ({shapes}) are not converted"
    if not _is_plain_linear(module):
        if isinstance(module, nn.Linear):
            return f"{type(module).__name__} overrides nn.Linear.forward"
        return f"cannot convert a {type(module).__name__}"
    if isinstance(module.weight, nn.parameter.UninitializedParameter):
        return (
            f"the {type(module).__name__}'s weight is not initialised yet: run one forward "
            "pass first"
        )
    reason = _hooks_reason(module)
    if reason is not None:
        return reason
    for parent, child_name, _ in holders.get(id(module), []):
        read = weight_reader_policy(parent, child_name)
        if read is not None and read.policy == "skip":
            return read.reason
    sharers = [o for o in owners.get(id(module.weight), []) if o != fqn]
    sharers = [o for o in sharers if all(o != h[2] for h in holders.get(id(module), []))]
    if sharers:
        return f"weight shared with {', '.join(sorted(sharers))}"
    if module.weight.device.type == "meta" and not getattr(module.weight, ON_DISK, False):
        return "weight is on the meta device (load it first)"
    return None


def _candidates(model: nn.Module, config: ConversionConfig) -> list[tuple[str, nn.Module]]:
    """The matched modules, in ``named_modules`` order; a ValueError when none matched."""
    filter_fn = config.filter_fn

    def selected(fqn: str, module: nn.Module) -> bool:
        linear_like = (
            is_linear_like(module)
            or isinstance(module, LOWRANK_TYPES)
            or bool(fused_tensors(module))
        )
        if not linear_like and (
            (config.include is None and filter_fn is None) or not _has_matrix(module)
        ):
            return False
        if not config.selects(fqn):
            return False
        return filter_fn is None or bool(filter_fn(module, fqn))

    candidates = [(fqn, m) for fqn, m in model.named_modules() if fqn and selected(fqn, m)]
    if not candidates and (is_linear_like(model) or isinstance(model, LOWRANK_TYPES)):
        raise InputError(
            f"convert_model replaces the layers inside model, and model is itself a "
            f"{type(model).__name__}: the root module cannot be replaced in place. Convert "
            "one layer with LowRankLinear.from_linear(layer, ...), or wrap it: "
            "convert_model(nn.Sequential(layer), ...)"
        )
    if not candidates:
        raise InputError(
            f"convert_model: no module of {type(model).__name__} matched "
            f"(include={config.include!r}, exclude={config.exclude!r}, "
            f"filter_fn={getattr(filter_fn, '__name__', filter_fn)!r})"
        )
    return candidates


@dataclass
class Selection:
    """The layers a conversion of one model targets.

    Attributes:
        candidates: the matched modules ``(name, module)``, in ``named_modules`` order.
        holders: for each module (by ``id``), every ``(parent, attribute, name)`` holding it.
        owners: for each weight (by ``id``), the names of the modules holding it.
        eligible: the matched modules free of structural obstacles, ``{name: module}``.
        views: each eligible module read as an ``nn.Linear`` (a ``Conv1D`` transposed).
        kept: matched layers the config keeps as they are, with the reason (a name like an
            embedding's, without ``embeddings=True``).
        output_layer: the name of the model's last ``nn.Linear``-like module (in
            ``named_modules`` order), which the guard treats as its output layer; None when
            it has none.
    """

    candidates: list[tuple[str, nn.Module]]
    holders: Holders
    owners: Owners
    eligible: dict[str, nn.Module]
    views: dict[str, nn.Linear] = field(default_factory=dict)
    kept: dict[str, str] = field(default_factory=dict)
    output_layer: str | None = None


def output_layer_name(model: nn.Module) -> str | None:
    """The name of ``model``'s last ``nn.Linear``-like module (a low-rank layer of this
    library included), in ``named_modules`` order: its output head when it ends in one, the
    rule transformers' quantizers also use to keep the head. None when it has none."""
    last = None
    for name, module in model.named_modules():
        if name and (is_linear_like(module) or isinstance(module, LOWRANK_TYPES)):
            last = name
    return last


def warn_unmatched_exclude(names: Iterable[str], exclude: str | Iterable[str] | None) -> None:
    """A ``UserWarning`` naming each ``exclude`` pattern that matches none of ``names`` (a
    likely typo, or a layer the model does not have: it excludes nothing): each entry of a
    list on its own, a regex as a whole."""
    if exclude is None:
        return
    names = list(names)
    if isinstance(exclude, str):
        unmatched = [] if any(name_matches(n, exclude) for n in names) else [exclude]
        rule = "a regex must match a whole dotted name"
    else:
        unmatched = [p for p in exclude if not any(name_matches(n, [p]) for n in names)]
        rule = "a list holds exact names or dotted suffixes"
    if unmatched:
        warnings.warn(
            f"exclude {', '.join(map(repr, unmatched))} matches no module, so it excludes "
            f"nothing ({rule}); check the spelling against the model's module names",
            UserWarning,
            stacklevel=4,
        )


def select_layers(model: nn.Module, config: ConversionConfig, *, warn: bool = True) -> Selection:
    """The modules ``config`` matches in ``model``, and those free of structural obstacles;
    with ``warn``, a ``UserWarning`` for each ``exclude`` pattern that matches no module."""
    if warn:
        warn_unmatched_exclude((n for n, _ in model.named_modules() if n), config.exclude)
    candidates = _candidates(model, config)
    holders = module_holders(model)
    owners = weight_owners(model)
    eligible = {
        fqn: m for fqn, m in candidates if structural_reason(fqn, m, holders, owners) is None
    }
    kept = {
        fqn: f"named like an embedding ({fqn}): kept unless embeddings=True"
        for fqn in eligible
        if config.keeps_embedding(fqn)
    }
    eligible = {fqn: m for fqn, m in eligible.items() if fqn not in kept}
    views = {fqn: as_linear(m) for fqn, m in eligible.items()}
    return Selection(candidates, holders, owners, eligible, views, kept, output_layer_name(model))


def convertible_layers(model: nn.Module, config: ConversionConfig) -> dict[str, nn.Linear]:
    """The layers :func:`~lowrank_layers.convert_model` would factorize with ``config``'s
    selection: matched, and free of structural obstacles (tied or shared weights, a parent
    reading ``.weight``, subclasses, meta tensors). Sizes and ranks are not checked here."""
    return select_layers(model, config, warn=False).eligible  # type: ignore[return-value]
