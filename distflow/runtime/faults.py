"""Signals and stack dumps: every death of a rank leaves its root cause behind.

- SIGTERM / SIGINT raise ``Terminated`` in the main thread, so the rank goes through the
  same failure path as any error: ``errors/rank<R>.txt``, ``state=failed`` to its peers,
  exit 1. If the main thread is stuck in C code (a gloo collective, a long kernel) and
  cannot take the exception, a watcher thread woken by the signal itself (``signal.
  set_wakeup_fd`` writes from the C-level handler) does it instead after ``grace_s``.
- SIGUSR1 dumps every thread's Python stack to ``errors/rank<R>.stack`` (faulthandler),
  without stopping the rank; ``dump_stacks`` does the same on a peer failure.
"""
from __future__ import annotations

import faulthandler
import signal
import socket
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Callable

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Terminated(BaseException):
    """This rank received SIGTERM or SIGINT."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"terminated by {signal.Signals(signum).name}")


def dump_stacks(out: Path, rank: int, why: str, error: BaseException | None = None) -> Path:
    """Append every thread's Python stack (and ``error``'s traceback) to errors/rank<R>.stack."""
    path = out / "errors" / f"rank{rank}.stack"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fh.write(f"=== rank {rank}, {time.strftime('%Y-%m-%d %H:%M:%S')}: {why}\n")
        if error is not None:
            fh.write("".join(traceback.format_exception(error)))
        fh.flush()
        faulthandler.dump_traceback(file=fh, all_threads=True)
        fh.write("\n")
    return path


class SignalWatch:
    """Install the handlers (main thread only). ``on_stuck(signum)`` runs in the watcher
    thread when the main thread has not taken a stop signal within ``grace_s``; it must
    report the failure and end the process."""

    def __init__(self, out: Path, rank: int, on_stuck: Callable[[int], None], grace_s: float):
        self.out, self.rank, self.on_stuck, self.grace_s = out, rank, on_stuck, grace_s
        self.handled = threading.Event()  # the main thread is on its way out: no more raising
        self._stopping = False
        self._rx, self._tx = socket.socketpair()
        self._rx.settimeout(None)
        self._tx.setblocking(False)
        self._old_fd = signal.set_wakeup_fd(self._tx.fileno(), warn_on_full_buffer=False)
        for s in (*STOP_SIGNALS, signal.SIGUSR1):
            signal.signal(s, self._handler)
        threading.Thread(target=self._watch, name="distflow-signals", daemon=True).start()

    def _handler(self, signum, frame) -> None:  # runs in the main thread, between bytecodes
        if signum == signal.SIGUSR1 or self._stopping or self.handled.is_set():
            return  # the watcher dumps the stacks; a second stop signal changes nothing
        self._stopping = True
        raise Terminated(signum)

    def _watch(self) -> None:
        while True:
            try:
                data = self._rx.recv(64)
            except OSError:
                return
            if not data:
                return
            for signum in data:
                if signum == signal.SIGUSR1:
                    dump_stacks(self.out, self.rank, "SIGUSR1")
                elif signum in STOP_SIGNALS and not self.handled.wait(self.grace_s):
                    dump_stacks(self.out, self.rank, f"{signal.Signals(signum).name}; the main "
                                f"thread did not stop within {self.grace_s:.0f} s")
                    self.on_stuck(signum)

    def close(self) -> None:
        """Back to the default handlers (the run is over)."""
        for s in (*STOP_SIGNALS, signal.SIGUSR1):
            signal.signal(s, signal.SIG_DFL if s != signal.SIGINT else signal.default_int_handler)
        signal.set_wakeup_fd(self._old_fd)
        self._tx.close()
        self._rx.close()


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


if sys.platform == "win32":  # pragma: no cover - torchrun workers are POSIX processes
    raise ImportError("distflow.runtime.faults needs POSIX signals")
