"""One run per output directory: ``peftune train`` and a search on a private study hold an
OS lock on ``OUTPUT_DIR/.peftune.lock`` while they run.

The lock is ``flock`` on an open file, so the kernel drops it when its holder exits, however
it exits (``kill -9`` included): a lock file left by a killed run is taken over by the next
one, never trusted. The holder's pid is written inside only to name it in the refusal.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from peftune.errors import ConfigError

LOCK_NAME = ".peftune.lock"


@contextlib.contextmanager
def hold(run_dir: Path, *, what: str) -> Iterator[None]:
    """Hold ``run_dir``'s lock for the block; another process holding it is a
    :class:`ConfigError` naming its pid. ``what`` names this run in that message."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise ConfigError(
                f"output_dir {run_dir} is in use by another peftune run (pid {holder}); wait "
                f"for it to finish or give this {what} another --output_dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
