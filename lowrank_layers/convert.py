"""Put low rank into any model: ``convert_model``, ``switch_to_lowrank``, ``prune_dynamic``."""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from .adaptive import AdaptiveLowRankLinear, SwitchResult
from .calibrate import InputStats, collect_input_stats
from .common import (
    InputError,
    InputTypeError,
    all_finite,
    check_choice,
    check_fraction,
    parameter_count,
    progress_bar,
    weight_parameter_count,
)
from .dynamic import DynamicLowRankLinear, ParamSwap
from .factorize import (
    BALANCE_MODES,
    NONFINITE_REASON,
    Balance,
    Method,
    output_error,
    relative_error,
    truncated_spectrum,
)
from .hf_quantizer import mark_lowrank_config
from .linear import FACTOR_NAMES, HALF_DTYPES, LowRankLinear
from .linears import as_linear, features, is_conv1d, is_linear_like
from .policy import (
    ALLOCATIONS,
    RankPolicy,
    allocate_ranks,
    as_policy,
    break_even_reason,
    factor_parameters,
    layer_seed,
    saves_parameters,
    threshold_reason,
)
from .readers import register_weight_reader, weight_reader_policy
from .selection import check_patterns, module_holders, name_matches, weight_owners
from .speed import REPORT_TOKENS, SpeedRule, report_speedups, speed_rule

__all__ = [
    "ConversionReport",
    "LayerReport",
    "allocate_ranks",
    "convert_model",
    "convertible_layers",
    "inference_layout_",
    "layer_seed",
    "prune_dynamic",
    "register_weight_reader",
    "switch_to_lowrank",
]

LayerKind = Literal["lowrank", "adaptive", "dynamic"]
LAYER_KINDS: tuple[str, ...] = ("lowrank", "adaptive", "dynamic")
LOWRANK_TYPES = (LowRankLinear, AdaptiveLowRankLinear, DynamicLowRankLinear)

# ------------------------------------------------------------------------------------------
# the report
# ------------------------------------------------------------------------------------------


@dataclass
class LayerReport:
    """One matched module: converted, or skipped with its reason."""

    name: str
    kind: str
    in_features: int | None
    out_features: int | None
    rank: int | None
    params_before: int
    params_after: int
    relative_error: float | None
    seconds: float
    reason: str | None = None
    output_error: float | None = None  # relative, on error_data's inputs
    error_data: str | None = None  # "calibration" or "held-out": what output_error used
    # expected speed-up of the forward over nn.Linear (speed.expected_speedup) at
    # REPORT_TOKENS[0] and REPORT_TOKENS[1] tokens per call; None when not low rank
    speedup_few: float | None = None
    speedup_many: float | None = None
    # for a converted layer: what to know about it (a parent that reads its .weight)
    note: str | None = None

    @property
    def converted(self) -> bool:
        return self.reason is None


@dataclass
class ConversionReport:
    """What :func:`convert_model` did, layer by layer.

    ``str(report)`` is an aligned table; :meth:`to_dict` / :meth:`to_json` are
    JSON-serialisable. Parameter counts are of the matched layers' weights and factors
    (biases excluded, as they are unchanged); ``model_params_before/after`` count the
    whole model.
    """

    layers: list[LayerReport] = field(default_factory=list)
    model_params_before: int = 0
    model_params_after: int = 0
    propagation: Any = None  # a propagate.PropagationReport when propagate=True

    @property
    def converted(self) -> list[LayerReport]:
        return [layer for layer in self.layers if layer.converted]

    @property
    def skipped(self) -> list[LayerReport]:
        return [layer for layer in self.layers if not layer.converted]

    @property
    def params_before(self) -> int:
        """Weight parameters of the converted layers before conversion."""
        return sum(layer.params_before for layer in self.converted)

    @property
    def params_after(self) -> int:
        """Factor parameters of the converted layers after conversion."""
        return sum(layer.params_after for layer in self.converted)

    @property
    def seconds(self) -> float:
        return sum(layer.seconds for layer in self.layers)

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": [{**asdict(layer), "converted": layer.converted} for layer in self.layers],
            "totals": {
                "converted": len(self.converted),
                "skipped": len(self.skipped),
                "params_before": self.params_before,
                "params_after": self.params_after,
                "model_params_before": self.model_params_before,
                "model_params_after": self.model_params_after,
                "seconds": self.seconds,
            },
        }

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def __str__(self) -> str:
        calibrated = any(layer.output_error is not None for layer in self.layers)

        def num(value: float | None) -> str:
            return "-" if value is None else f"{value:.4f}"

        header = ["layer", "kind", "in", "out", "rank", "params", "after"]
        header += [f"x@{REPORT_TOKENS[0]}", f"x@{REPORT_TOKENS[1]}", "rel.err"]
        data = next((x.error_data for x in self.layers if x.error_data), "calibration")
        header += [f"out.err ({data})"] if calibrated else []
        header += ["s", "note"]
        rows = [header]
        for layer in self.layers:
            row = [
                layer.name,
                layer.kind,
                "-" if layer.in_features is None else str(layer.in_features),
                "-" if layer.out_features is None else str(layer.out_features),
                "-" if layer.rank is None else str(layer.rank),
                f"{layer.params_before:,}",
                f"{layer.params_after:,}",
                "-" if layer.speedup_few is None else f"{layer.speedup_few:.2f}",
                "-" if layer.speedup_many is None else f"{layer.speedup_many:.2f}",
                num(layer.relative_error),
            ]
            row += [num(layer.output_error)] if calibrated else []
            note = layer.note or "" if layer.converted else f"skipped: {layer.reason}"
            row += [f"{layer.seconds:.2f}", note]
            rows.append(row)
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        right = set(range(2, len(header) - 1))

        def fmt(row: Sequence[str]) -> str:
            cells = [
                cell.rjust(w) if i in right else cell.ljust(w)
                for i, (cell, w) in enumerate(zip(row, widths, strict=True))
            ]
            return "  ".join(cells).rstrip()

        lines = [fmt(rows[0]), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows[1:]]
        saved = 1 - self.params_after / self.params_before if self.params_before else 0.0
        lines.append(
            "x@N: expected speed-up of the layer's forward over nn.Linear at N tokens per "
            "call (lowrank_layers.expected_speedup; a model, not a measurement)"
        )
        lines.append(
            f"converted {len(self.converted)} of {len(self.layers)} matched layers: "
            f"{self.params_before:,} -> {self.params_after:,} parameters ({saved:.1%} fewer); "
            f"model {self.model_params_before:,} -> {self.model_params_after:,}; "
            f"{self.seconds:.2f} s"
        )
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# selection
# ------------------------------------------------------------------------------------------


