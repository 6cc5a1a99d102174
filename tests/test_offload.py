"""Compressing from disk, one block at a time (``lowrank_layers.offload``): the same
result as ``compress`` in memory, one block's weights resident at a time, and the errors."""

from __future__ import annotations

import copy
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lowrank_layers import ConversionConfig, compress, load_pretrained  # noqa: E402
from lowrank_layers.hf import convert_pretrained  # noqa: E402
from lowrank_layers.layer_plan import OUTSIDE_BLOCKS_REASON  # noqa: E402
from lowrank_layers.offload import DiskModel, compress_offloaded  # noqa: E402
from lowrank_layers.pipeline import Offload, run_compress  # noqa: E402
from lowrank_layers.safetensors_io import CheckpointError  # noqa: E402
from lowrank_layers.targets import ON_DISK  # noqa: E402

from .helpers import token_batches  # noqa: E402


def _llama(tied: bool, layers: int = 3):
    """A Llama large enough that low rank pays in some layers (hidden 64, MLP 160)."""
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=160, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=64, tie_word_embeddings=tied,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("tied", [True, False])
def test_offloaded_compress_gives_what_compress_gives_in_memory(tmp_path, gen, tied):
    model = _llama(tied)
    src, dst = tmp_path / "src", tmp_path / "dst"
    model.save_pretrained(src)
    batches = token_batches(4, gen, length=48)
    config = ConversionConfig(budget=0.7, exclude=["lm_head"])
    in_memory = copy.deepcopy(model)
    expected = compress(in_memory, batches, config)
    report = compress_offloaded(src, dst, batches, config)
    assert report.plan == expected.plan and any(r is not None for r in report.plan.values())
    assert report.narrowed.keys() == expected.narrowed.keys()
    assert [e.rank for e in report.conversion.layers] == [
        e.rank for e in expected.conversion.layers
    ]
    assert set(report.costs) == {"allocation", "conversion"}
    assert all(c.peak_rss for c in report.costs.values())
    assert sorted(p.name for p in dst.iterdir()) == [
        "README.md", "config.json", "generation_config.json", "model.safetensors",
    ]  # fmt: skip
    config_json = json.loads((dst / "config.json").read_text())
    assert config_json["quantization_config"]["quant_method"] == "lowrank-layers"
    loaded = load_pretrained(dst)
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == tied
    ids = batches[0]["input_ids"]
    with torch.no_grad():
        want, got = in_memory(ids).logits, loaded(ids).logits
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)


def test_an_encoder_is_compressed_from_disk_as_in_memory(tmp_path, gen):
    """BERT: blocks that return tuples, the hidden-state ("mse") objective, a pooler
    outside the blocks."""
    config = transformers.BertConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=160,
        vocab_size=64,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    src, dst = tmp_path / "src", tmp_path / "dst"
    model.save_pretrained(src)
    batches = token_batches(3, gen)
    conversion = ConversionConfig(budget=0.6)
    in_memory = copy.deepcopy(model)
    expected = compress(in_memory, batches, conversion)
    report = compress_offloaded(src, dst, batches, conversion)
    assert report.plan == expected.plan and any(r is not None for r in report.plan.values())
    loaded = load_pretrained(dst)
    ids = batches[0]["input_ids"]
    with torch.no_grad():
        want = in_memory(ids).last_hidden_state
        got = loaded(ids).last_hidden_state
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)


def test_layers_outside_the_blocks_stay_dense_with_the_reason(tmp_path, gen):
    src = tmp_path / "src"
    _llama(False, layers=2).save_pretrained(src)
    report = compress_offloaded(src, tmp_path / "dst", token_batches(2, gen), budget=0.7,
                                guard=False)  # keywords as for compress  # fmt: skip
    assert report.plan is not None
    entry = next(e for e in report.conversion.layers if e.name == "lm_head")
    assert entry.reason == OUTSIDE_BLOCKS_REASON and entry.rank is None


def test_one_block_is_loaded_at_a_time(tmp_path, gen, monkeypatch):
    """Whatever runs (the MLP check, the gradient pass, the propagation, the writing), the
    parameters read from disk belong to at most one block at a time."""
    src = tmp_path / "src"
    _llama(False, layers=3).save_pretrained(src)
    most = []
    load = DiskModel.load

    def counting(self, module, **kwargs):
        done = load(self, module, **kwargs)
        blocks = self.model.model.layers
        most.append(sum(any(e.loaded for e in self.entries(b)) for b in blocks))
        return done

    monkeypatch.setattr(DiskModel, "load", counting)
    compress_offloaded(src, tmp_path / "dst", token_batches(3, gen),
                       ConversionConfig(budget=0.6, exclude=["lm_head"]))  # fmt: skip
    assert len(most) > 20 and max(most) == 1


