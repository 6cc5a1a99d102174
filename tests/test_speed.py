"""The speed model, and keeping dense the layers it says do not pay (``min_speedup``)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lowrank_layers import compress, convert_model
from lowrank_layers.linear import FOLD_MIN_TOKENS
from lowrank_layers.speed import SpeedModel, SpeedRule, expected_speedup, measure_speed_model


def limit(in_f: int, out_f: int, rank: int) -> float:
    return in_f * out_f / (rank * (in_f + out_f))


@pytest.mark.parametrize(
    ("tokens", "inference_layout"), [(1, True), (8, False), (8, True), (4096, False)]
)
def test_large_layers_approach_the_limit(tokens, inference_layout):
    # 8192x8192 at rank 1024 (a multiple of 8: no padding): per-call costs are negligible;
    # one token reads every weight in runs of 8192 numbers once U is transposed, and from
    # two tokens on the matrix products read weights at the same speed whatever the rows
    x = expected_speedup(8192, 8192, 1024, tokens, inference_layout=inference_layout)
    assert 0.95 * limit(8192, 8192, 1024) < x <= limit(8192, 8192, 1024) * 1.001


def test_u_stored_in_short_rows_is_priced_by_its_row_length():
    model = SpeedModel(bandwidth=20e9, peak=1e15, call=0.0, half_row=256.0)
    # one token, memory-bound, no per-call costs: dense reads rows of 8192 numbers, Vh
    # too, U rows of 1024 (read at 1024/1280 of the bandwidth against 8192/8448)
    dense = 8192 * 8192 / model.read_bandwidth(8192)
    low = 1024 * 8192 / model.read_bandwidth(8192) + 8192 * 1024 / model.read_bandwidth(1024)
    x = expected_speedup(8192, 8192, 1024, 1, model=model)
    assert x == pytest.approx(dense / low, rel=1e-3)  # activations: a few KiB
    assert x < expected_speedup(8192, 8192, 1024, 1, model=model, inference_layout=True)
    # from two tokens on, matrix products: no row effect, so no layout effect
    assert expected_speedup(8192, 8192, 1024, 2, model=model) == expected_speedup(
        8192, 8192, 1024, 2, model=model, inference_layout=True
    )
    # the layout does not matter to a model without the effect, nor in half precision
    flat = SpeedModel(bandwidth=20e9, peak=1e15, call=0.0, half_row=0.0)
    assert expected_speedup(8192, 8192, 1024, 1, model=flat) == pytest.approx(
        expected_speedup(8192, 8192, 1024, 1, model=flat, inference_layout=True)
    )
    half = {"dtype": torch.bfloat16, "model": model}
    assert expected_speedup(8192, 8192, 1024, 1, **half) == expected_speedup(
        8192, 8192, 1024, 1, inference_layout=True, **half
    )


def test_read_bandwidth_fit_recovers_its_constants():
    from lowrank_layers.speed import fit_read_bandwidth

    truth = SpeedModel(bandwidth=20e9, half_row=300.0)
    rows = (256, 1024, 4096)
    bandwidth, half_row = fit_read_bandwidth(rows, [1 / truth.read_bandwidth(n) for n in rows])
    assert bandwidth == pytest.approx(20e9, rel=1e-9)
    assert half_row == pytest.approx(300.0, rel=1e-9)
    # short rows read no slower than long ones: no layout effect, the mean bandwidth
    bandwidth, half_row = fit_read_bandwidth(rows, [1 / 10e9, 1 / 9e9, 1 / 8e9])
    assert half_row == 0.0
    assert bandwidth == pytest.approx(1 / ((1 / 10e9 + 1 / 9e9 + 1 / 8e9) / 3))
    with pytest.raises(ValueError, match=r"at least two row lengths, got rows=\(256, 256\)"):
        fit_read_bandwidth((256, 256), [1e-10, 1e-10])
    with pytest.raises(ValueError, match=r"one time per row length .* and 1 times"):
        fit_read_bandwidth((256, 1024), [1e-10])


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"bandwidth": 0.0}, ValueError, r"bandwidth must be a finite number > 0, got 0\.0"),
        ({"peak": math.inf}, ValueError, r"peak must be a finite number > 0, got inf"),
        ({"call": -1e-6}, ValueError, r"call must be a finite number >= 0, got -1e-06"),
        ({"half_row": "256"}, TypeError, r"half_row must be a finite number >= 0, got '256'"),
        ({"half_row": True}, TypeError, r"half_row must be a finite number >= 0, got True"),
    ],
)
def test_speed_model_rejects_bad_constants(kwargs, error, match):
    with pytest.raises(error, match=f"SpeedModel {match}"):
        SpeedModel(**kwargs)


def test_small_layers_do_not_pay_at_one_token():
    assert expected_speedup(576, 192, 115, 1) < 1.0  # 80% of params: dispatch dominates
    assert expected_speedup(576, 192, 115, 4096) > 1.0  # many tokens: arithmetic dominates


def test_speedup_falls_with_rank_and_costs_of_the_few_token_regime():
    xs = [expected_speedup(1024, 1024, r, 1) for r in (64, 128, 256, 400)]
    assert xs == sorted(xs, reverse=True)
    plain = expected_speedup(1024, 1024, 100, 1)
    assert expected_speedup(1024, 1024, 100, 1, row_scales=True) < plain  # two more operations
    # the fold regime pays for padding an unaligned rank
    aligned = expected_speedup(1024, 1024, 96, FOLD_MIN_TOKENS)
    padded = expected_speedup(1024, 1024, 97, FOLD_MIN_TOKENS)
    assert padded < aligned


def test_half_precision_reads_half_the_bytes():
    slow_memory = SpeedModel(bandwidth=1e9, peak=1e15, call=0.0, half_row=0.0)
    x32 = expected_speedup(1024, 1024, 256, 1, model=slow_memory)
    x16 = expected_speedup(1024, 1024, 256, 1, dtype=torch.bfloat16, model=slow_memory)
    # memory-bound without per-call costs: both near the limit (activations differ a little)
    assert x32 == pytest.approx(limit(1024, 1024, 256), rel=0.01)
    assert x16 == pytest.approx(x32, rel=0.01)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"in_features": 0}, r"in_features must be a positive int, got 0"),
        ({"rank": 1.5}, r"rank must be a positive int, got 1\.5"),
        ({"tokens": True}, r"tokens must be a positive int, got True"),
        ({"dtype": "float32"}, r"dtype must be a torch\.dtype, got 'float32'"),
    ],
)
def test_expected_speedup_rejects_bad_input(kwargs, match):
    args = {"in_features": 64, "out_features": 64, "rank": 8, "tokens": 1, **kwargs}
    with pytest.raises((ValueError, TypeError), match=match):
        expected_speedup(**args)


def test_expected_speedup_rejects_a_non_bool_layout():
    with pytest.raises(TypeError, match=r"inference_layout must be a bool, got 1"):
        expected_speedup(64, 64, 8, 1, inference_layout=1)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((0.0,), r"min_speedup must be a positive number, got 0\.0"),
        ((math.inf,), r"min_speedup must be a positive number, got inf"),
        (("1",), r"min_speedup must be a positive number, got '1'"),
        ((1.0, 0), r"speedup_tokens must be a positive int, got 0"),
    ],
)
def test_speed_rule_rejects_bad_options(args, match):
    with pytest.raises(ValueError, match=match):
        SpeedRule(*args)


@pytest.mark.parametrize(("out_f", "in_f", "tokens"), [(576, 576, 1), (192, 576, 1), (64, 64, 1)])
def test_max_rank_is_the_largest_paying_rank(out_f, in_f, tokens):
    rule = SpeedRule(1.0, tokens)
    kw = {"row_scales": False, "bias": True, "dtype": torch.float32}
    upper = min(out_f, in_f)
    brute = max((r for r in range(1, upper + 1) if rule.reason(out_f, in_f, r, **kw) is None),
                default=0)  # fmt: skip
    assert rule.max_rank(out_f, in_f, upper, **kw) == brute


def test_measured_speed_model_is_plausible():
    model = measure_speed_model(repeats=3)
    assert 1e8 < model.bandwidth < 1e13
    assert 0 <= model.half_row < 1e5
    assert 1e8 < model.peak < 1e15
    assert 0 < model.call < 1e-3


# these tests are about min_speedup: without guard=False, two_sizes()' last layer would stay
# dense as the model's output layer, outside the budget
NO_GUARD = {"guard": False}


def two_sizes() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(576, 576), nn.ReLU(), nn.Linear(576, 192), nn.Linear(192, 576))


def test_min_speedup_keeps_slow_layers_dense_with_their_reason():
    # at half the parameters the 576x576 layer models at 1.23x; the 576x192 and 192x576
    # projections at 0.94x and 0.96x (per-call costs, and U read in rows of 71 numbers)
    model = two_sizes()
    report = convert_model(model, param_ratio=0.5, min_speedup=1.0, **NO_GUARD)
    kept = {layer.name: layer for layer in report.skipped}
    assert set(kept) == {"2", "3"}
    assert isinstance(model[2], nn.Linear) and isinstance(model[3], nn.Linear)
    assert kept["2"].reason.startswith("expected speed-up 0.")
    assert "at 1 token per call is below min_speedup=1" in kept["2"].reason
    for layer in report.converted:
        assert layer.speedup_few >= 1.0
    # judged at 4096 tokens, the same layer pays
    model = two_sizes()
    report = convert_model(model, param_ratio=0.5, min_speedup=1.0, speedup_tokens=4096, **NO_GUARD)
    assert not report.skipped


def test_min_speedup_with_a_budget_caps_ranks_and_keeps_the_budget():
    model = two_sizes()
    total = 576 * 576 + 2 * 576 * 192
    report = convert_model(model, budget=0.7, min_speedup=1.0, **NO_GUARD)
    assert sum(layer.params_after for layer in report.layers) <= 0.7 * total
    for layer in report.converted:
        assert layer.speedup_few >= 1.0
    assert {layer.name for layer in report.skipped} <= {"2", "3"}


def test_min_speedup_budget_too_small_for_the_dense_layers_is_an_error():
    # no rank of a 64x64 layer is faster at one token: it must stay whole, 4,096 parameters
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(2048, 2048))
    with pytest.raises(
        ValueError, match=r"budget=0\.001 keeps 4,198 .* 1 layers .* hold 4,096, which leaves 102 "
    ):
        convert_model(model, budget=0.001, min_speedup=1.0, **NO_GUARD)


def test_min_speedup_is_refused_for_adaptive_layers():
    with pytest.raises(ValueError, match=r"min_speedup applies to layer='lowrank' or 'dynamic'"):
        convert_model(two_sizes(), rank_ratio=0.5, layer="adaptive", min_speedup=1.0)


def test_compress_candidates_respect_min_speedup(gen):
    model = two_sizes()
    batches = [torch.randn(64, 576, generator=gen) for _ in range(4)]
    report = compress(model, batches, budget=0.8, min_speedup=1.0)
    for layer in report.conversion.converted:
        assert layer.speedup_few >= 1.0
    assert isinstance(model[2], nn.Linear)


def test_speedup_tokens_is_checked_without_min_speedup_too():
    with pytest.raises(ValueError, match=r"speedup_tokens must be a positive int, got 0"):
        convert_model(two_sizes(), rank=4, speedup_tokens=0)
