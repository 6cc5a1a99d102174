"""The factorization engine against its optimum: Eckart–Young, randomized SVD, balancing."""

import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lowrank_layers import Factors, LowRankLinear, factorize
from lowrank_layers.factorize import balance_rows, randomized_svd, relative_error
from lowrank_layers.policy import break_even_rank, factor_parameters, resolve_rank, select_rank

from .helpers import eckart_young, matrix_with_spectrum, rel_err

# ----------------------------------------------------------------------------------------
# exact truncated SVD
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(96, 64), (64, 96), (80, 80)])
@pytest.mark.parametrize("rank", [1, 7, 32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_exact_svd_reaches_eckart_young(shape, rank, dtype, gen):
    W = torch.randn(*shape, generator=gen, dtype=dtype)
    s = torch.linalg.svdvals(W.to(torch.float64))
    f = factorize(W, rank=rank)
    assert f.rank == rank and f.D is None
    assert f.U.dtype == dtype and f.U.shape == (shape[0], rank) and f.V.shape == (shape[1], rank)
    # 1e-4 relative: the float32 SVD's error is ~1e-6 relative on these sizes
    assert relative_error(W, f) == pytest.approx(eckart_young(s, rank), rel=1e-4)


def test_full_rank_reproduces_weight(gen):
    W = torch.randn(40, 24, generator=gen)
    f = factorize(W, rank=24)
    assert rel_err(f.dense(), W) < 1e-5


def test_factors_dense_formula(gen):
    U, S, V, D = (torch.randn(5, 3, generator=gen), torch.rand(3), torch.randn(4, 3), torch.rand(5))
    expected = torch.diag(D) @ U @ torch.diag(S) @ V.mT
    f = Factors(U, S, V, D)
    assert torch.allclose(f.dense(), expected, atol=1e-6)
    assert (f.rank, f.out_features, f.in_features) == (3, 5, 4)
    assert Factors(U, S, V).dense().shape == (5, 4)
    assert f.to(torch.float64).U.dtype == torch.float64


def test_half_precision_input_is_computed_in_float32_and_cast_back(gen):
    W = torch.randn(64, 48, generator=gen)
    s = torch.linalg.svdvals(W.to(torch.bfloat16).to(torch.float64))
    f = factorize(W.to(torch.bfloat16), rank=16)
    assert f.U.dtype == torch.bfloat16 and f.S.dtype == torch.bfloat16
    # bfloat16 keeps 8 bits: the factors' rounding adds ~1% to the optimal error
    assert relative_error(W.to(torch.bfloat16), f) == pytest.approx(eckart_young(s, 16), rel=0.02)
    f16 = factorize(W.to(torch.float16), rank=16, method="randomized")
    assert f16.V.dtype == torch.float16


# ----------------------------------------------------------------------------------------
# randomized SVD
# ----------------------------------------------------------------------------------------


def _spectrum(kind: str, k: int) -> torch.Tensor:
    i = torch.arange(1, k + 1, dtype=torch.float64)
    return {"sqrt": i**-0.5, "power1": i**-1.0, "power2": i**-2.0}[kind]


@pytest.mark.parametrize(
    ("kind", "m", "n", "rank"),
    [
        ("sqrt", 1024, 1024, 102),  # the slowly decaying case the issue names
        ("power1", 512, 512, 51),
        ("power2", 512, 512, 20),
        ("sqrt", 1500, 300, 30),  # tall
        ("sqrt", 300, 1500, 30),  # wide
    ],
)
def test_randomized_svd_within_5_percent_of_optimum(kind, m, n, rank, gen):
    s = _spectrum(kind, min(m, n))
    A = matrix_with_spectrum(s, m, n, gen, dtype=torch.float32)
    U, S, Vh = randomized_svd(A, rank, generator=gen)
    err = rel_err((U * S) @ Vh, A)
    assert err <= 1.05 * eckart_young(s, rank)


@pytest.mark.parametrize("shape", [(512, 512), (800, 300)])
def test_randomized_svd_gaussian_matrix(shape, gen):
    A = torch.randn(*shape, generator=gen)
    s = torch.linalg.svdvals(A.to(torch.float64))
    rank = min(shape) // 10
    U, S, Vh = randomized_svd(A, rank, generator=gen)
    assert rel_err((U * S) @ Vh, A) <= 1.05 * eckart_young(s, rank)


@pytest.mark.parametrize("sketch", ["gaussian", "sparse"])
def test_randomized_svd_outputs_are_orthonormal_and_sorted(sketch, gen):
    s = _spectrum("power1", 300)
    A = matrix_with_spectrum(s, 400, 300, gen, dtype=torch.float32)
    U, S, Vh = randomized_svd(A, 30, sketch=sketch, generator=gen)
    assert U.shape == (400, 30) and S.shape == (30,) and Vh.shape == (30, 300)
    eye = torch.eye(30)
    assert torch.allclose(U.mT @ U, eye, atol=1e-5)
    assert torch.allclose(Vh @ Vh.mT, eye, atol=1e-5)
    assert bool((S[:-1] >= S[1:]).all())
    # with two power iterations the leading values converge first: the top ten to 1e-3
    # relative, the tail of the requested rank to 5% (oversampling 10 on a 1/i spectrum;
    # the sparse sketch lands ~3% low on the 30th value)
    assert torch.allclose(S[:10].double(), s[:10], rtol=1e-3)
    assert torch.allclose(S.double(), s[:30], rtol=5e-2)


def test_randomized_svd_sparse_sketch_within_5_percent(gen):
    s = _spectrum("sqrt", 1024)
    A = matrix_with_spectrum(s, 1024, 1024, gen, dtype=torch.float32)
    U, S, Vh = randomized_svd(A, 102, sketch="sparse", generator=gen)
    assert rel_err((U * S) @ Vh, A) <= 1.05 * eckart_young(s, 102)


def test_randomized_svd_is_reproducible_with_a_seeded_generator(gen):
    A = torch.randn(300, 200, generator=gen)
    for sketch in ("gaussian", "sparse"):
        a = randomized_svd(A, 20, sketch=sketch, generator=torch.Generator().manual_seed(7))
        b = randomized_svd(A, 20, sketch=sketch, generator=torch.Generator().manual_seed(7))
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x, y)
    c = randomized_svd(A, 20, generator=torch.Generator().manual_seed(8))
    assert not torch.equal(a[0], c[0])  # a different seed gives a different sketch


def test_randomized_svd_on_rank_deficient_matrix_is_finite_and_exact(gen):
    # rank 5, but 20 + 10 sketch columns: the Cholesky-QR must survive a singular Gram
    A = torch.randn(200, 5, generator=gen) @ torch.randn(5, 150, generator=gen)
    U, S, Vh = randomized_svd(A, 20, generator=gen)
    assert bool(torch.isfinite(U).all() and torch.isfinite(Vh).all())
    assert rel_err((U * S) @ Vh, A) < 1e-5
    assert torch.allclose(U.mT @ U, torch.eye(20), atol=1e-4)


def test_randomized_svd_falls_back_to_exact_when_sketch_covers_matrix(gen):
    A = torch.randn(30, 20, generator=gen)
    _, S, _ = randomized_svd(A, 15, generator=gen)  # 15 + 10 >= 20
    assert torch.allclose(S, torch.linalg.svdvals(A)[:15], atol=1e-5)


def test_randomized_factorize_matches_exact_closely(gen):
    s = _spectrum("power1", 256)
    W = matrix_with_spectrum(s, 256, 256, gen, dtype=torch.float32)
    exact = factorize(W, rank=32)
    rand = factorize(W, rank=32, method="randomized", generator=gen)
    assert relative_error(W, rand) <= 1.05 * relative_error(W, exact)


# ----------------------------------------------------------------------------------------
# rank policies
# ----------------------------------------------------------------------------------------


def test_rank_ratio_rounds_to_nearest_and_stays_at_least_one():
    assert resolve_rank(1024, 1024, rank_ratio=0.1) == 102
    assert resolve_rank(100, 300, rank_ratio=0.125) == 13  # 12.5 rounds up
    assert resolve_rank(10, 10, rank_ratio=0.01) == 1
    assert resolve_rank(10, 20, rank_ratio=1.0) == 10


@given(
    out=st.integers(1, 4096),
    inp=st.integers(1, 4096),
    ratio=st.floats(0.01, 1.0),
    balance=st.booleans(),
)
@settings(max_examples=200, deadline=None)
def test_param_ratio_gives_largest_rank_within_budget(out, inp, ratio, balance):
    budget = ratio * out * inp
    try:
        r = resolve_rank(out, inp, param_ratio=ratio, row_scales=balance)
    except ValueError as exc:
        assert "leaves no room" in str(exc)
        assert factor_parameters(out, inp, 1, row_scales=balance) > budget
        return
    assert 1 <= r <= min(out, inp)
    assert factor_parameters(out, inp, r, row_scales=balance) <= budget
    if r < min(out, inp):
        assert factor_parameters(out, inp, r + 1, row_scales=balance) > budget


def test_param_ratio_example():
    # 1024x1024 at half the parameters: r*(2049) <= 524288 -> r = 255
    assert resolve_rank(1024, 1024, param_ratio=0.5) == 255
    f = factorize(torch.randn(64, 64), param_ratio=0.5)
    assert factor_parameters(64, 64, f.rank, row_scales=False) <= 0.5 * 64 * 64


def test_select_rank_smallest_rank_meeting_energy():
    S = torch.tensor([4.0, 2.0, 1.0, 1.0])  # energies 16, 4, 1, 1 of 22
    assert select_rank(S, 16 / 22) == 1
    assert select_rank(S, 16 / 22 + 1e-6) == 2
    assert select_rank(S, 0.95) == 3
    assert select_rank(S, 1.0) == 4
    assert select_rank(torch.zeros(3), 0.5) == 1
    # total larger than what S holds (a truncated spectrum): capped at len(S)
    assert select_rank(S, 0.99, total=100.0) == 4


@given(st.lists(st.floats(0.0, 100.0), min_size=1, max_size=50), st.floats(0.01, 1.0))
@settings(max_examples=200, deadline=None)
def test_select_rank_property(values, energy):
    S = torch.tensor(sorted(values, reverse=True), dtype=torch.float64)
    r = select_rank(S, energy)
    sq = S.square()
    total = float(sq.sum())
    assert 1 <= r <= len(values)
    if total > 0:
        assert float(sq[:r].sum()) >= (energy - 1e-9) * total
        if r > 1:
            assert float(sq[: r - 1].sum()) < energy * total


@pytest.mark.parametrize("method", ["svd", "randomized"])
def test_energy_policy_keeps_requested_energy(method, gen):
    s = _spectrum("power1", 400)
    W = matrix_with_spectrum(s, 400, 400, gen, dtype=torch.float32)
    expected = select_rank(s, 0.9)
    f = factorize(W, energy=0.9, method=method, generator=gen)
    # the randomized path estimates the leading values to ~1e-3: the rank may differ by one
    assert abs(f.rank - expected) <= (0 if method == "svd" else 1)
    assert relative_error(W, f) <= math.sqrt(1 - 0.9) * 1.01


def test_randomized_energy_grows_the_sketch_past_its_first_size(gen):
    # flat spectrum: 0.95 of the energy needs ~95% of the components, beyond any sketch
    W = torch.randn(300, 300, generator=gen)
    f = factorize(W, energy=0.95, method="randomized", generator=gen)
    exact = factorize(W, energy=0.95)
    assert f.rank == exact.rank


def test_break_even_rank():
    assert break_even_rank(1024, 1024) == 512.0
    assert break_even_rank(768, 3072) == pytest.approx(614.4)
    r = math.floor(break_even_rank(300, 200))
    assert factor_parameters(300, 200, r - 1, row_scales=False) < 300 * 200


# ----------------------------------------------------------------------------------------
# balancing
# ----------------------------------------------------------------------------------------


def _hostile_rows(gen: torch.Generator) -> torch.Tensor:
    W = torch.randn(8, 32, generator=gen)
    W[0] = 0.0  # all-zero row
    W[1] = torch.tensor([1.0, -1.0] * 16)  # sums to exactly zero
    W[2] = torch.tensor([1e-3, -1e-3 + 1e-12] * 16)  # sums to ~1e-11
    W[3] = 1e-30  # tiny but nonzero
    W[4] = torch.full((32,), 3e4)  # large
    return W


@pytest.mark.parametrize("mode", ["rowsum", "rownorm"])
def test_balancing_is_finite_on_hostile_rows(mode, gen):
    W = _hostile_rows(gen)
    D = balance_rows(W, mode)
    assert D is not None and D.shape == (8,)
    assert bool(torch.isfinite(D).all()) and bool((D != 0).all())
    Wt = W / D[:, None]
    assert bool(torch.isfinite(Wt).all())
    # well-conditioned: no row of the balanced matrix is more than sqrt(in)/floor its norm share
    ratio = torch.linalg.vector_norm(Wt, dim=1)
    assert float(ratio.max()) <= math.sqrt(32) / 0.1 + 1e-3
    f = factorize(W, rank=8, balance=mode)
    assert bool(torch.isfinite(f.dense()).all())
    assert rel_err(f.dense(), W) < 1e-5  # full rank reproduces W through D


def test_rowsum_is_the_row_sum_when_healthy(gen):
    W = torch.rand(6, 10, generator=gen) + 0.5  # positive rows: sums far above the floor
    D = balance_rows(W, "rowsum")
    assert torch.allclose(D, W.sum(1))
    W[0] *= -1
    assert float(balance_rows(W, "rowsum")[0]) < 0  # the sign is kept
    assert balance_rows(W, "none") is None
    assert torch.allclose(balance_rows(W, "rownorm"), torch.linalg.vector_norm(W, dim=1))


@pytest.mark.parametrize("mode", ["rowsum", "rownorm"])
def test_balanced_truncation_is_optimal_for_the_balanced_matrix(mode, gen):
    W = torch.randn(60, 40, generator=gen, dtype=torch.float64) * torch.rand(60, 1, generator=gen)
    f = factorize(W, rank=10, balance=mode)
    Wt = W / f.D[:, None]
    s = torch.linalg.svdvals(Wt)
    core = Factors(f.U, f.S, f.V)
    assert relative_error(Wt, core) == pytest.approx(eckart_young(s, 10), rel=1e-6)
    # and plain SVD is never worse in the weight's own Frobenius norm (Eckart–Young)
    assert relative_error(W, factorize(W, rank=10)) <= relative_error(W, f) + 1e-12


# ----------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"rank": 0}, ValueError, r"rank must be an int >= 1, got 0"),
        ({"rank": 17}, ValueError, r"rank must be an int in \[1, 16\].*got 17"),
        ({"rank": 2.5}, TypeError, r"rank must be an int >= 1, got 2\.5"),
        ({"rank_ratio": 0.0}, ValueError, r"rank_ratio must be in \(0, 1\], got 0\.0"),
        ({"rank_ratio": 1.5}, ValueError, r"rank_ratio must be in \(0, 1\], got 1\.5"),
        ({"rank_ratio": float("nan")}, ValueError, r"rank_ratio must be in \(0, 1\], got nan"),
        ({"param_ratio": -0.1}, ValueError, r"param_ratio must be in \(0, 1\], got -0\.1"),
        ({"param_ratio": 0.001}, ValueError, r"param_ratio=0\.001 leaves no room"),
        ({"energy": 0.0}, ValueError, r"energy must be in \(0, 1\], got 0\.0"),
        ({"energy": 1.01}, ValueError, r"energy must be in \(0, 1\], got 1\.01"),
        ({"energy": "high"}, TypeError, r"energy must be a float in \(0, 1\], got str"),
        ({}, ValueError, r"exactly one rank policy must be given .*got none"),
        (
            {"rank": 2, "energy": 0.9},
            ValueError,
            r"exactly one rank policy.*got rank=2, energy=0\.9",
        ),
        (
            {"rank": 2, "method": "lanczos"},
            ValueError,
            r"method must be one of 'svd', 'randomized'",
        ),
        ({"rank": 2, "balance": "dbc"}, ValueError, r"balance must be one of 'none', 'rownorm'"),
    ],
)
def test_factorize_rejects_bad_arguments(kwargs, exc, match, gen):
    with pytest.raises(exc, match=match):
        factorize(torch.randn(16, 24, generator=gen), **kwargs)


