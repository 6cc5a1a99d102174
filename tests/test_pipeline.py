"""compress: the stages together, on a tiny causal LM and a plain model."""

import copy

import pytest
import torch
from torch import nn

from lowrank_layers import HealConfig, LowRankLinear, compress

from . import helpers


def tiny_llama(seed: int = 0):
    """Its layers (32 and 64 wide) are too small to gain and the guard would keep them all
    dense: the tests about the stages pass guard=False."""
    return helpers.tiny_llama(layers=3, vocab=64, seed=seed)


token_batches = helpers.token_batches


def linear_params(report) -> tuple[int, int]:
    """(weights kept, weights before) over the layers the conversion considered."""
    before = sum(layer.params_before for layer in report.layers)
    after = sum(layer.params_after for layer in report.layers)
    return after, before


def test_compress_keeps_the_budget_and_reports_every_stage(gen):
    model = tiny_llama()
    calib, held_out = token_batches(8, gen), token_batches(2, gen)
    report = compress(
        model, calib, budget=0.6, exclude=["lm_head"], eval_batches=held_out, guard=False
    )
    after, before = linear_params(report.conversion)
    assert after <= 0.6 * before
    assert set(report.seconds) == {"allocation", "conversion"}
    assert report.plan is not None
    narrowed = {n for cut in report.narrowed.values() for n in cut.mlp.layers}
    assert len(report.plan) + len(narrowed) == 21 and not narrowed & set(report.plan)
    assert report.conversion.propagation.container == "model.layers"
    converted = report.conversion.converted
    # a narrowed MLP's input layers only drop channels: their output layer has the error
    cut = {n for c in report.narrowed.values() for n in c.mlp.inputs}
    measured = [layer for layer in converted if layer.name not in cut]
    assert converted and all(layer.error_data == "held-out" for layer in measured)
    dense = [n for n, r in report.plan.items() if r is None]
    for name in dense:
        assert isinstance(model.get_submodule(name), nn.Linear)
        reason = next(x.reason for x in report.conversion.layers if x.name == name)
        assert "loss-aware allocation" in reason  # why the plan keeps it, not "the plan says so"
    assert "loss-aware plan" in str(report) and "allocation" in str(report)


def test_loss_aware_allocation_beats_uniform_on_the_kl(gen):
    """On the calibration objective itself (KL to the original), the loss-aware plan does
    better than a uniform ratio at the same budget."""
    model = tiny_llama(seed=1)
    calib, held_out = token_batches(16, gen), token_batches(4, gen)

    def kl(m: nn.Module) -> float:
        total = 0.0
        with torch.no_grad():
            for b in held_out:
                p = torch.log_softmax(model(**b).logits, -1)
                q = torch.log_softmax(m(**b).logits, -1)
                total += float((p.exp() * (p - q)).sum(-1).mean())
        return total / len(held_out)

    uniform, aware = copy.deepcopy(model), copy.deepcopy(model)
    compress(uniform, calib, budget=0.7, allocation="uniform", exclude=["lm_head"], guard=False)
    compress(aware, calib, budget=0.7, exclude=["lm_head"], sensitivity_tokens=None, guard=False)
    assert kl(aware) < kl(uniform)


def test_compress_heals(gen):
    model = tiny_llama(seed=2)
    calib, held_out = token_batches(8, gen), token_batches(2, gen)
    report = compress(
        model, calib, budget=0.5, allocation="uniform", exclude=["lm_head"],
        eval_batches=held_out, heal=HealConfig(steps=30, lr=1e-3), guard=False,
    )  # fmt: skip
    assert report.heal is not None and report.heal.steps == 30
    assert report.heal.after < report.heal.before
    assert "heal" in report.seconds


