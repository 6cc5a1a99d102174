"""The one per-layer decision every conversion shares: which rank a weight gets, or why it
stays as it is, and the report of a converted layer.

:func:`~lowrank_layers.convert_model` (a module) and
:func:`~lowrank_layers.convert_checkpoint` (a tensor read from a file) both ask
:func:`plan_layer` before factorizing — size threshold, a ratio too small for rank 1,
break-even, the guard, the speed rule — and hand the rank it planned to
:func:`~lowrank_layers.factorize` as ``RankPolicy(rank=r)``, which then does not derive it
again. Only an ``energy`` policy leaves the rank to the spectrum; :func:`check_rank` then
applies break-even and the speed rule to the rank the factorization found.

The guard (``ConversionConfig(guard=True)``, the default) is :func:`guard_reason` plus the
speed rule ``config.speed`` gives without ``min_speedup``: layers a conversion cannot pay
for stay dense, each with its reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .checkpoint_format import is_narrowed
from .config import ConversionConfig
from .policy import RankPolicy, break_even_reason, factor_parameters, saves_parameters
from .report import LayerReport
from .speed import report_speedups
from .targets import Selection, is_embedding_name

__all__ = [
    "NARROWED_REASON",
    "NO_GRADIENT_REASON",
    "OUTSIDE_BLOCKS_REASON",
    "Shape",
    "check_rank",
    "converted_report",
    "guard_reason",
    "guard_reasons",
    "plan_layer",
    "shape_of",
]

NO_GRADIENT_REASON = (
    "no gradient of the objective reaches it (its output is not used): its error cannot be "
    "weighed, so the guard keeps it dense and the budget goes to the other layers "
    "(guard=False gives it the budget's own ratio)"
)
# a layer outside the repeated blocks, when the model is compressed from disk block by block
OUTSIDE_BLOCKS_REASON = (
    "outside the model's repeated blocks: compressing from disk (one block at a time) "
    "converts the layers inside them only"
)


@dataclass(frozen=True)
class Shape:
    """What the rules need to know of one weight: its sizes, whether its layer has a bias,
    and its dtype."""

    out_features: int
    in_features: int
    bias: bool
    dtype: torch.dtype


def shape_of(linear: nn.Linear) -> Shape:
    """The :class:`Shape` of an ``nn.Linear``."""
    return Shape(linear.out_features, linear.in_features, linear.bias is not None,
                 linear.weight.dtype)  # fmt: skip


def plan_layer(
    shape: Shape, policy: RankPolicy, config: ConversionConfig
) -> tuple[RankPolicy | None, str | None]:
    """The rule to factorize one weight with, or why it is not converted.

    Returns ``(RankPolicy(rank=r), None)`` with the planned rank, ``(policy, None)`` for an
    ``energy`` policy (its rank is known only from the spectrum), or ``(None, reason)``: not
    above ``config.threshold``, a ratio too small for rank 1, a rank that saves no
    parameters, too small to gain (the guard), or a rank not expected to run fast enough
    (``config.speed``).
    """
    out_f, in_f = shape.out_features, shape.in_features
    planned, reason = policy.plan(
        out_f, in_f, threshold=config.threshold, row_scales=config.row_scales
    )
    if reason is None and config.ranks is None:
        reason = guard_reason(shape, config)
    if reason is None and planned is not None:
        reason = _speed_reason(shape, planned, config)
    if reason is not None:
        return None, reason
    return (policy if planned is None else RankPolicy(rank=planned)), None


def guard_reason(
    shape: Shape, config: ConversionConfig, *, output_layer: bool = False
) -> str | None:
    """Why the guard keeps a weight dense whatever its rank, or None (always None with
    ``guard=False`` or a ``ranks`` plan, which is applied as given).

    ``output_layer``: the weight is the model's output layer (its last ``nn.Linear``). Any
    rank that saves parameters is below its number of outputs, so the predictions
    themselves would be mixed, with no later layer to correct them. Otherwise: too small to
    gain, when even rank 1 is expected to run slower than ``nn.Linear`` at every token count
    the guard judges (``config.speedup_tokens``, by default decoding and a batch: 1 and 1024
    tokens per call).
    """
    if not config.guard or config.ranks is not None:
        return None
    out_f, in_f = shape.out_features, shape.in_features
    if output_layer:
        return (
            f"the model's output layer: a rank below its {out_f} outputs mixes its predictions, "
            "with no later layer to correct them (guard=False converts it)"
        )
    rule = config.guard_speed
    xs = rule.speedups(out_f, in_f, 1, row_scales=config.row_scales, bias=shape.bias,
                       dtype=shape.dtype)  # fmt: skip
    if max(xs) >= 1.0:
        return None
    at = " and ".join(f"{x:.2f}x at {t}" for x, t in zip(xs, rule.token_counts, strict=True))
    return (
        f"too small to gain: even rank 1 is expected to run slower than nn.Linear ({at} "
        "tokens per call)"
    )


NARROWED_REASON = (
    "cut in width by an earlier compress (a narrowed MLP layer): the checkpoint format "
    "records its width only as a dense layer"
)


def guard_reasons(selection: Selection, config: ConversionConfig) -> dict[str, str]:
    """:func:`guard_reason` for every layer of ``selection`` the guard keeps dense, with the
    model's output layer as such (unless it is converted as an embedding-like layer, with
    ``embeddings=True``); and, guard or not, every layer an earlier ``compress`` cut in
    width (:data:`NARROWED_REASON`)."""
    reasons = {}
    for fqn, view in selection.views.items():
        if is_narrowed(view):
            reasons[fqn] = NARROWED_REASON
            continue
        output = fqn == selection.output_layer and not (
            config.embeddings and is_embedding_name(fqn)
        )
        reason = guard_reason(shape_of(view), config, output_layer=output)
        if reason is not None:
            reasons[fqn] = reason
    return reasons


def check_rank(shape: Shape, rank: int, policy: RankPolicy, config: ConversionConfig) -> str | None:
    """After factorizing with ``policy`` (from :func:`plan_layer`): why the rank found does
    not pay, or None. Break-even and the speed rule were checked beforehand for a planned
    rank; an ``energy`` policy's rank is checked only now."""
    if policy.energy is None:
        return None
    if not saves_parameters(shape.out_features, shape.in_features, rank,
                            row_scales=config.row_scales):  # fmt: skip
        return break_even_reason(rank)
    return _speed_reason(shape, rank, config)


