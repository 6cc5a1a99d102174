"""``GradientProjector``: the original design's low-rank gradient stabiliser, made cheap.

The original ("DBC-DAC") replaced every weight gradient by its low-rank approximation at
every step, an SVD per matrix per step that made training 25 times slower. As GaLore does,
this computes the subspace only every ``update_every`` steps (randomized SVD of the
gradient) and in between projects onto it, which costs two thin GEMMs per matrix.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .common import InputError, check_choice, check_int
from .factorize import METHODS, Method, factorize
from .policy import RankPolicy, as_policy, layer_seed
from .selection import check_patterns, name_matches

__all__ = ["GradientProjector"]


@dataclass
class _State:
    basis: torch.Tensor | None = None  # orthonormal (out, r) for left, (in, r) for right
    left: bool = True
    steps: int = 0
    refreshes: int = 0
    generator: torch.Generator = field(default_factory=torch.Generator)


class GradientProjector:
    """Project each selected 2-D weight gradient onto a low-rank subspace, refreshed periodically.

    For a gradient ``G`` (out × in), the basis ``P`` is the leading ``r`` singular vectors of
    the smaller side of ``G`` at a refresh step; every step the gradient becomes ``P·Pᵀ·G``
    (left, when ``out <= in``) or ``G·P·Pᵀ`` (right). Hooks run after the gradient is
    accumulated (``register_post_accumulate_grad_hook``), so the optimizer sees the
    projected gradient and nothing else changes. With gradient accumulation the hook runs
    once per backward: a refresh uses the partial sum of that backward, and the projection
    being linear, the accumulated result is the projection of the sum.

    Args:
        model: the model whose parameters are projected.
        policy: a :class:`~lowrank_layers.RankPolicy` per matrix, or its keyword form
        rank, rank_ratio, energy, param_ratio: (see :func:`~lowrank_layers.factorize`);
            ``energy`` picks the rank at each refresh.
        update_every: steps between refreshes of the subspace (GaLore uses 200).
        method: ``"randomized"`` (default) or ``"svd"`` for the refresh.
        include, exclude: parameter-name filters, as ``convert_model``'s (``"<module>.weight"``
            names; a regex must match the whole name).
        seed: seeds each matrix's randomized SVD (identical on every rank of a DDP job).

    Example:
        >>> model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
        >>> projector = GradientProjector(model, rank_ratio=0.25, update_every=10)
        >>> model(torch.randn(32, 64)).sum().backward()
        >>> int(torch.linalg.matrix_rank(model[0].weight.grad))
        16
        >>> projector.remove()
    """

    def __init__(
        self,
        model: nn.Module,
        policy: RankPolicy | None = None,
        *,
        rank: int | None = None,
        rank_ratio: float | None = None,
        energy: float | None = None,
        param_ratio: float | None = None,
        update_every: int = 200,
        method: Method = "randomized",
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        seed: int = 0,
    ) -> None:
        self.policy = as_policy(policy, rank, rank_ratio, energy, param_ratio)
        check_int("update_every", update_every)
        check_choice("method", method, METHODS)
        check_patterns("include", include)
        check_patterns("exclude", exclude)
        self.update_every = update_every
        self.method = method
        self.states: dict[str, _State] = {}
        self._handles: list[Any] = []
        for name, p in model.named_parameters():
            if p.dim() != 2 or not p.requires_grad or not p.is_floating_point():
                continue
            if include is not None and not name_matches(name, include):
                continue
            if exclude is not None and name_matches(name, exclude):
                continue
            state = _State(left=p.shape[0] <= p.shape[1])
            state.generator.manual_seed(layer_seed(seed, name))
            self.states[name] = state
            self._handles.append(p.register_post_accumulate_grad_hook(self._hook(name)))
        if not self.states:
            raise InputError(
                f"GradientProjector: no 2-D trainable parameter of {type(model).__name__} "
                f"matched (include={include!r}, exclude={exclude!r})"
            )

    def _hook(self, name: str) -> Callable[[torch.Tensor], None]:
        state = self.states[name]

        @torch.no_grad()
        def project(param: torch.Tensor) -> None:
            grad = param.grad
            if grad is None:
                return
            if state.basis is None or state.steps % self.update_every == 0:
                self._refresh(state, grad)
            state.steps += 1
            P = state.basis
            if P is None:  # nothing to project onto yet (an all-zero or non-finite gradient)
                return
            if state.left:
                grad.copy_(P @ (P.mT @ grad))
            else:
                grad.copy_((grad @ P) @ P.mT)

        return project

    def _refresh(self, state: _State, grad: torch.Tensor) -> None:
        policy = self.policy
        if policy.rank is not None and policy.rank > min(grad.shape):
            policy = RankPolicy(rank=min(grad.shape))
        if not bool(torch.isfinite(grad).all()):
            return  # keep the previous basis (or none: the step is left unprojected)
        if float(grad.abs().max()) == 0.0:
            return
        f = factorize(grad, policy, method=self.method, generator=state.generator)
        state.basis = (f.U if state.left else f.V).to(grad.dtype).contiguous()
        state.refreshes += 1

    @property
    def ranks(self) -> dict[str, int]:
        """The current rank of each projected parameter (0 before its first refresh)."""
        return {n: 0 if s.basis is None else s.basis.shape[1] for n, s in self.states.items()}

    def remove(self) -> None:
        """Remove the hooks: gradients are plain again."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
