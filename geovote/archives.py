"""Images read in place from the archives datasets ship in: zip (OSV-5M's `images/<split>/NN.zip`) and
uncompressed tar (webdataset shards, as img2dataset writes them). Nothing is ever extracted.

An image inside an archive is named `<the archive's path>::<its member's name>` (`ARCHIVE_SEP`). Each
process opens each archive once and keeps it (`read_member`): DataLoader workers are processes, so every
worker has its own handles, and no handle is shared across a fork.

Tar is read with the standard library's `tarfile` rather than the `webdataset` library: the embedding
stage needs random access by id (resume, failure lists, a rank's share of the rows, updates), while
webdataset streams a shard from start to end. One pass over a tar's headers gives every member's offset
and size; a member is then one `os.pread`.
"""
from __future__ import annotations

import os
import tarfile
import zipfile
import zlib

ARCHIVE_SEP = "::"
ARCHIVE_SUFFIXES = (".zip", ".tar")
_MAX_OPEN = 256  # archives a process keeps open: OSV-5M has ~100 a split, a bound rather than a limit


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
    return [(name, size) for name, (_, size) in _tar_index(archive, log).items()]


def _tar_index(archive: str, log=None) -> dict[str, tuple[int, int]]:
    """member name -> (offset of its data, bytes), from one pass over the headers."""
    out: dict[str, tuple[int, int]] = {}
    damage = ""
    try:
        with tarfile.open(archive, "r:") as tf:  # "r:": uncompressed only, so that members can be seeked
            end = 0
            try:
                for m in tf:
                    if m.isfile():
                        out[m.name] = (m.offset_data, m.size)
                    end = m.offset_data + -(-m.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
            except (tarfile.TarError, EOFError, OSError) as e:
                if not out:
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
    if damage and log:
        log(f"{archive}: damaged after {len(out):,} members ({damage}): the rest are missing")
    return out


_OPEN: dict = {}  # (process id, archive path) -> ZipFile, or (file descriptor, member index) for a tar


def _opened(archive: str):
    key = (os.getpid(), archive)
    if key not in _OPEN:
        if len(_OPEN) >= _MAX_OPEN:
            _close(_OPEN.pop(next(iter(_OPEN))))
        if archive.endswith(".zip"):
            try:
                _OPEN[key] = zipfile.ZipFile(archive)
            except FileNotFoundError:
                raise ArchiveError(f"archive {archive} not found") from None
            except (zipfile.BadZipFile, OSError, EOFError) as e:
                raise ArchiveError(f"damaged archive ({e})") from None
        else:
            index = _tar_index(archive)
            try:
                fd = os.open(archive, os.O_RDONLY)
            except OSError as e:
                raise ArchiveError(f"archive {archive}: {e.strerror or e}") from None
            _OPEN[key] = (fd, index)
    return _OPEN[key]


def _close(handle) -> None:
    if isinstance(handle, tuple):
        os.close(handle[0])
    else:
        handle.close()


def read_member(archive: str | os.PathLike, member: str) -> bytes:
    """The bytes of `member` of `archive`, read in place. ArchiveError with the reason when they cannot
    be read: no such member, a bad CRC (zip), data cut off by a truncated archive."""
    archive = os.fspath(archive)
    handle = _opened(archive)
    if isinstance(handle, tuple):
        fd, index = handle
        if member not in index:
            raise ArchiveError(f"no member {member!r} in {archive}")
        offset, size = index[member]
        try:
            data = os.pread(fd, size, offset)
        except OSError as e:
            raise ArchiveError(f"damaged archive member ({e.strerror or e})") from None
        if len(data) != size:
            raise ArchiveError(f"damaged archive member (truncated: {len(data):,} of {size:,} bytes)")
        return data
    try:
        return handle.read(member)
    except KeyError:
        raise ArchiveError(f"no member {member!r} in {archive}") from None
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
        raise ArchiveError(f"damaged archive member ({e})") from None


def split_path(path) -> tuple[str, str] | None:
    """(archive, member) when `path` names a member of an archive, else None."""
    text = os.fspath(path) if isinstance(path, (str, os.PathLike)) else ""
    if ARCHIVE_SEP not in text:
        return None
    archive, member = text.split(ARCHIVE_SEP, 1)
    return archive, member
