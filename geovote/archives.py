"""Images read in place from the archives datasets ship in: zip (OSV-5M's `images/<split>/NN.zip`) and
uncompressed tar (webdataset shards, as img2dataset writes them). Nothing is ever extracted.

An image inside an archive is named `<the archive's path>::<its member's name>` (`ARCHIVE_SEP`). Each
process opens each archive once and keeps it (`read_member`): DataLoader workers are processes, so every
worker has its own handles, and no handle is shared across a fork. A tar's index (its members' names,
offsets and sizes, as arrays) is kept per file version and is shared: workers forked after the data
layer listed the shards never read their headers again.

Tar is read with the standard library's `tarfile` rather than the `webdataset` library: the embedding
stage needs random access by id (resume, failure lists, a rank's share of the rows, updates), while
webdataset streams a shard from start to end. One pass over a tar's headers gives every member's offset
and size; a member is then one `os.pread`.
"""
from __future__ import annotations

import os
import tarfile
import threading
import zipfile
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

ARCHIVE_SEP = "::"
ARCHIVE_SUFFIXES = (".zip", ".tar")
# what split_path takes for a member, as a pattern for columns of paths: an archive's name, then a member
MEMBER_PATTERN = r"\.(zip|tar)::."
_MAX_OPEN = 256  # archive handles a process keeps: OSV-5M has ~100 a split, a bound rather than a limit
_TAR_INDEX_BUDGET_BYTES = 1 << 30  # tar indexes kept (~50 bytes a member): every shard of a 20M gallery


class ArchiveError(Exception):
    """A member that cannot be read; the message is the reason recorded in failures.csv."""


def is_archive(name: str) -> bool:
    return name.endswith(ARCHIVE_SUFFIXES)


def list_members(archive: str | os.PathLike, log=None) -> list[tuple[str, int]]:
    """(name, bytes) of every regular file in `archive`, in archive order. A tar damaged mid-way lists
    the members before the damage (and says so through `log`); an archive whose listing cannot be read
    at all raises ArchiveError."""
    archive = os.fspath(archive)
    if archive.endswith(".zip"):
        try:
            with zipfile.ZipFile(archive) as zf:
                return [(m.filename, m.file_size) for m in zf.infolist() if not m.is_dir()]
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise ArchiveError(f"not a readable zip archive ({e})") from None
    index = _tar_index(archive, log)
    return [(index.names[i].decode("utf-8", "surrogateescape"), int(index.sizes[i])) for i in index.order]


@dataclass
class _TarIndex:
    """A tar's regular members as arrays (no Python object per member: cheap to keep, and shared
    untouched with forked DataLoader workers, which then never read the headers again)."""

    names: np.ndarray  # (M,) bytes, sorted
    offsets: np.ndarray  # (M,) int64: where each member's data starts
    sizes: np.ndarray  # (M,) int64
    order: np.ndarray  # (M,) the rows above in archive order

    def find(self, member: str) -> int:
        name = member.encode("utf-8", "surrogateescape")
        at = int(np.searchsorted(self.names, name))
        return at if at < len(self.names) and self.names[at] == name else -1


_TAR_INDEXES: OrderedDict = OrderedDict()  # (path, bytes, mtime) -> _TarIndex, least recently used first
_LOCK = threading.RLock()  # the caches and handles: the server reads gallery images from several threads


def _tar_index(archive: str, log=None, version: tuple | None = None) -> _TarIndex:
    """The archive's index, from the cache while the file is unchanged (`version`: _version's, when the
    caller has it), else from one pass over its headers (said through `log` when it ends in damage)."""
    key = (archive, *(version or _version(archive)))
    with _LOCK:
        if key in _TAR_INDEXES:
            _TAR_INDEXES.move_to_end(key)
            return _TAR_INDEXES[key]
    index = _read_tar_headers(archive, log)
    with _LOCK:
        _TAR_INDEXES[key] = index
        while len(_TAR_INDEXES) > 1 and sum(i.names.nbytes + 24 * len(i.names) for i in _TAR_INDEXES.values()
                                            ) > _TAR_INDEX_BUDGET_BYTES:
            _TAR_INDEXES.popitem(last=False)
    return index


