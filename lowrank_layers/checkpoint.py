"""Low-rank checkpoints in safetensors: ``save_lowrank``, ``load_lowrank``, ``convert_checkpoint``.

Format (see docs/checkpoints.md): ordinary safetensors files whose tensors are the model's
state dict — a low-rank layer ``name`` stores ``name.U`` (out, r), ``name.S`` (r,),
``name.V`` (in, r), optionally ``name.D`` (out,), and ``name.bias`` — and whose header
metadata holds::

    format          "lowrank-layers"
    format_version  "1"
    layers          JSON {name: {"type", "in_features", "out_features", "rank",
                                 "balance", "bias", ["max_rank"]}}
    aliases         JSON {key: key stored instead} (tied tensors are stored once)

Checkpoints above ``max_shard_size`` are sharded as transformers shards them:
``model-00001-of-0000N.safetensors`` and ``model.safetensors.index.json`` with a
``weight_map`` and the same metadata. Every write goes to a temporary name first and is
renamed into place at the end: an interrupted write leaves nothing at the destination.
"""

from __future__ import annotations

import ctypes
import functools
import json
import math
import multiprocessing
import os
import re
import shutil
import socket
import struct
import time
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .adaptive import AdaptiveLowRankLinear
from .convert import (
    ConversionReport,
    LayerReport,
    _check_patterns,
    _parents,
    break_even_reason,
    layer_seed,
    name_matches,
    plan_rank,
    saves_parameters,
)
from .dynamic import DynamicLowRankLinear
from .factorize import (
    BALANCE_MODES,
    METHODS,
    NONFINITE_REASON,
    Balance,
    Method,
    _all_finite,
    _check_choice,
    factor_parameters,
    factorize,
    rank_policy,
    relative_error,
    resolve_rank,
    select_rank,
)
from .linear import LowRankLinear, make_linear
from .linears import is_conv1d
from .speed import SpeedRule, report_speedups, speed_rule

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "convert_checkpoint",
    "load_lowrank",
    "read_metadata",
    "save_lowrank",
    "weight_spectra",
]

FORMAT_NAME = "lowrank-layers"
FORMAT_VERSION = 1
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_SIZE = 5 * 1024**3

_ST_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
for _name, _code in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2")):
    if hasattr(torch, _name):
        _ST_DTYPES[getattr(torch, _name)] = _code
_DTYPES_FROM_ST = {code: dtype for dtype, code in _ST_DTYPES.items()}

_LAYER_TYPES: dict[str, type[nn.Module]] = {
    "LowRankLinear": LowRankLinear,
    "AdaptiveLowRankLinear": AdaptiveLowRankLinear,
    "DynamicLowRankLinear": DynamicLowRankLinear,
}

# module names treated as embeddings by convert_checkpoint (excluded by default)
_EMBEDDING_COMPONENT = re.compile(r"(.*embed.*|emb|.*_emb|wte|wpe|shared)")


class CheckpointError(ValueError):
    """A checkpoint that does not match the model, or is not one this library reads."""


# ------------------------------------------------------------------------------------------
# writing
# ------------------------------------------------------------------------------------------


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().contiguous().reshape(-1)
    if flat.device.type != "cpu":
        flat = flat.cpu()
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


class _ShardWriter:
    """Streams tensors into one safetensors file, one at a time.

    The header is written last, into space reserved at the start of the file and padded
    with spaces (the format allows trailing whitespace in the header); tensors are written
    as they come, so memory stays at one tensor whatever the file size.
    """

    def __init__(self, path: Path, reserve: int) -> None:
        self.path = path
        self.reserve = _align8(max(reserve, 64))
        self.entries: dict[str, dict[str, Any]] = {}
        self.offset = 0
        self.file = open(path, "wb")  # noqa: SIM115 - closed in finish()/abort()
        self.file.write(b"\0" * (8 + self.reserve))

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.entries:
            raise ValueError(f"duplicate tensor name {name!r} in {self.path.name}")
        if tensor.dtype not in _ST_DTYPES:
            raise TypeError(
                f"tensor {name!r} has dtype {tensor.dtype}, which safetensors cannot hold"
            )
        data = _tensor_bytes(tensor)
        self.file.write(data)
        self.entries[name] = {
            "dtype": _ST_DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [self.offset, self.offset + data.nbytes],
        }
        self.offset += data.nbytes

    def finish(self, metadata: dict[str, str]) -> int:
        header = {"__metadata__": metadata, **dict(sorted(self.entries.items()))}
        raw = json.dumps(header, separators=(",", ":")).encode()
        if len(raw) <= self.reserve:
            self.file.seek(0)
            self.file.write(
                struct.pack("<Q", self.reserve) + raw + b" " * (self.reserve - len(raw))
            )
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
        else:  # the reserve was too small: rewrite with a larger header (copying the data)
            self.file.close()
            _rewrite_with_header(self.path, raw, 8 + self.reserve, self.offset)
        return 8 + max(self.reserve, _align8(len(raw))) + self.offset

    def abort(self) -> None:
        self.file.close()


def _align8(n: int) -> int:
    return (n + 7) // 8 * 8


def _rewrite_with_header(path: Path, raw: bytes, data_start: int, data_len: int) -> None:
    size = _align8(len(raw))
    tmp = path.with_name(path.name + ".rewrite")
    with open(path, "rb") as src, open(tmp, "wb") as dst:
        dst.write(struct.pack("<Q", size) + raw + b" " * (size - len(raw)))
        src.seek(data_start)
        shutil.copyfileobj(src, dst, length=16 * 1024 * 1024)
        dst.flush()
        os.fsync(dst.fileno())
    os.replace(tmp, path)


def _header_reserve(names: Iterable[str], metadata_bytes: int) -> int:
    # per entry: the quoted name plus dtype, a shape of up to 4 dims and two offsets
    return sum(len(json.dumps(n)) + 120 for n in names) + metadata_bytes + 1024


# Temporary names: ``.<name>.tmp-<host>-<pid>-<hex8>`` beside the file or folder ``<name>``
# they become (``.old-`` for a replaced folder on its way out). The host and pid name the
# writer, so that the next write to the same destination can remove what a writer killed
# outright (SIGKILL, power loss) left behind: on this host, a pid that no longer runs.
_HOST = re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname())[:64] or "localhost"
# our own file names in a folder save_lowrank writes into (transformers' naming)
_OWN_FILES = r"model(?:-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json"


