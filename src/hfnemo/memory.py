"""Own-process memory readings used for the budget (the benchmark measures the whole tree)."""
from __future__ import annotations


def _status_kib(field: str) -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def current_rss() -> int:
    """Resident bytes now (VmRSS); an upper bound of this process's PSS."""
    return _status_kib("VmRSS") * 1024


def peak_rss() -> int:
    """High-water mark of resident bytes (VmHWM)."""
    return _status_kib("VmHWM") * 1024
