"""convert_checkpoint on a checkpoint of more than 1 GB: peak memory (RSS) and throughput.

Writes a synthetic safetensors checkpoint (16 weights of 4096x4096 float32, their biases,
and a 8192x4096 embedding: 1.21 GB), then converts it in a child process at rank ratio
0.1 (randomized SVD) and reports the child's peak resident memory against the largest
tensor and against a baseline child that only imports the library, plus wall time and
throughput. Repeated with workers=2 (peak of the largest single process).

Then the command line on eight 4096x8192 float32 weights (1 GiB, 128 MiB each, written by
a child process from seeded random numbers)::

    lowrank-layers convert SRC.safetensors DST.safetensors --rank-ratio 0.1 --method randomized

with the child's peak RSS from os.wait4 (through a small launcher, see peak_rss), against
a child that only runs ``import lowrank_layers``.

    python benchmarks/bench_checkpoint.py [--dir /tmp/lowrank-bench] [--keep] [--only cli]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_description, markdown_table

CHILD = r"""
import json, sys, time, torch
torch.set_num_threads(2)
from lowrank_layers.offline import convert_checkpoint
args = json.loads(sys.argv[1])
start = time.perf_counter()
if args["mode"] != "baseline":
    report = convert_checkpoint(args["src"], args["dst"], rank_ratio=0.1, method="randomized",
                                workers=args["workers"], overwrite=True)
print(json.dumps({"seconds": time.perf_counter() - start}))
"""


def _status_kb(pid: int, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _tree(pid: int) -> list[int]:
    """pid and all its descendants, from /proc."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += parents.get(p, [])
    return out


def make_checkpoint(path: Path) -> tuple[int, int]:
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    tensors = {"model.embed_tokens.weight": torch.randn(8192, 4096, generator=gen)}
    for i in range(16):
        # a decaying spectrum, like trained weights, built cheaply: a low-rank part plus noise
        low = torch.randn(4096, 64, generator=gen) @ torch.randn(64, 4096, generator=gen)
        tensors[f"model.layers.{i}.proj.weight"] = low / 64 + 0.01 * torch.randn(
            4096, 4096, generator=gen
        )
        tensors[f"model.layers.{i}.proj.bias"] = torch.zeros(4096)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    largest = max(t.numel() * t.element_size() for t in tensors.values())
    save_file(tensors, path)
    return total, largest


def run_child(mode: str, src: Path, dst: Path, workers: int) -> dict:
    """Run the conversion in a child; sample the resident memory of its process tree.

    ``peak_mb`` is the largest sum of VmRSS over the tree seen in 20 ms samples, and
    ``hwm_mb`` the largest per-process VmHWM (exact peak of one process). ru_maxrss is not
    used: Linux carries it across fork and exec, so a child would report the parent's.
    """
    args = json.dumps({"mode": mode, "src": str(src), "dst": str(dst), "workers": workers})
    proc = subprocess.Popen([sys.executable, "-c", CHILD, args], stdout=subprocess.PIPE, text=True)
    peak_kb = hwm_kb = 0
    while proc.poll() is None:
        pids = _tree(proc.pid)
        peak_kb = max(peak_kb, sum(_status_kb(p, "VmRSS") for p in pids))
        hwm_kb = max([hwm_kb] + [_status_kb(p, "VmHWM") for p in pids])
        time.sleep(0.02)
    out, _ = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"child failed with exit code {proc.returncode}")
    result = json.loads(out.strip().splitlines()[-1])
    return {**result, "peak_mb": peak_kb / 1024, "hwm_mb": hwm_kb / 1024}


WRITE_CLI_CHECKPOINT = r"""
import sys, torch
from safetensors.torch import save_file
gen = torch.Generator().manual_seed(0)
shape = (4096, 8192)
save_file({f"model.layers.{i}.proj.weight": torch.randn(*shape, generator=gen) for i in range(8)},
          sys.argv[1])
"""

# Runs argv, then prints its exit code, its peak RSS (ru_maxrss, KiB) and its wall seconds.
LAUNCH = r"""
import os, subprocess, sys, time
start = time.perf_counter()
child = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)
_, status, usage = os.wait4(child.pid, 0)
print(os.waitstatus_to_exitcode(status), usage.ru_maxrss, time.perf_counter() - start)
"""


