"""DynamicLowRankLinear and RankScheduler: what is dropped is the least important part."""

import pytest
import torch
from torch import nn

from lowrank_layers import DynamicLowRankLinear, RankScheduler, factorize

from .helpers import rel_err


def _perturbed_layer(gen: torch.Generator, row_scales: bool) -> DynamicLowRankLinear:
    """A layer whose factors training has moved: not orthonormal, not sorted."""
    layer = DynamicLowRankLinear(60, 50, max_rank=20, row_scales=row_scales)
    with torch.no_grad():
        layer.U.add_(0.5 * torch.randn(layer.U.shape, generator=gen))
        layer.V.add_(0.5 * torch.randn(layer.V.shape, generator=gen))
        layer.S.copy_(torch.rand(20, generator=gen))  # unsorted
        if row_scales:
            layer.D.copy_(0.5 + torch.rand(50, generator=gen))
    return layer


@pytest.mark.parametrize("row_scales", [False, True])
def test_shrink_keeps_the_top_singular_directions(row_scales, gen):
    layer = _perturbed_layer(gen, row_scales)
    W = layer.dense_weight().double()
    layer.set_rank(6)
    best = factorize(W, rank=6).dense()  # Eckart–Young: the best rank-6 approximation
    assert rel_err(layer.dense_weight(), best) < 1e-5
    assert layer.rank == 6 and layer.max_rank == 20
    assert layer.U.shape == (50, 20)  # shapes kept
    # the kept singular values are the leading ones of W
    assert torch.allclose(layer.S[:6].double(), torch.linalg.svdvals(W)[:6], rtol=1e-5)


def test_reorthonormalize_keeps_the_weight_and_sorts(gen):
    layer = _perturbed_layer(gen, row_scales=True)
    W = layer.dense_weight()
    sigma = layer.reorthonormalize()
    assert rel_err(layer.dense_weight(), W) < 1e-5
    assert bool((sigma[:-1] >= sigma[1:]).all())
    assert torch.allclose(layer.V.mT @ layer.V, torch.eye(20), atol=1e-5)


def test_grow_after_shrink_restores_the_weight(gen):
    layer = _perturbed_layer(gen, row_scales=False)
    x = torch.randn(7, 60, generator=gen)
    before = layer(x).detach()
    layer.set_rank(5)
    assert rel_err(layer(x).detach(), before) > 1e-2  # shrinking changed the function
    layer.set_rank(20)
    assert rel_err(layer(x).detach(), before) < 1e-5


def test_inactive_components_get_zero_gradient(gen):
    layer = DynamicLowRankLinear(30, 20, max_rank=10, active_rank=4)
    layer(torch.randn(5, 30, generator=gen)).sum().backward()
    assert float(layer.U.grad[:, 4:].abs().sum()) == 0.0
    assert float(layer.U.grad[:, :4].abs().sum()) > 0.0


def test_adjust_rank_by_ratio_and_energy(gen):
    dense = nn.Linear(100, 100)
    layer = DynamicLowRankLinear.from_linear(dense, rank_ratio=0.4)
    assert (layer.max_rank, layer.rank) == (40, 40)
    assert layer.adjust_rank(rank_ratio=0.2) == 20
    assert layer.adjust_rank(rank_ratio=0.3) == 30  # grows back
    S = torch.linalg.svdvals(layer.dense_weight().double())
    r = layer.adjust_rank(energy=0.5)
    kept = float(S[:r].square().sum() / S.square().sum())
    assert kept >= 0.5 and float(S[: r - 1].square().sum() / S.square().sum()) < 0.5
    with pytest.raises(ValueError, match=r"exactly one of rank_ratio or energy"):
        layer.adjust_rank()
    with pytest.raises(ValueError, match=r"rank_ratio=0\.9 gives rank 90, above max_rank=40"):
        layer.adjust_rank(rank_ratio=0.9)
    with pytest.raises(ValueError, match=r"rank must be an int in \[1, 40\], got 41"):
        layer.set_rank(41)


def test_from_linear_full_rank_reproduces_and_active_rank(gen):
    dense = nn.Linear(24, 16)
    layer = DynamicLowRankLinear.from_linear(dense, rank=16)
    x = torch.randn(3, 24, generator=gen)
    assert rel_err(layer(x), dense(x)) < 1e-5
    part = DynamicLowRankLinear.from_linear(dense, rank=16, active_rank=4)
    assert rel_err(part.dense_weight(), factorize(dense.weight.detach(), rank=4).dense()) < 1e-5


