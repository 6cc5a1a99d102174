"""``LowRankLinear``: a drop-in, factorized replacement for ``nn.Linear``."""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .common import InputError, InputTypeError, as_integer
from .factorize import Balance, Factors, Method, factorize
from .policy import RankPolicy
from .readers import lazy_weight

__all__ = [
    "FACTOR_NAMES",
    "LowRankLinear",
    "check_features",
    "check_linear",
    "copy_factors_",
    "dense_from_factors",
    "factored_linear",
    "init_factors_",
    "lowrank_linear",
    "make_linear",
    "policy_rank",
    "stored_factors",
    "upgrade_state_dict_",
]

# Two regimes, chosen from the shapes alone (so torch.compile sees no branch on data):
#
# - Many tokens per call (>= FOLD_MIN_TOKENS, training batches, prefill): S and D are
#   folded into the small (out, r) weight, so no elementwise op touches an activation,
#   and the rank is zero-padded to a multiple of RANK_ALIGNMENT, since GEMMs whose inner
#   dimension is a multiple of 8 run faster on CPU (AVX2 holds 8 floats). Measured at
#   4096 tokens: rank 190 of 3072x768 ran forward+backward in 179 ms padded against
#   200 ms unpadded; rank 334 of 576x1536 in 132 ms against 153 ms.
# - Few tokens (decoding, small batches): folding copies the factors on every call, a
#   traffic of several times the weights' own that dominates a call over one token. The
#   factors are then read once, as they are stored: ``x·V`` is scaled by S (a vector of r
#   per token), and D and the bias are applied to the output. No padding: at 64 tokens
#   it cost 20-30% (rank 334 of 576x1536: 1.85 ms padded, 1.22 ms in this form).
#
# Both regimes were measured at 64 to 4096 tokens (docs/benchmarks.md); they are within
# a few percent of each other at 256-512 tokens, where the switch lies.
RANK_ALIGNMENT = 8
FOLD_MIN_TOKENS = 512
# the parameters a low-rank layer holds besides its bias (D may be None)
FACTOR_NAMES = ("U", "S", "Vh", "D")
# oneDNN serves these on CPU: its kernels want a contiguous (out, in) F.linear weight
HALF_DTYPES = (torch.bfloat16, torch.float16)


def lowrank_linear(
    input: torch.Tensor,
    U: torch.Tensor,
    S: torch.Tensor,
    V: torch.Tensor,
    D: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    fold_min_tokens: int = FOLD_MIN_TOKENS,
    rank_alignment: int = RANK_ALIGNMENT,
) -> torch.Tensor:
    """``y = x·V·diag(S)·Uᵀ·diag(D) + b``, the functional form of :class:`LowRankLinear`.

    Two ``F.linear`` calls. With at least ``FOLD_MIN_TOKENS`` tokens (rows of ``input``),
    ``S`` and ``D`` are folded into the small ``(out, r)`` weight of the second, the bias
    is fused into it, and the rank is zero-padded to a multiple of ``RANK_ALIGNMENT``.
    With fewer tokens, the factors are used as stored, each read once per call: ``S``
    scales the ``(tokens, r)`` intermediate and ``D`` the output, in place when autograd
    is off (the results are bit-identical to those with autograd on). The choice depends
    on shapes only, so ``torch.compile`` traces either regime whole.

    ``V`` is ``(in, r)``; a view of a contiguous ``Vh = Vᵀ`` (as the layers store it) is
    the layout every backend's ``F.linear`` reads fastest. ``fold_min_tokens`` and
    ``rank_alignment`` are the regime switch and the rank padding (``FOLD_MIN_TOKENS``,
    ``RANK_ALIGNMENT``). They are parameters with those defaults because TorchScript
    cannot read a module's global variables: so written, the function and the layers'
    forwards compile under ``torch.jit.script`` with both regimes.
    """
    return factored_linear(input, U, S, V.t(), D, bias, fold_min_tokens, rank_alignment)


