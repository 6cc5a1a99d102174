"""Put low rank into any model: :func:`convert_model`.

The steps, each in its own module: which layers (:mod:`~lowrank_layers.targets`), the
rank of each (:mod:`~lowrank_layers.layer_plan`, shared with ``convert_checkpoint``;
a global budget is shared out by :func:`~lowrank_layers.allocate.allocate_ranks`), the
factorization (:func:`~lowrank_layers.factorize`) and the report
(:mod:`~lowrank_layers.report`). Calibrated conversion collects each layer's input
statistics first (:mod:`~lowrank_layers.calibrate`), or converts layer by layer through the
partly converted model (:mod:`~lowrank_layers.propagate`).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .adaptive import AdaptiveLowRankLinear
from .allocate import allocate_ranks
from .calibrate import InputStats, check_batches, collect_input_stats
from .common import (
    InputError,
    InputTypeError,
    all_finite,
    check_module,
    parameter_count,
    progress_bar,
    weight_parameter_count,
)
from .config import ConversionConfig, config_from
from .dynamic import DynamicLowRankLinear, ParamSwap
from .factorize import NONFINITE_REASON, output_error, relative_error, truncated_spectrum
from .hf_quantizer import mark_lowrank_config
from .layer_plan import Shape, check_rank, converted_report, guard_reasons, plan_layer, shape_of
from .linear import FACTOR_NAMES, LowRankLinear
from .linears import features
from .narrow import Narrowing, narrowed_layer
from .policy import RankPolicy, factor_parameters, layer_seed, threshold_reason
from .readers import weight_reader_policy
from .report import ConversionReport, LayerReport, skipped_report, warn_if_none_converted
from .stale import retire
from .targets import Selection, select_layers, structural_reason
from .training import apply_param_swaps, check_optimizer, refuse_missing

__all__ = ["check_convert_config", "convert_model", "convert_planned"]

COMPRESS_HINT = (
    "a global budget with calibration data is compress's job (loss-aware ranks, propagated "
    "factorization): call compress(model, calibration, budget=...)"
)
OPTIMIZER_FIX = (
    "Pass the optimizer that trains this model, exclude those layers, or optimizer=None and "
    "build the optimizer after converting"
)
WHOLE = (slice(None),)  # ParamSwap index: carry the whole state over


def convert_model(
    model: nn.Module,
    config: ConversionConfig | None = None,
    *,
    calibration: Iterable[Any] | None = None,
    input_stats: Mapping[str, InputStats | torch.Tensor] | None = None,
    eval_batches: Iterable[Any] | None = None,
    propagate: bool = False,
    progress: bool = False,
    optimizer: torch.optim.Optimizer | None = None,
    **options: Any,
) -> ConversionReport:
    """Replace ``nn.Linear`` modules of ``model`` by low-rank layers, in place.

    What to convert and how is a :class:`~lowrank_layers.ConversionConfig` (``config``), or
    its fields as keywords (``convert_model(model, param_ratio=0.5, exclude=["lm_head"])``),
    not both. Selection, as peft's ``target_modules`` and torchao's ``quantize_``:

    - ``include`` / ``exclude``: a regex that must match the full dotted module name
      (``re.fullmatch``), or a list of exact names or dotted suffixes;
    - ``filter_fn(module, fqn) -> bool``;
    - without ``include`` or ``filter_fn``, every ``nn.Linear`` (and every layer of this
      library, reported as already low rank) is a candidate; with them, so is every other
      matched module holding a weight matrix of its own (``nn.Embedding``, ``nn.Conv1d``,
      ...), reported as a type that cannot be converted. Modules without a weight matrix
      (activations, norms, containers) are never candidates, nor are modules named like
      embeddings unless ``embeddings=True``.

    A matched layer is converted unless (each reported with its reason): its type cannot be
    converted (not ``nn.Linear``, a subclass with its own forward, or already low rank); its
    parent reads ``.weight`` directly (``nn.MultiheadAttention.out_proj``, see
    :func:`~lowrank_layers.readers.register_weight_reader`); its weight is shared with
    another module (tied embeddings and output head); it has hooks or parametrizations;
    ``in·out <= threshold²``; the rank saves no parameters (at or past break-even); or,
    with ``min_speedup``, the layer is not expected to run that much faster. A module held
    at several places in the tree is replaced at all of them by one new layer.

    A ``budget`` is shared from the weights' spectra (``allocation`` ``"minimax"``, the
    default here, or ``"greedy"``), or as ``param_ratio=budget`` everywhere (``"uniform"``).
    A budget with calibration data is :func:`~lowrank_layers.compress`'s job, and is
    refused here.

    Args:
        model: any ``nn.Module``; changed in place.
        config: a :class:`~lowrank_layers.ConversionConfig`.
        calibration: batches to run through ``model`` (``model(**b)`` for a dict,
            ``model(*b)`` for a tuple, ``model(b)`` otherwise) to collect each layer's input
            second moment (:mod:`~lowrank_layers.calibrate`); each layer is then factorized
            activation-aware (``factorize(..., input_cov=...)``), minimising its output
            error on such inputs, and the report gives that output error. With a rank
            policy or a ``ranks`` plan; not with ``layer="adaptive"``.
        input_stats: instead of ``calibration``, statistics collected beforehand
            (``{name: InputStats or (in, in) tensor}`` from
            :func:`~lowrank_layers.calibrate.collect_input_stats`).
        eval_batches: held-out batches; the report's output error is then measured on
            them (``LayerReport.error_data == "held-out"``) rather than on the calibration
            data, which a layer can fit exactly when it saw few tokens.
        propagate: with calibration batches, convert the layers in forward order, each
            for the inputs the already-converted layers feed it
            (:mod:`~lowrank_layers.propagate`): errors are corrected instead of compounded.
            The batches must be a list (they run several times).
        progress: show a tqdm progress bar (``pip install 'lowrank-layers[progress]'``).
        optimizer: the optimizer training ``model``, updated in place as
            :func:`~lowrank_layers.switch_to_lowrank` does: each converted layer's old
            weight is replaced in its param group by the new factors (same hyper-parameters,
            its state dropped), its bias by the new layer's copy (state kept). It must hold
            the weight of every trainable layer to convert. Without it, an optimizer built
            before warns on its next ``step()``
            (:class:`~lowrank_layers.stale.StaleOptimizerWarning`): build it after converting.
        **options: the fields of :class:`~lowrank_layers.ConversionConfig`, instead of
            ``config``.

    Returns:
        A :class:`~lowrank_layers.report.ConversionReport`.

    Raises:
        ValueError: bad policy or option; no module matched at all (a likely typo in
            ``include``); a budget with calibration data (use ``compress``). If modules
            matched but none could be converted, a ``UserWarning`` says so and the report
            lists why.

    Example:
        >>> model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256),
        ...                       nn.ReLU(), nn.Linear(256, 10))
        >>> report = convert_model(model, rank_ratio=0.25)
        >>> [type(m).__name__ for m in model]  # the 10-way head is kept (see guard)
        ['LowRankLinear', 'ReLU', 'LowRankLinear', 'ReLU', 'Linear']
        >>> report.skipped[0].reason.split(":")[0]
        "the model's output layer"
    """
    check_module("model", model, "convert_model(model, config)")
    config = config_from(config, options, caller="convert_model")
    return convert_planned(
        model, config, calibration=calibration, input_stats=input_stats,
        eval_batches=eval_batches, propagate=propagate, progress=progress, optimizer=optimizer,
    )  # fmt: skip


def convert_planned(
    model: nn.Module,
    config: ConversionConfig,
    *,
    calibration: Iterable[Any] | None = None,
    input_stats: Mapping[str, InputStats | torch.Tensor] | None = None,
    eval_batches: Iterable[Any] | None = None,
    propagate: bool = False,
    progress: bool = False,
    optimizer: torch.optim.Optimizer | None = None,
    reasons: Mapping[str, str] | None = None,
    narrowed: Mapping[str, Narrowing] | None = None,
    block_scope: Callable[[int], AbstractContextManager[Any]] | None = None,
    stash: Path | None = None,
) -> ConversionReport:
    """:func:`convert_model` with its ``config`` made, ``reasons``: why layers that a plan
    made elsewhere keeps dense stay so, and ``narrowed``: the MLPs it cuts in width
    (``{output layer: Narrowing}``; ``compress``'s loss-aware plan), for the report;
    ``block_scope`` and ``stash``: the propagation's
    (:func:`~lowrank_layers.propagate.convert_propagated`), for a model loaded one block at
    a time."""
    _check_data(config, calibration, input_stats, propagate)
    check_optimizer(optimizer)
    selection = select_layers(model, config)
    report = ConversionReport(model_params_before=parameter_count(model))
    run = _Conversion(selection, config)
    run.narrowed = {n: cut for cut in (narrowed or {}).values() for n in cut.mlp.layers}
    run.plan(reasons or {})  # first: a layer that stays dense needs no statistics
    run.collect(model, calibration, input_stats, eval_batches, propagate)
    refuse_missing(optimizer, run.weights_to_convert(), "convert_model", "convert", OPTIMIZER_FIX)
    try:
        report.propagation = run.convert(
            model, calibration, propagate, progress, block_scope, stash
        )
    except BaseException:
        run.undo()  # all or nothing: every replaced layer goes back before the error
        raise
    swaps = run.param_swaps()
    if optimizer is not None:
        apply_param_swaps(optimizer, [swap for _, swap in swaps])
    retire([(name, swap.old) for name, swap in swaps], by="convert_model")
    report.layers = [run.entries[fqn] for fqn, _ in selection.candidates]
    report.model_params_after = parameter_count(model)
    if report.converted:
        mark_lowrank_config(model)  # a transformers model's save_pretrained keeps low rank
    warn_if_none_converted(report, "convert_model", stacklevel=3)
    return report


def check_convert_config(config: ConversionConfig, *, calibrated: bool) -> None:
    """Refuse a config :func:`convert_model` does not follow (no rank rule; a budget with
    calibration data or a loss-aware allocation, which are ``compress``'s), before anything
    is loaded or changed."""
    if config.allocation == "loss":
        raise InputError(f"convert_model: allocation='loss' needs a gradient pass; {COMPRESS_HINT}")
    if config.target_speedup is not None:
        raise InputError(
            "convert_model: target_speedup is met by compress's loss-aware allocation (a "
            "gradient pass on calibration data): call compress(model, calibration, "
            f"target_speedup={config.target_speedup})"
        )
    if config.budget is not None and calibrated:
        raise InputError(f"convert_model: {COMPRESS_HINT}")
    if config.rule is None:
        raise InputError(
            "convert_model needs a rank rule: a policy (rank, rank_ratio, energy or "
            "param_ratio), budget or ranks"
        )


def _check_data(
    config: ConversionConfig,
    calibration: Any,
    input_stats: Any,
    propagate: bool,
) -> None:
    """Refuse data options that do not fit each other or the config."""
    check_batches(calibration, hint="; statistics from collect_input_stats go to input_stats=")
    if calibration is not None and input_stats is not None:
        raise InputError(
            "give calibration (batches) or input_stats (statistics collected beforehand), not both"
        )
    if input_stats is not None:
        _check_statistics(input_stats)
    calibrated = calibration is not None or input_stats is not None
    check_convert_config(config, calibrated=calibrated)
    if config.layer == "adaptive" and (calibrated or propagate):
        raise InputError(
            "calibration, input_stats and propagate apply to layer='lowrank' or 'dynamic'; "
            "an adaptive layer is factorized later, by switch_to_lowrank"
        )
    if propagate and calibration is None:
        raise InputError(
            "propagate=True needs calibration batches (a list the model takes), not "
            f"{'nothing' if input_stats is None else 'precomputed statistics'}"
        )


@dataclass
class _Conversion:
    """One ``convert_model`` run: the statistics, each layer's rule, and what was done."""

    selection: Selection
    config: ConversionConfig
    covariances: dict[str, torch.Tensor] = field(default_factory=dict)
    eval_covs: dict[str, torch.Tensor] = field(default_factory=dict)
    rules: dict[str, RankPolicy] = field(default_factory=dict)
    dense_reason: dict[str, str] = field(default_factory=dict)
    entries: dict[str, LayerReport] = field(default_factory=dict)
    narrowed: dict[str, Narrowing] = field(default_factory=dict)  # each layer of a cut MLP

    def todo(self) -> dict[str, nn.Module]:
        """The matched layers the plan may factorize (not kept dense for a reason)."""
        return {f: m for f, m in self.selection.eligible.items() if f not in self.dense_reason}

    def collect(
        self, model: nn.Module, calibration: Any, input_stats: Any, eval_batches: Any,
        propagate: bool,
    ) -> None:  # fmt: skip
        """Each layer's input second moment (unless propagated: then layer by layer), for
        the layers the plan may factorize only: after :meth:`plan`."""
        todo = self.todo()
        if not todo:
            return
        if eval_batches is not None:
            held_out = collect_input_stats(model, eval_batches, todo)
            self.eval_covs = {name: s.covariance for name, s in held_out.items() if s.tokens}
        if input_stats is not None:  # statistics collected beforehand
            self.covariances = {
                name: s.covariance if isinstance(s, InputStats) else s
                for name, s in input_stats.items()
                if name in todo and (not isinstance(s, InputStats) or s.tokens)
            }
        elif calibration is not None and not propagate:
            stats = collect_input_stats(model, calibration, todo)
            self.covariances = {name: s.covariance for name, s in stats.items() if s.tokens}
        if (input_stats is not None or calibration is not None) and not propagate:
            _check_reached(todo, self.covariances)

    def plan(self, reasons: Mapping[str, str]) -> None:
        """Each layer's rank rule, or why it stays dense, decided before anything changes.

        One rule with ``convert_checkpoint``: a weight that cannot be factorized stays
        dense, with its reason; so does one the guard keeps (:func:`guard_reasons`)."""
        config, views = self.config, self.selection.views
        self.dense_reason = guard_reasons(self.selection, config)
        self.dense_reason.update((f, r) for f, r in reasons.items() if f in views)
        for fqn, m in views.items():  # weights still on disk (meta) are checked when loaded
            if not m.weight.is_meta and not all_finite(m.weight.detach()):
                self.dense_reason[fqn] = NONFINITE_REASON
        if config.policy is not None:
            self.rules = dict.fromkeys(views, config.policy)
        elif config.budget is not None and config.allocation == "uniform":
            self.rules = dict.fromkeys(views, RankPolicy(param_ratio=config.budget))
        elif config.budget is not None:
            self.rules = self._allocate()
        else:
            self._planned_ranks()
        self._check_narrowed()

    def _check_narrowed(self) -> None:
        """Every layer of a narrowed MLP is converted, or none: refuse a plan that keeps
        one of them (a cut input layer would feed its output layer the wrong width)."""
        for fqn, cut in self.narrowed.items():
            why = self.dense_reason.get(fqn) or self.selection.kept.get(fqn)
            if fqn not in self.selection.eligible or why is not None:
                raise InputError(
                    f"the narrowed MLP of {cut.mlp.output} needs {fqn} converted, but it is "
                    f"{'not a matched layer' if why is None else f'kept: {why}'}"
                )

    def _planned_ranks(self) -> None:
        ranks = self.config.ranks or {}
        unknown = sorted(set(ranks) - {fqn for fqn, _ in self.selection.candidates})
        if unknown:
            raise InputError(
                f"ranks names {len(unknown)} modules that are not matched layers: "
                f"{', '.join(unknown[:3])}{', ...' if len(unknown) > 3 else ''}"
            )
        for fqn in self.selection.eligible:
            r = ranks.get(fqn)
            if fqn in self.dense_reason or fqn in self.narrowed:
                continue
            if r is not None:
                self.rules[fqn] = RankPolicy(rank=r)
            else:
                self.dense_reason[fqn] = (
                    "kept dense by the rank plan" if fqn in ranks else "not in the rank plan"
                )

    def _allocate(self) -> dict[str, RankPolicy]:
        """A budget shared from the spectra (``minimax`` or ``greedy``), each rank capped
        where it stops paying under the speed rule."""
        config, views = self.config, self.selection.views
        spectra = {
            fqn: truncated_spectrum(m.weight.detach(), balance=config.balance)
            for fqn, m in views.items()
            if threshold_reason(m.out_features, m.in_features, config.threshold) is None
            and fqn not in self.dense_reason
        }
        caps: dict[str, int] | None = None
        fraction = config.budget
        speed = config.speed
        if speed is not None:
            shapes = {f: shape_of(views[f]) for f in spectra}
            caps = {
                f: speed.max_rank(
                    s.out_features,
                    s.in_features,
                    len(spectra[f]),
                    row_scales=config.row_scales,
                    bias=s.bias,
                    dtype=s.dtype,
                )
                for f, s in shapes.items()
            }
            slow = sorted(f for f, cap in caps.items() if cap == 0)
            why = "min_speedup" if config.min_speedup else "the guard"
            fraction = _budget_without(spectra, views, slow, config.budget, config.row_scales, why)
            for f in slow:
                s = shapes[f]
                self.dense_reason[f] = speed.reason(  # type: ignore[assignment]
                    s.out_features, s.in_features, 1, row_scales=config.row_scales,
                    bias=s.bias, dtype=s.dtype,
                )  # fmt: skip
                del spectra[f]
        allocated = allocate_ranks(
            {f: (s, views[f].out_features, views[f].in_features) for f, s in spectra.items()},
            fraction,  # type: ignore[arg-type]
            row_scales=config.row_scales,
            allocation="minimax" if config.allocation == "auto" else config.allocation,
            max_ranks=caps,
        )
        return {f: RankPolicy(rank=r) for f, r in allocated.items()}

    def convert(
        self, model: nn.Module, calibration: Any, propagate: bool, progress: bool,
        block_scope: Callable[[int], AbstractContextManager[Any]] | None = None,
        stash: Path | None = None,
    ) -> Any:  # fmt: skip
        """Convert every candidate (propagated ones first, in forward order); returns the
        propagation's report, if any."""
        propagation = None
        eligible = self.selection.eligible
        if propagate and eligible:
            from .propagate import convert_propagated  # imports blocks and hooks: on demand

            batches = calibration if isinstance(calibration, Sequence) else list(calibration)
            todo = self.todo()
            propagation = convert_propagated(
                model, batches, todo, self.convert_one, progress=progress,
                block_scope=block_scope, stash=stash,
            )  # fmt: skip
            _check_reached(todo, dict.fromkeys(self.entries))
        candidates: Iterable[tuple[str, nn.Module]] = self.selection.candidates
        if progress and not propagate:
            candidates = progress_bar(candidates)
        for fqn, module in candidates:
            if fqn not in self.entries:
                self.convert_one(fqn, module)
        return propagation

    def convert_one(self, fqn: str, module: nn.Module, stats: Any = None) -> None:
        """Convert one layer (``stats``: the propagation's statistics for it)."""
        start = time.perf_counter()
        if fqn in self.selection.kept:
            entry = _skip(fqn, module, self.selection.kept[fqn])
        elif fqn in self.dense_reason:
            entry = _skip(fqn, module, self.dense_reason[fqn])
        elif fqn in self.narrowed:
            new, entry = narrowed_layer(
                fqn, module, self.narrowed[fqn],
                input_cov=self.covariances.get(fqn) if stats is None else stats.input_cov,
                cross_cov=None if stats is None else stats.cross_cov,
                target_energy=None if stats is None else stats.target_energy,
                eval_cov=self.eval_covs.get(fqn),
            )  # fmt: skip
            _replace(module, new, module, self.selection, entry)
        else:
            entry = _convert_one(
                fqn, module, self.selection, self.config, self.rules.get(fqn),
                input_cov=self.covariances.get(fqn) if stats is None else stats.input_cov,
                cross_cov=None if stats is None else stats.cross_cov,
                target_energy=None if stats is None else stats.target_energy,
                eval_cov=self.eval_covs.get(fqn),
            )  # fmt: skip
        entry.seconds = time.perf_counter() - start
        self.entries[fqn] = entry

    def weights_to_convert(self) -> list[tuple[str, torch.Tensor]]:
        """``(name, weight)`` of each layer the plan converts, for the optimizer check."""
        views, threshold = self.selection.views, self.config.threshold
        return [
            (fqn, module.weight)
            for fqn, module in self.selection.eligible.items()
            if (fqn in self.rules or fqn in self.narrowed) and fqn not in self.dense_reason
            and threshold_reason(views[fqn].out_features, views[fqn].in_features, threshold)
            is None
        ]  # fmt: skip

    def param_swaps(self) -> list[tuple[str, ParamSwap]]:
        """``(name, swap)`` for each parameter of a replaced layer: the weight by the new
        factors (an adaptive layer's dense weight by its copy, state carried), the bias by
        its copy (state carried)."""
        swaps, seen = [], set()
        for fqn, module in self.selection.candidates:
            parent, child_name, _ = (self.selection.holders.get(id(module)) or [(None,) * 3])[0]
            new = None if parent is None else parent._modules.get(child_name)
            if new is None or new is module or id(module) in seen:
                continue
            seen.add(id(module))
            fresh = dict(new.named_parameters(recurse=False))
            for name, old in module.named_parameters(recurse=False):
                if name == "weight" and "weight" not in fresh:
                    swap = ParamSwap(old, tuple(fresh[n] for n in FACTOR_NAMES if n in fresh))
                elif fresh.get(name) is not None and fresh[name] is not old:
                    carry = name != "weight" or module is self.selection.views.get(fqn)
                    carry = carry and fqn not in self.narrowed  # a cut layer: other shapes
                    swap = ParamSwap(old, (fresh[name],), WHOLE if carry else None)  # Conv1D: .T
                else:
                    continue
                swaps.append((f"{fqn}.{name}", swap))
        return swaps

    def undo(self) -> None:
        """Put every replaced layer back."""
        for module in self.selection.eligible.values():
            for parent, child_name, _ in self.selection.holders.get(id(module), []):
                if parent._modules.get(child_name) is not module:
                    setattr(parent, child_name, module)


def _skip(fqn: str, module: nn.Module, reason: str) -> LayerReport:
    in_f, out_f = features(module) or (None, None)
    return skipped_report(fqn, type(module).__name__, in_f, out_f,
                          weight_parameter_count(module), reason)  # fmt: skip


def _convert_one(
    fqn: str,
    module: nn.Module,
    selection: Selection,
    config: ConversionConfig,
    policy: RankPolicy | None,
    *,
    input_cov: torch.Tensor | None = None,
    cross_cov: torch.Tensor | None = None,
    target_energy: float | None = None,
    eval_cov: torch.Tensor | None = None,
) -> LayerReport:
    """Replace ``module`` by a low-rank layer at every place it is held, or say why not."""
    reason = structural_reason(fqn, module, selection.holders, selection.owners)
    if reason is not None:
        return _skip(fqn, module, reason)
    source = selection.views[fqn]  # a Conv1D read as nn.Linear
    shape = shape_of(source)
    if policy is None:  # a budget allocates ranks only to the layers above the threshold
        reason = threshold_reason(shape.out_features, shape.in_features, config.threshold)
        return _skip(fqn, module, reason or "no rank allocated by the budget")
    rule, reason = plan_layer(shape, policy, config)
    if rule is None:
        return _skip(fqn, module, reason)  # type: ignore[arg-type]
    if config.layer == "adaptive":
        new: nn.Module = AdaptiveLowRankLinear.from_linear(source, policy, balance=config.balance)
        entry = _adaptive_report(fqn, shape, rule, config)
    else:
        cls = LowRankLinear if config.layer == "lowrank" else DynamicLowRankLinear
        generator = torch.Generator(source.weight.device).manual_seed(layer_seed(config.seed, fqn))
        new = cls.from_linear(
            source, rule, method=config.method, balance=config.balance, input_cov=input_cov,
            cross_cov=cross_cov, generator=generator,
        )  # fmt: skip
        factors = new.factors()
        reason = check_rank(shape, factors.rank, rule, config)
        if reason is not None:
            return _skip(fqn, module, reason)
        out_error, error_data = None, None
        if eval_cov is not None:
            out_error, error_data = output_error(source.weight, factors, eval_cov), "held-out"
        elif input_cov is not None:
            out_error = output_error(
                source.weight, factors, input_cov, cross_cov=cross_cov, target_energy=target_energy
            )
            error_data = "calibration"
        entry = converted_report(
            fqn, type(new).__name__, shape, factors.rank, row_scales=factors.D is not None,
            relative_error=relative_error(source.weight, factors), output_error=out_error,
            error_data=error_data,
        )  # fmt: skip
    _replace(module, new, source, selection, entry)
    return entry


def _adaptive_report(
    fqn: str, shape: Shape, rule: RankPolicy, config: ConversionConfig
) -> LayerReport:
    """An adaptive layer stays dense until its switch: the planned rank, no error yet."""
    out_f, in_f = shape.out_features, shape.in_features
    rank = rule.rank
    after = (
        in_f * out_f if rank is None
        else factor_parameters(out_f, in_f, rank, row_scales=config.row_scales)
    )  # fmt: skip
    return LayerReport(fqn, AdaptiveLowRankLinear.__name__, in_f, out_f, rank, in_f * out_f,
                       after, None, 0.0)  # fmt: skip


def _replace(
    module: nn.Module, new: nn.Module, source: nn.Linear, selection: Selection, entry: LayerReport
) -> None:
    """Put ``new`` at every place ``module`` is held, in its training mode and with its
    weight's ``requires_grad``; notes a parent that reads ``.weight``."""
    new.train(module.training)
    if not source.weight.requires_grad:
        for p in new.parameters():
            p.requires_grad_(False)
    holders = selection.holders.get(id(module), [])
    reads = [weight_reader_policy(p, n) for p, n, _ in holders]
    for parent, child_name, _ in holders:
        setattr(parent, child_name, new)
    entry.note = "; ".join(r.reason for r in reads if r is not None) or None


def _check_statistics(input_stats: Mapping[Any, Any]) -> None:
    """``input_stats`` must be ``{layer name: InputStats or a square (in, in) tensor}``; a
    single batch (a tokenizer's output) is refused clearly."""
    if not isinstance(input_stats, Mapping):
        raise InputTypeError(
            "input_stats must be a mapping {layer name: InputStats} from "
            f"collect_input_stats, got {type(input_stats).__name__}"
        )
    for key, value in input_stats.items():
        square = isinstance(value, torch.Tensor) and value.dim() == 2
        if not (isinstance(value, InputStats) or (square and value.shape[0] == value.shape[1])):
            keys = list(input_stats)[:4]
            raise InputTypeError(
                f"input_stats holds statistics {{layer name: InputStats}}, but its entry "
                f"{key!r} is {_describe(value)}; keys {keys} look like one batch: pass "
                "batches as calibration=[batch]"
            )


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"


def _check_reached(eligible: Mapping[str, nn.Module], reached: Mapping[str, Any]) -> None:
    """Raise when the calibration reached no layer, warn when it missed some."""
    missing = [name for name in eligible if name not in reached]
    if eligible and len(missing) == len(eligible):
        raise InputError(
            "convert_model: the calibration reached none of the layers to convert (a "
            "batch the model does not use, or statistics keyed by other names)"
        )
    if missing:
        warnings.warn(
            f"convert_model: no calibration input reached {len(missing)} layers "
            f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); they are "
            "factorized without it",
            UserWarning,
            stacklevel=3,
        )


def _budget_without(
    spectra: Mapping[str, Any],
    eligible: Mapping[str, nn.Module],
    dense: list[str],
    budget: float,
    row_scales: bool,
    reason: str,
) -> float:
    """The budget fraction left for the other layers once the ``dense`` ones are kept whole
    (no rank speeds them up, by ``reason``)."""
    if not dense:
        return budget
    size = {f: eligible[f].in_features * eligible[f].out_features for f in spectra}
    total = sum(size.values())
    kept = sum(size[f] for f in dense)
    others = [f for f in spectra if f not in dense]
    least = sum(
        factor_parameters(
            eligible[f].out_features, eligible[f].in_features, 1, row_scales=row_scales
        )
        for f in others
    )
    left = budget * total - kept
    if not others:
        raise InputError(
            f"budget={budget} keeps {int(budget * total):,} parameters, but no rank of any of "
            f"the {len(dense)} layers speeds it up ({reason}): all {kept:,} would stay dense"
        )
    if left < least:
        raise InputError(
            f"budget={budget} keeps {int(budget * total):,} parameters, but the {len(dense)} "
            f"layers no rank speeds up ({reason}) already hold {kept:,}, which leaves "
            f"{max(0, int(left)):,} for the other {len(others)} layers (rank 1 in each needs "
            f"{least:,})"
        )
    return min(1.0, left / (total - kept))