def _temp_path(dst: Path, kind: str = "tmp") -> Path:
    """A hidden sibling of ``dst`` naming this host and process (see ``_HOST``)."""
    return dst.with_name(f".{dst.name}.{kind}-{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _temp_pattern(names: str) -> re.Pattern[str]:
    """Temporary names of writes to ``names`` (a regex); groups: name, host, pid."""
    return re.compile(
        rf"\.(?P<name>{names})\.(?:tmp|old)-(?:(?P<host>[A-Za-z0-9_.-]+)-(?P<pid>\d+)-)?"
        r"[0-9a-f]{8}(?:\.rewrite)?"
    )


def _destination_of(path: str | os.PathLike) -> Path:
    """``path`` with every temporary component replaced by the name it is written for."""
    pattern = _temp_pattern(".+")
    parts = [m.group("name") if (m := pattern.fullmatch(p)) else p for p in Path(path).parts]
    return Path(*parts) if parts else Path(path)


def _writer_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host runs (True when that cannot be told)."""
    if os.name != "posix":
        return True  # os.kill(pid, 0) would send CTRL_C_EVENT on Windows
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: another user's process, alive
        return True
    return True


def _clean_leftovers(folder: Path, names: str) -> None:
    """Remove the temporaries of writes to ``folder/<names>`` whose writer died; warn naming them.

    A temporary of this host whose pid no longer runs is removed; one of another host or a
    live process is left alone (a write in progress); one without a pid (written before
    pids were part of the name) is named in a warning and left for the user to remove.
    """
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError:  # no folder yet: nothing left over
        return
    pattern = _temp_pattern(names)
    removed: list[str] = []
    unknown: list[str] = []
    for entry in entries:
        m = pattern.fullmatch(entry.name)
        if m is None:
            continue
        if m.group("pid") is None:
            unknown.append(entry.path)
        elif (
            m.group("host") == _HOST
            and not _writer_alive(int(m.group("pid")))
            and _remove(Path(entry.path))
        ):
            removed.append(entry.path)
    if removed:
        warnings.warn(
            f"removed {len(removed)} temporary file(s) left by interrupted writes whose process "
            f"no longer runs: {', '.join(removed)}",
            stacklevel=5,  # the caller of save_lowrank / convert_checkpoint
        )
    if unknown:
        warnings.warn(
            f"{', '.join(unknown)}: temporary file(s) of an interrupted write (or of one still "
            "running) by an earlier version of lowrank-layers; remove them if no write is "
            "in progress",
            stacklevel=5,  # the caller of save_lowrank / convert_checkpoint
        )


def _named(path: Path) -> Path:
    """``path``, resolved when it has no name of its own (``.``, ``..``, ``a/..``)."""
    return path.resolve() if path.name in ("", "..") else path


def _make_folder(folder: Path, target: Path | None = None) -> Path | None:
    """Create ``folder`` (for ``target``) and its missing parents; the topmost created, or None."""
    missing: list[Path] = []
    existing = folder
    while not existing.exists() and existing != existing.parent:
        missing.append(existing)
        existing = existing.parent
    if not existing.is_dir():
        raise NotADirectoryError(
            f"cannot write {target or folder}: {existing} is a file, not a folder"
        )
    if missing:
        folder.mkdir(parents=True, exist_ok=True)
    return missing[-1] if missing else None


def _remove_created(folder: Path, top: Path | None) -> None:
    """Remove the empty folders ``_make_folder`` created, ``folder`` up to ``top``."""
    if top is None:
        return
    for path in (folder, *folder.parents):
        try:
            path.rmdir()
        except OSError:
            return
        if path == top:
            return


@contextmanager
def _atomic_destination(dst: Path, *, is_dir: bool, overwrite: bool) -> Iterator[Path]:
    """A temporary sibling of ``dst`` that replaces ``dst`` whole only if the block succeeds.

    For a new file, or a whole new folder (an existing ``dst`` folder is replaced with all
    of its files); :func:`_files_into_folder` writes some files into a folder and keeps the
    others. Temporaries of earlier writes to ``dst`` whose process died are removed first.
    """
    dst = _named(dst)
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} already exists (pass overwrite=True to replace it)")
    if dst.is_dir() and not is_dir:
        raise IsADirectoryError(f"{dst} is a folder; a file cannot replace it")
    if dst.is_dir() and Path.cwd().resolve().is_relative_to(dst.resolve()):
        raise ValueError(
            f"{dst} is the current folder or holds it, and would be replaced whole: "
            "write into a new folder"
        )
    created = _make_folder(dst.parent, dst)
    _clean_leftovers(dst.parent, re.escape(dst.name))
    tmp = _temp_path(dst)
    if is_dir:
        tmp.mkdir()
    try:
        yield tmp
        _commit(tmp, dst)
    except BaseException:
        _remove_temporary(tmp)
        _remove_created(dst.parent, created)
        raise


@contextmanager
def _files_into_folder(
    folder: Path, names: Sequence[str], *, overwrite: bool
) -> Iterator[dict[str, Path]]:
    """Temporary paths in ``folder`` for ``names``, each renamed over its name at the end.

    The folder's other files stay, except our own checkpoint files (``_OWN_FILES``) that
    ``names`` leave out — the shards, single file or index of an earlier save — which are
    removed once the new files are in place (a stale index first: it would be read instead
    of a new ``model.safetensors``). Each file is replaced atomically; the renames at the
    end take milliseconds. With ``overwrite=False`` any own file present is an error.
    """
    folder = _named(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"cannot write into {folder}: it is a file, not a folder")
    own = re.compile(_OWN_FILES)
    present = sorted(  # files only: a folder of such a name is not ours to remove
        p.name
        for p in (folder.iterdir() if folder.is_dir() else ())
        if own.fullmatch(p.name) and not p.is_dir()
    )
    for name in names:
        if (folder / name).is_dir():
            raise IsADirectoryError(f"{folder / name} is a folder; a file cannot replace it")
    if present and not overwrite:
        raise FileExistsError(
            f"{folder / present[0]} already exists (pass overwrite=True to replace it)"
        )
    stale = [n for n in present if n not in names]
    created = _make_folder(folder)
    _clean_leftovers(folder, _OWN_FILES)
    temps = {name: _temp_path(folder / name) for name in names}
    try:
        yield temps
        if INDEX_FILE in stale:  # first, or fail: left behind, it would be read instead
            (folder / INDEX_FILE).unlink(missing_ok=True)
        for name in sorted(names, key=lambda n: n == INDEX_FILE):  # the index last
            os.replace(temps[name], folder / name)
        for name in stale:  # unreferenced now: one left behind would not be read
            _remove(folder / name)
    except BaseException:
        for tmp in temps.values():
            _remove_temporary(tmp)
        _remove_created(folder, created)
        raise


def _commit(tmp: Path, dst: Path) -> None:
    """Rename ``tmp`` to ``dst``: a file in one atomic step, a folder over an old one in two."""
    if dst.exists() and (dst.is_dir() or tmp.is_dir()):  # a link to a folder: the link goes
        trash = _temp_path(dst, "old")
        os.replace(dst, trash)
        os.replace(tmp, dst)
        _remove(trash)
    else:
        os.replace(tmp, dst)


def _remove(path: Path) -> bool:
    """Remove a file or folder if it is there; never raises (a cleanup). Whether it is gone."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    except OSError:
        return False
    return True


def _remove_temporary(tmp: Path) -> None:
    """Remove a temporary and the copy ``_rewrite_with_header`` may have begun beside it."""
    _remove(tmp)
    _remove(tmp.with_name(tmp.name + ".rewrite"))


def _guard_key(layer_name: str) -> str:
    """The ``<layer>.weight`` key under which an empty guard tensor is stored (see
    :func:`save_lowrank`)."""
    return f"{layer_name}.weight" if layer_name else "weight"


def _guard(dtype: torch.dtype) -> torch.Tensor:
    """An empty ``(0,)`` tensor: stored as ``<layer>.weight`` beside a low-rank layer's
    factors, it makes a dense loader (``load_state_dict``, ``from_pretrained`` without
    lowrank-layers) fail on the shape instead of leaving that layer's weight random."""
    return torch.empty(0, dtype=dtype)


def _layer_entry(module: nn.Module) -> dict[str, Any] | None:
    if isinstance(module, AdaptiveLowRankLinear) and not module.is_lowrank:
        return None  # dense phase: an ordinary Linear-shaped weight
    if not isinstance(module, (LowRankLinear, AdaptiveLowRankLinear, DynamicLowRankLinear)):
        return None
    entry: dict[str, Any] = {
        "type": type(module).__name__,
        "in_features": module.in_features,
        "out_features": module.out_features,
        "rank": int(module.S.shape[0]),
        "balance": module.D is not None,
        "bias": module.bias is not None,
    }
    if isinstance(module, DynamicLowRankLinear):
        entry["active_rank"] = module.rank
    return entry


def _storage_identity(t: torch.Tensor) -> tuple | None:
    """Equal for two state-dict entries that are the same tensor (tied weights)."""
    if t.numel() == 0 or t.is_meta:
        return None
    ptr = t.untyped_storage().data_ptr()
    return (t.device, ptr, t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def _format_metadata(layers: dict[str, Any], aliases: dict[str, str]) -> dict[str, str]:
    return {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "layers": json.dumps(layers, sort_keys=True),
        "aliases": json.dumps(aliases, sort_keys=True),
    }


def _parse_size(value: int | str) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*", value.upper())
        if m:
            scale = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}[m.group(2)]
            size = int(float(m.group(1)) * scale)
            if size > 0:
                return size
    raise ValueError(f"max_shard_size must be a positive int or a size like '2GB', got {value!r}")


def save_lowrank(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = True,
) -> list[Path]:
    """Save ``model``'s state dict, with the description of its low-rank layers, as safetensors.

    ``path`` ending in ``.safetensors`` is one file; any other path (``"."`` included) is a
    folder that gets ``model.safetensors``, or shards and ``model.safetensors.index.json``
    when the tensors exceed ``max_shard_size`` (bytes, or a string such as ``"2GB"``). Tied
    tensors are stored once (``aliases`` in the metadata).

    Each file is written under a temporary name beside it and renamed over it at the end.
    In an existing folder only these files are replaced, and those of the same naming left
    by an earlier save (``model.safetensors``, ``model-*-of-*.safetensors``, the index) that
    this one does not write are removed; every other file stays. With ``overwrite=False``
    an existing file of that naming (or ``path`` itself, for one file) is an error.

    Returns:
        The files written.

    Example:
        >>> import tempfile
        >>> model = nn.Sequential(LowRankLinear(64, 64, 8))
        >>> with tempfile.TemporaryDirectory() as d:
        ...     files = save_lowrank(model, f"{d}/m.safetensors")
        ...     json.loads(read_metadata(files[0])["layers"])["0"]["rank"]
        8
    """
    path = Path(path)
    if path.suffix != ".safetensors" and path.is_file():
        raise NotADirectoryError(
            f"save_lowrank: path {str(path)!r} is a file, but a path not ending in "
            ".safetensors names a folder to write model.safetensors into"
        )
    limit = _parse_size(max_shard_size)
    state = model.state_dict()
    layers: dict[str, Any] = {}
    for name, module in model.named_modules():
        entry = _layer_entry(module)
        if entry is not None:
            layers[name] = entry
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for key, value in state.items():
        if key.endswith("._extra_state") or key == "_extra_state":
            owner = key[: -len("._extra_state")] if "." in key else ""
            if owner in layers and layers[owner]["type"] == "DynamicLowRankLinear":
                continue  # the active rank is in the layer description
            raise TypeError(f"{key}: extra module state cannot be stored in safetensors")
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"{key}: state dict value of type {type(value).__name__} is not a tensor"
            )
        ident = _storage_identity(value)
        if ident is not None and ident in seen:
            aliases[key] = seen[ident]
            continue
        if ident is not None:
            seen[ident] = key
        tensors[key] = value
    for name, module in model.named_modules():
        if name in layers and _guard_key(name) not in tensors:
            factor = next(p for n, p in module.named_parameters(recurse=False) if n == "U")
            tensors[_guard_key(name)] = _guard(factor.dtype)
    metadata = _format_metadata(layers, aliases)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    single_file = path.suffix == ".safetensors"
    if single_file or total <= limit:
        groups = [list(tensors)]
    else:
        groups, current, size = [], [], 0
        for key, t in tensors.items():
            nbytes = t.numel() * t.element_size()
            if current and size + nbytes > limit:
                groups.append(current)
                current, size = [], 0
            current.append(key)
            size += nbytes
        groups.append(current)
    meta_bytes = len(json.dumps(metadata))
    if single_file:
        with _atomic_destination(path, is_dir=False, overwrite=overwrite) as tmp:
            _write_group(tmp, groups[0], tensors, metadata, meta_bytes)
        return [path]
    names = _shard_names(len(groups))
    written = names + ([INDEX_FILE] if len(groups) > 1 else [])
    with _files_into_folder(path, written, overwrite=overwrite) as temps:
        weight_map: dict[str, str] = {}
        for fname, keys in zip(names, groups, strict=True):
            _write_group(temps[fname], keys, tensors, metadata, meta_bytes)
            weight_map.update(dict.fromkeys(keys, fname))
        if len(groups) > 1:
            _write_index(temps[INDEX_FILE], weight_map, metadata, total)
    return [path / n for n in written]