def _speed_reason(shape: Shape, rank: int, config: ConversionConfig) -> str | None:
    speed = config.speed
    if speed is None:
        return None
    return speed.reason(
        shape.out_features, shape.in_features, rank, row_scales=config.row_scales,
        bias=shape.bias, dtype=shape.dtype,
    )  # fmt: skip


def converted_report(
    name: str,
    kind: str,
    shape: Shape,
    rank: int,
    *,
    row_scales: bool,
    relative_error: float | None,
    output_error: float | None = None,
    error_data: str | None = None,
    note: str | None = None,
) -> LayerReport:
    """The report of a layer factorized at ``rank``: parameters before and after, errors and
    the expected speed-ups."""
    out_f, in_f = shape.out_features, shape.in_features
    few, many = report_speedups(
        in_f, out_f, rank, row_scales=row_scales, bias=shape.bias, dtype=shape.dtype
    )
    return LayerReport(
        name=name,
        kind=kind,
        in_features=in_f,
        out_features=out_f,
        rank=rank,
        params_before=in_f * out_f,
        params_after=factor_parameters(out_f, in_f, rank, row_scales=row_scales),
        relative_error=relative_error,
        seconds=0.0,
        output_error=output_error,
        error_data=error_data,
        speedup_few=few,
        speedup_many=many,
        note=note,
    )
