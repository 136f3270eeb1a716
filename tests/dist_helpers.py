"""Functions the ranks of tests/test_dist.py run (spawned processes import them by module name)."""
from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any


def convert_killing(kill_rank: int, kill_at: int, src: Path, dst: Path, block: int, **kw: Any) -> Any:
    """hfnemo.convert on this rank, row blocks of ``block`` bytes and a journal commit after every
    block; rank ``kill_rank`` SIGKILLs itself at its ``kill_at``-th output write."""
    os.environ["HFNEMO_COMMIT_BYTES"] = "1"
    import hfnemo
    from hfnemo.io import fileio

    from faults import block_size

    if int(os.environ["RANK"]) == kill_rank:
        seen = [0]

        def hook(event: str, f: object, n: int) -> None:
            if event == "write":
                seen[0] += 1
                if seen[0] == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)

        fileio.FAULT_HOOK = hook
    with block_size(block):
        return hfnemo.convert(src, dst, **kw)
