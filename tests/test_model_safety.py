"""Conversions that must never break a model: Conv1D, fused experts, hooks and
parametrizations, failing layers, the optimizer check, merging back and the summary, and
the errors a new user meets. Tiny models built from transformers configs."""

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.utils.prune
from torch import nn

from lowrank_layers import (
    AdaptiveLowRankLinear,
    DynamicLowRankLinear,
    LowRankLinear,
    allocate_ranks,
    convert_model,
    factorize,
    lowrank_summary,
    merge_to_dense,
    switch_to_lowrank,
)
from lowrank_layers.factorize import NONFINITE_REASON
from lowrank_layers.linears import as_linear, is_conv1d, linear_weight
from lowrank_layers.policy import resolve_rank

from .helpers import rel_err, tiny_llama

transformers = pytest.importorskip("transformers")


def tiny_gpt2(seed: int = 0) -> nn.Module:
    config = transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=32, bos_token_id=0,
        eos_token_id=0,
    )  # fmt: skip
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(config).eval()


def tiny_mixtral(seed: int = 0) -> nn.Module:
    config = transformers.MixtralConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, vocab_size=64, num_local_experts=4, num_experts_per_tok=2,
    )  # fmt: skip
    torch.manual_seed(seed)
    return transformers.MixtralForCausalLM(config).eval()


def tiny_bart(seed: int = 0) -> nn.Module:
    config = transformers.BartConfig(
        d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=64,
        max_position_embeddings=32,
    )  # fmt: skip
    torch.manual_seed(seed)
    return transformers.BartForConditionalGeneration(config).eval()


def tokens(gen: torch.Generator, shape=(2, 8), vocab: int = 64) -> torch.Tensor:
    return torch.randint(1, vocab, shape, generator=gen)


# ------------------------------------------------------------------------------------------
# Conv1D
# ------------------------------------------------------------------------------------------


def conv1d_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if is_conv1d(m)}


def test_conv1d_view_shares_storage_and_computes_the_same(gen):
    model = tiny_gpt2()
    conv = model.transformer.h[0].mlp.c_fc
    view = as_linear(conv)
    assert (view.in_features, view.out_features) == (32, 128)
    assert view.weight.data_ptr() == conv.weight.data_ptr()
    assert torch.equal(linear_weight(conv), conv.weight.t())
    x = torch.randn(3, 5, 32, generator=gen)
    torch.testing.assert_close(view(x), conv(x), rtol=1e-6, atol=1e-6)
    plain = nn.Linear(4, 4)
    assert as_linear(plain) is plain and linear_weight(plain) is plain.weight


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_gpt2_conv1d_layers_convert_with_the_same_outputs_at_their_exact_rank(gen, mode):
    model = tiny_gpt2()
    with torch.no_grad():  # give each Conv1D weight an exact rank of 4: factors reproduce it
        for conv in conv1d_layers(model).values():
            nx, nf = conv.weight.shape
            a, b = torch.randn(nx, 4, generator=gen), torch.randn(4, nf, generator=gen)
            conv.weight.copy_(a @ b / 8)
    getattr(model, mode)()
    torch.manual_seed(0)
    x = tokens(gen)
    with torch.no_grad():
        before = model(x).logits if mode == "eval" else None
    report = convert_model(model, rank=4, exclude=["lm_head"])
    assert len(report.converted) == 8 and not report.skipped
    by_name = {r.name: r for r in report.layers}
    assert (by_name["transformer.h.0.attn.c_attn"].in_features,
            by_name["transformer.h.0.attn.c_attn"].out_features) == (32, 96)  # fmt: skip
    assert (by_name["transformer.h.0.mlp.c_proj"].in_features,
            by_name["transformer.h.0.mlp.c_proj"].out_features) == (128, 32)  # fmt: skip
    assert all(r.relative_error < 1e-5 for r in report.converted)
    assert not conv1d_layers(model)
    assert all(m.training == (mode == "train") for m in model.modules())
    if mode == "eval":
        with torch.no_grad():
            torch.testing.assert_close(model(x).logits, before, rtol=1e-4, atol=1e-4)
    else:  # trains: gradients reach the factors
        model(x, labels=x).loss.backward()
        layer = model.transformer.h[0].attn.c_attn
        assert isinstance(layer, LowRankLinear) and layer.U.grad is not None


