"""The guard (issue 21, items 2 and 6): by default a conversion leaves dense, each with its
reason, the layers it cannot pay for — too small to gain, the model's output layer, a rank
expected to run slower than nn.Linear at every token count, and (in compress) a layer no
gradient of the objective reaches — and ``guard=False`` converts them as before."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from lowrank_layers import ConversionConfig, LowRankLinear, compress, convert_model
from lowrank_layers.checkpoint import read_metadata
from lowrank_layers.cli import main
from lowrank_layers.layer_plan import NO_GRADIENT_REASON
from lowrank_layers.offline import convert_checkpoint
from lowrank_layers.speed import SpeedRule, expected_speedup
from lowrank_layers.targets import output_layer_name

OUTPUT = "the model's output layer"
SMALL = "too small to gain"
SLOWER = "expected to run slower than nn.Linear"


def mlp(head: int = 10) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                         nn.Linear(256, head))  # fmt: skip


def reasons(report) -> dict[str, str | None]:
    return {layer.name: layer.reason for layer in report.layers}


def test_the_output_layer_stays_dense_by_default_and_guard_false_converts_it():
    model = mlp()
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    logits = model(x)
    report = convert_model(model, param_ratio=0.5)
    why = reasons(report)
    assert why["0"] is None and why["2"] is None
    assert why["4"].startswith(f"{OUTPUT}: a rank below its 10 outputs")
    assert "guard=False" in why["4"]
    assert type(model[4]) is nn.Linear
    # the head is the same module, so its contribution is exact: only the hidden layers moved
    assert isinstance(model[0], LowRankLinear) and isinstance(model[2], LowRankLinear)
    assert model(x).shape == logits.shape

    unguarded = mlp()
    report = convert_model(unguarded, param_ratio=0.5, guard=False)
    assert isinstance(unguarded[4], LowRankLinear)
    assert unguarded[4].rank == 0.5 * 256 * 10 // (256 + 10 + 1) == 4  # what it used to do


def test_output_layer_is_the_last_linear_registered():
    model = mlp()
    assert output_layer_name(model) == "4"
    assert output_layer_name(nn.Sequential(nn.ReLU())) is None
    assert output_layer_name(nn.Linear(4, 4)) is None  # the root has no name: nothing to keep

    class Encoder(nn.Module):  # a head defined before the body is still found by order
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Linear(8, 8)
            self.pooler = nn.Linear(8, 8)

    assert output_layer_name(Encoder()) == "pooler"


def test_excluding_the_head_by_name_keeps_the_rest_guarded_the_same():
    guarded = mlp()
    excluded = mlp()
    convert_model(guarded, param_ratio=0.5)
    convert_model(excluded, param_ratio=0.5, exclude=["4"])
    for a, b in zip(guarded.state_dict().values(), excluded.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_too_small_layers_stay_dense_with_the_speed_figures():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                          nn.Linear(16, 512), nn.Linear(512, 512))  # fmt: skip
    report = convert_model(model, rank=1)
    why = reasons(report)
    one_few = expected_speedup(16, 16, 1, 1)
    one_many = expected_speedup(16, 16, 1, 1024)
    assert max(one_few, one_many) < 1.0  # the rule's premise, from the speed model
    assert why["2"] == (
        f"{SMALL}: even rank 1 is expected to run slower than nn.Linear "
        f"({one_few:.2f}x at 1 and {one_many:.2f}x at 1024 tokens per call)"
    )
    assert why["0"] is None and why["4"] is None  # 512x16 at rank 1 pays on a batch
    unguarded = convert_model(model[2:3], rank=1, guard=False)  # a model of one layer
    assert [layer.name for layer in unguarded.converted] == ["2"]  # slicing keeps names


def test_a_rank_slower_at_every_token_count_stays_dense_and_speedup_tokens_moves_the_rule():
    def model() -> nn.Sequential:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(384, 384), nn.ReLU(), nn.Linear(384, 8))

    # param_ratio 0.95 gives a 384x384 weight rank 182: slower decoding and on a batch, by
    # the speed model, though rank 1 would pay
    few, many = (expected_speedup(384, 384, 182, t) for t in (1, 1024))
    assert max(few, many) < 1.0 <= expected_speedup(384, 384, 1, 1)
    why = reasons(convert_model(model(), param_ratio=0.95))
    assert why["0"] == f"{SLOWER}: {few:.2f}x at 1 token and {many:.2f}x at 1024 tokens per call"
    # judged where the user runs it: at 4096 tokens per call rank 182 pays
    assert expected_speedup(384, 384, 182, 4096) >= 1.0
    assert reasons(convert_model(model(), param_ratio=0.95, speedup_tokens=4096))["0"] is None
    assert reasons(convert_model(model(), param_ratio=0.95, guard=False))["0"] is None


def test_a_budget_is_shared_by_the_layers_the_guard_does_not_keep():
    model = mlp()
    sizes = {"0": 64 * 256, "2": 256 * 256}
    report = convert_model(model, budget=0.5)
    assert {layer.name for layer in report.converted} <= set(sizes)
    assert OUTPUT in reasons(report)["4"]
    assert report.params_after <= 0.5 * sum(sizes[layer.name] for layer in report.converted)
    # the budget is of the layers that may change: the head's 2,560 are outside it
    assert report.params_after > 0.5 * sum(sizes.values()) - 2 * (256 + 256 + 64)


def test_a_ranks_plan_is_applied_as_given():
    model = mlp()
    report = convert_model(model, ranks={"0": 8, "2": 8, "4": 2})
    assert {layer.name: layer.rank for layer in report.converted} == {"0": 8, "2": 8, "4": 2}


def test_guard_is_validated_and_in_the_config():
    assert ConversionConfig(rank=2).guard is True
    with pytest.raises(TypeError, match=r"guard must be a bool, got 1"):
        ConversionConfig(rank=2, guard=1)
    with pytest.raises(ValueError, match=r"speedup_tokens must be a positive int, got 0"):
        ConversionConfig(rank=2, speedup_tokens=0)
    config = ConversionConfig(rank=2)
    assert config.speed == SpeedRule(1.0, (1, 1024))
    assert ConversionConfig(rank=2, guard=False).speed is None
    assert ConversionConfig(rank=2, min_speedup=1.5).speed == SpeedRule(1.5, 1)
    assert ConversionConfig(ranks={"a": 2}).speed is None  # a plan is applied as given


def test_speed_rule_over_several_token_counts():
    rule = SpeedRule(1.0, (1, 1024))
    kw = {"row_scales": False, "bias": True, "dtype": torch.float32}
    # 384x384 at rank 170: slower at one token, faster on a batch: it pays somewhere
    assert expected_speedup(384, 384, 170, 1) < 1.0 <= expected_speedup(384, 384, 170, 1024)
    assert rule.reason(384, 384, 170, **kw) is None
    assert SpeedRule(1.0, 1).reason(384, 384, 170, **kw) is not None
    assert rule.max_rank(384, 384, 384, **kw) >= 170
    with pytest.raises(ValueError, match=r"speedup_tokens must name at least one token count"):
        SpeedRule(1.0, ())
    with pytest.raises(ValueError, match=r"speedup_tokens must be a positive int, got 0"):
        SpeedRule(1.0, (1, 0))


class _Encoder(nn.Module):
    """Hidden states out; a pooler computed on the side that the objective never sees."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(96, 192)
        self.b = nn.Linear(192, 96)
        self.pooler = nn.Linear(96, 96)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.b(torch.relu(self.a(x)))
        self.pooled = self.pooler(h[:, 0])  # computed, not returned: no gradient reaches it
        return h


