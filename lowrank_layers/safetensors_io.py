"""Streaming safetensors files: the file layer under ``checkpoint.py``.

Nothing here knows the lowrank-layers format. It holds:

- reading: :func:`read_header`, :class:`TensorReader` (one tensor at a time, into fresh
  memory), and :func:`locate_files` (the files of a single file, a sharded checkpoint's
  ``.index.json`` or a model folder);
- writing: :class:`ShardWriter` and :func:`write_file` (tensors streamed into a file whose
  header is written last), :func:`shard_names` and :func:`write_index` (transformers'
  naming of shards and their index, :data:`OWN_FILES`).

The files are written under temporary names and renamed into place by
:mod:`lowrank_layers.atomic`.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import torch

from .atomic import scratch_path
from .common import InputError, InputTypeError

__all__ = [
    "FLOAT_DTYPES",
    "INDEX_FILE",
    "OWN_FILES",
    "SINGLE_FILE",
    "CheckpointError",
    "CheckpointFiles",
    "ShardWriter",
    "TensorReader",
    "file_metadata",
    "header_reserve",
    "locate_files",
    "read_header",
    "shard_names",
    "tensor_names",
    "write_file",
    "write_index",
]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
OWN_FILES = r"model(?:-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json"
"""The names of a checkpoint's files in transformers' naming (a regex): the single file,
the shards and their index."""

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
for _name, _code in (
    ("float8_e4m3fn", "F8_E4M3"),
    ("float8_e5m2", "F8_E5M2"),
    ("float4_e2m1fn_x2", "F4"),
):
    if hasattr(torch, _name):
        _ST_DTYPES[getattr(torch, _name)] = _code
_DTYPES_FROM_ST = {code: dtype for dtype, code in _ST_DTYPES.items()}
# safetensors counts F4 values, two to a byte; torch's float4_e2m1fn_x2 holds a packed pair
# per element, so the last dimension of the header's shape is twice torch's
_VALUES_PER_ELEMENT = {"F4": 2}

FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})
"""The safetensors dtype codes of the floating-point tensors that can be factorized."""


class CheckpointError(InputError):
    """A checkpoint that does not match the model, or is not one this library reads."""


# ------------------------------------------------------------------------------------------
# writing
# ------------------------------------------------------------------------------------------


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().contiguous().reshape(-1)
    if flat.device.type != "cpu":
        flat = flat.cpu()
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def _align8(n: int) -> int:
    return (n + 7) // 8 * 8


class _OpenFile:
    """Holds an open ``self.file``, closed by :meth:`close` or on leaving a ``with`` block."""

    file: BinaryIO

    def close(self) -> None:
        """Close the file (closing twice is harmless)."""
        self.file.close()

    def __enter__(self: _Handle) -> _Handle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_Handle = TypeVar("_Handle", bound=_OpenFile)


class ShardWriter(_OpenFile):
    """Streams tensors into one safetensors file, one at a time.

    The header is written last, into space reserved at the start of the file and padded
    with spaces (the format allows trailing whitespace in the header); tensors are written
    as they come, so memory stays at one tensor whatever the file size. Use it as a
    context manager: the file is closed on leaving the block, whether :meth:`finish` ran
    or an exception ended the writing (the caller removes the partial file).
    """

    def __init__(self, path: Path, reserve: int) -> None:
        self.path = path
        self.reserve = _align8(max(reserve, 64))
        self.entries: dict[str, dict[str, Any]] = {}
        self.offset = 0
        self.file = open(path, "wb")  # noqa: SIM115 - closed in finish() / __exit__
        self.file.write(b"\0" * (8 + self.reserve))

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Append ``tensor``'s bytes to the file under ``name``."""
        if name in self.entries:
            raise InputError(f"duplicate tensor name {name!r} in {self.path.name}")
        if tensor.dtype not in _ST_DTYPES:
            raise InputTypeError(
                f"tensor {name!r} has dtype {tensor.dtype}, which safetensors cannot hold"
            )
        code = _ST_DTYPES[tensor.dtype]
        shape = list(tensor.shape)
        if code in _VALUES_PER_ELEMENT:
            if not shape:
                raise InputTypeError(f"tensor {name!r}: a 0-dim {tensor.dtype} cannot be stored")
            shape[-1] *= _VALUES_PER_ELEMENT[code]
        data = _tensor_bytes(tensor)
        self.file.write(data)
        self.entries[name] = {
            "dtype": code,
            "shape": shape,
            "data_offsets": [self.offset, self.offset + data.nbytes],
        }
        self.offset += data.nbytes

    def finish(self, metadata: Mapping[str, str]) -> int:
        """Write the header (tensors sorted by name, and ``metadata``); the file's size."""
        header = {"__metadata__": dict(metadata), **dict(sorted(self.entries.items()))}
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


def _rewrite_with_header(path: Path, raw: bytes, data_start: int, data_len: int) -> None:
    size = _align8(len(raw))
    tmp = scratch_path(path)
    with open(path, "rb") as src, open(tmp, "wb") as dst:
        dst.write(struct.pack("<Q", size) + raw + b" " * (size - len(raw)))
        src.seek(data_start)
        shutil.copyfileobj(src, dst, length=16 * 1024 * 1024)
        dst.flush()
        os.fsync(dst.fileno())
    os.replace(tmp, path)


def header_reserve(names: Iterable[str], metadata_bytes: int) -> int:
    """An upper bound of the header of a file holding ``names`` (see :class:`ShardWriter`)."""
    # per entry: the quoted name plus dtype, a shape of up to 4 dims and two offsets
    return sum(len(json.dumps(n)) + 120 for n in names) + metadata_bytes + 1024


