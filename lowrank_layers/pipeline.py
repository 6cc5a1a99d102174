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
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .allocate import (
    Allocation,
    GroupOptions,
    LayerOptions,
    collect_sensitivity,
    loss_options,
    solve_loss_aware,
)
from .calibrate import batch_tokens, check_batches
from .common import InputError, InputTypeError, check_module
from .config import ConversionConfig, HealConfig, config_from
from .convert import convert_planned
from .heal import OBJECTIVES
from .heal import heal as run_heal  # compress's heal= argument is a HealConfig
from .layer_plan import NO_GRADIENT_REASON, OUTSIDE_BLOCKS_REASON, guard_reasons
from .memory import StageCost, measure_stage, release_free_heap
from .narrow import Narrowing, check_mlps, find_mlps
from .policy import threshold_reason
from .report import ConversionReport
from .sensitivity import Sensitivity, collect_sensitivity_blockwise
from .targets import select_layers

__all__ = ["CompressionReport", "check_compress_config", "compress"]


@dataclass
class CompressionReport:
    """What :func:`compress` did.

    Attributes:
        conversion: the layer-by-layer :class:`~lowrank_layers.ConversionReport`.
        plan: the loss-aware plan, ``{layer: rank or None (dense)}``, when allocated.
        narrowed: the MLPs the plan cut in width, ``{output layer: Narrowing}``.
        target_speedup, predicted_speedup, speedup_tokens: with a speed target, the target
            and the plan's modelled speed-up of the layers it ranked, at that many tokens
            per call (measure the model's own: the speed model prices the layers only).
        heal: the :class:`~lowrank_layers.heal.HealReport`, when healed.
        costs: each stage's :class:`~lowrank_layers.memory.StageCost` (``"allocation"``,
            ``"conversion"``, ``"heal"``): wall time, the process's peak resident memory
            during the stage, and the CUDA allocator's peak on a GPU.
    """

    conversion: ConversionReport
    plan: dict[str, int | None] | None = None
    heal: Any = None
    costs: dict[str, StageCost] = field(default_factory=dict)
    narrowed: dict[str, Narrowing] = field(default_factory=dict)
    target_speedup: float | None = None
    predicted_speedup: float | None = None
    speedup_tokens: int | None = None

    @property
    def seconds(self) -> dict[str, float]:
        """Wall time per stage."""
        return {stage: cost.seconds for stage, cost in self.costs.items()}

    def __str__(self) -> str:
        lines = [str(self.conversion)]
        if self.plan is not None:
            dense = sum(1 for r in self.plan.values() if r is None)
            lines.append(f"loss-aware plan: {dense} of {len(self.plan)} layers kept dense")
        if self.predicted_speedup is not None:
            lines.append(
                f"speed target {self.target_speedup:g}x at {self.speedup_tokens} token(s) per "
                f"call: the plan's modelled speed-up of the ranked layers "
                f"{self.predicted_speedup:.2f}x"
            )
        if self.narrowed:
            cuts = ", ".join(f"{c.mlp.width}->{c.width}" for c in self.narrowed.values())
            lines.append(f"MLPs cut in width: {len(self.narrowed)} ({cuts})")
        if self.heal is not None:
            lines.append(str(self.heal))
        lines.append("stages: " + "; ".join(f"{k} {v}" for k, v in self.costs.items()))
        return "\n".join(lines)


def _first_tokens(batches: Sequence[Any], tokens: int | None) -> Sequence[Any]:
    """The shortest prefix of ``batches`` holding at least ``tokens`` tokens."""
    if tokens is None:
        return batches
    total = 0
    for i, batch in enumerate(batches):
        total += batch_tokens(batch)
        if total >= tokens:
            return batches[: i + 1]
    return batches


