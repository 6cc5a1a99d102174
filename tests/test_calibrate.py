"""Activation-aware conversion: calibration hooks, whitening, and their errors.

The rank allocation (``allocate_ranks``, ``budget=``) is tested in test_allocate.py.
"""

import warnings

import pytest
import torch
from einops import rearrange
from torch import nn

from lowrank_layers import convert_model, factorize
from lowrank_layers.calibrate import InputCache, batch_tokens, collect_input_stats, run_batch
from lowrank_layers.factorize import output_error, truncated_spectrum, whitening_factor

from .helpers import rel_err, tiny_bert, tiny_llama


def correlated_inputs(gen: torch.Generator, n: int = 4000, d: int = 48) -> torch.Tensor:
    """Inputs with a strongly anisotropic covariance (a few directions carry most energy)."""
    mix = torch.randn(d, d, generator=gen, dtype=torch.float64) * torch.logspace(
        0, -3, d, dtype=torch.float64
    )
    return torch.randn(n, d, generator=gen, dtype=torch.float64) @ mix.mT


def test_identity_covariance_equals_plain_svd(gen):
    W = torch.randn(40, 32, generator=gen, dtype=torch.float64)
    plain = factorize(W, rank=8)
    white = factorize(W, rank=8, input_cov=torch.eye(32, dtype=torch.float64))
    assert rel_err(white.dense(), plain.dense()) < 1e-9
    assert torch.allclose(white.S, plain.S * (1 + 1e-6 * 32 / 32) ** 0.5, rtol=1e-9)


def test_whitened_truncation_is_the_weighted_optimum_and_beats_plain_svd(gen):
    X = correlated_inputs(gen)
    C = X.mT @ X / len(X)
    W = torch.randn(64, 48, generator=gen, dtype=torch.float64)
    f = factorize(W, rank=6, input_cov=C)
    # closed form: argmin_rank6 ||(W - What) L||_F  =  [W L]_6 L^-1  with L L^T = C + eps I
    L = whitening_factor(C, 48)
    U, S, Vh = torch.linalg.svd(W @ L)
    best = (U[:, :6] * S[:6]) @ Vh[:6] @ torch.linalg.inv(L)
    assert rel_err(f.dense(), best) < 1e-8
    plain = factorize(W, rank=6)
    err_white = output_error(W, f, C)
    err_plain = output_error(W, plain, C)
    assert err_white < 0.5 * err_plain  # far better on the inputs it was calibrated for
    direct = float(torch.linalg.norm(X @ (W - f.dense()).mT) / torch.linalg.norm(X @ W.mT))
    assert err_white == pytest.approx(direct, rel=1e-9)
    # and the energy rank refers to the whitened spectrum
    s = truncated_spectrum(W, input_cov=C)
    assert torch.allclose(s[:6], f.S, rtol=1e-9)


@pytest.mark.parametrize("kind", ["rank-deficient", "zero", "negative-rounding"])
def test_singular_covariances_convert(kind, gen):
    W = torch.randn(20, 32, generator=gen)
    if kind == "rank-deficient":
        X = torch.randn(100, 5, generator=gen) @ torch.randn(5, 32, generator=gen)
        C = X.mT @ X / 100
    elif kind == "zero":
        C = torch.zeros(32, 32)
    else:
        v = torch.randn(32, 1, generator=gen)
        C = v @ v.mT - 1e-7 * torch.eye(32)  # slightly indefinite, as rounding can make it
    for method in ("svd", "randomized"):
        f = factorize(W, rank=4, input_cov=C, method=method, generator=gen)
        assert bool(torch.isfinite(f.dense()).all())


def test_randomized_whitened_is_close_to_exact(gen):
    X = correlated_inputs(gen, d=200)
    C = X.mT @ X / len(X)
    W = torch.randn(300, 200, generator=gen)
    exact = output_error(W, factorize(W, rank=20, input_cov=C), C)
    rand = output_error(
        W, factorize(W, rank=20, input_cov=C, method="randomized", generator=gen), C
    )
    assert rand <= 1.05 * exact


