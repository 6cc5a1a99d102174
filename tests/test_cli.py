"""The command line, run in-process: every subcommand and every user-error path."""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lowrank_layers import __version__, factorize
from lowrank_layers.checkpoint import load_lowrank, read_metadata
from lowrank_layers.checkpoint_format import guard
from lowrank_layers.cli import main
from lowrank_layers.factorize import balance_rows
from lowrank_layers.policy import layer_seed
from lowrank_layers.safetensors_io import ShardWriter
from lowrank_layers.speed import expected_speedup

from .helpers import eckart_young, matrix_with_spectrum, rel_err, saved, tiny_gpt2


@pytest.fixture
def dense_file(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 96), nn.ReLU(), nn.Linear(96, 32))
    path = tmp_path / "dense.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return path, model


def test_convert_writes_a_loadable_checkpoint_and_a_table(dense_file, tmp_path, capsys):
    src, _ = dense_file
    dst = tmp_path / "out.safetensors"
    assert main(["convert", str(src), str(dst), "--rank", "8", "--method", "randomized"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("rel.err: ") and lines[2] == ""  # the legend, then the table
    assert lines[3].split()[:5] == ["layer", "kind", "in", "out", "rank"]
    assert "converted 2 of 2 matched layers" in out and f"wrote {dst}" in out
    layers = json.loads(read_metadata(dst)["layers"])
    assert layers["0"]["rank"] == 8 and layers["2"]["rank"] == 8
    fresh = nn.Sequential(nn.Linear(32, 96), nn.ReLU(), nn.Linear(96, 32))
    load_lowrank(fresh, dst)
    assert fresh[0].rank == 8


@pytest.mark.parametrize("policy", [["--param-ratio", "0.5"], ["--energy", "0.5"]])
def test_convert_min_speedup_keeps_slow_layers_dense(policy, tmp_path, capsys):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 96), nn.ReLU(), nn.Linear(1024, 1024))
    src, dst = tmp_path / "dense.safetensors", tmp_path / "out.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, src)
    argv = ["convert", str(src), str(dst), *policy, "--min-speedup", "1.0"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("0 "))
    # a 96x32 layer: any rank is slower than nn.Linear at one token (per-call costs)
    assert "skipped: expected speed-up 0." in row and "below min_speedup=1" in row
    layers = json.loads(read_metadata(dst)["layers"])
    assert set(layers) == {"2"}
    # judged at 4096 tokens per call, the small layer pays at param_ratio 0.5
    if policy[0] == "--param-ratio":
        argv += ["--speedup-tokens", "4096", "--overwrite"]
        assert main(argv) == 0
        assert set(json.loads(read_metadata(dst)["layers"])) == {"0", "2"}


# ------------------------------------------------------------------------------------------
# convert: what each flag does to the written file
# ------------------------------------------------------------------------------------------

LAYERS = ["layers.0.q_proj", "layers.0.mlp", "layers.1.q_proj", "layers.1.mlp"]


@pytest.fixture
def blocks(tmp_path):
    """Two blocks of q_proj (48x32, with bias) and mlp (64x48), singular values from 1 down
    to 0.01, plus an embedding (100x32) and a norm."""
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for i in range(2):
        tensors[f"layers.{i}.q_proj.weight"] = matrix_with_spectrum(
            torch.logspace(0, -2, 32), 48, 32, gen, torch.float32
        )
        tensors[f"layers.{i}.q_proj.bias"] = torch.randn(48, generator=gen)
        tensors[f"layers.{i}.mlp.weight"] = matrix_with_spectrum(
            torch.logspace(0, -2, 48), 64, 48, gen, torch.float32
        )
    tensors["embed_tokens.weight"] = torch.randn(100, 32, generator=gen)
    tensors["norm.weight"] = torch.rand(32, generator=gen)
    src = tmp_path / "src.safetensors"
    save_file(tensors, src)
    return src, tensors


