"""What the three low-rank layers share: the factor storage and ``FactoredLinearBase``.

:class:`~lowrank_layers.LowRankLinear`, :class:`~lowrank_layers.AdaptiveLowRankLinear`
(after its switch) and :class:`~lowrank_layers.DynamicLowRankLinear` hold the same
parameters, ``U (out, r)``, ``S (r,)``, ``Vh (r, in)``, ``D (out,)`` or None and ``bias``
(:data:`FACTOR_NAMES`, checkpoint format 2), and read, convert and load them the same
way. That shared part is here, once: the helpers that create, fill, initialise and
upgrade the factors, and the base class holding the members the layers have in common.
The forward (:func:`~lowrank_layers.linear.factored_linear`) is in ``linear.py``.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

from .common import InputError, InputTypeError
from .factorize import Factors
from .lazy_weight import lazy_weight
from .policy import RankPolicy

__all__ = [
    "FACTOR_NAMES",
    "FactoredLinearBase",
    "check_features",
    "check_linear",
    "copy_factors_",
    "dense_from_factors",
    "init_factors_",
    "make_linear",
    "new_factor_params",
    "policy_rank",
    "register_lowrank_params",
    "upgrade_state_dict_",
]

# the parameters a low-rank layer holds besides its bias (D may be None)
FACTOR_NAMES = ("U", "S", "Vh", "D")

Layer = TypeVar("Layer", bound="FactoredLinearBase")


def policy_rank(policy: RankPolicy, out_f: int, in_f: int, *, row_scales: bool) -> int:
    """The rank a policy gives a layer built without a weight (``energy`` needs one)."""
    rank = policy.resolve(out_f, in_f, row_scales=row_scales)
    if rank is None:
        raise InputError(
            f"{policy} needs a weight's spectrum; a layer built from its sizes takes rank=, "
            "rank_ratio= or param_ratio= (or use from_linear)"
        )
    return rank


def check_features(name: str, value: object) -> int:
    """Validate a layer size: a positive int."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{name} must be a positive int, got {value!r}")
    return value


def check_linear(linear: object) -> nn.Linear:
    """Validate the source of a ``from_linear`` conversion."""
    if not isinstance(linear, nn.Linear):
        raise InputTypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
    return linear


def new_factor_params(
    out_features: int,
    in_features: int,
    rank: int,
    *,
    row_scales: bool,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    requires_grad: bool = True,
) -> dict[str, nn.Parameter | None]:
    """Uninitialised parameters ``U (out, r)``, ``S (r,)``, ``Vh (r, in)``, ``D (out,)`` or None.

    ``Vh`` is ``Vᵀ``, stored as the weight of the first linear map, like ``nn.Linear``'s
    ``(out, in)`` weight (and ``torch.linalg.svd``'s ``Vh``); ``U`` is the second's.
    """
    kw = {"device": device, "dtype": dtype}
    shapes = {"U": (out_features, rank), "S": (rank,), "Vh": (rank, in_features)}
    if row_scales:
        shapes["D"] = (out_features,)
    params: dict[str, nn.Parameter | None] = {
        name: nn.Parameter(torch.empty(shape, **kw), requires_grad=requires_grad)
        for name, shape in shapes.items()
    }
    params.setdefault("D", None)
    return params


def register_lowrank_params(
    module: nn.Module,
    out_features: int,
    in_features: int,
    rank: int,
    *,
    row_scales: bool,
    bias: bool,
    device: torch.device | str | None,
    dtype: torch.dtype | None,
) -> None:
    """Register ``U``, ``S``, ``Vh``, ``D`` (or None) and ``bias`` (or None) on ``module``."""
    for name, param in new_factor_params(
        out_features, in_features, rank, row_scales=row_scales, device=device, dtype=dtype
    ).items():
        module.register_parameter(name, param)
    b = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
    module.register_parameter("bias", b)


@torch.no_grad()
def copy_factors_(layer: nn.Module, factors: Factors, bias: torch.Tensor | None) -> None:
    """Copy ``factors`` (and ``bias``) into a layer's ``U``, ``S``, ``Vh``, ``D``, ``bias``."""
    layer.U.copy_(factors.U)
    layer.S.copy_(factors.S)
    layer.Vh.copy_(factors.V.mT)
    if factors.D is not None:
        layer.D.copy_(factors.D)
    if bias is not None:
        layer.bias.copy_(bias)


def upgrade_state_dict_(state_dict: dict[str, torch.Tensor], prefix: str) -> None:
    """Rename a format-1 ``<prefix>V`` ``(in, r)`` entry to ``<prefix>Vh`` ``(r, in)``, in place.

    Before checkpoint format 2 the layers stored ``V``; its transpose is ``Vh``.
    :class:`FactoredLinearBase` calls this from ``_load_from_state_dict``, so state dicts
    saved by earlier versions load into every layer kind.
    """
    old, new = prefix + "V", prefix + "Vh"
    value = state_dict.get(old)
    if isinstance(value, torch.Tensor) and value.dim() == 2 and new not in state_dict:
        state_dict[new] = value.mT.contiguous()
        del state_dict[old]


