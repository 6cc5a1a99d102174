"""Atomic writes: a file or folder appears whole at its destination, or not at all.

Every write of the library goes through here: checkpoints (:mod:`lowrank_layers.checkpoint`,
:mod:`lowrank_layers.offline`), the figures of ``plot_spectra`` and the demo's report.
:func:`atomic_destination` gives a temporary sibling that is renamed over a file or folder
at the end; :func:`files_into_folder` replaces some files of a folder and keeps the others;
the temporaries of writers that died are removed by the next write to the same place
(:func:`clean_leftovers`). Nothing here knows a file format.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import uuid
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from .common import InputError

__all__ = [
    "atomic_destination",
    "clean_leftovers",
    "commit",
    "destination_of",
    "files_into_folder",
    "named_path",
    "remove",
    "scratch_path",
    "temp_path",
]


# Temporary names: ``.<name>.tmp-<host>-<pid>-<hex8>`` beside the file or folder ``<name>``
# they become (``.old-`` for a replaced folder on its way out). The host and pid name the
# writer, so that the next write to the same destination can remove what a writer killed
# outright (SIGKILL, power loss) left behind: on this host, a pid that no longer runs.
_HOST = re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname())[:64] or "localhost"
# A writer may keep one scratch file beside its temporary (scratch_path): it is removed
# with the temporary and recognised as a leftover of the same write.
_SCRATCH_SUFFIX = ".rewrite"


def temp_path(dst: Path, kind: str = "tmp") -> Path:
    """A hidden sibling of ``dst`` naming this host and process (see ``_HOST``).

    Not ``tempfile.mkstemp``: its files are 0600, and the rename would carry that mode to
    ``dst``; a file created at this name gets the usual mode.
    """
    return dst.with_name(f".{dst.name}.{kind}-{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def scratch_path(tmp: Path) -> Path:
    """The one scratch file a writer may keep beside its temporary ``tmp`` (``ShardWriter``
    rewriting a header that outgrew its reserve): removed with ``tmp`` on failure, and
    removed as a leftover when its writer died."""
    return tmp.with_name(tmp.name + _SCRATCH_SUFFIX)


def _temp_pattern(names: str) -> re.Pattern[str]:
    """Temporary names of writes to ``names`` (a regex); groups: name, host, pid."""
    return re.compile(
        rf"\.(?P<name>{names})\.(?:tmp|old)-(?:(?P<host>[A-Za-z0-9_.-]+)-(?P<pid>\d+)-)?"
        rf"[0-9a-f]{{8}}(?:{re.escape(_SCRATCH_SUFFIX)})?"
    )


def destination_of(path: str | os.PathLike) -> Path:
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


def clean_leftovers(folder: Path, names: str) -> None:
    """Remove the temporaries of writes to ``folder/<names>`` whose writer died; warn naming them.

    A temporary of this host whose pid no longer runs is removed; one of another host or a
    live process is left alone (a write in progress); one without a pid (written before
    pids were part of the name) is named in a warning and left for the user to remove.
    The warnings point at the caller of the public function that began the write, four
    frames above this one (that function, a ``with`` statement's ``__enter__``, the
    context manager calling this).
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
            and remove(Path(entry.path))
        ):
            removed.append(entry.path)
    if removed:
        warnings.warn(
            f"removed {len(removed)} temporary file(s) left by interrupted writes whose process "
            f"no longer runs: {', '.join(removed)}",
            stacklevel=5,  # the caller of save_lowrank, convert_checkpoint, plot_spectra...
        )
    if unknown:
        warnings.warn(
            f"{', '.join(unknown)}: temporary file(s) of an interrupted write (or of one still "
            "running) by an earlier version of lowrank-layers; remove them if no write is "
            "in progress",
            stacklevel=5,  # the caller of save_lowrank, convert_checkpoint, plot_spectra...
        )