def _write_group(
    path: Path,
    keys: Sequence[str],
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str],
    meta_bytes: int,
) -> None:
    writer = _ShardWriter(path, _header_reserve(keys, meta_bytes))
    try:
        for key in keys:
            writer.add(key, tensors[key])
        writer.finish(metadata)
    except BaseException:
        writer.abort()
        raise


def _shard_names(n: int) -> list[str]:
    if n == 1:
        return [SINGLE_FILE]
    return [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


def _write_index(path: Path, weight_map: dict[str, str], metadata: dict[str, str], total: int):
    index = {
        "metadata": {"total_size": total, **metadata},
        "weight_map": dict(sorted(weight_map.items())),
    }
    path.write_text(json.dumps(index, indent=2) + "\n")


# ------------------------------------------------------------------------------------------
# reading
# ------------------------------------------------------------------------------------------


@dataclass
class _Checkpoint:
    """The files of a checkpoint and its merged metadata."""

    files: list[Path]
    weight_map: dict[str, Path]
    metadata: dict[str, str]
    total_size: int = 0
    extra_files: list[Path] = field(default_factory=list)
    folder: Path | None = None  # the model folder, for a folder or index source


def _read_header(path: Path) -> tuple[dict[str, Any], int]:
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise CheckpointError(f"{path} is not a safetensors file (too short)")
            (n,) = struct.unpack("<Q", head)
            if n > 100 * 1024**2 or n > path.stat().st_size - 8:
                raise CheckpointError(f"{path} is not a safetensors file (bad header size)")
            header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is not a safetensors file ({exc})") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is not a safetensors file (header is not an object)")
    return header, 8 + n


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The header metadata of a safetensors file, or the merged metadata of a checkpoint folder."""
    return _open_checkpoint(Path(path)).metadata


def _open_checkpoint(path: Path) -> _Checkpoint:
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if path.is_dir():
        index = path / INDEX_FILE
        if index.exists():
            return _open_index(index)
        single = path / SINGLE_FILE
        shards = [single] if single.exists() else sorted(path.glob("*.safetensors"))
        if len(shards) != 1:
            raise CheckpointError(
                f"{path} holds no {SINGLE_FILE} or {INDEX_FILE}"
                + (f" but {len(shards)} .safetensors files" if shards else "")
            )
        ckpt = _open_file(shards[0])
        ckpt.extra_files = [p for p in sorted(path.iterdir()) if p.is_file() and p != shards[0]]
        ckpt.folder = path
        return ckpt
    if path.name.endswith(".index.json"):
        return _open_index(path)
    return _open_file(path)


def _open_file(path: Path) -> _Checkpoint:
    header, _ = _read_header(path)
    metadata = header.get("__metadata__") or {}
    keys = [k for k in header if k != "__metadata__"]
    size = sum(
        v["data_offsets"][1] - v["data_offsets"][0]
        for k, v in header.items()
        if k != "__metadata__"
    )
    return _Checkpoint([path], dict.fromkeys(keys, path), dict(metadata), size)


def _open_index(index: Path) -> _Checkpoint:
    try:
        data = json.loads(index.read_text())
        weight_map = data["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{index} is not a safetensors index ({exc})") from exc
    folder = index.parent
    files = sorted({folder / f for f in weight_map.values()})
    for f in files:
        if not f.exists():
            raise CheckpointError(f"{index} names {f.name}, which does not exist")
    metadata = {k: v for k, v in (data.get("metadata") or {}).items() if isinstance(v, str)}
    if "layers" not in metadata:  # an index written by others: merge the shards' metadata
        metadata = _merge_metadata([_open_file(f).metadata for f in files])
    shard_set = set(files) | {index}
    extra = [p for p in sorted(folder.iterdir()) if p.is_file() and p not in shard_set]
    total = int((data.get("metadata") or {}).get("total_size", 0))
    return _Checkpoint(
        files, {k: folder / v for k, v in weight_map.items()}, metadata, total, extra, folder
    )


def _merge_metadata(parts: Sequence[dict[str, str]]) -> dict[str, str]:
    layers: dict[str, Any] = {}
    aliases: dict[str, str] = {}
    merged: dict[str, str] = {}
    for meta in parts:
        merged.update(meta)
        layers.update(json.loads(meta.get("layers", "{}")))
        aliases.update(json.loads(meta.get("aliases", "{}")))
    if any("format" in m for m in parts):
        merged["layers"] = json.dumps(layers, sort_keys=True)
        merged["aliases"] = json.dumps(aliases, sort_keys=True)
    return merged


def _check_format(meta: dict[str, str], where: Path) -> tuple[dict[str, Any], dict[str, str]]:
    if meta.get("format") != FORMAT_NAME:
        raise CheckpointError(
            f"{where} is not a {FORMAT_NAME} checkpoint (metadata format="
            f"{meta.get('format')!r}): a folder saved by save_pretrained from a converted model "
            "reloads with lowrank_layers.load_pretrained(folder); a dense checkpoint loads "
            "with load_state_dict or transformers' from_pretrained"
        )
    version = meta.get("format_version")
    if version != str(FORMAT_VERSION):
        raise CheckpointError(
            f"{where} has format_version {version!r}; this version of lowrank-layers reads "
            f"format_version {FORMAT_VERSION!r}"
        )
    try:
        return json.loads(meta["layers"]), json.loads(meta.get("aliases", "{}"))
    except (KeyError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{where}: malformed layers metadata ({exc})") from exc


class _TensorReader:
    """Reads tensors of one safetensors file, one at a time, into fresh memory.

    Plain ``seek`` + ``readinto`` rather than a memory map: pages of a mapped file count
    as the process's resident memory for as long as the map lives, so reading a whole
    checkpoint through one map would hold all of it; here each tensor's memory is freed
    when the tensor is.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.header, self.data_start = _read_header(path)
        self.file = open(path, "rb")  # noqa: SIM115 - closed in close() / __exit__

    def keys(self) -> list[str]:
        return [k for k in self.header if k != "__metadata__"]

    def get(self, key: str) -> torch.Tensor:
        info = self.header.get(key)
        if info is None:
            raise CheckpointError(f"{self.path} holds no tensor {key!r}")
        dtype = _DTYPES_FROM_ST.get(info["dtype"])
        if dtype is None:
            raise CheckpointError(
                f"{self.path}: tensor {key!r} has unsupported dtype {info['dtype']}"
            )
        start, end = info["data_offsets"]
        buf = torch.empty(end - start, dtype=torch.uint8)
        self.file.seek(self.data_start + start)
        if end > start and self.file.readinto(memoryview(buf.numpy())) != end - start:
            raise CheckpointError(f"{self.path} is truncated (tensor {key!r})")
        return buf.view(dtype).reshape(info["shape"])

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> _TensorReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read_tensors(ckpt: _Checkpoint) -> Iterator[tuple[str, torch.Tensor]]:
    by_file: dict[Path, list[str]] = {}
    for key, f in ckpt.weight_map.items():
        by_file.setdefault(f, []).append(key)
    for f, keys in by_file.items():
        with _TensorReader(f) as reader:
            for key in keys:
                yield key, reader.get(key)


