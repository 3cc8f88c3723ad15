"""One timer for work queued on a CUDA stream: CUDA events around back-to-back calls.

Every GPU figure (``ferret bench``, ``make gpu-check``, the kernel benchmarks) comes from here, so they
are measured the same way: events on the current stream, the end event waited on, per-call milliseconds.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def cuda_event_ms(fn: Callable[[], Any], *, iters: int = 1, rounds: int = 1, warmup: int = 0,
                  queue_behind: bool = False) -> list[float]:
    """Milliseconds per call of ``fn`` from CUDA events: ``rounds`` measurements of ``iters`` calls each.

    ``queue_behind``: start the timed calls behind a GPU-side delay (about 25 ms), so the host's launch
    overhead overlaps it instead of being timed: the GPU's time, not the launcher's.
    """
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if queue_behind:
            torch.cuda._sleep(50_000_000)  # private but long-standing; the launches below queue up meanwhile
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        out.append(start.elapsed_time(end) / iters)
    return out
