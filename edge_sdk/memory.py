"""Process memory figures, read the same way on every platform the SDK runs on."""

from __future__ import annotations

import sys

import psutil


def peak_rss_bytes() -> int:
    """Peak resident set size of this process image (bytes).

    On Linux this reads VmHWM from /proc: getrusage's ru_maxrss survives fork and exec, so a
    process started by a large parent would report the parent's peak instead of its own.
    """
    if sys.platform.startswith("linux"):
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    if sys.platform == "win32":
        return int(psutil.Process().memory_info().peak_wset)
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def rss_bytes() -> int:
    """Current resident set size of this process (bytes)."""
    return int(psutil.Process().memory_info().rss)
