"""rankscope.locking.FileLock: exclusion between processes, with flock and with its fallback."""

import errno
import json
import logging
import multiprocessing
import os
import socket
import subprocess
import sys
import time

import pytest

from rankscope import locking
from rankscope.errors import LockedError
from rankscope.locking import FileLock, FlockUnavailable, file_lock


def _no_flock(*args):
    raise OSError(errno.ENOLCK, "No locks available")


@pytest.fixture(params=["flock", "fallback"])
def mode(request, monkeypatch):
    """Every test runs with flock and with the O_EXCL fallback (flock failing as unsupported)."""
    if request.param == "fallback":
        import fcntl

        monkeypatch.setattr(fcntl, "flock", _no_flock)
    return request.param


def _count_in_lock(path, counter, rounds, no_flock):
    """In a child process: `rounds` times, read the counter, sleep, write it back +1, under the lock."""
    if no_flock:
        import fcntl

        fcntl.flock = _no_flock
    for _ in range(rounds):
        with file_lock(path):
            value = int(counter.read_text())
            time.sleep(0.002)
            counter.write_text(str(value + 1))


def test_two_processes_contending_for_the_lock_never_overlap(tmp_path, mode):
    counter = tmp_path / "counter"
    counter.write_text("0")
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_count_in_lock, args=(tmp_path / "c.lock", counter, 25, mode == "fallback"))
             for _ in range(2)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(120)
        assert proc.exitcode == 0
    assert counter.read_text() == "50"  # no lost update: the read-modify-write never interleaved
    assert not (tmp_path / "c.lock").exists()


def test_a_held_lock_refuses_a_non_blocking_caller_naming_the_holder(tmp_path, mode):
    with FileLock(tmp_path / "x.lock") as held:
        assert held.mode == ("flock" if mode == "flock" else "exclusive-file")
        record = json.loads((tmp_path / "x.lock").read_text())
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
        with pytest.raises(LockedError, match=rf"x.lock is locked by process {os.getpid()} on "):
            FileLock(tmp_path / "x.lock").acquire(blocking=False)
        with pytest.raises(LockedError):
            FileLock(tmp_path / "x.lock", timeout=0.3).acquire()  # waits, then gives up
    with FileLock(tmp_path / "x.lock", blocking=False):  # released: free again
        pass


def test_a_blocking_caller_gets_the_lock_when_the_holder_lets_go(tmp_path, mode):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from rankscope.locking import FileLock; "
         + ("import fcntl, errno\ndef f(*a): raise OSError(errno.ENOLCK, 'no')\nfcntl.flock = f\n"
            if mode == "fallback" else "")
         + "l = FileLock(sys.argv[1]); l.acquire(); print('held', flush=True); time.sleep(1.0); l.release()",
         str(tmp_path / "x.lock")],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        start = time.monotonic()
        with FileLock(tmp_path / "x.lock"):
            assert time.monotonic() - start > 0.3  # it waited for the holder
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()


def test_the_lock_of_a_dead_process_is_taken_over(tmp_path, mode, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    path = tmp_path / "x.lock"
    path.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": 0}))
    with caplog.at_level(logging.WARNING, logger="rankscope.locking"):
        with FileLock(path, blocking=False):
            assert json.loads(path.read_text())["pid"] == os.getpid()
    assert f"took over the lock left by process {dead.pid}" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # the stale file was not kept aside


def test_fallback_respects_a_live_holder_and_another_hosts_holder(tmp_path, monkeypatch):
    import fcntl

    monkeypatch.setattr(fcntl, "flock", _no_flock)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    try:
        path = tmp_path / "x.lock"
        path.write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname(), "started": 0}))
        with pytest.raises(LockedError, match=rf"process {sleeper.pid}"):
            FileLock(path).acquire(blocking=False)
        path.write_text(json.dumps({"pid": 999999, "host": "another-node", "started": 0}))
        with pytest.raises(LockedError, match="process 999999 on another-node"):
            FileLock(path).acquire(blocking=False)
    finally:
        sleeper.kill()
        sleeper.wait()


def test_fallback_treats_an_old_lock_file_without_a_record_as_stale(tmp_path, monkeypatch):
    import fcntl

    monkeypatch.setattr(fcntl, "flock", _no_flock)
    path = tmp_path / "x.lock"
    path.write_text("")
    with pytest.raises(LockedError, match="another process"):  # fresh: a holder still writing its record
        FileLock(path).acquire(blocking=False)
    old = time.time() - locking.STALE_EMPTY_SECONDS - 5
    os.utime(path, (old, old))
    with FileLock(path, blocking=False):
        pass


def test_the_fallback_is_used_where_fcntl_does_not_exist(tmp_path, monkeypatch):
    monkeypatch.setattr(locking, "fcntl", None)
    with FileLock(tmp_path / "x.lock") as held:
        assert held.mode == "exclusive-file"
        with pytest.raises(LockedError):
            FileLock(tmp_path / "x.lock").acquire(blocking=False)


def test_without_a_fallback_an_unsupported_flock_is_the_callers_to_handle(tmp_path, monkeypatch):
    import fcntl

    monkeypatch.setattr(fcntl, "flock", _no_flock)
    with pytest.raises(FlockUnavailable):
        FileLock(tmp_path / "x.lock", fallback=False).acquire()


def test_an_unexpected_flock_error_is_not_swallowed(tmp_path, monkeypatch):
    import fcntl

    def broken(*args):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(fcntl, "flock", broken)
    with pytest.raises(OSError, match="I/O error"):
        FileLock(tmp_path / "x.lock").acquire()


def test_a_lock_file_holding_just_a_pid_names_it(tmp_path):
    """Older study drivers wrote the bare pid into their lock file."""
    import fcntl

    path = tmp_path / ".driver.lock"
    with open(path, "w") as other:
        fcntl.flock(other, fcntl.LOCK_EX)
        other.write("4242")
        other.flush()
        with pytest.raises(LockedError, match=r"pid 4242"):
            FileLock(path, message="held by pid {pid}").acquire(blocking=False)