def factored_linear(
    input: torch.Tensor,
    U: torch.Tensor,
    S: torch.Tensor,
    Vh: torch.Tensor,
    D: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    fold_min_tokens: int = FOLD_MIN_TOKENS,
    rank_alignment: int = RANK_ALIGNMENT,
) -> torch.Tensor:
    """:func:`lowrank_linear` with the first weight as the layers store it, ``Vh (r, in)``.

    The layers call this (a transpose fewer per call than passing ``V``). The factors are
    2-D, and ``.t()`` (not ``.mT``) keeps the legacy ONNX exporter, which has no
    ``aten::mT``, working.
    """
    half = Vh.dtype == torch.bfloat16 or Vh.dtype == torch.float16  # HALF_DTYPES
    tokens = input.numel() // max(input.shape[-1], 1)
    if tokens >= fold_min_tokens:
        weight = U * S
        if D is not None:
            weight = weight * D[:, None]
        pad = -S.shape[0] % rank_alignment
        # oneDNN's bfloat16/float16 kernels need the first weight contiguous, as the
        # layers store it (a transposed one ran 5-9x slower), so a Vh given otherwise is
        # copied once per call there; float32 reads either at the same speed
        # (forward+backward within 4% at 512 and 4096 tokens)
        first = F.pad(Vh, (0, 0, 0, pad)) if pad else Vh
        if half:
            first = first.contiguous()
        if pad:
            weight = F.pad(weight, (0, pad))
        return F.linear(F.linear(input, first), weight, bias)
    # under autocast the products come out in the autocast dtype: S, D and the bias
    # follow them (a no-op otherwise), as they would inside a folded weight
    if tokens == 1 and half and not Vh.is_contiguous():
        # one token in bfloat16/float16 with a Vh that is not contiguous (a V (in, r)
        # given to lowrank_linear): F.linear's half-precision kernel wants a contiguous
        # weight (measured 246 µs for 576x334), a matrix-vector product on the
        # transposed view does not (50 µs)
        shape = list(input.shape[:-1])
        shape.append(Vh.shape[0])
        hidden = torch.mv(Vh, input.reshape(-1)).reshape(shape)
    else:
        hidden = F.linear(input, Vh)
    # without autograd the scalings run in place on this call's own intermediates; with
    # it, the same operations out of place (so the bits are the same either way)
    inplace = not torch.is_grad_enabled()
    if S.dtype != hidden.dtype:
        S = S.to(hidden.dtype)
    hidden = hidden.mul_(S) if inplace else hidden * S
    if D is None:
        return F.linear(hidden, U, bias)
    out = F.linear(hidden, U)
    if D.dtype != out.dtype:
        D = D.to(out.dtype)
    out = out.mul_(D) if inplace else out * D
    if bias is None:
        return out
    if bias.dtype != out.dtype:
        bias = bias.to(out.dtype)
    return out.add_(bias) if inplace else out + bias


