"""convert_model: selection, every skip reason, the report, and each layer kind."""

import json
import warnings

import pytest
import torch
from torch import nn

from lowrank_layers import (
    AdaptiveLowRankLinear,
    DynamicLowRankLinear,
    LowRankLinear,
    RankPolicy,
    convert_model,
)
from lowrank_layers.factorize import NONFINITE_REASON
from lowrank_layers.readers import register_weight_reader

from .helpers import rel_err, tiny_bart, tiny_llama, tokens


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(64, 64)
        self.k_proj = nn.Linear(64, 64)
        self.mlp = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.q_proj(x) + self.k_proj(x))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


ALL_LINEARS = [
    "blocks.0.q_proj",
    "blocks.0.k_proj",
    "blocks.0.mlp.0",
    "blocks.0.mlp.2",
    "blocks.1.q_proj",
    "blocks.1.k_proj",
    "blocks.1.mlp.0",
    "blocks.1.mlp.2",
    "head",
]


def _but(*suffixes: str) -> list[str]:
    return [n for n in ALL_LINEARS if not n.endswith(suffixes)]


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({}, ALL_LINEARS),
        ({"include": r".*_proj"}, [n for n in ALL_LINEARS if n.endswith("_proj")]),
        ({"include": r"blocks\.0\..*"}, ALL_LINEARS[:4]),
        ({"include": "q_proj"}, []),  # a regex must match the whole name
        ({"include": ["q_proj"]}, ["blocks.0.q_proj", "blocks.1.q_proj"]),  # list: suffix
        ({"include": ["blocks.1.mlp.0", "head"]}, ["blocks.1.mlp.0", "head"]),
        ({"include": ["mlp.0"]}, ["blocks.0.mlp.0", "blocks.1.mlp.0"]),
        ({"include": ["proj"]}, []),  # suffixes are whole dotted components
        ({"exclude": r".*mlp.*"}, _but("mlp.0", "mlp.2")),
        ({"exclude": ["head", "k_proj"]}, _but("head", "k_proj")),
        ({"include": r"blocks\..*", "exclude": ["mlp.2"]}, _but("mlp.2", "head")),
        ({"filter_fn": lambda m, fqn: m.out_features == 64}, _but("mlp.0", "head")),
        (
            {"filter_fn": lambda m, fqn: "1" in fqn, "exclude": ["q_proj"]},
            ["blocks.1.k_proj", "blocks.1.mlp.0", "blocks.1.mlp.2"],
        ),
    ],
)
def test_selection_table(kwargs, expected):
    model = Net()
    if not expected:
        with pytest.raises(ValueError, match=r"no module of Net matched"):
            convert_model(model, rank=4, **kwargs)
        return
    report = convert_model(model, rank=4, **kwargs)
    assert [layer.name for layer in report.layers] == expected
    converted = [n for n, m in model.named_modules() if isinstance(m, LowRankLinear)]
    assert converted == [n for n in expected if n != "head"]  # the output layer stays dense


def test_break_even_is_refused_and_conversion_is_partial(gen):
    torch.manual_seed(0)
    model = Net()
    x = torch.randn(5, 64, generator=gen)
    before = model(x)
    with pytest.warns(UserWarning, match="2 modules matched but none was converted"):
        report = convert_model(model, rank=64, include=r".*q_proj", threshold=0)
    # rank 64 of a 64x64 layer saves nothing: refused, and said so
    assert all(
        layer.reason == "rank 64 saves no parameters (break-even)" for layer in report.layers
    )
    report = convert_model(model, rank=10, include=["mlp.0"])
    assert len(report.converted) == 2
    assert isinstance(model.blocks[0].mlp[0], LowRankLinear) and isinstance(model.head, nn.Linear)
    assert 0 < rel_err(model(x), before) < 0.5  # a real change; the model still runs


def _skip_reasons(report) -> dict[str, str]:
    return {layer.name: layer.reason for layer in report.skipped}


def test_every_skip_reason():
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(100, 64)
            self.head = nn.Linear(64, 100, bias=False)
            self.head.weight = self.emb.weight  # tied input/output embeddings
            self.attn = nn.MultiheadAttention(64, 4)
            self.small = nn.Linear(8, 8)
            self.big = nn.Linear(64, 64)
            self.conv = nn.Conv1d(4, 4, 1)
            self.done = LowRankLinear(64, 64, 8)

    class CustomLinear(nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) * 2

    model = Tied()
    model.custom = CustomLinear(64, 64)
    report = convert_model(
        model,
        rank=16,
        threshold=16,
        guard=False,  # else "small" is too small to gain, before the threshold is asked
        filter_fn=lambda m, fqn: not isinstance(m, (nn.Embedding, nn.MultiheadAttention)),
    )
    reasons = _skip_reasons(report)
    assert reasons == {
        "head": "weight shared with emb",
        "attn.out_proj": "parent MultiheadAttention reads .weight directly",
        "small": "8x8 is not above threshold 16²",
        "conv": "cannot convert a Conv1d",
        "done": "already a LowRankLinear",
        "custom": "CustomLinear overrides nn.Linear.forward",
    }
    assert [layer.name for layer in report.converted] == ["big"]
    with pytest.warns(UserWarning, match="none was converted"):
        report = convert_model(Tied(), rank=40, include=["big"])
    assert _skip_reasons(report) == {"big": "rank 40 saves no parameters (break-even)"}


