"""Drop-in low-rank replacements for ``nn.Linear``.

The public API; see ``docs/`` for the guide, the design notes and the benchmarks.
"""

from .adaptive import AdaptiveLowRankLinear, SwitchResult
from .convert import (
    ConversionReport,
    LayerReport,
    convert_model,
    prune_dynamic,
    register_weight_reader,
    switch_to_lowrank,
)
from .dynamic import DynamicLowRankLinear, RankScheduler
from .factorize import (
    Factors,
    balance_rows,
    break_even_rank,
    factor_parameters,
    factorize,
    randomized_svd,
    relative_error,
    select_rank,
)
from .factory import make_efficient_linear
from .grad import GradientProjector
from .linear import LowRankLinear, lowrank_linear

__version__ = "0.1.0"

__all__ = [
    "AdaptiveLowRankLinear",
    "ConversionReport",
    "DynamicLowRankLinear",
    "Factors",
    "GradientProjector",
    "LayerReport",
    "LowRankLinear",
    "RankScheduler",
    "SwitchResult",
    "__version__",
    "balance_rows",
    "break_even_rank",
    "convert_model",
    "factor_parameters",
    "factorize",
    "lowrank_linear",
    "make_efficient_linear",
    "prune_dynamic",
    "randomized_svd",
    "register_weight_reader",
    "relative_error",
    "select_rank",
    "switch_to_lowrank",
]
