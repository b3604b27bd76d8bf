"""What a process costs: resident memory now and at its peak, in MB (reports and benchmarks)."""
from __future__ import annotations

import resource


def peak_rss_mb() -> float:
    """This process's peak resident set size (Linux reports KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def rss_mb() -> float:
    """This process's resident set size now."""
    import psutil

    return round(psutil.Process().memory_info().rss / 2**20, 1)
