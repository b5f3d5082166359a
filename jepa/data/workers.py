"""Worker processes that end with the process that spawned them, however it ends."""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import threading


def exit_with_parent(worker_index: int = 0, worker_count: int = 1) -> None:
    """Worker init (Grain's prefetch workers, world generation): ends this worker process as soon as the process that
    spawned it is gone.

    Why: a trainer killed by a signal (SIGKILL, or SIGTERM before its handler) runs no cleanup, and its workers,
    blocked on a full queue, would run on orphaned, holding its stdout and their shared-memory batches. Once all
    workers are gone, multiprocessing's resource tracker (started by the trainer, it outlives it; the workers
    register every segment with it) unlinks the segments and semaphores still registered.
    Not prctl(PR_SET_PDEATHSIG): the kernel sends it when the spawning *thread* exits, and Grain spawns workers
    from its prefetch threads, which set_state (a resume) stops and replaces while the workers run on.
    """
    del worker_index, worker_count
    parent = multiprocessing.parent_process()
    if parent is None:  # not a multiprocessing child: nothing to watch
        return
    threading.Thread(target=_exit_when_gone, args=(parent.sentinel, parent.pid), daemon=True,
                     name="jepa-exit-with-parent").start()


def _exit_when_gone(sentinel: int, parent_pid: int) -> None:
    # The sentinel is a pipe whose write end only the parent holds: the kernel makes it readable (EOF) the moment
    # the parent dies, however it dies. The ppid check also covers a parent whose pipe end leaked into a fork.
    while not multiprocessing.connection.wait([sentinel], timeout=1.0) and os.getppid() == parent_pid:
        pass
    os._exit(1)  # no Python cleanup: the parent (and whoever would read what we flush) is gone
