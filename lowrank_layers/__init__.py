"""Drop-in low-rank replacements for ``nn.Linear``.

The public API; see ``docs/`` for the guide, the design notes and the benchmarks.
"""

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
from .linear import LowRankLinear

__version__ = "0.1.0"

__all__ = [
    "Factors",
    "LowRankLinear",
    "__version__",
    "balance_rows",
    "break_even_rank",
    "factor_parameters",
    "factorize",
    "make_efficient_linear",
    "randomized_svd",
    "relative_error",
    "select_rank",
]
