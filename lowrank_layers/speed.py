"""What a low-rank layer is expected to gain over ``nn.Linear``: a cost model of the forward.

A low-rank layer reads ``r·(in + out)`` weights and does as many multiply-adds per token,
against ``in·out`` for ``nn.Linear``: that ratio is the limit of its speed-up, at one
token per call (where reading the weights bounds the time) and at thousands (where the
arithmetic does). What keeps a layer from its limit is the rest of the forward:

- **per-call costs.** The factorized forward dispatches three operations (``x·V``, the
  scaling by ``S``, ``·Uᵀ``; five with a row scale ``D`` and a bias) where ``nn.Linear``
  dispatches one. At one token, a small layer's whole product takes a few microseconds,
  as long as a dispatch: a 576x192 projection at ``param_ratio=0.8`` is no faster.
- **the fold at many tokens.** From ``FOLD_MIN_TOKENS`` tokens on, ``S`` (and ``D``) are
  folded into ``U`` and the rank padded to a multiple of 8: a copy of the factors per
  call, and arithmetic on the padded rank.
- **the weights' layout.** A one-token product (a matrix-vector product) reads its
  weight at a speed that depends on how long its contiguous runs are: on the machine of
  docs/benchmarks.md, 9 GB/s over rows of 256 numbers, 14 over 1024, 20 over 4096
  (float32, weights out of cache). Both factors are stored as ``nn.Linear`` weights, so
  the second product reads ``U (out, r)`` in rows of ``r`` numbers, shorter than the
  dense weight's rows of ``in``: a layer at ``param_ratio`` 0.9 is slower than
  ``nn.Linear`` at one token although it reads 10% fewer bytes.
  :func:`~lowrank_layers.inference_layout_` stores ``U`` transposed, in runs of ``out``
  numbers.

:class:`SpeedModel` prices each operation as ``call + max(bytes / bandwidth,
flops / peak)``, a one-token product's bandwidth a function of its weight's row length;
:func:`expected_speedup` is the ratio of the two forwards' sums. Its default constants
were measured on the machine of docs/benchmarks.md (2 cores of an AMD EPYC, float32);
:func:`measure_speed_model` measures them on the machine at hand. It is a model:
whole-model speed-ups, measured, are in docs/benchmarks.md.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .common import InputError, InputTypeError, check_int, check_positive
from .linear import FOLD_MIN_TOKENS, HALF_DTYPES, RANK_ALIGNMENT

__all__ = [
    "REPORT_TOKENS",
    "SpeedModel",
    "SpeedRule",
    "expected_speedup",
    "measure_speed_model",
    "median_seconds",
    "report_speedups",
    "speed_rule",
]

# token counts per call shown in conversion reports and `inspect`: decoding one sequence,
# and a prefill or an encoder batch
REPORT_TOKENS: tuple[int, int] = (1, 1024)


@dataclass(frozen=True)
class SpeedModel:
    """Costs of one machine: an operation takes ``call + max(bytes/bandwidth, flops/peak)``.

    A matrix-vector product (one token) reads a weight of rows of ``n`` contiguous numbers
    at ``bandwidth · n / (n + half_row)`` (:meth:`read_bandwidth`); matrix products and
    activations are read at ``bandwidth``.

    Attributes:
        bandwidth: bytes per second a matrix-vector product reads its weight at, out of
            cache, as its rows grow long (the limit).
        peak: FLOPs per second of a large matrix product.
        call: seconds of fixed cost per operation dispatched (Python, dispatcher, kernel
            launch).
        half_row: the row length, in numbers, at which a weight is read at half of
            ``bandwidth``; 0 makes the speed independent of the layout.
    """

    bandwidth: float = 18e9
    peak: float = 9e10
    call: float = 6e-6
    half_row: float = 180.0

    def __post_init__(self) -> None:
        for name in ("bandwidth", "peak", "call", "half_row"):
            value = getattr(self, name)
            positive = name in ("bandwidth", "peak")
            allowed = "a finite number > 0" if positive else "a finite number >= 0"
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise InputTypeError(f"SpeedModel {name} must be {allowed}, got {value!r}")
            if not math.isfinite(value) or value < 0 or (positive and value == 0):
                raise InputError(f"SpeedModel {name} must be {allowed}, got {value!r}")

    def read_bandwidth(self, row: int) -> float:
        """Bytes per second a weight whose rows hold ``row`` contiguous numbers is read at."""
        return self.bandwidth * row / (row + self.half_row)

    def seconds(self, bytes_moved: float, flops: float) -> float:
        """Modelled time of one operation."""
        return self.call + max(bytes_moved / self.bandwidth, flops / self.peak)

    def matmul(self, tokens: int, k: int, n: int, element: int, row: int | None = None) -> float:
        """``(tokens, k) @ (k, n)``: the weight and the activations read, the output written.

        One token is a matrix-vector product, which reads the weight in its rows (of
        ``row`` numbers, ``k`` by default: ``F.linear``'s ``(n, k)`` weight); from two
        tokens on, a matrix product, whose kernel packs the weight in its own blocks.
        """
        weight = element * k * n
        if tokens == 1:  # read as slowly as that many more bytes at `bandwidth`
            weight *= self.bandwidth / self.read_bandwidth(k if row is None else row)
        return self.seconds(weight + element * tokens * (k + n), 2.0 * tokens * k * n)

    def elementwise(self, elements: int, element: int) -> float:
        """An elementwise product or sum over ``elements`` values (read twice, written once)."""
        return self.seconds(3.0 * element * elements, float(elements))


DEFAULT_SPEED_MODEL = SpeedModel()


def dense_seconds(
    in_features: int, out_features: int, tokens: int, *, element: int, model: SpeedModel
) -> float:
    """Modelled time of ``nn.Linear``'s forward (the bias is fused into the product)."""
    return model.matmul(tokens, in_features, out_features, element)


def lowrank_seconds(
    in_features: int,
    out_features: int,
    rank: int,
    tokens: int,
    *,
    row_scales: bool,
    bias: bool,
    element: int,
    model: SpeedModel,
    transposed_u: bool = False,
) -> float:
    """Modelled time of :func:`~lowrank_layers.linear.lowrank_linear`, in the regime it takes.

    ``transposed_u``: ``U`` stored transposed (:func:`~lowrank_layers.inference_layout_`),
    so the few-token regime reads it in runs of ``out`` numbers instead of ``r``; the
    folded regime multiplies a fresh ``U·S``, ``(out, r)`` row-major, either way.
    """
    if tokens >= FOLD_MIN_TOKENS:
        padded = math.ceil(rank / RANK_ALIGNMENT) * RANK_ALIGNMENT
        t = model.elementwise(out_features * rank, element)  # U * S
        t += model.elementwise(out_features * rank, element) if row_scales else 0.0
        if padded != rank:  # zero-padding copies of V and of the folded weight
            t += 2 * model.seconds(element * 2 * (in_features + out_features) * rank, 0.0)
        return (
            t
            + model.matmul(tokens, in_features, padded, element)
            + model.matmul(tokens, padded, out_features, element)
        )
    u_row = out_features if transposed_u else rank
    t = model.matmul(tokens, in_features, rank, element)
    t += model.elementwise(tokens * rank, element)  # · S
    t += model.matmul(tokens, rank, out_features, element, row=u_row)
    if row_scales:  # · D, then + bias, as separate operations
        t += model.elementwise(tokens * out_features, element)
        t += model.elementwise(tokens * out_features, element) if bias else 0.0
    return t


def expected_speedup(
    in_features: int,
    out_features: int,
    rank: int,
    tokens: int = 1,
    *,
    row_scales: bool = False,
    bias: bool = True,
    dtype: torch.dtype = torch.float32,
    model: SpeedModel | None = None,
    inference_layout: bool = False,
) -> float:
    """The modelled speed-up of a low-rank layer's forward over ``nn.Linear`` of its shape.

    Args:
        in_features, out_features, rank: the layer.
        tokens: rows per call (batch × sequence length): 1 when decoding one sequence.
        row_scales, bias: whether the layer has a row scale ``D`` and a bias.
        dtype: the weights' dtype (its size sets the bytes read).
        model: the machine's costs (default: the constants of :class:`SpeedModel`).
        inference_layout: price ``U`` as :func:`~lowrank_layers.inference_layout_` stores
            it (transposed, float32 and float64 only) rather than as converted; reports
            and ``min_speedup`` price the stored layout.

    Returns:
        ``time(nn.Linear) / time(low rank)``, above 1 where the layer pays.

    Example:
        >>> round(expected_speedup(4096, 4096, 512, tokens=1), 1)  # limit 4.0; U in rows of 512
        3.4
        >>> round(expected_speedup(4096, 4096, 512, tokens=1, inference_layout=True), 1)
        3.9
        >>> expected_speedup(576, 192, 115, tokens=1) < 1.0     # small: per-call costs
        True
    """
    for name, value in (
        ("in_features", in_features),
        ("out_features", out_features),
        ("rank", rank),
        ("tokens", tokens),
    ):
        check_int(name, value)
    if not isinstance(dtype, torch.dtype):
        raise InputTypeError(f"dtype must be a torch.dtype, got {dtype!r}")
    if not isinstance(inference_layout, bool):
        raise InputTypeError(f"inference_layout must be a bool, got {inference_layout!r}")
    element = torch.empty(0, dtype=dtype).element_size()
    costs = DEFAULT_SPEED_MODEL if model is None else model
    dense = dense_seconds(in_features, out_features, tokens, element=element, model=costs)
    low = lowrank_seconds(
        in_features,
        out_features,
        rank,
        tokens,
        row_scales=row_scales,
        bias=bias,
        element=element,
        model=costs,
        transposed_u=inference_layout and dtype not in HALF_DTYPES,
    )
    return dense / low


@dataclass(frozen=True)
class SpeedRule:
    """Keep a layer dense unless its expected speed-up reaches ``min_speedup`` at ``tokens``
    per call (:func:`expected_speedup`); with several token counts, at any one of them.

    ``convert_model(min_speedup=..., speedup_tokens=...)`` and ``compress(min_speedup=...)``
    apply it at the user's token count. Without ``min_speedup``, a conversion's default
    guard (``ConversionConfig(guard=True)``) applies ``SpeedRule(1.0, REPORT_TOKENS)``: a
    rank expected to run slower than ``nn.Linear`` both when decoding and on a batch is
    not worth its error.
    """

    min_speedup: float
    tokens: int | tuple[int, ...] = 1
    model: SpeedModel | None = None

    def __post_init__(self) -> None:
        check_positive("min_speedup", self.min_speedup)
        if not self.token_counts:
            raise InputError("speedup_tokens must name at least one token count, got ()")
        for count in self.token_counts:
            check_int("speedup_tokens", count)

    @property
    def token_counts(self) -> tuple[int, ...]:
        return self.tokens if isinstance(self.tokens, tuple) else (self.tokens,)

    def speedups(
        self, out_f: int, in_f: int, rank: int, *, row_scales: bool, bias: bool, dtype: torch.dtype
    ) -> tuple[float, ...]:
        """The expected speed-up at each of :attr:`token_counts`."""
        return tuple(
            expected_speedup(
                in_f,
                out_f,
                rank,
                t,
                row_scales=row_scales,
                bias=bias,
                dtype=dtype,
                model=self.model,
            )
            for t in self.token_counts
        )

    def reason(
        self, out_f: int, in_f: int, rank: int, *, row_scales: bool, bias: bool, dtype: torch.dtype
    ) -> str | None:
        """Why a layer of this rank stays dense, or None when it pays."""
        xs = self.speedups(out_f, in_f, rank, row_scales=row_scales, bias=bias, dtype=dtype)
        if max(xs) >= self.min_speedup:
            return None
        at = " and ".join(
            f"{x:.2f}x at {t} {'token' if t == 1 else 'tokens'}"
            for x, t in zip(xs, self.token_counts, strict=True)
        )
        if self.min_speedup == 1.0 and len(xs) > 1:
            return f"expected to run slower than nn.Linear: {at} per call"
        return f"expected speed-up {at} per call is below min_speedup={self.min_speedup:g}"

    def max_rank(
        self, out_f: int, in_f: int, upper: int, *, row_scales: bool, bias: bool, dtype: torch.dtype
    ) -> int:
        """The largest rank in ``[1, upper]`` that pays (found by bisection; the speed-up
        falls as the rank grows), or 0 when even rank 1 does not."""

        def pays(r: int) -> bool:
            return (
                self.reason(out_f, in_f, r, row_scales=row_scales, bias=bias, dtype=dtype) is None
            )

        if upper < 1 or not pays(1):
            return 0
        lo, hi = 1, upper
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if pays(mid) else (lo, mid - 1)
        return lo


def speed_rule(min_speedup: float | None, speedup_tokens: int = 1) -> SpeedRule | None:
    """The rule of the ``min_speedup=`` / ``speedup_tokens=`` options (None without one);
    both are validated either way."""
    if min_speedup is None:
        check_int("speedup_tokens", speedup_tokens)
        return None
    return SpeedRule(min_speedup, speedup_tokens)


def report_speedups(
    in_features: int,
    out_features: int,
    rank: int,
    *,
    row_scales: bool,
    bias: bool,
    dtype: torch.dtype,
) -> tuple[float, float]:
    """:func:`expected_speedup` at each of ``REPORT_TOKENS``, as conversion reports show it."""
    few, many = (
        expected_speedup(
            in_features, out_features, rank, t, row_scales=row_scales, bias=bias, dtype=dtype
        )
        for t in REPORT_TOKENS
    )
    return few, many


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall-clock seconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs
    (also the benchmarks' timer)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# rows of the weights measure_speed_model reads (eight 8 MiB float32 matrices per length)
MEASURED_ROWS: tuple[int, ...] = (256, 1024, 4096)


def fit_read_bandwidth(rows: tuple[int, ...], seconds_per_byte: list[float]) -> tuple[float, float]:
    """``(bandwidth, half_row)`` of :meth:`SpeedModel.read_bandwidth` fitted to measurements.

    ``1 / read_bandwidth(n) = (1 + half_row / n) / bandwidth`` is linear in ``1 / n``: a
    least-squares line through the measured seconds per byte. A machine whose short rows
    read no slower than long ones gets ``half_row = 0``.
    """
    if len(rows) != len(seconds_per_byte) or len(set(rows)) < 2:
        raise InputError(
            "fit_read_bandwidth needs one time per row length and at least two row lengths, "
            f"got rows={rows!r} and {len(seconds_per_byte)} times"
        )
    xs = [1.0 / n for n in rows]
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(seconds_per_byte)
    sxx = sum((x - mean_x) ** 2 for x in xs)
    pairs = zip(xs, seconds_per_byte, strict=True)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in pairs) / sxx
    intercept = mean_y - slope * mean_x
    if slope <= 0 or intercept <= 0:
        return 1.0 / mean_y, 0.0
    return 1.0 / intercept, slope / intercept


@torch.inference_mode()
def measure_speed_model(*, repeats: int = 9) -> SpeedModel:
    """Measure :class:`SpeedModel`'s constants on this machine, in float32 (a few seconds).

    - ``call``: one ``torch.mul`` on 8 values;
    - ``bandwidth`` and ``half_row``: ``F.linear`` of one token through 64 MiB of weights
      (eight matrices in turn, so that they are read from memory, not from cache) with
      rows of 256, 1024 and 4096 numbers, fitted by :func:`fit_read_bandwidth`;
    - ``peak``: a 1024x1024x1024 matrix product.
    """
    check_int("repeats", repeats)
    small = torch.ones(8)
    per_call = median_seconds(lambda: torch.mul(small, small), repeats * 20)
    per_byte = []
    for row in MEASURED_ROWS:
        weights = [torch.randn((2 << 20) // row, row) for _ in range(8)]
        x = torch.randn(1, row)

        def read_all(weights: list[torch.Tensor] = weights, x: torch.Tensor = x) -> None:
            for w in weights:
                torch.nn.functional.linear(x, w)

        t = median_seconds(read_all, repeats) / len(weights)
        per_byte.append(max(t - per_call, 1e-9) / (weights[0].numel() * 4))
        del weights
    bandwidth, half_row = fit_read_bandwidth(MEASURED_ROWS, per_byte)
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    t = median_seconds(lambda: a @ b, repeats)
    return SpeedModel(bandwidth=bandwidth, peak=2 * 1024**3 / t, call=per_call, half_row=half_row)
