"""Converting checkpoints of real architectures without model code
(``lowrank_layers.offline``): GPT-2's Conv1D orientation, Mixtral's experts, and a
sentence-transformers folder that reloads low rank."""

import json
from pathlib import Path

import pytest
import torch

from lowrank_layers import LowRankLinear, convert_model

from .helpers import saved, tiny_gpt2, tiny_mixtral, tokens

transformers = pytest.importorskip("transformers")

# the tiny models' 32- and 64-wide layers are too small to gain: the guard would keep them
# dense, and these tests are about checkpoints
NO_GUARD = {"guard": False}


def test_convert_checkpoint_orients_gpt2_conv1d_and_loads_into_gpt2(tmp_path, gen):
    from lowrank_layers import convert_checkpoint, load_lowrank

    model = tiny_gpt2()
    src = saved(model, tmp_path / "gpt2")
    report = convert_checkpoint(src, tmp_path / "out", rank=4, **NO_GUARD)
    rows = {r.name: r for r in report.converted}
    assert len(rows) == 8
    assert (rows["transformer.h.0.attn.c_attn"].in_features,
            rows["transformer.h.0.attn.c_attn"].out_features) == (32, 96)  # fmt: skip
    assert (rows["transformer.h.1.mlp.c_proj"].in_features,
            rows["transformer.h.1.mlp.c_proj"].out_features) == (128, 32)  # fmt: skip
    loaded = load_lowrank(transformers.GPT2LMHeadModel(model.config), tmp_path / "out").eval()
    assert isinstance(loaded.transformer.h[0].mlp.c_fc, LowRankLinear)
    convert_model(model, rank=4, exclude=["lm_head"], **NO_GUARD)  # the same factors
    x = tokens(gen)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=1e-5, atol=1e-5)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["quantization_config"]["layers"]["transformer.h.0.attn.c_attn"]["rank"] == 4


def test_convert_checkpoint_does_not_guess_conv1d_without_a_config(tmp_path):
    from lowrank_layers import convert_checkpoint

    src = Path(saved(tiny_gpt2(), tmp_path / "gpt2")) / "model.safetensors"
    bare = tmp_path / "bare" / "gpt2.safetensors"
    bare.parent.mkdir()
    bare.write_bytes(src.read_bytes())
    with pytest.raises(ValueError, match=r"transformer.h.0.attn.c_attn.weight is named like a "
                       r"GPT-2 Conv1D weight.*pass conv1d=True"):  # fmt: skip
        convert_checkpoint(bare, tmp_path / "a.safetensors", rank=4)
    report = convert_checkpoint(bare, tmp_path / "b.safetensors", rank=4, conv1d=True)
    assert {r.name: r.out_features for r in report.converted}["transformer.h.0.mlp.c_fc"] == 128
    plain = convert_checkpoint(bare, tmp_path / "c.safetensors", rank=4, conv1d=False)
    assert {r.name: r.out_features for r in plain.converted}["transformer.h.0.mlp.c_fc"] == 32
    with pytest.raises(TypeError, match=r"conv1d must be a regex string or a list"):
        convert_checkpoint(bare, tmp_path / "d.safetensors", rank=4, conv1d=3)


def test_convert_checkpoint_keeps_experts_loadable_and_reports_fused_tensors(tmp_path, gen):
    from safetensors.torch import save_file

    from lowrank_layers import convert_checkpoint, load_pretrained

    model = tiny_mixtral()
    src = saved(model, tmp_path / "moe")  # transformers 5 writes block_sparse_moe.experts.<i>
    report = convert_checkpoint(
        src, tmp_path / "out", param_ratio=0.5, exclude=["lm_head"], **NO_GUARD
    )
    renamed = [r for r in report.skipped if ".block_sparse_moe." in r.name]
    assert len(renamed) == 13  # 12 expert matrices and the router
    assert all(r.reason.startswith("transformers converts this tensor when loading the model")
               for r in renamed)  # fmt: skip
    projections = {r.name.rsplit(".", 1)[-1] for r in report.converted}
    assert projections == {"q_proj", "k_proj", "v_proj", "o_proj"}
    loaded = load_pretrained(tmp_path / "out")  # transformers renames the rest on load
    assert isinstance(loaded.model.layers[0].self_attn.q_proj, LowRankLinear)
    reference = tiny_mixtral()
    convert_model(reference, param_ratio=0.5, exclude=["lm_head"], **NO_GUARD)
    x = tokens(gen)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, reference(x).logits, rtol=1e-5, atol=1e-5)
    # fused tensors in a checkpoint are reported with their size
    fused = tmp_path / "fused.safetensors"
    save_file({"layers.0.experts.gate_up_proj": torch.zeros(4, 128, 32),
               "layers.0.proj.weight": torch.randn(64, 64, generator=gen)}, fused)  # fmt: skip
    rows = {r.name: r for r in convert_checkpoint(fused, tmp_path / "f.safetensors", rank=4).layers}
    assert rows["layers.0.experts.gate_up_proj"].params_before == 4 * 128 * 32
    assert rows["layers.0.experts.gate_up_proj"].reason == (
        "fused 3-D expert tensor (4x128x32) is not converted"
    )
    assert rows["layers.0.proj"].converted