def compress(
    model: nn.Module,
    calibration: Sequence[Any],
    config: ConversionConfig | None = None,
    *,
    heal: HealConfig | None = None,
    heal_batches: Sequence[Any] | None = None,
    teacher: nn.Module | None = None,
    propagate: bool = True,
    sensitivity_tokens: int | None = 8192,
    objective: str = "auto",
    eval_batches: Sequence[Any] | None = None,
    narrow_mlps: bool = True,
    progress: bool = False,
    **options: Any,
) -> CompressionReport:
    """Compress a pretrained ``model`` in place, at the best quality this library knows:
    loss-aware ranks, propagated whitening, optional healing.

    What to convert is a :class:`~lowrank_layers.ConversionConfig` (``config``) or its
    fields as keywords (``compress(model, batches, budget=0.8, exclude=["lm_head"])``), not
    both. Its rank rule is usually a ``budget``: the fraction (0, 1] of the converted
    layers' weight parameters kept, shared by ``allocation`` — ``"loss"`` (the default:
    each layer's rank from its estimated effect on the output, layers may stay dense) or
    ``"uniform"`` (``param_ratio=budget`` everywhere). A rank policy or a ``ranks`` plan is
    applied as given, with propagation and healing.

    Args:
        model: a pretrained model, changed in place.
        calibration: a list of batches the model takes (``model(**b)`` for a dict, see
            :func:`~lowrank_layers.calibrate.run_batch`); an ``attention_mask`` in a dict
            batch keeps padding out.
        config: a :class:`~lowrank_layers.ConversionConfig`.
        heal: a :class:`~lowrank_layers.HealConfig`: then distil towards the original
            (:func:`~lowrank_layers.heal`); None: no healing.
        heal_batches: the healing data (default: the calibration batches).
        teacher: the original model for healing; by default a deep copy taken before
            conversion (one more model in memory while healing).
        propagate: factorize each layer for the inputs of the partially converted model.
        sensitivity_tokens: the gradient pass of the loss-aware allocation uses the first
            calibration batches holding at least this many tokens (None: all of them); it
            costs about three forward passes per batch. On SmolLM2 at 80%, one batch of
            8 x 256 tokens gave 1.474x the original's perplexity, two 1.466x (11 s more),
            four 1.460x; with the guard, 4,096 tokens (three batches) gave 1.54x and 8,192
            (five) 1.47x, each batch costing about 27 s there (2 cores). On MiniLM at 75%
            with the CLI's batches (8 x 256), 2,048 tokens (one batch: 8 documents) gave a
            held-out cosine from 0.826 to 0.923 depending on which documents came first;
            4,096 gave 0.914 to 0.924, 8,192 0.919 to 0.925.
        objective: the output the allocation and healing protect: ``"kl"`` (next-token
            distribution), ``"mse"`` / ``"cosine"`` (hidden states) or ``"auto"`` (``"kl"``
            when the model returns ``logits``).
        eval_batches: held-out batches for the report's output errors and the healing's
            before/after metric; never the calibration data.
        narrow_mlps: with the loss-aware allocation, an MLP (gate/up → down, fc1 → fc2) may
            also be cut to fewer intermediate channels, its output layer refit
            (:mod:`~lowrank_layers.narrow`): plain ``nn.Linear`` layers of smaller width,
            chosen where they cost less loss than factorizing its layers.
        progress: tqdm bars.
        **options: the fields of :class:`~lowrank_layers.ConversionConfig`, instead of
            ``config``.

    Returns:
        A :class:`CompressionReport`.

    Raises:
        ValueError: a bad option, or calibration that yields no tokens; the model is then
            unchanged.

    Example:
        >>> import torch
        >>> model = nn.Sequential(nn.Linear(128, 256), nn.GELU(), nn.Linear(256, 128),
        ...                       nn.GELU(), nn.Linear(128, 8))
        >>> batches = [torch.randn(64, 128, generator=torch.Generator().manual_seed(i))
        ...            for i in range(4)]
        >>> report = compress(model, batches, budget=0.6)
        >>> report.conversion.params_after <= 0.6 * (128 * 256 * 2)  # the 8-way head: dense
        True
        >>> type(model[4]).__name__
        'Linear'
    """
    check_module("model", model, "compress(model, calibration, config)")
    config = config_from(config, options, caller="compress")
    return run_compress(
        model, calibration, config, heal=heal, heal_batches=heal_batches, teacher=teacher,
        propagate=propagate, sensitivity_tokens=sensitivity_tokens, objective=objective,
        eval_batches=eval_batches, narrow_mlps=narrow_mlps, progress=progress,
    )  # fmt: skip


@dataclass
class Offload:
    """How :func:`run_compress` reaches a model held on disk
    (:func:`~lowrank_layers.offload.compress_offloaded`): its blocks (``container``'s
    children), the scope that loads a block for the gradient pass (``holding(block)``) and
    the one around its conversion (``converting(i)``: loads it, writes it out, releases
    it), a folder for the stashed hidden states, and the device the weights are read onto."""

    container: str
    blocks: list[nn.Module]
    holding: Callable[[nn.Module], AbstractContextManager[Any]]
    converting: Callable[[int], AbstractContextManager[Any]]
    stash: Path | None = None
    device: torch.device | None = None


