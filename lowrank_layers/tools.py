"""Whole-model tools: see what low rank a model holds, merge it back to dense, lay it out
for decoding.

:func:`lowrank_summary` is the ``print_trainable_parameters`` of this library: kinds,
ranks and parameters of every low-rank layer, for example right after loading a
checkpoint. :func:`merge_to_dense` is peft's ``merge_and_unload``: every low-rank layer
becomes the ``nn.Linear`` its factors multiply out to, in place. :func:`inference_layout_`
stores float32 factors the way one-token decoding on CPU reads fastest.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .adaptive import AdaptiveLowRankLinear
from .common import (
    InputError,
    InputTypeError,
    check_module,
    parameter_count,
    weight_parameter_count,
)
from .dynamic import DynamicLowRankLinear, ParamSwap
from .linear import HALF_DTYPES
from .linears import is_linear_like
from .selection import module_holders
from .stale import retire
from .targets import LOWRANK_TYPES
from .training import apply_param_swaps, check_optimizer

__all__ = [
    "LayerSummary",
    "LowRankSummary",
    "inference_layout_",
    "lowrank_summary",
    "merge_to_dense",
]


@dataclass
class LayerSummary:
    """One low-rank layer of a model."""

    name: str
    kind: str
    in_features: int
    out_features: int
    rank: int | None  # None: an AdaptiveLowRankLinear still dense
    max_rank: int | None  # a DynamicLowRankLinear's stored rank; else equal to rank
    params: int  # the weight (or factor) parameters it holds, bias excluded
    dense_params: int  # in·out, what nn.Linear holds

    @property
    def lowrank(self) -> bool:
        return self.rank is not None


@dataclass
class LowRankSummary:
    """What :func:`lowrank_summary` found; ``str()`` is an aligned table."""

    layers: list[LayerSummary] = field(default_factory=list)
    dense_linears: int = 0  # plain nn.Linear / Conv1D layers left
    dense_linear_params: int = 0
    model_params: int = 0

    @property
    def kinds(self) -> dict[str, int]:
        """Layers per kind (``"AdaptiveLowRankLinear (dense)"`` for one not switched yet)."""
        return dict(Counter(_kind(x) for x in self.layers))

    @property
    def params(self) -> int:
        """Parameters held by the low-rank layers' weights or factors."""
        return sum(x.params for x in self.layers)

    @property
    def dense_params(self) -> int:
        """What the same layers would hold as ``nn.Linear`` weights."""
        return sum(x.dense_params for x in self.layers)

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": [asdict(x) for x in self.layers],
            "totals": {
                "kinds": self.kinds,
                "params": self.params,
                "dense_params": self.dense_params,
                "dense_linears": self.dense_linears,
                "dense_linear_params": self.dense_linear_params,
                "model_params": self.model_params,
            },
        }

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def __str__(self) -> str:
        header = ["layer", "kind", "in", "out", "rank", "max_rank", "params", "as Linear"]
        rows = [header]
        for x in self.layers:
            rows.append(
                [
                    x.name,
                    _kind(x),
                    str(x.in_features),
                    str(x.out_features),
                    "-" if x.rank is None else str(x.rank),
                    "-" if x.max_rank is None else str(x.max_rank),
                    f"{x.params:,}",
                    f"{x.dense_params:,}",
                ]
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]

        def fmt(row: Sequence[str]) -> str:
            return "  ".join(
                c.rjust(w) if i >= 2 else c.ljust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            ).rstrip()

        lines = [fmt(rows[0]), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows[1:]]
        kinds = ", ".join(f"{n} {k}" for k, n in self.kinds.items()) or "no low-rank layer"
        share = self.params / self.dense_params if self.dense_params else 0.0
        lines.append(
            f"{kinds}: {self.params:,} parameters where nn.Linear would hold "
            f"{self.dense_params:,} ({share:.1%}); {self.dense_linears} dense linear layers "
            f"({self.dense_linear_params:,} parameters) left; model {self.model_params:,}"
        )
        return "\n".join(lines)


