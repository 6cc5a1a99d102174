"""The rank policy object: validated once without a shape, resolved per weight, accepted
by every entry point in place of the keyword form."""

import numpy as np
import pytest
import torch
from torch import nn

from lowrank_layers import (
    AdaptiveLowRankLinear,
    ConversionConfig,
    DynamicLowRankLinear,
    LowRankLinear,
    RankPolicy,
    convert_model,
    factorize,
)
from lowrank_layers.allocate import allocate_ranks
from lowrank_layers.grad import GradientProjector
from lowrank_layers.policy import as_policy, factor_parameters, resolve_rank


def test_a_policy_is_validated_when_made_without_a_shape():
    assert RankPolicy(rank=np.int64(8)).rank == 8 and type(RankPolicy(rank=8).rank) is int
    assert RankPolicy(param_ratio=1).param_ratio == 1.0
    cases = [
        ({}, ValueError, r"exactly one rank policy must be given .* got none"),
        ({"rank": 2, "energy": 0.9}, ValueError, r"exactly one .* got rank=2, energy=0\.9"),
        ({"rank": 0}, ValueError, r"rank must be an int >= 1, got 0"),
        ({"rank": 2.5}, TypeError, r"rank must be an int >= 1, got 2\.5"),
        ({"rank": True}, TypeError, r"rank must be an int >= 1, got True"),
        ({"rank_ratio": 0.0}, ValueError, r"rank_ratio must be in \(0, 1\], got 0\.0"),
        ({"param_ratio": 1.5}, ValueError, r"param_ratio must be in \(0, 1\], got 1\.5"),
        ({"energy": float("nan")}, ValueError, r"energy must be in \(0, 1\], got nan"),
        ({"energy": "0.9"}, TypeError, r"energy must be a float in \(0, 1\], got str"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            RankPolicy(**kwargs)
    # no error speaks of a shape the user never had
    with pytest.raises(ValueError) as info:
        RankPolicy(rank=-3)
    assert "x" not in str(info.value).split("got")[0]


def test_resolve_gives_each_rule_its_rank():
    assert RankPolicy(rank=8).resolve(64, 32) == 8
    assert RankPolicy(rank_ratio=0.1).resolve(1024, 1024) == 102
    r = RankPolicy(param_ratio=0.5).resolve(1024, 512)
    assert factor_parameters(1024, 512, r, row_scales=False) <= 0.5 * 1024 * 512
    assert factor_parameters(1024, 512, r + 1, row_scales=False) > 0.5 * 1024 * 512
    assert RankPolicy(energy=0.9).resolve(64, 64) is None
    with pytest.raises(ValueError, match=r"rank must be an int in \[1, 32\] for a 64x32 weight"):
        RankPolicy(rank=40).resolve(64, 32)
    with pytest.raises(ValueError, match=r"param_ratio=0\.01 leaves no room .* 8x8 weight"):
        RankPolicy(param_ratio=0.01).resolve(8, 8)
    assert resolve_rank(1024, 1024, rank_ratio=0.1) == 102  # the keyword form


def test_plan_says_why_a_weight_is_not_converted():
    assert RankPolicy(rank=4).plan(64, 64) == (4, None)
    assert RankPolicy(rank=4).plan(8, 8, threshold=8) == (None, "8x8 is not above threshold 8²")
    assert RankPolicy(rank=100).plan(8, 8) == (None, "rank 8 saves no parameters (break-even)")
    assert RankPolicy(param_ratio=0.5).plan(1, 32) == (
        None,
        "param_ratio=0.5 is below rank 1 of a 1x32 weight (34 of 32 parameters)",
    )
    assert RankPolicy(energy=0.5).plan(64, 64) == (None, None)


def test_as_policy_takes_one_form_or_the_other():
    policy = RankPolicy(rank=4)
    assert as_policy(policy) is policy
    assert as_policy(rank=4) == policy
    assert as_policy(required=False) is None
    with pytest.raises(ValueError, match=r"give policy=rank=4 or the keyword form, not both"):
        as_policy(policy, rank_ratio=0.5)
    with pytest.raises(TypeError, match=r"policy must be a RankPolicy, got dict"):
        as_policy({"rank": 4})
    with pytest.raises(ValueError, match=r"exactly one rank policy .* got none"):
        as_policy()


def test_every_entry_point_accepts_the_object(gen):
    policy = RankPolicy(rank_ratio=0.25)
    W = torch.randn(64, 32, generator=gen)
    assert torch.equal(factorize(W, policy).U, factorize(W, rank_ratio=0.25).U)
    dense = nn.Linear(32, 64)
    assert LowRankLinear.from_linear(dense, policy).rank == 8
    assert DynamicLowRankLinear.from_linear(dense, policy).max_rank == 8
    adaptive = AdaptiveLowRankLinear(32, 64, policy)
    assert adaptive.switch_to_lowrank().rank == 8
    assert AdaptiveLowRankLinear.from_linear(dense, policy).default_policy == policy
    # a single layer is the model's output layer: guard=False converts it
    report = convert_model(nn.Sequential(nn.Linear(32, 64)), policy=policy, guard=False)
    assert report.converted[0].rank == 8
    config = ConversionConfig(policy=policy, guard=False)
    assert convert_model(nn.Sequential(nn.Linear(32, 64)), config).converted[0].rank == 8
    model = nn.Sequential(nn.Linear(32, 64))
    projector = GradientProjector(model, policy, update_every=1)
    model(torch.randn(4, 32, generator=gen)).sum().backward()
    assert projector.ranks == {"0.weight": 8}
    projector.remove()
    with pytest.raises(ValueError, match=r"give policy=rank_ratio=0\.25 or the keyword form"):
        convert_model(nn.Sequential(nn.Linear(32, 64)), policy=policy, rank=4)
    with pytest.raises(ValueError, match=r"give config= or its fields as keywords, not both"):
        convert_model(nn.Sequential(nn.Linear(32, 64)), config, rank=4)
    with pytest.raises(TypeError, match=r"config must be a ConversionConfig, got RankPolicy"):
        convert_model(nn.Sequential(nn.Linear(32, 64)), policy)


def test_an_adaptive_conversion_refuses_what_it_would_drop():
    model = nn.Sequential(nn.Linear(32, 64))
    for kwargs in ({"method": "randomized"}, {"seed": 3}):
        with pytest.raises(ValueError, match=r"an adaptive layer is factorized later: pass "
                           r"them to switch_to_lowrank"):  # fmt: skip
            convert_model(model, rank=4, layer="adaptive", **kwargs)
    assert type(model[0]) is nn.Linear


def test_layers_built_from_sizes_take_a_policy():
    assert LowRankLinear(64, 32, RankPolicy(rank_ratio=0.25)).rank == 8
    r = LowRankLinear(64, 32, RankPolicy(param_ratio=0.5)).rank
    assert factor_parameters(64, 32, r, row_scales=False) <= 0.5 * 64 * 32
    assert DynamicLowRankLinear(64, 32, max_rank=RankPolicy(rank_ratio=0.5)).max_rank == 16
    for build in (
        lambda: LowRankLinear(64, 32, RankPolicy(energy=0.9)),
        lambda: DynamicLowRankLinear(64, 32, max_rank=RankPolicy(energy=0.9)),
    ):
        with pytest.raises(ValueError, match=r"energy=0\.9 needs a weight's spectrum"):
            build()


def test_make_efficient_linear_takes_a_policy_and_the_converter_rule():
    from lowrank_layers import make_efficient_linear

    layer = make_efficient_linear(1024, 4096, RankPolicy(param_ratio=0.25))
    assert isinstance(layer, LowRankLinear)
    assert factor_parameters(4096, 1024, layer.rank, row_scales=False) <= 0.25 * 1024 * 4096
    assert make_efficient_linear(1024, 4096).rank == 102  # the original's default ratio
    assert isinstance(make_efficient_linear(1024, 1024, rank_ratio=0.9), nn.Linear)  # break-even
    with pytest.raises(ValueError, match=r"give policy=rank=4 or the keyword form"):
        make_efficient_linear(1024, 1024, RankPolicy(rank=4), rank_ratio=0.5)
    with pytest.raises(ValueError, match=r"energy=0\.5 needs a weight's spectrum"):
        make_efficient_linear(1024, 1024, RankPolicy(energy=0.5))


# ------------------------------------------------------------------------------------------
# integer ranks of any integer type; allocate_ranks' inputs
# ------------------------------------------------------------------------------------------


def test_ranks_may_be_numpy_or_tensor_integers(gen):
    W = torch.randn(16, 12, generator=gen)
    expected = factorize(W, rank=4)
    for rank in (np.int64(4), torch.tensor(4), np.int32(4)):
        assert resolve_rank(16, 12, rank=rank) == 4
        got = factorize(W, rank=rank)
        assert torch.equal(got.U, expected.U)
        report = convert_model(nn.Sequential(nn.Linear(12, 16)), rank=rank, guard=False)
        assert report.converted[0].rank == 4
        assert LowRankLinear(12, 16, rank).rank == 4
        dynamic = DynamicLowRankLinear(12, 16, active_rank=rank, max_rank=np.int64(8))
        assert (dynamic.rank, dynamic.max_rank) == (4, 8)
        dynamic.set_rank(rank - 1)
        assert dynamic.rank == 3 and type(dynamic.rank) is int
    for bad in (torch.tensor(4.0), torch.tensor([4]), np.float64(4.0), True):
        with pytest.raises(TypeError, match=r"rank must be an int >= 1, got"):
            resolve_rank(16, 12, rank=bad)


def test_allocate_ranks_takes_weights_and_names_a_bad_entry(gen):
    W = torch.randn(32, 16, generator=gen)
    from_weight = allocate_ranks({"a": W}, 0.5)
    from_spectrum = allocate_ranks({"a": (torch.linalg.svdvals(W), 32, 16)}, 0.5)
    assert from_weight == from_spectrum
    expected = r"spectra\['a'\] must be \(singular values as a 1-D tensor, out, in\) or a 2-D"
    with pytest.raises(TypeError, match=expected + r" weight, got a tensor of shape \(4,\)"):
        allocate_ranks({"a": torch.ones(4)}, 0.5)
    with pytest.raises(TypeError, match=r"spectra\['b'\] must be .* got \(1, 2\)"):
        allocate_ranks({"b": (1, 2)}, 0.5)
    with pytest.raises(ValueError, match=r"allocation must be one of 'minimax', 'greedy', got 'x'"):
        allocate_ranks({"a": W}, 0.5, allocation="x")
    with pytest.raises(ValueError, match=r"allocation must be one of 'auto', 'loss', 'minimax', "
                       r"'greedy', 'uniform', got 'x'"):  # fmt: skip
        convert_model(nn.Sequential(nn.Linear(8, 8)), budget=0.5, allocation="x")
