"""Activation-aware conversion: calibration hooks, whitening, the global rank budget."""

import pytest
import torch
from torch import nn

from lowrank_layers import convert_model, factorize
from lowrank_layers.calibrate import collect_input_stats, run_batch
from lowrank_layers.convert import allocate_ranks
from lowrank_layers.factorize import output_error, truncated_spectrum, whitening_factor

from .helpers import rel_err


def correlated_inputs(gen: torch.Generator, n: int = 4000, d: int = 48) -> torch.Tensor:
    """Inputs with a strongly anisotropic covariance (a few directions carry most energy)."""
    mix = torch.randn(d, d, generator=gen, dtype=torch.float64) * torch.logspace(
        0, -3, d, dtype=torch.float64
    )
    return torch.randn(n, d, generator=gen, dtype=torch.float64) @ mix.mT


def test_identity_covariance_equals_plain_svd(gen):
    W = torch.randn(40, 32, generator=gen, dtype=torch.float64)
    plain = factorize(W, rank=8)
    white = factorize(W, rank=8, input_cov=torch.eye(32, dtype=torch.float64))
    assert rel_err(white.dense(), plain.dense()) < 1e-9
    assert torch.allclose(white.S, plain.S * (1 + 1e-6 * 32 / 32) ** 0.5, rtol=1e-9)


def test_whitened_truncation_is_the_weighted_optimum_and_beats_plain_svd(gen):
    X = correlated_inputs(gen)
    C = X.mT @ X / len(X)
    W = torch.randn(64, 48, generator=gen, dtype=torch.float64)
    f = factorize(W, rank=6, input_cov=C)
    # closed form: argmin_rank6 ||(W - What) L||_F  =  [W L]_6 L^-1  with L L^T = C + eps I
    L = whitening_factor(C, 48)
    U, S, Vh = torch.linalg.svd(W @ L)
    best = (U[:, :6] * S[:6]) @ Vh[:6] @ torch.linalg.inv(L)
    assert rel_err(f.dense(), best) < 1e-8
    plain = factorize(W, rank=6)
    err_white = output_error(W, f, C)
    err_plain = output_error(W, plain, C)
    assert err_white < 0.5 * err_plain  # far better on the inputs it was calibrated for
    direct = float(torch.linalg.norm(X @ (W - f.dense()).mT) / torch.linalg.norm(X @ W.mT))
    assert err_white == pytest.approx(direct, rel=1e-9)
    # and the energy rank refers to the whitened spectrum
    s = truncated_spectrum(W, input_cov=C)
    assert torch.allclose(s[:6], f.S, rtol=1e-9)


@pytest.mark.parametrize("kind", ["rank-deficient", "zero", "negative-rounding"])
def test_singular_covariances_convert(kind, gen):
    W = torch.randn(20, 32, generator=gen)
    if kind == "rank-deficient":
        X = torch.randn(100, 5, generator=gen) @ torch.randn(5, 32, generator=gen)
        C = X.mT @ X / 100
    elif kind == "zero":
        C = torch.zeros(32, 32)
    else:
        v = torch.randn(32, 1, generator=gen)
        C = v @ v.mT - 1e-7 * torch.eye(32)  # slightly indefinite, as rounding can make it
    for method in ("svd", "randomized"):
        f = factorize(W, rank=4, input_cov=C, method=method, generator=gen)
        assert bool(torch.isfinite(f.dense()).all())


def test_randomized_whitened_is_close_to_exact(gen):
    X = correlated_inputs(gen, d=200)
    C = X.mT @ X / len(X)
    W = torch.randn(300, 200, generator=gen)
    exact = output_error(W, factorize(W, rank=20, input_cov=C), C)
    rand = output_error(
        W, factorize(W, rank=20, input_cov=C, method="randomized", generator=gen), C
    )
    assert rand <= 1.05 * exact


def test_whitening_factor_errors():
    with pytest.raises(ValueError, match=r"input_cov must be a \(4, 4\) tensor .* got \(3, 3\)"):
        whitening_factor(torch.eye(3), 4)
    with pytest.raises(ValueError, match=r"input_cov must be symmetric"):
        whitening_factor(torch.triu(torch.ones(3, 3)), 3)
    with pytest.raises(ValueError, match=r"input_cov must be finite"):
        whitening_factor(torch.full((2, 2), float("nan")), 2)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(48, 48)
        self.k = nn.Linear(48, 48)
        self.up = nn.Linear(48, 128)
        self.down = nn.Linear(128, 48)

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        h = self.q(x) + self.k(x)  # q and k share their input
        return self.down(torch.relu(self.up(h))) * scale


def test_collect_input_stats_accumulates_exactly_and_removes_hooks(gen):
    torch.manual_seed(0)
    model = Net()
    batches = [torch.randn(3, 7, 48, generator=gen) for _ in range(4)]
    stats = collect_input_stats(model, batches, {"q": model.q, "k": model.k, "down": model.down})
    X = torch.cat([b.reshape(-1, 48) for b in batches]).double()
    assert stats["q"].tokens == 84
    # each batch's Gram is a float32 GEMM (then summed in float64): float32 rounding
    assert torch.allclose(stats["q"].covariance, X.mT @ X / 84, rtol=1e-5, atol=1e-5)
    assert torch.equal(stats["q"].gram, stats["k"].gram)  # shared input, shared GEMM
    with torch.no_grad():
        H = torch.relu(model.up(model.q(X.float()) + model.k(X.float()))).double()
    assert torch.allclose(stats["down"].covariance, H.mT @ H / 84, rtol=1e-5, atol=1e-8)
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_hooks_are_removed_when_a_batch_raises(gen):
    model = Net()

    def batches():
        yield torch.randn(2, 48, generator=gen)
        raise RuntimeError("bad batch")

    with pytest.raises(RuntimeError, match="bad batch"):
        convert_model(model, rank=8, calibration=batches())
    assert all(not m._forward_pre_hooks for m in model.modules())
    assert all(type(m) is nn.Linear for m in (model.q, model.k, model.up, model.down))
    with pytest.raises(ValueError, match=r"batches is empty"):
        collect_input_stats(model, [], {"q": model.q})
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_batch_forms():
    calls = []

    class Probe(nn.Module):
        def forward(self, *args, **kwargs):
            calls.append((len(args), sorted(kwargs)))

    probe = Probe()
    run_batch(probe, {"x": 1, "scale": 2})
    run_batch(probe, (1, 2))
    run_batch(probe, torch.zeros(1))
    assert calls == [(0, ["scale", "x"]), (2, []), (1, [])]