@pytest.mark.parametrize(
    ("W", "exc", "match"),
    [
        (torch.ones(4, 4, dtype=torch.int64), TypeError, r"W must be a real floating-point.*int64"),
        (torch.ones(4, 4, dtype=torch.complex64), TypeError, r"floating-point.*complex64"),
        (torch.ones(4), ValueError, r"W must be a 2-D weight .* got shape \(4,\)"),
        (torch.ones(2, 3, 4), ValueError, r"got shape \(2, 3, 4\)"),
        (torch.ones(0, 4), ValueError, r"W must not be empty, got shape \(0, 4\)"),
        (torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), ValueError, r"W must be finite, got 1"),
        (
            torch.tensor([[1.0, float("inf")], [float("-inf"), 1.0]]),
            ValueError,
            r"got 2 NaN or Inf",
        ),
        ([[1.0, 2.0]], TypeError, r"W must be a torch.Tensor, got list"),
    ],
)
def test_factorize_rejects_bad_weights(W, exc, match):
    with pytest.raises(exc, match=match):
        factorize(W, rank=1)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rank": 0}, r"rank must be an int in \[1, 20\] for a 30x20 weight, got 0"),
        ({"rank": 5, "oversample": -1}, r"oversample must be an int >= 0, got -1"),
        ({"rank": 5, "power_iters": 1.5}, r"power_iters must be an int >= 0, got 1\.5"),
        ({"rank": 5, "sketch": "srht"}, r"sketch must be one of 'gaussian', 'sparse', got 'srht'"),
    ],
)
def test_randomized_svd_rejects_bad_arguments(kwargs, match, gen):
    with pytest.raises(ValueError, match=match):
        randomized_svd(torch.randn(30, 20, generator=gen), **kwargs)


