"""plot_spectra: a PNG written atomically, its validation, the missing-extra error."""

import os
import stat
import sys

import pytest
import torch

from lowrank_layers.plotting import _evenly_spaced, plot_spectra

pytest.importorskip("matplotlib", reason="needs the [plot] extra")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def spectra_of(count: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    shapes = [(32, 16), (24, 48), (40, 40)]
    return {
        f"layer{i}": torch.linalg.svdvals(torch.randn(*shapes[i % 3], generator=gen))
        for i in range(count)
    }


def assert_png_alone(tmp_path, name: str) -> None:
    """The PNG exists and is the only file: no temporary file left behind."""
    path = tmp_path / name
    assert path.read_bytes().startswith(PNG_SIGNATURE)
    assert [p.name for p in tmp_path.iterdir()] == [name]


@pytest.mark.parametrize("count", [1, 5, 60])
def test_writes_a_png(tmp_path, gen, count):
    plot_spectra(spectra_of(count, gen), tmp_path / "spectra.png", title="test", max_lines=40)
    assert_png_alone(tmp_path, "spectra.png")


def test_replaces_an_existing_file_and_accepts_str_paths(tmp_path, gen):
    path = tmp_path / "spectra.png"
    path.write_bytes(b"old")
    plot_spectra(spectra_of(2, gen), str(path))
    assert_png_alone(tmp_path, "spectra.png")


def test_the_png_gets_the_usual_permissions(tmp_path, gen):
    """The temporary file is not mkstemp's 0600: the result is as readable as any new file."""
    umask = os.umask(0)
    os.umask(umask)
    plot_spectra(spectra_of(1, gen), tmp_path / "s.png")
    assert stat.S_IMODE((tmp_path / "s.png").stat().st_mode) == 0o666 & ~umask


def test_zeros_and_unsorted_values_are_drawn(tmp_path):
    spectra = {
        "rank-deficient": torch.tensor([3.0, 1.0, 0.0, 0.0]),
        "all zero": torch.zeros(5),
        "unsorted": torch.tensor([0.5, 2.0, 1.0]),
    }
    plot_spectra(spectra, tmp_path / "s.png")
    assert_png_alone(tmp_path, "s.png")


def test_evenly_spaced_subset_is_deterministic_and_spans_the_list():
    picked = _evenly_spaced(100, 40)
    assert len(set(picked)) == 40 and picked == sorted(picked)
    assert picked[0] == 0 and picked[-1] == 99
    assert _evenly_spaced(100, 40) == picked
    assert _evenly_spaced(7, 1) == [0]


@pytest.mark.parametrize(
    ("spectra", "error", "match"),
    [
        ({}, ValueError, "spectra is empty"),
        ({"q": torch.ones(3, 2)}, ValueError, r"spectra\['q'\] must be a 1-D .* shape \(3, 2\)"),
        ({"q": torch.tensor(1.0)}, ValueError, r"spectra\['q'\] .* shape \(\)"),
        ({"q": torch.ones(0)}, ValueError, r"spectra\['q'\] is empty"),
        ({"q": torch.tensor([1.0, -1.0])}, ValueError, r"spectra\['q'\] must hold finite"),
        ({"q": torch.tensor([float("nan")])}, ValueError, r"spectra\['q'\] must hold finite"),
        ({"q": [1.0, 0.5]}, TypeError, r"spectra\['q'\] must be a torch.Tensor"),
        ([torch.ones(3)], TypeError, "spectra must be a mapping"),
    ],
)
def test_bad_spectra_raise(tmp_path, spectra, error, match):
    with pytest.raises(error, match=match):
        plot_spectra(spectra, tmp_path / "s.png")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("max_lines", [0, -3, 2.5, True])
def test_bad_max_lines_raises(tmp_path, max_lines):
    with pytest.raises(ValueError, match=rf"max_lines must be a positive int, got {max_lines!r}"):
        plot_spectra({"q": torch.ones(3)}, tmp_path / "s.png", max_lines=max_lines)


def test_missing_directory_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="path's directory does not exist"):
        plot_spectra({"q": torch.ones(3)}, tmp_path / "nowhere" / "s.png")


def test_missing_matplotlib_names_the_extra(tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"pip install 'lowrank-layers\[plot\]'"):
        plot_spectra({"q": torch.ones(3)}, tmp_path / "s.png")
    assert list(tmp_path.iterdir()) == []


def test_failed_save_leaves_no_temporary_file(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    def broken_savefig(self, *args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken_savefig)
    with pytest.raises(RuntimeError, match="disk full"):
        plot_spectra({"q": torch.ones(3)}, tmp_path / "s.png")
    assert list(tmp_path.iterdir()) == []
