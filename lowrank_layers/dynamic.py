"""``DynamicLowRankLinear`` (a rank that changes during training) and ``RankScheduler``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .common import InputError, as_integer, check_fraction
from .factorize import Balance, Method, factorize, promote
from .layer_base import FactoredLinearBase, check_linear, policy_rank, register_lowrank_params
from .linear import factored_linear, stored_factors
from .policy import RankPolicy, ratio_rank, select_rank

__all__ = ["DynamicLowRankLinear", "ParamSwap", "RankScheduler"]


@dataclass(frozen=True)
class ParamSwap:
    """One parameter replaced by a structural change, for keeping an optimizer in step.

    ``new`` replaces ``old``; optimizer state tensors shaped like ``old`` carry over as
    ``state[index]`` when ``index`` is given, and are dropped otherwise.
    """

    old: nn.Parameter
    new: tuple[nn.Parameter, ...]
    index: tuple[slice, ...] | None = None


def _check_rank(name: str, value: object, max_rank: int) -> int:
    value = as_integer(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= max_rank:
        raise InputError(f"{name} must be an int in [1, {max_rank}], got {value!r}")
    return value


class DynamicLowRankLinear(FactoredLinearBase):
    r"""A low-rank linear layer whose rank can change during training.

    It holds ``max_rank`` components ``U (out, max_rank)``, ``S (max_rank,)``,
    ``Vh (max_rank, in)`` (``Vᵀ``, stored as :class:`~lowrank_layers.LowRankLinear`
    stores it; and ``D``, ``bias``) and uses the first ``rank`` of them:
    ``y = x·Vh[:r]ᵀ·diag(S[:r])·U[:, :r]ᵀ·diag(D) + b``. Changing the rank keeps every
    parameter's shape, so DDP and optimizers need no rebuilding; :meth:`prune` drops the
    unused components for good.

    Before the rank shrinks, the active components are re-orthonormalised and sorted by
    singular value (:meth:`reorthonormalize`: QR of ``U`` and ``V``, SVD of the small
    core), so what is dropped is the least important part of the *current* effective
    weight, whatever training did to the factors — the rank-``r`` truncation is then the
    best one (Eckart–Young). Growing the rank re-enables components that were dropped:
    a shrink followed at once by a grow restores the weight exactly.

    Args:
        in_features, out_features: the layer's sizes.
        max_rank: components held, in ``[1, min(in, out)]`` (or a
            :class:`~lowrank_layers.RankPolicy` resolved for these sizes); or
        max_rank_ratio: ``max_rank = round(ratio · min(in, out))`` (default 0.2, the
            original design's).
        active_rank: components used at first (default ``max_rank``).
        bias, row_scales, device, dtype: as for :class:`~lowrank_layers.LowRankLinear`.

    Shape:
        - Input: ``(*, in_features)``
        - Output: ``(*, out_features)``, whatever the active rank

    ``weight`` is a read-only lazy tensor at the active rank, for code that reads
    ``layer.weight`` (see :class:`~lowrank_layers.lazy_weight.FactoredWeight`). Under
    ``torch.jit.script`` the active rank is fixed when the module is scripted.

    Example:
        >>> layer = DynamicLowRankLinear(512, 512, max_rank_ratio=0.2)
        >>> layer.max_rank, layer.rank
        (102, 102)
        >>> layer.adjust_rank(rank_ratio=0.1)
        51
        >>> layer(torch.randn(3, 512)).shape
        torch.Size([3, 512])
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        max_rank: int | RankPolicy | None = None,
        max_rank_ratio: float | None = None,
        active_rank: int | None = None,
        bias: bool = True,
        row_scales: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features)
        if max_rank is not None and max_rank_ratio is not None:
            raise InputError(
                f"give max_rank or max_rank_ratio, not both; got max_rank={max_rank}, "
                f"max_rank_ratio={max_rank_ratio}"
            )
        if max_rank is None and max_rank_ratio is None:
            max_rank_ratio = 0.2
        if isinstance(max_rank, RankPolicy):
            max_rank = policy_rank(max_rank, out_features, in_features, row_scales=row_scales)
        if max_rank is not None:
            max_rank = _check_rank("max_rank", max_rank, min(in_features, out_features))
        else:
            ratio = check_fraction("max_rank_ratio", max_rank_ratio)
            max_rank = ratio_rank(out_features, in_features, ratio)
        self._rank = (
            max_rank if active_rank is None else _check_rank("active_rank", active_rank, max_rank)
        )
        register_lowrank_params(
            self,
            out_features,
            in_features,
            max_rank,
            row_scales=row_scales,
            bias=bias,
            device=device,
            dtype=dtype,
        )
        self.reset_parameters()

    @property
    def rank(self) -> int:
        """Components in use."""
        return self._rank

    @property
    def max_rank(self) -> int:
        """Components held."""
        return self.S.shape[0]

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        r = self._rank
        if torch.jit.is_scripting():
            return factored_linear(input, self.U[:, :r], self.S[:r], self.Vh[:r], self.D, self.bias)
        else:  # TorchScript compiles only the branch above
            U, S, Vh, D, bias = stored_factors(self)
            return factored_linear(input, U[:, :r], S[:r], Vh[:r], D, bias)

    def _active_factors(
        self,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The first ``rank`` components: ``weight``, ``factors()`` and ``dense_weight()``
        are at the current rank, as the forward is."""
        r = self._rank
        return self.U[:, :r], self.S[:r], self.Vh[:r], self.D

    # ----------------------------------------------------------------------------------
    # changing the rank
    # ----------------------------------------------------------------------------------

    @torch.no_grad()
    def reorthonormalize(self) -> torch.Tensor:
        """Rotate the active components into the SVD of the current effective weight.

        With ``Ũ = diag(D)·U[:, :r]``: ``Ũ = Q_u·R_u``, ``V[:, :r] = Q_v·R_v``, and the
        small core ``R_u·diag(S[:r])·R_vᵀ = P·Σ·Qᵀ``; then ``U = diag(1/D)·Q_u·P``,
        ``S = Σ`` (descending), ``V = Q_v·Q``. The weight is unchanged (to rounding);
        the components are now sorted by importance. Computed in float32 at least.

        Returns:
            The singular values ``Σ`` of the effective weight (length ``rank``).
        """
        r = self._rank
        dtype = self.U.dtype
        U = promote(self.U[:, :r])
        S = promote(self.S[:r])
        V = promote(self.Vh[:r].mT)
        D = None if self.D is None else promote(self.D)
        if D is not None:
            U = U * D[:, None]
        Qu, Ru = torch.linalg.qr(U)
        Qv, Rv = torch.linalg.qr(V)
        P, sigma, Qh = torch.linalg.svd((Ru * S) @ Rv.mT)
        new_U = Qu @ P
        if D is not None:
            safe = torch.where(D.abs() > torch.finfo(D.dtype).tiny, D, torch.ones_like(D))
            new_U = torch.where((D == 0)[:, None], 0.0, new_U / safe[:, None])
        self.U[:, :r] = new_U.to(dtype)
        self.S[:r] = sigma.to(dtype)
        self.Vh[:r] = (Qh @ Qv.mT).to(dtype)
        return sigma.to(dtype)

    def set_rank(self, rank: int) -> None:
        """Use the first ``rank`` components; shrinking sorts them first (see reorthonormalize)."""
        rank = _check_rank("rank", rank, self.max_rank)
        if rank < self._rank:
            self.reorthonormalize()
        self._rank = rank

    def adjust_rank(self, *, rank_ratio: float | None = None, energy: float | None = None) -> int:
        """Set the rank from a ratio of ``min(in, out)`` or an energy fraction; returns it.

        ``energy`` keeps the smallest rank whose leading singular values of the current
        effective weight hold that fraction of its ``Σσ²`` (it can only shrink or keep
        the rank); ``rank_ratio`` may also grow it, up to ``max_rank``.
        """
        if (rank_ratio is None) == (energy is None):
            raise InputError(
                "adjust_rank takes exactly one of rank_ratio or energy, got "
                f"rank_ratio={rank_ratio!r}, energy={energy!r}"
            )
        if rank_ratio is not None:
            rank = ratio_rank(
                self.out_features, self.in_features, check_fraction("rank_ratio", rank_ratio)
            )
            if rank > self.max_rank:
                raise InputError(
                    f"rank_ratio={rank_ratio} gives rank {rank}, above max_rank={self.max_rank} "
                    f"of this {self.out_features}x{self.in_features} layer"
                )
            self.set_rank(rank)
            return rank
        sigma = self.reorthonormalize()
        rank = select_rank(sigma, energy)  # type: ignore[arg-type]
        self._rank = rank
        return rank

    @torch.no_grad()
    def prune(self) -> list[ParamSwap]:
        """Drop the unused components for good: ``max_rank`` becomes ``rank``.

        Returns the parameter swaps, for :func:`~lowrank_layers.prune_dynamic` to update an
        optimizer (state of the kept components is carried over).
        """
        columns = (slice(None), slice(0, self._rank))
        rows = (slice(0, self._rank),)
        return [self._swap("U", columns), self._swap("S", rows), self._swap("Vh", rows)]

    def _swap(self, name: str, index: tuple[slice, ...]) -> ParamSwap:
        old = self._parameters[name]
        if old is None:  # U, S and Vh always exist; D is never swapped
            raise RuntimeError(f"{name} is not a parameter of this layer")
        new = nn.Parameter(old.detach()[index].clone(), requires_grad=old.requires_grad)
        self._parameters[name] = new
        return ParamSwap(old, (new,), index)

    # ----------------------------------------------------------------------------------
    # conversions
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
        active_rank: int | None = None,
        method: Method = "svd",
        balance: Balance = "none",
        input_cov: torch.Tensor | None = None,
        cross_cov: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> DynamicLowRankLinear:
        """Factorize an ``nn.Linear``; the policy's rank becomes ``max_rank``.

        The components are sorted by singular value, so the active ones are the leading
        singular directions.

        Args:
            linear: the source ``nn.Linear``; not modified. The new layer has its device
                and dtype and a copy of its bias.
            policy: a :class:`~lowrank_layers.RankPolicy`, or its keyword form
            rank, rank_ratio, energy, param_ratio: (exactly one, as
                :func:`~lowrank_layers.factorize`); its rank is ``max_rank``.
            active_rank: the rank in use at first, in ``[1, max_rank]`` (default: all).
            method, balance, input_cov, cross_cov, generator: as
                :meth:`LowRankLinear.from_linear <lowrank_layers.LowRankLinear.from_linear>`.
        """
        check_linear(linear)
        with torch.no_grad():
            f = factorize(
                linear.weight.detach(),
                policy,
                rank=rank,
                rank_ratio=rank_ratio,
                energy=energy,
                param_ratio=param_ratio,
                method=method,
                balance=balance,
                input_cov=input_cov,
                cross_cov=cross_cov,
                generator=generator,
            )
            return cls._from_factors(f, linear.bias, max_rank=f.rank, active_rank=active_rank)

    def get_extra_state(self) -> dict[str, int]:
        return {"rank": self._rank}

    def set_extra_state(self, state: dict[str, int]) -> None:
        self._rank = _check_rank("rank", int(state["rank"]), self.max_rank)

    def _match_state_dict(self, state_dict: dict[str, Any], prefix: str) -> None:
        """A pruned checkpoint (fewer components) loads into a fresh layer by pruning it first."""
        saved = state_dict.get(prefix + "S")
        if saved is not None and saved.shape[0] < self.max_rank:
            self._rank = saved.shape[0]
            self.prune()

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"rank={self.rank}, max_rank={self.max_rank}, bias={self.bias is not None}, "
            f"row_scales={self.D is not None}"
        )


class RankScheduler:
    """Set every :class:`DynamicLowRankLinear`'s rank from an epoch schedule, like an LR scheduler.

    ``schedule`` maps an epoch to a rank ratio (of ``min(in, out)``); at each
    :meth:`step` the ratio of the largest milestone ``<= epoch`` applies, capped at each
    layer's ``max_rank``. The original design's schedule: ``{0: 0.20, 10: 0.15, 30: 0.10}``
    over 50 epochs. Call ``step(epoch)`` at the start of each epoch (or ``step()``, which
    counts from 0).

    Shrinking rotates the kept components (:meth:`DynamicLowRankLinear.reorthonormalize`),
    so per-element optimizer moments of ``U``, ``S``, ``Vh`` no longer match their
    coordinates: given the ``optimizer``, their state is reset when a layer shrinks.

    Example:
        >>> model = nn.Sequential(DynamicLowRankLinear(200, 200, max_rank_ratio=0.2))
        >>> sched = RankScheduler(model, {0: 0.20, 10: 0.15, 30: 0.10})
        >>> for epoch in range(50):
        ...     sched.step(epoch)     # then train one epoch
        >>> model[0].rank
        20
    """

    def __init__(
        self,
        model: nn.Module,
        schedule: Mapping[int, float],
        *,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> None:
        if not schedule:
            raise InputError("schedule must map at least one epoch to a rank ratio, got {}")
        for epoch, ratio in schedule.items():
            if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
                raise InputError(f"schedule epochs must be ints >= 0, got {epoch!r}")
            check_fraction(f"schedule[{epoch}]", ratio)
        self.layers = [m for m in model.modules() if isinstance(m, DynamicLowRankLinear)]
        if not self.layers:
            raise InputError("RankScheduler: the model holds no DynamicLowRankLinear layer")
        self.schedule = dict(sorted(schedule.items()))
        self.optimizer = optimizer
        self.last_epoch = -1

    def ratio_at(self, epoch: int) -> float | None:
        """The scheduled ratio at ``epoch`` (``None`` before the first milestone)."""
        ratio = None
        for milestone, value in self.schedule.items():
            if milestone <= epoch:
                ratio = value
        return ratio

    def step(self, epoch: int | None = None) -> None:
        """Apply the schedule at ``epoch`` (default: the previous epoch + 1)."""
        self.last_epoch = self.last_epoch + 1 if epoch is None else epoch
        ratio = self.ratio_at(self.last_epoch)
        if ratio is None:
            return
        for layer in self.layers:
            before = layer.rank
            rank = ratio_rank(layer.out_features, layer.in_features, ratio)
            layer.set_rank(min(rank, layer.max_rank))
            if self.optimizer is not None and layer.rank < before:
                for p in (layer.U, layer.S, layer.Vh):
                    self.optimizer.state.pop(p, None)

    def state_dict(self) -> dict[str, Any]:
        return {"last_epoch": self.last_epoch, "schedule": dict(self.schedule)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_epoch = int(state["last_epoch"])
        self.schedule = dict(sorted(state["schedule"].items()))