def load_lowrank(model: nn.Module, path: str | os.PathLike, *, strict: bool = True) -> nn.Module:
    """Load a checkpoint written by :func:`save_lowrank` or :func:`convert_checkpoint`.

    ``model`` is the dense architecture (e.g. a transformers model built from its config),
    on any device or on ``meta``: each layer listed in the checkpoint is replaced by the
    low-rank layer it describes (on the module's device), then every tensor is loaded. On
    ``meta``, tensors are assigned rather than copied, so the model comes out materialised
    on the CPU. Modules already of the right type and rank are kept.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError (a ``ValueError``): not a safetensors file, another format, an
            unknown ``format_version``, or, naming the key, a listed layer the model lacks,
            a tensor the model does not have or lacks (with ``strict``), or a wrong shape.

    Returns:
        ``model``, changed in place.
    """
    path = Path(path)
    ckpt = _open_checkpoint(path)
    layers, aliases = _check_format(ckpt.metadata, path)
    _restructure(model, layers, str(path))
    state = dict(_read_tensors(ckpt))
    for name in layers:  # the dense loaders' tripwire, not a tensor of the model
        guard = state.get(_guard_key(name))
        if guard is not None and guard.numel() == 0:
            del state[_guard_key(name)]
    for alias, target in aliases.items():
        if target not in state:
            raise CheckpointError(f"{path}: alias {alias!r} points to missing tensor {target!r}")
        state[alias] = state[target]
    for name, entry in layers.items():
        if entry["type"] == "DynamicLowRankLinear":
            prefix = f"{name}." if name else ""
            state[prefix + "_extra_state"] = {"rank": entry.get("active_rank", entry["rank"])}
    expected = model.state_dict(keep_vars=True)
    non_persistent = {
        (f"{mod_name}." if mod_name else "") + b
        for mod_name, mod in model.named_modules()
        for b in mod._non_persistent_buffers_set
    }
    for key in [k for k in state if k not in expected and k in non_persistent]:
        del state[key]  # e.g. BERT's position_ids, saved by older transformers
    tied: dict[int, list[str]] = {}
    for key, value in expected.items():
        if isinstance(value, torch.Tensor):
            tied.setdefault(id(value), []).append(key)
    for keys in tied.values():  # a tied tensor saved under one of its names fills the others
        present = [k for k in keys if k in state]
        for k in keys:
            if k not in state and present:
                state[k] = state[present[0]]
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"missing from the checkpoint: {', '.join(missing[:10])}")
        if unexpected:
            parts.append(f"not in the model: {', '.join(unexpected[:10])}")
        raise CheckpointError(f"{path}: " + "; ".join(parts))
    for key, value in state.items():
        target = expected.get(key)
        if (
            isinstance(value, torch.Tensor)
            and isinstance(target, torch.Tensor)
            and tuple(value.shape) != tuple(target.shape)
        ):
            raise CheckpointError(
                f"{path}: {key} has shape {tuple(value.shape)} in the checkpoint but "
                f"{tuple(target.shape)} in the model"
            )
    on_meta = any(t.is_meta for t in expected.values() if isinstance(t, torch.Tensor))
    model.load_state_dict(state, strict=strict, assign=on_meta)
    if on_meta:
        left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
        if left:
            raise CheckpointError(
                f"{path}: still on the meta device after loading: {', '.join(left[:5])} "
                "(non-persistent buffers are not saved in checkpoints: build the model with "
                "only its parameters on meta, e.g. accelerate.init_empty_weights())"
            )
    if layers:
        from .hf import mark_lowrank_config  # hf imports this module

        mark_lowrank_config(model)  # a transformers model's save_pretrained keeps low rank
    return model


def _restructure(model: nn.Module, layers: Mapping[str, Mapping[str, Any]], where: str) -> None:
    """Replace each listed module of ``model`` (on any device, ``meta`` too) by the low-rank
    layer its entry describes, before the tensors are loaded (``where`` names the source in
    errors)."""
    holders = _parents(model)
    for name, entry in layers.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(
                f"{where}: layer {name!r} ({entry.get('type')}) is not in the model"
            ) from None
        new = _layer_for(module, dict(entry), name, Path(where))
        if isinstance(new, DynamicLowRankLinear) and "active_rank" in entry:
            new.set_extra_state({"rank": int(entry["active_rank"])})
        if new is not module:
            for parent, child_name, _ in holders.get(id(module), []):
                setattr(parent, child_name, new)


def _layer_for(module: nn.Module, entry: dict[str, Any], name: str, path: Path) -> nn.Module:
    kind = entry.get("type")
    cls = _LAYER_TYPES.get(kind)  # type: ignore[arg-type]
    if cls is None:
        raise CheckpointError(f"{path}: layer {name!r} has unknown type {kind!r}")
    rank = int(entry["rank"])
    if (
        type(module) is cls
        and isinstance(module, (LowRankLinear, DynamicLowRankLinear))
        and module.S.shape[0] == rank
        and (module.D is not None) == entry["balance"]
    ):
        return module
    if isinstance(module, AdaptiveLowRankLinear) and cls is AdaptiveLowRankLinear:
        if module.rank != rank or (
            module.is_lowrank and (module.D is not None) != entry["balance"]
        ):
            if module.is_lowrank:
                module.load_state_dict(make_linear(module.dense_weight(), module.bias).state_dict())
            module._restructure(rank, balance=entry["balance"])
        return module
    ref = next(iter(module.parameters()), None)
    if ref is not None and is_conv1d(module):  # GPT-2's Conv1D: weight stored (in, out)
        in_f, out_f = module.weight.shape
    elif ref is not None and hasattr(module, "in_features"):
        in_f, out_f = module.in_features, module.out_features
    else:
        raise CheckpointError(
            f"{path}: layer {name!r} is a {type(module).__name__} in the model, which cannot "
            f"hold a {kind}"
        )
    if (in_f, out_f) != (entry["in_features"], entry["out_features"]):
        raise CheckpointError(
            f"{path}: layer {name!r} is {entry['out_features']}x{entry['in_features']} in the "
            f"checkpoint but {out_f}x{in_f} in the model"
        )
    kw = {"bias": entry["bias"], "device": ref.device, "dtype": ref.dtype}
    if cls is LowRankLinear:
        return LowRankLinear(
            entry["in_features"], entry["out_features"], rank, balance=entry["balance"], **kw
        )
    if cls is DynamicLowRankLinear:
        return DynamicLowRankLinear(
            entry["in_features"],
            entry["out_features"],
            max_rank=rank,
            balance=entry["balance"],
            **kw,
        )
    layer = AdaptiveLowRankLinear(entry["in_features"], entry["out_features"], **kw)
    layer._restructure(rank, balance=entry["balance"])
    return layer