def make_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An ``nn.Linear`` holding copies of ``weight`` (out, in) and ``bias``, on their device."""
    out_features, in_features = weight.shape
    linear = nn.Linear(
        in_features, out_features, bias=bias is not None, device="meta", dtype=weight.dtype
    ).to_empty(device=weight.device)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear


@torch.no_grad()
def init_factors_(
    U: torch.Tensor,
    S: torch.Tensor,
    V: torch.Tensor,
    D: torch.Tensor | None,
    bias: torch.Tensor | None,
    *,
    active_rank: int | None = None,
) -> None:
    """Fill factors in place so the layer starts at ``nn.Linear``'s output scale.

    ``U`` and ``V`` get orthonormal columns (QR of a Gaussian, drawn in float32 as QR
    has no half-precision kernels), ``S = sqrt(out / (3·active_rank))``, ``D = 1``, and
    the bias ``nn.Linear``'s ``U(-1/sqrt(in), 1/sqrt(in))``. ``nn.Linear``'s weight has
    ``E‖W‖_F² = out/3``; orthonormal factors give ``‖W‖_F² = active_rank·S²``, the same.
    Tensors on the ``meta`` device are left alone.
    """
    out_features, rank = U.shape
    in_features = V.shape[0]
    active_rank = rank if active_rank is None else active_rank
    for factor in (U, V):
        if factor.device.type != "meta":
            tmp = torch.empty(factor.shape, device=factor.device, dtype=torch.float32)
            factor.copy_(nn.init.orthogonal_(tmp))
    S.fill_(math.sqrt(out_features / (3 * active_rank)))
    if D is not None:
        D.fill_(1.0)
    if bias is not None:
        bound = 1 / math.sqrt(in_features)
        nn.init.uniform_(bias, -bound, bound)


def dense_from_factors(factors: Factors) -> torch.Tensor:
    """``diag(D)·U·diag(S)·Vᵀ`` formed in float32 (or float64) and cast to the factors' dtype."""
    dtype = factors.U.dtype
    compute = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    return factors.to(compute).dense().to(dtype)


