"""Run a command and measure its wall-clock time and the peak summed RSS of its process tree."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path


def _children(pid: int) -> list[int]:
    out = []
    task_dir = Path(f"/proc/{pid}/task")
    try:
        for t in task_dir.iterdir():
            txt = (t / "children").read_text().split()
            out += [int(c) for c in txt]
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return out


def _tree_rss(root: int) -> int:
    total, stack, seen = 0, [root], set()
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.add(pid)
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
                    break
        except (FileNotFoundError, ProcessLookupError):
            continue
        stack += _children(pid)
    return total


def run_measured(cmd: list[str], env: dict | None = None, interval: float = 0.05) -> dict:
    """Run ``cmd``; return wall seconds, peak process-tree RSS (bytes), return code, output."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    peak = [0]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _tree_rss(proc.pid))
            stop.wait(interval)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, _ = proc.communicate()
    stop.set()
    th.join()
    return {"seconds": time.perf_counter() - t0, "peak_rss": peak[0], "returncode": proc.returncode, "output": out}