def named_path(path: Path) -> Path:
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
def atomic_destination(
    dst: Path, *, is_dir: bool = False, overwrite: bool = True
) -> Iterator[Path]:
    """A temporary sibling of ``dst`` that replaces ``dst`` whole only if the block succeeds.

    The one atomic write of the library: checkpoints, converted folders, the figures of
    ``plot_spectra`` and the demo's report are all written through it. The block writes a
    file at the path it is given (or files into it, with ``is_dir``: it is then an empty
    folder); on success it is renamed over ``dst`` (an existing ``dst`` folder is replaced
    with all of its files), on any exception it is removed, with the folders above ``dst``
    this call created. :func:`files_into_folder` writes some files into a folder and keeps
    the others. Temporaries of earlier writes to ``dst`` whose process died are removed
    first.

    Raises:
        FileExistsError: ``dst`` exists and ``overwrite`` is False.
        IsADirectoryError: ``dst`` is a folder and ``is_dir`` is False.
        NotADirectoryError: a folder above ``dst`` is a file.
        ValueError: ``dst`` is a folder that holds the current folder.
    """
    dst = named_path(Path(dst))
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} already exists (pass overwrite=True to replace it)")
    if dst.is_dir() and not is_dir:
        raise IsADirectoryError(f"{dst} is a folder; a file cannot replace it")
    if dst.is_dir() and Path.cwd().resolve().is_relative_to(dst.resolve()):
        raise InputError(
            f"{dst} is the current folder or holds it, and would be replaced whole: "
            "write into a new folder"
        )
    created = _make_folder(dst.parent, dst)
    clean_leftovers(dst.parent, re.escape(dst.name))
    tmp = temp_path(dst)
    if is_dir:
        tmp.mkdir()
    try:
        yield tmp
        commit(tmp, dst)
    except BaseException:
        _remove_temporary(tmp)
        _remove_created(dst.parent, created)
        raise


@contextmanager
def files_into_folder(
    folder: Path, names: Sequence[str], *, overwrite: bool, own: str, index: str | None = None
) -> Iterator[dict[str, Path]]:
    """Temporary paths in ``folder`` for ``names``, each renamed over its name at the end.

    The folder's other files stay, except the files of this kind of write (``own``, a
    regex of names, e.g. the shards, single file and index of a checkpoint) that ``names``
    leave out, left by an earlier write: they are removed once the new files are in place.
    ``index`` names the file that points at the others: a stale one is removed first (it
    would be read instead of the new files), and a new one is renamed into place last.
    Each file is replaced atomically; the renames at the end take milliseconds. With
    ``overwrite=False`` any ``own`` file present is an error.
    """
    folder = named_path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"cannot write into {folder}: it is a file, not a folder")
    own_name = re.compile(own)
    present = sorted(  # files only: a folder of such a name is not ours to remove
        p.name
        for p in (folder.iterdir() if folder.is_dir() else ())
        if own_name.fullmatch(p.name) and not p.is_dir()
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
    clean_leftovers(folder, own)
    temps = {name: temp_path(folder / name) for name in names}
    try:
        yield temps
        if index is not None and index in stale:  # first, or fail: it would be read instead
            (folder / index).unlink(missing_ok=True)
        for name in sorted(names, key=lambda n: n == index):  # the index last
            os.replace(temps[name], folder / name)
        for name in stale:  # unreferenced now: one left behind would not be read
            remove(folder / name)
    except BaseException:
        for tmp in temps.values():
            _remove_temporary(tmp)
        _remove_created(folder, created)
        raise


def commit(tmp: Path, dst: Path) -> None:
    """Rename ``tmp`` to ``dst``: a file in one atomic step, a folder over an old one in two."""
    if dst.exists() and (dst.is_dir() or tmp.is_dir()):  # a link to a folder: the link goes
        trash = temp_path(dst, "old")
        os.replace(dst, trash)
        os.replace(tmp, dst)
        remove(trash)
    else:
        os.replace(tmp, dst)


def remove(path: Path) -> bool:
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
    """Remove a temporary and the scratch file its writer may have begun beside it."""
    remove(tmp)
    remove(scratch_path(tmp))