def _has_matrix(module: nn.Module) -> bool:
    """Whether the module holds a weight matrix of its own (Embedding, Conv, Linear...) or
    fused 3-D expert tensors."""
    weight = module._parameters.get("weight")
    return (weight is not None and weight.dim() >= 2) or bool(_fused_tensors(module))


def _fused_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """The 3-D parameters a module holds directly: the stacked per-expert matrices of a
    mixture of experts (transformers 5's ``MixtralExperts``, ``Qwen2MoeExperts``: one
    ``(experts, out, in)`` tensor per projection). Convolutions are not counted."""
    if isinstance(module, nn.modules.conv._ConvNd):
        return {}
    return {
        n: p
        for n, p in module._parameters.items()
        if p is not None and not isinstance(p, nn.parameter.UninitializedParameter) and p.dim() == 3
    }


def _is_plain_linear(module: nn.Module) -> bool:
    """An nn.Linear whose forward is nn.Linear's (subclasses that override it are not safe),
    or transformers' Conv1D."""
    if is_conv1d(module):
        return True
    return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward


def _hooks_reason(module: nn.Module) -> str | None:
    """Why a module with hooks or parametrizations cannot be replaced, or None.

    A replacement would silently drop them: a forward hook that logs or edits outputs, a
    ``weight_norm``/``spectral_norm`` parametrization (or the older hook-based versions),
    ``torch.nn.utils.prune``'s mask. The user removes them and, if wanted, registers them
    on the new layer.
    """
    if torch.nn.utils.parametrize.is_parametrized(module):
        names = ", ".join(sorted(module.parametrizations.keys()))  # type: ignore[union-attr]
        return (
            f"its {names} is parametrized (weight_norm, spectral_norm, ...), which a "
            "low-rank layer would drop: remove the parametrization first "
            "(torch.nn.utils.parametrize.remove_parametrizations)"
        )
    kinds = {
        "forward pre-hook": module._forward_pre_hooks,
        "forward hook": module._forward_hooks,
        "backward hook": module._backward_hooks,
        "backward pre-hook": module._backward_pre_hooks,
        "state-dict hook": module._state_dict_hooks,
        "load-state-dict pre-hook": module._load_state_dict_pre_hooks,
    }
    found = []
    for kind, hooks in kinds.items():
        for hook in hooks.values():
            if isinstance(hook, tuple):  # (hook, with_module) in older state-dict hooks
                hook = hook[0]
            what = getattr(hook, "__qualname__", None) or type(hook).__name__
            found.append(f"{kind} {what}")
    if found:
        return (
            f"it has {', '.join(found)}, which a low-rank layer would drop: remove them "
            "(handle.remove()) before converting and register them on the new layer"
        )
    return None


# ------------------------------------------------------------------------------------------
# convert_model
# ------------------------------------------------------------------------------------------