def test_disk_model_reads_and_releases_parameters(tmp_path, gen):
    model = _llama(True, layers=2)
    src = tmp_path / "src"
    model.save_pretrained(src)
    ids = token_batches(1, gen)[0]["input_ids"]
    with DiskModel.from_folder(src) as disk:
        skeleton = disk.model
        assert all(p.is_meta and getattr(p, ON_DISK) for p in skeleton.parameters())
        assert skeleton.lm_head.weight is skeleton.model.embed_tokens.weight
        block = skeleton.model.layers[1]
        loaded = disk.load(block)
        assert len(loaded) == len(list(block.parameters())) == 9
        assert torch.equal(block.mlp.up_proj.weight, model.model.layers[1].mlp.up_proj.weight)
        disk.unload(loaded)
        assert all(p.is_meta for p in block.parameters())
        disk.load(skeleton.lm_head)  # tied: one read for both places
        assert skeleton.model.embed_tokens.weight is skeleton.lm_head.weight
        assert not skeleton.model.embed_tokens.weight.is_meta
        disk.unload(disk.entries(skeleton.lm_head))
        with disk.streaming(list(skeleton.model.layers)), torch.no_grad():
            got = skeleton(ids).logits
        assert all(p.is_meta for p in skeleton.parameters())  # all dropped after the pass
    with torch.no_grad():
        assert torch.allclose(got, model(ids).logits, rtol=1e-6, atol=1e-6)


def test_disk_model_errors(tmp_path):
    from safetensors.torch import load_file, save_file

    src = tmp_path / "src"
    _llama(False, layers=2).save_pretrained(src)
    state = load_file(src / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, src / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"no tensor for 1 parameter\(s\) of the model: "
                       r"model\.layers\.1\.mlp\.up_proj\.weight"):  # fmt: skip
        DiskModel.from_folder(src)
    state["model.layers.1.mlp.up_proj.weight"] = torch.zeros(3, 3)
    save_file(state, src / "model.safetensors")
    with DiskModel.from_folder(src) as disk, pytest.raises(
        ValueError, match=r"up_proj.weight: the checkpoint's tensor has shape \(3, 3\), the "
        r"model's parameter \(160, 64\)",
    ):  # fmt: skip
        disk.load(disk.model.model.layers[1])
    with pytest.raises(ValueError, match="not a transformers model folder"):
        compress_offloaded(tmp_path, tmp_path / "dst", [], ConversionConfig(budget=0.5))
    with pytest.raises(ValueError, match="give dst a folder other than src"):
        compress_offloaded(src, src, [], ConversionConfig(budget=0.5), overwrite=True)
    with pytest.raises(TypeError, match="compress_offloaded: config must be a ConversionConfig"):
        compress_offloaded(src, tmp_path / "dst", [], {"budget": 0.5})  # type: ignore[arg-type]


def test_a_failed_run_writes_nothing(tmp_path, gen, monkeypatch):
    from lowrank_layers import propagate

    src, dst = tmp_path / "src", tmp_path / "dst"
    _llama(False, layers=3).save_pretrained(src)
    calls = []

    def failing(chain, block, current):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("disk full")

    monkeypatch.setattr(propagate, "_advance", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        compress_offloaded(src, dst, token_batches(2, gen),
                           ConversionConfig(budget=0.7, exclude=["lm_head"]))  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_offload_refuses_what_it_cannot_do(tmp_path, gen):
    from lowrank_layers import HealConfig

    src = tmp_path / "src"
    _llama(True, layers=2).save_pretrained(src)
    config = ConversionConfig(budget=0.5)
    with pytest.raises(ValueError, match="offload need calibration_texts"):
        convert_pretrained(src, tmp_path / "dst", config, offload=True)
    with pytest.raises(ValueError, match=r"offload .* neither heals"):
        convert_pretrained(src, tmp_path / "dst", config, calibration_texts=["a b"],
                           offload=True, heal=HealConfig(steps=1))  # fmt: skip
    model = _llama(True, layers=2)
    offload = Offload("model.layers", list(model.model.layers), lambda b: None, lambda i: None)
    with pytest.raises(ValueError, match="neither heals nor takes eval_batches"):
        run_compress(model, token_batches(1, gen), config, offload=offload,
                     eval_batches=token_batches(1, gen))  # fmt: skip
    assert not (tmp_path / "dst").exists()


def test_dynamic_layers_are_written_as_save_lowrank_writes_them(tmp_path, gen):
    """The output is written by the same rules as ``save_lowrank`` (``stored_entries``): a
    ``DynamicLowRankLinear``'s active rank goes into the description, not the tensors, and
    ``load_lowrank`` reads it back (transformers cannot load such layers; so for
    ``convert_pretrained``'s folders too)."""
    from lowrank_layers import DynamicLowRankLinear, load_lowrank

    model = _llama(False, layers=2)
    src = tmp_path / "src"
    model.save_pretrained(src)
    batches = token_batches(3, gen)
    config = ConversionConfig(budget=0.7, exclude=["lm_head"], layer="dynamic")
    in_memory = copy.deepcopy(model)
    expected = compress(in_memory, batches, config)
    report = compress_offloaded(src, tmp_path / "dst", batches, config)
    assert report.plan == expected.plan and any(r is not None for r in report.plan.values())
    loaded = load_lowrank(transformers.LlamaForCausalLM(model.config), tmp_path / "dst")
    assert any(isinstance(m, DynamicLowRankLinear) for m in loaded.modules())
    ids = batches[0]["input_ids"]
    with torch.no_grad():
        got, want = loaded.eval()(ids).logits, in_memory(ids).logits
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