def _read_tar_headers(archive: str, log=None) -> _TarIndex:
    names: list[bytes] = []
    offsets: list[int] = []
    sizes: list[int] = []
    damage = ""
    links = 0
    try:
        with tarfile.open(archive, "r:") as tf:  # "r:": uncompressed only, so that members can be seeked
            end = 0
            try:
                for m in tf:
                    if m.isfile():
                        names.append(m.name.encode("utf-8", "surrogateescape"))
                        offsets.append(m.offset_data)
                        sizes.append(m.size)
                    elif m.islnk() or m.issym():
                        links += 1
                    end = m.offset_data + -(-m.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
            except (tarfile.TarError, EOFError, OSError) as e:
                if not names:
                    raise
                damage = str(e)
            if not damage:
                # tarfile takes a header cut short for the end of the archive: a whole tar ends in two
                # zero blocks after its last member, so anything else there is damage
                tail = os.pread(tf.fileobj.fileno(), 4 * tarfile.RECORDSIZE, end)
                if len(tail) < 2 * tarfile.BLOCKSIZE or tail.strip(b"\0"):
                    damage = "it ends before its end-of-archive blocks"
    except FileNotFoundError:
        raise ArchiveError(f"archive {archive} not found") from None
    except (tarfile.TarError, EOFError, OSError) as e:
        with open(archive, "rb") as f:
            if f.read(2) == b"\x1f\x8b":
                raise ArchiveError("a gzip-compressed tar: decompress it (gunzip; shards are read in "
                                   "place, which needs an uncompressed tar)") from None
        raise ArchiveError(f"not a readable tar archive ({e})") from None
    if log and damage:
        log(f"{archive}: damaged after {len(names):,} members ({damage}): the rest are missing")
    if log and links:
        log(f"{archive}: {links:,} link member(s) skipped: only regular files are read in place")
    arr = np.array(names, dtype=object).astype(bytes) if names else np.zeros(0, "S1")
    order = np.argsort(arr, kind="stable")
    # a name given twice: the later member wins, as extracting the tar would leave it
    sorted_names = arr[order]
    keep = np.ones(len(order), bool)
    keep[:-1] = sorted_names[:-1] != sorted_names[1:]
    order = order[keep]  # the kept members' positions in the archive, in name order
    return _TarIndex(arr[order], np.asarray(offsets, np.int64)[order], np.asarray(sizes, np.int64)[order],
                     np.argsort(order, kind="stable"))


_OPEN: OrderedDict = OrderedDict()  # (process id, path) -> (version, ZipFile or a tar's descriptor)


def _version(archive: str) -> tuple[int, int, int]:
    """(inode, bytes, mtime) of the archive now: a handle or an index of another version is stale."""
    try:
        st = os.stat(archive)
    except FileNotFoundError:
        raise ArchiveError(f"archive {archive} not found") from None
    except OSError as e:
        raise ArchiveError(f"archive {archive}: {e.strerror or e}") from None
    return st.st_ino, st.st_size, st.st_mtime_ns


def _handle(archive: str, version: tuple):
    """This process's handle on this version of the archive (a shard replaced since, by a download or a
    rewrite, is opened anew: reading the new index through the old file would give wrong bytes)."""
    key = (os.getpid(), archive)  # never a handle opened before a fork: each worker opens its own
    if key in _OPEN:
        have, handle = _OPEN[key]
        if have == version:
            _OPEN.move_to_end(key)
            return handle
        _close(_OPEN.pop(key)[1])
    while len(_OPEN) >= _MAX_OPEN:
        _close(_OPEN.popitem(last=False)[1][1])
    try:
        handle = zipfile.ZipFile(archive) if archive.endswith(".zip") else os.open(archive, os.O_RDONLY)
    except FileNotFoundError:
        raise ArchiveError(f"archive {archive} not found") from None
    except (zipfile.BadZipFile, EOFError) as e:
        raise ArchiveError(f"damaged archive ({e})") from None
    except OSError as e:
        raise ArchiveError(f"archive {archive}: {e.strerror or e}") from None
    _OPEN[key] = (version, handle)
    return handle


def _close(handle) -> None:
    try:
        os.close(handle) if isinstance(handle, int) else handle.close()
    except OSError:
        pass


def read_member(archive: str | os.PathLike, member: str) -> bytes:
    """The bytes of `member` of `archive`, read in place. ArchiveError with the reason when they cannot
    be read: no such member, a bad CRC (zip), data cut off by a truncated archive."""
    archive = os.fspath(archive)
    version = _version(archive)
    index = None if archive.endswith(".zip") else _tar_index(archive, version=version)  # outside the lock
    with _LOCK:  # a handle is never closed (evicted) while another thread reads through it
        if index is None:
            zf = _handle(archive, version)
            try:
                return zf.read(member)
            except KeyError:
                raise ArchiveError(f"no member {member!r} in {archive}") from None
            except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
                raise ArchiveError(f"damaged archive member ({e})") from None
        at = index.find(member)
        if at < 0:
            raise ArchiveError(f"no member {member!r} in {archive}")
        offset, size = int(index.offsets[at]), int(index.sizes[at])
        try:
            data = os.pread(_handle(archive, version), size, offset)
        except OSError as e:
            raise ArchiveError(f"damaged archive member ({e.strerror or e})") from None
    if len(data) != size:
        raise ArchiveError(f"damaged archive member (truncated: {len(data):,} of {size:,} bytes)")
    return data


class Member(NamedTuple):
    """A member of an archive, where a file's Path would be (the gallery's evidence); printed as
    `<archive>::<member>`."""

    archive: str
    name: str

    def __str__(self) -> str:
        return f"{self.archive}{ARCHIVE_SEP}{self.name}"


def split_path(path) -> tuple[str, str] | None:
    """(archive, member) when `path` names a member of an archive (`<a .zip or .tar>::<member>`), else
    None: a file whose own path holds "::" is a file."""
    text = os.fspath(path) if isinstance(path, (str, os.PathLike)) else ""
    archive, sep, member = text.partition(ARCHIVE_SEP)
    while sep and not is_archive(archive):  # "::" in a folder name before the archive's
        before, sep, member = member.partition(ARCHIVE_SEP)
        archive = f"{archive}{ARCHIVE_SEP}{before}"
    return (archive, member) if sep and member else None
