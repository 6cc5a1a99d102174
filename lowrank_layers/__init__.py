"""Drop-in low-rank replacements for ``nn.Linear``.

The public API: the layers, the rank policy and the conversion config, ``factorize``, one
verb per job, their reports and the errors. Everything else lives in named submodules
(``lowrank_layers.speed``, ``lowrank_layers.calibrate``, ``lowrank_layers.hf``, ...) and
is importable there; see ``docs/`` for the guide, the design notes and the benchmarks.
"""

from .adaptive import AdaptiveLowRankLinear
from .checkpoint import load_lowrank, save_lowrank
from .common import InputError, InputTypeError
from .config import ConversionConfig, HealConfig
from .convert import convert_model
from .dynamic import DynamicLowRankLinear, RankScheduler
from .factorize import Factors, factorize
from .factory import make_efficient_linear
from .heal import heal
from .hf_quantizer import load_pretrained
from .lazy_weight import DenseWeightWarning
from .linear import LowRankLinear
from .offline import convert_checkpoint
from .pipeline import CompressionReport, compress
from .policy import RankPolicy
from .report import ConversionReport
from .tools import inference_layout_, lowrank_summary, merge_to_dense
from .training import prune_dynamic, switch_to_lowrank

__version__ = "0.1.0"

__all__ = [
    "AdaptiveLowRankLinear",
    "CompressionReport",
    "ConversionConfig",
    "ConversionReport",
    "DenseWeightWarning",
    "DynamicLowRankLinear",
    "Factors",
    "HealConfig",
    "InputError",
    "InputTypeError",
    "LowRankLinear",
    "RankPolicy",
    "RankScheduler",
    "__version__",
    "compress",
    "convert_checkpoint",
    "convert_model",
    "factorize",
    "heal",
    "inference_layout_",
    "load_lowrank",
    "load_pretrained",
    "lowrank_summary",
    "make_efficient_linear",
    "merge_to_dense",
    "prune_dynamic",
    "save_lowrank",
    "switch_to_lowrank",
]