def test_whitening_factor_errors():
    with pytest.raises(ValueError, match=r"input_cov must be a \(4, 4\) tensor .* got \(3, 3\)"):
        whitening_factor(torch.eye(3), 4)
    with pytest.raises(ValueError, match=r"input_cov must be symmetric"):
        whitening_factor(torch.triu(torch.ones(3, 3)), 3)
    with pytest.raises(ValueError, match=r"input_cov must be finite"):
        whitening_factor(torch.full((2, 2), float("nan")), 2)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(48, 48)
        self.k = nn.Linear(48, 48)
        self.up = nn.Linear(48, 128)
        self.down = nn.Linear(128, 48)

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        h = self.q(x) + self.k(x)  # q and k share their input
        return self.down(torch.relu(self.up(h))) * scale


def test_collect_input_stats_accumulates_exactly_and_removes_hooks(gen):
    torch.manual_seed(0)
    model = Net()
    batches = [torch.randn(3, 7, 48, generator=gen) for _ in range(4)]
    with pytest.warns(UserWarning, match=r"down saw 84 tokens, fewer than its 128 inputs"):
        stats = collect_input_stats(
            model, batches, {"q": model.q, "k": model.k, "down": model.down}
        )
    X = torch.cat([b.reshape(-1, 48) for b in batches]).double()
    assert stats["q"].tokens == 84
    # each batch's Gram is a float32 GEMM (then summed in float64): float32 rounding
    assert torch.allclose(stats["q"].covariance, X.mT @ X / 84, rtol=1e-5, atol=1e-5)
    assert torch.equal(stats["q"].gram, stats["k"].gram)  # shared input, shared GEMM
    with torch.no_grad():
        H = torch.relu(model.up(model.q(X.float()) + model.k(X.float()))).double()
    assert torch.allclose(stats["down"].covariance, H.mT @ H / 84, rtol=1e-5, atol=1e-8)
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_hooks_are_removed_when_a_batch_raises(gen):
    model = Net()

    def batches():
        yield torch.randn(2, 48, generator=gen)
        raise RuntimeError("bad batch")

    with pytest.raises(RuntimeError, match="bad batch"):
        convert_model(model, rank=8, calibration=batches())
    assert all(not m._forward_pre_hooks for m in model.modules())
    assert all(type(m) is nn.Linear for m in (model.q, model.k, model.up, model.down))
    with pytest.raises(ValueError, match=r"batches is empty"):
        collect_input_stats(model, [], {"q": model.q})
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_batch_forms():
    calls = []

    class Probe(nn.Module):
        def forward(self, *args, **kwargs):
            calls.append((len(args), sorted(kwargs)))

    probe = Probe()
    run_batch(probe, {"x": 1, "scale": 2})
    run_batch(probe, (1, 2))
    run_batch(probe, torch.zeros(1))
    assert calls == [(0, ["scale", "x"]), (2, []), (1, [])]


def test_run_batch_fills_no_key_value_cache():
    """A mapping batch gets use_cache=False when the forward takes use_cache and the batch
    does not set it; other batches and forwards are fed as they are."""
    calls = []

    class Cached(nn.Module):
        def forward(self, x=None, use_cache=True):
            calls.append(use_cache)

    class Plain(nn.Module):
        def forward(self, **kwargs):
            calls.append(sorted(kwargs))

    run_batch(Cached(), {"x": 1})
    run_batch(Cached(), {"x": 1, "use_cache": True})  # the caller's choice stands
    run_batch(Cached(), (1,))
    run_batch(Plain(), {"x": 1})  # **kwargs is not a use_cache parameter
    assert calls == [False, True, True, ["x"]]


def test_batch_tokens():
    ids = torch.zeros(2, 8, dtype=torch.long)
    masked = {"input_ids": ids, "attention_mask": torch.tensor([[1] * 8, [1] * 3 + [0] * 5])}
    assert batch_tokens(masked) == 11  # the unmasked entries
    assert batch_tokens({"input_ids": ids}) == 16
    assert batch_tokens(torch.zeros(4, 5, 3)) == 20  # features: all but the last dim
    assert batch_tokens((ids,)) == 16
    assert batch_tokens({"n": 3}) == 1  # no tensor
    assert batch_tokens(torch.tensor(7)) == 1  # a 0-d tensor


