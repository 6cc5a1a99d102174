"""MLP width reduction (lowrank_layers.narrow) and compress's use of it: the MLPs found, the
estimate checked against its definition, the refit against least squares, and the
narrowed model end to end (report, save and reload, healing)."""

import itertools

import pytest
import torch
from torch import nn

from lowrank_layers import HealConfig, compress, heal, load_pretrained
from lowrank_layers.allocate import LayerOptions, allocate_loss_aware, mlp_options
from lowrank_layers.checkpoint_format import NARROWED_ATTR, is_narrowed
from lowrank_layers.heal import trainable_parameters
from lowrank_layers.narrow import (
    Mlp,
    Narrowing,
    check_mlps,
    find_mlps,
    narrow_input,
    narrowed_layer,
    refit_output,
    width_curve,
)
from lowrank_layers.sensitivity import collect_sensitivity

from . import helpers


def linears(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}


token_batches = helpers.token_batches


def spd(n: int, gen: torch.Generator, rows: int = 400) -> torch.Tensor:
    X = torch.randn(rows, n, generator=gen, dtype=torch.float64) * torch.rand(n, generator=gen)
    return X.mT @ X / rows


# ------------------------------------------------------------------------------------------
# finding MLPs
# ------------------------------------------------------------------------------------------


def test_find_mlps_in_llama_bert_and_a_root_sequential():
    llama = find_mlps(linears(helpers.tiny_llama(layers=2)))
    assert llama == [
        Mlp((f"model.layers.{i}.mlp.gate_proj", f"model.layers.{i}.mlp.up_proj"),
            f"model.layers.{i}.mlp.down_proj", 32, 64)
        for i in range(2)
    ]  # fmt: skip
    bert = find_mlps(linears(helpers.tiny_bert(layers=2)))
    assert [(m.inputs, m.output) for m in bert] == [
        ((f"encoder.layer.{i}.intermediate.dense",), f"encoder.layer.{i}.output.dense")
        for i in range(2)
    ]
    seq = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 8), nn.Linear(8, 3))
    assert find_mlps(linears(seq)) == [Mlp(("0",), "2", 8, 32)]


def test_find_mlps_takes_the_first_registered_layer_as_the_input():
    """A bottleneck (32 -> 8 -> 32) is an MLP too; the layer registered first feeds the
    other (in BERT, output.dense and the next intermediate.dense are never paired: the
    input must come first within one block)."""
    seq = nn.Sequential(nn.Linear(32, 8), nn.ReLU(), nn.Linear(8, 32))
    assert find_mlps(linears(seq)) == [Mlp(("0",), "2", 32, 8)]


class MixingMlp(nn.Module):
    """fc1 -> a normalisation over the intermediate channels -> fc2: not channel by
    channel; with ``layer_norm`` its LayerNorm(24) also breaks on fewer channels."""

    def __init__(self, layer_norm: bool = False) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 24), nn.Linear(24, 8)
        self.norm = nn.LayerNorm(24) if layer_norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        h = self.norm(h) if self.norm is not None else h / h.norm(dim=-1, keepdim=True)
        return self.fc2(h)


def test_check_mlps_keeps_channelwise_mlps_and_says_why_not_the_others(gen):
    torch.manual_seed(0)
    channelwise = nn.Sequential(nn.Linear(8, 24), nn.SiLU(), nn.Linear(24, 8))
    model = nn.Sequential(channelwise, MixingMlp(), MixingMlp(layer_norm=True))
    found = find_mlps(linears(model))
    assert [m.output for m in found] == ["0.2", "1.fc2", "2.fc2"]
    good, bad = check_mlps(model, found, torch.randn(16, 8, generator=gen))
    assert [m.output for m in good] == ["0.2"]
    assert bad == {
        "1.fc2": "its activation mixes intermediate channels (not channel by channel)",
        "2.fc2": "its input layers do not feed it channel by channel",
    }