def write_file(
    path: Path,
    names: Sequence[str],
    tensors: Iterable[torch.Tensor],
    metadata: Mapping[str, str],
) -> int:
    """Stream ``tensors``, one per name of ``names`` in order, into one safetensors file.

    ``tensors`` may be a generator: each tensor is written and released before the next
    is produced. Returns the file's size.
    """
    with ShardWriter(path, header_reserve(names, len(json.dumps(metadata)))) as writer:
        for name, tensor in zip(names, tensors, strict=True):
            writer.add(name, tensor)
            del tensor  # not bound while the generator produces the next one
        return writer.finish(metadata)


def shard_names(n: int) -> list[str]:
    """The file names of ``n`` shards, as transformers names them (one: ``SINGLE_FILE``)."""
    if n == 1:
        return [SINGLE_FILE]
    return [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


def write_index(
    path: Path, weight_map: Mapping[str, str], metadata: Mapping[str, str], total: int
) -> None:
    """Write a sharded checkpoint's index: ``metadata`` with ``total_size``, the weight map."""
    index = {
        "metadata": {"total_size": total, **metadata},
        "weight_map": dict(sorted(weight_map.items())),
    }
    path.write_text(json.dumps(index, indent=2) + "\n")


# ------------------------------------------------------------------------------------------
# reading
# ------------------------------------------------------------------------------------------


def read_header(path: Path) -> tuple[dict[str, Any], int]:
    """The JSON header of a safetensors file and the offset of its data."""
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


def tensor_names(header: Mapping[str, Any]) -> list[str]:
    """The tensor names of a header, in its order (``__metadata__`` left out)."""
    return [k for k in header if k != "__metadata__"]


class TensorReader(_OpenFile):
    """Reads tensors of one safetensors file, one at a time, into fresh memory.

    Plain ``seek`` + ``readinto`` rather than a memory map: pages of a mapped file count
    as the process's resident memory for as long as the map lives, so reading a whole
    checkpoint through one map would hold all of it; here each tensor's memory is freed
    when the tensor is.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.header, self.data_start = read_header(path)
        self.file = open(path, "rb")  # noqa: SIM115 - closed in close() / __exit__

    def keys(self) -> list[str]:
        """The names of the file's tensors."""
        return tensor_names(self.header)

    def get(self, key: str) -> torch.Tensor:
        """The tensor ``key``, read into memory of its own."""
        info = self.header.get(key)
        if info is None:
            raise CheckpointError(f"{self.path} holds no tensor {key!r}")
        dtype = _DTYPES_FROM_ST.get(info["dtype"])
        if dtype is None:
            raise CheckpointError(
                f"{self.path}: tensor {key!r} has unsupported dtype {info['dtype']}"
            )
        shape = list(info["shape"])
        per = _VALUES_PER_ELEMENT.get(info["dtype"], 1)
        if per > 1:
            if not shape or shape[-1] % per:
                raise CheckpointError(
                    f"{self.path}: tensor {key!r} of dtype {info['dtype']} has shape {shape}, "
                    f"whose last dimension is not a multiple of {per}"
                )
            shape[-1] //= per
        start, end = info["data_offsets"]
        buf = torch.empty(end - start, dtype=torch.uint8)
        self.file.seek(self.data_start + start)
        if end > start and self.file.readinto(memoryview(buf.numpy())) != end - start:
            raise CheckpointError(f"{self.path} is truncated (tensor {key!r})")
        return buf.view(dtype).reshape(shape)


@dataclass
class CheckpointFiles:
    """The safetensors files of a checkpoint, where each tensor is, and their metadata."""

    files: list[Path]
    weight_map: dict[str, Path]
    metadata: dict[str, str]  # a single file's header metadata, or the index's strings
    total_size: int = 0
    extra_files: list[Path] = field(default_factory=list)
    folder: Path | None = None  # the model folder, for a folder or index source
    index: Path | None = None  # the index the files were found through

    def read_tensors(
        self, skip: Callable[[str, Mapping[str, Any]], bool] | None = None
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor, one at a time, file by file; those for which ``skip(key, entry)``
        (``entry``: the tensor's header entry, ``dtype``, ``shape``, ...) is true are left
        unread."""
        by_file: dict[Path, list[str]] = {}
        for key, f in self.weight_map.items():
            by_file.setdefault(f, []).append(key)
        for f, keys in by_file.items():
            with TensorReader(f) as reader:
                for key in keys:
                    if skip is not None and skip(key, reader.header.get(key) or {}):
                        continue
                    yield key, reader.get(key)


def locate_files(path: Path) -> CheckpointFiles:
    """The files of a checkpoint: a ``.safetensors`` file, an ``.index.json``, or a folder
    holding ``model.safetensors``, an index, or one ``.safetensors`` file."""
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


def file_metadata(path: Path) -> dict[str, str]:
    """The header metadata of one safetensors file (empty when it has none)."""
    return dict(read_header(path)[0].get("__metadata__") or {})


def _open_file(path: Path) -> CheckpointFiles:
    header, _ = read_header(path)
    metadata = header.get("__metadata__") or {}
    keys = tensor_names(header)
    size = sum(header[k]["data_offsets"][1] - header[k]["data_offsets"][0] for k in keys)
    return CheckpointFiles([path], dict.fromkeys(keys, path), dict(metadata), size)


def _open_index(index: Path) -> CheckpointFiles:
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
    shard_set = set(files) | {index}
    extra = [p for p in sorted(folder.iterdir()) if p.is_file() and p not in shard_set]
    total = int((data.get("metadata") or {}).get("total_size", 0))
    return CheckpointFiles(
        files,
        {k: folder / v for k, v in weight_map.items()},
        metadata,
        total,
        extra,
        folder,
        index,
    )