def _kind(x: LayerSummary) -> str:
    return f"{x.kind} (dense)" if x.rank is None else x.kind


def lowrank_summary(model: nn.Module) -> LowRankSummary:
    """Kinds, ranks and parameters of every low-rank layer of ``model`` (the root too).

    A layer held at several places is listed once, under its first name. Works on any
    model: one without low-rank layers gives an empty table and its dense linear count.

    Example:
        >>> from lowrank_layers import LowRankLinear
        >>> s = lowrank_summary(nn.Sequential(LowRankLinear(64, 64, 8), nn.Linear(64, 4)))
        >>> s.kinds, s.params, s.dense_linears
        ({'LowRankLinear': 1}, 1032, 1)
    """
    check_module("model", model, "lowrank_summary(model)")
    summary = LowRankSummary(model_params=parameter_count(model))
    for name, module in model.named_modules():
        if isinstance(module, LOWRANK_TYPES):
            if isinstance(module, AdaptiveLowRankLinear) and not module.is_lowrank:
                rank = max_rank = None
            elif isinstance(module, DynamicLowRankLinear):
                rank, max_rank = module.rank, module.max_rank
            else:
                rank = max_rank = module.S.shape[0]
            summary.layers.append(
                LayerSummary(
                    name=name,
                    kind=type(module).__name__,
                    in_features=module.in_features,
                    out_features=module.out_features,
                    rank=rank,
                    max_rank=max_rank,
                    params=weight_parameter_count(module),
                    dense_params=module.in_features * module.out_features,
                )
            )
        elif is_linear_like(module):
            summary.dense_linears += 1
            summary.dense_linear_params += weight_parameter_count(module)
    return summary