def test_check_mlps_on_real_architectures(gen):
    for model in (helpers.tiny_llama(layers=2), helpers.tiny_bert(layers=2)):
        batch = {"input_ids": torch.randint(0, 64, (2, 16), generator=gen)}
        found = find_mlps(linears(model))
        good, bad = check_mlps(model, found, batch)
        assert good == found and bad == {}


# ------------------------------------------------------------------------------------------
# the estimate and the refit
# ------------------------------------------------------------------------------------------


def test_width_curve_is_the_kfac_loss_of_the_refit_at_every_width(gen):
    """loss[k] = ½·tr(Wᵀ G W · C_res(S_k)), C_res the residual of h regressed on the
    first k channels of the order (to 1e-4 relative: the product runs in float32)."""
    d, width = 6, 20
    C, G = spd(width, gen), spd(d, gen)
    W = torch.randn(d, width, generator=gen)
    M = W.double().mT @ G @ W.double()
    curve = width_curve(C, M)
    expected_order = torch.argsort(C.diagonal() * M.diagonal(), descending=True)
    assert torch.equal(curve.order, expected_order)
    for k in (1, 5, 13, 19):
        S = curve.channels(k)
        res = C - C[:, S] @ torch.linalg.solve(C[S][:, S], C[S, :])
        direct = 0.5 * float(torch.trace(M @ res))
        assert float(curve.loss[k]) == pytest.approx(direct, rel=1e-4, abs=1e-9)
    assert float(curve.loss[width]) == 0.0
    assert bool((curve.loss[:-1] >= curve.loss[1:] - 1e-9).all())  # keeping more never costs


