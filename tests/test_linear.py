"""LowRankLinear: exactness at full rank, round trips, initial scale, dtypes, errors."""

import pytest
import torch
from torch import nn

from lowrank_layers import LowRankLinear, factorize
from lowrank_layers.factorize import relative_error

from .helpers import rel_err


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("balance", ["none", "rownorm", "rowsum"])
@pytest.mark.parametrize("shape", [(48, 32), (32, 48)])  # (in, out)
def test_full_rank_from_linear_reproduces_dense(bias, balance, shape, gen):
    torch.manual_seed(0)
    dense = nn.Linear(*shape, bias=bias)
    low = LowRankLinear.from_linear(dense, rank=min(shape), balance=balance)
    assert (low.D is not None) == (balance != "none")
    x = torch.randn(3, 5, shape[0], generator=gen)  # leading dims are kept
    expected = dense(x)
    out = low(x)
    assert out.shape == (3, 5, shape[1])
    assert rel_err(out, expected) < 1e-4  # float32 rounding through two products


def test_truncated_from_linear_matches_factorize_and_keeps_bias(gen):
    dense = nn.Linear(64, 40)
    low = LowRankLinear.from_linear(dense, rank=8)
    f = factorize(dense.weight.detach(), rank=8)
    assert torch.allclose(low.dense_weight(), f.dense(), atol=1e-6)
    assert torch.equal(low.bias, dense.bias)
    assert low.bias.data_ptr() != dense.bias.data_ptr()  # a copy, not shared
    x = torch.randn(7, 64, generator=gen)
    assert torch.allclose(low(x), x @ f.dense().mT + dense.bias, atol=1e-5)


def test_from_linear_rank_policies():
    dense = nn.Linear(100, 50)
    assert LowRankLinear.from_linear(dense, rank_ratio=0.2).rank == 10
    assert LowRankLinear.from_linear(dense, param_ratio=0.3).rank == 9  # 9*151 <= 1500 < 10*151
    low = LowRankLinear.from_linear(dense, energy=0.5, method="randomized")
    assert relative_error(dense.weight, low.factors()) <= 0.5**0.5 + 1e-6


def test_to_linear_round_trip(gen):
    dense = nn.Linear(30, 20)
    low = LowRankLinear.from_linear(dense, rank=20)
    back = low.to_linear()
    assert isinstance(back, nn.Linear)
    assert rel_err(back.weight, dense.weight) < 1e-5
    assert torch.equal(back.bias, dense.bias)
    low2 = LowRankLinear.from_linear(dense, rank=5, balance="rownorm")
    x = torch.randn(4, 30, generator=gen)
    assert torch.allclose(low2.to_linear()(x), low2(x), atol=1e-5)


def test_bfloat16_layers_work(gen):
    dense = nn.Linear(64, 48, dtype=torch.bfloat16)
    low = LowRankLinear.from_linear(dense, rank=48)
    assert all(p.dtype == torch.bfloat16 for p in low.parameters())
    x = torch.randn(10, 64, generator=gen).to(torch.bfloat16)
    # bfloat16 has an 8-bit mantissa: two rounded products stay within ~2% of the dense output
    assert rel_err(low(x), dense(x)) < 0.02
    back = low.to_linear()
    assert back.weight.dtype == torch.bfloat16
    fresh = LowRankLinear(64, 48, 8, dtype=torch.bfloat16)
    assert fresh(x).dtype == torch.bfloat16


def test_float64_layer(gen):
    dense = nn.Linear(20, 10, dtype=torch.float64)
    low = LowRankLinear.from_linear(dense, rank=10)
    x = torch.randn(3, 20, generator=gen, dtype=torch.float64)
    assert rel_err(low(x), dense(x)) < 1e-12


@pytest.mark.parametrize(
    ("in_f", "out_f", "rank"), [(1024, 1024, 102), (768, 3072, 77), (3072, 768, 192)]
)
def test_fresh_layer_output_scale_matches_nn_linear(in_f, out_f, rank, gen):
    x = torch.randn(2048, in_f, generator=gen)
    stds_low, stds_dense = [], []
    for seed in range(3):
        torch.manual_seed(seed)
        stds_dense.append(float(nn.Linear(in_f, out_f)(x).detach().std()))
        torch.manual_seed(seed)
        stds_low.append(float(LowRankLinear(in_f, out_f, rank)(x).detach().std()))
    ratio = sum(stds_low) / sum(stds_dense)
    assert 0.85 <= ratio <= 1.15
    # the original design's randn init was sqrt(in*rank)-times too large: check we are not
    assert float(LowRankLinear(in_f, out_f, rank).S[0].detach()) == pytest.approx(
        (out_f / (3 * rank)) ** 0.5
    )


def test_fresh_factors_are_orthonormal():
    layer = LowRankLinear(200, 100, 20, row_scales=True)
    assert torch.allclose(layer.U.mT @ layer.U, torch.eye(20), atol=1e-5)
    assert torch.allclose(layer.V.mT @ layer.V, torch.eye(20), atol=1e-5)
    assert torch.equal(layer.D, torch.ones(100))


def test_parameters_and_state_dict_names():
    layer = LowRankLinear(16, 8, 4, row_scales=True)
    shapes = {k: tuple(v.shape) for k, v in layer.state_dict().items()}
    assert shapes == {"U": (8, 4), "S": (4,), "Vh": (4, 16), "D": (8,), "bias": (8,)}
    plain = LowRankLinear(16, 8, 4, bias=False)
    assert set(plain.state_dict()) == {"U", "S", "Vh"}
    assert plain.D is None and plain.bias is None


def test_gradients_reach_every_factor(gen):
    layer = LowRankLinear(16, 8, 4, row_scales=True)
    layer(torch.randn(5, 16, generator=gen)).square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, name


def test_meta_device_and_to_empty():
    with torch.device("meta"):
        layer = LowRankLinear(32, 16, 4)
    assert layer.U.is_meta
    layer = layer.to_empty(device="cpu")
    layer.reset_parameters()
    assert torch.allclose(layer.U.mT @ layer.U, torch.eye(4), atol=1e-5)


def test_extra_repr():
    assert repr(LowRankLinear(64, 32, 8)) == (
        "LowRankLinear(in_features=64, out_features=32, rank=8, bias=True, row_scales=False)"
    )


def test_rank_past_break_even_is_allowed_by_the_layer():
    layer = LowRankLinear(10, 10, 10)
    assert sum(p.numel() for p in layer.parameters()) > 10 * 10


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((0, 8, 2), {}, r"in_features must be a positive int, got 0"),
        ((8, -1, 2), {}, r"out_features must be a positive int, got -1"),
        ((8, 4, 0), {}, r"rank must be an int in \[1, 4\] for a 4x8 weight, got 0"),
        ((8, 4, 5), {}, r"rank must be an int in \[1, 4\] for a 4x8 weight, got 5"),
        ((8, 4, 2.0), {}, r"rank must be an int in \[1, 4\].*got 2\.0"),
    ],
)
def test_constructor_rejects_bad_sizes(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        LowRankLinear(*args, **kwargs)


def test_from_linear_rejects_non_linear():
    with pytest.raises(TypeError, match=r"linear must be an nn.Linear, got Conv1d"):
        LowRankLinear.from_linear(nn.Conv1d(4, 4, 1), rank=2)
    with pytest.raises(ValueError, match=r"exactly one rank policy"):
        LowRankLinear.from_linear(nn.Linear(4, 4), rank=2, rank_ratio=0.5)