def test_registered_weight_reader_is_skipped():
    class Reader(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(64, 64)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x @ self.proj.weight.T

    register_weight_reader(Reader, ["proj"])
    report = convert_model(nn.Sequential(Reader(), nn.Linear(64, 64)), rank=8, guard=False)
    assert _skip_reasons(report) == {"0.proj": "parent Reader reads .weight directly"}
    with pytest.raises(TypeError, match=r"parent_type must be an nn.Module subclass"):
        register_weight_reader(int, ["x"])


def test_shared_module_is_replaced_everywhere():
    shared = nn.Linear(64, 64)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    report = convert_model(model, rank=8, guard=False)  # shared is also the output layer
    assert len(report.layers) == 1  # one module, listed once
    assert isinstance(model[0], LowRankLinear) and model[0] is model[2]


def test_no_conversion_at_all_warns():
    with pytest.warns(UserWarning, match=r"1 modules matched but none was converted"):
        report = convert_model(nn.Sequential(nn.Linear(8, 8)), rank=8)
    assert len(report.skipped) == 1


def test_report_table_and_json(gen):
    model = Net()
    report = convert_model(model, rank_ratio=0.25, method="randomized", threshold=16, guard=False)
    text = str(report)
    lines = text.splitlines()
    # the legend first: without data, only the weight's error is known
    assert lines[0].startswith("rel.err: the relative error of the weight, |W - W'| / |W|")
    assert "the outputs' error is not known" in lines[0] and "out.err" not in text
    assert lines[1].startswith("x@N: expected speed-up") and lines[2] == ""
    assert lines[3].split()[:5] == ["layer", "kind", "in", "out", "rank"]
    assert len({len(line) for line in lines[4:-1]} | {len(lines[3])}) <= 2  # aligned
    assert lines[-1].startswith("converted 9 of 9 matched layers: ")  # the totals last
    assert "skipped" not in text  # 64x10 head: 640 > 256, rank 3 saves
    data = json.loads(report.to_json())
    assert data["totals"]["converted"] == 9
    assert data["totals"]["params_after"] < data["totals"]["params_before"]
    assert data["totals"]["model_params_after"] == sum(p.numel() for p in model.parameters())
    first = data["layers"][0]
    assert first["name"] == "blocks.0.q_proj" and first["rank"] == 16 and first["converted"]
    assert 0 < first["relative_error"] < 1 and first["seconds"] >= 0
    assert first["speedup_few"] > 0 and first["speedup_many"] > 0
    # calibrated: the legend says which error column to read, and why rel.err may exceed 1
    calibrated = convert_model(
        Net(), rank_ratio=0.25, calibration=[torch.randn(256, 64, generator=gen)]
    )
    lines = str(calibrated).splitlines()
    assert lines[0].startswith("out.err (calibration): the relative error of the layer's outputs")
    assert lines[0].endswith("the column to read")
    assert lines[1].startswith("rel.err: the relative error of the weight itself")
    assert lines[1].endswith("so it may exceed 1 harmlessly")
    assert lines[2].startswith("x@N: expected speed-up") and lines[3] == ""
    assert "rel.err  out.err (calibration)" in lines[4]
    assert lines[-1].startswith("converted 8 of 9 matched layers: ")  # the head stays dense


def test_layer_kinds_and_frozen_weights(gen):
    model = Net()
    for p in model.blocks[0].parameters():
        p.requires_grad_(False)
    model.eval()
    convert_model(model, rank=8, layer="adaptive", include=r"blocks\.0\..*")
    assert isinstance(model.blocks[0].q_proj, AdaptiveLowRankLinear)
    assert not model.blocks[0].q_proj.is_lowrank
    assert model.blocks[0].q_proj.default_policy == RankPolicy(rank=8)
    assert not model.blocks[0].q_proj.weight.requires_grad and not model.blocks[0].q_proj.training
    report = convert_model(model, rank_ratio=0.5, layer="dynamic", include=r"blocks\.1\..*")
    assert isinstance(model.blocks[1].mlp[0], DynamicLowRankLinear)
    assert model.blocks[1].mlp[0].max_rank == 32
    assert [layer.name for layer in report.converted] == ["blocks.1.mlp.0", "blocks.1.mlp.2"]
    assert report.converted[0].relative_error is not None  # 64x64 at rank 32 is break-even
    model(torch.randn(2, 64, generator=gen))


def test_progress_bar(capsys):
    convert_model(Net(), rank=4, progress=True)
    assert "converting" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"rank": 4, "layer": "lora"}, ValueError, r"layer must be one of 'lowrank', 'adaptive'"),
        ({"rank": 4, "include": "("}, ValueError, r"include is not a valid regular expression"),
        ({"rank": 4, "exclude": 3}, TypeError, r"exclude must be a regex string or a list"),
        ({"rank": 4, "filter_fn": "x"}, TypeError, r"filter_fn must be callable"),
        ({"rank": 4, "threshold": -2}, ValueError, r"threshold must be an int >= 0, got -2"),
        ({}, ValueError, r"convert_model needs a rank rule"),
        ({"rank_ratio": 2.0}, ValueError, r"rank_ratio must be in \(0, 1\], got 2\.0"),
        ({"rank": 4, "balance": "x"}, ValueError, r"balance must be one of"),
        ({"rank": 4, "method": "x"}, ValueError, r"method must be one of"),
    ],
)
def test_bad_arguments(kwargs, exc, match):
    model = Net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(exc, match=match):
        convert_model(model, **kwargs)
    after = model.state_dict()
    assert before.keys() == after.keys()  # nothing was converted before the error
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert all(torch.equal(before[k], after[k]) for k in before)