def test_refit_output_is_the_least_squares_solution(gen):
    n, d, width, keep = 500, 5, 12, torch.tensor([0, 3, 4, 9])
    H = torch.randn(n, width, generator=gen, dtype=torch.float64) @ torch.randn(
        width, width, generator=gen, dtype=torch.float64
    )
    layer = nn.Linear(width, d, dtype=torch.float64)
    C = H.mT @ H / n
    new = refit_output(layer, C[:, keep], C[keep][:, keep], ridge=0.0)
    target = H @ layer.weight.detach().mT
    best = torch.linalg.lstsq(H[:, keep], target).solution.mT
    torch.testing.assert_close(new.weight.detach(), best, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(new.bias, layer.bias)
    assert is_narrowed(new) and getattr(new, NARROWED_ATTR) == (width, d)


def test_narrow_input_keeps_the_rows_of_its_channels(gen):
    layer = nn.Linear(6, 10)
    keep = torch.tensor([1, 2, 7])
    new = narrow_input(layer, keep)
    x = torch.randn(4, 6, generator=gen)
    torch.testing.assert_close(new(x), layer(x)[:, keep], rtol=1e-6, atol=1e-6)  # GEMM order
    assert type(new) is nn.Linear and getattr(new, NARROWED_ATTR) == (6, 10)


def test_dead_channels_go_first_and_cost_nothing(gen):
    """An MLP whose last channels never fire: cut to the live ones, the refit output is
    exact and so is the report's output error (0)."""
    torch.manual_seed(0)
    fc1, fc2 = nn.Linear(8, 16), nn.Linear(16, 8)
    with torch.no_grad():
        fc1.weight[10:] = 0
        fc1.bias[10:] = -1.0  # ReLU(-1) = 0: channels 10..15 are dead
    mlp = Mlp(("fc1",), "fc2", 8, 16)
    x = torch.randn(300, 8, generator=gen)
    h = torch.relu(fc1(x)).detach().double()
    C = h.mT @ h / h.shape[0]
    W = fc2.weight.detach().double()
    curve = width_curve(C, W.mT @ W)  # E[g gᵀ] = I
    assert set(curve.channels(10).tolist()) == set(range(10))
    assert float(curve.loss[10]) <= 1e-9 * float(curve.loss[0])  # the Cholesky jitter
    cut = Narrowing(mlp, curve.channels(10))
    new_fc1, _ = narrowed_layer("fc1", fc1, cut)
    new_fc2, report = narrowed_layer("fc2", fc2, cut, input_cov=C)
    torch.testing.assert_close(new_fc2(torch.relu(new_fc1(x))), fc2(torch.relu(fc1(x))),
                               rtol=1e-5, atol=1e-5)  # fmt: skip
    assert report.output_error == pytest.approx(0.0, abs=1e-5)  # the refit's 1e-6 ridge
    assert report.params_before == 128 and report.params_after == 80
    assert "MLP width 16 -> 10" in report.note


def test_mlp_options_hold_the_pareto_front_of_every_combination(gen):
    """The layer-by-layer fold gives exactly the combinations of the brute-force product
    that no other beats in both parameters and loss (random candidates, no ties)."""
    mlp = Mlp(inputs=("gate", "up"), output="down", hidden=8, width=24)
    options = {}
    for name in mlp.layers:
        n = 6
        params = sorted(torch.randperm(150, generator=gen)[:n].add(1).tolist())
        loss = sorted(torch.rand(n, generator=gen).tolist(), reverse=True)
        options[name] = LayerOptions(8, 24, [*range(1, n), None], params, [*loss[:-1], 0.0])
    W = torch.randn(8, 24, generator=gen, dtype=torch.float64)
    curve = width_curve(spd(24, gen), W.mT @ spd(8, gen) @ W)
    got = mlp_options(mlp, options, curve, grid=[0.5])
    folded = {(p, round(q, 12)) for c, p, q in zip(got.choices, got.params, got.loss, strict=True)
              if isinstance(c, dict)}  # fmt: skip
    combos = []
    for picks in itertools.product(*(range(6) for _ in mlp.layers)):
        chosen = [(options[n], k) for n, k in zip(mlp.layers, picks, strict=True)]
        combos.append((sum(o.params[k] for o, k in chosen), sum(o.loss[k] for o, k in chosen)))

    def beaten(p: int, q: float) -> bool:
        return any((p2 <= p and q2 < q) or (p2 < p and q2 <= q) for p2, q2 in combos)

    front = {(p, round(q, 12)) for p, q in combos if not beaten(p, q)}
    assert folded == front and len(front) > 3
    assert any(isinstance(c, Narrowing) and c.width == 12 for c in got.choices)


def test_narrowed_output_layer_needs_statistics():
    cut = Narrowing(Mlp(("a",), "b", 4, 8), torch.arange(4))
    with pytest.raises(ValueError, match="b: a narrowed MLP's output layer needs input"):
        narrowed_layer("b", nn.Linear(8, 4), cut)


# ------------------------------------------------------------------------------------------
# in compress
# ------------------------------------------------------------------------------------------


def llama_with_dead_channels(seed: int = 0) -> nn.Module:
    """tiny_llama whose MLPs use only their first 24 of 64 channels (up_proj's other rows
    zero): cutting them away is free, so the allocation must find it."""
    model = helpers.tiny_llama(layers=2, seed=seed)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.up_proj.weight[24:] = 0
    return model


def test_allocation_prefers_the_free_cut(gen):
    model = llama_with_dead_channels()
    batches = token_batches(4, gen)
    layers = {n: m for n, m in linears(model).items() if n != "lm_head"}
    sens = collect_sensitivity(model, batches, layers, objective="kl")
    mlps = find_mlps(layers)
    plan = allocate_loss_aware(layers, sens, 0.6, mlps=mlps)
    assert set(plan.narrowed) == {m.output for m in mlps}
    for cut in plan.narrowed.values():
        assert set(cut.channels.tolist()) <= set(range(24)) or cut.width > 24
    without = allocate_loss_aware(layers, sens, 0.6)
    assert without.narrowed == {} and set(without.ranks) == set(layers)


def test_compress_narrows_reports_saves_and_reloads(gen, tmp_path):
    model = llama_with_dead_channels()
    reference = llama_with_dead_channels()
    calib, held_out = token_batches(6, gen), token_batches(2, gen)
    report = compress(model, calib, budget=0.6, exclude=["lm_head"], guard=False,
                      eval_batches=held_out)  # fmt: skip
    assert set(report.narrowed) == {f"model.layers.{i}.mlp.down_proj" for i in range(2)}
    for out_name, cut in report.narrowed.items():
        for name in cut.mlp.layers:
            layer = model.get_submodule(name)
            assert type(layer) is nn.Linear and is_narrowed(layer)
        assert model.get_submodule(out_name).in_features == cut.width
        row = next(x for x in report.conversion.layers if x.name == out_name)
        assert row.error_data == "held-out" and row.output_error < 0.05
    assert "MLPs cut in width: 2" in str(report)
    after = sum(x.params_after for x in report.conversion.layers)
    before = sum(x.params_before for x in report.conversion.layers)
    assert after <= 0.6 * before
    with torch.no_grad():  # the dead channels go first: the model barely moves
        ids = held_out[0]["input_ids"]
        p, q = model(input_ids=ids).logits.softmax(-1), reference(input_ids=ids).logits.softmax(-1)
    assert float((p - q).abs().max()) < 0.05
    model.save_pretrained(tmp_path)
    loaded = load_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits,
                                   rtol=0, atol=0)  # fmt: skip


