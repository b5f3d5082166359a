"""N local processes of one command, joined by jax.distributed on 127.0.0.1 (CPU, gloo collectives).

    python launch/local.py --num_processes=2 --devices_per_process=2 -- \
        python -m jepa.train --config=configs/quickstart.py:tiny --workdir=/tmp/mh

Each process gets --config.distributed.{coordinator_address,num_processes,process_id} appended, JAX_PLATFORMS=cpu
and XLA_FLAGS=--xla_force_host_platform_device_count=D; their outputs go to WORKDIR/logs/process_I.log (or
--log_dir). Exits with the first non-zero exit code (e.g. 42 after a preemption), else 0. Used by the tests; the
same mechanism multi-host jobs use, minus the network.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(devices_per_process: int, base: dict | None = None) -> dict:
    env = dict(os.environ if base is None else base)
    env["JAX_PLATFORMS"] = "cpu"
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices_per_process}"])
    env.pop("JAX_COORDINATOR_ADDRESS", None)
    return env


def commands(command: list[str], num_processes: int, port: int) -> list[list[str]]:
    """The command of each process: the given one plus the distributed flags."""
    return [command + [f"--config.distributed.coordinator_address=127.0.0.1:{port}",
                       f"--config.distributed.num_processes={num_processes}",
                       f"--config.distributed.process_id={i}"] for i in range(num_processes)]


def launch(command: list[str], num_processes: int, devices_per_process: int, log_dir: str,
           port: int = 0, env: dict | None = None, cwd: str | None = None) -> list[subprocess.Popen]:
    """Starts the processes (non-blocking); process i writes log_dir/process_i.log."""
    if num_processes < 1 or devices_per_process < 1:
        raise ValueError(f"num_processes={num_processes} and devices_per_process={devices_per_process} "
                         "must be >= 1")
    os.makedirs(log_dir, exist_ok=True)
    port = port or free_port()
    procs = []
    for i, cmd in enumerate(commands(command, num_processes, port)):
        log = open(os.path.join(log_dir, f"process_{i}.log"), "w")
        procs.append(subprocess.Popen(cmd, env=process_env(devices_per_process, env), cwd=cwd, stdout=log,
                                      stderr=subprocess.STDOUT))
        log.close()
    return procs


def wait(procs: list[subprocess.Popen], timeout: float | None = None) -> int:
    """Waits for all; when one fails the others are terminated (they would block in a collective)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    codes: dict[int, int] = {}
    while len(codes) < len(procs):
        for i, p in enumerate(procs):
            if i not in codes and p.poll() is not None:
                codes[i] = p.returncode
        failed = [c for c in codes.values() if c != 0]
        if failed and len(codes) < len(procs):
            time.sleep(30 if 42 in failed else 5)  # a preempted peer is saving too: give it time
            for p in procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
        if deadline is not None and time.monotonic() > deadline:
            for p in procs:
                if p.poll() is None:
                    p.kill()
            raise TimeoutError(f"processes still running after {timeout} s")
        time.sleep(0.1)
    return next((c for c in codes.values() if c != 0), 0)


def main(argv=None) -> int:
    """`python launch/local.py [--flags] -- COMMAND...` (argv: the arguments after the program name)."""
    from absl import flags

    from jepa import cli
    with cli.flag_scope():
        num_processes = flags.DEFINE_integer("num_processes", 2, "processes to start")
        devices = flags.DEFINE_integer("devices_per_process", 1, "simulated CPU devices per process")
        port = flags.DEFINE_integer("port", 0, "coordinator port (0: a free one)")
        timeout = flags.DEFINE_float("timeout", None, "seconds before the processes are killed (default: none)")
        args = list(sys.argv[1:] if argv is None else argv)
        split = args.index("--") if "--" in args else len(args)
        command = args[split + 1:]
        cli.parse(args[:split])
        if not command:
            raise cli.UsageError("no command given (put it after --)")
        logs = flags.FLAGS.log_dir  # absl's own flag: default WORKDIR/logs from the command's --workdir, else ./logs
        if not logs:
            workdir = cli.flag_value(command, "workdir") or "."
            logs = os.path.join(workdir, "logs")
        procs = launch(command, num_processes.value, devices.value, logs, port.value)
        # Forward SIGTERM to every process (a preemption of the launcher preempts the job).
        signal.signal(signal.SIGTERM, lambda *_: [p.send_signal(signal.SIGTERM) for p in procs if p.poll() is None])
        code = wait(procs, timeout.value)
        print(f"launch/local.py: {num_processes.value} process(es) finished with exit code {code}; logs in {logs}",
              file=sys.stderr)
    return code


if __name__ == "__main__":
    from jepa import cli
    cli.run(main, __doc__)