def test_input_cache_reuses_a_value_only_for_the_same_unchanged_tensor(gen):
    computed = []

    def gram(x: torch.Tensor) -> torch.Tensor:
        computed.append(x)
        return x.mT @ x

    cache = InputCache()
    x = torch.randn(5, 3, generator=gen)
    first = cache.get(x, gram)
    assert cache.get(x, gram) is first and len(computed) == 1
    assert cache.get(x.clone(), gram) is not first and len(computed) == 2  # another tensor
    y = torch.randn(5, 3, generator=gen)
    cache.get(y, gram)
    y.mul_(2)  # changed in place: its _version moved on
    assert torch.equal(cache.get(y, gram), y.mT @ y) and len(computed) == 4
    cache.clear()
    cache.get(y, gram)
    assert len(computed) == 5


def test_calibrated_conversion_lowers_output_error(gen):
    torch.manual_seed(0)
    model = Net()
    X = correlated_inputs(gen, n=2000).float()
    calib = [X[i : i + 200] for i in range(0, 1000, 200)]
    held_out = X[1000:]
    with torch.no_grad():
        reference = model(held_out)
    plain = Net()
    plain.load_state_dict(model.state_dict())
    convert_model(plain, rank=8)
    report = convert_model(model, rank=8, calibration=calib)
    assert all(layer.output_error is not None for layer in report.converted)
    with torch.no_grad():
        err_cal = rel_err(model(held_out), reference)
        err_plain = rel_err(plain(held_out), reference)
    assert err_cal < 0.5 * err_plain
    assert "out.err" in str(report)
    dict_batches = [{"x": b, "scale": 1.0} for b in calib]
    again = Net()
    convert_model(again, rank=8, calibration=dict_batches)


def test_budget_and_calibration_errors():
    with pytest.raises(
        ValueError, match=r"give one rank rule .* got policy=rank=4 and budget=0\.5"
    ):
        convert_model(Net(), rank=4, budget=0.5)
    with pytest.raises(
        ValueError,
        match=r"calibration, input_stats and propagate apply to layer='lowrank'",
    ):
        convert_model(Net(), rank=4, layer="adaptive", calibration=[torch.zeros(1, 48)])


def test_calibration_that_misses_layers_is_reported():
    model = Net()
    with pytest.raises(ValueError, match=r"the calibration reached none of the layers"):
        convert_model(model, rank=8, input_stats={"elsewhere": torch.eye(48)})
    # one tokenizer batch (a mapping) is neither batches nor statistics
    ids = torch.zeros(2, 3, dtype=torch.long)
    batch = {"input_ids": ids, "attention_mask": torch.ones(2, 3)}
    expected = (
        r"calibration takes an iterable of batches, got a mapping with keys \['input_ids', "
        r"'attention_mask'\]: one batch goes in a list, calibration=\[batch\]; statistics "
        r".* input_stats="
    )
    with pytest.raises(TypeError, match=expected):
        convert_model(model, rank=8, calibration=batch)
    with pytest.raises(TypeError, match=r"entry 'input_ids' is a tensor of shape \(2, 3\); keys "
                       r"\['input_ids', 'attention_mask'\] look like one batch"):  # fmt: skip
        convert_model(model, rank=8, input_stats=batch)
    with pytest.raises(ValueError, match=r"give calibration \(batches\) or input_stats"):
        convert_model(model, rank=8, calibration=[torch.zeros(1, 48)], input_stats={})
    with pytest.raises(TypeError, match=r"input_stats must be a mapping .* got list"):
        convert_model(model, rank=8, input_stats=[torch.eye(48)])
    with pytest.warns(UserWarning, match=r"q saw 4 tokens, fewer than its 48 inputs"):
        stats = collect_input_stats(model, [torch.randn(4, 48)], {"q": model.q})
    with pytest.warns(UserWarning, match=r"no calibration input reached 3 layers \(k, up, down\)"):
        report = convert_model(model, rank=8, input_stats=stats, guard=False)
    assert {r.name: r.output_error is not None for r in report.converted} == {
        "q": True, "k": False, "up": False, "down": False,
    }  # fmt: skip


def test_modules_default_to_every_linear_below_the_root(gen):
    model = nn.Sequential(Net(), nn.ReLU(), nn.Linear(48, 8))
    batches = [torch.randn(300, 48, generator=gen)]
    stats = collect_input_stats(model, batches)
    assert list(stats) == ["0.q", "0.k", "0.up", "0.down", "2"]
    named = dict(model.named_modules())
    explicit = collect_input_stats(model, batches, {"0.up": named["0.up"], "2": named["2"]})
    for name in explicit:
        assert torch.equal(stats[name].gram, explicit[name].gram)
        assert stats[name].tokens == explicit[name].tokens == 300