def convert_model(
    model: nn.Module,
    policy: RankPolicy | None = None,
    *,
    rank: int | None = None,
    rank_ratio: float | None = None,
    energy: float | None = None,
    param_ratio: float | None = None,
    layer: LayerKind = "lowrank",
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    threshold: int = 0,
    method: Method = "svd",
    balance: Balance = "none",
    seed: int = 0,
    calibration: Iterable[Any] | None = None,
    input_stats: Mapping[str, InputStats | torch.Tensor] | None = None,
    budget: float | None = None,
    allocation: str = "minimax",
    ranks: Mapping[str, int | None] | None = None,
    propagate: bool = False,
    eval_batches: Iterable[Any] | None = None,
    min_speedup: float | None = None,
    speedup_tokens: int = 1,
    progress: bool = False,
) -> ConversionReport:
    """Replace ``nn.Linear`` modules of ``model`` by low-rank layers, in place.

    Selection, as peft's ``target_modules`` and torchao's ``quantize_``:

    - ``include`` / ``exclude``: a regex that must match the full dotted module name
      (``re.fullmatch``), or a list of exact names or dotted suffixes;
    - ``filter_fn(module, fqn) -> bool``;
    - without ``include`` or ``filter_fn``, every ``nn.Linear`` (and every layer of this
      library, reported as already low rank) is a candidate; with them, so is every other
      matched module holding a weight matrix of its own (``nn.Embedding``, ``nn.Conv1d``,
      ...), reported as a type that cannot be converted. Modules without a weight matrix
      (activations, norms, containers) are never candidates.

    A matched layer is converted unless (each reported with its reason): its type cannot be
    converted (not ``nn.Linear``, a subclass with its own forward, or already low rank); its
    parent reads ``.weight`` directly (``nn.MultiheadAttention.out_proj``, see
    :func:`register_weight_reader`); its weight is shared with another module (tied
    embeddings and output head); ``in·out <= threshold²``; the rank saves no
    parameters (at or past break-even); or, with ``min_speedup``, the layer is not
    expected to run that much faster. A module held at several places in the tree is
    replaced at all of them by one new layer.

    Args:
        model: any ``nn.Module``; changed in place.
        policy: a :class:`~lowrank_layers.RankPolicy` applied to each layer, or one of
        rank, rank_ratio, energy, param_ratio: its keyword form (see
            :func:`~lowrank_layers.factorize`).
        layer: ``"lowrank"`` (:class:`~lowrank_layers.LowRankLinear`), ``"adaptive"``
            (:class:`~lowrank_layers.AdaptiveLowRankLinear` in its dense phase, the policy
            kept for its later switch) or ``"dynamic"``
            (:class:`~lowrank_layers.DynamicLowRankLinear`, the policy's rank as ``max_rank``).
        threshold: the original ``make_efficient_linear``'s size test; 0 converts any size.
        method, balance: as :func:`~lowrank_layers.factorize` (for ``"adaptive"``,
            ``balance`` is the default of the later switch).
        calibration: batches to run through ``model`` (``model(**b)`` for a dict,
            ``model(*b)`` for a tuple, ``model(b)`` otherwise) to collect each layer's input
            second moment (:mod:`~lowrank_layers.calibrate`); each layer is then factorized
            activation-aware (``factorize(..., input_cov=...)``), minimising its output
            error on such inputs, and the report gives that output error. Not with
            ``layer="adaptive"``.
        input_stats: instead of ``calibration``, statistics collected beforehand
            (``{name: InputStats or (in, in) tensor}`` from
            :func:`~lowrank_layers.calibrate.collect_input_stats`), to convert copies of a
            model at several budgets from one calibration run.
        budget: instead of a rank policy, keep at most this fraction (0, 1] of the converted
            layers' weight parameters over the whole model, choosing each layer's rank from
            its spectrum (whitened when calibrated) with :func:`allocate_ranks`.
        allocation: how ``budget`` is shared: ``"minimax"`` (the same relative error for
            every layer) or ``"greedy"`` (see :func:`allocate_ranks`). For the loss-aware
            allocation, pass its plan as ``ranks`` (:func:`~lowrank_layers.compress` does).
        ranks: instead of a rank policy, each layer's rank by name, ``None`` keeping that
            layer dense (the plan of :func:`~lowrank_layers.allocate.loss_aware_ranks`).
            Matched layers missing from it stay dense, with that reason.
        propagate: with calibration batches, convert the layers in forward order, each
            for the inputs the already-converted layers feed it
            (:mod:`~lowrank_layers.propagate`): errors are corrected instead of compounded.
            The batches must be a list (they run several times).
        eval_batches: held-out batches; the report's output error is then measured on
            them (``LayerReport.error_data == "held-out"``) rather than on the calibration
            data, which a layer can fit exactly when it saw few tokens.
        min_speedup: keep dense every layer whose expected forward speed-up over
            ``nn.Linear`` at ``speedup_tokens`` tokens per call
            (:func:`~lowrank_layers.expected_speedup`) is below this (for example 1.0:
            only layers that are faster). With ``budget``, each layer's rank is capped at
            the largest rank that pays, and a layer where none does stays dense, its
            parameters counted in the budget. The report shows every layer's expected
            speed-up at 1 and 1024 tokens either way.
        speedup_tokens: tokens per call (batch × sequence) that ``min_speedup`` is judged
            at: 1 for decoding one sequence, the batch size for batched decoding, the
            sequence length times the batch for an encoder.
        seed: with ``method="randomized"``, each layer's sketch is drawn from a generator
            seeded by :func:`layer_seed` ``(seed, name)``: results do not depend on the
            order or subset of layers converted, and ``convert_checkpoint`` with the same
            seed gives the same factors.
        progress: show a tqdm progress bar (``pip install 'lowrank-layers[progress]'``).

    Returns:
        A :class:`ConversionReport`.

    Raises:
        ValueError: bad policy or option; no module matched at all (a likely typo in
            ``include``). If modules matched but none could be converted, a
            ``UserWarning`` says so and the report lists why.

    Example:
        >>> model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))
        >>> report = convert_model(model, rank_ratio=0.25)
        >>> [type(m).__name__ for m in model]
        ['LowRankLinear', 'ReLU', 'LowRankLinear']
        >>> len(report.converted)
        2
    """
    check_choice("layer", layer, LAYER_KINDS)
    check_choice("method", method, ("svd", "randomized"))
    check_choice("balance", balance, BALANCE_MODES)
    check_patterns("include", include)
    check_patterns("exclude", exclude)
    if filter_fn is not None and not callable(filter_fn):
        raise InputTypeError(f"filter_fn must be callable, got {filter_fn!r}")
    if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 0:
        raise InputError(f"threshold must be an int >= 0, got {threshold!r}")
    policy = as_policy(policy, rank, rank_ratio, energy, param_ratio, required=False)
    check_choice("allocation", allocation, ALLOCATIONS)
    given = [k for k, v in (("budget", budget), ("ranks", ranks)) if v is not None]
    if len(given) == 2 or (given and policy is not None):
        values = {"budget": budget, "ranks": "{...}"}
        got = " and ".join([f"{k}={values[k]}" for k in given] + ([str(policy)] if policy else []))
        raise InputError(
            f"budget and ranks replace the rank policy: give one of the three, got {got}"
        )
    if budget is not None:
        check_fraction("budget", budget)
    elif ranks is not None:
        if not isinstance(ranks, Mapping):
            raise InputTypeError(f"ranks must be a mapping {{name: rank or None}}, got {ranks!r}")
    elif policy is None:
        as_policy()  # the error of a call that gave no rule at all
    if isinstance(calibration, Mapping):
        raise InputTypeError(
            f"calibration takes an iterable of batches, got a mapping with keys "
            f"{list(calibration)[:4]}: one batch goes in a list, calibration=[batch]; "
            "statistics from collect_input_stats go to input_stats="
        )
    if calibration is not None and input_stats is not None:
        raise InputError(
            "give calibration (batches) or input_stats (statistics collected beforehand), not both"
        )
    if input_stats is not None:
        _check_statistics(input_stats)
    calibrated = calibration is not None or input_stats is not None
    if layer == "adaptive" and (calibrated or budget is not None or propagate or ranks is not None):
        raise InputError(
            "calibration, input_stats, budget, ranks and propagate apply to layer='lowrank' "
            "or 'dynamic'; an adaptive layer is factorized later, by switch_to_lowrank"
        )
    if layer == "adaptive" and (method != "svd" or seed != 0):
        raise InputError(
            f"method={method!r} and seed={seed} choose how a layer is factorized now; an "
            "adaptive layer is factorized later: pass them to switch_to_lowrank"
        )
    speed = speed_rule(min_speedup, speedup_tokens)
    if speed is not None and layer == "adaptive":
        raise InputError(
            "min_speedup applies to layer='lowrank' or 'dynamic'; an adaptive layer stays "
            "dense until switch_to_lowrank"
        )
    if propagate and calibration is None:
        raise InputError(
            "propagate=True needs calibration batches (a list the model takes), not "
            f"{'nothing' if input_stats is None else 'precomputed statistics'}"
        )

    candidates, holders, owners, eligible = _select(model, include, exclude, filter_fn)
    views = {fqn: as_linear(m) for fqn, m in eligible.items()}  # Conv1D read as nn.Linear
    report = ConversionReport(model_params_before=parameter_count(model))
    if ranks is not None:
        unknown = sorted(set(ranks) - {fqn for fqn, _ in candidates})
        if unknown:
            raise InputError(
                f"ranks names {len(unknown)} modules that are not matched layers: "
                f"{', '.join(unknown[:3])}{', ...' if len(unknown) > 3 else ''}"
            )
    eval_covs: dict[str, torch.Tensor] = {}
    if eval_batches is not None and eligible:
        held_out = collect_input_stats(model, eval_batches, eligible)
        eval_covs = {name: s.covariance for name, s in held_out.items() if s.tokens}
    covariances: dict[str, torch.Tensor] = {}
    if input_stats is not None:  # statistics collected beforehand
        covariances = {
            name: s.covariance if isinstance(s, InputStats) else s
            for name, s in input_stats.items()
            if name in eligible and (not isinstance(s, InputStats) or s.tokens)
        }
    elif calibration is not None and eligible and not propagate:
        stats = collect_input_stats(model, calibration, eligible)
        covariances = {name: s.covariance for name, s in stats.items() if s.tokens}
    if calibrated and eligible and not propagate:
        _check_reached(eligible, covariances)
    layer_policy: dict[str, RankPolicy] = {}
    # one rule with convert_checkpoint: a weight that cannot be factorized stays dense, with
    # its reason, decided before anything is replaced
    dense_reason: dict[str, str] = {
        fqn: NONFINITE_REASON for fqn, m in views.items() if not all_finite(m.weight.detach())
    }
    if budget is not None:
        spectra = {
            fqn: truncated_spectrum(
                m.weight.detach(), balance=balance, input_cov=covariances.get(fqn)
            )
            for fqn, m in views.items()
            if threshold_reason(m.out_features, m.in_features, threshold) is None
            and fqn not in dense_reason
        }
        caps: dict[str, int] | None = None
        fraction = budget
        if speed is not None:
            caps = {
                f: speed.max_rank(
                    views[f].out_features,
                    views[f].in_features,
                    len(sv),
                    row_scales=balance != "none",
                    bias=views[f].bias is not None,
                    dtype=views[f].weight.dtype,
                )
                for f, sv in spectra.items()
            }
            slow = sorted(f for f, cap in caps.items() if cap == 0)
            fraction = _budget_without(spectra, views, slow, budget, balance != "none")
            for f in slow:
                m = views[f]
                dense_reason[f] = speed.reason(
                    m.out_features,
                    m.in_features,
                    1,
                    row_scales=balance != "none",
                    bias=m.bias is not None,
                    dtype=m.weight.dtype,
                )  # type: ignore[assignment]
                del spectra[f]
        allocated = allocate_ranks(
            {f: (s, views[f].out_features, views[f].in_features) for f, s in spectra.items()},
            fraction,
            row_scales=balance != "none",
            allocation=allocation,
            max_ranks=caps,
        )
        layer_policy = {f: RankPolicy(rank=r) for f, r in allocated.items()}
    elif ranks is not None:
        for fqn in eligible:
            r = ranks.get(fqn)
            if fqn in dense_reason:
                continue
            if r is not None:
                layer_policy[fqn] = RankPolicy(rank=r)
            else:
                dense_reason[fqn] = (
                    "kept dense by the rank plan" if fqn in ranks else "not in the rank plan"
                )
    entries: dict[str, LayerReport] = {}

    def convert_one(fqn: str, module: nn.Module, stats: Any = None) -> None:
        start = time.perf_counter()
        if fqn in dense_reason:
            entry = _skip(fqn, module, dense_reason[fqn])
        else:
            layer_pol = policy if budget is None and ranks is None else layer_policy.get(fqn)
            cov = covariances.get(fqn) if stats is None else stats.input_cov
            entry = _convert_one(
                fqn,
                module,
                views.get(fqn, module),
                holders,
                owners,
                layer,
                layer_pol,
                threshold,
                method,
                balance,
                seed,
                cov,
                cross_cov=None if stats is None else stats.cross_cov,
                target_energy=None if stats is None else stats.target_energy,
                eval_cov=eval_covs.get(fqn),
                speed=speed,
            )
        entry.seconds = time.perf_counter() - start
        entries[fqn] = entry

    propagation = None
    try:
        if propagate and eligible:
            from .propagate import convert_propagated

            batches = calibration if isinstance(calibration, Sequence) else list(calibration)
            todo = {f: m for f, m in eligible.items() if f not in dense_reason}
            propagation = convert_propagated(model, batches, todo, convert_one, progress=progress)
            _check_reached(todo, dict.fromkeys(entries))
        iterator: Iterable[tuple[str, nn.Module]] = candidates
        if progress and not propagate:
            iterator = progress_bar(candidates)
        for fqn, module in iterator:
            if fqn not in entries:
                convert_one(fqn, module)
            report.layers.append(entries[fqn])
    except BaseException:
        # all or nothing: put every replaced layer back before the error propagates
        for module in eligible.values():
            for parent, child_name, _ in holders.get(id(module), []):
                if parent._modules.get(child_name) is not module:
                    setattr(parent, child_name, module)
        raise
    report.propagation = propagation
    report.model_params_after = parameter_count(model)
    if report.converted:
        mark_lowrank_config(model)  # a transformers model's save_pretrained keeps low rank
    if not report.converted:
        examples = "; ".join(f"{s.name}: {s.reason}" for s in report.skipped[:3])
        more = f"; and {len(report.skipped) - 3} more" if len(report.skipped) > 3 else ""
        warnings.warn(
            f"convert_model: {len(report.layers)} modules matched but none was converted "
            f"({examples}{more}); the report lists every reason",
            UserWarning,
            stacklevel=2,
        )
    return report


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


