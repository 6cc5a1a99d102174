"""Which modules ``convert_model`` converts (``lowrank_layers.targets``), and the reason
given for each it leaves: fused expert tensors, hooks and parametrizations, an
uninitialised LazyLinear, the root module."""

import pytest
import torch
import torch.nn.utils.prune
from torch import nn

from lowrank_layers import LowRankLinear, convert_model

from .helpers import tiny_mixtral, tokens

# ------------------------------------------------------------------------------------------
# fused experts
# ------------------------------------------------------------------------------------------


def test_fused_expert_tensors_are_named_with_their_parameter_count(gen):
    model = tiny_mixtral()
    report = convert_model(model, param_ratio=0.5, guard=False)  # the others too small to gain
    experts = {r.name: r for r in report.skipped}["model.layers.0.mlp.experts"]
    assert experts.kind == "MixtralExperts"
    assert experts.params_before == 4 * 128 * 32 + 4 * 32 * 64
    assert experts.reason == (
        "fused 3-D expert tensors (gate_up_proj 4x128x32, down_proj 4x32x64) are not converted"
    )
    assert model(tokens(gen)).logits.shape == (2, 8, 64)
    with pytest.warns(UserWarning, match=r"1 modules matched but none was converted.*experts"):
        only = convert_model(tiny_mixtral(), param_ratio=0.5, include=r".*experts.*")
    assert [r.name for r in only.layers] == ["model.layers.0.mlp.experts"]


def test_qwen2_moe_experts_are_reported():
    transformers = pytest.importorskip("transformers")
    config = transformers.Qwen2MoeConfig(
        hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
        shared_expert_intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, vocab_size=64, num_experts=4, num_experts_per_tok=2,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.Qwen2MoeForCausalLM(config).eval()
    # 32-wide layers are too small to gain: guard=False converts them
    report = convert_model(model, param_ratio=0.5, exclude=["lm_head"], guard=False)
    fused = [r for r in report.skipped if r.reason.startswith("fused 3-D expert tensors")]
    assert [r.name for r in fused] == ["model.layers.0.mlp.experts"]
    assert fused[0].params_before == sum(
        p.numel() for p in model.model.layers[0].mlp.experts.parameters()
    )
    assert any(r.name.endswith("shared_expert.gate_proj") for r in report.converted)
    gate = {r.name: r.reason for r in report.skipped}["model.layers.0.mlp.shared_expert_gate"]
    assert gate == "param_ratio=0.5 is below rank 1 of a 1x32 weight (34 of 32 parameters)"


# ------------------------------------------------------------------------------------------
# layers that are skipped with their reason
# ------------------------------------------------------------------------------------------


def test_hooks_and_parametrizations_keep_the_layer_dense_with_the_reason():
    model = nn.Sequential(*[nn.Linear(16, 16) for _ in range(6)])
    model[0].register_forward_hook(lambda module, args, out: None)
    model[1].register_forward_pre_hook(lambda module, args: None)
    nn.utils.parametrizations.weight_norm(model[2])
    nn.utils.parametrizations.spectral_norm(model[3])
    torch.nn.utils.prune.l1_unstructured(model[4], "weight", amount=0.5)
    report = convert_model(model, rank=2, guard=False)  # 16x16 layers: the guard keeps them
    reasons = {r.name: r.reason for r in report.layers}
    assert reasons["0"].startswith("it has forward hook ")
    assert "remove them (handle.remove()) before converting" in reasons["0"]
    assert reasons["1"].startswith("it has forward pre-hook ")
    assert reasons["2"].startswith("its weight is parametrized")
    assert "remove_parametrizations" in reasons["3"]
    assert "forward pre-hook L1Unstructured" in reasons["4"]
    assert reasons["5"] is None
    assert isinstance(model[5], LowRankLinear)
    assert all(type(model[i]) is not LowRankLinear for i in range(5))
    assert report.layers[2].params_before == 16 * 16 + 16  # weight_norm's v and g


def test_lazy_linear_is_skipped_with_its_reason():
    with pytest.warns(UserWarning, match="none was converted"):
        report = convert_model(nn.Sequential(nn.LazyLinear(4)), rank=2)
    assert report.layers[0].reason == (
        "the LazyLinear's weight is not initialised yet: run one forward pass first"
    )


def test_the_root_module_cannot_be_converted_in_place():
    for root in (nn.Linear(64, 64), LowRankLinear(64, 64, 4)):
        expected = r"model is itself a \w+: the root module cannot be replaced in place"
        with pytest.raises(ValueError, match=expected + r".*from_linear.*Sequential\(layer\)"):
            convert_model(root, rank=4)


# TwoLayers' layers are too small to gain and its head is the output layer: these tests are
# about exclude=, not the guard
NO_GUARD = {"guard": False}


class TwoLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(32, 64), nn.ReLU())
        self.head = nn.Linear(64, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def test_an_exclude_that_matches_nothing_warns_naming_it():
    import re
    import warnings

    from lowrank_layers import compress

    with pytest.warns(UserWarning, match=r"^exclude 'lm_head' matches no module, so it excludes "
                      r"nothing \(a list holds exact names or dotted suffixes\)"):  # fmt: skip
        report = convert_model(TwoLayers(), rank=4, exclude=["lm_head", "head"], **NO_GUARD)
    assert [r.name for r in report.converted] == ["body.0"]  # 'head' still excluded
    with pytest.warns(UserWarning, match=r"^exclude 'lm_head', 'decoder' matches no module"):
        convert_model(TwoLayers(), rank=4, exclude=["lm_head", "decoder"], **NO_GUARD)
    regex = r"head\..*"
    expected = f"exclude {regex!r} matches no module, so it excludes nothing (a regex must"
    with pytest.warns(UserWarning, match="^" + re.escape(expected)):
        convert_model(TwoLayers(), rank=4, exclude=regex, **NO_GUARD)
    batches = [torch.randn(96, 32, generator=torch.Generator().manual_seed(0))]
    with pytest.warns(UserWarning, match=r"^exclude 'lm_head'") as caught:
        compress(TwoLayers(), batches, budget=0.8, exclude=["lm_head"], **NO_GUARD)
    assert sum(str(w.message).startswith("exclude") for w in caught) == 1  # once, not per stage
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an exclude that matches warns about nothing
        convert_model(TwoLayers(), rank=4, exclude=["head"], **NO_GUARD)
        convert_model(TwoLayers(), rank=4, exclude=r"body\..*", **NO_GUARD)
