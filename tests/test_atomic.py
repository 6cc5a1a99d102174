"""Atomic writes (``lowrank_layers.atomic``): whole files or nothing, temporaries that name
their writer and map back to their destination, and the removal of those a dead writer
left."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lowrank_layers import atomic
from lowrank_layers.checkpoint import save_lowrank
from lowrank_layers.offline import convert_checkpoint

from .test_checkpoint import Tiny, _dense_checkpoint


@pytest.fixture
def tiny() -> Tiny:
    torch.manual_seed(0)
    return Tiny().eval()


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.mark.skipif(os.name != "posix", reason="liveness of a pid is checked with os.kill(pid, 0)")
def test_leftovers_of_dead_writers_are_removed_by_the_next_write(tiny, tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    dead, host = _dead_pid(), atomic._HOST
    dead_file = folder / f".model.safetensors.tmp-{host}-{dead}-0123abcd"
    dead_shard = folder / f".model-00002-of-00003.safetensors.tmp-{host}-{dead}-4567cdef"
    live = folder / f".model.safetensors.tmp-{host}-{os.getpid()}-89abcdef"  # in progress
    elsewhere = folder / f".model.safetensors.tmp-other-host-{dead}-0123abcd"  # not ours
    unrelated = folder / f".config.json.tmp-{host}-{dead}-0123abcd"  # not a name we write
    old_style = folder / ".model.safetensors.tmp-0123abcd"  # before pids: unknown writer
    for path in (dead_file, dead_shard, live, elsewhere, unrelated, old_style):
        path.write_bytes(b"partial")
    with pytest.warns(UserWarning) as rec:
        save_lowrank(tiny, folder)
    removed, named = (str(w.message) for w in rec)
    assert removed.startswith("removed 2 temporary file(s) left by interrupted writes whose")
    assert removed.endswith(f"{dead_shard}, {dead_file}")  # sorted by name
    assert named.startswith(f"{old_style}: temporary file(s) of an interrupted write")
    assert "earlier version of lowrank-layers; remove them if no write is" in named
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["model.safetensors", live.name, elsewhere.name, unrelated.name, old_style.name]
    )
    # a whole-destination write (one file, a whole folder) cleans beside its destination
    dead_dir = tmp_path / f".out.tmp-{host}-{dead}-0123abcd"
    (dead_dir / "sub").mkdir(parents=True)
    src = tmp_path / "dense.safetensors"
    _dense_checkpoint(tiny, src)
    with pytest.warns(UserWarning, match=r"left by interrupted writes .*\.out\.tmp-"):
        convert_checkpoint(src, tmp_path / "out", rank=4)
    assert not dead_dir.exists() and (tmp_path / "out" / "model.safetensors").is_file()


def test_temporary_names_map_back_to_their_destination():
    tmp = atomic.temp_path(Path("/data/out.safetensors"))
    assert tmp.parent == Path("/data") and tmp.name.startswith(".out.safetensors.tmp-")
    assert atomic.destination_of(tmp) == Path("/data/out.safetensors")
    inner = atomic.temp_path(Path("/data/out")) / "model-00001-of-00002.safetensors"
    assert atomic.destination_of(inner) == Path("/data/out/model-00001-of-00002.safetensors")
    assert atomic.destination_of("/data/.hidden") == Path("/data/.hidden")


@pytest.mark.skipif(os.name != "posix", reason="file modes")
def test_atomic_destination_replaces_a_file_whole_with_the_usual_mode(tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    dst = tmp_path / "report.md"
    with atomic.atomic_destination(dst) as tmp:
        assert tmp.parent == tmp_path and not dst.exists()
        tmp.write_text("first")
    assert dst.read_text() == "first"
    assert dst.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600
    with pytest.raises(RuntimeError, match="midway"), atomic.atomic_destination(dst) as tmp:
        tmp.write_text("second")
        raise RuntimeError("midway")
    assert dst.read_text() == "first" and os.listdir(tmp_path) == ["report.md"]
