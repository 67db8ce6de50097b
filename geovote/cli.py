"""How a command ends: its exit code, without the interpreter's teardown.

    if __name__ == "__main__":
        exit_now(main())

Seen on the project's machines: a process that used torch and pyarrow's CSV reader (and, under
torchrun, gloo) sometimes aborts after main() has returned, while native libraries' threads and static
objects are destroyed ("terminate called without an active exception", exit -6): the work is done and
written, but the exit code says it failed, and torchrun then fails the whole job. Ending with os._exit
once main() has returned, after flushing what was printed, skips that teardown. Every command writes
its files with context managers or atomic renames before main() returns, so nothing is lost.
"""
from __future__ import annotations

import os
import sys


def exit_now(code: int | None) -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(0 if code is None else int(code))
