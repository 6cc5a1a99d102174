"""What counts as a linear layer: ``nn.Linear``, and transformers' ``Conv1D``.

GPT-2, GPT (openai-gpt) and a few other transformers models compute their projections with
``transformers.pytorch_utils.Conv1D``: ``y = x @ weight + bias`` with ``weight`` stored
``(in, out)``, the transpose of ``nn.Linear``'s. The conversion code reads every layer
through :func:`as_linear`, which gives an ``nn.Linear`` view of either kind (the same
storage, no copy), so the orientation is handled in one place. transformers is not
imported: the class is recognised by its name and module.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["as_linear", "features", "is_conv1d", "is_linear_like", "linear_weight"]


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is transformers' ``Conv1D`` itself (not a subclass, whose forward
    could differ)."""
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers.")


def is_linear_like(module: nn.Module) -> bool:
    """An ``nn.Linear`` (or subclass) or a transformers ``Conv1D``."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def features(module: nn.Module) -> tuple[int, int] | None:
    """``(in_features, out_features)`` of an ``nn.Linear``-like module or a ``Conv1D`` (whose
    weight is stored ``(in, out)``); None for a module that has no such sizes."""
    if is_conv1d(module):
        in_f, out_f = module.weight.shape
        return in_f, out_f
    in_f, out_f = getattr(module, "in_features", None), getattr(module, "out_features", None)
    return None if in_f is None or out_f is None else (in_f, out_f)


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The ``(out, in)`` weight of an ``nn.Linear`` or a ``Conv1D`` (a transposed view)."""
    return module.weight.t() if is_conv1d(module) else module.weight


def as_linear(module: nn.Module) -> nn.Linear:
    """``module`` itself for an ``nn.Linear``; for a ``Conv1D``, an ``nn.Linear`` of the
    same function whose weight is a transposed view of the Conv1D's (no copy).

    The view is for reading (factorizing, converting): its parameters are new Parameter
    objects over the same storage, so an optimizer holding the Conv1D's does not see them.
    """
    if not is_conv1d(module):
        return module  # type: ignore[return-value]
    nx, nf = module.weight.shape
    view = nn.Linear(nx, nf, bias=module.bias is not None, device="meta")
    view.weight = nn.Parameter(
        module.weight.detach().t(), requires_grad=module.weight.requires_grad
    )
    if module.bias is not None:
        view.bias = nn.Parameter(module.bias.detach(), requires_grad=module.bias.requires_grad)
    view.train(module.training)
    return view
