"""A run's directory: paths that may live on an object store, and the lock that gives one run a workdir.

Every workdir and data path goes through `etils.epath` (what Orbax uses), so `--workdir=gs://bucket/run` reaches
the bucket from every host of a pod instead of creating a local `./gs:` folder on each of them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time

from etils import epath

LOCK_NAME = "RUNNING.lock"


class WorkdirLockedError(RuntimeError):
    """Another live run holds the workdir."""


def path(p: str | os.PathLike) -> epath.Path:
    """An epath for a local or object-store location; a scheme whose filesystem package is missing fails here,
    naming the path and the package, instead of deep inside the first write."""
    text = os.fspath(p)
    if "://" in text and not text.startswith(("gs://", "s3://", "az://", "hf://")):
        raise ValueError(f"{text}: unsupported scheme (local paths, gs://, s3://, az:// are supported)")
    result = epath.Path(text) if "://" in text else epath.Path(os.path.abspath(text))
    if "://" in text:
        try:
            result.exists()
        except ImportError as e:
            raise ImportError(f"{text}: reading this location needs a filesystem package that is not installed "
                              f"({e}); for gs:// install gcsfs (pip install gcsfs)") from e
    return result


def is_local(p: epath.Path) -> bool:
    return "://" not in os.fspath(p)


def file_size(p: epath.Path) -> int:
    info = p.stat()  # os.stat_result locally, epath's StatResult on object stores
    return info.st_size if hasattr(info, "st_size") else info.length


def file_sha256(p: epath.Path) -> str:
    digest = hashlib.sha256()
    with p.open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def write_json(p: str | os.PathLike, obj, indent: int = 1) -> epath.Path:
    """A result file (benchmarks, probes, plans), its folder created first; local or on an object store."""
    target = path(p)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(obj, indent=indent))
    return target


def write_jsonl(p: str | os.PathLike, records) -> epath.Path:
    """Records as one JSON object per line (decision logs), the folder created first; local or object store."""
    target = path(p)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("".join(json.dumps(r) + "\n" for r in records))
    return target


def write_png(p: str | os.PathLike, fig) -> epath.Path:
    """A matplotlib figure as a PNG result file (closed afterwards), its folder created first; local or on an
    object store."""
    import matplotlib.pyplot as plt
    target = path(p)
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    with target.open("wb") as f:
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)
    return target


def _process_start_time(pid: int) -> str | None:
    """The kernel's start time of a process (jiffies since boot), to tell a live pid from a reused one."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(holder: dict) -> bool | None:
    """True / False for a holder on this host; None when it runs on another host (cannot be checked from here)."""
    if holder.get("host") != socket.gethostname():
        return None
    pid = int(holder.get("pid", -1))
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    started = _process_start_time(pid)
    return started is None or holder.get("start") in (None, started)


class WorkdirLock:
    """An exclusive claim on a workdir for one run, taken by process 0 (on shared filesystems the other processes
    rely on it). The lock file names its holder (host, pid, start time); a lock left by a process that died (kill -9,
    node crash on this host) is reported and taken over; a lock held by a live run, or by a process on another host,
    fails the new run with a message saying how to proceed."""

    def __init__(self, workdir: str | os.PathLike):
        self.file = path(workdir) / LOCK_NAME
        self.held = False

    def acquire(self) -> None:
        self.file.parent.mkdir(parents=True, exist_ok=True)
        me = {"host": socket.gethostname(), "pid": os.getpid(), "start": _process_start_time(os.getpid()),
              "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(2):
            if self._create(me):
                self.held = True
                return
            holder = self._read()
            alive = _alive(holder) if holder else False  # vanished or unreadable: stale
            if alive:
                raise WorkdirLockedError(
                    f"workdir {self.file.parent} is in use by another run (pid {holder.get('pid')} on "
                    f"{holder.get('host')}, since {holder.get('since')}); two runs on one workdir would interleave "
                    "their checkpoints and metrics. Wait for it to finish or use another --workdir.")
            if alive is None:
                raise WorkdirLockedError(
                    f"workdir {self.file.parent} is locked by pid {holder.get('pid')} on host {holder.get('host')} "
                    f"(since {holder.get('since')}), which cannot be checked from {socket.gethostname()}. If that "
                    f"run is no longer running, delete {self.file} and start again.")
            logging.warning("workdir %s: taking over a stale lock of a process that is no longer running (%s)",
                            self.file.parent, holder)
            self.file.unlink(missing_ok=True)
        raise WorkdirLockedError(f"workdir {self.file.parent}: could not take the lock {self.file}")

    def _create(self, me: dict) -> bool:
        text = json.dumps(me)
        if is_local(self.file):
            try:  # O_EXCL: of two runs starting together exactly one creates the file
                fd = os.open(os.fspath(self.file), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as f:
                f.write(text)
            return True
        if self.file.exists():  # object stores have no exclusive create through epath: best effort
            return False
        self.file.write_text(text)
        return True

    def _read(self) -> dict | None:
        try:
            return json.loads(self.file.read_text())
        except FileNotFoundError:
            return None
        except (ValueError, OSError):
            return {}  # unreadable (a crash while writing it): treated as stale

    def release(self) -> None:
        if self.held:
            holder = self._read()
            if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
                self.file.unlink(missing_ok=True)
            self.held = False

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()
