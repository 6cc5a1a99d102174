"""Input statistics for activation-aware conversion: ``collect_input_stats``.

For each selected ``nn.Linear``, forward pre-hooks accumulate the second moment of its
inputs, ``C = E[x xᵀ]`` over every token of every calibration batch (padding, marked by
a batch's ``attention_mask``, left out). ``factorize(..., input_cov=C)`` then minimises the
layer's output error on such inputs.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from einops import rearrange
from torch import nn

from .common import InputError, InputTypeError
from .linears import is_linear_like

__all__ = [
    "InputStats",
    "collect_input_stats",
    "linear_modules",
    "mask_fits",
    "padding_mask",
    "run_batch",
    "token_rows",
]


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
            raise InputError("no calibration input reached this layer")
        return self.gram / self.tokens


def run_batch(model: nn.Module, batch: Any) -> Any:
    """Feed one calibration batch: ``model(**b)`` for a mapping, ``model(*b)`` for a tuple
    or list, ``model(b)`` otherwise."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def _some(names: list[str]) -> str:
    """The first three of ``names``, then ``...`` when there are more."""
    return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")


def _count(n: int, one: str, many: str) -> str:
    """``n`` with the noun in the right number: ``1 layer``, ``2 layers``."""
    return f"{n} {one if n == 1 else many}"


def linear_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every ``nn.Linear`` (and transformers ``Conv1D``) of ``model`` below the root, by
    qualified name."""
    return {name: m for name, m in model.named_modules() if name and is_linear_like(m)}


def padding_mask(batch: Any) -> torch.Tensor | None:
    """A mapping batch's ``attention_mask`` tensor (``0`` = padding); None when it has none
    or it masks nothing (so callers skip the token selection)."""
    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    if not isinstance(mask, torch.Tensor) or bool(mask.all()):
        return None
    return mask


def mask_fits(x: torch.Tensor, mask: torch.Tensor) -> bool:
    """Whether ``mask`` (batch, tokens) can select ``x``'s tokens: ``x``'s leading dimensions
    are the mask's shape, or ``x`` is 2-D with one row per mask entry (tokens flattened)."""
    return x.shape[:-1] == mask.shape or (x.dim() == 2 and x.shape[0] == mask.numel())