def _skip(fqn: str, module: nn.Module, reason: str) -> LayerReport:
    params = weight_parameter_count(module)
    in_f, out_f = features(module) or (None, None)
    return LayerReport(
        name=fqn,
        kind=type(module).__name__,
        in_features=in_f,
        out_features=out_f,
        rank=None,
        params_before=params,
        params_after=params,
        relative_error=None,
        seconds=0.0,
        reason=reason,
    )


def _structural_reason(
    fqn: str,
    module: nn.Module,
    holders: dict[int, list[tuple[nn.Module, str, str]]],
    owners: dict[int, list[str]],
) -> str | None:
    """Why a matched module cannot be converted whatever its rank, or None."""
    if isinstance(module, LOWRANK_TYPES):
        return f"already a {type(module).__name__}"
    fused = _fused_tensors(module)
    if fused:
        shapes = ", ".join(f"{n} {'x'.join(map(str, p.shape))}" for n, p in fused.items())
        return f"fused 3-D expert tensors ({shapes}) are not converted"
    if not _is_plain_linear(module):
        if isinstance(module, nn.Linear):
            return f"{type(module).__name__} overrides nn.Linear.forward"
        return f"cannot convert a {type(module).__name__}"
    if isinstance(module.weight, nn.parameter.UninitializedParameter):
        return (
            f"the {type(module).__name__}'s weight is not initialised yet: run one forward "
            "pass first"
        )
    reason = _hooks_reason(module)
    if reason is not None:
        return reason
    for parent, child_name, _ in holders.get(id(module), []):
        read = weight_reader_policy(parent, child_name)
        if read is not None and read.policy == "skip":
            return read.reason
    sharers = [o for o in owners.get(id(module.weight), []) if o != fqn]
    sharers = [o for o in sharers if all(o != h[2] for h in holders.get(id(module), []))]
    if sharers:
        return f"weight shared with {', '.join(sorted(sharers))}"
    if module.weight.device.type == "meta":
        return "weight is on the meta device (load it first)"
    return None


