"""Rank allocation: the loss-aware estimate, the exact budget solver (allocate.py), and the
spectral allocation of a global budget (``convert.allocate_ranks``, ``convert_model(budget=)``).
The gradient pass is tested in test_sensitivity.py."""

import copy
import itertools
import math

import pytest
import torch
from torch import nn

from lowrank_layers import LowRankLinear, convert_model
from lowrank_layers.allocate import (
    LayerOptions,
    Sensitivity,
    allocate_ranks,
    collect_sensitivity,
    loss_aware_ranks,
    rank_options,
    solve_budget,
)
from lowrank_layers.calibrate import collect_input_stats
from lowrank_layers.factorize import factorize, truncated_spectrum


def options(out: int, inp: int, ranks: list, loss: list) -> LayerOptions:
    params = [out * inp if r is None else r * (out + inp + 1) for r in ranks]
    return LayerOptions(out, inp, ranks, params, loss)


def test_solve_budget_is_the_exact_optimum_over_the_candidates():
    """Against brute force over every combination, on small random instances."""
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        opts = {}
        for name in "abcd":
            ranks = [1, 2, 4, 8, None]
            raw = torch.rand(4, generator=gen).sort(descending=True).values.tolist()
            opts[name] = options(16, 16, ranks, [*raw, 0.0])
        budget = float(torch.empty(1).uniform_(0.3, 0.9, generator=gen))
        resolution = 500
        plan = solve_budget(opts, budget, resolution=resolution)
        allowed = budget * 4 * 256
        unit = allowed / resolution

        def units(n: str, k: int, opts=opts, unit=unit) -> int:
            return math.ceil(opts[n].params[k] / unit - 1e-9)

        best = min(
            sum(opts[n].loss[k] for n, k in zip("abcd", combo, strict=True))
            for combo in itertools.product(range(5), repeat=4)
            if sum(units(n, k) for n, k in zip("abcd", combo, strict=True)) <= resolution
        )
        got = sum(opts[n].loss[opts[n].ranks.index(plan[n])] for n in "abcd")
        used = sum(opts[n].params[opts[n].ranks.index(plan[n])] for n in "abcd")
        assert used <= allowed
        assert got == pytest.approx(best, abs=1e-12)  # exact over the rounded costs


def test_solve_budget_keeps_a_layer_dense_when_that_is_best():
    opts = {
        "fragile": options(32, 32, [2, 8, None], [100.0, 50.0, 0.0]),
        "robust": options(32, 32, [2, 8, None], [0.02, 0.01, 0.0]),
    }
    plan = solve_budget(opts, 0.6)
    assert plan == {"fragile": None, "robust": 2}


def test_solve_budget_never_exceeds_and_is_deterministic():
    gen = torch.Generator().manual_seed(3)
    opts = {
        f"l{i}": options(
            48, 24, [1, 3, 6, 12, None],
            [*torch.rand(4, generator=gen).sort(descending=True).values.tolist(), 0.0],
        )
        for i in range(12)
    }  # fmt: skip
    for budget in (0.2, 0.5, 0.8, 1.0):
        plan = solve_budget(opts, budget)
        used = sum(opts[n].params[opts[n].ranks.index(r)] for n, r in plan.items())
        assert used <= budget * 12 * 48 * 24
        assert solve_budget(dict(reversed(list(opts.items()))), budget) == plan


def test_solve_budget_errors():
    opts = {"a": options(8, 8, [1, None], [1.0, 0.0])}
    with pytest.raises(ValueError, match=r"budget=0\.1 keeps 6 of 64 parameters, but the "):
        solve_budget(opts, 0.1)
    with pytest.raises(ValueError, match=r"budget must be in \(0, 1\], got 0"):
        solve_budget(opts, 0)
    assert solve_budget({}, 0.5) == {}


