"""Calibration text (``lowrank_layers.text``): documents read from a folder or a file, and
the tokenized batches built from them."""

import pytest
import torch

from lowrank_layers.text import read_texts, text_batches


def test_read_texts_reads_each_txt_of_a_folder_in_order(tmp_path):
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "b.txt").write_text("second\n")
    (docs / "a.txt").write_text("  first  ")
    (docs / "sub" / "c.txt").write_text("third")
    (docs / "empty.txt").write_text("\n\n")  # dropped
    (docs / "notes.md").write_text("not a .txt")
    assert read_texts(docs) == ["first", "second", "third"]
    assert read_texts(docs, limit=2) == ["first", "second"]


def test_read_texts_splits_a_file_at_blank_lines(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("one\nstill one\n\ntwo\n\n\n\nthree\n")
    assert read_texts(path) == ["one\nstill one", "two", "three"]
    assert read_texts(path, limit=1) == ["one\nstill one"]


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