def _candidates(
    model: nn.Module,
    include: str | Sequence[str] | None,
    exclude: str | Sequence[str] | None,
    filter_fn: Callable[[nn.Module, str], bool] | None,
) -> list[tuple[str, nn.Module]]:
    """The matched modules, in ``named_modules`` order; a ValueError when none matched."""

    def selected(fqn: str, module: nn.Module) -> bool:
        linear_like = (
            is_linear_like(module)
            or isinstance(module, LOWRANK_TYPES)
            or bool(_fused_tensors(module))
        )
        if not linear_like and ((include is None and filter_fn is None) or not _has_matrix(module)):
            return False
        if include is not None and not name_matches(fqn, include):
            return False
        if exclude is not None and name_matches(fqn, exclude):
            return False
        return filter_fn is None or bool(filter_fn(module, fqn))

    candidates = [(fqn, m) for fqn, m in model.named_modules() if fqn and selected(fqn, m)]
    if not candidates and (is_linear_like(model) or isinstance(model, LOWRANK_TYPES)):
        raise InputError(
            f"convert_model replaces the layers inside model, and model is itself a "
            f"{type(model).__name__}: the root module cannot be replaced in place. Convert "
            "one layer with LowRankLinear.from_linear(layer, ...), or wrap it: "
            "convert_model(nn.Sequential(layer), ...)"
        )
    if not candidates:
        raise InputError(
            f"convert_model: no module of {type(model).__name__} matched (include={include!r}, "
            f"exclude={exclude!r}, filter_fn={getattr(filter_fn, '__name__', filter_fn)!r})"
        )
    return candidates


