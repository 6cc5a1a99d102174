"""The rank policy and the rank arithmetic: how many components a layer keeps.

A :class:`RankPolicy` is one of four rules, validated once when it is made, without a
shape; :meth:`RankPolicy.resolve` turns it into a rank for one ``out x in`` weight.
``rank_ratio`` keeps ``round(ratio · min(out, in))`` components; ``param_ratio`` the most
whose factors hold at most that fraction of the weight's numbers; ``energy`` the fewest
keeping that fraction of ``Σσ²`` (known only from the spectrum, :func:`select_rank`). The
rest is the arithmetic every conversion shares: parameter counts, the break-even rank,
per-layer seeds, and the allocation of a global budget across layers.
"""

from __future__ import annotations

import heapq
import math
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, fields

import torch

from .common import InputError, InputTypeError, as_integer, check_choice, check_fraction

__all__ = [
    "ALLOCATIONS",
    "RankPolicy",
    "allocate_ranks",
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


ALLOCATIONS: tuple[str, ...] = ("minimax", "greedy")


def allocate_ranks(
    spectra: Mapping[str, tuple[torch.Tensor, int, int] | torch.Tensor],
    budget: float,
    *,
    row_scales: bool = False,
    allocation: str = "minimax",
    max_ranks: Mapping[str, int] | None = None,
) -> dict[str, int]:
    """Per-layer ranks keeping at most ``budget`` of the layers' weight parameters.

    ``spectra`` maps a layer to ``(singular values, out, in)`` of the matrix that will be
    truncated, or to the ``(out, in)`` weight itself (its singular values are computed);
    a layer's relative error at rank ``r`` is ``sqrt(Σ_{i>r} σᵢ² / Σ σᵢ²)``.

    - ``"minimax"`` (default): the smallest common relative error every layer reaches within
      the budget (a bisection on the error level, each layer taking the smallest rank that
      reaches it), then the leftover budget filled greedily. No layer is sacrificed to
      save parameters on another.
    - ``"greedy"``: from rank 1 everywhere, add the component restoring the largest fraction
      of its layer's energy per parameter it costs (``in + out + 1``), while the budget lasts.
      It minimises the *sum* of relative squared errors, which lets a few layers fall to
      very low ranks.

    Every layer keeps at least rank 1, at most its ``max_ranks`` entry (when given), and
    never reaches break-even. Ties go to the earlier
    layer name: the result is deterministic. ``benchmarks/conversion_quality.py`` compares
    the two on real models.

    Raises:
        ValueError: ``budget`` outside (0, 1], an unknown ``allocation``, or a budget too small
            for rank 1 everywhere.
    """
    check_fraction("budget", budget)
    check_choice("allocation", allocation, ALLOCATIONS)
    spectra = {name: _spectrum_entry(name, value) for name, value in spectra.items()}
    total = sum(out * inp for _, out, inp in spectra.values())
    allowed = budget * total
    names = sorted(spectra)
    ranks = dict.fromkeys(names, 1)
    used = sum(
        factor_parameters(spectra[n][1], spectra[n][2], 1, row_scales=row_scales) for n in names
    )
    if used > allowed:
        raise InputError(
            f"budget={budget} keeps {int(allowed):,} of {total:,} parameters, but rank 1 in "
            f"each of the {len(names)} layers already needs {used:,}"
        )
    energy: dict[str, list[float]] = {}
    for n in names:
        sq = spectra[n][0].detach().to(torch.float64).square()
        energy[n] = (sq / sq.sum().clamp_min(1e-300)).tolist()
    limit = {n: (max_ranks or {}).get(n, len(energy[n])) for n in names}
    if allocation == "minimax":
        ranks, used = _minimax_ranks(spectra, energy, allowed, row_scales, limit)
    heap: list[tuple[float, int, str]] = []
    for i, n in enumerate(names):
        out, inp = spectra[n][1], spectra[n][2]
        if len(energy[n]) > ranks[n]:
            heapq.heappush(heap, (-energy[n][ranks[n]] / (out + inp + 1), i, n))
    while heap:
        _, i, n = heapq.heappop(heap)
        _, out, inp = spectra[n]
        r = ranks[n]
        step = out + inp + 1
        if (
            used + step > allowed
            or r + 1 > limit[n]
            or not saves_parameters(out, inp, r + 1, row_scales=row_scales)
        ):
            continue
        ranks[n] = r + 1
        used += step
        if r + 1 < len(energy[n]):
            heapq.heappush(heap, (-energy[n][r + 1] / step, i, n))
    return ranks


def _spectrum_entry(name: str, value: object) -> tuple[torch.Tensor, int, int]:
    """One ``allocate_ranks`` entry as ``(singular values, out, in)``."""
    if isinstance(value, torch.Tensor) and value.dim() == 2:
        return torch.linalg.svdvals(value.detach().to(torch.float64)), *value.shape
    ok = (
        isinstance(value, tuple)
        and len(value) == 3
        and isinstance(value[0], torch.Tensor)
        and value[0].dim() == 1
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value[1:])
    )
    if not ok:
        got = (
            f"a tensor of shape {tuple(value.shape)}"
            if isinstance(value, torch.Tensor)
            else repr(value)
        )
        raise InputTypeError(
            f"spectra[{name!r}] must be (singular values as a 1-D tensor, out, in) or a 2-D "
            f"weight, got {got}"
        )
    return value  # type: ignore[return-value]


def _minimax_ranks(
    spectra: dict[str, tuple[torch.Tensor, int, int]],
    energy: dict[str, list[float]],
    allowed: float,
    row_scales: bool,
    limit: Mapping[str, int],
) -> tuple[dict[str, int], int]:
    """Ranks reaching the smallest common residual-energy fraction within ``allowed``."""
    import bisect
    import itertools

    residual = {}  # residual[n][r-1] = fraction of energy left at rank r (decreasing in r)
    caps = {}
    for n, (_, out, inp) in spectra.items():
        kept = list(itertools.accumulate(energy[n]))
        residual[n] = [max(0.0, 1.0 - k) for k in kept]
        cap = max(1, min(len(kept), limit[n]))
        while cap > 1 and not saves_parameters(out, inp, cap, row_scales=row_scales):
            cap -= 1
        caps[n] = cap

    def ranks_at(level: float) -> dict[str, int]:
        out = {}
        for n, res in residual.items():
            # smallest r with res[r-1] <= level: res is decreasing, search on its negation
            r = bisect.bisect_left([-x for x in res], -level) + 1
            out[n] = max(1, min(r, caps[n]))
        return out

    def cost(ranks: dict[str, int]) -> int:
        return sum(factor_parameters(spectra[n][1], spectra[n][2], r, row_scales=row_scales)
                   for n, r in ranks.items())  # fmt: skip

    lo, hi = 0.0, 1.0  # cost(ranks_at(1.0)) is rank 1 everywhere, checked by the caller
    for _ in range(50):
        mid = (lo + hi) / 2
        if cost(ranks_at(mid)) <= allowed:
            hi = mid
        else:
            lo = mid
    ranks = ranks_at(hi)
    return ranks, cost(ranks)