def peak_rss(argv: list[str]) -> tuple[float, float]:
    """Peak RSS (MiB) and wall seconds of ``argv``, from ``os.wait4`` on its process.

    Linux starts a child's ru_maxrss at its parent's resident size (fork counts the pages
    it shares, exec carries the old high-water mark over): measured directly from this
    process (torch imported) every child would report at least this process's size. The
    command is therefore started by a launcher without site-packages (about 10 MiB), which
    reports the ru_maxrss that os.wait4 gives it for its own child. Two threads, as above.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    out = subprocess.run(
        [sys.executable, "-S", "-c", LAUNCH, *argv],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    code, max_rss_kib, seconds = out.split()[-3:]
    if code != "0":
        raise RuntimeError(f"{argv[:3]} failed with exit code {code}")
    return int(max_rss_kib) / 1024, float(seconds)


def cli_case(folder: Path) -> None:
    """The command line on eight 4096x8192 float32 weights: peak RSS against the import."""
    src, dst = folder / "cli-src.safetensors", folder / "cli-dst.safetensors"
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", WRITE_CLI_CHECKPOINT, str(src)], check=True)
    print(f"wrote {src.stat().st_size / 2**20:.0f} MiB in {time.perf_counter() - start:.0f} s",
          file=sys.stderr)  # fmt: skip
    largest_mib = 4096 * 8192 * 4 / 2**20
    script = Path(sys.executable).with_name("lowrank-layers")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "lowrank_layers.cli"]
    base_mib, base_s = peak_rss([sys.executable, "-c", "import lowrank_layers"])
    argv = [*command, "convert", str(src), str(dst), "--rank-ratio", "0.1"]
    peak_mib, seconds = peak_rss([*argv, "--method", "randomized", "--overwrite", "--no-progress"])
    above = peak_mib - base_mib
    rows = [
        ("python -c 'import lowrank_layers'", f"{base_s:.1f}", f"{base_mib:.0f}", "-", "-"),
        (
            "lowrank-layers convert --rank-ratio 0.1 --method randomized",
            f"{seconds:.1f}",
            f"{peak_mib:.0f}",
            f"{above:.0f}",
            f"{above / largest_mib:.2f}",
        ),
    ]
    print(
        f"Command line: eight 4096x8192 float32 weights ({src.stat().st_size / 2**20:.0f} MiB,"
        f" {largest_mib:.0f} MiB each) factorized at rank 410; "
        f"{dst.stat().st_size / 2**20:.0f} MiB out.\n"
    )
    header = ["process", "seconds", "peak RSS MiB", "above import MiB", "÷ largest tensor"]
    print(markdown_table(header, rows))
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/lowrank-bench"))
    parser.add_argument("--keep", action="store_true", help="keep the files afterwards")
    parser.add_argument("--only", choices=["api", "cli"], help="run one of the two cases")
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    print(f"Machine: {machine_description()}\n")
    if args.only != "api":
        cli_case(args.dir)
    if args.only == "cli":
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)
        return
    src = args.dir / "big.safetensors"
    start = time.perf_counter()
    total, largest = make_checkpoint(src)
    print(f"wrote {total / 1e9:.2f} GB in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    baseline = run_child("baseline", src, args.dir / "none", 1)
    rows = [("baseline (import only)", "-", f"{baseline['hwm_mb']:.0f}", "-", "-", "-")]
    for workers in (1, 2):
        dst = args.dir / f"out-{workers}"
        res = run_child("convert", src, dst, workers)
        out_bytes = sum(p.stat().st_size for p in dst.iterdir()) if dst.is_dir() else 0
        rows.append(
            (
                f"convert_checkpoint workers={workers}",
                f"{res['seconds']:.1f}",
                f"{res['hwm_mb']:.0f}",
                f"{res['hwm_mb'] - baseline['hwm_mb']:.0f}",
                f"{res['peak_mb']:.0f}",
                f"{total / 1e6 / res['seconds']:.0f} MB/s ({out_bytes / 1e6:.0f} MB out)",
            )
        )
    print(
        f"Checkpoint: {total / 1e9:.2f} GB in one file; largest tensor {largest / 1e6:.0f} MB "
        f"(the 8192x4096 embedding, copied); 16 weights of 4096x4096 ({4096 * 4096 * 4 / 1e6:.0f}"
        " MB each) factorized at rank 410.\n"
    )
    header = [
        "run",
        "seconds",
        "peak RSS of one process MB",
        "above baseline MB",
        "peak RSS of all processes MB",
        "throughput",
    ]
    print(markdown_table(header, rows))
    if not args.keep:
        shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