def test_compress_errors_leave_the_model_unchanged(gen):
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
    state = copy.deepcopy(model.state_dict())
    x = [torch.randn(64, 16, generator=gen)]
    with pytest.raises(ValueError, match=r"budget must be in \(0, 1\], got 1\.5"):
        compress(model, x, budget=1.5)
    with pytest.raises(ValueError, match=r"compress: allocation='greedy' shares the budget from"):
        compress(model, x, budget=0.5, allocation="greedy")
    with pytest.raises(ValueError, match=r"compress needs a rank rule: budget="):
        compress(model, x)
    with pytest.raises(ValueError, match=r"calibration must be a non-empty list of batches"):
        compress(model, [], budget=0.5)
    with pytest.raises(TypeError, match=r"compress: heal must be a HealConfig or None"):
        compress(model, x, budget=0.5, heal={"steps": 3})
    with pytest.raises(TypeError, match=r"compress got unexpected keyword 'heal_steps'"):
        compress(model, x, budget=0.5, heal_steps=3)
    with pytest.raises(ValueError, match=r"budget=0\.02 keeps .* but the smallest candidate"):
        compress(model, x, budget=0.02, guard=False)  # the guard keeps both layers dense
    with pytest.raises(ValueError, match=r"heal: mode must be one of end_to_end, blockwise"):
        HealConfig(steps=3, mode="layerwise")
    with pytest.raises(ValueError, match=r"heal: steps must be a positive int or None, got 0"):
        HealConfig(steps=0)
    with pytest.raises(ValueError, match=r"heal: give steps, seconds or both"):
        HealConfig()
    with pytest.raises(ValueError, match=r"objective must be one of 'auto', 'kl'"):
        compress(model, x, budget=0.8, objective="l1")
    llama = tiny_llama()
    llama_state = copy.deepcopy(llama.state_dict())
    ids = torch.randint(0, 64, (2, 8), generator=gen)
    masked = [{"input_ids": ids, "attention_mask": torch.zeros_like(ids)}]
    with pytest.raises(ValueError, match=r"no token reached the layers"):
        compress(llama, masked, budget=0.8, guard=False)
    with pytest.raises(ValueError, match=r"yielded no tokens"):
        compress(llama, masked, budget=0.8, allocation="uniform", guard=False)
    assert all(isinstance(m, nn.Linear) for m in model if not isinstance(m, nn.GELU))
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert not any(isinstance(m, LowRankLinear) for m in llama.modules())
    assert all(torch.equal(llama_state[k], v) for k, v in llama.state_dict().items())


def test_compress_an_encoder_and_a_model_without_blocks(gen):
    """Hidden-state outputs (the Gaussian probe, cosine healing) and a model whose layers are
    in no repeated block: propagation falls back to whitening and says so."""
    bert = helpers.tiny_bert()
    batches = []
    for _ in range(6):
        ids = torch.randint(0, 100, (4, 24), generator=gen)
        mask = torch.ones_like(ids)
        mask[:2, 18:] = 0  # some padding
        batches.append({"input_ids": ids, "attention_mask": mask})
    report = compress(bert, batches, budget=0.7, heal=HealConfig(steps=3), guard=False)
    after, before = linear_params(report.conversion)
    assert after <= 0.7 * before
    assert report.conversion.propagation.container == "encoder.layer"
    assert "pooler.dense" in report.conversion.propagation.unpropagated
    assert report.heal.objective == "cosine"
    mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
    report = compress(mlp, [torch.randn(128, 16, generator=gen)], budget=0.6, guard=False)
    assert report.conversion.propagation.note.startswith("no repeated blocks")


def test_first_tokens_takes_the_shortest_prefix():
    from lowrank_layers.pipeline import _first_tokens

    ids = torch.zeros(2, 8, dtype=torch.long)
    masked = {"input_ids": ids, "attention_mask": torch.tensor([[1] * 8, [1] * 3 + [0] * 5])}
    batches = [masked, masked, masked]
    assert len(_first_tokens(batches, 11)) == 1
    assert len(_first_tokens(batches, 12)) == 2
    assert len(_first_tokens(batches, 1000)) == 3
    assert _first_tokens(batches, None) is batches


def test_compress_with_nothing_convertible_reports_why(gen):
    """Every matched layer shares its weight: nothing to rank; the report says why."""
    shared = nn.Linear(8, 8)
    model = nn.Sequential(shared, nn.ReLU())
    model.tied = nn.Linear(8, 8)
    model.tied.weight = shared.weight
    with pytest.warns(UserWarning, match=r"2 modules matched but none was converted"):
        report = compress(model, [torch.randn(32, 8, generator=gen)], budget=0.5)
    assert report.plan is None
    assert all("weight shared with" in layer.reason for layer in report.conversion.layers)