def _convert(src: Path, dst: Path, *flags: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """Run ``convert``; the written file's layer metadata and tensors. With ``--no-guard``:
    the guard would keep the small ``blocks`` layers dense at most ranks."""
    assert main(["convert", str(src), str(dst), "--no-progress", "--no-guard", *flags]) == 0
    return json.loads(read_metadata(dst)["layers"]), load_file(dst)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The bytes of ``t`` (``torch.equal`` is not implemented for the guards' FP4)."""
    return t.reshape(-1).view(torch.uint8)


def _dense(tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """``diag(D)·U·diag(S)·Vh`` of a stored low-rank layer."""
    U, S, Vh = (tensors[f"{name}.{k}"].double() for k in ("U", "S", "Vh"))
    W = (U * S) @ Vh
    D = tensors.get(f"{name}.D")
    return W if D is None else D.double()[:, None] * W


def _svdvals(W: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(W.double())


def _energy_rank(W: torch.Tensor, energy: float) -> int:
    s2 = _svdvals(W).square()
    return int((torch.cumsum(s2, 0) / s2.sum() < energy).sum()) + 1


@pytest.mark.parametrize(
    ("flags", "expected_rank"),
    [
        (["--rank", "5"], lambda W: 5),
        (["--rank-ratio", "0.25"], lambda W: round(0.25 * min(W.shape))),  # 8 and 12
        (["--param-ratio", "0.5"], lambda W: int(0.5 * W.numel() / (sum(W.shape) + 1))),
        (["--energy", "0.9"], lambda W: _energy_rank(W, 0.9)),
    ],
)
def test_convert_rank_policy_flags_give_the_policys_rank_and_the_svd_optimum(
    flags, expected_rank, blocks, tmp_path
):
    src, dense = blocks
    layers, out = _convert(src, tmp_path / "out.safetensors", *flags)
    assert sorted(layers) == sorted(LAYERS)  # not the embedding, not the norm (1-D)
    for name in LAYERS:
        W = dense[f"{name}.weight"]
        r = expected_rank(W)
        assert layers[name]["rank"] == r and out[f"{name}.S"].shape == (r,)
        assert (layers[name]["out_features"], layers[name]["in_features"]) == tuple(W.shape)
        # --method svd (default): the truncation error is Eckart-Young's optimum
        assert rel_err(_dense(out, name), W) == pytest.approx(
            eckart_young(_svdvals(W), r), rel=1e-3
        )
    for key in ("embed_tokens.weight", "norm.weight", "layers.0.q_proj.bias"):
        assert torch.equal(out[key], dense[key])  # copied bit for bit


def test_convert_method_randomized_is_another_accurate_factorization(blocks, tmp_path):
    src, dense = blocks
    _, svd = _convert(src, tmp_path / "svd.safetensors", "--rank", "5")
    _, rnd = _convert(src, tmp_path / "rnd.safetensors", "--rank", "5", "--method", "randomized")
    for name in LAYERS:
        W = dense[f"{name}.weight"]
        assert not torch.equal(rnd[f"{name}.U"], svd[f"{name}.U"])  # another algorithm ran
        optimum = eckart_young(_svdvals(W), 5)
        assert optimum <= rel_err(_dense(rnd, name), W) <= 1.01 * optimum
        # the sketch is seeded per layer: layer_seed(--seed, name), as convert_model's
        expected = factorize(
            W,
            rank=5,
            method="randomized",
            generator=torch.Generator().manual_seed(layer_seed(0, name)),
        )
        assert torch.equal(rnd[f"{name}.S"], expected.S)
        assert torch.equal(rnd[f"{name}.U"], expected.U)


def test_convert_seed_changes_only_the_randomized_sketches(blocks, tmp_path):
    src, _ = blocks
    randomized = ["--rank", "5", "--method", "randomized"]
    _, seed0 = _convert(src, tmp_path / "a.safetensors", *randomized)
    _, seed3 = _convert(src, tmp_path / "b.safetensors", *randomized, "--seed", "3")
    _, again = _convert(src, tmp_path / "c.safetensors", *randomized, "--seed", "3")
    assert all(torch.equal(_bits(again[k]), _bits(seed3[k])) for k in seed3)  # reproducible
    assert not any(torch.equal(seed0[f"{n}.U"], seed3[f"{n}.U"]) for n in LAYERS)
    _, svd0 = _convert(src, tmp_path / "d.safetensors", "--rank", "5")
    _, svd3 = _convert(src, tmp_path / "e.safetensors", "--rank", "5", "--seed", "3")
    assert all(torch.equal(_bits(svd0[k]), _bits(svd3[k])) for k in svd0)  # SVD draws nothing


@pytest.mark.parametrize("mode", ["rownorm", "rowsum"])
def test_convert_balance_writes_the_row_scales(mode, blocks, tmp_path):
    src, dense = blocks
    plain, plain_out = _convert(src, tmp_path / "plain.safetensors", "--rank", "5")
    assert not any(entry["balance"] for entry in plain.values())
    assert not any(key.endswith(".D") for key in plain_out)
    layers, out = _convert(src, tmp_path / "out.safetensors", "--rank", "5", "--balance", mode)
    for name in LAYERS:
        W = dense[f"{name}.weight"]
        assert layers[name]["balance"] is True
        D = out[f"{name}.D"]
        torch.testing.assert_close(D, balance_rows(W, mode), rtol=1e-6, atol=0)
        if mode == "rownorm":
            torch.testing.assert_close(D, W.norm(dim=1), rtol=1e-5, atol=0)
        # the row-weighted optimum: diag(1/D)·(W - Ŵ) is the best rank-5 error of diag(1/D)·W
        scaled = W.double() / D.double()[:, None]
        residual = (W.double() - _dense(out, name)) / D.double()[:, None]
        assert rel_err(residual + scaled, scaled) == pytest.approx(
            eckart_young(_svdvals(scaled), 5), rel=1e-3
        )
        assert rel_err(_dense(out, name), W) > rel_err(_dense(plain_out, name), W)


@pytest.mark.parametrize(
    ("flags", "selected"),
    [
        (["--include", r".*q_proj"], ["layers.0.q_proj", "layers.1.q_proj"]),
        (["--exclude", r"layers\.1\..*"], ["layers.0.q_proj", "layers.0.mlp"]),
        (["--include", r".*q_proj", "--exclude", r"layers\.1\..*"], ["layers.0.q_proj"]),
        (["--include", "q_proj"], []),  # a regex matches the whole name: nothing
    ],
)
def test_convert_include_exclude_select_the_layers(flags, selected, blocks, tmp_path, capsys):
    src, dense = blocks
    dst = tmp_path / "out.safetensors"
    if not selected:
        assert main(["convert", str(src), str(dst), "--rank", "5", *flags]) == 2
        assert "no 2-D weight" in capsys.readouterr().err and not dst.exists()
        return
    layers, out = _convert(src, dst, "--rank", "5", *flags)
    assert sorted(layers) == sorted(selected)
    for name in LAYERS:
        if name in selected:
            stored, expected = out[f"{name}.weight"], guard(out[f"{name}.U"].dtype)
            assert (stored.dtype, stored.shape) == (expected.dtype, expected.shape)  # the guard
            assert out[f"{name}.U"].shape[1] == 5
        else:
            assert f"{name}.U" not in out
            assert torch.equal(out[f"{name}.weight"], dense[f"{name}.weight"])


def test_convert_threshold_skips_small_layers(blocks, tmp_path, capsys):
    src, dense = blocks
    # 48x32 = 1536 is not above 40² = 1600; 64x48 = 3072 is
    layers, out = _convert(src, tmp_path / "out.safetensors", "--rank", "5", "--threshold", "40")
    assert sorted(layers) == ["layers.0.mlp", "layers.1.mlp"]
    report = capsys.readouterr().out
    for name in ("layers.0.q_proj", "layers.1.q_proj"):
        row = next(line for line in report.splitlines() if line.startswith(f"{name} "))
        assert "48x32 is not above threshold 40²" in row
        assert torch.equal(out[f"{name}.weight"], dense[f"{name}.weight"])
    assert "converted 2 of" in report


def test_convert_include_embeddings_factorizes_the_embedding(blocks, tmp_path):
    src, dense = blocks
    layers, out = _convert(src, tmp_path / "a.safetensors", "--rank", "5")
    assert "embed_tokens" not in layers
    assert torch.equal(out["embed_tokens.weight"], dense["embed_tokens.weight"])
    layers, out = _convert(src, tmp_path / "b.safetensors", "--rank", "5", "--embeddings")
    assert sorted(layers) == sorted([*LAYERS, "embed_tokens"])
    assert (layers["embed_tokens"]["out_features"], layers["embed_tokens"]["in_features"]) == (
        100,
        32,
    )
    W = dense["embed_tokens.weight"]
    assert rel_err(_dense(out, "embed_tokens"), W) == pytest.approx(
        eckart_young(_svdvals(W), 5), rel=1e-3
    )


def test_convert_workers_give_the_same_file_as_one_process(blocks, tmp_path):
    src, _ = blocks
    flags = ["--rank", "5", "--method", "randomized", "--seed", "3"]
    layers1, one = _convert(src, tmp_path / "one.safetensors", *flags)
    layers2, two = _convert(src, tmp_path / "two.safetensors", *flags, "--workers", "2")
    assert layers1 == layers2
    assert sorted(one) == sorted(two)
    assert all(torch.equal(_bits(one[k]), _bits(two[k])) for k in one)


def test_inspect_table_and_plot(dense_file, tmp_path, capsys):
    src, model = dense_file
    png = tmp_path / "spectra.png"
    assert main(["inspect", str(src), "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0].split()
    assert header == [
        "layer", "shape", "params", "stored", "rank", "x@1", "x@1024",
        "rank@0.9", "kept@0.9", "x@1", "rank@0.95", "kept@0.95", "x@1",
        "rank@0.99", "kept@0.99", "x@1",
    ]  # fmt: skip
    row = next(line.split() for line in out.splitlines() if line.startswith("0 "))
    assert row[1] == "96x32"
    assert row[3:6] == ["-", "-", "-"]  # a dense weight: no stored rank
    s = torch.linalg.svdvals(model[0].weight.detach())
    expected = int((torch.cumsum(s**2, 0) / (s**2).sum() < 0.9).sum()) + 1
    assert int(row[6]) == expected
    assert float(row[8]) == pytest.approx(expected_speedup(32, 96, expected, 1), abs=0.005)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["convert", "{missing}", "{out}", "--rank", "4"], "does not exist"),
        (["convert", "{junk}", "{out}", "--rank", "4"], "is not a safetensors file"),
        (["convert", "{src}", "{out}"], "one of the arguments --rank --rank-ratio"),
        (["convert", "{src}", "{out}", "--rank", "4", "--energy", "0.9"], "not allowed with"),
        (["convert", "{src}", "{out}", "--rank-ratio", "1.5"], "expected a number in (0, 1]"),
        (["convert", "{src}", "{out}", "--rank", "0"], "expected a positive integer, got 0"),
        (["convert", "{src}", "{out}", "--rank", "4", "--workers", "x"], "expected a positive"),
        (["convert", "{src}", "{out}", "--rank", "4", "--method", "qr"], "invalid choice: 'qr'"),
        (["convert", "{src}", "{out}", "--rank", "4", "--include", "("], "not a valid regular"),
        (["convert", "{src}", "{out}", "--rank", "4", "--include", "zz"], "no 2-D weight"),
        (["convert", "{src}", "{src}", "--rank", "4"], "exists (pass --overwrite to replace it)"),
        (["convert", "{src}", "{out}", "--budget", "0.5"], "need a transformers model folder"),
        (["convert", "{src}", "{out}", "--rank", "2", "--calibrate", "{missing}"], "model folder"),
        (["convert", "{src}", "{out}", "--rank", "2", "--budget", "0.5"], "not allowed with"),
        (["convert", "{src}", "{out}", "--rank", "2", "--allocation", "loss"], "shares a budget"),
        (["convert", "{src}", "{out}", "--rank", "2", "--heal-steps", "5"], "need --calibrate"),
        (["convert", "{src}", "{out}", "--rank", "2", "--no-propagate"], "need --calibrate"),
        (["convert", "{src}", "{out}", "--rank", "2", "--no-narrow-mlps"], "need --calibrate"),
        (["convert", "{src}", "{out}", "--rank", "2", "--offload"], "--offload need --calibrate"),
        (["convert", "{src}", "{out}", "--target-speedup", "1.3"], "--target-speedup need --"),
        (["convert", "{src}", "{out}", "--rank", "2", "--target-speedup", "1.3"], "not allowed"),
        (
            ["convert", "{tmp}", "{out}", "--target-speedup", "1", "--calibrate", "{tmp}"],
            "target_speedup must be a number above 1",
        ),
        (["convert", "{src}", "{out}", "--budget", "0.5", "--heal-seconds", "0"], "a number > 0"),
        (["convert", "{tmp}", "{out}", "--budget", "0.5", "--heal-steps", "5"], "need --calibrate"),
        (
            [
                "convert",
                "{tmp}",
                "{out}",
                "--budget",
                "0.5",
                "--allocation",
                "greedy",
                "--calibrate",
                "{src}",
                "--heal-steps",
                "5",
            ],
            "compress: allocation='greedy' shares the budget from the weights' spectra",
        ),
        (
            ["convert", "{tmp}", "{out}", "--budget", "0.5", "--allocation", "loss"],
            "allocation='loss' needs a gradient pass",
        ),
        (["inspect", "{missing}"], "does not exist"),
        (["inspect", "{src}", "--plot", "{out}.jpg"], "--plot must name a .png file"),
        (["inspect", "{src}", "--plot", "{missing}/x.png"], "nope does not exist"),
        (["inspect", "{src}", "--energies", "0"], "expected a number in (0, 1]"),
        (["demo"], "invalid choice: 'demo'"),  # the demo is examples/demo.py
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        ([], "the following arguments are required: command"),
    ],
)
def test_user_errors_are_one_line_exit_2_and_write_nothing(
    argv, match, dense_file, tmp_path, capsys
):
    src, _ = dense_file
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"hello, not a checkpoint")
    paths = {"src": src, "out": tmp_path / "out", "missing": tmp_path / "nope", "junk": junk,
             "tmp": tmp_path}  # fmt: skip
    before = sorted(p.name for p in tmp_path.iterdir())
    code = main([a.format(**paths) for a in argv])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("lowrank-layers: error: "), err
    assert match in err
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert __version__ in capsys.readouterr().out


def _one_error_line(capsys) -> tuple[str, str]:
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and captured.err.startswith("lowrank-layers: error: ")
    assert "Traceback" not in captured.err
    return captured.out, captured.err


def test_an_unwritable_destination_is_one_line_exit_1(dense_file, tmp_path, capsys):
    src, _ = dense_file
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["convert", str(src), str(a_file / "x.safetensors"), "--rank", "4"]) == 1
    _, err = _one_error_line(capsys)
    assert f"cannot write DST {a_file}/x.safetensors: {a_file} is a file, not a folder" in err
    assert main(["inspect", str(src), "--plot", str(a_file / "x.png")]) == 1
    out, err = _one_error_line(capsys)
    assert out == ""  # refused before the table
    assert f"cannot write --plot {a_file}/x.png: {a_file} is a file, not a folder" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() == 0,
    reason="root writes into a folder of mode 0o500 (CI runs as root)",
)
def test_a_read_only_folder_is_one_line_exit_1(dense_file, tmp_path, capsys):
    src, _ = dense_file
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        assert main(["convert", str(src), str(locked / "x.safetensors"), "--rank", "4"]) == 1
        _, err = _one_error_line(capsys)
        assert f"cannot write DST {locked}/x.safetensors: {locked}: Permission denied" in err
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o700)


