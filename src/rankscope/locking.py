"""One inter-process file lock for the whole package (run folders, study drivers, study jobs,
token and tokenizer caches).

:class:`FileLock` holds `path` exclusively. The lock file records its holder (pid, host, start
time), so a refused caller can name the holder, and it is removed on release.

- **flock** where the file system has it: the kernel drops the lock when the holder dies, even by
  kill -9, so a lock file left by a crashed process is simply taken over (with a warning naming
  the dead holder).
- **Fallback** where `fcntl` does not exist (Windows) or `flock` fails as unsupported (Lustre
  mounted without `-o flock`, some FUSE/NFS mounts): the lock file is created with `O_EXCL`, and
  an existing one is stale when its holder is gone: a pid on this host that no longer runs, or a
  file with no readable record that has not changed for `STALE_EMPTY_SECONDS`. A holder on
  another host cannot be checked and is respected (delete the file by hand if it is gone). A
  stale file is renamed aside before the new one is created, so two processes that both see it
  stale cannot both take it.

Any other error from `flock` (EIO, ...) is raised, not swallowed. Blocking acquisition waits
(polling in the fallback) up to `timeout` seconds; non-blocking raises :class:`LockedError`.
This is the only module that imports `fcntl`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from rankscope.errors import LockedError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: the O_EXCL fallback decides
    fcntl = None

log = logging.getLogger("rankscope.locking")

# flock exists but this file system does not support it: use the O_EXCL fallback.
NO_FLOCK_ERRNOS = frozenset({errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL})
# In the fallback, a lock file without a readable record this old is left by a crash between
# creating it and writing the record.
STALE_EMPTY_SECONDS = 30.0
POLL_SECONDS = 0.1


def _parse_record(raw: bytes) -> dict | None:
    try:
        record = json.loads(raw) if raw.strip() else None
    except ValueError:
        return None
    if isinstance(record, int) and not isinstance(record, bool):
        record = {"pid": record}
    return record if isinstance(record, dict) and isinstance(record.get("pid"), int) else None


def read_record(path: Path) -> dict | None:
    """The holder record of a lock file ({"pid", "host", "started"}), or None when it has none.
    A file holding just a pid (as older study drivers wrote) gives {"pid": pid}."""
    try:
        with open(path, "rb") as handle:
            return _parse_record(handle.read(4096))
    except OSError:
        return None


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid runs on this host."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    except OSError:  # Windows: os.kill(pid, 0) is not a probe
        return True
    return True


def holder_text(record: dict | None) -> str:
    """'process 123 on node7 (since 2026-01-01 10:00:00)', or 'another process'."""
    if record is None:
        return "another process"
    text = f"process {record['pid']}"
    if record.get("host"):
        text += f" on {record['host']}"
    if record.get("started"):
        text += f" (since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(record['started']))})"
    return text


def _own_record() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}


def _stale(record: dict | None, mtime: float) -> bool:
    """Whether a fallback lock file (last changed at `mtime`) is left by a holder that is gone."""
    if record is None:
        return time.time() - mtime > STALE_EMPTY_SECONDS
    if record.get("host", socket.gethostname()) != socket.gethostname():
        return False  # another host's pid cannot be checked: respected
    return not pid_alive(record["pid"])


class FlockUnavailable(OSError):
    """flock is not supported here and the caller asked for no fallback (`fallback=False`)."""


class FileLock:
    """An exclusive lock on `path` (created, with its folder, if missing), held by this object.

    `acquire(blocking=False)` raises `error` (a LockedError; its text is `message` formatted with
    `path`, `holder` (the holder's description) and `pid`) when another live process holds it;
    `acquire()` waits for it, up to `timeout` seconds when given (then raises the same error).
    `fallback=False` raises FlockUnavailable instead of using the O_EXCL lock file where flock
    is not supported, for callers with their own answer to that. A context manager too.
    """

    def __init__(self, path: str | Path, *, blocking: bool = True, timeout: float | None = None,
                 fallback: bool = True, message: str = "{path} is locked by {holder}",
                 error: type[LockedError] = LockedError) -> None:
        self.path = Path(path)
        self.blocking = blocking
        self.timeout = timeout
        self.fallback = fallback
        self.message = message
        self.error = error
        self._fd: int | None = None
        self.mode: str | None = None  # "flock" or "exclusive-file" while held

    def __enter__(self) -> FileLock:  # noqa: PYI034
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    @property
    def held(self) -> bool:
        return self._fd is not None

    def refuse(self, record: dict | None) -> LockedError:
        pid = record["pid"] if record else "unknown"
        return self.error(self.message.format(path=self.path, holder=holder_text(record), pid=pid))

    def acquire(self, blocking: bool | None = None, timeout: float | None = None) -> None:
        if self._fd is not None:
            raise RuntimeError(f"{self.path} is already held by this FileLock")
        blocking = self.blocking if blocking is None else blocking
        timeout = self.timeout if timeout is None else timeout
        started = time.monotonic()
        said = False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        attempt = self._try_flock
        while True:
            try:
                attempt()
                return
            except _NoFlock:
                if not self.fallback:
                    raise FlockUnavailable(errno.ENOLCK, f"flock is not supported for {self.path}") from None
                attempt = self._try_exclusive
                continue
            except _Retry:
                continue
            except _Held as held:
                waited = time.monotonic() - started
                if not blocking or (timeout is not None and waited >= timeout):
                    raise self.refuse(held.record) from None
                if waited > STALE_EMPTY_SECONDS and not said:
                    log.warning("still waiting for %s, held by %s (delete it if that process is gone)",
                                self.path, holder_text(held.record))
                    said = True
                if attempt == self._try_flock and timeout is None:
                    if self._wait_flock():
                        return
                else:
                    time.sleep(POLL_SECONDS)

    # --- flock ------------------------------------------------------------------------------

    def _try_flock(self) -> None:
        if fcntl is None:
            raise _NoFlock
        while True:
            fd, created = _open_or_create(self.path)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                record = _record_of_fd(fd)
                os.close(fd)
                raise _Held(record) from None
            except OSError as exc:
                if created:  # leave no empty file behind: the fallback creates its own
                    _unlink_if_same(self.path, fd)
                os.close(fd)
                if exc.errno in NO_FLOCK_ERRNOS:
                    log.debug("flock is not supported for %s (%s); using an exclusive lock file", self.path, exc)
                    raise _NoFlock from None
                raise
            if self._took_flock(fd):
                return

    def _wait_flock(self) -> bool:
        """Block in flock until the holder lets go; True when held, False to try again (the
        file was replaced meanwhile)."""
        fd, _ = _open_or_create(self.path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(fd)
            raise
        return self._took_flock(fd)

    def _took_flock(self, fd: int) -> bool:
        """Finish taking the flock on `fd`; False (fd closed) when the file is no longer the
        one at `path`: the previous holder removes it on release, possibly between our open and
        our flock, and a lock on a deleted file excludes nobody."""
        try:
            same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            return False
        previous = _record_of_fd(fd)
        if previous is not None and not _is_own(previous):
            log.warning("%s: took over the lock left by %s, which no longer runs", self.path, holder_text(previous))
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_own_record()).encode(), 0)
        os.fsync(fd)
        self._fd, self.mode = fd, "flock"
        return True

    # --- fallback: an O_EXCL lock file -----------------------------------------------------

    def _try_exclusive(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            try:
                seen = os.stat(self.path)
            except FileNotFoundError:
                raise _Retry from None  # released meanwhile
            record = read_record(self.path)
            if (record is not None and _is_own(record)) or not _stale(record, seen.st_mtime):
                raise _Held(record) from None  # a live holder (this very process included)
            self._remove_stale(seen.st_ino, record)
            raise _Retry from None
        os.write(fd, json.dumps(_own_record()).encode())
        os.fsync(fd)
        self._fd, self.mode = fd, "exclusive-file"

    def _remove_stale(self, inode: int, record: dict | None) -> None:
        """Move the stale lock file (`inode`) aside (one rename: of two processes that saw it
        stale, one wins) and put it back if what was moved is a newer holder's file."""
        aside = self.path.with_name(f"{self.path.name}.stale-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return  # another process removed it first
        if os.stat(aside).st_ino != inode:
            try:
                os.link(aside, self.path)  # fails if yet another holder created one meanwhile
            except OSError:
                log.warning("%s: a lock file was replaced while being checked; kept it as %s", self.path, aside)
                return
            os.unlink(aside)
            return
        log.warning("%s: took over the lock left by %s, which no longer runs", self.path, holder_text(record))
        os.unlink(aside)

    # --- release ------------------------------------------------------------------------------

    def release(self) -> None:
        if self._fd is None:
            return
        # Unlink while still holding it: a waiter that opened the old file sees the inode change
        # and tries again on a fresh one; closing the descriptor releases the flock.
        _unlink_if_same(self.path, self._fd)
        os.close(self._fd)
        self._fd, self.mode = None, None


class _NoFlock(Exception):
    pass


class _Retry(Exception):
    pass


class _Held(Exception):
    def __init__(self, record: dict | None):
        super().__init__(record)
        self.record = record


def _open_or_create(path: Path) -> tuple[int, bool]:
    """A read-write descriptor of `path`, and whether this call created the file."""
    while True:
        try:
            return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), True
        except FileExistsError:
            pass
        try:
            return os.open(path, os.O_RDWR), False
        except FileNotFoundError:
            continue  # removed in between: create it


def _unlink_if_same(path: Path, fd: int) -> None:
    """Remove `path` when it still is the file open as `fd` (never another holder's file)."""
    try:
        if os.stat(path).st_ino == os.fstat(fd).st_ino:
            os.unlink(path)
    except FileNotFoundError:
        pass


def _is_own(record: dict) -> bool:
    return record.get("pid") == os.getpid() and record.get("host", socket.gethostname()) == socket.gethostname()


def _record_of_fd(fd: int) -> dict | None:
    try:
        raw = os.pread(fd, 4096, 0)
    except OSError:
        return None
    return _parse_record(raw)


@contextlib.contextmanager
def file_lock(path: str | Path, *, blocking: bool = True, timeout: float | None = None) -> Iterator[FileLock]:
    """`with file_lock(path):` holds `path` exclusively for the block (waits for it by default)."""
    lock = FileLock(path, blocking=blocking, timeout=timeout)
    lock.acquire()
    try:
        yield lock
    finally:
        lock.release()