def test_calibrated_conversion_lowers_output_error(gen):
    torch.manual_seed(0)
    model = Net()
    X = correlated_inputs(gen, n=2000).float()
    calib = [X[i : i + 200] for i in range(0, 1000, 200)]
    held_out = X[1000:]
    with torch.no_grad():
        reference = model(held_out)
    plain = Net()
    plain.load_state_dict(model.state_dict())
    convert_model(plain, rank=8)
    report = convert_model(model, rank=8, calibration=calib)
    assert all(layer.output_error is not None for layer in report.converted)
    with torch.no_grad():
        err_cal = rel_err(model(held_out), reference)
        err_plain = rel_err(plain(held_out), reference)
    assert err_cal < 0.5 * err_plain
    assert "out.err" in str(report)
    dict_batches = [{"x": b, "scale": 1.0} for b in calib]
    again = Net()
    convert_model(again, rank=8, calibration=dict_batches)


def test_budget_is_respected_exactly_and_deterministic(gen):
    torch.manual_seed(0)
    model = Net()
    calib = [torch.randn(64, 48, generator=gen) for _ in range(3)]
    totals = []
    for _ in range(2):
        m = Net()
        m.load_state_dict(model.state_dict())
        report = convert_model(m, budget=0.5, calibration=calib)
        totals.append([(layer.name, layer.rank) for layer in report.converted])
        assert report.params_after <= 0.5 * report.params_before
    assert totals[0] == totals[1]
    assert len({r for _, r in totals[0]}) > 1  # ranks differ by layer: chosen from spectra


@pytest.mark.parametrize("strategy", ["minimax", "greedy"])
def test_allocate_ranks(strategy):
    flat = torch.ones(20)
    steep = torch.logspace(0, -3, 20)
    spectra = {"a": (flat, 20, 20), "b": (steep, 20, 20)}
    ranks = allocate_ranks(spectra, budget=0.5, strategy=strategy)
    assert ranks["a"] > ranks["b"]  # the flat spectrum needs more components
    used = sum(r * 41 for r in ranks.values())
    assert used <= 0.5 * 800 and used + 41 > 0.5 * 800  # budget filled as far as it goes
    assert allocate_ranks(spectra, budget=0.5, strategy=strategy) == ranks  # deterministic


def test_minimax_equalises_relative_error():
    spectra = {
        name: (torch.logspace(0, -decay, 64), 64, 64) for name, decay in [("a", 1), ("b", 3)]
    }
    ranks = allocate_ranks(spectra, budget=0.3)

    def residual(s, r):
        return float(s[r:].square().sum() / s.square().sum())

    res = {n: residual(spectra[n][0], r) for n, r in ranks.items()}
    greedy = allocate_ranks(spectra, budget=0.3, strategy="greedy")
    res_greedy = {n: residual(spectra[n][0], r) for n, r in greedy.items()}
    assert max(res.values()) <= max(res_greedy.values())


def test_allocate_ranks_errors():
    flat = torch.ones(20)
    steep = torch.logspace(0, -3, 20)
    with pytest.raises(ValueError, match=r"budget=0\.01 keeps 8 of 800 parameters, but rank 1"):
        allocate_ranks({"a": (flat, 20, 20), "b": (steep, 20, 20)}, budget=0.01)
    with pytest.raises(ValueError, match=r"budget must be in \(0, 1\], got 1\.5"):
        allocate_ranks({"a": (flat, 20, 20)}, budget=1.5)
    with pytest.raises(ValueError, match=r"strategy must be one of 'minimax', 'greedy'"):
        allocate_ranks({"a": (flat, 20, 20)}, budget=0.5, strategy="even")


def test_budget_and_calibration_errors():
    with pytest.raises(
        ValueError, match=r"budget replaces the rank policy.*budget=0\.5 and rank=4"
    ):
        convert_model(Net(), rank=4, budget=0.5)
    with pytest.raises(ValueError, match=r"calibration and budget apply to layer='lowrank'"):
        convert_model(Net(), rank=4, layer="adaptive", calibration=[torch.zeros(1, 48)])


def test_calibration_that_misses_layers_is_reported():
    model = Net()
    with pytest.raises(ValueError, match=r"the calibration reached none of the layers"):
        convert_model(model, rank=8, calibration={"input_ids": torch.zeros(3)})
    stats = collect_input_stats(model, [torch.randn(4, 48)], {"q": model.q})
    with pytest.warns(UserWarning, match=r"no calibration input reached 3 layers \(k, up, down\)"):
        report = convert_model(model, rank=8, calibration=stats)
    assert {r.name: r.output_error is not None for r in report.converted} == {
        "q": True, "k": False, "up": False, "down": False,
    }  # fmt: skip