def test_gpt2_converts_activation_aware_and_generates(gen):
    model = tiny_gpt2()
    batches = [tokens(gen, (4, 16)) for _ in range(2)]
    report = convert_model(model, param_ratio=0.5, exclude=["lm_head"], calibration=batches)
    assert len(report.converted) == 8
    assert all(r.output_error is not None and r.output_error < 1 for r in report.converted)
    out = model.generate(tokens(gen, (1, 4)), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 7)


def test_gpt2_converts_under_a_budget():
    model = tiny_gpt2()
    report = convert_model(model, budget=0.5, exclude=["lm_head"])
    assert len(report.converted) == 8
    assert report.params_after <= 0.5 * report.params_before


# ------------------------------------------------------------------------------------------
# fused experts, other architectures
# ------------------------------------------------------------------------------------------


def test_fused_expert_tensors_are_named_with_their_parameter_count(gen):
    model = tiny_mixtral()
    report = convert_model(model, param_ratio=0.5)
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
    config = transformers.Qwen2MoeConfig(
        hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
        shared_expert_intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, vocab_size=64, num_experts=4, num_experts_per_tok=2,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.Qwen2MoeForCausalLM(config).eval()
    report = convert_model(model, param_ratio=0.5, exclude=["lm_head"])
    fused = [r for r in report.skipped if r.reason.startswith("fused 3-D expert tensors")]
    assert [r.name for r in fused] == ["model.layers.0.mlp.experts"]
    assert fused[0].params_before == sum(
        p.numel() for p in model.model.layers[0].mlp.experts.parameters()
    )
    assert any(r.name.endswith("shared_expert.gate_proj") for r in report.converted)
    gate = {r.name: r.reason for r in report.skipped}["model.layers.0.mlp.shared_expert_gate"]
    assert gate == "param_ratio=0.5 is below rank 1 of a 1x32 weight (34 of 32 parameters)"


@pytest.mark.parametrize("build", [tiny_bart, tiny_llama], ids=["bart", "llama"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_converted_transformers_models_run_forward_and_backward(gen, build, mode):
    model = build()
    getattr(model, mode)()
    report = convert_model(model, param_ratio=0.5)
    assert report.converted
    x = tokens(gen)
    out = model(input_ids=x, labels=x)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = [m.U.grad for m in model.modules() if isinstance(m, LowRankLinear)]
    assert grads and all(g is not None for g in grads)


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
    report = convert_model(model, rank=2)
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


def test_a_nonfinite_weight_is_skipped_by_the_rule_convert_checkpoint_uses(gen):
    for kwargs in ({"rank": 2}, {"budget": 0.5}):
        model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16))
        with torch.no_grad():
            model[1].weight[3, 4] = float("nan")
        report = convert_model(model, **kwargs)
        assert [r.reason for r in report.layers] == [None, NONFINITE_REASON, None]
        assert type(model[1]) is nn.Linear
        assert isinstance(model[0], LowRankLinear) and isinstance(model[2], LowRankLinear)


def test_a_failure_midway_leaves_the_model_untouched(monkeypatch):
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16))
    originals = list(model)
    calls = []
    real = LowRankLinear.from_linear.__func__

    def failing(cls, linear, **kwargs):
        calls.append(linear)
        if len(calls) == 2:
            raise RuntimeError("out of memory (simulated)")
        return real(cls, linear, **kwargs)

    monkeypatch.setattr(LowRankLinear, "from_linear", classmethod(failing))
    with pytest.raises(RuntimeError, match="simulated"):
        convert_model(model, rank=2)
    assert len(calls) == 2
    assert all(a is b for a, b in zip(model, originals, strict=True))