def run_compress(
    model: nn.Module,
    calibration: Sequence[Any],
    config: ConversionConfig,
    *,
    heal: HealConfig | None = None,
    heal_batches: Sequence[Any] | None = None,
    teacher: nn.Module | None = None,
    propagate: bool = True,
    sensitivity_tokens: int | None = 8192,
    objective: str = "auto",
    eval_batches: Sequence[Any] | None = None,
    narrow_mlps: bool = True,
    progress: bool = False,
    offload: Offload | None = None,
) -> CompressionReport:
    """:func:`compress` with its ``config`` made; ``offload``: the model is held on disk
    and processed one block at a time (then no healing and no ``eval_batches``)."""
    _check_options(config, calibration, heal, objective)
    if offload is not None and (heal is not None or eval_batches is not None or not propagate):
        raise InputError(
            "compressing from disk (one block at a time) neither heals nor takes "
            "eval_batches, and always propagates: heal=None, eval_batches=None, propagate=True"
        )
    costs: dict[str, StageCost] = {}
    device = next((p.device for p in model.parameters()), None)
    if offload is not None:  # on disk: read onto its device
        device = offload.device
    if heal is not None and teacher is None:
        teacher = copy.deepcopy(model)
    allocation = None
    plan, narrowed, reasons = None, {}, {}
    target, tokens = config.target_speedup, config.speedup_tokens or 1
    aims = config.budget is not None or config.target_speedup is not None
    if aims and config.allocation in ("auto", "loss"):
        with measure_stage(costs, "allocation", device):
            allocation, reasons = _loss_aware_plan(
                model, calibration, config, sensitivity_tokens, objective, narrow_mlps, offload
            )
    if allocation is not None:
        plan = {**allocation.ranks, **dict.fromkeys(reasons)}
        narrowed = allocation.narrowed
    if plan is not None or config.target_speedup is not None:  # no layer to rank: none
        config = dataclasses.replace(config, budget=None, target_speedup=None,
                                     ranks=plan or {}, allocation="auto")  # fmt: skip
    elif config.budget is not None:  # uniform, or no layer to rank (convert_model says why)
        config = dataclasses.replace(config, budget=None, param_ratio=config.budget,
                                     allocation="auto")  # fmt: skip
    with measure_stage(costs, "conversion", device):
        conversion = convert_planned(
            model, config, calibration=calibration, propagate=propagate,
            eval_batches=eval_batches, progress=progress, reasons=reasons, narrowed=narrowed,
            block_scope=None if offload is None else offload.converting,
            stash=None if offload is None else offload.stash,
        )  # fmt: skip
    result = CompressionReport(conversion, plan, None, costs, narrowed)
    if allocation is not None and target is not None:
        result.target_speedup, result.speedup_tokens = target, tokens
        result.predicted_speedup = allocation.predicted_speedup
    if heal is not None:
        with measure_stage(costs, "heal", device):
            result.heal = run_heal(
                model, teacher, heal_batches if heal_batches is not None else calibration,
                objective=objective, mode=heal.mode, steps=heal.steps, seconds=heal.seconds,
                lr=heal.lr, eval_batches=eval_batches, seed=config.seed, progress=progress,
            )  # fmt: skip
    return result


def _check_options(
    config: ConversionConfig, calibration: Any, heal: HealConfig | None, objective: str
) -> None:
    """Refuse bad options before the model changes."""
    check_batches(calibration)
    if not isinstance(calibration, Sequence) or len(calibration) == 0:
        raise InputError(
            "compress: calibration must be a non-empty list of batches, got "
            f"{type(calibration).__name__}"
        )
    check_compress_config(config)
    if heal is not None and not isinstance(heal, HealConfig):
        raise InputTypeError(f"compress: heal must be a HealConfig or None, got {heal!r}")
    if objective not in OBJECTIVES:
        raise InputError(
            f"objective must be one of {', '.join(map(repr, OBJECTIVES))}, got {objective!r}"
        )


def check_compress_config(config: ConversionConfig) -> None:
    """Refuse a config :func:`compress` cannot follow (no rank rule, a spectral
    allocation), before anything is loaded or changed."""
    if config.rule is None:
        raise InputError(
            "compress needs a rank rule: budget= (for example budget=0.8), a rank policy "
            "(rank, rank_ratio, energy, param_ratio) or ranks="
        )
    if config.allocation in ("minimax", "greedy"):
        raise InputError(
            f"compress: allocation={config.allocation!r} shares the budget from the weights' "
            "spectra alone; with calibration data use 'loss' (the default) or 'uniform' "
            f"(or convert_model(model, budget=..., allocation={config.allocation!r}) without "
            "data)"
        )