def convertible_layers(
    model: nn.Module,
    *,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
) -> dict[str, nn.Linear]:
    """The layers :func:`convert_model` would factorize with this selection: matched, and
    free of structural obstacles (tied or shared weights, a parent reading ``.weight``,
    subclasses, meta tensors). Sizes and ranks are not checked here."""
    check_patterns("include", include)
    check_patterns("exclude", exclude)
    return _select(model, include, exclude, filter_fn)[3]  # type: ignore[return-value]


def _select(
    model: nn.Module,
    include: str | Sequence[str] | None,
    exclude: str | Sequence[str] | None,
    filter_fn: Callable[[nn.Module, str], bool] | None,
) -> tuple[
    list[tuple[str, nn.Module]],
    dict[int, list[tuple[nn.Module, str, str]]],
    dict[int, list[str]],
    dict[str, nn.Module],
]:
    """The matched modules, the holders of each module, the owners of each weight, and the
    matched modules free of structural obstacles (``{name: module}``)."""
    candidates = _candidates(model, include, exclude, filter_fn)
    holders = module_holders(model)
    owners = weight_owners(model)
    eligible = {
        fqn: m for fqn, m in candidates if _structural_reason(fqn, m, holders, owners) is None
    }
    return candidates, holders, owners, eligible


def _convert_one(
    fqn: str,
    module: nn.Module,
    source: nn.Linear,
    holders: dict[int, list[tuple[nn.Module, str, str]]],
    owners: dict[int, list[str]],
    layer: str,
    policy: RankPolicy | None,
    threshold: int,
    method: Method,
    balance: Balance,
    seed: int,
    input_cov: torch.Tensor | None = None,
    *,
    cross_cov: torch.Tensor | None = None,
    target_energy: float | None = None,
    eval_cov: torch.Tensor | None = None,
    speed: SpeedRule | None = None,
) -> LayerReport:
    """Replace ``module`` (read through ``source``, its ``nn.Linear`` view) by a low-rank
    layer at every place it is held, or say why not."""
    reason = _structural_reason(fqn, module, holders, owners)
    if reason is not None:
        return _skip(fqn, module, reason)
    out_f, in_f = source.out_features, source.in_features
    keep_d = balance != "none"
    if policy is None:  # a budget allocates ranks only to the layers above the threshold
        reason = threshold_reason(out_f, in_f, threshold) or "no rank allocated by the budget"
        return _skip(fqn, module, reason)
    planned, reason = policy.plan(out_f, in_f, threshold=threshold, row_scales=keep_d)
    if reason is None and planned is not None and speed is not None:
        reason = speed.reason(
            out_f,
            in_f,
            planned,
            row_scales=keep_d,
            bias=source.bias is not None,
            dtype=source.weight.dtype,
        )
    if reason is not None:
        return _skip(fqn, module, reason)

    out_error, error_data = None, None
    if layer == "adaptive":
        new: nn.Module = AdaptiveLowRankLinear.from_linear(source, policy, balance=balance)
        rank, error = planned, None
        after = (
            factor_parameters(out_f, in_f, planned, row_scales=keep_d)
            if planned is not None
            else in_f * out_f
        )
    else:
        cls = LowRankLinear if layer == "lowrank" else DynamicLowRankLinear
        generator = torch.Generator(source.weight.device).manual_seed(layer_seed(seed, fqn))
        new = cls.from_linear(
            source,
            method=method,
            balance=balance,
            input_cov=input_cov,
            cross_cov=cross_cov,
            generator=generator,
            policy=policy,
        )
        factors = new.factors()
        rank = factors.rank
        if not saves_parameters(out_f, in_f, rank, row_scales=factors.D is not None):
            return _skip(fqn, module, break_even_reason(rank))
        if speed is not None and planned is None:  # energy: the rank is known only now
            reason = speed.reason(
                out_f,
                in_f,
                rank,
                row_scales=factors.D is not None,
                bias=source.bias is not None,
                dtype=source.weight.dtype,
            )
            if reason is not None:
                return _skip(fqn, module, reason)
        error = relative_error(source.weight, factors)
        after = factor_parameters(out_f, in_f, rank, row_scales=factors.D is not None)
        if eval_cov is not None:
            out_error, error_data = output_error(source.weight, factors, eval_cov), "held-out"
        elif input_cov is not None:
            out_error = output_error(
                source.weight, factors, input_cov, cross_cov=cross_cov, target_energy=target_energy
            )
            error_data = "calibration"
    new.train(module.training)
    if not source.weight.requires_grad:
        for p in new.parameters():
            p.requires_grad_(False)
    reads = [weight_reader_policy(p, n) for p, n, _ in holders.get(id(module), [])]
    for parent, child_name, _ in holders.get(id(module), []):
        setattr(parent, child_name, new)
    few = many = None
    if rank is not None and layer != "adaptive":
        few, many = report_speedups(
            in_f,
            out_f,
            rank,
            row_scales=new.D is not None,
            bias=source.bias is not None,
            dtype=source.weight.dtype,
        )
    return LayerReport(
        name=fqn,
        kind=type(new).__name__,
        in_features=in_f,
        out_features=out_f,
        rank=rank,
        params_before=in_f * out_f,
        params_after=after,
        relative_error=error,
        seconds=0.0,
        output_error=out_error,
        error_data=error_data,
        speedup_few=few,
        speedup_many=many,
        note="; ".join(r.reason for r in reads if r is not None) or None,
    )