def test_prune_drops_unused_components_and_keeps_output(gen):
    layer = _perturbed_layer(gen, row_scales=False)
    layer.set_rank(7)
    x = torch.randn(4, 60, generator=gen)
    before = layer(x).detach()
    swaps = layer.prune()
    assert layer.max_rank == 7 and layer.U.shape == (50, 7) and layer.V.shape == (60, 7)
    assert [s.new[0].shape for s in swaps] == [(50, 7), (7,), (7, 60)]
    assert torch.allclose(layer(x), before, atol=1e-6)


def test_state_dict_round_trip_keeps_rank_and_loads_pruned(gen):
    layer = _perturbed_layer(gen, row_scales=True)
    layer.set_rank(9)
    fresh = DynamicLowRankLinear(60, 50, max_rank=20, row_scales=True)
    fresh.load_state_dict(layer.state_dict())
    assert fresh.rank == 9
    x = torch.randn(2, 60, generator=gen)
    assert torch.equal(fresh(x), layer(x))
    layer.prune()
    fresh2 = DynamicLowRankLinear(60, 50, max_rank=20, row_scales=True)
    fresh2.load_state_dict(layer.state_dict())
    assert fresh2.max_rank == 9 and torch.equal(fresh2(x), layer(x))


def test_constructor_errors_and_defaults():
    layer = DynamicLowRankLinear(100, 50)
    assert layer.max_rank == 10  # default max_rank_ratio 0.2 of min(in, out) = 50
    with pytest.raises(ValueError, match=r"give max_rank or max_rank_ratio, not both"):
        DynamicLowRankLinear(10, 10, max_rank=2, max_rank_ratio=0.5)
    with pytest.raises(ValueError, match=r"max_rank must be an int in \[1, 10\], got 11"):
        DynamicLowRankLinear(10, 10, max_rank=11)
    with pytest.raises(ValueError, match=r"max_rank_ratio must be in \(0, 1\], got 0"):
        DynamicLowRankLinear(10, 10, max_rank_ratio=0)
    with pytest.raises(ValueError, match=r"rank must be an int in \[1, 4\], got 5"):
        DynamicLowRankLinear(10, 10, max_rank=4, active_rank=5)
    assert "rank=3, max_rank=4" in repr(DynamicLowRankLinear(10, 10, max_rank=4, active_rank=3))


def test_rank_scheduler_follows_the_original_schedule():
    model = nn.Sequential(
        DynamicLowRankLinear(200, 200, max_rank_ratio=0.2),
        nn.ReLU(),
        DynamicLowRankLinear(200, 100, max_rank_ratio=0.2),
    )
    sched = RankScheduler(model, {0: 0.20, 10: 0.15, 30: 0.10})
    seen = {}
    for epoch in range(50):
        sched.step()
        seen[epoch] = (model[0].rank, model[2].rank)
    assert seen[0] == (40, 20) and seen[9] == (40, 20)
    assert seen[10] == (30, 15) and seen[29] == (30, 15)
    assert seen[30] == (20, 10) and seen[49] == (20, 10)
    state = sched.state_dict()
    again = RankScheduler(model, {0: 1.0})
    again.load_state_dict(state)
    assert again.last_epoch == 49 and again.ratio_at(12) == 0.15


def test_rank_scheduler_resets_optimizer_state_on_shrink(gen):
    model = nn.Sequential(DynamicLowRankLinear(40, 40, max_rank=20))
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(3, 40, generator=gen)).sum().backward()
    opt.step()
    sched = RankScheduler(model, {0: 0.5, 1: 0.25}, optimizer=opt)
    sched.step(0)  # 20 -> 20: nothing rotated, state kept
    assert model[0].U in opt.state
    sched.step(1)  # 20 -> 10: rotated, moments dropped
    assert model[0].U not in opt.state and model[0].bias in opt.state


def test_rank_scheduler_errors():
    model = nn.Sequential(DynamicLowRankLinear(10, 10))
    with pytest.raises(ValueError, match=r"schedule must map at least one epoch"):
        RankScheduler(model, {})
    with pytest.raises(ValueError, match=r"schedule epochs must be ints >= 0, got -1"):
        RankScheduler(model, {-1: 0.5})
    with pytest.raises(ValueError, match=r"schedule\[3\] must be in \(0, 1\], got 1\.5"):
        RankScheduler(model, {3: 1.5})
    with pytest.raises(ValueError, match=r"holds no DynamicLowRankLinear"):
        RankScheduler(nn.Linear(3, 3), {0: 0.5})
