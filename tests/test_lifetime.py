"""Process lifetime: no data worker process and no shared-memory segment outlives the trainer, however it ends.

The processes under test run in a session of their own, so that everything they start stays findable after
being reparented. The slow tests run the real trainer command line with one Grain worker process and kill it
while it starts up or compiles its first step.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from conftest import QUICKSTART, REPO

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc and /dev/shm")

START_TIMEOUT_S = 300   # until the worker exists and the trainer compiles: minutes on 2 busy cores
EXIT_TIMEOUT_S = 180    # SIGTERM: the first step compiles and runs, is saved, then the trainer exits
GONE_WITHIN_S = 10      # after the trainer exits, its workers, the pipe and the segments must be gone by then
COMPILING = "analytic model FLOPs per step"   # the trainer's last log line before its first step compiles
FIRST_STEP = "first step (compile + run) took"


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, session id) of a process; None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(")") + 2:].split()  # the command name in parentheses may hold spaces
    return fields[0], int(fields[3])


def session_processes(sid: int) -> list[int]:
    """Live processes of session `sid` (zombies are dead): the trainer and all it started, reparented or not."""
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            stat = _stat(int(name))
            if stat is not None and stat[1] == sid and stat[0] not in ("Z", "X"):
                pids.append(int(name))
    return pids


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def is_worker(pid: int) -> bool:
    return "multiprocessing.spawn" in cmdline(pid)  # Grain's spawned prefetch worker (not the resource tracker)


def shm_in_use(pids) -> set[str]:
    """Names of the /dev/shm entries the processes hold open or mapped (not those already unlinked).

    Why not every new /dev/shm entry: other processes on the machine may create segments meanwhile; what the run
    holds is its own for certain. Segments waiting in a worker's queue are held by no process, but they go the
    same way (the resource tracker unlinks all the run's registered segments at once)."""
    names = set()
    for pid in pids:
        paths = []
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    paths.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
                except OSError:
                    pass
            with open(f"/proc/{pid}/maps") as f:
                paths += [line.split(None, 5)[5].strip() for line in f if line.count(" ") >= 5 and "/dev/shm/" in line]
        except OSError:
            continue  # the process is gone
        names.update(p[len("/dev/shm/"):] for p in paths if p.startswith("/dev/shm/") and not p.endswith("(deleted)"))
    return names


class Trainer:
    """`python -m jepa.train ...` in its own session; its stdout and stderr go through one pipe, read like `| tail`."""

    def __init__(self, *args: str):
        env = dict(os.environ, PYTHONPATH=REPO)
        self.proc = subprocess.Popen([sys.executable, "-m", "jepa.train", *args], cwd=REPO, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        self.sid = self.proc.pid
        self.lines: list[str] = []
        self.shm: set[str] = set()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:  # ends at EOF: when no process holds the pipe's write end any more
            self.lines.append(line.decode(errors="replace"))

    def output(self) -> str:
        return "".join(self.lines)

    def processes(self) -> list[int]:
        return session_processes(self.sid)

    def wait_until(self, done, what: str, timeout: float = START_TIMEOUT_S) -> None:
        """Polls `done()` (recording the segments the run holds meanwhile); fails if the trainer ends first."""
        deadline = time.monotonic() + timeout
        while not done():
            self.shm |= shm_in_use(self.processes())
            assert self.proc.poll() is None, f"the trainer ended (code {self.proc.returncode}) before {what}:\n" \
                                             f"{self.output()[-3000:]}"
            assert time.monotonic() < deadline, f"no {what} after {timeout} s:\n{self.output()[-3000:]}"
            time.sleep(0.1)
        self.shm |= shm_in_use(self.processes())

    def kill_all(self) -> None:
        """Cleans up, also after a failed test: the whole session killed, its shared memory unlinked."""
        # The trainer, then whatever else it started but multiprocessing's resource tracker: once those are gone,
        # the tracker unlinks every segment they registered (also those no process holds) and exits.
        for kill in (lambda: [self.proc.pid] if self.proc.poll() is None else [],
                     lambda: [pid for pid in self.processes() if "resource_tracker" not in cmdline(pid)]):
            for pid in kill():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.proc.poll()  # reaps the trainer
            deadline = time.monotonic() + GONE_WITHIN_S
            while self.processes() and time.monotonic() < deadline:
                time.sleep(0.05)
        try:
            os.killpg(self.sid, signal.SIGKILL)  # the trainer's process group: whatever is left
        except (ProcessLookupError, PermissionError):
            pass
        for pid in self.processes():  # anything that left the group but not the session
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()
        for name in self.shm:
            try:
                os.unlink(f"/dev/shm/{name}")
            except OSError:
                pass
        self.proc.stdout.close()


PARENT = """
import multiprocessing, time
from jepa.data import workers

def work():
    workers.exit_with_parent()
    print("ready", flush=True)
    time.sleep(600)

if __name__ == "__main__":
    worker = multiprocessing.get_context("spawn").Process(target=work, daemon=True)
    worker.start()
    print(worker.pid, flush=True)
    worker.join()  # a worker that fails to start ends the parent too (the test then reads EOF, not a hang)
"""


def test_spawned_worker_exits_when_its_parent_is_killed(tmp_path):
    """exit_with_parent (Grain's worker init): the worker lives as long as its parent, and not a moment longer, even
    when the parent is killed with no chance to clean up."""
    script = tmp_path / "parent.py"
    script.write_text(PARENT)
    parent = subprocess.Popen([sys.executable, str(script)], cwd=tmp_path, env=dict(os.environ, PYTHONPATH=REPO),
                              stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        lines = [parent.stdout.readline(), parent.stdout.readline()]  # the worker's pid and its "ready"
        assert "ready\n" in lines, f"the worker did not start: {lines}"
        worker = int(next(line for line in lines if line != "ready\n"))
        time.sleep(1.5)  # the watchdog wakes up every second: it must not take a live parent for a dead one
        assert _stat(worker) is not None and _stat(worker)[0] != "Z", "the worker ended while its parent lives"
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + GONE_WITHIN_S
        while session_processes(parent.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not session_processes(parent.pid), f"worker {worker} outlived its parent by {GONE_WITHIN_S} s"
        assert parent.stdout.read() == ""  # EOF: nothing holds the parent's stdout any more
    finally:
        for pid in session_processes(parent.pid):
            os.kill(pid, signal.SIGKILL)
        parent.kill()
        parent.wait()
        parent.stdout.close()


@pytest.fixture
def trainer_cli(tmp_path, world_dir):
    """Starts the tiny quick-start trainer with one Grain worker and no compilation cache (a full compile)."""
    started = []

    def start() -> Trainer:
        started.append(Trainer(f"--config={QUICKSTART}:tiny", f"--workdir={tmp_path / 'run'}",
                               f"--config.data.sources.world.data_dir={world_dir}", "--config.data.num_workers=1",
                               "--config.train.compilation_cache=", "--config.train.total_steps=1000"))
        return started[-1]

    yield start
    for trainer in started:
        trainer.kill_all()


@pytest.mark.slow
@pytest.mark.parametrize("sig, when, code", [
    pytest.param(signal.SIGKILL, "compile", -signal.SIGKILL, id="SIGKILL-compiling"),  # no cleanup in the trainer
    pytest.param(signal.SIGTERM, "compile", 42, id="SIGTERM-compiling"),  # the step finishes, is saved; exit
    pytest.param(signal.SIGTERM, "start-up", 42, id="SIGTERM-starting"),  # as soon as the worker exists
])
def test_no_worker_or_shared_memory_outlives_the_trainer(trainer_cli, sig, when, code):
    t = trainer_cli()
    # Running, not just importing: it has mapped its queues' semaphores.
    t.wait_until(lambda: any(is_worker(pid) and shm_in_use([pid]) for pid in t.processes()),
                 "running Grain worker process")
    if when == "compile":
        # The trainer holds its first batch (shared memory from the worker) after its last start-up log line.
        t.wait_until(lambda: COMPILING in t.output() and any(n.startswith("psm_") for n in shm_in_use([t.sid])),
                     "first batch in the trainer")
        time.sleep(0.5)  # into the first step's compilation
        t.shm |= shm_in_use(t.processes())
        assert FIRST_STEP not in t.output(), "the first step compiled before the signal: this tests no start-up"
    assert any(is_worker(pid) for pid in t.processes()), "the Grain worker ended before the signal"

    os.kill(t.proc.pid, sig)
    try:
        returncode = t.proc.wait(timeout=EXIT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the trainer did not exit within {EXIT_TIMEOUT_S} s of {sig.name}:\n{t.output()[-3000:]}")
    deadline = time.monotonic() + GONE_WITHIN_S
    while t.processes() and time.monotonic() < deadline:
        time.sleep(0.05)
    left = {pid: cmdline(pid) for pid in t.processes()}
    assert not left, f"processes of the run alive {GONE_WITHIN_S} s after the trainer exited: {left}"
    t.reader.join(timeout=max(0.0, deadline - time.monotonic()) + 1)
    assert not t.reader.is_alive(), "the trainer's stdout pipe is still held open after it exited"
    while (leaked := {n for n in t.shm if os.path.exists(f"/dev/shm/{n}")}) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not leaked, f"shared-memory entries of the run left in /dev/shm: {sorted(leaked)}"
    assert returncode == code, f"exit code {returncode}, expected {code} after {sig.name}:\n{t.output()[-3000:]}"
