"""The one per-layer decision every conversion shares: which rank a weight gets, or why it
stays as it is, and the report of a converted layer.

:func:`~lowrank_layers.convert_model` (a module) and
:func:`~lowrank_layers.convert_checkpoint` (a tensor read from a file) both ask
:func:`plan_layer` before factorizing — size threshold, a ratio too small for rank 1,
break-even, the speed rule — and hand the rank it planned to
:func:`~lowrank_layers.factorize` as ``RankPolicy(rank=r)``, which then does not derive it
again. Only an ``energy`` policy leaves the rank to the spectrum; :func:`check_rank` then
applies break-even and the speed rule to the rank the factorization found.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import ConversionConfig
from .policy import RankPolicy, break_even_reason, factor_parameters, saves_parameters
from .report import LayerReport
from .speed import report_speedups

__all__ = ["Shape", "check_rank", "converted_report", "plan_layer"]


@dataclass(frozen=True)
class Shape:
    """What the rules need to know of one weight: its sizes, whether its layer has a bias,
    and its dtype."""

    out_features: int
    in_features: int
    bias: bool
    dtype: torch.dtype


def plan_layer(
    shape: Shape, policy: RankPolicy, config: ConversionConfig
) -> tuple[RankPolicy | None, str | None]:
    """The rule to factorize one weight with, or why it is not converted.

    Returns ``(RankPolicy(rank=r), None)`` with the planned rank, ``(policy, None)`` for an
    ``energy`` policy (its rank is known only from the spectrum), or ``(None, reason)``: not
    above ``config.threshold``, a ratio too small for rank 1, a rank that saves no
    parameters, or (with ``config.min_speedup``) a rank not expected to run that much faster.
    """
    out_f, in_f = shape.out_features, shape.in_features
    planned, reason = policy.plan(
        out_f, in_f, threshold=config.threshold, row_scales=config.row_scales
    )
    if reason is None and planned is not None:
        reason = _speed_reason(shape, planned, config)
    if reason is not None:
        return None, reason
    return (policy if planned is None else RankPolicy(rank=planned)), None


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