def test_compress_keeps_a_layer_no_gradient_reaches_dense_outside_the_budget():
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(4, 16, 96, generator=gen) for _ in range(3)]
    model = _Encoder()
    result = compress(model, batches, budget=0.6, objective="mse")
    why = reasons(result.conversion)
    assert why["pooler"] == NO_GRADIENT_REASON
    assert type(model.pooler) is nn.Linear and result.plan["pooler"] is None
    converted = {layer.name: layer for layer in result.conversion.converted}
    assert set(converted) <= {"a", "b"} and converted
    assert sum(x.params_after for x in converted.values()) <= 0.6 * (96 * 192 * 2)

    unguarded = _Encoder()
    result = compress(unguarded, batches, budget=0.6, objective="mse", guard=False)
    # the old rule: the budget's own ratio for the layer the gradient pass cannot see
    assert result.plan["pooler"] == int(0.6 * 96 * 96 // (96 + 96 + 1))
    assert isinstance(unguarded.pooler, LowRankLinear)


def test_compress_with_only_guarded_layers_converts_nothing_and_says_why():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16))
    batches = [torch.randn(8, 16, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    with pytest.warns(UserWarning, match=r"none was converted"):
        result = compress(model, batches, budget=0.5, objective="mse")
    why = reasons(result.conversion)
    assert why["0"].startswith(SMALL) and why["2"].startswith(OUTPUT)


def test_convert_checkpoint_applies_the_shape_rules_but_not_the_output_layer(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(256, 256), nn.Linear(256, 10))
    src = tmp_path / "dense.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, src)
    report = convert_checkpoint(src, tmp_path / "out.safetensors", param_ratio=0.5)
    why = reasons(report)
    assert why["0.weight"].startswith(SMALL) if "0.weight" in why else why["0"].startswith(SMALL)
    converted = {layer.name for layer in report.converted}
    assert len(converted) == 1  # the 256x256; the 256->10 head's rank 4 is slower everywhere
    report = convert_checkpoint(src, tmp_path / "all.safetensors", param_ratio=0.5, guard=False)
    assert len(report.converted) == 3


def test_the_cli_no_guard_flag(tmp_path, capsys):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(256, 256))
    src, dst = tmp_path / "dense.safetensors", tmp_path / "out.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, src)
    assert main(["convert", str(src), str(dst), "--rank", "4"]) == 0
    assert SMALL in capsys.readouterr().out
    assert set(json.loads(read_metadata(dst)["layers"])) == {"1"}
    assert main(["convert", str(src), str(dst), "--rank", "4", "--no-guard", "--overwrite"]) == 0
    assert set(json.loads(read_metadata(dst)["layers"])) == {"0", "1"}


def test_compress_says_why_its_plan_keeps_a_layer_dense():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 1024), nn.ReLU(),
                          nn.Linear(1024, 256), nn.Linear(256, 8))  # fmt: skip
    batches = [torch.randn(64, 256, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    # at min_speedup 1.1 decoding, no candidate rank of the 256x256 layer pays (1.06x at best)
    result = compress(model, batches, budget=0.7, objective="mse", min_speedup=1.1)
    why = reasons(result.conversion)
    assert why["0"] == (
        "the loss-aware allocation found no rank that saves parameters, or none reaches "
        "min_speedup=1.1"
    )


def test_convert_checkpoint_that_converts_nothing_warns(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16))
    src = tmp_path / "dense.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, src)
    with pytest.warns(UserWarning, match=r"convert_checkpoint: 2 modules matched but none was "
                      r"converted \(0: too small to gain"):  # fmt: skip
        report = convert_checkpoint(src, tmp_path / "out.safetensors", rank=2)
    assert not report.converted


def test_a_budget_no_layer_can_share_is_refused_naming_the_rule():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 8))
    with pytest.raises(ValueError, match=r"no rank of any of the 2 layers speeds it up "
                       r"\(min_speedup\): all 8,192 would stay dense"):  # fmt: skip
        convert_model(model, budget=0.5, min_speedup=5.0)


def test_missing_statistics_are_reported_only_for_layers_that_will_be_factorized():
    model = mlp()
    stats = {"0": torch.eye(64)}  # "2" is missed; "4", the output layer, stays dense anyway
    with pytest.warns(UserWarning, match=r"no calibration input reached 1 layers \(2\);"):
        report = convert_model(model, param_ratio=0.5, input_stats=stats)
    assert reasons(report)["4"].startswith(OUTPUT)


def test_layers_the_guard_keeps_are_not_calibrated():
    """The plan comes first: a layer that stays dense collects no statistics, so its
    statistics raise no warning (here the head, with more inputs than calibration tokens)."""

    def model() -> nn.Sequential:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 1024), nn.ReLU(),
                             nn.Linear(1024, 4))  # fmt: skip

    batches = [torch.randn(100, 128, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = convert_model(model(), param_ratio=0.5, calibration=batches)
    assert reasons(report)["4"].startswith(OUTPUT)
    assert {layer.name for layer in report.converted} == {"0", "2"}
    assert all(layer.error_data == "calibration" for layer in report.converted)
    with pytest.warns(UserWarning, match=r"4 saw 200 tokens, fewer than its 1024 inputs"):
        convert_model(model(), param_ratio=0.5, calibration=batches, guard=False)
