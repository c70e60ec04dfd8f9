"""The run-folder lock: one training process per run folder at a time.

The lock file `RUN_DIR/.rankscope-lock` records who holds it (pid, host, start time), so a second
process can name the holder in its error. Mutual exclusion itself comes from `flock` on that
file: the kernel drops it when the holder dies, even by kill -9, so a lock left by a crashed
process is simply taken over (with a warning naming the dead holder). On file systems without
`flock` (Lustre mounted without `-o flock`, some FUSE mounts) the record alone decides: a holder
on this host whose pid no longer runs is stale; a holder on another host cannot be checked and
is respected.

Under DDP only rank 0 takes the lock (the ranks of one job are one writer); the runs of a study
trained in parallel processes each lock their own folder.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import time
from pathlib import Path

from rankscope.errors import RankscopeError

try:
    import fcntl
except ImportError:  # pragma: no cover - no flock on Windows: the record alone decides
    fcntl = None

log = logging.getLogger("rankscope.train")

LOCK_FILE = ".rankscope-lock"
# flock is not available on this file system: fall back to the pid/host record.
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class RunLockedError(RankscopeError):
    """Another live process trains in this run folder."""


def _read_record(fd: int) -> dict | None:
    try:
        raw = os.pread(fd, 4096, 0)
        record = json.loads(raw) if raw.strip() else None
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("pid"), int) else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def _holder_text(record: dict | None) -> str:
    if record is None:
        return "another process"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.get("started", 0)))
    return f"process {record['pid']} on {record.get('host', '?')} (since {since})"


class RunLock:
    """Exclusive lock on a run folder for the lifetime of a training process (a context manager)."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _refuse(self, record: dict | None) -> RunLockedError:
        return RunLockedError(
            f"run folder {self.run_dir} is in use by {_holder_text(record)}; wait for it to finish or stop it "
            f"(if it is gone, delete {self.path})"
        )

    def acquire(self) -> None:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                if fcntl is None:
                    raise OSError(errno.ENOSYS, "flock is not available")
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                record = _read_record(fd)
                os.close(fd)
                raise self._refuse(record) from None
            except OSError as exc:
                if exc.errno not in _NO_FLOCK:
                    os.close(fd)
                    raise
                self._check_record_only(fd)
            # The previous holder may have removed the file between our open and our lock; then we
            # hold a lock on a deleted file and must start over on the new one.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        previous = _read_record(fd)
        if previous is not None and previous.get("pid") != os.getpid():
            log.warning("%s: took over the lock left by %s, which no longer runs", self.run_dir, _holder_text(previous))
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        os.fsync(fd)
        self._fd = fd

    def _check_record_only(self, fd: int) -> None:
        """Without flock: refuse a holder that is (or may be) alive, going by the record."""
        record = _read_record(fd)
        if record is None or record["pid"] == os.getpid():
            return
        if record.get("host") != socket.gethostname() or _pid_alive(record["pid"]):
            os.close(fd)
            raise self._refuse(record)

    def release(self) -> None:
        if self._fd is None:
            return
        # Unlink while still holding it (a waiter that opened the old file sees the inode change
        # and retries on a fresh one); closing the descriptor releases the flock.
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = None
