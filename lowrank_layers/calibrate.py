"""Input statistics for activation-aware conversion: ``collect_input_stats``.

For each selected ``nn.Linear``, forward pre-hooks accumulate the second moment of its
inputs, ``C = E[x xᵀ]`` over every token of every calibration batch (padding, marked by
a batch's ``attention_mask``, left out). ``factorize(..., input_cov=C)`` then minimises the
layer's output error on such inputs.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from einops import rearrange
from torch import nn

from .common import InputError, InputTypeError, restored_flags
from .linears import is_linear_like

__all__ = [
    "InputCache",
    "InputStats",
    "batch_tokens",
    "check_batches",
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
    """Feed one batch to ``model``: ``model(**b)`` for a mapping, ``model(*b)`` for a tuple
    or list, ``model(b)`` otherwise. A mapping gets ``use_cache=False`` when the model's
    forward takes ``use_cache`` and the batch does not set it: a key/value cache filled by
    calibration (or by a block re-run) would only grow. Every part of the package that
    runs a model on a batch calls this."""
    if isinstance(batch, Mapping):
        return model(**_without_cache(model, batch))
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def _without_cache(model: nn.Module, batch: Mapping[str, Any]) -> Mapping[str, Any]:
    """``batch`` with ``use_cache=False`` added when the model's forward takes ``use_cache``
    and ``batch`` does not set it."""
    if "use_cache" in batch:
        return batch
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return batch
    return {**batch, "use_cache": False} if "use_cache" in params else batch


def batch_tokens(batch: Any) -> int:
    """Tokens in one batch: its unmasked ``attention_mask`` entries, else the leading
    dimensions of its first tensor (``input_ids``: batch x length; features: all but the
    last dimension); 1 for a batch without a tensor or with a 0-d one."""
    if isinstance(batch, Mapping):
        mask = batch.get("attention_mask")
        if isinstance(mask, torch.Tensor):
            return int(mask.sum())
        batch = next((v for v in batch.values() if isinstance(v, torch.Tensor)), None)
    elif isinstance(batch, (tuple, list)):
        batch = next((v for v in batch if isinstance(v, torch.Tensor)), None)
    if not isinstance(batch, torch.Tensor) or batch.dim() == 0:
        return 1
    if batch.is_floating_point():
        return batch.numel() // max(1, batch.shape[-1])
    return batch.numel()


T = TypeVar("T")


class InputCache:
    """A value computed from the last input tensor seen, reused while the same tensor comes
    again unchanged (the same object at the same ``_version``): layers fed one tensor
    (attention's q/k/v projections, an MLP's gate and up projections) share one GEMM.
    Holding the tensor keeps its memory from being reused by another while it is cached;
    :meth:`clear` after each batch."""

    def __init__(self) -> None:
        self._input: torch.Tensor | None = None
        self._version = -1
        self._value: Any = None

    def get(self, x: torch.Tensor, compute: Callable[[torch.Tensor], T]) -> T:
        """``compute(x)``, or its cached value when ``x`` is the last input, unchanged."""
        if self._input is not x or self._version != x._version:
            self._value = compute(x)
            self._input, self._version = x, x._version
        return self._value

    def clear(self) -> None:
        self._input = self._value = None
        self._version = -1


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


def check_batches(value: Any, name: str = "calibration", *, hint: str = "") -> None:
    """Refuse what looks like calibration data but is not a list of batches, with one line
    naming ``name``: a bare string, a list of strings (tokenize them with
    :func:`~lowrank_layers.text.text_batches`), and one batch or tokenizer output (a
    mapping). ``hint`` is appended to the mapping's message. None passes."""
    fix = "tokenize text first: text_batches(tokenizer, texts) from lowrank_layers.text"
    if isinstance(value, (str, bytes)):
        raise InputTypeError(
            f"{name} takes a list of batches the model runs on, got a {type(value).__name__}; {fix}"
        )
    if isinstance(value, Mapping):
        raise InputTypeError(
            f"{name} takes an iterable of batches, got a mapping with keys {list(value)[:4]}: "
            f"one batch goes in a list, {name}=[batch]{hint}"
        )
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], (str, bytes)):
        raise InputTypeError(
            f"{name} takes a list of batches the model runs on, got a {type(value).__name__} "
            f"of {type(value[0]).__name__}; {fix}"
        )


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
    modules = _observed_modules(model, modules)
    collector = _GramCollector()
    handles = []
    with restored_flags(model.modules()):
        try:
            for name, module in modules.items():
                handles.append(module.register_forward_pre_hook(collector.hook_for(name)))
            model.eval()
            seen, masked = collector.run(model, batches)
            _check_tokens(collector.stats, seen, masked)
        finally:
            for handle in handles:
                handle.remove()
            collector.cache.clear()
    _warn_unmatched(list(collector.unmatched))
    _warn_few_tokens(collector.stats)
    return collector.stats