def test_collect_input_stats_argument_errors():
    model = Net()
    with pytest.raises(ValueError, match=r"^collect_input_stats: modules is empty$"):
        collect_input_stats(model, [torch.zeros(2, 48)], {})
    # the root is not one of its own layers: a bare nn.Linear has none below it
    for bare in (nn.Linear(4, 4), nn.Sequential(nn.ReLU())):
        with pytest.raises(
            ValueError,
            match=r"modules is empty \(modules=None selects every nn\.Linear below the root "
            rf"of the model, and {type(bare).__name__} has none\)",
        ):
            collect_input_stats(bare, [torch.zeros(2, 4)])
    with pytest.raises(
        TypeError, match=r"modules must be a mapping \{name: module\} or None, got list"
    ):
        collect_input_stats(model, [torch.zeros(2, 48)], [model.q])  # type: ignore[arg-type]
    assert all(not m._forward_pre_hooks for m in model.modules())


class DropNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin1 = nn.Linear(16, 32)
        self.drop = nn.Dropout(0.5)
        self.lin2 = nn.Linear(32, 16)
        self.sub = nn.Sequential(nn.Linear(16, 16), nn.Dropout(0.5), nn.Linear(16, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sub(self.lin2(self.drop(torch.relu(self.lin1(x)))))


def modes(model: nn.Module) -> dict[str, bool]:
    return {name: m.training for name, m in model.named_modules()}


def test_dropout_is_off_and_every_mode_is_restored(gen):
    torch.manual_seed(0)
    model = DropNet()
    model.sub[1].eval()  # mixed: sub trains, its dropout does not
    before = modes(model)
    assert before[""] and before["drop"] and before["sub"] and not before["sub.1"]
    reference = DropNet()
    reference.load_state_dict(model.state_dict())
    reference.eval()
    batches = [torch.randn(64, 16, generator=gen) for _ in range(3)]
    stats = collect_input_stats(model, batches)
    expected = collect_input_stats(reference, batches)
    assert list(stats) == ["lin1", "lin2", "sub.0", "sub.2"]
    for name in stats:  # the same computation, dropout off: bit for bit
        assert torch.equal(stats[name].gram, expected[name].gram)
        assert stats[name].tokens == expected[name].tokens == 192
    assert modes(model) == before
    assert not any(modes(reference).values())


def test_modes_and_hooks_are_restored_when_a_batch_raises(gen):
    model = DropNet()
    model.sub.eval()
    model.sub[2].train()
    before = modes(model)

    def batches():
        yield torch.randn(2, 16, generator=gen)
        raise RuntimeError("bad batch")

    with pytest.raises(RuntimeError, match="bad batch"):
        collect_input_stats(model, batches())
    assert modes(model) == before
    assert all(not m._forward_pre_hooks for m in model.modules())


class MaskedToy(nn.Module):
    """Takes ``x`` of shape (batch, tokens, 8) and an ``attention_mask`` it ignores, as a
    transformer's linear layers do (padding rows are computed, then never looked at)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.k = nn.Linear(8, 16)  # shares its input with a
        self.flat = nn.Linear(16, 8)  # sees the tokens flattened, (batch * tokens, 16)
        self.pool = nn.Linear(8, 4)  # sees one vector per sequence: cannot be masked

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x) + self.k(x))
        return self.flat(rearrange(h, "b t d -> (b t) d")).sum() + self.pool(x[:, 0]).sum()


def right_padding(lengths: list[int], width: int) -> torch.Tensor:
    """An attention mask (1 = token, 0 = padding) for sequences padded on the right."""
    return (torch.arange(width) < torch.tensor(lengths)[:, None]).long()


def test_padding_is_left_out_of_a_plain_model(gen):
    torch.manual_seed(0)
    model = MaskedToy()
    lengths = [6, 3, 5, 1, 6, 2, 4, 6, 3, 5]
    mask = right_padding(lengths, 6)
    x = torch.randn(10, 6, 8, generator=gen)
    tokens = int(mask.sum())  # 41
    # the same sequences with 4 more padding columns, filled with large junk
    junk = 1e3 * torch.randn(10, 4, 8, generator=gen)
    x_long = torch.cat([x, junk], dim=1)
    x_long[:, :6][mask == 0] = 1e3
    mask_long = torch.cat([mask, torch.zeros(10, 4, dtype=mask.dtype)], dim=1).bool()
    runs = []
    for batch in ({"x": x, "attention_mask": mask}, {"x": x_long, "attention_mask": mask_long}):
        with pytest.warns(
            UserWarning,
            match=r"the inputs of 1 layer \(pool\) do not match the batches' attention_mask "
            r"in shape .*; their statistics include padding",
        ):
            runs.append(collect_input_stats(model, [batch]))
    stats, padded = runs
    real = x[mask.bool()].double()
    with torch.no_grad():
        h = torch.relu(model.a(real.float()) + model.k(real.float())).double()
    # float32 GEMMs of the same tokens, against a float64 reference
    assert torch.allclose(stats["a"].gram, real.mT @ real, rtol=1e-5, atol=1e-5)
    assert torch.allclose(stats["flat"].gram, h.mT @ h, rtol=1e-5, atol=1e-5)
    assert torch.equal(stats["a"].gram, stats["k"].gram)  # one masked GEMM, shared
    assert stats["a"].tokens == stats["k"].tokens == stats["flat"].tokens == tokens
    pooled = x[:, 0].double()
    assert stats["pool"].tokens == 10  # taken whole
    assert torch.allclose(stats["pool"].gram, pooled.mT @ pooled, rtol=1e-5, atol=1e-5)
    for name in stats:  # more padding, however large, changes nothing
        assert padded[name].tokens == stats[name].tokens
        assert torch.allclose(padded[name].gram, stats[name].gram, rtol=1e-5, atol=1e-6)


def right_padded_ids(gen: torch.Generator, lengths: list[int], width: int) -> dict:
    """Token ids (pad id 0) and attention masks for sequences of ``lengths``, padded to
    ``width`` and to ``width + 7``."""
    ids = torch.randint(1, 100, (len(lengths), width), generator=gen)
    out = []
    for w in (width, width + 7):
        mask = right_padding(lengths, w)
        padded = torch.zeros(len(lengths), w, dtype=torch.long)
        padded[:, :width] = ids
        out.append({"input_ids": padded * mask, "attention_mask": mask})
    return out


LENGTHS = [20, 17, 12, 20, 5, 9, 20, 14]  # 117 tokens


def assert_padding_changes_nothing(model: nn.Module, gen: torch.Generator) -> list[str]:
    """Collect statistics of one batch padded to two widths; return the warnings."""
    short, long = right_padded_ids(gen, LENGTHS, 20)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stats = collect_input_stats(model, [short])
        padded = collect_input_stats(model, [long])
    assert stats.keys() == padded.keys()
    for name in stats:
        assert padded[name].tokens == stats[name].tokens
        # float32 activations; attention over 7 more (masked) keys rounds differently
        assert torch.allclose(padded[name].gram, stats[name].gram, rtol=1e-5, atol=1e-6), name
    assert all(s.tokens == sum(LENGTHS) for n, s in stats.items() if n != "pooler.dense")
    return [str(w.message) for w in caught]


def test_padding_is_left_out_of_bert(gen):
    model = tiny_bert().train()  # in train mode: dropout is on until collected
    assert model.training
    caught = assert_padding_changes_nothing(model, gen)
    assert model.training
    # the pooler reads each sequence's first token: one vector per sequence, unmaskable
    unmasked = [m for m in caught if "their statistics include padding" in m]
    assert len(unmasked) == 2 and all("1 layer (pooler.dense)" in m for m in unmasked)
    few = [m for m in caught if "rank-deficient" in m]
    assert len(few) == 2 and all("pooler.dense saw 8 tokens" in m for m in few)


def test_padding_is_left_out_of_llama(gen):
    model = tiny_llama(heads=2, kv_heads=1, vocab=100).train()
    assert assert_padding_changes_nothing(model, gen) == []  # every layer matched the mask


def test_too_few_tokens_warn_once_naming_the_layers(gen):
    model = Net()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        collect_input_stats(model, [torch.randn(2, 2, 48, generator=gen)])
    assert [str(w.message) for w in caught] == [
        "collect_input_stats: 4 layers saw fewer tokens than inputs (q saw 4 tokens, fewer "
        "than its 48 inputs; k saw 4 tokens, fewer than its 48 inputs; up saw 4 tokens, "
        "fewer than its 48 inputs; ...); their statistics are rank-deficient: calibrate on "
        "more text"
    ]
    with pytest.warns(
        UserWarning,
        match=r"^collect_input_stats: 1 layer saw fewer tokens than inputs \(down saw 100 "
        r"tokens, fewer than its 128 inputs\); their statistics are rank-deficient: "
        r"calibrate on more text$",
    ):
        collect_input_stats(model, [torch.randn(100, 48, generator=gen)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # enough tokens: no warning
        collect_input_stats(model, [torch.randn(128, 48, generator=gen)])


def test_no_tokens_raise_and_restore_the_model(gen):
    model = MaskedToy()
    model.k.eval()
    before = modes(model)
    x = torch.randn(3, 5, 8, generator=gen)
    padding_only = {"x": x, "attention_mask": torch.zeros(3, 5, dtype=torch.long)}
    with pytest.raises(
        ValueError,
        match=r"^collect_input_stats: the calibration batches yielded no tokens: the "
        r"attention_mask of every one of the 2 batches is all zeros \(all padding\); "
        r"calibrate on batches with unmasked tokens$",
    ):
        collect_input_stats(model, [padding_only, padding_only], {"a": model.a, "k": model.k})
    with pytest.raises(
        ValueError,
        match=r"yielded no tokens: 1 batch ran \(0 with an all-zero attention_mask\), but "
        r"the observed layers' inputs held no token",
    ):
        collect_input_stats(Net(), [torch.zeros(0, 48)])
    with pytest.raises(ValueError, match=r"^collect_input_stats: batches is empty$"):
        collect_input_stats(model, iter([]))
    assert modes(model) == before
    assert all(not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("call", ["convert_model", "compress"])
def test_calibration_must_be_batches_not_text_or_one_batch(call):
    from lowrank_layers import compress

    model = Net()
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def run(calibration):
        if call == "compress":
            return compress(model, calibration, budget=0.5)
        return convert_model(model, rank=8, calibration=calibration)

    with pytest.raises(TypeError, match=r"^calibration takes a list of batches the model runs "
                       r"on, got a str; tokenize text first: text_batches\(tokenizer, texts\) "
                       r"from lowrank_layers\.text$"):  # fmt: skip
        run("some calibration text")
    with pytest.raises(TypeError, match=r"^calibration takes a list of batches the model runs "
                       r"on, got a list of str; tokenize text first: text_batches"):  # fmt: skip
        run(["one document", "another"])
    batch = {"input_ids": torch.zeros(2, 3, dtype=torch.long), "attention_mask": torch.ones(2, 3)}
    with pytest.raises(TypeError, match=r"^calibration takes an iterable of batches, got a "
                       r"mapping with keys \['input_ids', 'attention_mask'\]: one batch goes "
                       r"in a list, calibration=\[batch\]"):  # fmt: skip
        run(batch)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


@pytest.mark.parametrize("n", [48, 600, 1100])  # one panel, two, three uneven
def test_whitening_factor_works_on_its_own_copy_and_matches_the_direct_form(gen, n):
    """Symmetrized and regularised in place by row panels: the caller's float64 matrix is
    untouched, and ``L·Lᵀ`` is ``(C + Cᵀ)/2 + εI`` with ``ε = 1e-6·trace/n``."""
    X = torch.randn(n + 50, n, generator=gen, dtype=torch.float64)
    C = X.mT @ X / len(X)
    C = C + 1e-9 * torch.randn(n, n, generator=gen, dtype=torch.float64)  # not quite symmetric
    before = C.clone()
    L = whitening_factor(C, n)
    assert torch.equal(C, before)
    sym = (C + C.mT) / 2
    target = sym + 1e-6 * float(sym.diagonal().sum()) / n * torch.eye(n, dtype=torch.float64)
    assert torch.equal(L, torch.linalg.cholesky(target))
    cross = C.clone()
    factorize(torch.randn(8, n, generator=gen), rank=2, input_cov=C, cross_cov=cross)
    assert torch.equal(C, before) and torch.equal(cross, before)