def test_the_root_module_cannot_be_converted_in_place():
    for root in (nn.Linear(64, 64), LowRankLinear(64, 64, 4)):
        expected = r"model is itself a \w+: the root module cannot be replaced in place"
        with pytest.raises(ValueError, match=expected + r".*from_linear.*Sequential\(layer\)"):
            convert_model(root, rank=4)


# ------------------------------------------------------------------------------------------
# training safety
# ------------------------------------------------------------------------------------------


def adaptive_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(AdaptiveLowRankLinear(16, 16, rank=4), nn.ReLU(),
                         AdaptiveLowRankLinear(16, 16, rank=4))  # fmt: skip


def test_switch_refuses_an_optimizer_without_the_layers_and_switches_nothing():
    model = adaptive_model()
    other = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"the optimizer holds no weight of 2 of the 2 layers "
                       r"to switch \(0, 2\): their factors would never train"):  # fmt: skip
        switch_to_lowrank(model, other)
    assert not model[0].is_lowrank and not model[2].is_lowrank
    partial = torch.optim.SGD(model[0].parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"no weight of 1 of the 2 layers to switch \(2\)"):
        switch_to_lowrank(model, partial)
    with pytest.raises(TypeError, match=r"optimizer must be a torch.optim.Optimizer or None, "
                       r"got list"):  # fmt: skip
        switch_to_lowrank(model, [model[0].weight])


def test_switch_accepts_frozen_layers_left_out_of_the_optimizer():
    model = adaptive_model()
    model[2].requires_grad_(False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    results = switch_to_lowrank(model, opt)
    assert set(results) == {"0", "2"}
    held = {id(p) for p in opt.param_groups[0]["params"]}
    assert id(model[0].U) in held and id(model[2].U) not in held


# ------------------------------------------------------------------------------------------
# whole-model tools
# ------------------------------------------------------------------------------------------


def mixed_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32), AdaptiveLowRankLinear(32, 32),
        DynamicLowRankLinear(32, 32, active_rank=8, max_rank=16), nn.Linear(32, 4),
    )  # fmt: skip
    convert_model(model, rank=8, include=["0", "2"])
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


# ------------------------------------------------------------------------------------------
# the errors and rough edges a new user met
# ------------------------------------------------------------------------------------------


def test_ranks_may_be_numpy_or_tensor_integers(gen):
    W = torch.randn(16, 12, generator=gen)
    expected = factorize(W, rank=4)
    for rank in (np.int64(4), torch.tensor(4), np.int32(4)):
        assert resolve_rank(16, 12, rank=rank) == 4
        got = factorize(W, rank=rank)
        assert torch.equal(got.U, expected.U)
        report = convert_model(nn.Sequential(nn.Linear(12, 16)), rank=rank)
        assert report.converted[0].rank == 4
        assert LowRankLinear(12, 16, rank).rank == 4
        dynamic = DynamicLowRankLinear(12, 16, active_rank=rank, max_rank=np.int64(8))
        assert (dynamic.rank, dynamic.max_rank) == (4, 8)
        dynamic.set_rank(rank - 1)
        assert dynamic.rank == 3 and type(dynamic.rank) is int
    for bad in (torch.tensor(4.0), torch.tensor([4]), np.float64(4.0), True):
        with pytest.raises(TypeError, match=r"rank must be an int >= 1, got"):
            resolve_rank(16, 12, rank=bad)