@pytest.mark.parametrize(("out_f", "in_f"), [(12, 10), (10, 12)])
@pytest.mark.parametrize("projected", [False, True])
def test_rank_options_estimate_is_the_kfac_quadratic(gen, out_f, in_f, projected):
    """The estimate at rank r is ½·tr(G·ΔW·C·ΔWᵀ) for the whitened truncation ΔW, from
    ``E[g gᵀ]`` or from its projection ``Wᵀ E[g gᵀ] W`` (either shape)."""
    W = torch.randn(out_f, in_f, generator=gen, dtype=torch.float64)
    X = torch.randn(300, in_f, generator=gen, dtype=torch.float64) * torch.linspace(2, 0.2, in_f)
    Gm = torch.randn(300, out_f, generator=gen, dtype=torch.float64)
    C, G = X.mT @ X / 300, Gm.mT @ Gm / 300
    moment = W.mT @ G @ W if projected else G
    opt = rank_options(W, Sensitivity(C, moment, 300, projected), grid=[0.2, 0.5])
    assert opt.ranks[-1] is None and opt.loss[-1] == 0.0 and opt.params[-1] == 120
    assert len(opt.ranks) == 3
    for r, loss in zip(opt.ranks[:-1], opt.loss[:-1], strict=True):
        dW = W - factorize(W, rank=r, input_cov=C).dense()
        assert loss == pytest.approx(0.5 * float(torch.trace(G @ dW @ C @ dW.mT)), rel=1e-4)
    assert opt.loss == sorted(opt.loss, reverse=True)


