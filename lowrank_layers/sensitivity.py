"""One gradient pass over calibration data: each layer's input and output-gradient second
moments, from which :mod:`~lowrank_layers.allocate` estimates what truncating the layer
costs the model's output (K-FAC: ``½·tr(G·ΔW·C·ΔWᵀ)``).

The gradients need no labels: ``"kl"`` samples each token's target from the model's own
prediction (its expected outer product is the Fisher of the KL to the original model);
``"mse"`` backpropagates a random Gaussian probe of the output (the Gauss-Newton matrix of
the squared error of hidden states), for encoders.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .blocks import has_logits, main_output
from .calibrate import InputCache, linear_modules, padding_mask, run_batch, token_rows
from .common import InputError, check_choice, restored_flags

__all__ = ["OBJECTIVES", "Sensitivity", "collect_sensitivity"]

OBJECTIVES: tuple[str, ...] = ("auto", "kl", "mse")


@dataclass
class Sensitivity:
    """One layer's second moments from a gradient pass (float64 means over tokens).

    Attributes:
        input_cov: ``E[x xᵀ]``, ``(in, in)``.
        grad_cov: ``E[g gᵀ]`` of the gradients at the layer's output, ``(out, out)``.
        tokens: how many tokens were averaged.
    """

    input_cov: torch.Tensor
    grad_cov: torch.Tensor
    tokens: int


def collect_sensitivity(
    model: nn.Module,
    batches: Sequence[Any],
    modules: Mapping[str, nn.Module] | None = None,
    *,
    objective: str = "auto",
    grad_tokens: int = 512,
    seed: int = 0,
) -> dict[str, Sensitivity]:
    """One forward and backward pass per batch: each layer's ``E[x xᵀ]`` and ``E[g gᵀ]``.

    The model runs in eval mode (modes restored afterwards); no parameter's ``.grad`` is
    touched. Tokens under a batch's ``attention_mask == 0`` are left out.

    Args:
        model: the model (a ``.logits`` output for ``"kl"``).
        batches: batches the model takes (see :func:`~lowrank_layers.calibrate.run_batch`).
        modules: ``{name: nn.Linear}`` to observe; None: every ``nn.Linear`` below the root.
        objective: ``"kl"`` (targets sampled from the model's own prediction), ``"mse"``
            (a Gaussian probe of the main output) or ``"auto"`` (``"kl"`` when the output
            has ``logits``).
        grad_tokens: at most this many tokens per batch (a seeded random subset, the same
            for every layer) enter ``E[g gᵀ]``: its ``out x out`` Gram matrices cost more
            than the backward pass itself, and tokens of one sequence carry correlated
            gradients. ``E[x xᵀ]`` uses every token.
        seed: seeds the sampled targets or probes and the token subset.

    Returns:
        ``{name: Sensitivity}`` for every layer some token reached.

    Raises:
        ValueError: an unknown objective, no modules, no batches, or no token at all.
    """
    check_choice("objective", objective, OBJECTIVES)
    if modules is None:
        modules = linear_modules(model)
    if not modules:
        raise InputError("collect_sensitivity: no module to observe (modules is empty)")
    if len(batches) == 0:
        raise InputError("collect_sensitivity: batches is empty")
    gradient_pass = _GradientPass(objective, grad_tokens, torch.Generator().manual_seed(seed))
    weights = [
        m.weight for m in modules.values() if isinstance(getattr(m, "weight", None), nn.Parameter)
    ]
    handles = [m.register_forward_hook(gradient_pass.hook_for(n)) for n, m in modules.items()]
    try:
        with restored_flags(model.modules(), weights):
            model.eval()
            for p in weights:
                p.requires_grad_(True)
            for batch in batches:
                gradient_pass.run(model, batch)
    finally:
        gradient_pass.clear()
        for h in handles:
            h.remove()
    return gradient_pass.result(modules)


class _Moments:
    """Per-layer running sums of float64 Gram matrices, and the tokens they summed."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}

    def add(self, name: str, gram: torch.Tensor, tokens: int) -> None:
        if name in self.sums:
            self.sums[name] += gram
        else:  # a copy: a cached Gram matrix is shared by the layers reading one input
            self.sums[name] = gram.clone()
        self.tokens[name] = self.tokens.get(name, 0) + tokens

    def mean(self, name: str) -> torch.Tensor:
        return self.sums[name] / self.tokens[name]


class _GradientPass:
    """The forward hooks and per-batch gradient pass of :func:`collect_sensitivity`."""

    def __init__(self, objective: str, grad_tokens: int, gen: torch.Generator) -> None:
        self.objective = objective
        self.grad_tokens = grad_tokens
        self.gen = gen
        self.inputs = _Moments()  # Σ x xᵀ
        self.grads = _Moments()  # Σ g gᵀ
        self.outputs: list[tuple[str, torch.Tensor]] = []  # this batch's layer outputs
        self.mask: torch.Tensor | None = None  # this batch's attention_mask
        self.cache = InputCache()  # q/k/v share one GEMM

    def _input_gram(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        rows = token_rows(x, self.mask)
        return (rows.mT @ rows).to(torch.float64), rows.shape[0]

    def hook_for(self, name: str) -> Callable[[nn.Module, tuple, torch.Tensor], None]:
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            self.inputs.add(name, *self.cache.get(args[0], self._input_gram))
            if out.requires_grad:
                self.outputs.append((name, out))

        return hook

    def run(self, model: nn.Module, batch: Any) -> None:
        """One forward and backward pass: the layers' input and output-gradient moments."""
        self.mask = padding_mask(batch)
        self.clear()
        with torch.enable_grad():
            out = run_batch(model, batch)
            loss = _probe_loss(out, self.objective, self.mask, self.gen)
            if not self.outputs:
                return
            grads = torch.autograd.grad(loss, [o for _, o in self.outputs], allow_unused=True)
        pick = None
        for (name, _), g in zip(self.outputs, grads, strict=True):
            if g is None:
                continue
            g = token_rows(g, self.mask)
            if pick is None:  # the same tokens for every layer of this batch
                n = g.shape[0]
                pick = torch.randperm(n, generator=self.gen)[: min(n, self.grad_tokens)]
                pick = pick.sort().values
            g = g[pick.to(g.device)] if pick.numel() < g.shape[0] else g
            self.grads.add(name, (g.mT @ g).to(torch.float64), g.shape[0])
        self.clear()

    def clear(self) -> None:
        self.outputs.clear()
        self.cache.clear()

    def result(self, modules: Mapping[str, nn.Module]) -> dict[str, Sensitivity]:
        """``{name: Sensitivity}`` of the layers some token reached with a gradient."""
        result = {
            n: Sensitivity(self.inputs.mean(n), self.grads.mean(n), self.inputs.tokens[n])
            for n in modules
            if self.inputs.tokens.get(n) and n in self.grads.sums
        }
        if not result:
            raise InputError(
                "collect_sensitivity: no token reached the layers with a gradient (all tokens "
                "masked, or the output does not depend on them)"
            )
        return result


def _probe_loss(
    outputs: Any, objective: str, mask: torch.Tensor | None, gen: torch.Generator
) -> torch.Tensor:
    """The scalar whose gradients sample the output's Fisher / Gauss-Newton matrix."""
    if objective == "auto":
        objective = "kl" if has_logits(outputs) else "mse"
    y = main_output(outputs)
    keep = None
    if mask is not None and y.shape[:-1] == mask.shape:
        keep = mask.to(device=y.device, dtype=y.dtype)
    if objective == "kl":
        logp = torch.log_softmax(y.float(), dim=-1)
        with torch.no_grad():  # inverse-CDF sampling: far faster than torch.multinomial
            cdf = logp.detach().exp().reshape(-1, logp.shape[-1]).cumsum(-1).cpu()
            u = torch.rand(cdf.shape[0], 1, generator=gen, dtype=cdf.dtype) * cdf[:, -1:]
            target = torch.searchsorted(cdf, u).clamp_max(cdf.shape[-1] - 1)
            target = target.reshape(logp.shape[:-1])
        nll = -logp.gather(-1, target.to(logp.device)[..., None])[..., 0]
        return (nll * keep).sum() if keep is not None else nll.sum()
    z = torch.randn(y.shape, generator=gen, dtype=torch.float32).to(y.device, y.dtype)
    prod = (y * z).sum(-1)
    return (prod * keep).sum() if keep is not None else prod.sum()