class FactoredLinearBase(nn.Module):
    r"""The members the three low-rank layers share; not a layer by itself.

    A subclass holds ``U``, ``S``, ``Vh``, ``D`` (or None) and ``bias`` (or None) as
    parameters (:func:`register_lowrank_params`), represents the weight
    ``W = diag(D)·U·diag(S)·Vᵀ`` and defines its own ``forward``, ``rank`` and
    ``extra_repr``. What differs between the layers is expressed by two hooks:

    - :meth:`_active_factors`: the stored ``(U, S, Vh, D)`` that make up the weight now:
      all of them (``LowRankLinear``), the first ``rank`` components
      (``DynamicLowRankLinear``), or none before the switch
      (``AdaptiveLowRankLinear``, which raises). ``V``'s transpose, the detached
      :meth:`factors`, :meth:`dense_weight`, :meth:`to_linear` and the lazy ``weight``
      are built on it.
    - :meth:`_match_state_dict`: reshape the layer to a saved state dict before it is
      loaded (an adaptive layer switches phase, a dynamic one prunes); nothing by default.

    Loading upgrades checkpoint format 1 (a ``V (in, r)`` entry) to format 2 (``Vh``)
    for every subclass (:func:`upgrade_state_dict_`).

    **Row scales and "balance".** The layers name things as follows, and the names
    stay as they are so that every file written earlier still loads:

    - ``row_scales`` (a bool: constructors, ``extra_repr``, ``restructure``) says whether
      the layer holds the row scale vector ``D``; it always equals ``layer.D is not None``.
    - ``balance`` (a mode, ``"none"``, ``"rownorm"`` or ``"rowsum"``: ``from_linear``,
      ``AdaptiveLowRankLinear(balance=)``, ``switch_to_lowrank(balance=)``,
      ``SwitchResult.balance``) is :func:`~lowrank_layers.factorize`'s: how ``D`` is
      computed from a weight (:func:`~lowrank_layers.factorize.balance_rows`). A layer
      factorized with mode ``balance`` has ``row_scales = balance != "none"``; the layer
      does not record which mode produced its ``D``.
    - The checkpoint format's per-layer ``"balance"`` entry is the bool ``row_scales``
      (its key keeps the old name).

    Attributes:
        in_features, out_features: the layer's sizes.
        V: ``Vhᵀ``, ``(in_features, r)``, a read-only view of the parameter ``Vh``
            (all components held, active or not).
        weight: the lazy ``(out, in)`` weight, a :class:`~lowrank_layers.lazy_weight.FactoredWeight`
            (see :attr:`LowRankLinear.weight <lowrank_layers.LowRankLinear.weight>`).
        dense_weight_reads: how many times ``weight`` was formed densely.

    Example:
        >>> from lowrank_layers import DynamicLowRankLinear
        >>> layer = DynamicLowRankLinear(64, 32, max_rank=16, active_rank=8)
        >>> isinstance(layer, FactoredLinearBase), layer.factors().rank, tuple(layer.V.shape)
        (True, 8, (64, 16))
    """

    __constants__: ClassVar[list[str]] = ["in_features", "out_features"]
    # TorchScript compiles properties; the lazy weight is for eager Python code only
    __jit_unused_properties__: ClassVar[list[str]] = ["weight", "V"]
    __jit_ignored_attributes__: ClassVar[list[str]] = ["dense_weight_reads", "_dense_weight_warned"]

    in_features: int
    out_features: int

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features = check_features("in_features", in_features)
        self.out_features = check_features("out_features", out_features)
        self.dense_weight_reads = 0

    # ----------------------------------------------------------------------------------
    # hooks
    # ----------------------------------------------------------------------------------

    def _active_factors(
        self,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The stored ``(U, S, Vh, D)`` that make up the weight now (not detached)."""
        return self.U, self.S, self.Vh, self.D

    def _match_state_dict(self, state_dict: dict[str, Any], prefix: str) -> None:
        """Reshape the layer to the (format-2) ``state_dict`` about to be loaded."""

    # ----------------------------------------------------------------------------------
    # shared members
    # ----------------------------------------------------------------------------------

    def reset_parameters(self) -> None:
        """Orthonormal ``U``, ``V``; ``S = sqrt(out / (3·rank))``; ``D = 1``; bias as ``nn.Linear``.

        ``nn.Linear``'s default weight has entries ``U(-1/√in, 1/√in)``, so
        ``E‖W‖_F² = out/3``; with orthonormal factors ``‖W‖_F² = rank·S²`` over the
        ``rank`` components in use, which gives the same value for this ``S``.
        """
        init_factors_(self.U, self.S, self.Vh.t(), self.D, self.bias, active_rank=self.rank)

    @property
    def V(self) -> torch.Tensor:
        """``Vhᵀ``, ``(in_features, r)``: a view of the parameter ``Vh`` (not a leaf)."""
        return self.Vh.mT

    @property
    def weight(self) -> torch.Tensor:
        """The ``(out, in)`` weight as a lazy tensor, a :class:`~.lazy_weight.FactoredWeight`.

        Metadata (``dtype``, ``shape``, ``device``, ``isinstance(w, torch.Tensor)``) costs
        nothing; computing with it forms the dense weight from the factors in use on every
        use, which warns once (``DenseWeightWarning``) and counts in
        ``dense_weight_reads``. The layer's own forward never reads it. Not a parameter,
        not in the state dict. Use :meth:`dense_weight` for a detached copy.
        """
        return lazy_weight(self)

    def weight_factors(
        self,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The ``(U, S, V, D)`` in use, as the forward uses them (not detached; ``V`` a view)."""
        U, S, Vh, D = self._active_factors()
        return U, S, Vh.t(), D

    def factors(self) -> Factors:
        """The factors in use as detached :class:`~lowrank_layers.Factors`."""
        U, S, Vh, D = self._active_factors()
        return Factors(U.detach(), S.detach(), Vh.detach().mT, None if D is None else D.detach())

    def dense_weight(self) -> torch.Tensor:
        """The ``(out_features, in_features)`` weight this layer represents (detached).

        The product is formed in float32 (or float64) and cast to the layer's dtype.
        """
        with torch.no_grad():
            return dense_from_factors(self.factors())

    def to_linear(self) -> nn.Linear:
        """An ``nn.Linear`` with the weight :meth:`dense_weight` and a copy of the bias."""
        return make_linear(self.dense_weight(), self.bias)

    @classmethod
    def _from_factors(
        cls: type[Layer], factors: Factors, bias: torch.Tensor | None, **sizes: int | None
    ) -> Layer:
        """A layer of this class sized by ``sizes`` (its constructor's rank keywords) and
        holding copies of ``factors`` and ``bias``, on their device and in their dtype."""
        ref = factors.U
        layer = cls(
            factors.in_features,
            factors.out_features,
            bias=bias is not None,
            row_scales=factors.D is not None,
            device="meta",
            dtype=ref.dtype,
            **sizes,
        ).to_empty(device=ref.device)
        copy_factors_(layer, factors, bias)
        return layer

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        upgrade_state_dict_(state_dict, prefix)
        self._match_state_dict(state_dict, prefix)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
