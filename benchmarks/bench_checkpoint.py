"""convert_checkpoint on a checkpoint of more than 1 GB: peak memory (RSS) and throughput.

Writes a synthetic safetensors checkpoint (16 weights of 4096x4096 float32, their biases,
and a 8192x4096 embedding: 1.21 GB), then converts it in a child process at rank ratio
0.1 (randomized SVD) and reports the child's peak resident memory against the largest
tensor and against a baseline child that only imports the library, plus wall time and
throughput. Repeated with workers=2 (peak of the largest single process).

    python benchmarks/bench_checkpoint.py [--dir /tmp/lowrank-bench] [--keep]
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
from lowrank_layers.checkpoint import convert_checkpoint
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/lowrank-bench"))
    parser.add_argument("--keep", action="store_true", help="keep the files afterwards")
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
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
    print(f"Machine: {machine_description()}\n")
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