def token_rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``x``'s token vectors as rows (float32 or float64), those under ``mask == 0`` dropped
    when the mask fits ``x`` (:func:`mask_fits`); an input it does not fit is taken whole."""
    if mask is not None and mask_fits(x, mask):
        x = x[mask.reshape(x.shape[:-1]).to(device=x.device, dtype=torch.bool)]
    flat = rearrange(x.detach(), "... d -> (...) d")
    return flat if flat.dtype in (torch.float32, torch.float64) else flat.float()


def collect_input_stats(
    model: nn.Module,
    batches: Iterable[Any],
    modules: Mapping[str, nn.Module] | None = None,
) -> dict[str, InputStats]:
    """Run ``batches`` through ``model`` (no grad) and accumulate each module's ``Σ x xᵀ``.

    Per batch, the Gram matrix of a layer's flattened inputs is one GEMM in the input's
    precision (float32 for half-precision inputs) over all tokens, added to a float64
    accumulator: float32 rounding stays within one batch, and long runs do not drift.
    Modules fed the same tensor (attention's q/k/v projections, an MLP's gate and up
    projections) share one GEMM.

    The model runs in eval mode (no dropout); every submodule's own ``training`` flag is
    restored afterwards, and the hooks removed, also when a batch raises.

    Padding: when a batch is a mapping holding an ``attention_mask`` tensor of shape
    ``(batch, tokens)`` (``0`` = padding), tokens under ``0`` count neither in the Gram
    matrix nor in the token count. A layer's input is matched to the mask when its leading
    dimensions are the mask's shape, or when it is 2-D with one row per mask entry (the
    tokens flattened). An input that matches neither (tokens routed to an expert, a pooled
    first token) is taken whole, and one ``UserWarning`` names those layers: their
    statistics include padding.

    Args:
        model: the model to run.
        batches: an iterable of batches (see :func:`run_batch`).
        modules: ``{name: module}`` of the layers to observe (``nn.Linear`` or any module
            whose input's last dimension is its ``in_features``); ``None`` observes every
            ``nn.Linear`` of ``model`` (its ``named_modules()``, the root excluded).

    Returns:
        ``{name: InputStats}``; a layer that no batch reached has no entry. A layer that
        saw fewer tokens than its inputs gets a ``UserWarning`` (its statistics are
        rank-deficient).

    Raises:
        TypeError: ``modules`` is neither a mapping nor ``None``.
        ValueError: ``modules`` is empty (or, for ``None``, the model has no
            ``nn.Linear``), no batch was given, or the batches yielded no tokens (every
            token masked out by ``attention_mask``, or empty inputs).
    """
    if modules is None:
        modules = linear_modules(model)
        if not modules:
            raise InputError(
                "collect_input_stats: modules is empty (modules=None selects every "
                f"nn.Linear below the root of the model, and {type(model).__name__} has none)"
            )
    elif not isinstance(modules, Mapping):
        raise InputTypeError(
            "collect_input_stats: modules must be a mapping {name: module} or None, got "
            f"{type(modules).__name__}"
        )
    elif not modules:
        raise InputError("collect_input_stats: modules is empty")
    stats: dict[str, InputStats] = {}
    unmatched: dict[str, None] = {}  # layers whose inputs could not be masked, in order
    batch_mask: list[torch.Tensor | None] = [None]  # the current batch's attention_mask
    # the last input seen, its Gram matrix and token count; holding the tensor keeps its
    # memory from being reused by another tensor while it is cached
    cache: dict[str, Any] = {}
    handles = []

    def hook_for(name: str) -> Callable[[nn.Module, tuple], None]:
        def hook(mod: nn.Module, args: tuple) -> None:
            x = args[0]
            if cache.get("input") is x and cache.get("version") == x._version:
                gram, count, matched = cache["gram"], cache["tokens"], cache["matched"]
            else:
                mask = batch_mask[0]
                matched = mask is None or mask_fits(x, mask)
                flat = token_rows(x, mask)
                gram = (flat.mT @ flat).to(torch.float64)
                count = flat.shape[0]
                cache.update(input=x, version=x._version, gram=gram, tokens=count, matched=matched)
            if not matched:
                unmatched[name] = None
            entry = stats.get(name)
            if entry is None:
                n = gram.shape[0]
                entry = stats[name] = InputStats(torch.zeros(n, n, dtype=torch.float64))
            entry.gram += gram.to(entry.gram.device)
            entry.tokens += count

        return hook

    modes = {m: m.training for m in model.modules()}  # each submodule's own flag
    try:
        for name, module in modules.items():
            handles.append(module.register_forward_pre_hook(hook_for(name)))
        model.eval()
        seen = masked = 0
        with torch.no_grad():
            for batch in batches:
                mask = padding_mask(batch)
                batch_mask[0] = mask
                masked += mask is not None and not bool(mask.any())
                run_batch(model, batch)
                cache.clear()
                seen += 1
        if seen == 0:
            raise InputError("collect_input_stats: batches is empty")
        if all(s.tokens == 0 for s in stats.values()) and (stats or masked == seen):
            runs = _count(seen, "batch", "batches")
            if masked == seen:
                why = f"the attention_mask of every one of the {runs} is all zeros (all padding)"
            else:
                why = (
                    f"{runs} ran ({masked} with an all-zero attention_mask), but the observed "
                    "layers' inputs held no token"
                )
            raise InputError(
                f"collect_input_stats: the calibration batches yielded no tokens: {why}; "
                "calibrate on batches with unmasked tokens"
            )
    finally:
        for handle in handles:
            handle.remove()
        cache.clear()
        for m, training in modes.items():
            m.training = training
    if unmatched:
        names = list(unmatched)
        warnings.warn(
            f"collect_input_stats: the inputs of {_count(len(names), 'layer', 'layers')} "
            f"({_some(names)}) do not match the batches' attention_mask in shape (neither "
            "(batch, tokens, features) nor (batch * tokens, features), e.g. tokens routed to "
            "experts); their statistics include padding",
            UserWarning,
            stacklevel=2,
        )
    few = [(name, s) for name, s in stats.items() if s.tokens < s.gram.shape[0]]
    if few:
        detail = "; ".join(
            f"{name} saw {s.tokens} tokens, fewer than its {s.gram.shape[0]} inputs"
            for name, s in few[:3]
        )
        warnings.warn(
            f"collect_input_stats: {_count(len(few), 'layer', 'layers')} saw fewer tokens than "
            f"inputs ({detail}{'; ...' if len(few) > 3 else ''}); their statistics are "
            "rank-deficient: calibrate on more text",
            UserWarning,
            stacklevel=2,
        )
    return stats
