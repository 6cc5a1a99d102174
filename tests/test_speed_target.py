"""compress(target_speedup=...): the least-loss plan whose modelled speed-up of the
converted layers reaches a target, instead of a parameter budget."""

import pytest
import torch
from torch import nn

from lowrank_layers import ConversionConfig, compress, convert_model
from lowrank_layers.allocate import allocate_loss_aware, layer_seconds
from lowrank_layers.sensitivity import Sensitivity


def random_sensitivity(out_f: int, in_f: int, gen: torch.Generator) -> Sensitivity:
    X = torch.randn(4 * in_f, in_f, generator=gen, dtype=torch.float64)
    X = X * torch.logspace(0, -2, in_f, dtype=torch.float64)  # a decaying spectrum
    Y = torch.randn(4 * out_f, out_f, generator=gen, dtype=torch.float64)
    return Sensitivity(X.mT @ X / X.shape[0], Y.mT @ Y / Y.shape[0], X.shape[0])


@pytest.fixture
def layers(gen):
    torch.manual_seed(0)
    mods = {f"l{i}": nn.Linear(384, 384) for i in range(3)}
    sens = {n: random_sensitivity(384, 384, gen) for n in mods}
    return mods, sens


def modelled_speedup(mods, ranks, tokens=1) -> float:
    dense = sum(layer_seconds(384, 384, None, tokens, torch.float32) for _ in mods)
    planned = sum(layer_seconds(384, 384, ranks[n], tokens, torch.float32) for n in mods)
    return dense / planned


def test_the_plan_reaches_the_target_and_a_higher_target_costs_more_loss(layers):
    mods, sens = layers
    losses = []
    for target in (1.1, 1.25, 1.4):
        plan = allocate_loss_aware(mods, sens, None, target_speedup=target)
        assert plan.predicted_speedup >= target
        assert plan.predicted_speedup == pytest.approx(modelled_speedup(mods, plan.ranks))
        losses.append(sum(
            plan.options[n].loss[plan.options[n].ranks.index(r)] for n, r in plan.ranks.items()
        ))  # fmt: skip
    assert losses[0] <= losses[1] <= losses[2] and losses[0] < losses[2]


def test_the_speed_target_is_priced_at_its_token_count(layers):
    """Each plan reaches the target at its own token count, and the counts price ranks
    differently (decoding pays per call, a batch per FLOP)."""
    mods, sens = layers
    decode = allocate_loss_aware(mods, sens, None, target_speedup=1.2, tokens=1)
    batch = allocate_loss_aware(mods, sens, None, target_speedup=1.2, tokens=1024)
    assert batch.predicted_speedup >= 1.2
    assert modelled_speedup(mods, batch.ranks, tokens=1024) >= 1.2
    assert modelled_speedup(mods, decode.ranks, tokens=1) >= 1.2
    assert batch.ranks != decode.ranks


def test_speed_target_errors(layers):
    mods, sens = layers
    with pytest.raises(ValueError, match="give budget= or target_speedup=, exactly one"):
        allocate_loss_aware(mods, sens, 0.5, target_speedup=1.3)
    with pytest.raises(ValueError, match="give budget= or target_speedup=, exactly one"):
        allocate_loss_aware(mods, sens, None)
    with pytest.raises(ValueError, match=r"target_speedup must be a number above 1 .* got 1"):
        allocate_loss_aware(mods, sens, None, target_speedup=1)
    with pytest.raises(ValueError, match=r"target_speedup=10.0: the fastest candidates of "
                       r"these layers reach 1\.\d\dx \(modelled, at 1 token"):  # fmt: skip
        allocate_loss_aware(mods, sens, None, target_speedup=10.0)
    for bad in (0.9, True, "2"):
        with pytest.raises(ValueError, match="target_speedup must be a number above 1"):
            ConversionConfig(target_speedup=bad)
    with pytest.raises(ValueError, match=r"give one rank rule .* budget=0.5 and target_speedup"):
        ConversionConfig(budget=0.5, target_speedup=1.3)
    with pytest.raises(ValueError, match="allocation='uniform' shares a parameter budget"):
        ConversionConfig(target_speedup=1.3, allocation="uniform")
    assert ConversionConfig(target_speedup=1.3).rule == "target_speedup=1.3"
    with pytest.raises(ValueError, match=r"call compress\(model, calibration, target_speedup=1.3"):
        convert_model(nn.Sequential(nn.Linear(512, 512)), target_speedup=1.3)


def test_compress_with_a_speed_target(gen):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        hidden_size=192, intermediate_size=768, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=64,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    batches = [{"input_ids": torch.randint(0, 64, (4, 32), generator=gen)} for _ in range(2)]
    report = compress(model, batches, target_speedup=1.2, exclude=["lm_head"])
    assert report.predicted_speedup >= 1.2 and report.target_speedup == 1.2
    assert report.speedup_tokens == 1
    assert "speed target 1.2x at 1 token(s) per call" in str(report)
    converted = {x.name for x in report.conversion.converted}
    assert converted  # something had to change to be faster