def _budget_without(
    spectra: Mapping[str, Any],
    eligible: Mapping[str, nn.Module],
    dense: list[str],
    budget: float,
    row_scales: bool,
) -> float:
    """The budget fraction left for the other layers once the ``dense`` ones are kept whole."""
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
    if left < least:
        raise InputError(
            f"budget={budget} keeps {int(budget * total):,} parameters, but the {len(dense)} "
            f"layers no rank speeds up (min_speedup) already hold {kept:,}, which leaves "
            f"{max(0, int(left)):,} for the other {len(others)} layers (rank 1 in each needs "
            f"{least:,})"
        )
    return min(1.0, left / (total - kept))


# ------------------------------------------------------------------------------------------
# structural changes during training, with the optimizer kept in step
# ------------------------------------------------------------------------------------------


def apply_param_swaps(optimizer: torch.optim.Optimizer, swaps: Iterable[ParamSwap]) -> int:
    """Replace parameters inside ``optimizer``'s param groups, in place.

    Each ``swap.old`` is replaced, at its position in its group, by ``swap.new`` (same
    group, same hyper-parameters). Its state is dropped, or sliced with ``swap.index``
    and carried to the single new parameter when an index is given. Every other
    parameter's state is untouched. Returns how many swaps found their parameter.
    """
    found = 0
    for swap in swaps:
        for group in optimizer.param_groups:
            params = group["params"]
            pos = next((i for i, p in enumerate(params) if p is swap.old), None)
            if pos is None:
                continue
            params[pos : pos + 1] = list(swap.new)
            state = optimizer.state.pop(swap.old, None)
            if state and swap.index is not None and len(swap.new) == 1:
                optimizer.state[swap.new[0]] = {
                    k: v[swap.index].clone()
                    if isinstance(v, torch.Tensor) and v.shape == swap.old.shape
                    else v
                    for k, v in state.items()
                }
            found += 1
            break
    return found


def switch_to_lowrank(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    policy: RankPolicy | None = None,
    *,
    rank: int | None = None,
    rank_ratio: float | None = None,
    energy: float | None = None,
    param_ratio: float | None = None,
    method: Method = "svd",
    balance: Balance | None = None,
    seed: int = 0,
) -> dict[str, SwitchResult]:
    """Switch every dense-phase :class:`~lowrank_layers.AdaptiveLowRankLinear` in ``model``.

    Given the ``optimizer``, each old ``weight`` is removed from its param group (and its
    state dropped) and the new factors take its place in the same group, with the same
    hyper-parameters; every other parameter keeps its state (biases included), so the LR
    scheduler and the training loop continue unchanged. Works with SGD (momentum), Adam
    and AdamW, foreach or fused.

    With no rank policy (``policy``, a :class:`~lowrank_layers.RankPolicy`, or its keyword
    form), each layer uses the one it was built with. With ``method="randomized"``, each
    layer's sketch is seeded by :func:`~lowrank_layers.policy.layer_seed` ``(seed, name)``,
    as in :func:`convert_model`: the result does not depend on the order of the layers.
    (The layer method :meth:`AdaptiveLowRankLinear.switch_to_lowrank
    <lowrank_layers.AdaptiveLowRankLinear.switch_to_lowrank>` takes a ``generator``: one
    matrix, one generator; model-level functions take a ``seed``.)

    Returns:
        ``{module name: SwitchResult}``.

    Raises:
        ValueError: no dense-phase ``AdaptiveLowRankLinear`` in the model; an ``optimizer``
            that lacks the weight of a layer to switch (nothing is switched then).

    Example:
        >>> model = nn.Sequential(AdaptiveLowRankLinear(64, 64), nn.ReLU())
        >>> opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        >>> results = switch_to_lowrank(model, opt, rank_ratio=0.25)
        >>> results["0"].rank, len(opt.param_groups[0]["params"])
        (16, 4)
    """
    layers = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, AdaptiveLowRankLinear) and not m.is_lowrank
    ]
    if not layers:
        raise InputError(
            "switch_to_lowrank: the model holds no AdaptiveLowRankLinear in its dense phase"
        )
    if optimizer is not None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise InputTypeError(
                f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}"
            )
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [  # frozen layers are not expected in the optimizer
            name
            for name, layer in layers
            if layer.weight.requires_grad and id(layer.weight) not in held
        ]
        if missing:
            raise InputError(
                f"switch_to_lowrank: the optimizer holds no weight of {len(missing)} of the "
                f"{len(layers)} layers to switch ({', '.join(missing[:3])}"
                f"{', ...' if len(missing) > 3 else ''}): their factors would never train. "
                "Pass the optimizer that trains this model, or optimizer=None and add the "
                "new factors yourself"
            )
    policy = as_policy(policy, rank, rank_ratio, energy, param_ratio, required=False)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InputTypeError(f"seed must be an int, got {seed!r}")
    results: dict[str, SwitchResult] = {}
    for name, layer in layers:
        old = layer.weight
        generator = torch.Generator(old.device).manual_seed(layer_seed(seed, name))
        results[name] = layer.switch_to_lowrank(
            policy, method=method, balance=balance, generator=generator
        )
        if optimizer is not None:
            new = tuple(p for n, p in layer.named_parameters() if n in FACTOR_NAMES)
            apply_param_swaps(optimizer, [ParamSwap(old, new)])
    mark_lowrank_config(model)
    return results


