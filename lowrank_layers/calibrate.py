"""Input statistics for activation-aware conversion: ``collect_input_stats``.

For each selected ``nn.Linear``, forward pre-hooks accumulate the second moment of its
inputs, ``C = E[x xᵀ]`` over every token of every calibration batch. ``factorize(...,
input_cov=C)`` then minimises the layer's output error on such inputs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from einops import rearrange
from torch import nn

__all__ = ["InputStats", "collect_input_stats", "run_batch"]


@dataclass
class InputStats:
    """Accumulated input statistics of one layer.

    Attributes:
        gram: ``Σ x xᵀ`` over all tokens, float64, ``(in, in)``.
        tokens: how many input vectors were summed.
    """

    gram: torch.Tensor
    tokens: int = 0

    @property
    def covariance(self) -> torch.Tensor:
        """``E[x xᵀ]``, float64 (the second moment, not centred: a Linear sees the mean too)."""
        if self.tokens == 0:
            raise ValueError("no calibration input reached this layer")
        return self.gram / self.tokens


def run_batch(model: nn.Module, batch: Any) -> Any:
    """Feed one calibration batch: ``model(**b)`` for a mapping, ``model(*b)`` for a tuple
    or list, ``model(b)`` otherwise."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def collect_input_stats(
    model: nn.Module, batches: Iterable[Any], modules: Mapping[str, nn.Module]
) -> dict[str, InputStats]:
    """Run ``batches`` through ``model`` (no grad) and accumulate each module's ``Σ x xᵀ``.

    Per batch, the Gram matrix of a layer's flattened inputs is one GEMM in the input's
    precision (float32 for half-precision inputs) over all tokens, added to a float64
    accumulator: float32 rounding stays within one batch, and long runs do not drift.
    Modules fed the same tensor (attention's q/k/v projections, an MLP's gate and up
    projections) share one GEMM. The hooks are removed afterwards, also when a batch raises.

    Args:
        model: the model to run.
        batches: an iterable of batches (see :func:`run_batch`).
        modules: ``{name: module}`` of the layers to observe (``nn.Linear`` or any module
            whose input's last dimension is its ``in_features``).

    Returns:
        ``{name: InputStats}``.

    Raises:
        ValueError: ``modules`` is empty, or no batch was given.
    """
    if not modules:
        raise ValueError("collect_input_stats: modules is empty")
    stats: dict[str, InputStats] = {}
    # the last input seen and its Gram matrix; holding the tensor keeps its memory from
    # being reused by another tensor while it is cached
    cache: dict[str, Any] = {}
    handles = []

    def hook_for(name: str, module: nn.Module):
        def hook(mod: nn.Module, args: tuple) -> None:
            x = args[0]
            if cache.get("input") is x and cache.get("version") == x._version:
                gram = cache["gram"]
            else:
                flat = rearrange(x.detach(), "... d -> (...) d")
                if flat.dtype not in (torch.float32, torch.float64):
                    flat = flat.float()
                gram = (flat.mT @ flat).to(torch.float64)
                cache.update(input=x, version=x._version, gram=gram)
            entry = stats.get(name)
            if entry is None:
                n = gram.shape[0]
                entry = stats[name] = InputStats(torch.zeros(n, n, dtype=torch.float64))
            entry.gram += gram.to(entry.gram.device)
            entry.tokens += x.numel() // x.shape[-1]

        return hook

    try:
        for name, module in modules.items():
            handles.append(module.register_forward_pre_hook(hook_for(name, module)))
        seen = 0
        with torch.no_grad():
            for batch in batches:
                run_batch(model, batch)
                cache.clear()
                seen += 1
        if seen == 0:
            raise ValueError("collect_input_stats: batches is empty")
    finally:
        for handle in handles:
            handle.remove()
        cache.clear()
    return stats
