"""The one per-layer decision convert_model and convert_checkpoint share."""

import torch

from lowrank_layers import ConversionConfig, RankPolicy
from lowrank_layers.layer_plan import Shape, check_rank, converted_report, plan_layer
from lowrank_layers.policy import factor_parameters

SHAPE = Shape(out_features=256, in_features=128, bias=True, dtype=torch.float32)
BIG = Shape(out_features=2048, in_features=2048, bias=True, dtype=torch.float32)


def test_the_planned_rank_goes_to_factorize_as_a_rank():
    config = ConversionConfig(param_ratio=0.5)
    rule, reason = plan_layer(SHAPE, config.policy, config)
    assert reason is None
    assert rule == RankPolicy(rank=RankPolicy(param_ratio=0.5).resolve(256, 128))
    energy = RankPolicy(energy=0.9)
    assert plan_layer(SHAPE, energy, ConversionConfig(policy=energy)) == (energy, None)


def test_the_rules_that_keep_a_layer_dense():
    small = ConversionConfig(rank=4, threshold=200)
    assert plan_layer(SHAPE, small.policy, small) == (None, "256x128 is not above threshold 200²")
    rule, reason = plan_layer(SHAPE, RankPolicy(rank=100), ConversionConfig(rank=100))
    assert rule is None and "break-even" in reason
    tiny = ConversionConfig(param_ratio=0.001)
    rule, reason = plan_layer(SHAPE, tiny.policy, tiny)
    assert rule is None and "param_ratio=0.001 is below rank 1" in reason
    fast = ConversionConfig(rank=900, min_speedup=1.5)  # expected 1.07x at one token
    rule, reason = plan_layer(BIG, fast.policy, fast)
    assert rule is None and "is below min_speedup=1.5" in reason
    assert plan_layer(BIG, RankPolicy(rank=500), fast) == (RankPolicy(rank=500), None)  # 1.77x


def test_an_energy_rank_is_checked_after_factorizing():
    config = ConversionConfig(energy=0.9, min_speedup=1.5)
    assert check_rank(BIG, 500, config.policy, config) is None
    assert "is below min_speedup=1.5" in check_rank(BIG, 900, config.policy, config)
    assert "break-even" in check_rank(SHAPE, 100, config.policy, config)
    assert check_rank(BIG, 900, RankPolicy(rank=900), config) is None  # planned: checked before


def test_the_converted_report():
    report = converted_report(
        "fc", "LowRankLinear", SHAPE, 16, row_scales=True, relative_error=0.25
    )
    assert (report.in_features, report.out_features, report.rank) == (128, 256, 16)
    assert report.params_before == 256 * 128
    assert report.params_after == factor_parameters(256, 128, 16, row_scales=True)
    assert report.converted and report.speedup_few > 0 and report.speedup_many > 0
