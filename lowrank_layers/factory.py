"""``make_efficient_linear``: low rank where it pays, ``nn.Linear`` elsewhere."""

from __future__ import annotations

import torch
from torch import nn

from .common import InputError, check_int
from .linear import LowRankLinear, check_features
from .policy import RankPolicy, as_policy

__all__ = ["make_efficient_linear"]


def make_efficient_linear(
    in_features: int,
    out_features: int,
    policy: RankPolicy | None = None,
    *,
    rank_ratio: float | None = None,
    threshold: int = 512,
    bias: bool = True,
    row_scales: bool = False,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """A :class:`~lowrank_layers.LowRankLinear` for large layers, an ``nn.Linear`` otherwise.

    The layer is low rank when ``in_features·out_features > threshold²`` and the rank
    ``max(1, round(rank_ratio·min(in, out)))`` saves parameters (its factors hold
    fewer numbers than the dense weight); otherwise it is a plain ``nn.Linear``.
    The original design's presets: attention projections at ``rank_ratio=0.1``,
    feed-forward layers at ``0.15``.

    Args:
        in_features, out_features: the layer's sizes.
        policy: a :class:`~lowrank_layers.RankPolicy` (``rank``, ``rank_ratio`` or
            ``param_ratio``; ``energy`` needs a weight), or
        rank_ratio: fraction of ``min(in, out)`` kept, in (0, 1] (default 0.1, when no
            policy is given).
        threshold: size threshold; ``0`` makes every layer that saves parameters low rank.
        bias, row_scales, device, dtype: as for :class:`~lowrank_layers.LowRankLinear`.

    Example:
        >>> make_efficient_linear(1024, 4096)
        LowRankLinear(in_features=1024, out_features=4096, rank=102, bias=True, row_scales=False)
        >>> make_efficient_linear(256, 256)
        Linear(in_features=256, out_features=256, bias=True)
    """
    check_features("in_features", in_features)
    check_features("out_features", out_features)
    check_int("threshold", threshold, 0)
    policy = as_policy(policy, rank_ratio=rank_ratio, required=False) or RankPolicy(rank_ratio=0.1)
    if policy.energy is not None:
        raise InputError(
            f"{policy} needs a weight's spectrum; make_efficient_linear builds from sizes: "
            "give rank, rank_ratio or param_ratio"
        )
    # the converter's rule: above the threshold, and factors that save parameters
    rank, _ = policy.plan(out_features, in_features, threshold=threshold, row_scales=row_scales)
    if rank is not None:
        return LowRankLinear(
            in_features,
            out_features,
            rank,
            bias=bias,
            row_scales=row_scales,
            device=device,
            dtype=dtype,
        )
    return nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
