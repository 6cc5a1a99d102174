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
from safetensors.torch import save_file
from torch import nn

from lowrank_layers import __version__, expected_speedup
from lowrank_layers import checkpoint as ckpt_mod
from lowrank_layers.checkpoint import load_lowrank, read_metadata
from lowrank_layers.cli import main


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
    assert out.splitlines()[0].split()[:5] == ["layer", "kind", "in", "out", "rank"]
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


@pytest.mark.parametrize(
    "flags",
    [
        ["--rank-ratio", "0.25"],
        ["--energy", "0.9", "--balance", "rownorm"],
        ["--param-ratio", "0.5", "--include", "0", "--threshold", "10"],
        ["--rank", "4", "--exclude", "2", "--workers", "2", "--seed", "3"],
    ],
)
def test_convert_flags(flags, dense_file, tmp_path):
    src, _ = dense_file
    dst = tmp_path / "out"
    assert main(["convert", str(src), str(dst), *flags]) == 0
    assert dst.exists()


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
        (["convert", "{src}", "{out}", "--rank", "2", "--allocation", "loss"], "--allocation need"),
        (["convert", "{src}", "{out}", "--rank", "2", "--heal-steps", "5"], "need --budget"),
        (["convert", "{src}", "{out}", "--rank", "2", "--no-propagate"], "need --budget"),
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
            "apply to --allocation loss or uniform",
        ),
        (["demo", "--heal-seconds", "-1"], "expected a number >= 0"),
        (["inspect", "{missing}"], "does not exist"),
        (["inspect", "{src}", "--plot", "{out}.jpg"], "--plot must name a .png file"),
        (["inspect", "{src}", "--plot", "{missing}/x.png"], "nope does not exist"),
        (["inspect", "{src}", "--energies", "0"], "expected a number in (0, 1]"),
        (["demo", "--budgets", "2"], "expected a number in (0, 1]"),
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

    monkeypatch.setattr(ckpt_mod._ShardWriter, "add", disk_full)
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
    before = signal.getsignal(signum)
    seen = []

    def terminated(args):
        seen.append(signal.getsignal(signum))
        os.kill(os.getpid(), signum)
        time.sleep(5)  # the handler raises in here
        raise AssertionError(f"{name} did not unwind")

    monkeypatch.setattr(cli, "_run_inspect", terminated)
    assert main(["inspect", str(src)]) == 128 + signum
    assert capsys.readouterr().err == f"lowrank-layers: terminated by {name}\n"
    assert seen == [cli._on_signal]
    assert signal.getsignal(signum) is before


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
