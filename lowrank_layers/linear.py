"""``LowRankLinear``: a drop-in, factorized replacement for ``nn.Linear``."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .common import InputError, as_integer
from .factorize import Balance, Factors, Method, factorize
from .layer_base import (
    FACTOR_NAMES,
    FactoredLinearBase,
    check_features,
    check_linear,
    make_linear,
    policy_rank,
    register_lowrank_params,
    upgrade_state_dict_,
)
from .policy import RankPolicy

__all__ = [
    "FACTOR_NAMES",  # re-exported from layer_base (heal, offline, convert import it here)
    "LowRankLinear",
    "check_features",  # re-exported from layer_base (factory imports it here)
    "factored_linear",
    "lowrank_linear",
    "make_linear",  # re-exported from layer_base (checkpoint imports it here)
    "stored_factors",
    "upgrade_state_dict_",  # re-exported from layer_base (checkpoint imports it here)
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


class LowRankLinear(FactoredLinearBase):
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
            :func:`~lowrank_layers.policy.break_even_rank` are allowed but save nothing.
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
        weight: a read-only :class:`~lowrank_layers.lazy_weight.FactoredWeight`, for code
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

    # TorchScript reads the annotations of the class itself, not of its bases
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
        super().__init__(in_features, out_features)
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

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return factored_linear(input, self.U, self.S, self.Vh, self.D, self.bias)
        else:  # TorchScript compiles only the branch above
            return factored_linear(input, *stored_factors(self))

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
            balance: ``"none"`` (default), ``"rownorm"`` or ``"rowsum"``, the mode of
                :func:`~lowrank_layers.factorize`; any but ``"none"`` gives the layer row
                scales ``D`` (``row_scales=True``).
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
        return cls._from_factors(factors, bias, rank=factors.rank)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"rank={self.rank}, bias={self.bias is not None}, row_scales={self.D is not None}"
        )