# ------------------------------------------------------------------------------------------
# model folders: the files beside the weights, and config.json's description of the layers
# ------------------------------------------------------------------------------------------

QUANT_METHOD = "lowrank-layers"
"""The ``quant_method`` of a low-rank model's ``quantization_config`` in ``config.json``."""

# weight files of the converted model itself, at the top of a model folder: replaced
_WEIGHT_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack"}
# top-level folders holding exports of the dense model (sentence-transformers' ONNX and
# OpenVINO backends): copying them would ship the unconverted model beside the converted one
_DENSE_EXPORT_FOLDERS = {"onnx", "openvino"}


def copy_model_folder(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Copy every entry of a model folder ``src`` into ``dst`` except the model's own weights.

    Skipped: the top-level weight files (``model.safetensors``, ``pytorch_model.bin``, their
    shards and ``*.index.json``, and ``.pt``/``.pth``/``.gguf``/``.h5``/``.msgpack`` files),
    which the converted checkpoint replaces, and the top-level ``onnx/`` and ``openvino/``
    folders (exports of the dense model, which would load it unconverted). Subfolders are
    copied whole, weight files included: the modules of a sentence-transformers folder
    (``1_Pooling/``, ``2_Dense/model.safetensors``, ...) are not converted and are needed.
    Entries already in ``dst`` are overwritten.

    Returns:
        The names of the top-level entries copied, sorted.
    """
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise NotADirectoryError(f"src must be a model folder, got {src}")
    copied = []
    for item in sorted(src.iterdir()):
        if item.is_dir():
            if item.name in _DENSE_EXPORT_FOLDERS:
                continue
            shutil.copytree(item, dst / item.name, dirs_exist_ok=True)
        elif item.suffix in _WEIGHT_SUFFIXES or item.name.endswith(".index.json"):
            continue
        else:
            shutil.copy2(item, dst / item.name)
        copied.append(item.name)
    return copied


def _write_config_entry(config_json: Path, entry: dict[str, Any]) -> None:
    if not config_json.exists():
        return
    config = json.loads(config_json.read_text(encoding="utf-8"))
    config["quantization_config"] = entry
    config_json.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def lowrank_layers_of(model: nn.Module) -> dict[str, dict[str, Any]]:
    """The checkpoint format's description of every low-rank layer of ``model``, by name."""
    layers = {}
    for name, module in model.named_modules():
        entry = _layer_entry(module)
        if entry is not None:
            layers[name] = entry
    return layers


def lowrank_quantization_config(
    model_or_layers: nn.Module | Mapping[str, Mapping[str, Any]],
) -> dict[str, Any]:
    """The ``quantization_config`` entry of ``config.json`` describing a low-rank model.

    ``{"quant_method": "lowrank-layers", "format": "lowrank-layers", "format_version": 1,
    "layers": {name: {"type", "in_features", "out_features", "rank", "balance", "bias",
    ["active_rank"]}}}``: the ``layers`` of the checkpoint format (docs/checkpoints.md), for
    a model (its current layers) or a ``layers`` mapping as read from a checkpoint.
    """
    if isinstance(model_or_layers, nn.Module):
        layers = lowrank_layers_of(model_or_layers)
    elif isinstance(model_or_layers, Mapping):
        layers = {str(k): dict(v) for k, v in model_or_layers.items()}
    else:
        raise TypeError(
            "model_or_layers must be an nn.Module or a mapping of layer descriptions, got "
            f"{type(model_or_layers).__name__}"
        )
    return {
        "quant_method": QUANT_METHOD,
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "layers": dict(sorted(layers.items())),
    }


# ------------------------------------------------------------------------------------------
# converting a checkpoint without model code
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Job:
    """What one worker converts: some tensors of one source file into one output file."""

    src: str
    keys: tuple[str, ...]
    out: str
    policy: tuple[tuple[str, Any], ...]
    selected: frozenset[str]
    threshold: int
    method: str
    balance: str
    seed: int
    threads: int
    speed: SpeedRule | None = None
    transposed: frozenset[str] = frozenset()  # Conv1D weights, stored (in, out)


def is_embedding_name(module_name: str) -> bool:
    """Whether a module name looks like an embedding (excluded by default by convert_checkpoint)."""
    return any(_EMBEDDING_COMPONENT.fullmatch(part) for part in module_name.split("."))


# transformers model types whose projections are Conv1D, with the modules' names
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer"})
CONV1D_NAMES = r"(?:.*\.)?(?:c_attn|c_proj|c_fc|q_attn)"


def _folder_config(folder: Path) -> dict[str, Any]:
    """``folder/config.json`` as a dict; empty when there is none or it is not an object."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return config if isinstance(config, dict) else {}


def _load_time_conversions(config: Mapping[str, Any]) -> list[tuple[re.Pattern[str], str]]:
    """The tensors transformers renames or merges when it loads this model type.

    transformers >= 5 keeps some checkpoints in an older layout and converts them on load
    (Mixtral's ``block_sparse_moe.experts.<i>.w1.weight`` become ``mlp.experts.gate_up_proj``):
    a factorized tensor of that layout has no place in the loaded model. Empty without
    transformers, or for a folder transformers did not write.
    """
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or "transformers_version" not in config:
        return []
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError:
        return []
    out = []
    for transform in get_checkpoint_conversion_mapping(model_type) or []:
        targets = ", ".join(getattr(transform, "target_patterns", None) or ())
        for source in getattr(transform, "source_patterns", None) or ():
            pattern = re.compile(re.escape(source).replace(r"\*", r"[^.]+"))
            out.append((pattern, f"{source!r} -> {targets!r}"))
    return out


def _conversion_reason(key: str, conversions: list[tuple[re.Pattern[str], str]]) -> str | None:
    """Why ``key`` is not factorized: transformers converts it when loading; or None."""
    for pattern, description in conversions:
        if pattern.search(key):
            return (
                f"transformers converts this tensor when loading the model ({description}), "
                "so a factorized one could not be loaded: convert the loaded model instead "
                "(convert_model, or the CLI with --budget)"
            )
    return None


def _conv1d_keys(
    selected: set[str], conv1d: bool | str | Sequence[str] | None, folder: Path
) -> set[str]:
    """The selected ``<module>.weight`` keys stored ``(in, out)`` (see ``conv1d``)."""
    patterns: str | Sequence[str] | None
    if conv1d is None:
        model_type = _folder_config(folder).get("model_type")
        if model_type is not None:
            patterns = CONV1D_NAMES if model_type in CONV1D_MODEL_TYPES else None
        else:
            like = sorted(k for k in selected if re.fullmatch(CONV1D_NAMES, k[: -len(".weight")]))
            if like:
                raise ValueError(
                    f"convert_checkpoint: {like[0]} is named like a GPT-2 Conv1D weight, stored "
                    f"(in, out), and no config.json in {folder} says which model this is: pass "
                    "conv1d=True (GPT-2's Conv1D layers) or conv1d=False (every weight is "
                    "nn.Linear's (out, in)); CLI --conv1d gpt2 / none"
                )
            patterns = None
    elif isinstance(conv1d, bool):
        patterns = CONV1D_NAMES if conv1d else None
    else:
        patterns = conv1d
    if patterns is None:
        return set()
    return {k for k in selected if name_matches(k[: -len(".weight")], patterns)}


def _is_expert_tensor(key: str, info: dict[str, Any]) -> bool:
    """A fused 3-D expert tensor of a mixture of experts (``...experts.gate_up_proj``)."""
    return (
        len(info["shape"]) == 3
        and info["dtype"] in ("F64", "F32", "F16", "BF16")
        and "expert" in key.lower()
    )


def _expert_report(key: str, info: dict[str, Any]) -> LayerReport:
    n = math.prod(info["shape"])
    shape = "x".join(map(str, info["shape"]))
    return LayerReport(
        key, "experts (3-D)", None, None, None, n, n, None, 0.0,
        f"fused 3-D expert tensor ({shape}) is not converted",
    )  # fmt: skip


def convert_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    rank: int | None = None,
    rank_ratio: float | None = None,
    energy: float | None = None,
    param_ratio: float | None = None,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    exclude_embeddings: bool = True,
    conv1d: bool | str | Sequence[str] | None = None,
    threshold: int = 0,
    method: Method = "svd",
    balance: Balance = "none",
    seed: int = 0,
    workers: int = 1,
    overwrite: bool = False,
    min_speedup: float | None = None,
    speedup_tokens: int = 1,
    progress: bool = False,
) -> ConversionReport:
    """Factorize the 2-D weights of a safetensors checkpoint, without model code.

    ``src`` is a ``.safetensors`` file, a sharded checkpoint's ``.index.json``, or a
    folder (a transformers model folder: its other files — config, tokenizer — are copied
    to ``dst``). Each tensor ``<module>.weight`` that is 2-D, floating point, selected by
    ``include`` / ``exclude`` (matched against ``<module>`` as in
    :func:`~lowrank_layers.convert_model`), not an embedding (unless
    ``exclude_embeddings=False``), above ``threshold``, saving parameters at its rank and
    (with ``min_speedup``, as in :func:`~lowrank_layers.convert_model`) expected to run at
    least that much faster at ``speedup_tokens`` tokens per call is read, factorized and
    written as ``<module>.U/.S/.V(/.D)``; every other tensor is copied
    bit for bit. Tensors are read and written one at a time: peak memory stays near the
    largest tensor and its factors, not the checkpoint: for 4096x8192 float32 weights,
    1.8x one weight above the import in the CLI or in worker processes (which return freed
    memory to the OS at once), about 2x in a process of the caller's own.

    The result loads with :func:`load_lowrank` into the dense architecture and gives the
    same outputs as :func:`~lowrank_layers.convert_model` with the same policy, method and
    seed. ``dst`` is a file when ``src`` is one file and ``dst`` ends in ``.safetensors``
    (with several ``workers``, their parts are merged into it; not under
    ``torch.distributed``, which needs a folder), else a folder mirroring ``src``'s shards
    (one shard per worker for a single-file source) with an index. It is written under a
    temporary name beside it and renamed at the end: nothing appears at ``dst`` unless the
    whole conversion succeeds, and an existing ``dst`` (with ``overwrite=True``) is
    replaced whole, a folder with all of its files.

    GPT-2 (transformers' ``Conv1D``) stores its projection weights ``(in, out)``, the
    transpose of ``nn.Linear``'s, which the tensors alone do not tell. ``conv1d`` says
    which weights are stored so: ``None`` (default) reads ``config.json`` beside the
    checkpoint (``model_type`` gpt2, openai-gpt, imagegpt or decision_transformer: their
    ``c_attn``, ``c_proj``, ``c_fc``, ``q_attn``) and, without a config, refuses a
    checkpoint with such names rather than guess; ``True`` / ``False``: those names are /
    no weight is ``Conv1D``; a regex or list (as ``include``): these modules are. Such a
    weight is factorized as the ``(out, in)`` matrix it is, and :func:`load_lowrank` puts
    the low-rank layer in place of the model's ``Conv1D``.

    A folder ``dst`` gets copies of the source folder's other files and subfolders (config,
    tokenizer, a sentence-transformers model's ``modules.json`` and ``1_Pooling/``; not
    its weights), and ``config.json`` a ``quantization_config`` describing the low-rank
    layers (see :func:`~lowrank_layers.load_pretrained`). Fused 3-D expert tensors
    (``...experts.gate_up_proj``) are copied and reported as not converted.

    Work is shared by ``workers`` processes on this machine, or, when called inside an
    initialised ``torch.distributed`` job (torchrun), by its ranks: each rank converts its
    share of the files into a common temporary folder and rank 0 writes the index and
    commits. Every rank returns the full report.

    Raises:
        FileNotFoundError, CheckpointError: a missing or unreadable ``src``.
        FileExistsError: ``dst`` exists and ``overwrite`` is False.
        NotADirectoryError: a folder above ``dst`` is a file.
        ValueError, TypeError: bad options (named, with the value and what is allowed).
    """
    policy = rank_policy(rank, rank_ratio, energy, param_ratio)
    resolve_rank(1 << 20, 1 << 20, **policy)
    _check_choice("method", method, METHODS)
    _check_choice("balance", balance, BALANCE_MODES)
    _check_patterns("include", include)
    _check_patterns("exclude", exclude)
    for name, value, low in (("threshold", threshold, 0), ("workers", workers, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    speed = speed_rule(min_speedup, speedup_tokens)
    if conv1d is not None and not isinstance(conv1d, bool):
        _check_patterns("conv1d", conv1d)
    src, dst = Path(src), _named(Path(dst))
    ckpt = _open_checkpoint(src)
    if ckpt.metadata.get("format") == FORMAT_NAME:
        raise CheckpointError(f"{src} is already a {FORMAT_NAME} checkpoint")

    headers = {f: _read_header(f)[0] for f in ckpt.files}
    conversions = _load_time_conversions(_folder_config(ckpt.folder or src.parent))
    selected: set[str] = set()
    report = ConversionReport()
    for f in ckpt.files:
        for key, info in headers[f].items():
            if key == "__metadata__":
                continue
            report.model_params_before += math.prod(info["shape"])
            module = key[: -len(".weight")] if key.endswith(".weight") else None
            if _is_expert_tensor(key, info):
                report.layers.append(_expert_report(key, info))
                continue
            if (
                module is None
                or len(info["shape"]) != 2
                or info["dtype"] not in ("F64", "F32", "F16", "BF16")
                or (include is not None and not name_matches(module, include))
                or (exclude is not None and name_matches(module, exclude))
                or (exclude_embeddings and is_embedding_name(module))
            ):
                continue
            reason = _conversion_reason(key, conversions)
            if reason is not None:
                n = math.prod(info["shape"])
                out_f, in_f = info["shape"]
                report.layers.append(
                    LayerReport(module, "Linear", in_f, out_f, None, n, n, None, 0.0, reason)
                )
                continue
            selected.add(key)
    if not selected:
        raise ValueError(
            f"convert_checkpoint: no 2-D weight of {src} matched (include={include!r}, "
            f"exclude={exclude!r}, exclude_embeddings={exclude_embeddings})"
        )
    transposed = _conv1d_keys(selected, conv1d, ckpt.folder or src.parent)

    distributed = _dist_world()
    world, rank_id = distributed
    one_file = len(ckpt.files) == 1 and dst.suffix == ".safetensors"
    if one_file and world > 1:
        raise ValueError(
            f"dst {str(dst)!r} names one .safetensors file, but the {world} ranks of a "
            "torch.distributed conversion write a folder (one shard per rank): pass a folder"
        )
    single_out = one_file and workers == 1  # else the workers' parts are merged into dst
    if len(ckpt.files) > 1:
        plan = [
            (f, tuple(k for k in headers[f] if k != "__metadata__"), f.name) for f in ckpt.files
        ]
    else:
        f = ckpt.files[0]
        keys = [k for k in headers[f] if k != "__metadata__"]
        groups = _balance(keys, headers[f], max(workers, world))
        names = [SINGLE_FILE] if single_out else _shard_names(len(groups))
        plan = [(f, tuple(g), n) for g, n in zip(groups, names, strict=True)]

    total_threads = torch.get_num_threads()
    threads = max(1, total_threads // max(1, min(workers, len(plan))))

    def jobs_in(folder: Path) -> list[_Job]:
        return [
            _Job(
                str(f),
                keys,
                str(folder / name) if not single_out else str(folder),
                tuple(sorted(policy.items())),
                frozenset(selected & set(keys)),
                threshold,
                method,
                balance,
                seed,
                threads if workers > 1 else total_threads,
                speed,
                frozenset(transposed & set(keys)),
            )
            for f, keys, name in plan
        ]

    if world > 1:
        results = _run_distributed(jobs_in, dst, overwrite, rank_id, world, ckpt, plan, single_out)
    elif one_file and not single_out:  # several workers, one output file
        with _atomic_destination(dst, is_dir=False, overwrite=overwrite) as tmp:
            parts = _temp_path(_named(dst))
            parts.mkdir()
            try:
                jobs = jobs_in(parts)
                results = _run_jobs(jobs, workers, progress)
                _merge_parts(tmp, [Path(job.out) for job in jobs], results)
            finally:
                _remove(parts)
    else:
        with _atomic_destination(dst, is_dir=not single_out, overwrite=overwrite) as tmp:
            jobs = jobs_in(tmp)
            results = _run_jobs(jobs, workers, progress)
            if not single_out:
                _finish_folder(tmp, ckpt, results, plan)
    for layer_reports, _, _, _ in results:
        report.layers.extend(layer_reports)
    report.layers.sort(key=lambda r: r.name)
    report.model_params_after = report.model_params_before - sum(
        r.params_before - r.params_after for r in report.converted
    )
    return report


def _merge_parts(out: Path, parts: Sequence[Path], results: Sequence[tuple]) -> None:
    """Copy the workers' part files into one safetensors file, one tensor at a time."""
    layers: dict[str, Any] = {}
    for _, _, part_layers, _ in results:
        layers.update(part_layers)
    metadata = _format_metadata(layers, {})
    keys = [key for _, written, _, _ in results for key in written]
    writer = _ShardWriter(out, _header_reserve(keys, len(json.dumps(metadata))))
    try:
        for part, (_, written, _, _) in zip(parts, results, strict=True):
            with _TensorReader(part) as reader:
                for key in written:
                    writer.add(key, reader.get(key))
        writer.finish(metadata)
    except BaseException:
        writer.abort()
        raise


def _balance(keys: list[str], header: dict[str, Any], n: int) -> list[list[str]]:
    """Split keys into ``n`` groups of similar byte size (largest first, into the lightest)."""
    n = max(1, min(n, len(keys)))
    sizes = {k: header[k]["data_offsets"][1] - header[k]["data_offsets"][0] for k in keys}
    groups: list[list[str]] = [[] for _ in range(n)]
    loads = [0] * n
    for key in sorted(keys, key=lambda k: (-sizes[k], k)):
        i = loads.index(min(loads))
        groups[i].append(key)
        loads[i] += sizes[key]
    order = {k: i for i, k in enumerate(keys)}
    return [sorted(g, key=order.__getitem__) for g in groups]


def _run_jobs(jobs: list[_Job], workers: int, progress: bool) -> list[tuple]:
    if workers == 1 or len(jobs) == 1:
        return [_convert_job(job, progress=progress) for job in jobs]
    ctx = multiprocessing.get_context("spawn")
    # the workers are processes of their own: their allocator can be set for conversion
    with ctx.Pool(min(workers, len(jobs)), initializer=_pin_mmap_threshold) as pool:
        return pool.map(_convert_job, jobs)


def _convert_job(job: _Job, progress: bool = False) -> tuple:
    """Convert one job's tensors into its output file; returns (reports, keys, layers, bytes)."""
    torch.set_num_threads(job.threads)
    policy = dict(job.policy)
    header, _ = _read_header(Path(job.src))
    out_keys: list[str] = []
    for key in job.keys:
        if key in job.selected:
            module = key[: -len(".weight")]
            out_keys += [f"{module}.{n}" for n in ("U", "S", "V", "D", "weight")]
        else:
            out_keys.append(key)
    layers_bound = sum(len(k) + 200 for k in job.selected)
    writer = _ShardWriter(Path(job.out), _header_reserve(out_keys, layers_bound + 512))
    reports: list[LayerReport] = []
    layers: dict[str, Any] = {}
    written: list[str] = []
    bias_of = {k[: -len(".bias")] for k in header if k.endswith(".bias")}
    keys: Iterable[str] = job.keys
    if progress:
        try:
            from tqdm.auto import tqdm
        except ImportError as exc:
            raise ImportError(
                "progress=True needs tqdm: pip install 'lowrank-layers[progress]'"
            ) from exc
        keys = tqdm(job.keys, desc=Path(job.src).name, unit="tensor")
    try:
        with _TensorReader(Path(job.src)) as reader:
            for key in keys:
                # Memory held per tensor W, beside the process's baseline (figures for a
                # 4096x8192 float32 W of 128 MiB at rank 410, CLI; MiB):
                #   read       W alone, read straight into its storage (get):   128
                #   factorize  + the SVD's working matrices, then the factors:   ≤ 55
                #   rel. error + the factors (20) and float64 (·, r) matrices:  ≤ 65
                #   write      the factors, from their own storage; W dropped:   20
                # plus ~35 that stays after the first tensor (MKL's cached buffers, code
                # pages): peak ≈ 225 above the import, under 2·W. Every name is unbound
                # before the next read (one still bound while `reader.get` runs holds two
                # tensors at once), and the heap's free pages go back to the OS.
                tensor = reader.get(key)
                if key not in job.selected:
                    writer.add(key, tensor)
                    written.append(key)
                    del tensor
                    continue
                module = key[: -len(".weight")]
                start = time.perf_counter()
                conv1d = key in job.transposed  # (in, out): factorize its (out, in) view
                W = tensor.t() if conv1d else tensor
                entry = _factorize_tensor(
                    module,
                    W,
                    policy,
                    job,
                    bias=module in bias_of,
                    kind="Conv1D" if conv1d else "Linear",
                )
                del W
                if isinstance(entry, LayerReport):  # skipped: copy the weight unchanged
                    writer.add(key, tensor)
                    written.append(key)
                    reports.append(entry)
                    del tensor, entry
                    _release_free_heap()
                    continue
                factors, layer_report, layer_entry = entry
                dtype = tensor.dtype
                del entry, tensor  # the factors alone are written
                for name in list(factors):
                    writer.add(f"{module}.{name}", factors.pop(name))
                    written.append(f"{module}.{name}")
                writer.add(_guard_key(module), _guard(dtype))
                written.append(_guard_key(module))
                layer_report.seconds = time.perf_counter() - start
                reports.append(layer_report)
                layers[module] = layer_entry
                _release_free_heap()
        size = writer.finish(_format_metadata(layers, {}))
    except BaseException:
        writer.abort()
        raise
    return reports, written, layers, size


@functools.cache
def _libc_function(name: str) -> Callable[..., int] | None:
    """``name`` from glibc (``malloc_trim``, ``mallopt``); None under another C library."""
    try:
        lib = ctypes.CDLL(None)
        if not hasattr(lib, "gnu_get_libc_version"):
            return None  # musl, macOS: their allocators behave differently
        return getattr(lib, name)
    except (AttributeError, OSError, TypeError):  # TypeError: CDLL(None) on Windows
        return None


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def _pin_mmap_threshold(threshold: int = 1 << 20) -> bool:
    """Serve every C allocation of ``threshold`` bytes or more with its own ``mmap`` (glibc).

    For a process that does nothing but convert: the CLI's ``convert`` and the worker
    processes of :func:`convert_checkpoint` call it. glibc otherwise raises its mmap
    threshold to the size of the largest block freed (up to 32 MiB), and from then on
    serves the factorization's ``(·, rank)`` working matrices from its heap, where, once
    freed, they stay resident and fragmented: 30-60 MiB beside a 4096x8192 float32
    weight, which ``malloc_trim`` between steps does not fully recover. With the
    threshold pinned each such block goes back to the OS when freed, at the price of
    faulting its pages in again when it is next allocated (~40k page faults, ~0.15 s of
    system time per 4096x8192 weight, a few percent of its factorization).
    :func:`convert_checkpoint` does not call it itself: a pinned threshold stays for the
    life of the process, and would change the allocator of the caller's own work.

    Returns:
        Whether the threshold was set (False under another C library).
    """
    mallopt = _libc_function("mallopt")
    return mallopt is not None and bool(mallopt(_M_MMAP_THRESHOLD, int(threshold)))


def _release_free_heap() -> None:
    """Return the C heap's free pages to the OS: glibc's ``malloc_trim(0)``, else nothing.

    glibc serves blocks below its mmap threshold from the heap, and that threshold rises
    to the size of any large block freed (up to 32 MiB): after the first tensor, the
    factorization's ``(·, rank)`` working matrices come from the heap, and once freed
    they stay resident, fragmented so the heap cannot shrink from its top: 50-80 MiB
    beside the next 4096x8192 float32 tensor, in a process whose mmap threshold is not
    pinned (:func:`_pin_mmap_threshold`). Costs 7-15 ms per call after a factorization
    of that size (well under 1% of it), less after smaller ones.
    """
    trim = _libc_function("malloc_trim")
    if trim is not None:
        trim(0)


def _factorize_tensor(
    module: str,
    W: torch.Tensor,
    policy: dict[str, Any],
    job: _Job,
    *,
    bias: bool,
    kind: str = "Linear",
) -> tuple[dict[str, torch.Tensor], LayerReport, dict[str, Any]] | LayerReport:
    """Factorize one ``(out, in)`` weight ``W`` (a transposed view for a ``Conv1D``), or the
    report of why it stays as it is."""
    out_f, in_f = W.shape

    def skipped(reason: str) -> LayerReport:
        return LayerReport(module, kind, in_f, out_f, None, W.numel(), W.numel(), None, 0.0, reason)

    keep_d = job.balance != "none"
    planned, reason = plan_rank(out_f, in_f, policy, threshold=job.threshold, balance=keep_d)
    if reason is None and planned is not None and job.speed is not None:
        reason = job.speed.reason(out_f, in_f, planned, balance=keep_d, bias=bias, dtype=W.dtype)
    if reason is not None:
        return skipped(reason)
    if not _all_finite(W):  # two scalars; torch.isfinite(W) built 1.75·W of temporaries
        return skipped(NONFINITE_REASON)
    generator = torch.Generator().manual_seed(layer_seed(job.seed, module))
    # beside W: the randomized SVD's (·, rank + 10) working matrices, at most an iterate,
    # its LU basis and the next (≤ 55 MiB for 4096x8192 at rank 410, ~0.4·W, factors
    # included); or the exact SVD's U, S, Vh. No float32 copy of a float32 W.
    factors = factorize(W, method=job.method, balance=job.balance, generator=generator, **policy)  # type: ignore[arg-type]
    # the SVD's freed working matrices may stay in the heap, fragmented: give their pages
    # back before relative_error allocates its own (float64 (·, rank) matrices and blocks
    # of rows: ≤ 45 MiB for 4096x8192 at rank 410, ≤ 60 MiB when the error is below 10%)
    _release_free_heap()
    if not saves_parameters(out_f, in_f, factors.rank, balance=keep_d):
        return skipped(break_even_reason(factors.rank))
    if job.speed is not None and planned is None:  # energy: the rank is known only now
        reason = job.speed.reason(
            out_f, in_f, factors.rank, balance=keep_d, bias=bias, dtype=W.dtype
        )
        if reason is not None:
            return skipped(reason)
    tensors = {
        "U": factors.U.contiguous(),
        "S": factors.S.contiguous(),
        "V": factors.V.contiguous(),
    }
    if factors.D is not None:
        tensors["D"] = factors.D.contiguous()
    after = factor_parameters(out_f, in_f, factors.rank, balance=keep_d)
    report = LayerReport(
        module, "LowRankLinear", in_f, out_f, factors.rank, W.numel(), after,
        relative_error(W, factors), 0.0,
    )  # fmt: skip
    report.speedup_few, report.speedup_many = report_speedups(
        in_f, out_f, factors.rank, balance=keep_d, bias=bias, dtype=W.dtype
    )
    entry = {
        "type": "LowRankLinear",
        "in_features": in_f,
        "out_features": out_f,
        "rank": factors.rank,
        "balance": factors.D is not None,
        "bias": bias,
    }
    return tensors, report, entry


def _finish_folder(tmp: Path, ckpt: _Checkpoint, results: list[tuple], plan: list) -> None:
    """Beside the converted shards: the source folder's other files, the index (several
    shards), and ``config.json``'s description of the low-rank layers."""
    if ckpt.folder is not None:
        copy_model_folder(ckpt.folder, tmp)
    layers: dict[str, Any] = {}
    for _, _, layer_entries, _ in results:
        layers.update(layer_entries)
    _write_config_entry(tmp / "config.json", lowrank_quantization_config(layers))
    if len(plan) == 1 and plan[0][2] == SINGLE_FILE:
        return
    weight_map: dict[str, str] = {}
    total = 0
    for (_, _, name), (_, written, _, size) in zip(plan, results, strict=True):
        weight_map.update(dict.fromkeys(written, name))
        total += size
    _write_index(tmp / INDEX_FILE, weight_map, _format_metadata(layers, {}), total)


def _dist_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


def _run_distributed(jobs_in, dst, overwrite, rank_id, world, ckpt, plan, single_out):
    """Each rank converts jobs rank, rank + world, ...; rank 0 writes the index and commits."""
    import torch.distributed as dist

    if single_out:  # cannot happen: world > 1 always writes a folder
        raise AssertionError("distributed conversion writes a folder")
    box: list[Any] = [None]
    error: list[Any] = [None]
    if rank_id == 0:
        try:
            if dst.exists() and not overwrite:
                raise FileExistsError(f"{dst} already exists (pass overwrite=True to replace it)")
            dst.parent.mkdir(parents=True, exist_ok=True)
            _clean_leftovers(dst.parent, re.escape(dst.name))
            tmp = _temp_path(dst)
            tmp.mkdir()
            box[0] = str(tmp)
        except BaseException as exc:
            error[0] = repr(exc)
    dist.broadcast_object_list(box, src=0)
    dist.broadcast_object_list(error, src=0)
    if error[0] is not None:
        raise FileExistsError(error[0]) if "FileExistsError" in error[0] else RuntimeError(error[0])
    tmp = Path(box[0])
    jobs = jobs_in(tmp)
    mine = {i: _convert_job(job) for i, job in enumerate(jobs) if i % world == rank_id}
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, mine)
    results = [None] * len(jobs)
    for part in gathered:
        for i, res in part.items():
            results[i] = res
    if rank_id == 0:
        try:
            _finish_folder(tmp, ckpt, results, plan)
            _commit(tmp, dst)
        except BaseException:
            _remove(tmp)
            raise
    dist.barrier()
    return results


# ------------------------------------------------------------------------------------------
# inspecting
# ------------------------------------------------------------------------------------------


@dataclass
class WeightSpectrum:
    """The singular values of one 2-D weight (or of a stored low-rank layer's ``S``)."""

    name: str
    out_features: int
    in_features: int
    singular_values: torch.Tensor
    stored_rank: int | None = None  # set for low-rank layers of a lowrank-layers checkpoint

    def rank_for(self, energy: float) -> int:
        return select_rank(self.singular_values, energy)

    def params_at(self, rank: int) -> int:
        return factor_parameters(self.out_features, self.in_features, rank, balance=False)


def weight_spectra(
    path: str | os.PathLike, *, include: str | Sequence[str] | None = None
) -> list[WeightSpectrum]:
    """Singular values of every 2-D floating-point ``*.weight`` in a checkpoint.

    Low-rank layers of a lowrank-layers checkpoint report the singular values of their
    stored factors (``diag(D)·U·diag(S)·Vᵀ``, computed from the small factors). Tensors are
    read one at a time; each exact SVD runs in float32.
    """
    _check_patterns("include", include)
    ckpt = _open_checkpoint(Path(path))
    layers: dict[str, Any] = {}
    if ckpt.metadata.get("format") == FORMAT_NAME:
        layers, _ = _check_format(ckpt.metadata, Path(path))
    readers: dict[Path, _TensorReader] = {}

    def get(key: str) -> torch.Tensor:
        f = ckpt.weight_map[key]
        if f not in readers:
            readers[f] = _TensorReader(f)
        return readers[f].get(key)

    spectra: list[WeightSpectrum] = []
    try:
        for key in sorted(ckpt.weight_map):
            module = key[: -len(".weight")] if key.endswith(".weight") else None
            if module is None or (include is not None and not name_matches(module, include)):
                continue
            W = get(key)
            if W.dim() != 2 or not W.is_floating_point():
                continue
            sv = torch.linalg.svdvals(W.to(torch.float32))
            spectra.append(WeightSpectrum(module, W.shape[0], W.shape[1], sv))
        for module, entry in sorted(layers.items()):
            if include is not None and not name_matches(module, include):
                continue
            parts = {
                n: get(f"{module}.{n}").to(torch.float32)
                for n in ("U", "S", "V", "D")
                if f"{module}.{n}" in ckpt.weight_map
            }
            U = parts["U"] * parts["D"][:, None] if "D" in parts else parts["U"]
            _, Ru = torch.linalg.qr(U)
            _, Rv = torch.linalg.qr(parts["V"])
            sv = torch.linalg.svdvals((Ru * parts["S"]) @ Rv.mT)
            spectra.append(
                WeightSpectrum(
                    module, entry["out_features"], entry["in_features"], sv, entry["rank"]
                )
            )
    finally:
        for reader in readers.values():
            reader.close()
    spectra.sort(key=lambda s: s.name)
    return spectra
