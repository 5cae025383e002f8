"""Run doodl3 commands in processes forked from one zygote, for the kill and concurrency tests.

The zygote imports doodl3 and torch once, so a command starts in milliseconds
instead of paying a fresh interpreter and the torch import each time. Several
commands may run at once. The `zygote` fixture of conftest.py starts one per test
module.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# Reads one JSON request per line and writes one line in reply:
#   {"start": [ARG, ...], "stderr": PATH, "chunk": N}  ->  "pid PID"
#       forks a child that runs `doodl3 ARG ...` with stdout discarded and stderr to PATH,
#       one torch thread, and sample.CHUNK_POINTS = N when "chunk" is given;
#   {"wait": PID, "timeout": SECONDS}  ->  "exit STATUS SECONDS" or "timeout"
#       reaps the child; STATUS is the raw wait status, SECONDS the time since its start.
ZYGOTE = r"""
import json, os, sys, time, traceback
import torch
torch.set_num_threads(1)
from doodl3_cli import sample
from doodl3_cli.cli import app
import doodl3_cli.dynamics.stage, doodl3_cli.report.page, doodl3_cli.topology.stage, doodl3_cli.zoo

started = {}
for line in sys.stdin:
    request = json.loads(line)
    if "start" in request:
        pid = os.fork()
        if pid == 0:
            # Fresh stream objects: the zygote's own may hold locks that no thread of the child releases.
            os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
            os.dup2(os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), 2)
            sys.stdout = open(1, "w", closefd=False)
            sys.stderr = open(2, "w", closefd=False)
            sys.stdin = open(os.devnull)
            if "chunk" in request:
                sample.CHUNK_POINTS = request["chunk"]
            sys.argv = ["doodl3", *request["start"]]
            code = 0
            try:
                app()
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:
                traceback.print_exc()
                code = 1
            sys.stderr.flush()
            os._exit(code)
        started[pid] = time.monotonic()
        print(f"pid {pid}", flush=True)
    else:
        pid = request["wait"]
        deadline = time.monotonic() + request["timeout"]
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done or time.monotonic() > deadline:
                break
            time.sleep(0.005)
        if done:
            print(f"exit {status} {time.monotonic() - started.pop(pid)}", flush=True)
        else:
            print("timeout", flush=True)
"""


@dataclass
class Finished:
    """A command that ended: its raw wait status, run time and standard error."""

    status: int
    seconds: float
    stderr: str

    @property
    def exit_code(self) -> int | None:
        """Exit code of a command that exited, None for one killed by a signal."""
        return self.status >> 8 if self.status & 0x7F == 0 else None

    @property
    def error_lines(self) -> list[str]:
        """Lines of standard error that start with ``error:``."""
        return [line for line in self.stderr.splitlines() if line.startswith("error:")]


class Zygote:
    """The zygote process and the protocol above."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [sys.executable, "-c", ZYGOTE], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self._stderr: dict[int, Path] = {}
        self._count = 0

    def start(self, *args: str, chunk: int | None = None) -> int:
        """Start ``doodl3 ARGS`` in a forked child and return its PID."""
        self._count += 1
        stderr = self.folder / f"stderr-{self._count}.txt"
        request = {"start": [str(a) for a in args], "stderr": str(stderr)}
        if chunk is not None:
            request["chunk"] = chunk
        pid = int(self._ask(request, timeout=60).removeprefix("pid "))
        self._stderr[pid] = stderr
        return pid

    def wait(self, pid: int, timeout: float = 120) -> Finished | None:
        """Reap the child `pid`; None when it is still running after `timeout` seconds."""
        answer = self._ask({"wait": pid, "timeout": timeout}, timeout=timeout + 60)
        if answer == "timeout":
            return None
        _, status, seconds = answer.split()
        return Finished(int(status), float(seconds), self._stderr.pop(pid).read_text(encoding="utf-8"))

    def run(self, *args: str, chunk: int | None = None, timeout: float = 120) -> Finished:
        """Run ``doodl3 ARGS`` to its end; fail the test when it takes longer than `timeout`."""
        pid = self.start(*args, chunk=chunk)
        finished = self.wait(pid, timeout)
        if finished is None:
            self.kill(pid)
            raise AssertionError(f"doodl3 {' '.join(map(str, args))} did not finish within {timeout} s")
        return finished

    def kill(self, pid: int) -> Finished:
        """SIGKILL the child `pid` (unless it already ended) and reap it."""
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        finished = self.wait(pid, timeout=60)
        assert finished is not None
        return finished

    def _ask(self, request: dict, *, timeout: float) -> str:
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        if not ready:
            raise AssertionError(f"the zygote did not answer {request} within {timeout} s")
        line = self.process.stdout.readline()
        if not line:
            raise AssertionError(f"the zygote exited (code {self.process.poll()}) on {request}")
        return line.strip()

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=30)


def killed(finished: Finished) -> bool:
    """Return whether the command was ended by SIGKILL."""
    return finished.status & 0x7F == signal.SIGKILL


def wait_for(condition, *, timeout: float, description: str) -> None:
    """Poll `condition()` every 5 ms until it is true; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {description}")
        time.sleep(0.005)


def copy_run(run, folder: Path, names=("doodl3.toml", "trajectory.h5", "landscape.h5")):
    """Copy the named files of a run folder into a new `folder` and return it as a RunFolder."""
    from doodl3_cli.runfolder import RunFolder

    folder.mkdir(parents=True)
    for name in names:
        (folder / name).write_bytes((run.path / name).read_bytes())
    return RunFolder(folder)
