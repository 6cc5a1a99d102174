"""Whole-model tools (``lowrank_layers.tools``): the summary of a model's layers, and
merging low-rank layers back into dense ones."""

import pytest
import torch
from torch import nn

from lowrank_layers import (
    AdaptiveLowRankLinear,
    DynamicLowRankLinear,
    LowRankLinear,
    convert_model,
    lowrank_summary,
    merge_to_dense,
)

from .helpers import rel_err


def mixed_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32), AdaptiveLowRankLinear(32, 32),
        DynamicLowRankLinear(32, 32, active_rank=8, max_rank=16), nn.Linear(32, 4),
    )  # fmt: skip
    convert_model(model, rank=8, include=["0", "2"], guard=False)
    return model


def test_summary_lists_kinds_ranks_and_parameters():
    model = mixed_model()
    summary = lowrank_summary(model)
    rows = {x.name: (x.kind, x.rank, x.max_rank, x.params, x.dense_params) for x in summary.layers}
    assert rows == {
        "0": ("LowRankLinear", 8, 8, 8 * (64 + 64 + 1), 64 * 64),
        "2": ("LowRankLinear", 8, 8, 8 * (64 + 32 + 1), 64 * 32),
        "3": ("AdaptiveLowRankLinear", None, None, 32 * 32, 32 * 32),
        "4": ("DynamicLowRankLinear", 8, 16, 16 * (32 + 32 + 1), 32 * 32),
    }
    assert summary.kinds == {
        "LowRankLinear": 2, "AdaptiveLowRankLinear (dense)": 1, "DynamicLowRankLinear": 1,
    }  # fmt: skip
    assert (summary.dense_linears, summary.dense_linear_params) == (1, 32 * 4)
    assert summary.model_params == sum(p.numel() for p in model.parameters())
    text = str(summary)
    assert "AdaptiveLowRankLinear (dense)" in text.splitlines()[4]
    assert text.splitlines()[-1].startswith("2 LowRankLinear, 1 AdaptiveLowRankLinear (dense)")
    assert summary.to_dict()["totals"]["params"] == summary.params
    empty = lowrank_summary(nn.Linear(3, 3))
    assert empty.layers == [] and empty.dense_linears == 1
    with pytest.raises(TypeError, match=r"model must be an nn\.Module, got dict"):
        lowrank_summary({})


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_merge_to_dense_computes_the_same_in_place(gen, mode):
    model = mixed_model()
    model[3].switch_to_lowrank(rank=4)
    getattr(model, mode)()
    shared = model[2]
    model.add_module("again", shared)  # one layer held twice: one Linear replaces it
    x = torch.randn(5, 64, generator=gen)
    with torch.no_grad():
        before = model[:6](x)
    merged = merge_to_dense(model)
    assert merged == {"0": 8, "2": 8, "3": 4, "4": 8}
    assert all(type(m) is nn.Linear for m in list(model)[:6:2])
    assert model.again is model[2]
    assert all(m.training == (mode == "train") for m in model.modules())
    with torch.no_grad():
        assert rel_err(model[:6](x), before) < 1e-6
    with pytest.raises(ValueError, match="merge_to_dense: Sequential holds no low-rank layer"):
        merge_to_dense(model)
    with pytest.raises(ValueError, match=r"model is itself a LowRankLinear: use "
                       r"model.to_linear\(\)"):  # fmt: skip
        merge_to_dense(LowRankLinear(8, 8, 2))


def test_merge_keeps_frozen_weights_frozen():
    model = nn.Sequential(LowRankLinear(16, 16, 4))
    model.requires_grad_(False)
    merge_to_dense(model)
    assert not model[0].weight.requires_grad and not model[0].bias.requires_grad
