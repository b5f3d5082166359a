"""Job functions for the world-generation pool tests (importable by spawned workers; not a test module)."""

import os


def crash_once(job):
    """Doubles `value`; the worker running job `crash_at` dies the first time (a marker file records it)."""
    value, crash_at, marker = job
    if value == crash_at and not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(3)  # what a segfault in a renderer looks like to the pool: the process is gone
    return 2 * value


def always_crash(job):
    os._exit(3)
