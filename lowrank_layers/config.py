"""One object for what a conversion does: :class:`ConversionConfig`.

Every way of converting a model takes it unchanged — :func:`~lowrank_layers.convert_model`,
:func:`~lowrank_layers.compress`, :func:`~lowrank_layers.convert_checkpoint`,
:func:`~lowrank_layers.hf.convert_pretrained` and the ``lowrank-layers convert`` command
(which builds one from flags spelled like its fields) — so the same words give the same
conversion whichever route runs it. It is frozen and validated when made: a bad value is
refused before any model is touched.

The three entry points that users call most (``convert_model``, ``compress``,
``convert_checkpoint``) also take its fields as keywords, ``convert_model(model,
param_ratio=0.5)``: the same validation, made into a config at once. Giving both a config and
keywords is an error.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import InitVar, dataclass, field, fields
from types import MappingProxyType
from typing import Any, Literal

from torch import nn

from .common import InputError, InputTypeError, check_choice, check_fraction, check_int
from .factorize import BALANCE_MODES, METHODS, Balance, Method
from .heal import check_heal_options
from .policy import RankPolicy, as_policy
from .selection import check_patterns, name_matches
from .speed import REPORT_TOKENS, SpeedRule, speed_rule
from .targets import is_embedding_name

__all__ = [
    "ALLOCATIONS",
    "LAYER_KINDS",
    "Allocation",
    "ConversionConfig",
    "HealConfig",
    "LayerKind",
    "config_from",
]

LayerKind = Literal["lowrank", "adaptive", "dynamic"]
LAYER_KINDS: tuple[str, ...] = ("lowrank", "adaptive", "dynamic")
Allocation = Literal["auto", "loss", "minimax", "greedy", "uniform"]
ALLOCATIONS: tuple[str, ...] = ("auto", "loss", "minimax", "greedy", "uniform")
Patterns = str | Sequence[str] | None


@dataclass(frozen=True)
class ConversionConfig:
    """What to convert and how: the rank rule, the selection, the factorization, the speed
    rule and the layer kind.

    The rank rule is exactly one of:

    - ``policy``: a :class:`~lowrank_layers.RankPolicy` for every layer, or its keyword form
      (``rank=``, ``rank_ratio=``, ``energy=``, ``param_ratio=``);
    - ``budget``: keep at most this fraction (0, 1] of the converted layers' weight
      parameters over the whole model, shared by ``allocation``;
    - ``ranks``: an explicit plan, ``{layer name: rank, or None to keep it dense}``;
    - ``target_speedup``: :func:`~lowrank_layers.compress` only: the least-loss plan whose
      modelled forward time of the converted layers together, at ``speedup_tokens`` per
      call (default 1: decoding), is this many times shorter than dense (above 1).

    Args:
        allocation: how ``budget`` is shared, the same word everywhere:

            - ``"loss"``: each layer's rank from its estimated effect on the model's output
              (one gradient pass on calibration data; layers may stay dense). Needs data:
              :func:`~lowrank_layers.compress`;
            - ``"minimax"``: the same relative weight error for every layer, from the
              singular values (no data);
            - ``"greedy"``: the singular values worth most parameters first (no data);
            - ``"uniform"``: ``param_ratio=budget`` in every layer;
            - ``"auto"`` (default): ``"loss"`` in ``compress``, ``"minimax"`` elsewhere.
        include, exclude: which modules, by name: a regex matching the whole dotted name
            (``re.fullmatch``), or a list of exact names or dotted suffixes (peft's rule).
        filter_fn: ``filter_fn(module, name) -> bool``, a further test (models only: a
            checkpoint has no modules).
        threshold: convert only weights with ``in·out > threshold²`` (the original
            ``make_efficient_linear``'s size test); 0 converts any size.
        embeddings: also convert layers whose name looks like an embedding (``embed_tokens``,
            ``wte``, ``shared``: :func:`~lowrank_layers.targets.is_embedding_name`); off by
            default, as their rows are looked up, not multiplied.
        method: ``"svd"`` (exact) or ``"randomized"`` (:func:`~lowrank_layers.factorize`).
        balance: ``"none"``, ``"rownorm"`` or ``"rowsum"``: the DBC row balancing applied
            before the SVD; with anything but ``"none"`` each layer keeps row scales ``D``.
        seed: seeds each layer's randomized sketch by its name
            (:func:`~lowrank_layers.policy.layer_seed`): results do not depend on the order
            or the subset of layers converted, and every route gives the same factors.
        min_speedup: keep dense every layer whose forward is not expected to be at least this
            many times as fast as ``nn.Linear`` at ``speedup_tokens`` tokens per call
            (:func:`~lowrank_layers.speed.expected_speedup`); with a budget, each layer's
            rank is capped where it stops paying.
        speedup_tokens: tokens per call the speed rules are judged at (1: decoding one
            sequence; the batch times the sequence length for an encoder). Default:
            ``min_speedup`` at 1 token; the guard at 1 and at 1024 tokens.
        guard: leave dense, each with its reason in the report, the layers a conversion
            cannot pay for (default True; False converts every selected layer the rank
            rule allows):

            - too small to gain: even rank 1 is expected to run slower than
              ``nn.Linear``, decoding (1 token per call) and on a batch (1024 tokens);
            - the model's output layer (its last ``nn.Linear``, the layer transformers'
              quantizers also keep): a rank below its number of outputs mixes the
              predictions themselves, with no later layer to correct it (a 10-way head at
              rank 4). Only :func:`~lowrank_layers.convert_model` and
              :func:`~lowrank_layers.compress` see modules: a checkpoint's head is
              excluded by name (``exclude=``);
            - a rank expected to run slower than ``nn.Linear`` both decoding and on a
              batch (at ``speedup_tokens``, when given); with a budget the rank is capped
              where it stops paying (``min_speedup`` replaces this rule);
            - in :func:`~lowrank_layers.compress`, a layer no gradient of the objective
              reaches (BERT's pooler when the objective is the hidden states): its error
              cannot be measured, and the budget is shared by the other layers.
        layer: ``"lowrank"`` (:class:`~lowrank_layers.LowRankLinear`), ``"adaptive"``
            (:class:`~lowrank_layers.AdaptiveLowRankLinear` in its dense phase, factorized
            later by :func:`~lowrank_layers.switch_to_lowrank`) or ``"dynamic"``
            (:class:`~lowrank_layers.DynamicLowRankLinear`, the rank as ``max_rank``).

    Raises:
        ValueError, TypeError: a bad value (named, with what is allowed); several rank rules
            or none.

    Example:
        >>> config = ConversionConfig(param_ratio=0.5, exclude=["lm_head"])
        >>> config.policy, config.exclude
        (RankPolicy(rank=None, rank_ratio=None, energy=None, param_ratio=0.5), ('lm_head',))
        >>> ConversionConfig(budget=0.8).rule
        'budget=0.8'
    """

    policy: RankPolicy | None = None
    budget: float | None = None
    ranks: Mapping[str, int | None] | None = None
    target_speedup: float | None = None
    allocation: Allocation = "auto"
    include: Patterns = None
    exclude: Patterns = None
    filter_fn: Callable[[nn.Module, str], bool] | None = field(default=None, compare=False)
    threshold: int = 0
    embeddings: bool = False
    method: Method = "svd"
    balance: Balance = "none"
    seed: int = 0
    min_speedup: float | None = None
    speedup_tokens: int | None = None
    guard: bool = True
    layer: LayerKind = "lowrank"
    # the keyword form of the policy, folded into ``policy``
    rank: InitVar[int | None] = None
    rank_ratio: InitVar[float | None] = None
    energy: InitVar[float | None] = None
    param_ratio: InitVar[float | None] = None

    def __post_init__(
        self,
        rank: int | None,
        rank_ratio: float | None,
        energy: float | None,
        param_ratio: float | None,
    ) -> None:
        set_ = object.__setattr__
        set_(self, "policy", as_policy(self.policy, rank, rank_ratio, energy, param_ratio,
                                       required=False))  # fmt: skip
        check_choice("allocation", self.allocation, ALLOCATIONS)
        self._check_rule()
        for name in ("include", "exclude"):
            value = getattr(self, name)
            check_patterns(name, value)
            if value is not None and not isinstance(value, str):
                set_(self, name, tuple(value))
        if self.filter_fn is not None and not callable(self.filter_fn):
            raise InputTypeError(f"filter_fn must be callable, got {self.filter_fn!r}")
        check_int("threshold", self.threshold, 0)
        check_int("seed", self.seed, 0)
        for name in ("embeddings", "guard"):
            if not isinstance(getattr(self, name), bool):
                raise InputTypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        check_choice("method", self.method, METHODS)
        check_choice("balance", self.balance, BALANCE_MODES)
        check_choice("layer", self.layer, LAYER_KINDS)
        if self.speedup_tokens is not None:
            check_int("speedup_tokens", self.speedup_tokens)
        speed_rule(self.min_speedup)  # validates it
        self._check_layer()

    def _check_rule(self) -> None:
        rules = ("policy", "budget", "ranks", "target_speedup")
        given = [k for k in rules if getattr(self, k) is not None]
        if len(given) > 1:
            got = " and ".join(f"{k}={getattr(self, k) if k != 'ranks' else '{...}'}"
                               for k in given)  # fmt: skip
            raise InputError(
                f"give one rank rule — a policy (rank, rank_ratio, energy, param_ratio), "
                f"budget, ranks or target_speedup — got {got}"
            )
        if self.budget is not None:
            check_fraction("budget", self.budget)
        elif self.target_speedup is not None:
            value = self.target_speedup
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 1:
                raise InputError(
                    f"target_speedup must be a number above 1 (1.3: 30% faster), got {value!r}"
                )
            if self.allocation not in ("auto", "loss"):
                raise InputError(
                    f"target_speedup is met by the loss-aware allocation; allocation="
                    f"{self.allocation!r} shares a parameter budget: give budget= instead"
                )
        elif self.ranks is not None:
            if not isinstance(self.ranks, Mapping):
                raise InputTypeError(
                    f"ranks must be a mapping {{name: rank or None}}, got {self.ranks!r}"
                )
            object.__setattr__(self, "ranks", MappingProxyType(dict(self.ranks)))
        elif self.allocation != "auto":
            raise InputError(f"allocation={self.allocation!r} shares a budget: give budget=")

    def _check_layer(self) -> None:
        if self.layer != "adaptive":
            return
        if self.budget is not None or self.ranks is not None or self.target_speedup is not None:
            raise InputError(
                "budget, ranks and target_speedup apply to layer='lowrank' or 'dynamic'; an "
                "adaptive layer "
                "is factorized later, by switch_to_lowrank, with a rank policy"
            )
        if self.method != "svd" or self.seed != 0:
            raise InputError(
                f"method={self.method!r} and seed={self.seed} choose how a layer is factorized "
                "now; an adaptive layer is factorized later: pass them to switch_to_lowrank"
            )
        if self.min_speedup is not None:
            raise InputError(
                "min_speedup applies to layer='lowrank' or 'dynamic'; an adaptive layer stays "
                "dense until switch_to_lowrank"
            )

    @property
    def rule(self) -> str | None:
        """The rank rule in words (``"param_ratio=0.5"``, ``"budget=0.8"``, ``"ranks"``), or
        None when none is set."""
        if self.policy is not None:
            return str(self.policy)
        if self.budget is not None:
            return f"budget={self.budget}"
        if self.target_speedup is not None:
            return f"target_speedup={self.target_speedup}"
        return None if self.ranks is None else "ranks"

    @property
    def row_scales(self) -> bool:
        """Whether converted layers keep row scales ``D`` (``balance`` is not ``"none"``)."""
        return self.balance != "none"

    @property
    def speed(self) -> SpeedRule | None:
        """The speed rule: ``min_speedup`` at ``speedup_tokens`` (default 1); else, with
        ``guard``, not slower than ``nn.Linear`` at ``speedup_tokens`` or, by default, at
        one of :data:`~lowrank_layers.speed.REPORT_TOKENS`; else None."""
        if self.min_speedup is not None:
            return SpeedRule(self.min_speedup, self.speedup_tokens or 1)
        if self.guard and self.ranks is None:  # a ranks plan is applied as given
            return self.guard_speed
        return None

    @property
    def guard_speed(self) -> SpeedRule:
        """The guard's speed rule: not slower than ``nn.Linear`` at ``speedup_tokens`` or, by
        default, at one of :data:`~lowrank_layers.speed.REPORT_TOKENS` (decoding, a batch)."""
        return SpeedRule(1.0, self.speedup_tokens or REPORT_TOKENS)

    def selects(self, name: str) -> bool:
        """Whether a module named ``name`` passes ``include`` and ``exclude`` (``filter_fn``
        needs the module itself)."""
        if self.include is not None and not name_matches(name, self.include):
            return False
        return self.exclude is None or not name_matches(name, self.exclude)

    def keeps_embedding(self, name: str) -> bool:
        """Whether a module named ``name`` is kept as it is for its embedding-like name
        (``embeddings=False``)."""
        return not self.embeddings and is_embedding_name(name)


def config_from(
    config: ConversionConfig | None, options: Mapping[str, Any], *, caller: str
) -> ConversionConfig:
    """The one config of a call: ``config``, or the keyword form ``options`` (the fields of
    :class:`ConversionConfig`), not both."""
    if config is not None:
        if not isinstance(config, ConversionConfig):
            hint = " (a RankPolicy goes in policy=)" if isinstance(config, RankPolicy) else ""
            raise InputTypeError(
                f"{caller}: config must be a ConversionConfig, got {type(config).__name__}{hint}"
            )
        if options:
            raise InputError(
                f"{caller}: give config= or its fields as keywords, not both (got config and "
                f"{', '.join(sorted(options))})"
            )
        return config
    allowed = {f.name for f in fields(ConversionConfig)} | {
        "rank", "rank_ratio", "energy", "param_ratio"
    }  # fmt: skip
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise InputTypeError(
            f"{caller} got unexpected keyword {', '.join(map(repr, unknown))}; it takes a "
            f"ConversionConfig's fields: {', '.join(sorted(allowed))}"
        )
    return ConversionConfig(**options)


@dataclass(frozen=True)
class HealConfig:
    """How :func:`~lowrank_layers.compress` heals a converted model: a short distillation
    towards the original (:func:`~lowrank_layers.heal`).

    Args:
        steps, seconds: heal for this many optimizer steps and/or seconds (at least one).
        mode: ``"end_to_end"`` (the whole model against the original's output) or
            ``"blockwise"`` (each block against the original block's output).
        lr: the learning rate.
    """

    steps: int | None = None
    seconds: float | None = None
    mode: str = "end_to_end"
    lr: float = 1e-4

    def __post_init__(self) -> None:
        check_heal_options(
            objective="auto", mode=self.mode, steps=self.steps, seconds=self.seconds, lr=self.lr
        )
