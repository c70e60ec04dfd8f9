"""The run-folder lock: a live holder is named in the error, a dead one's lock is taken over."""

import errno
import json
import logging
import os
import signal
import socket
import subprocess
import sys

import pytest

from rankscope.train.lock import LOCK_FILE, RunLock, RunLockedError


def test_a_second_holder_is_refused_with_the_first_ones_pid(tmp_path):
    with RunLock(tmp_path):
        record = json.loads((tmp_path / LOCK_FILE).read_text())
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
        with pytest.raises(RunLockedError, match=rf"in use by process {os.getpid()} on {socket.gethostname()}"):
            RunLock(tmp_path).acquire()
    assert not (tmp_path / LOCK_FILE).exists()  # released and removed
    with RunLock(tmp_path):  # free again
        pass


def test_a_lock_held_by_another_live_process_is_refused(tmp_path, lock_holder):
    holder = lock_holder(tmp_path)
    with pytest.raises(RunLockedError, match=rf"in use by process {holder.pid} on"):
        RunLock(tmp_path).acquire()


def test_the_lock_of_a_killed_process_is_taken_over(tmp_path, caplog, lock_holder):
    holder = lock_holder(tmp_path)
    os.kill(holder.pid, signal.SIGKILL)  # no chance to release: the lock file stays
    holder.wait()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == holder.pid
    with caplog.at_level(logging.WARNING, logger="rankscope.train"):
        with RunLock(tmp_path):
            assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert f"took over the lock left by process {holder.pid}" in caplog.text


def _no_flock(*args):
    raise OSError(errno.ENOLCK, "No locks available")


def test_without_flock_the_record_decides(tmp_path, monkeypatch):
    import fcntl

    monkeypatch.setattr(fcntl, "flock", _no_flock)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        lock_path = tmp_path / LOCK_FILE
        host = socket.gethostname()
        lock_path.write_text(json.dumps({"pid": sleeper.pid, "host": host, "started": 0}))
        with pytest.raises(RunLockedError, match=rf"process {sleeper.pid} on {host}"):
            RunLock(tmp_path).acquire()
        lock_path.write_text(json.dumps({"pid": dead.pid, "host": "another-node", "started": 0}))
        with pytest.raises(RunLockedError, match=rf"process {dead.pid} on another-node"):
            RunLock(tmp_path).acquire()  # another host's pid cannot be checked: respected
        lock_path.write_text(json.dumps({"pid": dead.pid, "host": host, "started": 0}))
        with RunLock(tmp_path):  # dead on this host: stale, taken over
            assert json.loads(lock_path.read_text())["pid"] == os.getpid()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_an_unexpected_flock_error_is_not_swallowed(tmp_path, monkeypatch):
    import fcntl

    def broken(*args):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(fcntl, "flock", broken)
    with pytest.raises(OSError, match="I/O error"):
        RunLock(tmp_path).acquire()