def _observed_modules(
    model: nn.Module, modules: Mapping[str, nn.Module] | None
) -> Mapping[str, nn.Module]:
    """:func:`collect_input_stats`'s ``modules``, checked; every ``nn.Linear`` for None."""
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
    return modules


class _GramCollector:
    """The forward pre-hooks of :func:`collect_input_stats`: each layer's ``Σ x xᵀ`` over
    the tokens the current batch's ``attention_mask`` keeps."""

    def __init__(self) -> None:
        self.stats: dict[str, InputStats] = {}
        self.unmatched: dict[str, None] = {}  # layers whose inputs could not be masked, in order
        self.mask: torch.Tensor | None = None  # the current batch's attention_mask
        self.cache = InputCache()

    def _gram(self, x: torch.Tensor) -> tuple[torch.Tensor, int, bool]:
        matched = self.mask is None or mask_fits(x, self.mask)
        flat = token_rows(x, self.mask)
        return (flat.mT @ flat).to(torch.float64), flat.shape[0], matched

    def hook_for(self, name: str) -> Callable[[nn.Module, tuple], None]:
        def hook(mod: nn.Module, args: tuple) -> None:
            gram, count, matched = self.cache.get(args[0], self._gram)
            if not matched:
                self.unmatched[name] = None
            entry = self.stats.get(name)
            if entry is None:
                n = gram.shape[0]
                entry = self.stats[name] = InputStats(
                    torch.zeros(n, n, dtype=torch.float64, device=gram.device)
                )
            entry.gram += gram.to(entry.gram.device)
            entry.tokens += count

        return hook

    def run(self, model: nn.Module, batches: Iterable[Any]) -> tuple[int, int]:
        """Run every batch (no grad); how many ran, and how many were all padding."""
        seen = masked = 0
        with torch.no_grad():
            for batch in batches:
                self.mask = mask = padding_mask(batch)
                masked += mask is not None and not bool(mask.any())
                run_batch(model, batch)
                self.cache.clear()
                seen += 1
        if seen == 0:
            raise InputError("collect_input_stats: batches is empty")
        return seen, masked


def _check_tokens(stats: Mapping[str, InputStats], seen: int, masked: int) -> None:
    """An error when the ``seen`` batches (``masked`` of them all padding) gave no token."""
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


def _warn_unmatched(names: list[str]) -> None:
    """Warn (for :func:`collect_input_stats`'s caller) that these layers' inputs could not
    be masked."""
    if names:
        warnings.warn(
            f"collect_input_stats: the inputs of {_count(len(names), 'layer', 'layers')} "
            f"({_some(names)}) do not match the batches' attention_mask in shape (neither "
            "(batch, tokens, features) nor (batch * tokens, features), e.g. tokens routed to "
            "experts); their statistics include padding",
            UserWarning,
            stacklevel=3,
        )


def _warn_few_tokens(stats: Mapping[str, InputStats]) -> None:
    """Warn (for :func:`collect_input_stats`'s caller) about layers that saw fewer tokens
    than inputs."""
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
            stacklevel=3,
        )
