"""Drop-in low-rank replacements for ``nn.Linear``.

The public API; see ``docs/`` for the guide, the design notes and the benchmarks.
"""

from .adaptive import AdaptiveLowRankLinear, SwitchResult
from .calibrate import InputStats, collect_input_stats
from .checkpoint import load_lowrank, save_lowrank
from .common import InputError, InputTypeError
from .convert import (
    ConversionReport,
    LayerReport,
    convert_model,
    convertible_layers,
    inference_layout_,
    prune_dynamic,
    register_weight_reader,
    switch_to_lowrank,
)
from .dynamic import DynamicLowRankLinear, RankScheduler
from .factorize import Factors, balance_rows, factorize, randomized_svd, relative_error
from .factory import make_efficient_linear
from .grad import GradientProjector
from .heal import HealReport, heal
from .hf import load_pretrained, mark_lowrank_config
from .lazy_weight import DenseWeightWarning
from .linear import LowRankLinear, lowrank_linear
from .offline import convert_checkpoint
from .pipeline import CompressionReport, compress
from .policy import (
    RankPolicy,
    allocate_ranks,
    break_even_rank,
    factor_parameters,
    select_rank,
)
from .speed import SpeedModel, expected_speedup, measure_speed_model
from .tools import LowRankSummary, lowrank_summary, merge_to_dense

__version__ = "0.1.0"

__all__ = [
    "AdaptiveLowRankLinear",
    "CompressionReport",
    "ConversionReport",
    "DenseWeightWarning",
    "DynamicLowRankLinear",
    "Factors",
    "GradientProjector",
    "HealReport",
    "InputError",
    "InputStats",
    "InputTypeError",
    "LayerReport",
    "LowRankLinear",
    "LowRankSummary",
    "RankPolicy",
    "RankScheduler",
    "SpeedModel",
    "SwitchResult",
    "__version__",
    "allocate_ranks",
    "balance_rows",
    "break_even_rank",
    "collect_input_stats",
    "compress",
    "convert_checkpoint",
    "convert_model",
    "convertible_layers",
    "expected_speedup",
    "factor_parameters",
    "factorize",
    "heal",
    "inference_layout_",
    "load_lowrank",
    "load_pretrained",
    "lowrank_linear",
    "lowrank_summary",
    "make_efficient_linear",
    "mark_lowrank_config",
    "measure_speed_model",
    "merge_to_dense",
    "prune_dynamic",
    "randomized_svd",
    "register_weight_reader",
    "relative_error",
    "save_lowrank",
    "select_rank",
    "switch_to_lowrank",
]
