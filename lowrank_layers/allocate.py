"""Loss-aware rank allocation: each layer's rank from its estimated effect on the output.

A uniform ``param_ratio`` gives every layer the same share; layers are not equally
sensitive (the first block of a small language model can matter ten times as much as a
middle one). Here each layer's cost at every rank is estimated from one gradient pass,
then the budget is solved exactly over a grid of candidate ranks, "keep dense" included.

The estimate (K-FAC, as FWSVD / KFAC-SVD): truncating layer ``ℓ`` changes its output by
``Δy = ΔW·x``; to second order the loss grows by ``½·E[Δyᵀ F Δy]`` where ``F`` is the
Fisher (Gauss-Newton) matrix of the output. With ``F ≈ G = E[g gᵀ]`` for output gradients
``g`` and inputs independent of gradients, ``½·tr(G·ΔW·C·ΔWᵀ)`` with ``C = E[x xᵀ]``. For
the whitened factorization ``W·L = Σ σᵢ uᵢ zᵢᵀ`` (``L·Lᵀ = C``), the rank-``r`` residual
costs ``½·Σ_{i>r} σᵢ²·uᵢᵀ G uᵢ``: one SVD per layer gives the curve at every rank.

The second moments come from one gradient pass (:mod:`~lowrank_layers.sensitivity`).
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .common import InputError, InputTypeError, check_choice, check_fraction
from .factorize import whitening_factor
from .memory import release_free_heap
from .narrow import Mlp, Narrowing, WidthCurve, width_curve
from .policy import factor_parameters, resolve_rank, saves_parameters
from .sensitivity import Sensitivity, collect_sensitivity
from .speed import DEFAULT_SPEED_MODEL, SpeedRule, dense_seconds, lowrank_seconds

__all__ = [
    "SPECTRAL_ALLOCATIONS",
    "Allocation",
    "GroupOptions",
    "LayerOptions",
    "Sensitivity",
    "allocate_loss_aware",
    "allocate_ranks",
    "check_speedup_target",
    "collect_sensitivity",
    "layer_seconds",
    "loss_aware_ranks",
    "loss_options",
    "mlp_options",
    "rank_options",
    "solve_budget",
    "solve_loss_aware",
]

# the candidate fractions of each layer's parameters (ranks) and of each MLP's width: every
# 1%, a few singular values apart, so that the knapsack picks singular values across the
# layers by their loss per parameter (ZS-SVD's global selection); on SmolLM2 it beat 5%
# steps at 80% and 60% (benchmarks/allocation_variants.py, docs/benchmarks.md)
DEFAULT_GRID: tuple[float, ...] = tuple(k / 100 for k in range(1, 100))


@dataclass
class LayerOptions:
    """A layer's candidates: ``ranks[k]`` (None = keep dense) costs ``params[k]`` parameters
    (and ``seconds[k]``, its modelled forward time, when priced) and adds an estimated
    ``loss[k]``."""

    out_features: int
    in_features: int
    ranks: list[int | None]
    params: list[int]
    loss: list[float]
    seconds: list[float] = field(default_factory=list)  # modelled forward time, if priced

    @property
    def dense_params(self) -> int:
        return self.out_features * self.in_features

    @property
    def dense_seconds(self) -> float:
        return self.seconds[-1]  # "dense" is the last candidate

    @property
    def choices(self) -> list[int | None]:
        """The candidates :func:`solve_budget` picks from: the ranks."""
        return self.ranks


@dataclass
class GroupOptions:
    """An MLP's candidates (:func:`mlp_options`): ``choices[k]`` is a
    :class:`~lowrank_layers.narrow.Narrowing` (the MLP cut to fewer intermediate channels)
    or ``{layer: rank or None}`` (each layer factorized or dense), costing ``params[k]``
    parameters and adding an estimated ``loss[k]``."""

    mlp: Mlp
    dense_params: int
    choices: list[Narrowing | dict[str, int | None]]
    params: list[int]
    loss: list[float]
    seconds: list[float] = field(default_factory=list)
    dense_seconds: float = 0.0


@dataclass
class Allocation:
    """A loss-aware plan (:func:`allocate_loss_aware`).

    Attributes:
        ranks: ``{layer: rank or None (dense)}`` for every layer not in a narrowed MLP.
        narrowed: ``{MLP output layer: Narrowing}`` for the MLPs cut in width.
        options: each layer's (or MLP's, under its output layer's name) candidates.
        predicted_speedup: with a speed target, the modelled forward speed-up of all the
            layers together (dense time over planned time) at the target's token count.
    """

    ranks: dict[str, int | None]
    narrowed: dict[str, Narrowing]
    options: dict[str, LayerOptions | GroupOptions]
    predicted_speedup: float | None = None


def _saving_rank(out_f: int, in_f: int, ratio: float) -> int | None:
    """``param_ratio=ratio``'s rank (:func:`~lowrank_layers.factorize.resolve_rank`), or None
    when no rank fits or it saves no parameters."""
    try:
        r = resolve_rank(out_f, in_f, param_ratio=ratio)
    except ValueError:  # not even rank 1 fits within the ratio
        return None
    return r if factor_parameters(out_f, in_f, r, row_scales=False) < out_f * in_f else None


def rank_options(
    weight: torch.Tensor,
    sensitivity: Sensitivity,
    *,
    grid: Sequence[float] | None = None,
    speed: SpeedRule | None = None,
    tokens: int | None = None,
) -> LayerOptions:
    """A layer's estimated loss at each candidate rank (see the module docstring).

    Candidates: the largest rank within each ``param_ratio`` of ``grid`` (default 0.01,
    0.02, ..., 0.99) that saves parameters (and, with ``speed``, is expected to be fast
    enough), and "keep dense" (cost ``out·in``, loss 0). With ``tokens``, each is also
    priced in modelled forward seconds at that many tokens per call.
    """
    W = weight.detach().float()
    out_f, in_f = W.shape
    L = whitening_factor(sensitivity.input_cov, in_f)
    # σᵢ² and the singular vectors from the smaller Gram matrix of A = W·L, in float32:
    # ample for an estimate, and several times faster than a float64 SVD
    L = L.float()
    A = W @ L
    if out_f <= in_f and not sensitivity.projected:  # A·Aᵀ = U·Σ²·Uᵀ:  σᵢ²·uᵢᵀ G uᵢ
        G = sensitivity.grad_cov.float()
        lam, U = torch.linalg.eigh(A @ A.mT)
        weight_i = lam.clamp_min(0) * ((G @ U) * U).sum(0)
    else:  # AᵀA = V·Σ²·Vᵀ, A·vᵢ = σᵢ·uᵢ:  σᵢ²·uᵢᵀ G uᵢ = vᵢᵀ·Lᵀ(Wᵀ G W)L·vᵢ
        _, V = torch.linalg.eigh(A.mT @ A)
        M = L.mT @ sensitivity.weight_grad_cov(W).float() @ L
        weight_i = ((M @ V) * V).sum(0)
    weight_i = torch.flip(weight_i, [0]).clamp_min(0).to(torch.float64)  # descending σ
    tail = torch.flip(torch.cumsum(torch.flip(weight_i, [0]), 0), [0])  # tail[r] = Σ_{i>=r}
    tail = torch.cat([tail, tail.new_zeros(1)])
    grid = DEFAULT_GRID if grid is None else list(grid)
    ranks: list[int | None] = []
    for ratio in grid:
        r = _saving_rank(out_f, in_f, ratio)
        if r is not None and r not in ranks and _pays(speed, out_f, in_f, r, weight.dtype):
            ranks.append(r)
    options = LayerOptions(out_f, in_f, [], [], [])
    for r in ranks:
        options.ranks.append(r)
        options.params.append(factor_parameters(out_f, in_f, r, row_scales=False))
        options.loss.append(0.5 * float(tail[r].clamp_min(0.0)))
    options.ranks.append(None)
    options.params.append(out_f * in_f)
    options.loss.append(0.0)
    if tokens is not None:
        options.seconds = [
            layer_seconds(out_f, in_f, r, tokens, weight.dtype) for r in options.ranks
        ]
    return options


def layer_seconds(
    out_features: int, in_features: int, rank: int | None, tokens: int, dtype: torch.dtype
) -> float:
    """The modelled forward time of a layer at ``rank`` (None: ``nn.Linear``), with a bias
    and no row scales, at ``tokens`` per call (:mod:`~lowrank_layers.speed`)."""
    element = torch.empty(0, dtype=dtype).element_size()
    if rank is None:
        return dense_seconds(
            in_features, out_features, tokens, element=element, model=DEFAULT_SPEED_MODEL
        )
    return lowrank_seconds(
        in_features, out_features, rank, tokens, row_scales=False, bias=True,
        element=element, model=DEFAULT_SPEED_MODEL,
    )  # fmt: skip


def solve_budget(
    options: Mapping[str, LayerOptions | GroupOptions],
    budget: float,
    *,
    resolution: int = 4000,
    cost: str = "params",
) -> dict[str, Any]:
    """Pick one candidate per layer minimising the summed loss within ``budget``.

    An exact dynamic programme (knapsack) over the candidates, with costs rounded *up* to
    ``budget·total / resolution`` parameters, so the result never exceeds the budget.
    Ties go to the cheaper candidate and the earlier layer name: deterministic.

    Args:
        options: ``{layer: LayerOptions}`` (an MLP's :class:`GroupOptions` too).
        budget: the fraction (0, 1] of the layers' dense parameters to keep (with
            ``cost="seconds"``: of their modelled forward time).
        resolution: cost units the budget is divided into.
        cost: ``"params"`` or ``"seconds"`` (the options must be priced).

    Returns:
        ``{layer: rank or None}`` (None: keep dense); an MLP's entry is its choice.

    Raises:
        ValueError: the budget is out of range, or below the cheapest candidates' total.
    """
    import numpy as np

    check_fraction("budget", budget)
    check_choice("cost", cost, ("params", "seconds"))
    if not options:
        return {}
    names = sorted(options)
    costs = {n: o.params if cost == "params" else o.seconds for n, o in options.items()}
    total = sum(o.dense_params if cost == "params" else o.dense_seconds for o in options.values())
    allowed = budget * total
    cheapest = sum(min(costs[n]) for n in names)
    if cheapest > allowed:
        if cost == "params":
            have, need = f"{int(allowed):,} of {total:,} parameters", f"{cheapest:,}"
        else:
            have, need = f"{allowed:.3g} of {total:.3g} modelled seconds", f"{cheapest:.3g}"
        raise InputError(
            f"budget={budget} keeps {have}, but the smallest candidate ranks of the "
            f"{len(names)} layers already need {need}"
        )
    unit = allowed / resolution
    cap = resolution
    inf = float("inf")
    best = np.zeros(cap + 1)  # best[c]: least loss with at most c units used
    choices = np.zeros((len(names), cap + 1), dtype=np.int16)
    for li, n in enumerate(names):
        opt = options[n]
        new = np.full(cap + 1, inf)
        pick = np.zeros(cap + 1, dtype=np.int16)
        order = sorted(range(len(opt.choices)), key=lambda k: costs[n][k])
        for k in order:
            w = math.ceil(costs[n][k] / unit - 1e-9)
            if w > cap:
                continue
            cand = np.full(cap + 1, inf)
            cand[w:] = best[: cap + 1 - w] + opt.loss[k]
            better = cand < new
            new[better] = cand[better]
            pick[better] = k
        best = new
        choices[li] = pick
    c = int(np.argmin(best))  # least loss; argmin returns the smallest such capacity
    if not math.isfinite(best[c]):  # pragma: no cover - excluded by the cheapest check
        raise InputError(f"budget={budget} cannot be met")
    plan: dict[str, Any] = {}
    for li in range(len(names) - 1, -1, -1):
        n = names[li]
        k = int(choices[li, c])
        plan[n] = options[n].choices[k]
        c -= math.ceil(costs[n][k] / unit - 1e-9)
    return {n: plan[n] for n in names}


def _pays(speed: SpeedRule | None, out_f: int, in_f: int, rank: int, dtype: torch.dtype) -> bool:
    return (
        speed is None
        or speed.reason(out_f, in_f, rank, row_scales=False, bias=True, dtype=dtype) is None
    )


def loss_aware_ranks(
    modules: Mapping[str, nn.Module],
    sensitivity: Mapping[str, Sensitivity],
    budget: float,
    *,
    grid: Sequence[float] | None = None,
    speed: SpeedRule | None = None,
) -> tuple[dict[str, int | None], dict[str, LayerOptions]]:
    """Per-layer ranks (None: keep dense) minimising the estimated loss within ``budget``:
    :func:`allocate_loss_aware` without MLP width reduction.

    Returns:
        ``(plan, options)``: ``{layer: rank or None}`` for every module, and the candidates
        with their estimates of the layers that have sensitivity.

    Raises:
        ValueError: ``budget`` out of range, or too small for the smallest candidates.
    """
    result = allocate_loss_aware(modules, sensitivity, budget, grid=grid, speed=speed)
    return result.ranks, result.options  # type: ignore[return-value]


def allocate_loss_aware(
    modules: Mapping[str, nn.Module],
    sensitivity: Mapping[str, Sensitivity],
    budget: float | None,
    *,
    mlps: Sequence[Mlp] = (),
    grid: Sequence[float] | None = None,
    speed: SpeedRule | None = None,
    target_speedup: float | None = None,
    tokens: int = 1,
) -> Allocation:
    """The plan minimising the estimated loss within ``budget``: each layer's rank or dense,
    and each of ``mlps`` either cut in width (:mod:`~lowrank_layers.narrow`) or left to its
    layers' ranks, whichever costs less loss for its parameters.

    ``budget`` is the fraction of all ``modules``' weight parameters kept. A layer without
    sensitivity (no gradient reached it: its output does not feed the objective, such as
    BERT's pooler for the hidden states) cannot be ranked by its effect: it gets the
    largest rank within ``budget`` of its own weight (a uniform ratio), and the others share
    what is left. With ``speed``, ranks not expected to be fast enough are no candidates
    (the layer may stay dense); a narrowed MLP is as much faster as it is smaller.

    With ``target_speedup`` instead of ``budget``: the least-loss plan whose modelled forward
    time of all the layers together, at ``tokens`` per call (:mod:`~lowrank_layers.speed`),
    is at most ``1 / target_speedup`` of theirs dense (layers without sensitivity stay
    dense); :attr:`Allocation.predicted_speedup` says what the plan reaches.

    Raises:
        ValueError: ``budget`` out of range, or too small for the smallest candidates; both
            or neither of ``budget`` and ``target_speedup``.
    """
    check_allocation_target(budget, target_speedup)
    priced = tokens if target_speedup is not None else None
    options = loss_options(modules, sensitivity, mlps=mlps, grid=grid, speed=speed,
                           tokens=priced)  # fmt: skip
    return solve_loss_aware(modules, options, budget, speed=speed, target_speedup=target_speedup,
                            tokens=tokens)  # fmt: skip


def check_allocation_target(budget: float | None, target_speedup: float | None) -> None:
    """Refuse both or neither of ``budget`` and ``target_speedup``, or either out of range."""
    if (budget is None) == (target_speedup is None):
        raise InputError("give budget= or target_speedup=, exactly one of them")
    if target_speedup is not None:
        check_speedup_target(target_speedup)
    else:
        check_fraction("budget", budget)


def loss_options(
    modules: Mapping[str, nn.Module],
    sensitivity: Mapping[str, Sensitivity],
    *,
    mlps: Sequence[Mlp] = (),
    grid: Sequence[float] | None = None,
    speed: SpeedRule | None = None,
    tokens: int | None = None,
) -> dict[str, LayerOptions | GroupOptions]:
    """The candidates of :func:`allocate_loss_aware`: each layer's ranks with their
    estimated losses (:func:`rank_options`), and each MLP of ``mlps`` whose layers all have
    sensitivity as one group (its widths and its layers' ranks, :func:`mlp_options`), keyed
    by its output layer; ``tokens``: price each candidate's modelled time at that many
    tokens per call (for a speed target). Layers without sensitivity get none. The
    candidates of disjoint sets of layers may be made apart and merged (one block at a
    time) before :func:`solve_loss_aware`."""
    options: dict[str, LayerOptions | GroupOptions] = {}
    for n, m in modules.items():
        if n in sensitivity:
            options[n] = rank_options(m.weight, sensitivity[n], grid=grid, speed=speed,
                                      tokens=tokens)  # fmt: skip
            release_free_heap()  # its float64 working matrices, fragmented in glibc's heap
    for mlp in mlps:
        if all(n in options for n in mlp.layers):
            layer_opts = {n: options.pop(n) for n in mlp.layers}
            s = sensitivity[mlp.output]
            curve = width_curve(s.input_cov, s.weight_grad_cov(modules[mlp.output].weight))
            release_free_heap()
            dtype = modules[mlp.output].weight.dtype
            options[mlp.output] = mlp_options(
                mlp,
                layer_opts,
                curve,
                grid=grid,
                tokens=tokens,
                dtype=dtype,  # type: ignore[arg-type]
            )
    return options


def solve_loss_aware(
    modules: Mapping[str, nn.Module],
    options: Mapping[str, LayerOptions | GroupOptions],
    budget: float | None,
    *,
    speed: SpeedRule | None = None,
    target_speedup: float | None = None,
    tokens: int = 1,
) -> Allocation:
    """The plan of :func:`allocate_loss_aware` from its candidates (:func:`loss_options`,
    priced at ``tokens`` for a ``target_speedup``): the layers of ``modules`` without
    candidates get the largest rank within ``budget`` of their own weight (dense for a
    speed target), and the budget's rest is solved exactly over the candidates. Reads only
    the modules' weight shapes."""
    check_allocation_target(budget, target_speedup)
    cost = "params" if budget is not None else "seconds"
    priced = tokens if target_speedup is not None else None
    options = dict(options)
    grouped = {n for o in options.values() if isinstance(o, GroupOptions) for n in o.mlp.layers}
    fixed = {n: m for n, m in modules.items() if n not in options and n not in grouped}
    plan, fixed_cost = _fixed_plan(fixed, budget, speed, priced)
    if options:
        if cost == "params":
            total = sum(m.weight.numel() for m in modules.values())
            share = (budget * total - fixed_cost) / sum(o.dense_params for o in options.values())  # type: ignore[operator]
        else:
            total = fixed_cost + sum(o.dense_seconds for o in options.values())
            share = (total / target_speedup - fixed_cost) / (total - fixed_cost)  # type: ignore[operator]
            fastest = fixed_cost + sum(min(o.seconds) for o in options.values())
            if total / fastest < target_speedup:  # type: ignore[operator]
                raise InputError(
                    f"target_speedup={target_speedup}: the fastest candidates of these layers "
                    f"reach {total / fastest:.2f}x (modelled, at {tokens} token(s) per call)"
                )
        if share <= 0:
            raise InputError(
                f"{'budget=' + str(budget) if budget is not None else 'the speed target'} is "
                f"used up by the {len(plan)} layers without sensitivity"
            )
        plan.update(solve_budget(options, min(share, 1.0), cost=cost))
    result = _split_plan(plan, modules, options)
    if target_speedup is not None:
        result.predicted_speedup = _predicted_speedup(result, modules, tokens)
    return result


def check_speedup_target(value: object) -> None:
    """Refuse a speed target that is not a number above 1."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 1:
        raise InputError(
            f"target_speedup must be a number above 1 (1.3: 30% faster), got {value!r}"
        )


def _fixed_plan(
    fixed: Mapping[str, nn.Module], budget: float | None, speed: SpeedRule | None,
    tokens: int | None,
) -> tuple[dict[str, Any], float]:  # fmt: skip
    """Layers without sensitivity: the budget's own ratio (dense under a speed target), and
    what they cost together (parameters, or modelled seconds at ``tokens``)."""
    plan: dict[str, Any] = {}
    total = 0.0
    for n, m in fixed.items():
        out_f, in_f = m.weight.shape
        r = None if budget is None else _saving_rank(out_f, in_f, budget)
        if r is not None and not _pays(speed, out_f, in_f, r, m.weight.dtype):
            r = None  # too small to save anything at this budget: dense, at full cost
        plan[n] = r
        if tokens is not None:
            total += layer_seconds(out_f, in_f, r, tokens, m.weight.dtype)
        else:
            total += (
                out_f * in_f if r is None else factor_parameters(out_f, in_f, r, row_scales=False)
            )
    return plan, total


def _split_plan(
    plan: Mapping[str, Any],
    modules: Mapping[str, nn.Module],
    options: dict[str, LayerOptions | GroupOptions],
) -> Allocation:
    narrowed: dict[str, Narrowing] = {}
    ranks: dict[str, int | None] = {}
    for n, choice in plan.items():
        if isinstance(choice, Narrowing):
            narrowed[n] = choice
        elif isinstance(choice, dict):
            ranks.update(choice)
        else:
            ranks[n] = choice
    return Allocation({n: ranks[n] for n in modules if n in ranks}, narrowed, options)


def _predicted_speedup(result: Allocation, modules: Mapping[str, nn.Module], tokens: int) -> float:
    """Dense modelled time over planned modelled time, all the layers together."""
    dense = planned = 0.0
    for n, m in modules.items():
        out_f, in_f = m.weight.shape
        dense += layer_seconds(out_f, in_f, None, tokens, m.weight.dtype)
        if n in result.ranks:
            planned += layer_seconds(out_f, in_f, result.ranks[n], tokens, m.weight.dtype)
    for cut in result.narrowed.values():
        for n in cut.mlp.layers:
            m = modules[n]
            out_f, in_f = m.weight.shape
            shape = (out_f, cut.width) if n == cut.mlp.output else (cut.width, in_f)
            planned += layer_seconds(*shape, None, tokens, m.weight.dtype)
    return dense / planned


def mlp_options(
    mlp: Mlp,
    layer_options: Mapping[str, LayerOptions],
    curve: WidthCurve,
    *,
    grid: Sequence[float] | None = None,
    tokens: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> GroupOptions:
    """An MLP's candidates: its width cut to each fraction of ``grid`` (default 0.01, 0.02,
    ..., 0.99, with ``curve``'s loss), and every combination of its layers' own candidates
    that no other combination beats in both cost and loss. With ``tokens`` (the layers'
    options priced at it, weights of ``dtype``) the cost is modelled seconds, else
    parameters."""
    names = list(mlp.layers)
    grids = [layer_options[n] for n in names]
    timed = tokens is not None
    # the Pareto front of the combinations, folded in layer by layer: a combination on the
    # front of the whole is made of combinations on the fronts of its parts (cost and loss
    # add up), so no front is lost, and a fine grid costs |front|·|options| per layer
    # instead of the product of all the layers' options
    front: list[tuple[float, float, Any]] = [(0.0, 0.0, (0, 0.0, 0.0, {}))]
    for n, o in zip(names, grids, strict=True):
        combos = []
        for _, _, (params, secs, loss, ranks) in front:
            for k, r in enumerate(o.ranks):
                p, t = params + o.params[k], secs + (o.seconds[k] if timed else 0.0)
                c = (p, t, loss + o.loss[k], {**ranks, n: r})
                combos.append((t if timed else p, c[2], c))
        front = _pareto(combos)
    choices: list[tuple[int, float, float, Any]] = [c for _, _, c in front]
    fractions = DEFAULT_GRID if grid is None else list(grid)
    widths = sorted({max(1, round(f * mlp.width)) for f in fractions} - {mlp.width})
    for w in widths:
        secs = 0.0
        if tokens is not None:
            secs = layer_seconds(mlp.hidden, w, None, tokens, dtype)
            secs += len(mlp.inputs) * layer_seconds(w, mlp.hidden, None, tokens, dtype)
        cut = Narrowing(mlp, curve.channels(w))
        choices.append((mlp.params(w), secs, float(curve.loss[w]), cut))
    return GroupOptions(
        mlp,
        dense_params=sum(o.dense_params for o in grids),
        choices=[c[3] for c in choices],
        params=[c[0] for c in choices],
        loss=[c[2] for c in choices],
        seconds=[c[1] for c in choices] if timed else [],
        dense_seconds=sum(o.dense_seconds for o in grids) if timed else 0.0,
    )


def _pareto(items: list[tuple[int, float, Any]]) -> list[tuple[int, float, Any]]:
    """The items no other beats in both cost (first) and loss (second), cheapest first."""
    front: list[tuple[int, float, Any]] = []
    for item in sorted(items, key=lambda t: (t[0], t[1])):
        if not front or item[1] < front[-1][1]:
            front.append(item)
    return front


# ------------------------------------------------------------------------------------------
# spectral allocation: a budget shared from the singular values alone
# ------------------------------------------------------------------------------------------


SPECTRAL_ALLOCATIONS: tuple[str, ...] = ("minimax", "greedy")


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
    check_choice("allocation", allocation, SPECTRAL_ALLOCATIONS)
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