def prune_dynamic(
    model: nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> dict[str, int]:
    """:meth:`~lowrank_layers.DynamicLowRankLinear.prune` every dynamic layer, keeping the
    optimizer in step: the pruned ``U``, ``S``, ``Vh`` replace the old ones in their groups,
    with the optimizer state of the kept components carried over.

    Returns:
        ``{module name: new max_rank}``.
    """
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, DynamicLowRankLinear)]
    if not layers:
        raise InputError("prune_dynamic: the model holds no DynamicLowRankLinear")
    out = {}
    for name, layer in layers:
        swaps = layer.prune()
        if optimizer is not None:
            apply_param_swaps(optimizer, swaps)
        out[name] = layer.max_rank
    return out


# ------------------------------------------------------------------------------------------
# memory layout for decoding
# ------------------------------------------------------------------------------------------


@torch.no_grad()
def inference_layout_(model: nn.Module, enabled: bool = True) -> int:
    """Lay float32 low-rank layers' ``U`` out in memory for decoding on CPU (opt-in).

    Every layer stores its factors as the weights of its two linear maps, ``Vh (r, in)``
    and ``U (out, r)``, both row-major like ``nn.Linear``'s weight: the layout oneDNN's
    bfloat16/float16 kernels and GPU kernels need, and the one FSDP2 accepts. At one or a
    few tokens per call in float32 (and float64), MKL reads the second product's weight
    faster stored transposed (``Uᵀ`` row by row, strides ``(1, out)``): a matrix-vector
    product over rows of ``r`` numbers is slower than one over columns of ``out``. This
    stores ``U`` so. In bfloat16 and float16 it changes nothing (the transposed ``U`` is
    2-9x slower there, measured). See docs/benchmarks.md, "LowRankLinear in inference", for the
    gain per shape.

    Shapes, values, names and outputs (to float rounding) are unchanged: only strides
    change, through ``param.data``, so optimizers, hooks and references to the parameters
    stay valid. Saving (:func:`~lowrank_layers.save_lowrank`, ``torch.save``, transformers'
    ``save_pretrained``) works as before. Casting the model afterwards (``.to(dtype)``)
    keeps the layout; call this again after a cast to half precision.

    Not for training under FSDP2: ``fully_shard`` refuses non-contiguous parameters; call
    ``inference_layout_(model, enabled=False)`` before it. Training otherwise works in
    either layout.

    Args:
        model: a model holding low-rank layers (any other module is left alone).
        enabled: ``False`` restores contiguous (row-major) factors.

    Returns:
        The number of layers whose factors were moved.

    Example:
        >>> model = nn.Sequential(LowRankLinear(64, 32, 8))
        >>> inference_layout_(model)
        1
        >>> model[0].U.stride(), model[0].U.shape, model[0].Vh.stride()
        ((1, 32), torch.Size([32, 8]), (64, 1))
    """
    if not isinstance(model, nn.Module):
        raise InputTypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(enabled, bool):
        raise InputTypeError(f"enabled must be a bool, got {enabled!r}")
    moved = 0
    for module in model.modules():
        if not isinstance(module, LOWRANK_TYPES) or module._parameters.get("U") is None:
            continue
        changed = False
        for name in ("U", "Vh"):
            param = module._parameters[name]
            data = param.data
            if type(data) is not torch.Tensor or data.dim() != 2:  # DTensor shards and such
                continue
            transpose = enabled and name == "U" and data.dtype not in HALF_DTYPES
            new = data.mT.contiguous().mT if transpose else data.contiguous()
            if new.data_ptr() != data.data_ptr():
                param.data = new
                changed = True
        moved += changed
    return moved