def _loss_aware_plan(
    model: nn.Module,
    calibration: Sequence[Any],
    config: ConversionConfig,
    sensitivity_tokens: int | None,
    objective: str,
    narrow_mlps: bool,
    offload: Offload | None = None,
) -> tuple[Allocation | None, dict[str, str]]:
    """Each layer's rank (None: dense) and the MLPs cut in width, from one gradient pass
    (:mod:`~lowrank_layers.allocate`), and why layers stay dense; the allocation is None
    when there is no layer to rank (``convert_model`` reports why).

    The guard's layers (:func:`~lowrank_layers.layer_plan.guard_reasons`) and, with
    ``guard``, those no gradient of the objective reaches stay dense outside the budget,
    which the others share. With ``offload`` the pass runs block by block, each block's
    candidates made while it is loaded; layers outside the blocks stay dense."""
    selection = select_layers(model, config, warn=False)
    reasons = guard_reasons(selection, config)
    if offload is not None:
        inside = {id(m) for block in offload.blocks for m in block.modules()}
        reasons.update(
            (name, OUTSIDE_BLOCKS_REASON)
            for name, m in selection.eligible.items()
            if id(m) not in inside and name not in reasons
        )
    # the output layer is observed too: if no gradient reaches it, that is the reason to give
    observed = {
        name: m
        for name, m in selection.eligible.items()
        if threshold_reason(m.out_features, m.in_features, config.threshold) is None
        and (name not in reasons or (name == selection.output_layer and offload is None))
    }
    if all(name in reasons for name in observed):  # nothing the budget could go to
        return None, reasons
    mlps = []
    if narrow_mlps:  # checked before the gradient pass: not beside its statistics' peak
        found = find_mlps({n: m for n, m in observed.items() if n not in reasons})
        mlps, _ = check_mlps(model, found, _head(calibration[0], 2), seed=config.seed)
    subset = _first_tokens(calibration, sensitivity_tokens)
    probe = {"auto": "auto", "kl": "kl"}.get(objective, "mse")
    priced = (config.speedup_tokens or 1) if config.target_speedup is not None else None
    options: dict[str, LayerOptions | GroupOptions] = {}
    if offload is None:
        sens = collect_sensitivity(model, subset, observed, objective=probe, seed=config.seed)
        reached = set(sens)
    else:
        layers = {n: m for n, m in observed.items() if n not in reasons}
        reached = set()

        def candidates(i: int, found: dict[str, Sensitivity]) -> None:
            reached.update(found)
            held = [m for m in mlps if all(n in found and n in layers for n in m.layers)]
            mine = {n: layers[n] for n in found if n in layers}
            options.update(loss_options(mine, found, mlps=held, speed=config.speed,
                                        tokens=priced))  # fmt: skip

        collect_sensitivity_blockwise(
            model, offload.container, offload.blocks, subset, layers, objective=probe,
            seed=config.seed, block_scope=lambda i: offload.holding(offload.blocks[i]),
            stash=offload.stash, on_block=candidates,
        )  # fmt: skip
    if config.guard:
        reasons.update((name, NO_GRADIENT_REASON) for name in observed if name not in reached)
    layers = {name: m for name, m in observed.items() if name not in reasons}
    if not layers:
        return None, reasons
    if offload is None:
        mlps = [m for m in mlps if all(n in layers and n in sens for n in m.layers)]
        options = loss_options(layers, sens, mlps=mlps, speed=config.speed, tokens=priced)
        del sens
        release_free_heap()  # the statistics, freed: their pages back before the solve
    options = {n: o for n, o in options.items() if n in layers}
    result = solve_loss_aware(
        layers, options, config.budget, speed=config.speed,
        target_speedup=config.target_speedup, tokens=config.speedup_tokens or 1,
    )  # fmt: skip
    for name, rank in result.ranks.items():
        if rank is None:
            reasons[name] = _plan_reason(result.options.get(name), config)
    return result, reasons


def _head(batch: Any, rows: int) -> Any:
    """The first ``rows`` sequences of a batch (a tensor or a dict of tensors)."""
    if isinstance(batch, torch.Tensor):
        return batch[:rows]
    if isinstance(batch, Mapping):
        return {k: v[:rows] if isinstance(v, torch.Tensor) and v.ndim else v
                for k, v in batch.items()}  # fmt: skip
    return batch


def _plan_reason(options: Any, config: ConversionConfig) -> str:
    """Why the loss-aware plan keeps a layer dense (``options``: its candidates, None for a
    layer without sensitivity, given the budget's own ratio)."""
    if options is None or isinstance(options, GroupOptions):
        return f"the budget's ratio {config.budget} saves nothing in it (no gradient reaches it)"
    if len(options.ranks) == 1:  # "dense" was the only candidate
        rule = (
            "" if config.speed is None
            else f", or none reaches min_speedup={config.min_speedup:g}" if config.min_speedup
            else ", or none is faster than nn.Linear at some token count (the guard)"
        )  # fmt: skip
        return f"the loss-aware allocation found no rank that saves parameters{rule}"
    return (
        "kept dense by the loss-aware allocation: its estimated loss at every saving rank "
        "costs more than the same parameters elsewhere"
    )