def test_compress_without_narrowing_and_heal_through_a_cut(gen):
    model = llama_with_dead_channels()
    calib = token_batches(6, gen)
    plain = compress(llama_with_dead_channels(), calib, budget=0.6, exclude=["lm_head"],
                     guard=False, narrow_mlps=False)  # fmt: skip
    assert plain.narrowed == {}
    report = compress(model, calib, budget=0.6, exclude=["lm_head"], guard=False,
                      heal=HealConfig(steps=3, lr=1e-3))  # fmt: skip
    down = model.get_submodule("model.layers.0.mlp.down_proj")
    assert report.narrowed and report.heal is not None and report.heal.steps == 3
    assert is_narrowed(down) and down.weight.requires_grad


def test_healing_trains_the_layers_of_a_cut_mlp(gen):
    """A plan may cut MLPs and factorize nothing: "factors" then means the cut layers'
    weights (blockwise too), and healing changes them."""
    teacher = llama_with_dead_channels()
    calib = token_batches(6, gen)
    model = llama_with_dead_channels()
    report = compress(model, calib, budget=0.6, exclude=["lm_head"], guard=False)
    cut = {n for c in report.narrowed.values() for n in c.mlp.layers}
    assert cut and all(is_narrowed(model.get_submodule(n)) for n in cut)
    chosen = trainable_parameters(model, ("factors", "biases"))
    assert {f"{n}.weight" for n in cut} <= set(chosen)
    assert not any(n.startswith("model.embed") for n in chosen)
    for mode in ("end_to_end", "blockwise"):
        before = {n: model.get_submodule(n).weight.detach().clone() for n in cut}
        heal(model, teacher, calib, steps=2, lr=1e-2, mode=mode)
        assert all(not torch.equal(model.get_submodule(n).weight, w) for n, w in before.items())


def test_a_narrowed_layer_is_not_converted_again(gen):
    """Factorizing a cut layer would lose the width the format records: a second
    conversion keeps it dense and says why."""
    from lowrank_layers import convert_model
    from lowrank_layers.layer_plan import NARROWED_REASON

    model = llama_with_dead_channels()
    calib = token_batches(6, gen)
    first = compress(model, calib, budget=0.6, exclude=["lm_head"], guard=False)
    cut = {n for c in first.narrowed.values() for n in c.mlp.layers}
    again = convert_model(model, param_ratio=0.3, exclude=["lm_head"], guard=False)
    rows = {x.name: x for x in again.layers}
    assert cut and all(rows[n].reason == NARROWED_REASON for n in cut)
    assert all(is_narrowed(model.get_submodule(n)) for n in cut)