def stored_factors(
    layer: nn.Module,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """A low-rank layer's ``(U, S, Vh, D, bias)``, read from its parameter dict.

    Each ``layer.U``-style read goes through ``nn.Module.__getattr__``; the five of them
    cost about 9 µs per call (64x64 layer, one token: 27 µs with them, 18 µs without),
    as much as ``nn.Linear``'s whole call, so the forwards read the dict once. A
    parametrization (``torch.nn.utils.parametrize``) moves its tensor out of the dict
    into a property: then the attributes are read.
    """
    p = layer._parameters
    try:
        return p["U"], p["S"], p["Vh"], p["D"], p["bias"]  # type: ignore[return-value]
    except KeyError:
        return layer.U, layer.S, layer.Vh, layer.D, layer.bias


def policy_rank(policy: RankPolicy, out_f: int, in_f: int, *, row_scales: bool) -> int:
    """The rank a policy gives a layer built without a weight (``energy`` needs one)."""
    rank = policy.resolve(out_f, in_f, row_scales=row_scales)
    if rank is None:
        raise InputError(
            f"{policy} needs a weight's spectrum; a layer built from its sizes takes rank=, "
            "rank_ratio= or param_ratio= (or use from_linear)"
        )
    return rank


def check_features(name: str, value: object) -> int:
    """Validate a layer size: a positive int."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{name} must be a positive int, got {value!r}")
    return value


def check_linear(linear: object) -> nn.Linear:
    """Validate the source of a ``from_linear`` conversion."""
    if not isinstance(linear, nn.Linear):
        raise InputTypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
    return linear


def new_factor_params(
    out_features: int,
    in_features: int,
    rank: int,
    *,
    row_scales: bool,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    requires_grad: bool = True,
) -> dict[str, nn.Parameter | None]:
    """Uninitialised parameters ``U (out, r)``, ``S (r,)``, ``Vh (r, in)``, ``D (out,)`` or None.

    ``Vh`` is ``Vᵀ``, stored as the weight of the first linear map, like ``nn.Linear``'s
    ``(out, in)`` weight (and ``torch.linalg.svd``'s ``Vh``); ``U`` is the second's.
    """
    kw = {"device": device, "dtype": dtype}
    shapes = {"U": (out_features, rank), "S": (rank,), "Vh": (rank, in_features)}
    if row_scales:
        shapes["D"] = (out_features,)
    params: dict[str, nn.Parameter | None] = {
        name: nn.Parameter(torch.empty(shape, **kw), requires_grad=requires_grad)
        for name, shape in shapes.items()
    }
    params.setdefault("D", None)
    return params


def register_lowrank_params(
    module: nn.Module,
    out_features: int,
    in_features: int,
    rank: int,
    *,
    row_scales: bool,
    bias: bool,
    device: torch.device | str | None,
    dtype: torch.dtype | None,
) -> None:
    """Register ``U``, ``S``, ``Vh``, ``D`` (or None) and ``bias`` (or None) on ``module``."""
    for name, param in new_factor_params(
        out_features, in_features, rank, row_scales=row_scales, device=device, dtype=dtype
    ).items():
        module.register_parameter(name, param)
    b = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
    module.register_parameter("bias", b)


@torch.no_grad()
def copy_factors_(layer: nn.Module, factors: Factors, bias: torch.Tensor | None) -> None:
    """Copy ``factors`` (and ``bias``) into a layer's ``U``, ``S``, ``Vh``, ``D``, ``bias``."""
    layer.U.copy_(factors.U)
    layer.S.copy_(factors.S)
    layer.Vh.copy_(factors.V.mT)
    if factors.D is not None:
        layer.D.copy_(factors.D)
    if bias is not None:
        layer.bias.copy_(bias)


def upgrade_state_dict_(state_dict: dict[str, torch.Tensor], prefix: str) -> None:
    """Rename a format-1 ``<prefix>V`` ``(in, r)`` entry to ``<prefix>Vh`` ``(r, in)``, in place.

    Before checkpoint format 2 the layers stored ``V``; its transpose is ``Vh``. The three
    layer kinds call this from ``_load_from_state_dict``, so state dicts saved by earlier
    versions load.
    """
    old, new = prefix + "V", prefix + "Vh"
    value = state_dict.get(old)
    if isinstance(value, torch.Tensor) and value.dim() == 2 and new not in state_dict:
        state_dict[new] = value.mT.contiguous()
        del state_dict[old]


def make_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An ``nn.Linear`` holding copies of ``weight`` (out, in) and ``bias``, on their device."""
    out_features, in_features = weight.shape
    linear = nn.Linear(
        in_features, out_features, bias=bias is not None, device="meta", dtype=weight.dtype
    ).to_empty(device=weight.device)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear


@torch.no_grad()
def init_factors_(
    U: torch.Tensor,
    S: torch.Tensor,
    V: torch.Tensor,
    D: torch.Tensor | None,
    bias: torch.Tensor | None,
    *,
    active_rank: int | None = None,
) -> None:
    """Fill factors in place so the layer starts at ``nn.Linear``'s output scale.

    ``U`` and ``V`` get orthonormal columns (QR of a Gaussian, drawn in float32 as QR
    has no half-precision kernels), ``S = sqrt(out / (3·active_rank))``, ``D = 1``, and
    the bias ``nn.Linear``'s ``U(-1/sqrt(in), 1/sqrt(in))``. ``nn.Linear``'s weight has
    ``E‖W‖_F² = out/3``; orthonormal factors give ``‖W‖_F² = active_rank·S²``, the same.
    Tensors on the ``meta`` device are left alone.
    """
    out_features, rank = U.shape
    in_features = V.shape[0]
    active_rank = rank if active_rank is None else active_rank
    for factor in (U, V):
        if factor.device.type != "meta":
            tmp = torch.empty(factor.shape, device=factor.device, dtype=torch.float32)
            factor.copy_(nn.init.orthogonal_(tmp))
    S.fill_(math.sqrt(out_features / (3 * active_rank)))
    if D is not None:
        D.fill_(1.0)
    if bias is not None:
        bound = 1 / math.sqrt(in_features)
        nn.init.uniform_(bias, -bound, bound)


def dense_from_factors(factors: Factors) -> torch.Tensor:
    """``diag(D)·U·diag(S)·Vᵀ`` formed in float32 (or float64) and cast to the factors' dtype."""
    dtype = factors.U.dtype
    compute = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    return factors.to(compute).dense().to(dtype)


class LowRankLinear(nn.Module):
    r"""A linear layer whose weight is held as low-rank factors.

    .. math::
        y = x \, V \, \mathrm{diag}(S) \, U^\top \mathrm{diag}(D) + b,
        \qquad W = \mathrm{diag}(D)\, U \,\mathrm{diag}(S)\, V^\top

    The forward is two ``F.linear`` calls, ``(x V)`` then ``(·)(D U S)ᵀ + b``:
    ``r·(in + out)`` multiply-adds per token instead of ``in·out``, and no Python
    branching on data, so ``torch.compile`` traces it whole. At few tokens per call
    (decoding) it reads each factor once, as stored, and holds no cached copy: the
    layer's memory is its parameters, and a parameter change (optimizer step,
    ``load_state_dict``, ``.to()``) needs nothing invalidated. See
    :func:`lowrank_linear` for the two regimes.

    Args:
        in_features: size of each input sample.
        out_features: size of each output sample.
        rank: number of components ``r``, in ``[1, min(in_features, out_features)]``, or a
            :class:`~lowrank_layers.RankPolicy` (``rank``, ``rank_ratio`` or
            ``param_ratio``) resolved for these sizes. Ranks at or above
            :func:`~lowrank_layers.break_even_rank` are allowed but save nothing.
        bias: if ``False``, the layer has no additive bias.
        row_scales: if ``True``, the layer holds a trainable row scale ``D`` (the original
            design's DBC vector), initialised to ones.
        device, dtype: as for ``nn.Linear``.

    Attributes:
        U: ``(out_features, rank)``.  S: ``(rank,)``.  Vh: ``(rank, in_features)``, that
        is ``Vᵀ``: each factor is stored as the weight of its linear map, in
        ``nn.Linear``'s ``(out, in)`` layout (the one CPU and GPU kernels read fastest;
        see docs/design.md, "Storage layout").  V: ``Vhᵀ``, a read-only view.
        D: ``(out_features,)`` or ``None``.  bias: ``(out_features,)`` or ``None``.
        weight: a read-only :class:`~lowrank_layers.readers.FactoredWeight`, for code
            written for ``nn.Linear`` that reads ``layer.weight``: its metadata is free,
            any computation with it forms ``diag(D)·U·diag(S)·Vᵀ`` (differentiably) and
            counts it in ``dense_weight_reads``. Not a parameter, not in the state dict.
        dense_weight_reads: how many times ``weight`` was formed densely.

    A fresh layer has orthonormal ``U`` and ``V`` and a constant ``S`` chosen so that
    ``E‖W‖_F²`` equals that of ``nn.Linear``'s default initialisation: on standard
    Gaussian input its outputs have the same scale.

    Shape:
        - Input: ``(*, in_features)``
        - Output: ``(*, out_features)``

    Example:
        >>> layer = LowRankLinear(1024, 512, rank=64)
        >>> layer(torch.randn(8, 16, 1024)).shape
        torch.Size([8, 16, 512])
        >>> sum(p.numel() for p in layer.parameters())
        98880
    """

    __constants__: ClassVar[list[str]] = ["in_features", "out_features", "rank"]
    # TorchScript compiles properties; the lazy weight is for eager Python code only
    __jit_unused_properties__: ClassVar[list[str]] = ["weight", "V"]
    __jit_ignored_attributes__: ClassVar[list[str]] = ["dense_weight_reads", "_dense_weight_warned"]

    in_features: int
    out_features: int
    rank: int

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int | RankPolicy,
        *,
        bias: bool = True,
        row_scales: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features = check_features("in_features", in_features)
        self.out_features = check_features("out_features", out_features)
        max_rank = min(in_features, out_features)
        if isinstance(rank, RankPolicy):
            rank = policy_rank(rank, out_features, in_features, row_scales=row_scales)
        rank = as_integer(rank)  # type: ignore[assignment]
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= max_rank:
            raise InputError(
                f"rank must be an int in [1, {max_rank}] for a {out_features}x{in_features} "
                f"weight, got {rank!r}"
            )
        self.rank = rank
        self.dense_weight_reads = 0
        register_lowrank_params(
            self,
            out_features,
            in_features,
            rank,
            row_scales=row_scales,
            bias=bias,
            device=device,
            dtype=dtype,
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Orthonormal ``U``, ``V``; ``S = sqrt(out / (3·rank))``; ``D = 1``; bias as ``nn.Linear``.

        ``nn.Linear``'s default weight has entries ``U(-1/√in, 1/√in)``, so
        ``E‖W‖_F² = out/3``; with orthonormal factors ``‖W‖_F² = rank·S²``, which gives
        the same value for this ``S``.
        """
        init_factors_(self.U, self.S, self.Vh.t(), self.D, self.bias)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return factored_linear(input, self.U, self.S, self.Vh, self.D, self.bias)
        else:  # TorchScript compiles only the branch above
            return factored_linear(input, *stored_factors(self))

    @property
    def V(self) -> torch.Tensor:
        """``Vhᵀ``, ``(in_features, rank)``: a view of the parameter ``Vh`` (not a leaf)."""
        return self.Vh.mT

    def weight_factors(
        self,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(U, S, V, D)`` as the forward uses them (not detached; ``V`` a view of ``Vh``)."""
        return self.U, self.S, self.Vh.t(), self.D

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        upgrade_state_dict_(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def weight(self) -> torch.Tensor:
        """The ``(out, in)`` weight as a lazy tensor, a :class:`~.readers.FactoredWeight`.

        Metadata (``dtype``, ``shape``, ``device``, ``isinstance(w, torch.Tensor)``) costs
        nothing; computing with it forms the dense weight from the factors on every use,
        which warns once (``DenseWeightWarning``) and counts in ``dense_weight_reads``.
        The layer's own forward never reads it. Use :meth:`dense_weight` for a detached
        copy.
        """
        return lazy_weight(self)

    # ----------------------------------------------------------------------------------
    # conversion
    # ----------------------------------------------------------------------------------

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        policy: RankPolicy | None = None,
        *,
        rank: int | None = None,
        rank_ratio: float | None = None,
        energy: float | None = None,
        param_ratio: float | None = None,
        method: Method = "svd",
        balance: Balance = "none",
        input_cov: torch.Tensor | None = None,
        cross_cov: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> LowRankLinear:
        """Factorize an ``nn.Linear`` under exactly one rank policy (see ``factorize``).

        The new layer has the source's device and dtype and a copy of its bias; the
        source is not modified. At full rank with ``method="svd"`` it reproduces the
        source to float32 rounding.

        Args:
            linear: the source ``nn.Linear`` (or a subclass that does not override
                ``forward``); not modified.
            policy: a :class:`~lowrank_layers.RankPolicy`, or its keyword form
            rank, rank_ratio, energy, param_ratio: (exactly one, as
                :func:`~lowrank_layers.factorize`).
            method: ``"svd"`` (exact, default) or ``"randomized"``.
            balance: ``"none"`` (default), ``"rownorm"`` or ``"rowsum"``; a balanced layer
                holds ``D``.
            input_cov: ``(in, in)`` second moment ``E[x xᵀ]`` of the layer's inputs: the
                factorization then minimises the output error on such inputs (SVD-LLM).
            cross_cov: with ``input_cov``, ``E[x x̂ᵀ]`` between the original and the
                converted model's inputs (propagated conversion).
            generator: random generator for ``method="randomized"``.

        Raises:
            TypeError, ValueError: as :func:`~lowrank_layers.factorize`, or ``linear`` is
                not a linear layer.

        Example:
            >>> dense = nn.Linear(256, 128)
            >>> low = LowRankLinear.from_linear(dense, rank_ratio=0.25)
            >>> low.rank
            32
        """
        check_linear(linear)
        with torch.no_grad():
            factors = factorize(
                linear.weight.detach(),
                policy,
                rank=rank,
                rank_ratio=rank_ratio,
                energy=energy,
                param_ratio=param_ratio,
                method=method,
                balance=balance,
                input_cov=input_cov,
                cross_cov=cross_cov,
                generator=generator,
            )
            return cls.from_factors(factors, bias=linear.bias)

    @classmethod
    def from_factors(cls, factors: Factors, *, bias: torch.Tensor | None = None) -> LowRankLinear:
        """A layer holding copies of ``factors`` (and of ``bias`` when given)."""
        ref = factors.U
        layer = cls(
            factors.in_features,
            factors.out_features,
            factors.rank,
            bias=bias is not None,
            row_scales=factors.D is not None,
            device="meta",
            dtype=ref.dtype,
        ).to_empty(device=ref.device)
        copy_factors_(layer, factors, bias)
        return layer

    def factors(self) -> Factors:
        """The current parameters as detached :class:`~lowrank_layers.Factors`."""
        D = None if self.D is None else self.D.detach()
        return Factors(self.U.detach(), self.S.detach(), self.Vh.detach().mT, D)

    def dense_weight(self) -> torch.Tensor:
        """The ``(out_features, in_features)`` weight this layer represents (detached).

        The product is formed in float32 (or float64) and cast to the layer's dtype.
        """
        with torch.no_grad():
            return dense_from_factors(self.factors())

    def to_linear(self) -> nn.Linear:
        """An ``nn.Linear`` with weight ``diag(D)·U·diag(S)·Vᵀ`` and a copy of the bias."""
        return make_linear(self.dense_weight(), self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"rank={self.rank}, bias={self.bias is not None}, row_scales={self.D is not None}"
        )
