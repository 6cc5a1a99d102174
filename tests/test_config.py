"""ConversionConfig and HealConfig: one validated object for what a conversion does."""

import dataclasses

import pytest
import torch
from torch import nn

from lowrank_layers import ConversionConfig, HealConfig, RankPolicy, convert_model
from lowrank_layers.config import config_from


def test_the_keyword_form_of_the_policy_is_folded_into_policy():
    config = ConversionConfig(param_ratio=0.5, include=["q_proj", "v_proj"])
    assert config.policy == RankPolicy(param_ratio=0.5)
    assert config.include == ("q_proj", "v_proj")  # lists become tuples: the object is frozen
    assert config.rule == "param_ratio=0.5"
    assert ConversionConfig(policy=RankPolicy(rank=4)) == ConversionConfig(rank=4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.budget = 0.5  # type: ignore[misc]
    plan = {"a": 3, "b": None}
    frozen = ConversionConfig(ranks=plan)
    plan["a"] = 9  # the config keeps its own copy, read-only
    assert frozen.ranks["a"] == 3 and frozen.rule == "ranks"
    with pytest.raises(TypeError):
        frozen.ranks["a"] = 1  # type: ignore[index]
    assert ConversionConfig().rule is None


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"rank": 4, "budget": 0.5}, ValueError, r"give one rank rule .* got policy=rank=4 and "),
        ({"budget": 0.5, "ranks": {}}, ValueError, r"got budget=0\.5 and ranks=\{\.\.\.\}"),
        ({"budget": 1.5}, ValueError, r"budget must be in \(0, 1\], got 1\.5"),
        ({"ranks": [2]}, TypeError, r"ranks must be a mapping \{name: rank or None\}"),
        ({"rank": 4, "allocation": "even"}, ValueError, r"allocation must be one of 'auto'"),
        ({"rank": 4, "allocation": "loss"}, ValueError, r"allocation='loss' shares a budget"),
        ({"rank": 4, "include": "("}, ValueError, r"include is not a valid regular expression"),
        ({"rank": 4, "exclude": 3}, TypeError, r"exclude must be a regex string or a list"),
        ({"rank": 4, "filter_fn": "x"}, TypeError, r"filter_fn must be callable, got 'x'"),
        ({"rank": 4, "threshold": -1}, ValueError, r"threshold must be an int >= 0, got -1"),
        ({"rank": 4, "seed": 1.5}, ValueError, r"seed must be an int >= 0, got 1\.5"),
        ({"rank": 4, "embeddings": "yes"}, TypeError, r"embeddings must be a bool, got 'yes'"),
        ({"rank": 4, "method": "qr"}, ValueError, r"method must be one of 'svd', 'randomized'"),
        ({"rank": 4, "balance": "x"}, ValueError, r"balance must be one of 'none', 'rownorm'"),
        ({"rank": 4, "layer": "lora"}, ValueError, r"layer must be one of 'lowrank', 'adaptive'"),
        ({"rank": 4, "min_speedup": 0}, ValueError, r"min_speedup"),
        ({"rank": 4, "speedup_tokens": 0}, ValueError, r"speedup_tokens"),
        ({"budget": 0.5, "layer": "adaptive"}, ValueError, r"target_speedup apply to layer="),
        ({"rank": 4, "layer": "adaptive", "seed": 2}, ValueError, r"factorized later: pass"),
        ({"rank": 4, "layer": "adaptive", "min_speedup": 1.0}, ValueError, r"stays dense until"),
        ({"rank_ratio": 2.0}, ValueError, r"rank_ratio must be in \(0, 1\], got 2\.0"),
    ],
)
def test_a_bad_field_is_refused_when_the_config_is_made(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        ConversionConfig(**kwargs)


def test_config_from_takes_one_form():
    config = ConversionConfig(rank=4)
    assert config_from(config, {}, caller="f") is config
    assert config_from(None, {"rank": 4}, caller="f") == config
    with pytest.raises(ValueError, match=r"f: give config= or its fields as keywords, not both"):
        config_from(config, {"exclude": ["x"]}, caller="f")
    with pytest.raises(TypeError, match=r"f: config must be a ConversionConfig, got dict"):
        config_from({"rank": 4}, {}, caller="f")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"f got unexpected keyword 'rnak'; it takes a "):
        config_from(None, {"rnak": 4}, caller="f")


def test_selection_by_name():
    config = ConversionConfig(rank=2, include=r"layers\..*", exclude=["lm_head"])
    assert config.selects("layers.0.q_proj")
    assert not config.selects("lm_head") and not config.selects("head")
    assert config.keeps_embedding("model.embed_tokens") and config.keeps_embedding("wte")
    assert not config.keeps_embedding("layers.0.q_proj")
    assert not ConversionConfig(rank=2, embeddings=True).keeps_embedding("model.embed_tokens")


def test_a_linear_named_like_an_embedding_is_reported_as_kept():
    model = nn.Sequential()
    model.add_module("embed_proj", nn.Linear(32, 32))
    model.add_module("out", nn.Linear(32, 32))
    report = convert_model(model, rank=4, guard=False)  # 32x32 layers: too small for the guard
    reasons = {layer.name: layer.reason for layer in report.layers}
    assert reasons["out"] is None
    assert (
        "named like an embedding (embed_proj): kept unless embeddings=True" in reasons["embed_proj"]
    )
    assert type(model.embed_proj) is nn.Linear
    convert_model(model, rank=4, embeddings=True, include=["embed_proj"], guard=False)
    assert type(model.embed_proj) is not nn.Linear


def test_one_config_converts_the_same_through_each_entry_point(tmp_path):
    """convert_model and convert_checkpoint with one config give the same factors."""
    from safetensors.torch import save_file

    from lowrank_layers import convert_checkpoint, load_lowrank

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 64), nn.GELU(), nn.Linear(64, 48))
    save_file(model.state_dict(), tmp_path / "dense.safetensors")
    # the output layer excluded by name: only convert_model sees that it is the last one
    config = ConversionConfig(param_ratio=0.4, method="randomized", seed=3, exclude=["2"])
    converted = nn.Sequential(nn.Linear(48, 64), nn.GELU(), nn.Linear(64, 48))
    converted.load_state_dict(model.state_dict())
    report = convert_model(converted, config)
    assert [layer.name for layer in report.converted] == ["0"]
    convert_checkpoint(tmp_path / "dense.safetensors", tmp_path / "low.safetensors", config)
    loaded = load_lowrank(
        nn.Sequential(nn.Linear(48, 64), nn.GELU(), nn.Linear(64, 48)), tmp_path / "low.safetensors"
    )
    for a, b in zip(converted.state_dict().values(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_heal_config_is_validated_when_made():
    assert HealConfig(seconds=60).mode == "end_to_end"
    with pytest.raises(ValueError, match=r"heal: give steps, seconds or both"):
        HealConfig()
    with pytest.raises(ValueError, match=r"heal: mode must be one of end_to_end, blockwise"):
        HealConfig(steps=1, mode="layerwise")
    with pytest.raises(ValueError, match=r"lr"):
        HealConfig(steps=1, lr=-1.0)