def test_randomized_conversion_is_seeded_per_layer():
    torch.manual_seed(0)
    a, b = Net(), Net()
    b.load_state_dict(a.state_dict())
    convert_model(a, rank=8, method="randomized", seed=5)
    # converting a subset, in another order, gives the same factors for the same layer
    convert_model(b, rank=8, method="randomized", seed=5, include=["blocks.1.mlp.0"])
    assert torch.equal(a.blocks[1].mlp[0].U, b.blocks[1].mlp[0].U)
    torch.manual_seed(0)
    c = Net()
    convert_model(c, rank=8, method="randomized", seed=6, include=["blocks.1.mlp.0"])
    assert not torch.equal(c.blocks[1].mlp[0].U, b.blocks[1].mlp[0].U)  # another seed


# ------------------------------------------------------------------------------------------
# transformers models, non-finite weights, failures
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("build", [tiny_bart, tiny_llama], ids=["bart", "llama"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_converted_transformers_models_run_forward_and_backward(gen, build, mode):
    model = build()
    getattr(model, mode)()
    report = convert_model(model, param_ratio=0.5, guard=False)  # 32-wide: too small to gain
    assert report.converted
    x = tokens(gen)
    out = model(input_ids=x, labels=x)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = [m.U.grad for m in model.modules() if isinstance(m, LowRankLinear)]
    assert grads and all(g is not None for g in grads)


def test_a_nonfinite_weight_is_skipped_by_the_rule_convert_checkpoint_uses(gen):
    for kwargs in ({"rank": 2}, {"budget": 0.5}):
        model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16))
        with torch.no_grad():
            model[1].weight[3, 4] = float("nan")
        report = convert_model(model, **kwargs, guard=False)  # 16x16: too small to gain
        assert [r.reason for r in report.layers] == [None, NONFINITE_REASON, None]
        assert type(model[1]) is nn.Linear
        assert isinstance(model[0], LowRankLinear) and isinstance(model[2], LowRankLinear)


def test_a_failure_midway_leaves_the_model_untouched(monkeypatch):
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16))
    originals = list(model)
    calls = []
    real = LowRankLinear.from_linear.__func__

    def failing(cls, linear, *args, **kwargs):
        calls.append(linear)
        if len(calls) == 2:
            raise RuntimeError("out of memory (simulated)")
        return real(cls, linear, *args, **kwargs)

    monkeypatch.setattr(LowRankLinear, "from_linear", classmethod(failing))
    with pytest.raises(RuntimeError, match="simulated"):
        convert_model(model, rank=2, guard=False)  # 16x16: too small to gain
    assert len(calls) == 2
    assert all(a is b for a, b in zip(model, originals, strict=True))


def test_an_optimizer_of_the_wrong_type_or_lacking_weights_is_refused_first():
    model = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 8))
    before = model.state_dict().keys()
    with pytest.raises(TypeError, match=r"optimizer must be a torch\.optim\.Optimizer or None, "
                       r"got list"):  # fmt: skip
        convert_model(model, rank=4, optimizer=list(model.parameters()))
    head_only = torch.optim.SGD([model[2].weight], lr=0.1)
    match = r"convert_model: the optimizer holds no weight of 1 of the 2 layers to convert \(0\)"
    with pytest.raises(ValueError, match=match + ": their factors would never train"):
        convert_model(model, rank=4, optimizer=head_only, guard=False)
    assert model.state_dict().keys() == before  # nothing converted


def test_convert_model_updates_the_optimizer_in_place(gen):
    model = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 8))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    old = [model[0].weight, model[2].weight]
    convert_model(model, rank=4, optimizer=opt, guard=False)  # small layers, and the head
    (group,) = opt.param_groups
    assert group["weight_decay"] == 0.05 and group["lr"] == 1e-2
    assert [id(p) for p in group["params"]] == [id(p) for p in model.parameters()]
    assert not any(p is q for p in group["params"] for q in old)
    factors = model[0].U.detach().clone()
    x = torch.randn(16, 32, generator=gen)
    model(x).square().mean().backward()
    opt.step()
    assert not torch.equal(factors, model[0].U)
