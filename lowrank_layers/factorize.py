"""Low-rank factorization of weight matrices: the maths under every layer.

A weight ``W`` of shape ``(out_features, in_features)`` is approximated as::

    W ≈ diag(D) · U · diag(S) · Vᵀ      U: (out, r)   S: (r,)   V: (in, r)   D: (out,) or None

Everything here is a pure function of tensors (no ``nn.Module``); the layers call
it, it never imports the layers. All linear algebra runs in float32 or float64
whatever the input dtype (SVD and QR have no half-precision kernels, and
bfloat16 would lose the small singular values), and results are cast back.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal

import torch

from .common import InputError, InputTypeError, all_finite, check_choice, check_int
from .policy import (
    RankPolicy,
    as_policy,
    break_even_rank,
    factor_parameters,
    resolve_rank,
    select_rank,
)

__all__ = [
    "BALANCE_MODES",
    "Factors",
    "balance_rows",
    "break_even_rank",
    "factor_parameters",
    "factorize",
    "output_error",
    "randomized_svd",
    "relative_error",
    "resolve_rank",
    "select_rank",
    "truncated_spectrum",
    "whitening_factor",
]

Method = Literal["svd", "randomized"]
Balance = Literal["none", "rownorm", "rowsum"]
Sketch = Literal["gaussian", "sparse"]

BALANCE_MODES: tuple[str, ...] = ("none", "rownorm", "rowsum")
METHODS: tuple[str, ...] = ("svd", "randomized")
SKETCHES: tuple[str, ...] = ("gaussian", "sparse")

# Row-sum balancing keeps |D_i| >= ROWSUM_FLOOR * ||w_i||: the original design took D_i as
# the plain row sum, and a row whose entries cancel would get 1/D_i -> inf and dominate the
# SVD (docs/design.md, "The original design").
# Since |sum(w_i)| <= sqrt(in) * ||w_i||, the floor bounds how much any row can be
# re-weighted relative to another to sqrt(in) / ROWSUM_FLOOR.
ROWSUM_FLOOR = 0.1


@dataclass(frozen=True)
class Factors:
    """A factorized weight ``diag(D) · U · diag(S) · Vᵀ``.

    Attributes:
        U: ``(out_features, rank)``, orthonormal columns when produced by :func:`factorize`.
        S: ``(rank,)`` singular values of the truncated (balanced) matrix, descending.
        V: ``(in_features, rank)``, orthonormal columns when produced by :func:`factorize`.
        D: ``(out_features,)`` row scales, or ``None`` when no balancing was used.
    """

    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor
    D: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return self.S.shape[0]

    @property
    def out_features(self) -> int:
        return self.U.shape[0]

    @property
    def in_features(self) -> int:
        return self.V.shape[0]

    def dense(self) -> torch.Tensor:
        """The dense ``(out_features, in_features)`` matrix ``diag(D) · U · diag(S) · Vᵀ``."""
        W = (self.U * self.S) @ self.V.mT
        if self.D is not None:
            W = self.D[:, None] * W
        return W

    def to(self, *args, **kwargs) -> Factors:
        """Return the factors with ``Tensor.to(*args, **kwargs)`` applied to each."""
        D = None if self.D is None else self.D.to(*args, **kwargs)
        return Factors(
            self.U.to(*args, **kwargs), self.S.to(*args, **kwargs), self.V.to(*args, **kwargs), D
        )


# --------------------------------------------------------------------------------------
# validation and rank policies
# --------------------------------------------------------------------------------------


def _check_weight(W: torch.Tensor, name: str = "W") -> None:
    if not isinstance(W, torch.Tensor):
        raise InputTypeError(f"{name} must be a torch.Tensor, got {type(W).__name__}")
    if not W.is_floating_point():
        raise InputTypeError(f"{name} must be a real floating-point tensor, got dtype {W.dtype}")
    if W.dim() != 2:
        raise InputError(
            f"{name} must be a 2-D weight of shape (out_features, in_features), "
            f"got shape {tuple(W.shape)}"
        )
    if W.numel() == 0:
        raise InputError(f"{name} must not be empty, got shape {tuple(W.shape)}")
    if W.device.type != "meta" and not all_finite(W):
        bad = int((~torch.isfinite(W)).sum())
        raise InputError(f"{name} must be finite, got {bad} NaN or Inf entries")


# why a weight that cannot be factorized is kept dense, in every conversion path
NONFINITE_REASON = "weight has NaN or Inf entries"


# --------------------------------------------------------------------------------------
# balancing (DBC)
# --------------------------------------------------------------------------------------


def balance_rows(W: torch.Tensor, mode: Balance) -> torch.Tensor | None:
    """Row scales ``D`` for ``W = diag(D) · W̃``; ``None`` for ``mode="none"``.

    - ``"rowsum"``: the original design's ``D_i = Σ_j W_ij``, made safe: ``|D_i|`` is
      floored at ``0.1·‖w_i‖`` (keeping the sum's sign), so rows whose entries cancel
      cannot blow up ``1/D``.
    - ``"rownorm"``: ``D_i = ‖w_i‖``, every row of ``W̃`` has unit norm.

    All-zero rows get ``D_i = 1``. The result is finite and nonzero for every finite
    ``W``; it has ``W``'s dtype (the arithmetic runs in at least float32).
    """
    check_choice("balance", mode, BALANCE_MODES)
    if mode == "none":
        return None
    W32 = promote(W)
    norms = torch.linalg.vector_norm(W32, dim=1)
    if mode == "rownorm":
        D = norms
    else:
        sums = W32.sum(dim=1)
        sign = torch.where(sums < 0, -1.0, 1.0).to(W32.dtype)
        D = sign * torch.maximum(sums.abs(), ROWSUM_FLOOR * norms)
    # all-zero rows (and rows so small that 1/D would overflow) get D = 1
    tiny = torch.finfo(W32.dtype).tiny / torch.finfo(W32.dtype).eps
    D = torch.where(D.abs() > tiny, D, torch.ones_like(D))
    return D.to(W.dtype)


# --------------------------------------------------------------------------------------
# SVDs
# --------------------------------------------------------------------------------------


def promote(A: torch.Tensor) -> torch.Tensor:
    """``A`` in float32, or float64 if it already is."""
    return A if A.dtype in (torch.float32, torch.float64) else A.to(torch.float32)


def _lu_basis(Y: torch.Tensor) -> torch.Tensor:
    """A well-conditioned basis of ``range(Y)``: the unit lower factor ``P·L`` of ``Y = P·L·R``.

    Used between power iterations, where only the span matters (as in Facebook's
    fbpca): LU with partial pivoting costs half a Householder QR and keeps every
    entry of ``L`` in [-1, 1], so the basis stays finite even for rank-deficient ``Y``.
    The final basis is still orthonormalized with Householder QR.
    """
    LU, pivots, _ = torch.linalg.lu_factor_ex(Y)
    L = LU.tril_(-1)  # in place: one (m, k) matrix fewer alive than LU.tril(-1)
    L.diagonal().fill_(1.0)
    # LAPACK pivots are 1-based sequential row swaps; turn them into the row order of P·L
    perm = list(range(Y.shape[0]))
    for i, p in enumerate(pivots.tolist()):
        perm[i], perm[p - 1] = perm[p - 1], perm[i]
    # row-major, as LU.tril(-1) returns (L, in place, keeps LAPACK's column-major layout):
    # the layout decides the GEMM kernel of the next product, hence its rounding
    basis = torch.empty(L.shape, dtype=L.dtype, device=L.device)
    basis[torch.tensor(perm, device=Y.device)] = L
    return basis


def _sketch_matrix(
    n: int, ell: int, kind: Sketch, *, device: torch.device, dtype: torch.dtype, generator
) -> torch.Tensor:
    if kind == "gaussian":
        return torch.randn(n, ell, device=device, dtype=dtype, generator=generator)
    # sparse sign embedding (Tropp et al. 2019, "Streaming low-rank matrix approximation"):
    # each of the n rows holds zeta = min(8, ell) entries ±1 in random columns (drawn with
    # replacement; a repeated column sums its entries, which changes nothing that matters
    # for a range finder and avoids a sort of n x ell keys).
    zeta = min(8, ell)
    cols = torch.randint(0, ell, (n, zeta), device=device, generator=generator)
    signs = torch.randint(0, 2, (n, zeta), device=device, generator=generator).to(dtype) * 2 - 1
    rows = torch.arange(n, device=device).repeat_interleave(zeta)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta state"
        omega_t = (
            torch.sparse_coo_tensor(
                torch.stack([cols.reshape(-1), rows]), signs.reshape(-1), (ell, n)
            )
            .coalesce()
            .to_sparse_csr()
        )
    return omega_t  # (ell, n), the transpose, as sparse @ dense is the fast kernel


def randomized_svd(
    A: torch.Tensor,
    rank: int,
    *,
    oversample: int = 10,
    power_iters: int = 2,
    sketch: Sketch = "gaussian",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Leading ``rank`` singular triplets of ``A`` by randomized range finding.

    Halko, Martinsson & Tropp (2011), Algorithm 4.4: sketch ``Y = A·Ω`` with
    ``rank + oversample`` random columns, ``power_iters`` rounds of ``Aᵀ`` / ``A``
    products with the basis re-conditioned between each (LU with partial pivoting,
    half the cost of a QR), a final Householder QR ``Q``, then the exact SVD of the
    small projection ``Qᵀ·A`` through its QR. Returns ``(U, S, Vh)`` like
    ``torch.linalg.svd(A, full_matrices=False)`` truncated to ``rank``: ``U`` and
    ``Vhᵀ`` have orthonormal columns, ``S`` is descending.

    Cost: ``2·(power_iters + 1)`` products with ``A`` of ``rank + oversample``
    columns, the same as ``torch.svd_lowrank(A, q=rank + oversample,
    niter=power_iters)``, with less time in the orthonormalizations.

    Args:
        A: ``(m, n)`` real floating-point matrix; half precision is computed in float32.
        rank: number of triplets, in ``[1, min(m, n)]``.
        oversample: extra sketch columns (10 is the usual choice; more lowers the error).
        power_iters: power iterations; 2 brings slowly decaying spectra within a few
            percent of the optimal truncation error.
        sketch: ``"gaussian"`` or ``"sparse"`` (a sparse sign embedding with 8 nonzeros
            per row, which makes the first product cheaper).
        generator: random generator for a reproducible sketch.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> A = torch.randn(300, 200, generator=g)
        >>> U, S, Vh = randomized_svd(A, 20, generator=g)
        >>> U.shape, S.shape, Vh.shape
        (torch.Size([300, 20]), torch.Size([20]), torch.Size([20, 200]))
    """
    _check_weight(A, "A")
    check_choice("sketch", sketch, SKETCHES)
    m, n = A.shape
    max_rank = min(m, n)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= max_rank:
        raise InputError(f"rank must be an int in [1, {max_rank}] for a {m}x{n} weight, got {rank}")
    check_int("oversample", oversample, 0)
    check_int("power_iters", power_iters, 0)
    dtype = A.dtype
    A = promote(A)
    ell = min(rank + oversample, max_rank)
    if ell == max_rank:
        # the sketch would hold the whole space: the exact SVD is cheaper and exact
        U, S, Vh = torch.linalg.svd(A, full_matrices=False)
        return U[:, :rank].to(dtype), S[:rank].to(dtype), Vh[:rank].to(dtype)

    omega = _sketch_matrix(n, ell, sketch, device=A.device, dtype=A.dtype, generator=generator)
    # with the sparse sketch, A·Ω is computed as (Ωᵀ·Aᵀ)ᵀ: sparse @ dense is the fast kernel
    Y = torch.sparse.mm(omega, A.mT).mT if sketch == "sparse" else A @ omega
    # Working memory beside A: the (m, ell) and (n, ell) iterates, each deleted as soon as
    # the next exists, so at most an iterate, its basis (LU in place, then P·L) and the next.
    del omega
    for _ in range(power_iters):
        Z = A.mT @ _lu_basis(Y)
        del Y
        Y = A @ _lu_basis(Z)
        del Z
    Q = torch.linalg.qr(Y).Q  # (m, ell), orthonormal
    del Y
    Bt = A.mT @ Q  # (n, ell) = (Qᵀ A)ᵀ
    # SVD of the small B = Qᵀ A through B ᵀ = Q₂ R, R = Ur Sr Vrᵀ:
    # A ≈ Q B = (Q Vr) Sr (Q₂ Ur)ᵀ, with both outer factors orthonormal.
    Q2, R = torch.linalg.qr(Bt)
    Ur, S, Vrh = torch.linalg.svd(R)
    U = Q @ Vrh[:rank].mT
    Vh = (Q2 @ Ur[:, :rank]).mT
    return U.to(dtype), S[:rank].to(dtype), Vh.to(dtype)


# --------------------------------------------------------------------------------------
# the entry point
# --------------------------------------------------------------------------------------


def factorize(
    W: torch.Tensor,
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
) -> Factors:
    """Factorize ``W ≈ diag(D) · U · diag(S) · Vᵀ`` under exactly one rank policy.

    With ``balance="none"`` and ``method="svd"`` this is the truncated SVD, the best
    rank-``r`` approximation in Frobenius norm (Eckart–Young). With balancing,
    ``W = diag(D) · W̃`` and ``W̃`` is truncated (:func:`balance_rows`).

    Args:
        W: ``(out_features, in_features)`` real floating-point weight.
        policy: a :class:`~lowrank_layers.RankPolicy`, or one of the four keywords below.
        rank: the rank, ``1 <= rank <= min(out, in)``.
        rank_ratio: ``rank = max(1, round(rank_ratio · min(out, in)))``, in (0, 1].
        energy: smallest rank keeping this fraction of ``Σσ²`` of the truncated matrix
            (``W̃`` when balanced), in (0, 1].
        param_ratio: largest rank whose factors hold at most this fraction of the
            ``out·in`` dense parameters (``D`` counted when balanced), in (0, 1].
        method: ``"svd"`` (exact, ``torch.linalg.svd``) or ``"randomized"``
            (:func:`randomized_svd`; with ``energy`` the sketch grows until the
            target is met, falling back to the exact SVD).
        balance: ``"none"``, ``"rownorm"`` or ``"rowsum"`` (:func:`balance_rows`).
        input_cov: ``(in, in)`` second moment ``E[x xᵀ]`` of the layer's inputs
            (:func:`~lowrank_layers.calibrate.collect_input_stats`). Then the truncated
            matrix is ``diag(1/D)·W·L`` with ``L = chol(C + εI)``, and ``V`` maps back with
            ``L⁻ᵀ`` (a triangular solve): the factorization minimises the layer's output
            error ``E‖(W − Ŵ)x‖²`` instead of the weight error (SVD-LLM). ``ε`` starts at
            ``1e-6·trace(C)/in`` and grows tenfold until the Cholesky factorization
            succeeds, so singular or rank-deficient covariances work. The energy policy
            then refers to the whitened spectrum.
        cross_cov: with ``input_cov``, the ``(in, in)`` cross moment ``E[x x̂ᵀ]`` between
            the inputs ``x`` the original layer saw and the inputs ``x̂`` the factorized
            layer will see (``input_cov`` is then ``E[x̂ x̂ᵀ]``): propagated conversion,
            where earlier layers are already factorized. The factorization then minimises
            ``E‖W·x − Ŵ·x̂‖²``: it truncates ``W*·L`` with ``W* = W·E[x x̂ᵀ]·E[x̂ x̂ᵀ]⁻¹``,
            the unconstrained least-squares map from ``x̂`` to ``W·x``. With ``x̂ = x``
            this is the plain ``input_cov`` case.
        generator: random generator for ``method="randomized"``.

    Returns:
        :class:`Factors` in ``W``'s dtype and device, detached from any autograd graph.

    Raises:
        TypeError: ``W`` is not a real floating-point tensor.
        ValueError: ``W`` is not 2-D, not finite or empty; zero or several rank
            policies; a policy value out of range; an unknown method or balance.

    Example:
        >>> W = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
        >>> f = factorize(W, rank=32)
        >>> torch.allclose(f.dense(), W, atol=1e-5)
        True
    """
    _check_weight(W)
    check_choice("method", method, METHODS)
    check_choice("balance", balance, BALANCE_MODES)
    # a decomposition, not a differentiable map: factors of a Parameter carry no graph
    W = W.detach()
    input_cov = None if input_cov is None else input_cov.detach()
    cross_cov = None if cross_cov is None else cross_cov.detach()
    out_features, in_features = W.shape
    policy = as_policy(policy, rank, rank_ratio, energy, param_ratio)
    energy = policy.energy
    r = policy.resolve(out_features, in_features, row_scales=balance != "none")
    dtype = W.dtype
    A, D, L = _prepare(W, balance, input_cov, cross_cov)

    if method == "svd" or (r is None and min(A.shape) <= 64):
        U, S, Vh = torch.linalg.svd(A, full_matrices=False)
        if r is None:
            r = select_rank(S, energy)  # type: ignore[arg-type]
        U, S, Vh = U[:, :r], S[:r], Vh[:r]
    elif r is not None:
        U, S, Vh = randomized_svd(A, r, generator=generator)
    else:
        U, S, Vh = _randomized_by_energy(A, energy, generator)  # type: ignore[arg-type]

    V = Vh.mT
    if L is not None:  # W·L ≈ U·S·Zᵀ  =>  W ≈ U·S·(L⁻ᵀ·Z)ᵀ, solved in float64
        V = torch.linalg.solve_triangular(L.mT, V.to(torch.float64), upper=True)
    D = None if D is None else D.to(dtype)
    return Factors(U.to(dtype), S.to(dtype), V.to(dtype), D)


def _prepare(
    W: torch.Tensor,
    balance: Balance,
    input_cov: torch.Tensor | None,
    cross_cov: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The matrix that is truncated, ``diag(1/D)·W·L``, with ``D`` and ``L`` (or None).

    With ``cross_cov`` (``M = E[x x̂ᵀ]``), ``W`` is first replaced by the least-squares map
    ``W* = W·M·(L·Lᵀ)⁻¹``, so the truncated matrix is ``W·M·L⁻ᵀ`` (one triangular solve).
    """
    A = promote(W)
    D = balance_rows(A, balance)
    if D is not None:
        A = A / D[:, None]
    L = None
    if cross_cov is not None and input_cov is None:
        raise InputError("cross_cov needs input_cov (the second moment of the new inputs)")
    if input_cov is not None:
        L, eps = _whitening(input_cov, W.shape[1])  # float64
        if cross_cov is None:
            A = A @ L.to(A.dtype)
        else:
            M = _check_square("cross_cov", cross_cov, W.shape[1])
            # the regularisation ε·I added to E[x̂ x̂ᵀ] is added to E[x x̂ᵀ] too, as if both
            # streams saw the same small isotropic noise: with x̂ = x this is exactly W·L;
            # W·(M + εI) = W·M + ε·W, without a copy of M
            A64 = A.to(torch.float64)
            WM = (A64 @ M).add_(A64, alpha=eps)
            del A64, M
            # A = W·M·L⁻ᵀ  <=>  Aᵀ = L⁻¹·(W·M)ᵀ
            A = torch.linalg.solve_triangular(L, WM.mT, upper=False).mT.to(A.dtype)
    return A, D, L


def _check_square(name: str, C: torch.Tensor, in_features: int) -> torch.Tensor:
    """``C`` as a finite float64 ``(in, in)`` matrix, or a ValueError naming ``name``."""
    if not isinstance(C, torch.Tensor) or C.shape != (in_features, in_features):
        shape = tuple(C.shape) if isinstance(C, torch.Tensor) else type(C).__name__
        raise InputError(
            f"{name} must be a ({in_features}, {in_features}) tensor for a weight with "
            f"{in_features} inputs, got {shape}"
        )
    C64 = C.detach().to(torch.float64)
    if not bool(torch.isfinite(C64).all()):
        raise InputError(f"{name} must be finite, got NaN or Inf entries")
    return C64


def truncated_spectrum(
    W: torch.Tensor,
    *,
    balance: Balance = "none",
    input_cov: torch.Tensor | None = None,
    cross_cov: torch.Tensor | None = None,
) -> torch.Tensor:
    """Singular values of the matrix :func:`factorize` truncates (balanced, whitened), float32+.

    ``Σ_{i>r} σᵢ²`` is the squared error a rank-``r`` factorization leaves: of the weight,
    or, with ``input_cov``, of the layer's output on those inputs.
    """
    _check_weight(W)
    check_choice("balance", balance, BALANCE_MODES)
    A, _, _ = _prepare(W, balance, input_cov, cross_cov)
    return torch.linalg.svdvals(A)


def output_error(
    W: torch.Tensor,
    factors: Factors,
    input_cov: torch.Tensor,
    *,
    cross_cov: torch.Tensor | None = None,
    target_energy: float | None = None,
) -> float:
    """Relative output error ``sqrt(E‖(W − Ŵ)x‖² / E‖Wx‖²)`` for inputs with ``E[x xᵀ] = C``.

    ``= sqrt(tr(E·C·Eᵀ) / tr(W·C·Wᵀ))`` with ``E = W − Ŵ``, in float64.

    Propagated (see :func:`factorize`'s ``cross_cov``): with ``cross_cov = E[x x̂ᵀ]`` and
    ``target_energy = E‖W·x‖²`` on the original inputs (``input_cov`` being ``E[x̂ x̂ᵀ]``),
    the error is ``sqrt(E‖W·x − Ŵ·x̂‖² / E‖W·x‖²)``: what the layer's output loses against
    the original model's, its inputs' own drift included.
    """
    W64 = W.detach().to(torch.float64)
    C = input_cov.detach().to(torch.float64)
    if cross_cov is not None:
        if target_energy is None:
            raise InputError("output_error: cross_cov needs target_energy (E‖W·x‖²)")
        What = factors.to(torch.float64).dense()
        M = cross_cov.detach().to(torch.float64)
        denom = float(target_energy)
        num = denom - 2 * float(((W64 @ M) * What).sum()) + float(((What @ C) * What).sum())
        if denom <= 0.0:
            return max(num, 0.0) ** 0.5
        return (max(num, 0.0) / denom) ** 0.5
    E = W64 - factors.to(torch.float64).dense()
    denom = float(((W64 @ C) * W64).sum())
    num = float(((E @ C) * E).sum())
    if denom <= 0.0:
        return max(num, 0.0) ** 0.5
    return (max(num, 0.0) / denom) ** 0.5


def whitening_factor(C: torch.Tensor, in_features: int) -> torch.Tensor:
    """Lower-triangular ``L`` with ``L·Lᵀ = C + εI`` (float64), ``ε`` raised until it exists.

    ``ε`` starts at ``1e-6·trace(C)/in`` (or 1e-12 for an all-zero ``C``) and grows tenfold
    per failed attempt, so a singular or rank-deficient covariance, or one with rounding
    below zero, never makes the conversion fail.

    Raises:
        ValueError: ``C`` is not a finite, symmetric ``(in, in)`` matrix.
    """
    return _whitening(C, in_features)[0]


def _whitening(C: torch.Tensor, in_features: int) -> tuple[torch.Tensor, float]:
    """:func:`whitening_factor`'s ``L`` and the ``ε`` it needed.

    Memory: one float64 copy of ``C`` (symmetrized and regularised in place, a row panel at
    a time) beside ``L``; for an MLP's 4864-wide down projection that is 0.38 GB, where
    whole-matrix temporaries took 0.9 GB."""
    C64 = _check_square("input_cov", C, in_features)
    if C64.untyped_storage().data_ptr() == C.untyped_storage().data_ptr():
        C64 = C64.clone()  # changed in place below: never the caller's tensor
    asym = scale = 0.0
    for a, b in _row_panels(in_features):
        rows = C64[a:b]
        scale = max(scale, float(rows.abs().max()))
        asym = max(asym, float((rows - C64[:, a:b].mT).abs().max()))
    if asym > 1e-6 * max(scale, 1e-300):
        raise InputError(f"input_cov must be symmetric, got max |C - Cᵀ| = {asym:.3g}")
    for a, b in _row_panels(in_features):  # C = (C + Cᵀ)/2, a panel and its mirror at a time
        mean = (C64[a:b, a:] + C64[a:, a:b].mT) / 2
        C64[a:b, a:] = mean
        C64[a:, a:b] = mean.mT
    trace = float(C64.diagonal().sum())
    eps = 1e-6 * trace / in_features if trace > 0 else 1e-12
    added = 0.0
    for _ in range(40):
        C64.diagonal().add_(eps - added)
        added = eps
        L, info = torch.linalg.cholesky_ex(C64)
        if int(info) == 0:
            return L, eps
        del L
        eps *= 10
    raise InputError("input_cov could not be regularised to positive definite")  # unreachable


def _row_panels(n: int, rows: int = 512) -> list[tuple[int, int]]:
    """``(start, stop)`` of ``n`` rows in panels of at most ``rows``."""
    return [(a, min(n, a + rows)) for a in range(0, n, rows)]


def _randomized_by_energy(
    A: torch.Tensor, energy: float, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Randomized SVD with the rank chosen by energy: grow the sketch until it holds the target.

    ``‖A‖_F²`` is exact and cheap, so the captured fraction of each trial is known;
    the sketch doubles from 10% of ``min(m, n)`` until the target is met, and the
    exact SVD takes over once a sketch would cover half the matrix.
    """
    max_rank = min(A.shape)
    total = torch.linalg.matrix_norm(A.to(torch.float64)).square()
    trial = max(8, max_rank // 10)
    while 2 * trial < max_rank:
        U, S, Vh = randomized_svd(A, trial, generator=generator)
        r = select_rank(S, energy, total=total)
        if r < trial:  # reached inside the sketch (r == trial may be the sketch running out)
            return U[:, :r], S[:r], Vh[:r]
        trial *= 2
    U, S, Vh = torch.linalg.svd(A, full_matrices=False)
    r = select_rank(S, energy)
    return U[:, :r], S[:r], Vh[:r]


def relative_error(W: torch.Tensor, factors: Factors) -> float:
    """``‖W − factors.dense()‖_F / ‖W‖_F`` (the absolute error for an all-zero ``W``).

    Computed without forming an ``(out, in)`` temporary when the error is above 10%:
    ``‖W − Ŵ‖² = ‖W‖² − 2⟨W, Ŵ⟩ + ‖Ŵ‖²`` with ``⟨W, Ŵ⟩`` from the ``(out, r)`` product
    ``W·V`` and ``‖Ŵ‖²`` from ``r × r`` Gram matrices, in float64 (one GEMM, little
    memory: this runs on every layer of a conversion). Below 10% that identity loses
    digits to cancellation, and the difference is formed exactly, in float64, in blocks
    of rows.
    """
    W = W.detach()
    # Memory beside W (out x in, r = rank), never an (out, in) temporary: a float64 block
    # of rows (~16 MB), then the float64 (out, r) matrices A, W·V and A·S ⊙ W·V, then A
    # and the float64 (in, r) V; below 10% error, two float64 blocks of rows besides.
    # Each temporary is freed as soon as its sum is taken (for 4096x8192 at r = 410:
    # ≤ 45 MiB above 10% error, ≤ 60 MiB below).
    S = factors.S.to(torch.float64)
    A = factors.U.to(torch.float64)  # Ŵ = A·diag(S)·Vᵀ
    if factors.D is not None:
        A = factors.D.to(torch.float64)[:, None] * A
    step = max(1, (1 << 21) // max(1, W.shape[1]))  # ~16 MB of float64 rows at a time
    blocks = [slice(start, start + step) for start in range(0, W.shape[0], step)]
    # one float64 buffer for every block (the values and sums of W[b].to(float64)): one
    # allocation, not one per block, each of which would fault its pages in afresh
    buf = torch.empty(min(step, W.shape[0]), W.shape[1], dtype=torch.float64, device=W.device)
    norm2 = 0.0
    for b in blocks:
        norm2 += float(torch.linalg.vector_norm(buf[: W[b].shape[0]].copy_(W[b])) ** 2)
    del buf
    if W.dtype == torch.float64:
        WV = W @ factors.V.to(torch.float64)
    else:
        W32 = promote(W)  # no copy for float32; a float32 copy of a half-precision W
        WV = (W32 @ factors.V.to(W32.dtype)).to(torch.float64)
        del W32
    AS = A * S
    cross = float(AS.mul_(WV).sum())  # (A·S) ⊙ (W·V), multiplied in place
    del AS, WV
    V = factors.V.to(torch.float64)
    hat2 = float(((S[:, None] * (A.mT @ A) * S[None, :]) * (V.mT @ V)).sum())
    if norm2 == 0.0:
        return max(hat2, 0.0) ** 0.5
    err2 = norm2 - 2.0 * cross + hat2
    if err2 > 1e-2 * norm2:
        return (err2 / norm2) ** 0.5
    # W[rows] − (A[rows]·S)·Vᵀ in two float64 buffers of a block each, reused (the same
    # products and differences as fresh tensors, without a third block and a fresh
    # allocation per block)
    buf = torch.empty(min(step, W.shape[0]), W.shape[1], dtype=torch.float64, device=W.device)
    prod = torch.empty_like(buf)
    total = 0.0
    for rows in blocks:
        n = W[rows].shape[0]
        torch.matmul(A[rows] * S, V.mT, out=prod[:n])
        block = buf[:n].copy_(W[rows]).sub_(prod[:n])
        total += float(torch.linalg.vector_norm(block) ** 2)
    return (total / norm2) ** 0.5
