"""A process's peak resident memory, the one figure every memory measurement here reports.

VmHWM from /proc, not `getrusage(...).ru_maxrss`: Linux carries ru_maxrss across fork and exec, so a child
spawned by a large process (a test run, a bench parent holding an index) would report at least its parent's
peak. VmHWM belongs to the process's own address space. Off Linux ru_maxrss is the best there is (and only
for this process)."""

from __future__ import annotations

import resource
import sys
from pathlib import Path


def peak_rss_mb(pid: int | str = "self") -> float | None:
    """Peak RSS in MB of `pid` (default this process); None when that process is gone or unreadable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text(encoding="ascii").splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    if pid != "self":
        return None
    # Linux reports ru_maxrss in KiB, macOS in bytes
    scale = 1024.0 * 1024.0 if sys.platform == "darwin" else 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale
