"""One writer per engine folder: `embed.build`, `retrieve.tune` and split predictions take its lock.

    with engine_lock(layout.root, "embed.build"):
        ...  # embed, update, index, tune: no other process writes this engine meanwhile

The lock is an advisory `flock` on `<engine>/.geovote.lock`, so the kernel drops it when its holder
exits, however it ends (a killed run leaves no lock that blocks the next one). A folder the lock made
is removed again when the run wrote nothing else into it (a refused input leaves no trace). The file
names its holder (pid, host, command, start time) for the message a second run gets; a holder that died
leaves its line behind, which the next run reports as stale before taking over. Re-entrant within a
process (the main job holds it while tuning, which embeds val, which asks for it again). Where `fcntl`
does not exist (Windows) nothing is locked.
"""
from __future__ import annotations

import os
import socket
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from geovote.data import DataError

LOCK_FILE = ".geovote.lock"
_held: dict[str, int] = {}  # resolved folder -> depth of re-entry in this process
_guard = threading.Lock()


class EngineBusy(DataError):
    """Another process is writing the engine folder; the message names it."""


def _holder_line(what: str) -> str:
    command = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:300] if sys.argv else what
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
    return f"pid {os.getpid()} on {socket.gethostname()} ({what}: {command}), since {started}"


def _holder(fd: int, wait_s: float = 1.0) -> str:
    """The line of the process holding the lock. It writes it just after taking the lock, so a reader
    that finds no line, or the line of a process no longer alive (the holder before it), reads again for
    up to `wait_s`."""
    import re

    text = ""
    deadline = time.monotonic() + wait_s
    while True:
        text = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
        pid = re.match(r"pid (\d+) on (\S+) ", text)
        if pid and (pid.group(2) != socket.gethostname() or _alive(int(pid.group(1)))):
            return text
        if time.monotonic() > deadline:
            return text or "a process that has not said which yet"
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


@contextmanager
def engine_lock(folder: str | Path, what: str, log=print):
    """Hold the write lock of the engine `folder` (made if missing) for the block, or EngineBusy."""
    folder = Path(folder)
    made = not folder.exists()  # a run that writes nothing else leaves no folder behind
    folder.mkdir(parents=True, exist_ok=True)
    key = str(folder.resolve())
    with _guard:
        if key in _held:
            _held[key] += 1
            reentered = True
        else:
            reentered = False
    if reentered:
        try:
            yield
        finally:
            with _guard:
                _held[key] -= 1
        return
    try:
        import fcntl
    except ImportError:  # no flock: nothing to hold
        yield
        return
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            raise EngineBusy(f"{folder} is being written by another run: {holder}. Wait for it to finish "
                             "(or stop it), then run again; or give another --out") from None
        stale = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
        if stale:
            log(f"note: an earlier run on {folder} stopped without finishing ({stale}); its lock was stale "
                "and is taken over")
        line = (_holder_line(what) + "\n").encode("utf-8", "replace")
        os.pwrite(fd, line, 0)  # over the stale line, then cut to length: never an empty file meanwhile
        os.ftruncate(fd, len(line))
        with _guard:
            _held[key] = 0
        try:
            yield
        finally:
            with _guard:
                _held.pop(key, None)
            os.ftruncate(fd, 0)  # a clean exit leaves an empty file: nothing stale to report
            if made and [p.name for p in folder.iterdir()] == [LOCK_FILE]:
                (folder / LOCK_FILE).unlink()
                folder.rmdir()
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
