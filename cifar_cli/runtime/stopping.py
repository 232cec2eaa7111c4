"""Signals that stop a command: Ctrl-C (SIGINT), SIGTERM (`kill`, `scancel`, a cluster's time limit or preemption)
and SIGUSR1 / SIGUSR2 (what a SLURM job asks to be warned with, `#SBATCH --signal=USR1@90`).

Every command turns them into `StopRequested`, a KeyboardInterrupt, so that what runs on the way out (a partial
download kept for resuming, a sweep's trials told to stop) runs for all of them alike. A training run defers them
(`deferred`): the step in progress ends, the run saves a resumable state and stops (train/run.py). Where the signal
was the job's warning signal, inside a SLURM job, the job is put back in its queue (`requeue_job`) once the state
is saved, and the same batch script resumes the run when it starts again.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

# What stops a command. SIGUSR1 and SIGUSR2 would otherwise end the process at once, losing the steps since the
# last checkpoint: a SLURM job warned of its time limit would die before it saved.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
# Set in a process whose parent requeues the job for it (a sweep's trial, a torchrun worker other than rank 0).
REQUEUED_BY_PARENT = "CIFAR_SWEEP_TRIAL"
SCONTROL_SECONDS = 30  # how long `scontrol requeue` may take; a KillWait is 30 s by default


class StopRequested(KeyboardInterrupt):
    """A stop signal, raised where the command is (outside a training run's steps)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


@contextlib.contextmanager
def stop_signals_raise() -> Iterator[None]:
    """SIGTERM, SIGUSR1 and SIGUSR2 raise StopRequested as Ctrl-C raises KeyboardInterrupt. Main thread only (a
    handler cannot be installed elsewhere); the previous handlers come back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_stop(signum: int, _frame: FrameType | None) -> None:
        raise StopRequested(signum)

    previous = {number: signal.signal(number, raise_stop) for number in STOP_SIGNALS if number != signal.SIGINT}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


# A second Ctrl-C this many seconds or more after the first stops at once. Sooner, it is the same press delivered
# twice: a terminal signals the whole process group, and torchrun passes its own copy on to its workers.
SECOND_PRESS_SECONDS = 1.0


class StopFlag:
    """What a training run reads at each step boundary: the first stop signal received (None: none yet)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.received_at = 0.0  # time.monotonic() of the first signal

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def handle(self, signum: int, _frame: FrameType | None) -> None:
        """The first signal is noted; the run stops at the next step boundary. A second Ctrl-C stops at once
        (the last checkpoint stays); a cluster's repeated signals change nothing."""
        soon = time.monotonic() - self.received_at < SECOND_PRESS_SECONDS
        if self.signum is None:
            self.signum, self.received_at = signum, time.monotonic()
        elif signum == signal.SIGINT and not soon:
            raise StopRequested(signum)
        elif self.signum == signal.SIGINT and soon:
            # Signals pending together are handled in number order, SIGINT first: a cluster's signal that came
            # with a parent's SIGINT (a sweep stopping its trials) names the stop (and decides a requeue).
            self.signum = signum


@contextlib.contextmanager
def deferred(flag: StopFlag) -> Iterator[StopFlag]:
    """Inside the block, stop signals set `flag` instead of raising (main thread only; elsewhere they raise as
    before). The previous handlers come back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = {number: signal.signal(number, flag.handle) for number in STOP_SIGNALS}
    try:
        yield flag
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


@contextlib.contextmanager
def forwarded_to_process_tree(process: subprocess.Popen) -> Iterator[None]:
    """Stop signals sent to this process go on to `process` (started with start_new_session=True) and to every
    process under it: `cifar train --nproc N` passes them to torchrun and to its workers, which torchrun starts in
    sessions of their own (a process group would not reach them), and which save and stop."""

    def forward(signum: int, _frame: FrameType | None) -> None:
        for pid in [process.pid, *descendants(process.pid)]:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signum)

    previous = {number: signal.signal(number, forward) for number in STOP_SIGNALS}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def descendants(pid: int) -> list[int]:
    """The processes under `pid`, read from Linux's /proc (empty elsewhere)."""
    found: list[int] = []
    waiting = [pid]
    while waiting:
        parent = waiting.pop()
        children: list[int] = []
        for task in Path(f"/proc/{parent}/task").glob("*/children"):
            with contextlib.suppress(OSError, ValueError):
                children += [int(child) for child in task.read_text().split()]
        found += children
        waiting += children
    return found


def warning_signal(name: str) -> int | None:
    """`train.requeue_signal` as a signal number (None for "none")."""
    return None if name == "none" else int(signal.Signals[name])


def asks_requeue(signum: int | None, requeue_signal: str) -> bool:
    """Whether a stop by `signum` is a cluster's warning that the job should come back: inside a SLURM job, by
    the signal the job asked for, in the process that speaks for the job (not a sweep's trial, not a rank > 0)."""
    if signum is None or signum != warning_signal(requeue_signal) or not os.environ.get("SLURM_JOB_ID"):
        return False
    return not os.environ.get(REQUEUED_BY_PARENT) and os.environ.get("RANK", "0") == "0"


def requeue_job() -> str:
    """`scontrol requeue` of this SLURM job (an array's task by its own job ID); returns what to tell the user.
    SLURM then ends this job's processes and starts the batch script again after a short delay."""
    job = os.environ.get("SLURM_JOB_ID", "")
    scontrol = shutil.which("scontrol")
    if not job or scontrol is None:
        return "Not requeued: this is not a SLURM job with scontrol on its PATH; submit it again to resume."
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # SLURM's end of this job, now requeued: we are leaving
    try:
        done = subprocess.run(
            [scontrol, "requeue", job], capture_output=True, text=True, timeout=SCONTROL_SECONDS, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"Not requeued: scontrol requeue {job} failed ({error}); submit the job again to resume."
    if done.returncode != 0:
        reason = (done.stderr or done.stdout).strip() or f"exit {done.returncode}"
        return f"Not requeued: scontrol requeue {job}: {reason}. Submit the job again to resume."
    return f"SLURM job {job} requeued: its batch script starts again and the run resumes from its checkpoint."
