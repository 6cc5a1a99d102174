"""AdaptiveLowRankLinear: nn.Linear to the bit when dense, then an in-place switch."""

import pytest
import torch
from torch import nn

from lowrank_layers import AdaptiveLowRankLinear, factorize

from .helpers import eckart_young, rel_err


def test_dense_phase_is_nn_linear_to_the_bit(gen):
    torch.manual_seed(3)
    ref = nn.Linear(48, 32)
    torch.manual_seed(3)
    layer = AdaptiveLowRankLinear(48, 32)
    assert torch.equal(layer.weight, ref.weight) and torch.equal(layer.bias, ref.bias)
    other = nn.Linear(48, 32)
    layer.load_state_dict(other.state_dict())
    x = torch.randn(4, 7, 48, generator=gen)
    assert torch.equal(layer(x), other(x))
    assert set(layer.state_dict()) == {"weight", "bias"}
    assert not layer.is_lowrank and layer.rank is None


@pytest.mark.parametrize("balance", ["none", "rownorm", "rowsum"])
def test_switch_preserves_function_within_truncation_error(balance, gen):
    layer = AdaptiveLowRankLinear(64, 48)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(48, 64, generator=gen) * torch.rand(48, 1, generator=gen))
    W = layer.weight.detach().clone()
    x = torch.randn(100, 64, generator=gen)
    before = layer(x).detach()

    result = layer.switch_to_lowrank(rank=12, balance=balance)

    assert layer.is_lowrank and layer.rank == 12 and result.rank == 12
    assert "weight" not in dict(layer.named_parameters())
    assert "weight" not in layer._parameters
    # the relative error is the Eckart–Young value of the (balanced) matrix that was truncated
    D = layer.D.detach() if layer.D is not None else torch.ones(48)
    s = torch.linalg.svdvals((W / D[:, None]).double())
    Wt_hat = (layer.U * layer.S) @ layer.V.mT
    assert rel_err(Wt_hat, W / D[:, None]) == pytest.approx(eckart_young(s, 12), rel=1e-4)
    assert result.relative_error == pytest.approx(rel_err(layer.dense_weight(), W), rel=1e-5)
    # and the function changed by exactly the truncated part of the weight
    after = layer(x).detach()
    expected = before + x @ (layer.dense_weight() - W).mT
    assert rel_err(after, expected) < 1e-5
    assert float((after - before).abs().max()) > 0  # something changed
    assert result.params_before == 48 * 64
    assert result.params_after == 12 * (48 + 64 + 1) + (48 if balance != "none" else 0)


def test_switch_none_matches_factorize(gen):
    layer = AdaptiveLowRankLinear(40, 30)
    W = layer.weight.detach().clone()
    layer.switch_to_lowrank(rank_ratio=0.2)
    assert torch.allclose(layer.dense_weight(), factorize(W, rank=6).dense(), atol=1e-6)
    assert layer.D is None


def test_default_policy_and_errors():
    layer = AdaptiveLowRankLinear(32, 32, param_ratio=0.5, balance="rownorm")
    result = layer.switch_to_lowrank()
    assert result.rank == 7 and result.balance == "rownorm"  # 7*65+32 = 487 <= 512 < 552
    with pytest.raises(RuntimeError, match=r"already low rank \(rank 7\)"):
        layer.switch_to_lowrank(rank=2)
    with pytest.raises(ValueError, match=r"exactly one rank policy must be given .* got none"):
        AdaptiveLowRankLinear(8, 8).switch_to_lowrank()
    with pytest.raises(ValueError, match=r"exactly one rank policy.*rank=2, rank_ratio=0\.5"):
        AdaptiveLowRankLinear(8, 8, rank=2, rank_ratio=0.5)
    with pytest.raises(
        ValueError, match=r"rank must be an int in \[1, 8\] for a 8x8 weight, got 9"
    ):
        AdaptiveLowRankLinear(8, 8, rank=9)
    with pytest.raises(ValueError, match=r"balance must be one of 'none', 'rownorm', 'rowsum'"):
        AdaptiveLowRankLinear(8, 8, balance="dbc")
    with pytest.raises(ValueError, match=r"in_features must be a positive int, got 0"):
        AdaptiveLowRankLinear(0, 8)
    with pytest.raises(RuntimeError, match=r"still dense"):
        AdaptiveLowRankLinear(8, 8).factors()
    with pytest.raises(TypeError, match=r"linear must be an nn.Linear, got ReLU"):
        AdaptiveLowRankLinear.from_linear(nn.ReLU())


def test_state_dict_saved_after_switch_loads_into_a_fresh_dense_layer(gen):
    layer = AdaptiveLowRankLinear(32, 24, balance="rowsum")
    layer.switch_to_lowrank(rank=5)
    saved = {k: v.clone() for k, v in layer.state_dict().items()}
    assert set(saved) == {"U", "S", "Vh", "D", "bias"}

    fresh = AdaptiveLowRankLinear(32, 24)
    assert not fresh.is_lowrank
    fresh.load_state_dict(saved)  # strict: restructured first
    assert fresh.is_lowrank and fresh.rank == 5
    x = torch.randn(6, 32, generator=gen)
    assert torch.equal(fresh(x), layer(x))
    assert [n for n, _ in fresh.named_parameters()] == ["U", "S", "Vh", "D", "bias"]

    # and back: a dense state dict restructures a switched layer to dense
    dense_sd = nn.Linear(32, 24).state_dict()
    fresh.load_state_dict(dense_sd)
    assert not fresh.is_lowrank
    assert torch.equal(fresh.weight, dense_sd["weight"])


def test_switch_keeps_device_dtype_and_requires_grad():
    layer = AdaptiveLowRankLinear(16, 16, dtype=torch.bfloat16)
    layer.weight.requires_grad_(False)
    layer.switch_to_lowrank(rank=4)
    for name in ("U", "S", "Vh"):
        p = getattr(layer, name)
        assert p.dtype == torch.bfloat16 and not p.requires_grad
    assert layer.bias.requires_grad  # untouched


def test_to_linear_in_both_phases(gen):
    dense = nn.Linear(20, 10)
    layer = AdaptiveLowRankLinear.from_linear(dense)
    assert torch.equal(layer.to_linear().weight, dense.weight)
    layer.switch_to_lowrank(rank=10)
    x = torch.randn(3, 20, generator=gen)
    assert rel_err(layer.to_linear()(x), dense(x)) < 1e-5
    assert "rank=10" in repr(layer) and "dense" in repr(AdaptiveLowRankLinear(4, 4))


def test_gradients_flow_after_switch(gen):
    layer = AdaptiveLowRankLinear(16, 8)
    layer.switch_to_lowrank(rank=3)
    layer(torch.randn(5, 16, generator=gen)).square().sum().backward()
    assert all(p.grad is not None for p in layer.parameters())