class Tiny(nn.Module):
    """Two layers; the second's output is scaled up, so it matters far more for the loss."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(16, 16)
        self.b = nn.Linear(16, 16)
        self.out = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None):
        h = self.a(x) + x
        h = 30.0 * self.b(h) + h
        return self.out(h)


def test_loss_aware_ranks_protect_the_sensitive_layer(gen):
    model = Tiny().eval()
    data = [torch.randn(8, 16, 16, generator=gen) for _ in range(2)]
    layers = {"a": model.a, "b": model.b}
    sens = collect_sensitivity(model, data, layers, objective="mse")
    plan, opts = loss_aware_ranks(layers, sens, 0.5)
    assert set(plan) == {"a", "b"}
    rank = {n: (16 if r is None else r) for n, r in plan.items()}
    assert rank["b"] > rank["a"]
    used = sum(opts[n].params[opts[n].ranks.index(r)] for n, r in plan.items())
    assert used <= 0.5 * 2 * 256
    again, _ = loss_aware_ranks(layers, collect_sensitivity(model, data, layers, objective="mse"),
                                0.5)  # fmt: skip
    assert again == plan


def test_convert_model_follows_a_rank_plan():

    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16), nn.Linear(16, 16))
    report = convert_model(model, ranks={"0": 4, "2": None})
    assert isinstance(model[0], LowRankLinear) and model[0].rank == 4
    assert isinstance(model[2], nn.Linear) and isinstance(model[3], nn.Linear)
    reasons = {layer.name: layer.reason for layer in report.layers}
    assert reasons == {"0": None, "2": "kept dense by the rank plan", "3": "not in the rank plan"}
    with pytest.raises(ValueError, match=r"ranks names 1 modules that are not matched layers: 9"):
        convert_model(nn.Sequential(nn.Linear(8, 8)), ranks={"9": 2})
    with pytest.raises(TypeError, match=r"ranks must be a mapping \{name: rank or None\}"):
        convert_model(nn.Sequential(nn.Linear(8, 8)), ranks=[2])
    with pytest.raises(ValueError, match=r"give one rank rule .* got policy=rank=2 and ranks=\{"):
        convert_model(nn.Sequential(nn.Linear(8, 8)), ranks={"0": 2}, rank=2)


def test_layers_without_sensitivity_take_the_uniform_ratio(gen):
    """A layer the objective cannot see gets the budget's own ratio; the rest share what is
    left, and the whole stays within the budget."""
    model = Tiny().eval()
    data = [torch.randn(8, 16, 16, generator=gen)]
    layers = {"a": model.a, "b": model.b, "out": model.out}
    sens = collect_sensitivity(model, data, {"a": model.a, "b": model.b}, objective="mse")
    plan, opts = loss_aware_ranks(layers, sens, 0.5)
    assert set(plan) == {"a", "b", "out"} and set(opts) == {"a", "b"}
    assert plan["out"] == 2  # floor(0.5 * 160 / 27): the largest rank within half of it
    kept = sum(
        layers[n].weight.numel() if r is None else r * (sum(layers[n].weight.shape) + 1)
        for n, r in plan.items()
    )
    assert kept <= 0.5 * sum(m.weight.numel() for m in layers.values())


# ------------------------------------------------------------------------------------------
# spectral allocation: convert.allocate_ranks and convert_model(budget=)
# ------------------------------------------------------------------------------------------


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(48, 48), nn.ReLU(), nn.Linear(48, 128), nn.ReLU(),
                         nn.Linear(128, 48))  # fmt: skip


def test_convert_model_budget_is_allocate_ranks_on_the_spectra():
    model = mlp()
    expected = allocate_ranks(
        {
            name: (truncated_spectrum(m.weight.detach()), m.out_features, m.in_features)
            for name, m in model.named_children()
            if isinstance(m, nn.Linear)
        },
        0.5,
    )
    plans = []
    for _ in range(2):  # deterministic
        m = copy.deepcopy(model)
        report = convert_model(m, budget=0.5, guard=False)  # the head too, ranks uncapped
        plans.append({layer.name: layer.rank for layer in report.converted})
        assert report.params_after <= 0.5 * report.params_before
        assert all(isinstance(m[int(name)], LowRankLinear) for name in plans[-1])
    assert plans[0] == plans[1] == expected
    assert len(set(expected.values())) > 1  # ranks differ by layer: chosen from spectra
    uniform = convert_model(copy.deepcopy(model), budget=0.5, allocation="uniform")
    by_ratio = convert_model(copy.deepcopy(model), param_ratio=0.5)
    assert [x.rank for x in uniform.layers] == [x.rank for x in by_ratio.layers]


def test_a_budget_with_calibration_data_is_compress_s_job(gen):
    """The trap of the same words giving different results: convert_model refuses a budget
    with calibration data (or statistics) and names compress; the model is unchanged."""
    model = mlp()
    calib = [torch.randn(64, 48, generator=gen) for _ in range(2)]
    stats = collect_input_stats(model, calib)
    for data in ({"calibration": calib}, {"input_stats": stats}):
        trap = r"convert_model: a global budget with calibration data is compress's job"
        with pytest.raises(ValueError, match=trap + r" .* call compress\(model, calibration"):
            convert_model(model, budget=0.5, **data)
    with pytest.raises(ValueError, match=r"allocation='loss' needs a gradient pass; .*compress"):
        convert_model(model, budget=0.5, allocation="loss")
    assert all(type(m) is not LowRankLinear for m in model)


@pytest.mark.parametrize("allocation", ["minimax", "greedy"])
def test_allocate_ranks(allocation):
    flat = torch.ones(20)
    steep = torch.logspace(0, -3, 20)
    spectra = {"a": (flat, 20, 20), "b": (steep, 20, 20)}
    ranks = allocate_ranks(spectra, budget=0.5, allocation=allocation)
    assert ranks["a"] > ranks["b"]  # the flat spectrum needs more components
    used = sum(r * 41 for r in ranks.values())
    assert used <= 0.5 * 800 and used + 41 > 0.5 * 800  # budget filled as far as it goes
    assert allocate_ranks(spectra, budget=0.5, allocation=allocation) == ranks  # deterministic


def test_minimax_equalises_relative_error():
    spectra = {
        name: (torch.logspace(0, -decay, 64), 64, 64) for name, decay in [("a", 1), ("b", 3)]
    }
    ranks = allocate_ranks(spectra, budget=0.3)

    def residual(s, r):
        return float(s[r:].square().sum() / s.square().sum())

    res = {n: residual(spectra[n][0], r) for n, r in ranks.items()}
    greedy = allocate_ranks(spectra, budget=0.3, allocation="greedy")
    res_greedy = {n: residual(spectra[n][0], r) for n, r in greedy.items()}
    assert max(res.values()) <= max(res_greedy.values())


def test_allocate_ranks_errors():
    flat = torch.ones(20)
    steep = torch.logspace(0, -3, 20)
    with pytest.raises(ValueError, match=r"budget=0\.01 keeps 8 of 800 parameters, but rank 1"):
        allocate_ranks({"a": (flat, 20, 20), "b": (steep, 20, 20)}, budget=0.01)
    with pytest.raises(ValueError, match=r"budget must be in \(0, 1\], got 1\.5"):
        allocate_ranks({"a": (flat, 20, 20)}, budget=1.5)
    with pytest.raises(ValueError, match=r"allocation must be one of 'minimax', 'greedy'"):
        allocate_ranks({"a": (flat, 20, 20)}, budget=0.5, allocation="even")
