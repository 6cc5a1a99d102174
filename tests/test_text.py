"""Calibration text (``lowrank_layers.text``): documents read from a folder or a file, and
the tokenized batches built from them."""

import pytest
import torch

from lowrank_layers.text import read_texts, text_batches


def test_read_texts_reads_each_txt_of_a_folder(tmp_path):
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "b.txt").write_text("second\n")
    (docs / "a.txt").write_text("  first  ")
    (docs / "sub" / "c.txt").write_text("third")
    (docs / "empty.txt").write_text("\n\n")  # dropped
    (docs / "notes.md").write_text("not a .txt")
    assert sorted(read_texts(docs)) == ["first", "second", "third"]
    assert len(read_texts(docs, limit=2)) == 2


def _corpus(root, sizes):
    """A folder per class, as BBC News keeps them: ``{class: n files}``, sorted by class."""
    for name, n in sizes.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            (root / name / f"{i:03d}.txt").write_text(f"{name} {i}")
    return root


def test_read_texts_draws_across_subfolders_with_a_seed(tmp_path):
    sizes = {"business": 30, "entertainment": 20, "politics": 25, "sport": 30, "tech": 5}
    root = _corpus(tmp_path / "bbc", sizes)
    texts = read_texts(root, limit=12, seed=0)
    assert len(texts) == 12 and len(set(texts)) == 12
    classes = [t.split()[0] for t in texts]
    # round-robin: 12 documents over 5 folders give each folder 2 or 3
    assert sorted(classes.count(c) for c in sizes) == [2, 2, 2, 3, 3]
    assert read_texts(root, limit=12, seed=0) == texts  # the seed decides
    other = read_texts(root, limit=12, seed=1)
    assert other != texts and sorted({t.split()[0] for t in other}) == sorted(sizes)
    # not the first files of each folder either: the files are shuffled within a folder
    assert any(int(t.split()[1]) >= 3 for t in texts)
    # a limit above a folder's size takes the rest from the others; no limit takes all
    assert len(read_texts(root, limit=100, seed=0)) == 100
    assert sum(t.startswith("tech") for t in read_texts(root, limit=100, seed=0)) == 5
    assert len(read_texts(root, seed=0)) == sum(sizes.values())


def test_read_texts_draws_a_files_documents_with_a_seed(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(f"doc {i}" for i in range(50)))
    texts = read_texts(path, limit=10, seed=3)
    assert len(texts) == 10 and texts == read_texts(path, limit=10, seed=3)
    numbers = [int(t.split()[1]) for t in texts]
    assert numbers == sorted(numbers) and numbers != list(range(10))  # in file order, drawn


def test_read_texts_splits_a_file_at_blank_lines(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("one\nstill one\n\ntwo\n\n\n\nthree\n")
    assert read_texts(path) == ["one\nstill one", "two", "three"]
    assert len(read_texts(path, limit=1)) == 1


def test_read_texts_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"calibration text .*missing does not exist"):
        read_texts(tmp_path / "missing")
    (tmp_path / "blank.txt").write_text("\n \n\n")
    with pytest.raises(ValueError, match=r"blank\.txt holds no non-empty document"):
        read_texts(tmp_path / "blank.txt")


class WordTokenizer:
    """A stand-in for a transformers tokenizer: one token per word, padded to the longest."""

    pad_token = None
    eos_token = "</s>"

    def __init__(self) -> None:
        self.calls: list[tuple[list[str], int]] = []

    def __call__(self, texts, *, return_tensors, padding, truncation, max_length):
        assert (return_tensors, padding, truncation) == ("pt", True, True)
        self.calls.append((texts, max_length))
        lengths = [min(len(t.split()), max_length) for t in texts]
        ids = torch.zeros(len(texts), max(lengths), dtype=torch.long)
        for i, n in enumerate(lengths):
            ids[i, :n] = torch.arange(1, n + 1)
        return {"input_ids": ids, "attention_mask": (ids > 0).long(), "token_type_ids": ids * 0}


def test_text_batches_are_padded_batches_of_ids_and_mask():
    tokenizer = WordTokenizer()
    texts = ["a b c", "d", "e f g h i", "j k", "l"]
    batches = text_batches(tokenizer, texts, max_length=4, batch_size=2)
    assert tokenizer.pad_token == "</s>"  # a tokenizer without one pads with its eos token
    assert [texts for texts, _ in tokenizer.calls] == [texts[0:2], texts[2:4], texts[4:]]
    assert all(max_length == 4 for _, max_length in tokenizer.calls)
    assert [sorted(b) for b in batches] == [["attention_mask", "input_ids"]] * 3
    assert [tuple(b["input_ids"].shape) for b in batches] == [(2, 3), (2, 4), (1, 1)]
    assert batches[0]["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_text_batches_refuses_a_bare_string():
    with pytest.raises(TypeError, match=r"texts must be a list of documents, got a str: pass a "
                       r"list, text_batches\(tokenizer, \[text\]\)"):  # fmt: skip
        text_batches(WordTokenizer(), "one document, not fifty characters")