def test_an_os_error_during_the_work_names_the_destination_exit_1(
    dense_file, tmp_path, capsys, monkeypatch
):
    src, _ = dense_file
    dst = tmp_path / "out.safetensors"

    def disk_full(self, name, tensor):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))

    monkeypatch.setattr(ShardWriter, "add", disk_full)
    assert main(["convert", str(src), str(dst), "--rank", "4", "--no-progress"]) == 1
    _, err = _one_error_line(capsys)
    assert err == f"lowrank-layers: error: {dst}: No space left on device\n"  # not the temp
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense.safetensors"]


def test_plot_needs_matplotlib_before_any_work(dense_file, tmp_path, capsys, monkeypatch):
    src, _ = dense_file
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # find_spec: not installed
    assert main(["inspect", str(src), "--plot", str(tmp_path / "s.png")]) == 2
    out, err = _one_error_line(capsys)
    assert out == "" and "s.png needs matplotlib: pip install 'lowrank-layers[plot]'" in err


@pytest.mark.parametrize(
    "name",
    [n for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n)],  # POSIX: both
)
def test_a_signal_unwinds_main_and_its_handler_is_restored(name, dense_file, capsys, monkeypatch):
    from lowrank_layers import cli

    src, _ = dense_file
    signum = getattr(signal, name)
    # the default disposition, as a shell leaves it (under nohup SIGHUP starts ignored, and
    # an ignored signal stays ignored: the next test)
    previous = signal.signal(signum, signal.SIG_DFL)
    seen = []

    def terminated(args):
        seen.append(signal.getsignal(signum))
        os.kill(os.getpid(), signum)
        time.sleep(5)  # the handler raises in here
        raise AssertionError(f"{name} did not unwind")

    monkeypatch.setattr(cli, "_run_inspect", terminated)
    try:
        assert main(["inspect", str(src)]) == 128 + signum
        assert capsys.readouterr().err == f"lowrank-layers: terminated by {name}\n"
        assert seen == [cli._on_signal]
        assert signal.getsignal(signum) is signal.SIG_DFL
    finally:
        signal.signal(signum, previous)


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="POSIX signals")
def test_an_ignored_signal_stays_ignored(dense_file, monkeypatch):
    from lowrank_layers import cli

    src, _ = dense_file
    seen = []
    monkeypatch.setattr(
        cli, "_run_inspect", lambda args: seen.append(signal.getsignal(signal.SIGHUP))
    )
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as nohup leaves it
    try:
        assert main(["inspect", str(src)]) == 0
        assert seen == [signal.SIG_IGN]
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, previous)