def test_select_rank_and_balance_reject_bad_arguments():
    with pytest.raises(ValueError, match=r"energy must be in \(0, 1\], got 0"):
        select_rank(torch.ones(3), 0)
    with pytest.raises(ValueError, match=r"S must be a non-empty 1-D tensor, got shape \(2, 2\)"):
        select_rank(torch.ones(2, 2), 0.5)
    with pytest.raises(ValueError, match=r"balance must be one of .* got 'rows'"):
        balance_rows(torch.ones(2, 2), "rows")


@pytest.mark.parametrize("rank", [2, 30, 40])  # large error (Gram identity), small, exact zero
@pytest.mark.parametrize("balance", ["none", "rowsum"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_relative_error_matches_the_direct_computation(rank, balance, dtype, gen):
    s = torch.logspace(0, -4, 40, dtype=torch.float64)
    W = matrix_with_spectrum(s, 70, 40, gen).to(dtype)
    f = factorize(W, rank=rank, balance=balance)
    W64 = W.to(torch.float64)
    direct = float(torch.linalg.norm(W64 - f.to(torch.float64).dense()) / torch.linalg.norm(W64))
    # both paths agree with the dense difference to float64 rounding (or 1e-9 absolute near 0)
    assert relative_error(W, f) == pytest.approx(direct, rel=1e-6, abs=1e-9)
    zero = Factors(torch.zeros(3, 1), torch.ones(1), torch.zeros(2, 1))
    assert relative_error(torch.zeros(3, 2), zero) == 0.0


def test_factorize_of_a_parameter_carries_no_graph():
    layer = nn.Linear(12, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        factors = factorize(layer.weight, rank=4)
        LowRankLinear.from_factors(factors, bias=layer.bias.detach())
    assert all(t.grad_fn is None and not t.requires_grad for t in (factors.U, factors.S, factors.V))