def sentence_folder(tmp_path) -> Path:
    """A sentence-transformers-like folder around a tiny BERT."""
    config = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        vocab_size=64, max_position_embeddings=32,
    )  # fmt: skip
    torch.manual_seed(0)
    folder = Path(saved(transformers.BertModel(config).eval(), tmp_path / "st"))
    (folder / "modules.json").write_text('[{"idx": 0, "path": ""}]')
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    return folder


def test_the_cli_output_folder_keeps_every_file_and_reloads_low_rank(tmp_path, gen):
    from lowrank_layers import convert_checkpoint, load_pretrained

    src = sentence_folder(tmp_path)
    convert_checkpoint(src, tmp_path / "out", param_ratio=0.5, **NO_GUARD)
    out = tmp_path / "out"
    assert (out / "modules.json").exists() and (out / "1_Pooling" / "config.json").exists()
    # every file of the source, and the model card the source folder did not have
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [*(p.name for p in src.iterdir()), "README.md"]
    )
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: lowrank-layers\n")
    assert "import lowrank_layers" in card and "load_pretrained" in card
    n = len(json.loads((out / "config.json").read_text())["quantization_config"]["layers"])
    assert f"checkpoint: {n} linear layers" in card
    model = load_pretrained(out)
    assert not model.training
    assert isinstance(model.encoder.layer[0].intermediate.dense, LowRankLinear)
    again = transformers.AutoModel.from_pretrained(out)  # lowrank_layers is imported here
    x = tokens(gen)
    with torch.no_grad():
        assert torch.equal(again.eval()(x).last_hidden_state, model(x).last_hidden_state)


@pytest.mark.slow
def test_a_dense_load_of_a_cli_folder_fails_loudly(tmp_path):
    import subprocess
    import sys

    from lowrank_layers import convert_checkpoint

    convert_checkpoint(sentence_folder(tmp_path), tmp_path / "out", param_ratio=0.5, **NO_GUARD)
    code = (
        "import sys, transformers\n"
        f"transformers.AutoModel.from_pretrained({str(tmp_path / 'out')!r})\n"
        "assert 'lowrank_layers' not in sys.modules\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode != 0
    assert "lowrank-layers" in run.stderr  # transformers names the quant_method it lacks


def test_convert_checkpoint_warns_about_an_exclude_that_matches_nothing(tmp_path):
    import warnings

    from safetensors.torch import save_file

    from lowrank_layers import convert_checkpoint

    gen = torch.Generator().manual_seed(0)
    src = tmp_path / "mlp.safetensors"
    save_file({f"layers.{i}.fc.weight": torch.randn(32, 32, generator=gen) for i in range(2)},
              src)  # fmt: skip
    with pytest.warns(UserWarning, match=r"^exclude 'lm_head' matches no module, so it "
                      r"excludes nothing"):  # fmt: skip
        report = convert_checkpoint(
            src, tmp_path / "a.safetensors", rank=4, exclude=["lm_head"], **NO_GUARD
        )
    assert len(report.converted) == 2
    with pytest.warns(UserWarning, match=r"^exclude 'fc' matches no module"):
        convert_checkpoint(src, tmp_path / "b.safetensors", rank=4, exclude="fc", **NO_GUARD)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for i, exclude in enumerate([["layers.0.fc"], ["layers.1.fc"], r"layers\.0\..*"]):
            report = convert_checkpoint(src, tmp_path / f"{i}.safetensors", rank=4,
                                        exclude=exclude, **NO_GUARD)  # fmt: skip
            assert len(report.converted) == 1