def _slow_source(folder: Path) -> Path:
    """Eight 512x512 weights: an exact SVD each, long enough to be stopped mid-write."""
    gen = torch.Generator().manual_seed(0)
    src = folder / "dense.safetensors"
    save_file({f"layers.{i}.weight": torch.randn(512, 512, generator=gen) for i in range(8)}, src)
    return src


def _start_convert(src: Path, dst: Path) -> subprocess.Popen:
    """The CLI converting ``src`` into ``dst``, once its temporary file exists."""
    argv = [sys.executable, "-m", "lowrank_layers.cli", "convert", str(src), str(dst)]
    child = subprocess.Popen(
        [*argv, "--rank", "16", "--no-progress"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    deadline = time.monotonic() + 120
    while not any(p.name.startswith(f".{dst.name}.tmp-") for p in dst.parent.iterdir()):
        assert child.poll() is None, child.communicate()
        assert time.monotonic() < deadline, "no temporary file appeared"
        time.sleep(0.005)
    return child


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="POSIX signals")
def test_sigterm_during_convert_leaves_no_temporary_file(tmp_path):
    src = _slow_source(tmp_path)
    child = _start_convert(src, tmp_path / "out.safetensors")
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 128 + signal.SIGTERM, err
    assert err == "lowrank-layers: terminated by SIGTERM\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense.safetensors"]


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="POSIX signals")
def test_the_leftover_of_a_killed_convert_is_removed_by_the_next(tmp_path, capsys):
    src = _slow_source(tmp_path)
    dst = tmp_path / "out.safetensors"
    child = _start_convert(src, dst)
    child.kill()  # SIGKILL: no cleanup can run
    child.communicate(timeout=120)
    (leftover,) = (p for p in tmp_path.iterdir() if p.name.startswith(".out.safetensors.tmp-"))
    assert f"-{child.pid}-" in leftover.name  # the writer's pid is in the name
    with pytest.warns(UserWarning, match=r"removed 1 temporary file\(s\) left by interrupted"):
        assert main(["convert", str(src), str(dst), "--rank", "2", "--no-progress"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense.safetensors", dst.name]
    assert f"wrote {dst}" in capsys.readouterr().out


def test_a_bug_is_not_passed_off_as_a_usage_error(tmp_path, monkeypatch):
    """Only the user's mistakes (InputError, UsageError, ...) are one-line usage errors;
    any other ValueError or TypeError propagates with its traceback."""
    import lowrank_layers.offline as offline
    from lowrank_layers.common import InputError

    src = tmp_path / "w.safetensors"
    save_file({"fc.weight": torch.randn(16, 16)}, src)

    def broken(*args, **kwargs):
        raise TypeError("unsupported operand type(s) for +: 'int' and 'NoneType'")

    monkeypatch.setattr(offline, "convert_checkpoint", broken)
    with pytest.raises(TypeError, match=r"unsupported operand"):
        main(["convert", str(src), str(tmp_path / "o.safetensors"), "--rank", "4"])

    def refused(*args, **kwargs):
        raise InputError("rank_ratio must be in (0, 1], got 2")

    monkeypatch.setattr(offline, "convert_checkpoint", refused)
    assert main(["convert", str(src), str(tmp_path / "o.safetensors"), "--rank", "4"]) == 2


def test_the_cli_converts_gpt2_the_right_way_round(tmp_path, capsys):
    src = saved(tiny_gpt2(), tmp_path / "gpt2")
    assert main(["convert", src, str(tmp_path / "out"), "--rank", "4", "--no-progress"]) == 0
    table = capsys.readouterr().out
    row = next(line for line in table.splitlines() if line.startswith("transformer.h.0.mlp.c_fc"))
    assert row.split()[1:4] == ["LowRankLinear", "32", "128"]
    bare = tmp_path / "bare" / "gpt2.safetensors"  # no config.json beside it
    bare.parent.mkdir()
    bare.write_bytes((Path(src) / "model.safetensors").read_bytes())
    bare = str(bare)
    assert main(["convert", bare, str(tmp_path / "x.safetensors"), "--rank", "4"]) == 2
    assert "named like a GPT-2 Conv1D weight" in capsys.readouterr().err
    out = str(tmp_path / "y.safetensors")
    assert main(["convert", bare, out, "--rank", "4", "--conv1d", "gpt2", "--no-progress"]) == 0


def test_calibrate_draws_documents_across_subfolders_and_says_so(tmp_path, capsys, monkeypatch):
    from lowrank_layers import hf

    texts = tmp_path / "news"
    for name in ("business", "politics", "sport", "tech"):  # sorted: business first
        (texts / name).mkdir(parents=True)
        for i in range(20):
            (texts / name / f"{i:03d}.txt").write_text(f"{name} article {i}")
    model = tmp_path / "model"
    model.mkdir()
    taken = []

    def convert_pretrained(src, dst, config, *, calibration_texts, **kwargs):
        taken.append(calibration_texts)
        return "report"

    monkeypatch.setattr(hf, "convert_pretrained", convert_pretrained)
    argv = ["convert", str(model), str(tmp_path / "out"), "--budget", "0.75",
            "--calibrate", str(texts), "--calib-docs", "8"]  # fmt: skip
    assert main([*argv, "--seed", "5"]) == 0
    err = capsys.readouterr().err
    assert err == (
        f"calibration: 8 documents from 8 of the 80 .txt files in 4 folders under {texts} "
        "(drawn round-robin over the folders with seed 5)\n"
    )
    classes = sorted(t.split()[0] for t in taken[0])
    assert classes == ["business"] * 2 + ["politics"] * 2 + ["sport"] * 2 + ["tech"] * 2
    assert main([*argv, "--seed", "5"]) == 0 and taken[1] == taken[0]  # the seed decides
    assert main([*argv, "--seed", "6"]) == 0 and taken[2] != taken[0]


def test_offload_flag_reaches_convert_pretrained(tmp_path, monkeypatch):
    from lowrank_layers import hf

    texts = tmp_path / "text.txt"
    texts.write_text("one document")
    model = tmp_path / "model"
    model.mkdir()
    calls = []

    def convert_pretrained(src, dst, config, *, calibration_texts, **kwargs):
        calls.append(kwargs)
        return "report"

    monkeypatch.setattr(hf, "convert_pretrained", convert_pretrained)
    argv = ["convert", str(model), str(tmp_path / "out"), "--budget", "0.75",
            "--calibrate", str(texts), "--no-progress"]  # fmt: skip
    assert main([*argv, "--offload"]) == 0 and calls[-1]["offload"] is True
    assert main(argv) == 0 and calls[-1]["offload"] is False
