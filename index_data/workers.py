"""How many decode processes to run: the two defaults, side by side, because they differ on purpose."""

from __future__ import annotations

import os


def index_workers() -> int:
    """`index --workers` default: cores - 1 (os.cpu_count), at least 1, at most 8."""
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def affinity_workers() -> int:
    """Cores this process may run on (its CPU affinity, e.g. a container's share) - 1, at least 1, at most 8:
    what the decode and Ray benchmarks measure next to an encoder in the main process."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, n - 1))
