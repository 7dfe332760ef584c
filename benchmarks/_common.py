"""Helpers shared by the benchmark scripts (run as ``python benchmarks/NAME.py``)."""
from __future__ import annotations

import argparse
import platform
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable


def main_of(parse: Callable[[list[str] | None], argparse.Namespace],
            run: Callable[[argparse.Namespace], Any],
            report: Callable[[Any, argparse.Namespace], None]) -> Callable[[list[str] | None], int]:
    """A benchmark's ``main(argv)``: ``parse`` the arguments, ``run`` the measurement (its
    result is plain data), ``report`` it (files, tables). Each step is callable alone."""
    def main(argv: list[str] | None = None) -> int:
        args = parse(argv)
        report(run(args), args)
        return 0
    return main


def git_state() -> dict:
    """The commit measured, and the files of the package that differ from it."""
    def git(*a):
        try:
            return subprocess.run(["git", *a], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                                  text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return ""
    dirty = [line[3:] for line in git("status", "--porcelain", "--", "distflow", "pipelines").splitlines()]
    return {"commit": git("rev-parse", "--short", "HEAD").strip(), "modified": dirty}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


class MetricsWatcher(threading.Thread):
    """Notes when each line of ``metrics.jsonl`` appears (this process's clock)."""

    def __init__(self, path: Path):
        super().__init__(daemon=True)
        self.path, self.arrivals, self._halt = path, [], threading.Event()

    def run(self) -> None:
        seen = 0
        while not self._halt.is_set():
            try:
                n = self.path.read_bytes().count(b"\n")
            except OSError:
                n = 0
            now = time.perf_counter()
            self.arrivals.extend([now] * (n - seen))
            seen = max(seen, n)
            self._halt.wait(0.02)

    def stop(self) -> None:
        self._halt.set()
        self.join()