def test_factorize_of_a_parameter_carries_no_graph():
    layer = nn.Linear(12, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        factors = factorize(layer.weight, rank=4)
        LowRankLinear.from_factors(factors, bias=layer.bias.detach())
    assert all(t.grad_fn is None and not t.requires_grad for t in (factors.U, factors.S, factors.V))


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
    with pytest.raises(ValueError, match=r"allocation must be one of 'minimax', 'greedy', "
                       r"got 'x'"):  # fmt: skip
        convert_model(nn.Sequential(nn.Linear(8, 8)), budget=0.5, allocation="x")


# ------------------------------------------------------------------------------------------
# checkpoints of real architectures: Conv1D orientation, experts, model folders
# ------------------------------------------------------------------------------------------


def saved(model: nn.Module, folder) -> str:
    model.save_pretrained(folder)
    return str(folder)


def test_convert_checkpoint_orients_gpt2_conv1d_and_loads_into_gpt2(tmp_path, gen):
    from lowrank_layers import convert_checkpoint, load_lowrank

    model = tiny_gpt2()
    src = saved(model, tmp_path / "gpt2")
    report = convert_checkpoint(src, tmp_path / "out", rank=4)
    rows = {r.name: r for r in report.converted}
    assert len(rows) == 8
    assert (rows["transformer.h.0.attn.c_attn"].in_features,
            rows["transformer.h.0.attn.c_attn"].out_features) == (32, 96)  # fmt: skip
    assert (rows["transformer.h.1.mlp.c_proj"].in_features,
            rows["transformer.h.1.mlp.c_proj"].out_features) == (128, 32)  # fmt: skip
    loaded = load_lowrank(transformers.GPT2LMHeadModel(model.config), tmp_path / "out").eval()
    assert isinstance(loaded.transformer.h[0].mlp.c_fc, LowRankLinear)
    convert_model(model, rank=4, exclude=["lm_head"])  # the same factors, from the model
    x = tokens(gen)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=1e-5, atol=1e-5)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["quantization_config"]["layers"]["transformer.h.0.attn.c_attn"]["rank"] == 4


def test_convert_checkpoint_does_not_guess_conv1d_without_a_config(tmp_path):
    from lowrank_layers import convert_checkpoint

    src = Path(saved(tiny_gpt2(), tmp_path / "gpt2")) / "model.safetensors"
    bare = tmp_path / "bare" / "gpt2.safetensors"
    bare.parent.mkdir()
    bare.write_bytes(src.read_bytes())
    with pytest.raises(ValueError, match=r"transformer.h.0.attn.c_attn.weight is named like a "
                       r"GPT-2 Conv1D weight.*pass conv1d=True"):  # fmt: skip
        convert_checkpoint(bare, tmp_path / "a.safetensors", rank=4)
    report = convert_checkpoint(bare, tmp_path / "b.safetensors", rank=4, conv1d=True)
    assert {r.name: r.out_features for r in report.converted}["transformer.h.0.mlp.c_fc"] == 128
    plain = convert_checkpoint(bare, tmp_path / "c.safetensors", rank=4, conv1d=False)
    assert {r.name: r.out_features for r in plain.converted}["transformer.h.0.mlp.c_fc"] == 32
    with pytest.raises(TypeError, match=r"conv1d must be a regex string or a list"):
        convert_checkpoint(bare, tmp_path / "d.safetensors", rank=4, conv1d=3)


def test_the_cli_converts_gpt2_the_right_way_round(tmp_path, capsys):
    from lowrank_layers.cli import main

    src = saved(tiny_gpt2(), tmp_path / "gpt2")
    assert main(["convert", src, str(tmp_path / "out"), "--rank", "4", "--no-progress"]) == 0
    table = capsys.readouterr().out
    row = next(line for line in table.splitlines() if line.startswith("transformer.h.0.mlp.c_fc"))
    assert row.split()[1:4] == ["LowRankLinear", "32", "128"]
    bare = tmp_path / "bare" / "gpt2.safetensors"  # no config.json beside it
    bare.parent.mkdir()
    bare.write_bytes((Path(src) / "model.safetensors").read_bytes())
    bare = str(bare)
    assert main(["convert", bare, str(tmp_path / "x.safetensors"), "--rank", "4"]) == 2
    assert "named like a GPT-2 Conv1D weight" in capsys.readouterr().err
    out = str(tmp_path / "y.safetensors")
    assert main(["convert", bare, out, "--rank", "4", "--conv1d", "gpt2", "--no-progress"]) == 0


