"""``AdaptiveLowRankLinear``: trains dense, then switches to low rank in place."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .common import check_choice
from .factorize import BALANCE_MODES, Balance, Method, factorize, relative_error
from .layer_base import FactoredLinearBase, check_linear, copy_factors_, new_factor_params
from .linear import factored_linear, stored_factors
from .policy import RankPolicy, as_policy, factor_parameters

__all__ = ["AdaptiveLowRankLinear", "SwitchResult"]


@dataclass(frozen=True)
class SwitchResult:
    """What one ``switch_to_lowrank`` did.

    Attributes:
        rank: the rank chosen.
        relative_error: ``‖W − Ŵ‖_F / ‖W‖_F`` of the dense weight at the switch.
        params_before: parameters of the dense weight (bias excluded).
        params_after: parameters of the factors (bias excluded).
        balance: the balancing used.
    """

    rank: int
    relative_error: float
    params_before: int
    params_after: int
    balance: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def replace_parameters(module: nn.Module, new: dict[str, torch.Tensor | None]) -> None:
    """Replace ``module``'s parameters by ``new`` (``None`` registers an absent parameter).

    Parameters not in ``new`` are dropped, except ``bias``, which is re-registered last so
    that ``parameters()`` lists factors, then bias, as ``LowRankLinear`` does: an
    optimizer built from a restructured model sees the same order as one that was
    switched in place.
    """
    bias = module._parameters.get("bias")
    module._parameters.clear()
    for name, tensor in new.items():
        if tensor is None:
            module.register_parameter(name, None)
        else:
            param = tensor if isinstance(tensor, nn.Parameter) else nn.Parameter(tensor)
            module.register_parameter(name, param)
    module.register_parameter("bias", bias)


class AdaptiveLowRankLinear(FactoredLinearBase):
    r"""A linear layer that trains dense, then switches to low rank in place.

    In its dense phase it *is* ``nn.Linear``: parameters ``weight`` and ``bias``, the same
    initialisation, the same ``F.linear`` forward (bit-identical outputs), and it loads an
    ``nn.Linear`` state dict. :meth:`switch_to_lowrank` factorizes the weight with the
    layer's ``balance`` (default ``"none"``: the plain truncated SVD, the smallest weight
    error; ``"rowsum"`` is the original design's row-balanced, "DBC-normalized" SVD), frees
    the dense weight, and from then on the layer computes
    :func:`~lowrank_layers.linear.lowrank_linear` with parameters ``U``, ``S``, ``Vh``
    (``D`` only when balanced) and ``bias``, like :class:`~lowrank_layers.LowRankLinear`.

    Loading a state dict saved after the switch into a dense-phase layer (a fresh model
    resuming a run) restructures it to the saved rank; loading a dense state dict into a
    switched layer restructures it back to dense.

    To keep an optimizer in step, use the model-level
    :func:`~lowrank_layers.switch_to_lowrank`, which swaps the parameters inside the
    optimizer's param groups.

    Args:
        in_features, out_features, bias, device, dtype: as for ``nn.Linear``.
        rank, rank_ratio, energy, param_ratio: optional default rank policy for a later
            :meth:`switch_to_lowrank` called without one (at most one may be given).
        balance: default balancing for the switch: ``"none"`` (plain truncated SVD, the
            lowest error measured), ``"rowsum"`` (the original design's DBC normalisation,
            made safe) or ``"rownorm"``.

    Shape:
        - Input: ``(*, in_features)``
        - Output: ``(*, out_features)``

    Example:
        >>> layer = AdaptiveLowRankLinear(256, 128, rank_ratio=0.25)
        >>> out = layer(torch.randn(4, 256))              # dense phase
        >>> result = layer.switch_to_lowrank()            # uses the default policy
        >>> layer.is_lowrank, result.rank
        (True, 32)
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        policy: RankPolicy | None = None,
        *,
        bias: bool = True,
        rank: int | None = None,
        rank_ratio: float | None = None,
        energy: float | None = None,
        param_ratio: float | None = None,
        balance: Balance = "none",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features)
        policy = as_policy(policy, rank, rank_ratio, energy, param_ratio, required=False)
        if policy is not None:  # fits this shape: checked now, not at the switch epochs later
            policy.resolve(out_features, in_features, row_scales=balance != "none")
        check_choice("balance", balance, BALANCE_MODES)
        self.default_policy: RankPolicy | None = policy
        self.default_balance: str = balance
        kw = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **kw))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **kw))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.Linear``'s initialisation when dense; ``LowRankLinear``'s after the switch."""
        if self.is_lowrank:
            super().reset_parameters()
            return
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    @property
    def is_lowrank(self) -> bool:
        """``True`` once the layer holds factors instead of a dense weight."""
        # a parametrization (torch.nn.utils.parametrize) keeps U in self.parametrizations
        return "S" in self._parameters or "S" in getattr(self, "parametrizations", ())

    @property
    def rank(self) -> int | None:
        """The rank after the switch; ``None`` in the dense phase."""
        return self.S.shape[0] if self.is_lowrank else None

    @property
    def weight(self) -> torch.Tensor:
        """The dense ``weight`` Parameter before the switch; a lazy tensor after it.

        After the switch, as :attr:`LowRankLinear.weight
        <lowrank_layers.LowRankLinear.weight>`: metadata is free, computing with it forms
        the dense weight from the factors (counted in ``dense_weight_reads``, warned once).
        """
        weight = self._parameters.get("weight")
        if weight is not None:
            return weight
        if self.is_lowrank:
            return super().weight
        # registering: nn.Module.register_parameter asks hasattr(self, "weight") first
        raise AttributeError(f"'{type(self).__name__}' object has no attribute 'weight'")

    def _active_factors(
        self,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """All factors after the switch; before it there are none (``weight_factors()`` and
        ``factors()`` raise)."""
        if not self.is_lowrank:
            raise RuntimeError("the layer is still dense; call switch_to_lowrank first")
        return super()._active_factors()

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.is_lowrank:
            return factored_linear(input, *stored_factors(self))
        weight = self._parameters.get("weight")
        if weight is None:  # a parametrized weight (weight_norm, spectral_norm, ...)
            weight = self.weight
        return F.linear(input, weight, self.bias)

    def __prepare_scriptable__(self) -> nn.Module:
        """``torch.jit.script`` is not supported: the layer's parameters change at the switch."""
        phase = "after the switch" if self.is_lowrank else "in the dense phase"
        fix = (
            "LowRankLinear.from_factors(layer.factors(), bias=layer.bias)"
            if self.is_lowrank
            else "layer.to_linear()"
        )
        raise RuntimeError(
            f"torch.jit.script does not support AdaptiveLowRankLinear (its parameters change "
            f"at the switch to low rank). Replace it {phase} by {fix}, which can be "
            "scripted, or use torch.export.export, which supports it."
        )

    # ----------------------------------------------------------------------------------
    # the switch
    # ----------------------------------------------------------------------------------

    @torch.no_grad()
    def switch_to_lowrank(
        self,
        policy: RankPolicy | None = None,
        *,
        rank: int | None = None,
        rank_ratio: float | None = None,
        energy: float | None = None,
        param_ratio: float | None = None,
        method: Method = "svd",
        balance: Balance | None = None,
        generator: torch.Generator | None = None,
    ) -> SwitchResult:
        """Factorize the dense weight in place and free it.

        Without balancing (``balance="none"``, the default) the weight is truncated by SVD
        (``method="svd"``) or randomized SVD and there is no ``D``; with ``"rownorm"`` or
        ``"rowsum"``, ``W = diag(D)·W̃`` with ``D`` from
        :func:`~lowrank_layers.factorize.balance_rows` and ``W̃`` truncated. ``U``, ``S``,
        ``Vh`` (and ``D``) become new parameters (same device, dtype and ``requires_grad``
        as the weight), the weight is deleted. Exactly
        one rank policy (a :class:`~lowrank_layers.RankPolicy` or its keyword form), or none
        to use the one given at construction; ``balance=None`` uses the layer's.

        Returns:
            :class:`SwitchResult` with the rank and the relative weight error.

        Raises:
            RuntimeError: the layer is already low rank.
            ValueError: as :func:`~lowrank_layers.factorize`.
        """
        if self.is_lowrank:
            raise RuntimeError(
                f"switch_to_lowrank: the layer is already low rank (rank {self.rank})"
            )
        balance = self.default_balance if balance is None else balance
        policy = as_policy(policy, rank, rank_ratio, energy, param_ratio, required=False)
        policy = self.default_policy if policy is None else policy
        weight = self.weight
        factors = factorize(
            weight.detach(), policy, method=method, balance=balance, generator=generator
        )
        error = relative_error(weight, factors)
        self.restructure(factors.rank, row_scales=factors.D is not None)  # drops `weight`
        copy_factors_(self, factors, None)
        return SwitchResult(
            rank=factors.rank,
            relative_error=error,
            params_before=self.in_features * self.out_features,
            params_after=factor_parameters(
                self.out_features, self.in_features, factors.rank, row_scales=factors.D is not None
            ),
            balance=balance,
        )

    # ----------------------------------------------------------------------------------
    # conversions and loading
    # ----------------------------------------------------------------------------------

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        policy: RankPolicy | None = None,
        *,
        rank: int | None = None,
        rank_ratio: float | None = None,
        energy: float | None = None,
        param_ratio: float | None = None,
        balance: Balance = "none",
    ) -> AdaptiveLowRankLinear:
        """A dense-phase layer holding a copy of ``linear``'s weight and bias.

        Nothing is factorized now: the rank policy and ``balance`` are the defaults of a
        later :meth:`switch_to_lowrank`.

        Args:
            linear: the source ``nn.Linear``; not modified. The new layer has its device
                and dtype.
            policy: optional default :class:`~lowrank_layers.RankPolicy` for the switch,
            rank, rank_ratio, energy, param_ratio: or its keyword form (at most one).
            balance: default balancing for the switch: ``"none"`` (default), ``"rownorm"``
                or ``"rowsum"``.
        """
        w = check_linear(linear).weight
        layer = cls(
            linear.in_features,
            linear.out_features,
            policy,
            bias=linear.bias is not None,
            rank=rank,
            rank_ratio=rank_ratio,
            energy=energy,
            param_ratio=param_ratio,
            balance=balance,
            device="meta",
            dtype=w.dtype,
        ).to_empty(device=w.device)
        with torch.no_grad():
            layer.weight.copy_(w)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    def dense_weight(self) -> torch.Tensor:
        """The ``(out_features, in_features)`` weight (detached), in either phase."""
        if not self.is_lowrank:
            return self.weight.detach()
        return super().dense_weight()

    def restructure(self, rank: int, *, row_scales: bool) -> None:
        """Turn a dense-phase layer into an (uninitialised) low-rank one of this rank, with
        the dense weight's device, dtype and ``requires_grad``, for what fills the factors
        next (:meth:`switch_to_lowrank`, ``load_state_dict``, ``load_lowrank``)."""
        ref = self.weight
        new = new_factor_params(
            self.out_features,
            self.in_features,
            rank,
            row_scales=row_scales,
            requires_grad=ref.requires_grad,
            device=ref.device,
            dtype=ref.dtype,
        )
        replace_parameters(self, new)

    def _match_state_dict(self, state_dict: dict[str, Any], prefix: str) -> None:
        """A low-rank state dict restructures a dense-phase layer to its rank, a dense one
        a switched layer back to dense."""
        has_factors = prefix + "U" in state_dict and prefix + "S" in state_dict
        has_weight = prefix + "weight" in state_dict
        ref = next(t for t in self._parameters.values() if t is not None)
        kw = {"device": ref.device, "dtype": ref.dtype}
        grad = ref.requires_grad
        if has_factors and not has_weight and not self.is_lowrank:
            self.restructure(
                state_dict[prefix + "S"].shape[0], row_scales=prefix + "D" in state_dict
            )
        elif has_weight and not has_factors and self.is_lowrank:
            weight = nn.Parameter(torch.empty(self.out_features, self.in_features, **kw), grad)
            replace_parameters(self, {"weight": weight})

    def extra_repr(self) -> str:
        phase = f"rank={self.rank}" if self.is_lowrank else "dense"
        row_scales = f", row_scales={self.D is not None}" if self.is_lowrank else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, {phase}, "
            f"bias={self.bias is not None}{row_scales}"
        )
