"""A benchmark's "running cluster at rest": wait until this machine's Ray idle workers have
finished starting (with warm workers, importing ``cluster.connect.WARM_MODULES``) before a timed
job, so no worker's start-up runs beside it. Linux (``/proc``) only, like the benches' machine.

Not with a Ray task: a worker that has run a task no longer takes an actor (Ray 2.60), so a task
would spend the warm workers a trial or a scoring actor is meant to find."""

from __future__ import annotations

import os
import time


def idle_workers() -> dict[int, float]:
    """``{pid: CPU seconds used}`` of this machine's idle Ray workers: titled ``ray::IDLE``, or
    still starting (``default_worker.py``, before Ray sets the title)."""
    tick, out = os.sysconf("SC_CLK_TCK"), {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read()
            if not (cmd.startswith(b"ray::IDLE") or b"workers/default_worker.py" in cmd):
                continue
            with open(f"/proc/{d}/stat") as f:
                stat = f.read().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        out[int(d)] = (int(stat[11]) + int(stat[12])) / tick  # utime + stime
    return out


def wait_for_idle_workers(n: int = 0, timeout_s: float = 120.0, settle_s: int = 3, quiet_cpu_s: float = 0.05) -> list[int]:
    """Block until at least ``n`` idle workers exist, the same ones for ``settle_s`` seconds, using
    under ``quiet_cpu_s`` of CPU a second together; returns their PIDs (as they are on timeout)."""
    deadline, last, calm = time.monotonic() + timeout_s, {}, 0
    while True:
        now = idle_workers()
        quiet = set(now) == set(last) and sum(now[p] - last[p] for p in now) < quiet_cpu_s
        calm = calm + 1 if quiet else 0
        if (len(now) >= n and calm >= settle_s) or time.monotonic() > deadline:
            return sorted(now)
        last = now
        time.sleep(1.0)