def test_convert_checkpoint_keeps_experts_loadable_and_reports_fused_tensors(tmp_path, gen):
    from safetensors.torch import save_file

    from lowrank_layers import convert_checkpoint, load_pretrained

    model = tiny_mixtral()
    src = saved(model, tmp_path / "moe")  # transformers 5 writes block_sparse_moe.experts.<i>
    report = convert_checkpoint(src, tmp_path / "out", param_ratio=0.5, exclude=["lm_head"])
    renamed = [r for r in report.skipped if ".block_sparse_moe." in r.name]
    assert len(renamed) == 13  # 12 expert matrices and the router
    assert all(r.reason.startswith("transformers converts this tensor when loading the model")
               for r in renamed)  # fmt: skip
    projections = {r.name.rsplit(".", 1)[-1] for r in report.converted}
    assert projections == {"q_proj", "k_proj", "v_proj", "o_proj"}
    loaded = load_pretrained(tmp_path / "out")  # transformers renames the rest on load
    assert isinstance(loaded.model.layers[0].self_attn.q_proj, LowRankLinear)
    reference = tiny_mixtral()
    convert_model(reference, param_ratio=0.5, exclude=["lm_head"])
    x = tokens(gen)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, reference(x).logits, rtol=1e-5, atol=1e-5)
    # fused tensors in a checkpoint are reported with their size
    fused = tmp_path / "fused.safetensors"
    save_file({"layers.0.experts.gate_up_proj": torch.zeros(4, 128, 32),
               "layers.0.proj.weight": torch.randn(64, 64, generator=gen)}, fused)  # fmt: skip
    rows = {r.name: r for r in convert_checkpoint(fused, tmp_path / "f.safetensors", rank=4).layers}
    assert rows["layers.0.experts.gate_up_proj"].params_before == 4 * 128 * 32
    assert rows["layers.0.experts.gate_up_proj"].reason == (
        "fused 3-D expert tensor (4x128x32) is not converted"
    )
    assert rows["layers.0.proj"].converted


def sentence_folder(tmp_path) -> Path:
    """A sentence-transformers-like folder around a tiny BERT."""
    config = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        vocab_size=64, max_position_embeddings=32,
    )  # fmt: skip
    torch.manual_seed(0)
    folder = Path(saved(transformers.BertModel(config).eval(), tmp_path / "st"))
    (folder / "modules.json").write_text('[{"idx": 0, "path": ""}]')
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    return folder


def test_the_cli_output_folder_keeps_every_file_and_reloads_low_rank(tmp_path, gen):
    from lowrank_layers import convert_checkpoint, load_pretrained

    src = sentence_folder(tmp_path)
    convert_checkpoint(src, tmp_path / "out", param_ratio=0.5)
    out = tmp_path / "out"
    assert (out / "modules.json").exists() and (out / "1_Pooling" / "config.json").exists()
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in src.iterdir())
    model = load_pretrained(out)
    assert not model.training
    assert isinstance(model.encoder.layer[0].intermediate.dense, LowRankLinear)
    again = transformers.AutoModel.from_pretrained(out)  # lowrank_layers is imported here
    x = tokens(gen)
    with torch.no_grad():
        assert torch.equal(again.eval()(x).last_hidden_state, model(x).last_hidden_state)


@pytest.mark.slow
def test_a_dense_load_of_a_cli_folder_fails_loudly(tmp_path):
    import subprocess
    import sys

    from lowrank_layers import convert_checkpoint

    convert_checkpoint(sentence_folder(tmp_path), tmp_path / "out", param_ratio=0.5)
    code = (
        "import sys, transformers\n"
        f"transformers.AutoModel.from_pretrained({str(tmp_path / 'out')!r})\n"
        "assert 'lowrank_layers' not in sys.modules\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode != 0
    assert "size mismatch" in run.stderr or "mismatched" in run.stderr
