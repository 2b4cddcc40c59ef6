"""Stops and locks: how a run listens for SIGINT, SIGTERM, SIGHUP and the death of its
launcher, and how a run directory keeps one writer."""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Callable, Optional

from .errors import CheckpointError

__all__ = ["RunLock", "StopRequest"]


class StopRequest:
    """SIGINT, SIGTERM or SIGHUP ask the training loop to stop after the current optimizer
    step; a second signal exits at once. In a launched worker, a watchdog thread turns the
    death of the launcher (the parent process) into the same request, and exits the process
    if it has not stopped ``grace_s`` later (also when the launcher dies during setup, before
    there is a loop to stop).

    ``code`` orders the reasons (0: none) so that ranks can agree on one with a max-reduce.
    Under torchrun, the launcher forwards SIGTERM and kills its workers 30 s later: the
    current step and its checkpoint have to fit in that."""

    REASONS = {1: ("SIGINT", 130), 2: ("SIGTERM", 143), 3: ("SIGHUP", 129), 4: ("the launcher process is gone", 143)}
    _CODES = {signal.SIGINT: 1, signal.SIGTERM: 2, signal.SIGHUP: 3}

    def __init__(self, on_exit: Optional[Callable[[str], None]] = None):
        self.on_exit = on_exit  # told why the process leaves at once on a second signal
        self.code = 0
        self._previous = {}
        self._watching = False

    @property
    def requested(self) -> bool:
        return self.code != 0

    def _handle(self, signum, frame) -> None:
        if self.code:  # the second one: leave now; checkpoints on disk are complete
            if self.on_exit is not None:
                self.on_exit(f"{signal.Signals(signum).name} again: exiting without a checkpoint")
            os._exit(128 + signum)
        self.code = self._CODES[signum]

    def watch_parent(self, grace_s: float = 60.0) -> StopRequest:
        """Start the watchdog on the launcher (call as early as possible)."""
        if not self._watching:
            self._watching = True
            parent = os.getppid()
            threading.Thread(target=self._watch, args=(parent, grace_s), daemon=True, name="parent-watch").start()
        return self

    def install(self) -> StopRequest:
        """Take over SIGINT, SIGTERM and SIGHUP (call when there is a loop to stop)."""
        if threading.current_thread() is threading.main_thread():
            for sig in self._CODES:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _watch(self, parent: int, grace_s: float) -> None:
        while self._watching and os.getppid() == parent:
            time.sleep(0.5)
        if not self._watching:
            return
        if not self.code:
            self.code = 4
        time.sleep(grace_s)  # time to finish the step and write a checkpoint
        if self._watching:
            os._exit(128 + signal.SIGTERM)

    def uninstall(self) -> None:
        self._watching = False
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    @staticmethod
    def describe(code: int):
        """(reason, exit status) of a stop code."""
        return StopRequest.REASONS.get(code, ("a stop request", 143))


class RunLock:
    """An exclusive ``flock`` on ``RUN/.lock``, which records the holder's pid and host.

    The kernel drops the lock when its process dies, however it dies, so a lock file whose
    lock can be taken belongs to a dead process and is taken over with a message.
    """

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / ".lock"
        self.fd: Optional[int] = None
        self.previous = ""

    def acquire(self) -> RunLock:
        try:  # never through a link: the lock is truncated and written, and must be this run's own file
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as exc:
            if not self.path.is_symlink():
                raise
            raise CheckpointError(
                f"{self.path} is a link to {os.readlink(self.path)}, not this run's lock file; remove the link "
                f"({exc.strerror}) and start again"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise CheckpointError(
                f"{self.path.parent} is being trained by {holder}; wait for it to finish or stop it first"
            ) from None
        self.previous = os.pread(fd, 200, 0).decode(errors="replace").strip()
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, 0)
            os.close(self.fd)
            self.fd = None
