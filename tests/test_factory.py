"""make_efficient_linear: low rank exactly where it is large enough and saves parameters."""

import pytest
from torch import nn

from lowrank_layers import LowRankLinear, make_efficient_linear


@pytest.mark.parametrize(
    ("in_f", "out_f", "kwargs", "expected_rank"),
    [
        (1024, 1024, {}, 102),  # 1024*1024 > 512^2, rank 102 saves parameters
        (1024, 4096, {"rank_ratio": 0.15}, 154),
        (512, 512, {}, None),  # 512*512 is not > 512^2
        (513, 512, {}, 51),  # just above the threshold
        (256, 256, {"threshold": 0}, 26),
        (1024, 1024, {"rank_ratio": 0.5}, None),  # rank 512 is past break-even (no saving)
        (1024, 1024, {"rank_ratio": 0.49}, 502),  # just below break-even
    ],
)
def test_low_rank_only_when_large_and_saving(in_f, out_f, kwargs, expected_rank):
    layer = make_efficient_linear(in_f, out_f, **kwargs)
    if expected_rank is None:
        assert type(layer) is nn.Linear
        assert (layer.in_features, layer.out_features) == (in_f, out_f)
    else:
        assert isinstance(layer, LowRankLinear)
        assert layer.rank == expected_rank
        assert sum(p.numel() for p in layer.parameters()) < in_f * out_f + out_f


def test_options_are_passed_through():
    layer = make_efficient_linear(1024, 1024, bias=False, row_scales=True)
    assert layer.bias is None and layer.D is not None
    dense = make_efficient_linear(8, 8, bias=False)
    assert dense.bias is None


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((0, 10), {}, r"in_features must be a positive int, got 0"),
        ((10, "a"), {}, r"out_features must be a positive int, got 'a'"),
        ((10, 10), {"threshold": -1}, r"threshold must be an int >= 0, got -1"),
        ((10, 10), {"rank_ratio": 0}, r"rank_ratio must be in \(0, 1\], got 0"),
    ],
)
def test_bad_arguments(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_efficient_linear(*args, **kwargs)
