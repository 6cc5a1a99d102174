"""The best conversion of a pretrained model in one call: :func:`compress`.

The stages, each usable on its own:

1. loss-aware allocation (:mod:`~lowrank_layers.allocate`): one gradient pass estimates
   what each layer costs the model's output at every rank; the budget is solved exactly,
   and layers may stay dense;
2. propagated conversion (:mod:`~lowrank_layers.propagate`): layers factorized in forward
   order for the inputs the converted layers before them really produce;
3. healing (:mod:`~lowrank_layers.heal`, optional): a short distillation towards the
   original model.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .allocate import collect_sensitivity, loss_aware_ranks
from .common import InputError, check_choice, check_fraction
from .convert import ConversionReport, convert_model, convertible_layers
from .heal import check_heal_options, heal
from .speed import speed_rule

__all__ = ["CompressionReport", "compress"]

ALLOCATIONS: tuple[str, ...] = ("loss", "uniform")


@dataclass
class CompressionReport:
    """What :func:`compress` did.

    Attributes:
        conversion: the layer-by-layer :class:`~lowrank_layers.ConversionReport`.
        plan: the loss-aware plan, ``{layer: rank or None (dense)}``, when allocated.
        heal: the :class:`~lowrank_layers.heal.HealReport`, when healed.
        seconds: wall time per stage (``"allocation"``, ``"conversion"``, ``"heal"``).
    """

    conversion: ConversionReport
    plan: dict[str, int | None] | None = None
    heal: Any = None
    seconds: dict[str, float] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [str(self.conversion)]
        if self.plan is not None:
            dense = sum(1 for r in self.plan.values() if r is None)
            lines.append(f"loss-aware plan: {dense} of {len(self.plan)} layers kept dense")
        if self.heal is not None:
            lines.append(str(self.heal))
        lines.append("stages: " + ", ".join(f"{k} {v:.1f} s" for k, v in self.seconds.items()))
        return "\n".join(lines)


def _batch_tokens(batch: Any) -> int:
    """Tokens in one batch: its unmasked ``attention_mask`` entries, else the leading
    dimensions of its first tensor (``input_ids``: batch x length; features: all but the
    last dimension)."""
    import torch

    if isinstance(batch, Mapping):
        mask = batch.get("attention_mask")
        if isinstance(mask, torch.Tensor):
            return int(mask.sum())
        batch = next((v for v in batch.values() if isinstance(v, torch.Tensor)), None)
    elif isinstance(batch, (tuple, list)):
        batch = next((v for v in batch if isinstance(v, torch.Tensor)), None)
    if not isinstance(batch, torch.Tensor) or batch.dim() == 0:
        return 1
    if batch.is_floating_point():
        return batch.numel() // max(1, batch.shape[-1])
    return batch.numel()


def _first_tokens(batches: Sequence[Any], tokens: int | None) -> Sequence[Any]:
    """The shortest prefix of ``batches`` holding at least ``tokens`` tokens."""
    if tokens is None:
        return batches
    total = 0
    for i, batch in enumerate(batches):
        total += _batch_tokens(batch)
        if total >= tokens:
            return batches[: i + 1]
    return batches


def compress(
    model: nn.Module,
    calibration: Sequence[Any],
    *,
    budget: float = 0.8,
    allocation: str = "loss",
    propagate: bool = True,
    sensitivity_tokens: int | None = 2048,
    objective: str = "auto",
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    eval_batches: Sequence[Any] | None = None,
    heal_steps: int | None = None,
    heal_seconds: float | None = None,
    heal_batches: Sequence[Any] | None = None,
    heal_mode: str = "end_to_end",
    heal_lr: float = 1e-4,
    teacher: nn.Module | None = None,
    min_speedup: float | None = None,
    speedup_tokens: int = 1,
    seed: int = 0,
    progress: bool = False,
) -> CompressionReport:
    """Convert ``model`` in place to keep ``budget`` of its Linear parameters, at the best
    quality this library knows: loss-aware ranks, propagated whitening, optional healing.

    Args:
        model: a pretrained model, changed in place.
        calibration: a list of batches the model takes (``model(**b)`` for a dict, see
            :func:`~lowrank_layers.calibrate.run_batch`); an ``attention_mask`` in a dict
            batch keeps padding out.
        budget: the fraction (0, 1] of the converted layers' weight parameters kept.
        allocation: ``"loss"`` (each layer's rank from its estimated effect on the output;
            layers may stay dense) or ``"uniform"`` (``param_ratio=budget`` everywhere).
        propagate: factorize each layer for the inputs of the partially converted model.
        sensitivity_tokens: the gradient pass of the loss-aware allocation uses the first
            calibration batches holding at least this many tokens (None: all of them); it
            costs about three forward passes per batch. On SmolLM2 at 80%, one batch of
            8 x 256 tokens gave 1.474x the original's perplexity, two 1.466x (11 s more),
            four 1.460x.
        objective: the output the allocation and healing protect: ``"kl"`` (next-token
            distribution), ``"mse"`` / ``"cosine"`` (hidden states) or ``"auto"`` (``"kl"``
            when the model returns ``logits``).
        include, exclude, filter_fn: which layers, as :func:`~lowrank_layers.convert_model`.
        eval_batches: held-out batches for the report's output errors and the healing's
            before/after metric; never the calibration data.
        heal_steps, heal_seconds: heal (distil towards the original) for this many steps
            and/or seconds; neither: no healing.
        heal_batches: the healing data (default: the calibration batches).
        heal_mode: ``"end_to_end"`` or ``"blockwise"`` (see :func:`~lowrank_layers.heal.heal`).
        heal_lr: the healing learning rate.
        teacher: the original model for healing; by default a deep copy taken before
            conversion (one more model in memory while healing).
        min_speedup, speedup_tokens: only ranks whose forward is expected to be at least
            ``min_speedup`` times as fast as ``nn.Linear`` at ``speedup_tokens`` tokens per
            call are candidates; the others keep their layer dense (see
            :func:`~lowrank_layers.convert_model`).
        seed: seeds the allocation's sampled probes, the sketches and the healing.
        progress: tqdm bars.

    Returns:
        A :class:`CompressionReport`.

    Raises:
        ValueError: a bad option, or calibration that yields no tokens; the model is then
            unchanged.

    Example:
        >>> import torch
        >>> model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
        >>> batches = [torch.randn(64, 32, generator=torch.Generator().manual_seed(i))
        ...            for i in range(4)]
        >>> report = compress(model, batches, budget=0.6)
        >>> report.conversion.params_after <= 0.6 * (32 * 64 * 2)
        True
    """
    check_fraction("budget", budget)
    check_choice("allocation", allocation, ALLOCATIONS)
    if not isinstance(calibration, Sequence) or len(calibration) == 0:
        raise InputError(
            "compress: calibration must be a non-empty list of batches, got "
            f"{type(calibration).__name__}"
        )
    healing = heal_steps is not None or heal_seconds is not None
    if healing:  # refuse bad healing options before the model changes
        check_heal_options(
            objective=objective, mode=heal_mode, steps=heal_steps, seconds=heal_seconds,
            lr=heal_lr,
        )  # fmt: skip
    elif objective not in ("auto", "kl", "cosine", "mse"):
        raise InputError(
            f"objective must be one of 'auto', 'kl', 'cosine', 'mse', got {objective!r}"
        )
    speed = speed_rule(min_speedup, speedup_tokens)
    seconds: dict[str, float] = {}
    if healing and teacher is None:
        teacher = copy.deepcopy(model)
    layers = convertible_layers(model, include=include, exclude=exclude, filter_fn=filter_fn)
    plan = None
    policy: dict[str, Any]
    if allocation == "loss" and layers:  # no layer to rank: convert_model reports why
        start = time.perf_counter()
        subset = _first_tokens(calibration, sensitivity_tokens)
        probe = {"auto": "auto", "kl": "kl"}.get(objective, "mse")
        sens = collect_sensitivity(model, subset, layers, objective=probe, seed=seed)
        plan, _ = loss_aware_ranks(layers, sens, budget, speed=speed)
        seconds["allocation"] = time.perf_counter() - start
        policy = {"ranks": plan}
    else:
        policy = {"param_ratio": budget}
    start = time.perf_counter()
    conversion = convert_model(
        model,
        include=include,
        exclude=exclude,
        filter_fn=filter_fn,
        calibration=calibration,
        propagate=propagate,
        eval_batches=eval_batches,
        min_speedup=min_speedup,
        speedup_tokens=speedup_tokens,
        seed=seed,
        progress=progress,
        **policy,
    )
    seconds["conversion"] = time.perf_counter() - start
    result = CompressionReport(conversion, plan, None, seconds)
    if healing:
        start = time.perf_counter()
        result.heal = heal(
            model,
            teacher,  # type: ignore[arg-type]
            heal_batches if heal_batches is not None else calibration,
            objective=objective,
            mode=heal_mode,
            steps=heal_steps,
            seconds=heal_seconds,
            lr=heal_lr,
            eval_batches=eval_batches,
            seed=seed,
            progress=progress,
        )
        seconds["heal"] = time.perf_counter() - start
    return result