@torch.no_grad()
def merge_to_dense(
    model: nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> dict[str, int | None]:
    """Replace every low-rank layer of ``model`` by the ``nn.Linear`` it computes, in place.

    The new weight is ``diag(D)·U·diag(S)·Vᵀ`` (at a dynamic layer's active rank), in the
    factors' dtype and device, with the bias copied; ``requires_grad`` and the training
    flag are kept. A layer held at several places is replaced by one ``nn.Linear`` at all
    of them. The merged layers' parameters are new objects: pass the ``optimizer``
    training ``model`` to have them take the factors' place in its param groups (same
    hyper-parameters; the factors' state dropped, the bias's kept), or build the optimizer
    after merging. An optimizer built before and not passed warns on its next ``step()``
    (:class:`~lowrank_layers.stale.StaleOptimizerWarning`).

    Returns:
        ``{name: the rank it had}`` (``None`` for an adaptive layer still dense).

    Raises:
        ValueError: the model holds no low-rank layer, or is one itself (use its
            ``to_linear()``).
    """
    check_module("model", model, "merge_to_dense(model)")
    if isinstance(model, LOWRANK_TYPES):
        raise InputError(
            f"merge_to_dense replaces layers inside model, and model is itself a "
            f"{type(model).__name__}: use model.to_linear()"
        )
    check_optimizer(optimizer)
    summary = {x.name: x.rank for x in lowrank_summary(model).layers}
    if not summary:
        raise InputError(
            f"merge_to_dense: {type(model).__name__} holds no low-rank layer "
            "(LowRankLinear, AdaptiveLowRankLinear or DynamicLowRankLinear)"
        )
    holders = module_holders(model)
    modules = dict(model.named_modules())
    for name in summary:
        layer = modules[name]
        dense = layer.to_linear()
        grad = any(p.requires_grad for n, p in layer.named_parameters() if n != "bias")
        dense.weight.requires_grad_(grad)
        if dense.bias is not None:
            dense.bias.requires_grad_(layer.bias.requires_grad)
        dense.train(layer.training)
        for parent, child_name, _ in holders[id(layer)]:
            setattr(parent, child_name, dense)
        _swap_merged(name, layer, dense, optimizer)
    return summary


def _swap_merged(
    name: str, layer: nn.Module, dense: nn.Linear, optimizer: torch.optim.Optimizer | None
) -> None:
    """Put ``dense``'s parameters in ``optimizer`` where ``layer``'s were (the weight at the
    first factor held; a dense-phase weight's state carried over, as the bias's) and retire
    ``layer``'s."""
    old = list(layer.named_parameters(recurse=False))
    if optimizer is not None:
        placed = False
        for n, p in old:
            carry = (slice(None),) if n in ("weight", "bias") else None  # same tensor
            new = (dense.bias,) if n == "bias" else () if placed else (dense.weight,)
            found = apply_param_swaps(optimizer, [ParamSwap(p, new, carry)])  # type: ignore[arg-type]
            placed = placed or (found > 0 and n != "bias")
    retire([(f"{name}.{n}", p) for n, p in old], by="merge_to_dense")


@torch.no_grad()
def inference_layout_(model: nn.Module, enabled: bool = True) -> int:
    """Lay float32 low-rank layers' ``U`` out in memory for decoding on CPU (opt-in).

    Every layer stores its factors as the weights of its two linear maps, ``Vh (r, in)``
    and ``U (out, r)``, both row-major like ``nn.Linear``'s weight: the layout oneDNN's
    bfloat16/float16 kernels and GPU kernels need, and the one FSDP2 accepts. At one or a
    few tokens per call in float32 (and float64), MKL reads the second product's weight
    faster stored transposed (``Uᵀ`` row by row, strides ``(1, out)``): a matrix-vector
    product over rows of ``r`` numbers is slower than one over columns of ``out``. This
    stores ``U`` so. In bfloat16 and float16 it changes nothing (the transposed ``U`` is
    2-9x slower there, measured). See docs/benchmarks.md, "LowRankLinear in inference", for the
    gain per shape.

    Shapes, values, names and outputs (to float rounding) are unchanged: only strides
    change, through ``param.data``, so optimizers, hooks and references to the parameters
    stay valid. Saving (:func:`~lowrank_layers.save_lowrank`, ``torch.save``, transformers'
    ``save_pretrained``) works as before. Casting the model afterwards (``.to(dtype)``)
    keeps the layout; call this again after a cast to half precision.

    Not for training under FSDP2: ``fully_shard`` refuses non-contiguous parameters; call
    ``inference_layout_(model, enabled=False)`` before it. Training otherwise works in
    either layout.

    Args:
        model: a model holding low-rank layers (any other module is left alone).
        enabled: ``False`` restores contiguous (row-major) factors.

    Returns:
        The number of layers whose factors were moved.

    Example:
        >>> from lowrank_layers import LowRankLinear
        >>> model = nn.Sequential(LowRankLinear(64, 32, 8))
        >>> inference_layout_(model)
        1
        >>> model[0].U.stride(), model[0].U.shape, model[0].Vh.stride()
        ((1, 32), torch.Size([32, 8]), (64, 1))
    """
    if not isinstance(model, nn.Module):
        raise InputTypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(enabled, bool):
        raise InputTypeError(f"enabled must be a bool, got {enabled!r}")
    moved = 0
    for module in model.modules():
        if not isinstance(module, LOWRANK_TYPES) or module._parameters.get("U") is None:
            continue
        changed = False
        for name in ("U", "Vh"):
            param = module._parameters[name]
            data = param.data
            if type(data) is not torch.Tensor or data.dim() != 2:  # DTensor shards and such
                continue
            transpose = enabled and name == "U" and data.dtype not in HALF_DTYPES
            new = data.mT.contiguous().mT if transpose else data.contiguous()
            if new.data_ptr() != data.data_ptr():
                param.data = new
                changed = True
        moved += changed
    return moved
