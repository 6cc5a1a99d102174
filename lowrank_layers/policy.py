"""The rank policy and the rank arithmetic: how many components a layer keeps.

A :class:`RankPolicy` is one of four rules, validated once when it is made, without a
shape; :meth:`RankPolicy.resolve` turns it into a rank for one ``out x in`` weight.
``rank_ratio`` keeps ``round(ratio · min(out, in))`` components; ``param_ratio`` the most
whose factors hold at most that fraction of the weight's numbers; ``energy`` the fewest
keeping that fraction of ``Σσ²`` (known only from the spectrum, :func:`select_rank`). The
rest is the arithmetic every conversion shares: parameter counts, the break-even rank and
per-layer seeds (a global budget is shared by :mod:`~lowrank_layers.allocate`).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, fields

import torch

from .common import InputError, InputTypeError, as_integer, check_fraction

__all__ = [
    "RankPolicy",
    "as_policy",
    "break_even_rank",
    "break_even_reason",
    "factor_parameters",
    "layer_seed",
    "ratio_rank",
    "resolve_rank",
    "saves_parameters",
    "select_rank",
    "threshold_reason",
]


@dataclass(frozen=True)
class RankPolicy:
    """Exactly one rule for a layer's rank, validated when made (no shape needed).

    Example:
        >>> policy = RankPolicy(param_ratio=0.5)
        >>> str(policy), policy.resolve(1024, 1024)
        ('param_ratio=0.5', 255)
        >>> RankPolicy(rank=8).resolve(64, 32)
        8

    Raises:
        ValueError: none or several rules given; a ratio outside (0, 1]; ``rank < 1``.
        TypeError: a rank that is not an integer, a ratio that is not a number.
    """

    rank: int | None = None
    rank_ratio: float | None = None
    energy: float | None = None
    param_ratio: float | None = None

    def __post_init__(self) -> None:
        given = {f.name: getattr(self, f.name) for f in fields(self)}
        chosen = [k for k, v in given.items() if v is not None]
        if len(chosen) != 1:
            got = ", ".join(f"{k}={given[k]!r}" for k in chosen) if chosen else "none"
            raise InputError(
                "exactly one rank policy must be given (rank, rank_ratio, energy or "
                f"param_ratio), got {got}"
            )
        if self.rank is not None:
            rank = as_integer(self.rank)
            if isinstance(rank, bool) or not isinstance(rank, int):
                raise InputTypeError(f"rank must be an int >= 1, got {self.rank!r}")
            if rank < 1:
                raise InputError(f"rank must be an int >= 1, got {rank}")
            object.__setattr__(self, "rank", rank)
        else:
            object.__setattr__(self, chosen[0], check_fraction(chosen[0], given[chosen[0]]))

    @property
    def kind(self) -> str:
        """``"rank"``, ``"rank_ratio"``, ``"energy"`` or ``"param_ratio"``."""
        return next(f.name for f in fields(self) if getattr(self, f.name) is not None)

    @property
    def value(self) -> int | float:
        return getattr(self, self.kind)

    def kwargs(self) -> dict[str, int | float]:
        """The keyword form, ``{kind: value}``."""
        return {self.kind: self.value}

    def __str__(self) -> str:
        return f"{self.kind}={self.value}"

    def resolve(
        self, out_features: int, in_features: int, *, row_scales: bool = False
    ) -> int | None:
        """The rank for one ``out x in`` weight; ``None`` for ``energy`` (see
        :func:`select_rank`). ``row_scales`` counts the row scales ``D`` in ``param_ratio``.

        Raises:
            ValueError: ``rank`` above ``min(out, in)``; ``param_ratio`` below rank 1.
        """
        max_rank = min(out_features, in_features)
        if self.rank is not None:
            if self.rank > max_rank:
                raise InputError(
                    f"rank must be an int in [1, {max_rank}] for a {out_features}x"
                    f"{in_features} weight, got {self.rank}"
                )
            return self.rank
        if self.rank_ratio is not None:
            return ratio_rank(out_features, in_features, self.rank_ratio)
        if self.param_ratio is not None:
            budget = self.param_ratio * out_features * in_features - (
                out_features if row_scales else 0
            )
            r = min(max_rank, math.floor(budget / (out_features + in_features + 1)))
            if r < 1:
                raise InputError(
                    f"param_ratio={self.param_ratio} leaves no room for even a rank-1 "
                    f"factorization of a {out_features}x{in_features} weight (rank 1 needs "
                    f"{factor_parameters(out_features, in_features, 1, row_scales=row_scales)} of "
                    f"{out_features * in_features} parameters)"
                )
            return r
        return None

    def plan(
        self, out_features: int, in_features: int, *, threshold: int = 0, row_scales: bool = False
    ) -> tuple[int | None, str | None]:
        """The rank for one weight before factorizing it, or why it is not converted.

        Returns ``(rank, None)`` (``rank`` is None for ``energy``, known only from the
        spectrum) or ``(None, reason)`` for a weight not above ``threshold``, a ratio too
        small for rank 1, or a rank that saves no parameters. An absolute ``rank`` above a
        small weight's ``min(in, out)`` means all of it (and so saves nothing).
        """
        out_f, in_f = out_features, in_features
        small = threshold_reason(out_f, in_f, threshold)
        if small is not None:
            return None, small
        policy = self
        if self.rank is not None and self.rank > min(out_f, in_f):
            policy = RankPolicy(rank=min(out_f, in_f))
        if self.param_ratio is not None:
            least = factor_parameters(out_f, in_f, 1, row_scales=row_scales)
            if least > self.param_ratio * out_f * in_f:
                return None, (
                    f"param_ratio={self.param_ratio} is below rank 1 of a {out_f}x{in_f} "
                    f"weight ({least} of {out_f * in_f} parameters)"
                )
        planned = policy.resolve(out_f, in_f, row_scales=row_scales)
        if planned is not None and not saves_parameters(
            out_f, in_f, planned, row_scales=row_scales
        ):
            return None, break_even_reason(planned)
        return planned, None


def threshold_reason(out_features: int, in_features: int, threshold: int) -> str | None:
    """Why a weight is too small to convert (``in·out <= threshold²``, the original
    ``make_efficient_linear``'s size test), or None."""
    if in_features * out_features <= threshold**2:
        return f"{out_features}x{in_features} is not above threshold {threshold}²"
    return None


def as_policy(
    policy: RankPolicy | None = None,
    rank: int | None = None,
    rank_ratio: float | None = None,
    energy: float | None = None,
    param_ratio: float | None = None,
    *,
    required: bool = True,
) -> RankPolicy | None:
    """The one rank policy of a call: ``policy``, or the keyword form, not both.

    Entry points pass their arguments on in this order,
    ``as_policy(policy, rank, rank_ratio, energy, param_ratio)``.

    With ``required=False`` giving neither returns None (a layer that keeps its own
    policy, a budget that replaces it).
    """
    keywords = {
        "rank": rank,
        "rank_ratio": rank_ratio,
        "energy": energy,
        "param_ratio": param_ratio,
    }
    given = {k: v for k, v in keywords.items() if v is not None}
    if policy is not None:
        if not isinstance(policy, RankPolicy):
            raise InputTypeError(f"policy must be a RankPolicy, got {type(policy).__name__}")
        if given:
            got = ", ".join(f"{k}={v!r}" for k, v in given.items())
            raise InputError(f"give policy={policy} or the keyword form, not both (got {got})")
        return policy
    if not given and not required:
        return None
    return RankPolicy(**given)


def resolve_rank(
    out_features: int,
    in_features: int,
    *,
    rank: int | None = None,
    rank_ratio: float | None = None,
    param_ratio: float | None = None,
    row_scales: bool = False,
    energy: float | None = None,
) -> int | None:
    """The keyword form of ``RankPolicy(...).resolve(out, in, row_scales=...)``.

    Example:
        >>> resolve_rank(1024, 1024, rank_ratio=0.1)
        102
    """
    policy = RankPolicy(rank=rank, rank_ratio=rank_ratio, energy=energy, param_ratio=param_ratio)
    return policy.resolve(out_features, in_features, row_scales=row_scales)


def ratio_rank(out_features: int, in_features: int, rank_ratio: float) -> int:
    """``max(1, round(rank_ratio · min(out, in)))``: the rank a ``rank_ratio`` gives (the
    ratio is checked by :class:`RankPolicy`; here it is taken as it is).

    Example:
        >>> ratio_rank(512, 512, 0.2)
        102
    """
    max_rank = min(out_features, in_features)
    return max(1, min(max_rank, math.floor(rank_ratio * max_rank + 0.5)))


def break_even_rank(out_features: int, in_features: int) -> float:
    """The rank ``in·out / (in + out)`` at which ``U`` and ``V`` hold as many numbers as ``W``.

    A factorization at or above this rank saves no parameters (and no FLOPs): the
    converter and :func:`~lowrank_layers.make_efficient_linear` refuse it.

    Example:
        >>> break_even_rank(1024, 1024)
        512.0
    """
    return out_features * in_features / (out_features + in_features)


def factor_parameters(out_features: int, in_features: int, rank: int, *, row_scales: bool) -> int:
    """Number of parameters in ``U``, ``S``, ``V`` (and ``D`` if ``row_scales``), bias excluded.

    Example:
        >>> factor_parameters(1024, 1024, 102, row_scales=False)
        208998
    """
    return rank * (out_features + in_features + 1) + (out_features if row_scales else 0)


def select_rank(
    S: torch.Tensor, energy: float, *, total: float | torch.Tensor | None = None
) -> int:
    """Smallest ``r`` whose leading singular values keep ``energy`` of ``Σσ²``.

    Args:
        S: singular values, descending.
        energy: fraction in (0, 1] of the squared Frobenius norm to keep.
        total: the full ``Σσ²`` (``‖A‖_F²``) when ``S`` holds only the leading values,
            as after a randomized SVD. Defaults to ``(S**2).sum()``.

    Returns:
        The rank, at least 1 and at most ``len(S)``. When ``total`` exceeds what ``S``
        holds and the target is not reached, ``len(S)`` is returned; callers that
        need the target met check ``captured_energy``.

    Example:
        >>> select_rank(torch.tensor([3.0, 2.0, 1.0]), 0.9)
        2
    """
    energy = check_fraction("energy", energy)
    if S.dim() != 1 or S.numel() == 0:
        raise InputError(f"S must be a non-empty 1-D tensor, got shape {tuple(S.shape)}")
    sq = S.detach().to(torch.float64).square()
    cum = torch.cumsum(sq, 0)
    tot = cum[-1] if total is None else torch.as_tensor(total, dtype=torch.float64)
    if float(tot) == 0.0:
        return 1
    # a relative slack of 1e-12 so that energy=1.0 is met despite rounding in the sums
    r = int(torch.searchsorted(cum / tot, torch.tensor(energy - 1e-12, dtype=torch.float64))) + 1
    return max(1, min(r, S.numel()))


def layer_seed(seed: int, name: str) -> int:
    """The seed of one layer's random sketch: ``seed`` mixed with a CRC32 of its name."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (1 << 63)


def saves_parameters(out_f: int, in_f: int, rank: int, *, row_scales: bool) -> bool:
    """Whether factors of this rank hold fewer numbers than the ``out x in`` weight."""
    return factor_parameters(out_f, in_f, rank, row_scales=row_scales) < out_f * in_f


def break_even_reason(rank: int) -> str:
    return f"rank {rank} saves no parameters (break-even)"
