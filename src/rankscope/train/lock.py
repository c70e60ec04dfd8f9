"""The run-folder lock: one training process per run folder at a time.

The lock file `RUN_DIR/.rankscope-lock` is a :class:`rankscope.locking.FileLock`: it records who
holds it (pid, host, start time), so a second process can name the holder in its error. Mutual
exclusion comes from `flock` where the file system has it (a lock left by a crashed process is
taken over, with a warning naming the dead holder); elsewhere (Lustre mounted without
`-o flock`, some FUSE mounts) from an exclusive lock file whose holder, when it runs on this
host and its pid no longer does, is stale; a holder on another host cannot be checked and is
respected.

Under DDP only rank 0 takes the lock (the ranks of one job are one writer); the runs of a study
trained in parallel processes each lock their own folder.
"""

from __future__ import annotations

from pathlib import Path

from rankscope.errors import RunLockedError
from rankscope.locking import FileLock

__all__ = ["LOCK_FILE", "RunLock", "RunLockedError"]

LOCK_FILE = ".rankscope-lock"


class RunLock(FileLock):
    """Exclusive lock on a run folder for the lifetime of a training process (a context manager);
    `acquire()` never waits: a live holder is a RunLockedError."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        folder = str(self.run_dir).replace("{", "{{").replace("}", "}}")
        super().__init__(
            self.run_dir / LOCK_FILE, blocking=False, error=RunLockedError,
            message=f"run folder {folder} is in use by {{holder}}; wait for it to finish or stop it "
                    f"(if it is gone, delete {{path}})",
        )
