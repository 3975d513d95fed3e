"""One run per run directory: an advisory lock file `{run_dir}/run.lock` that names its holder.

Two runs on one train.run_dir would both write checkpoints, move `latest` and prune each other's
directories. The first takes an exclusive `fcntl.flock` on the lock file and writes
`{"host", "pid", "since"}` into it; a second gets `RunDirLocked`, whose message names the holder.

Stale locks. The kernel drops a flock when its process dies (crash, SIGKILL, node reboot), so an
unlocked file is stale whatever it says and is simply taken over. Where the filesystem has no
locks at all (ENOLCK / EOPNOTSUPP: some NFS mounts), the file's content decides instead: a holder
on this host whose pid is dead is stale; a holder on another host cannot be checked from here,
and the message says to delete the file once that run is gone.

Who holds it: the local launcher (`echocare pretrain --nproc N`) for its whole life, else rank 0
of the trainer. A rank whose parent process holds the lock (the launcher) is "covered" by it.
This module imports nothing heavy: the pre-flight checks it before torch is loaded.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from .config_sections import ConfigError

LOCK_NAME = "run.lock"
# Filesystems without working locks; the pid/host content decides there.
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)


class RunDirLocked(ConfigError):
    """Another live run holds the run directory (a ConfigError: the CLIs turn it into exit code 2)."""


def lock_path(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / LOCK_NAME


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def read_holder(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def describe(holder: dict, path: Path) -> str:
    since = holder.get("since")
    when = time.strftime(" since %Y-%m-%d %H:%M:%S", time.localtime(since)) if isinstance(since, (int, float)) else ""
    who = f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}"
    return f"in use by another run ({who}{when}; lock file {path})"


def covers_this_process(holder: dict) -> bool:
    """True when the holder is this process or its parent on this host (a rank under our launcher)."""
    return holder.get("host") == socket.gethostname() and holder.get("pid") in (os.getpid(), os.getppid())


class RunDirLock:
    """`acquire()` takes the lock or raises RunDirLocked; `release()` (or process death) drops it."""

    def __init__(self, run_dir: str | os.PathLike):
        self.path = lock_path(run_dir)
        self._fd: int | None = None
        self.took_over: dict | None = None   # the stale holder replaced, for the log
        self.covered = False                 # held by our parent (the local launcher) for us

    def acquire(self) -> "RunDirLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            previous = read_holder(self.path)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if covers_this_process(previous):
                    os.close(fd)
                    self.covered = True
                    return self
                raise RunDirLocked(f"train.run_dir={self.path.parent}: {describe(previous, self.path)}") from None
            except OSError as exc:
                if exc.errno not in _NO_LOCKS:
                    raise
                if covers_this_process(previous) and previous.get("pid") != os.getpid():
                    os.close(fd)
                    self.covered = True
                    return self
                self._check_content(previous)
            if previous.get("pid") is not None:
                self.took_over = previous
            holder = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def _check_content(self, holder: dict) -> None:
        """No flock on this filesystem: judge the recorded holder by its pid."""
        pid, host = holder.get("pid"), holder.get("host")
        if pid is None or pid == os.getpid():
            return
        if host == socket.gethostname():
            if _pid_alive(int(pid)):
                raise RunDirLocked(f"train.run_dir={self.path.parent}: {describe(holder, self.path)}")
            return  # a dead pid on this host: stale
        raise RunDirLocked(f"train.run_dir={self.path.parent}: {describe(holder, self.path)}; this filesystem "
                           f"has no file locks, so a holder on another host cannot be checked: delete the "
                           f"lock file once that run has ended")

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)  # an empty file is plainly free, even to a reader without flock
        except OSError:
            pass
        os.close(fd)             # closing drops the flock

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> "RunDirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def probe(run_dir: str | os.PathLike) -> str | None:
    """Why a run could not take the lock now, or None (free, stale, or held for this process).
    Only reads, plus a lock taken and dropped at once."""
    path = lock_path(run_dir)
    if not path.is_file():
        return None
    holder = read_holder(path)
    if covers_this_process(holder):
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        return f"cannot open the lock file {path} ({exc.strerror or exc})"
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    except BlockingIOError:
        return describe(holder, path)
    except OSError as exc:
        if exc.errno not in _NO_LOCKS:
            return f"cannot lock {path} ({exc.strerror or exc})"
        pid = holder.get("pid")
        if pid is None or (holder.get("host") == socket.gethostname() and not _pid_alive(int(pid))):
            return None
        return describe(holder, path)
    finally:
        os.close(fd)
