"""Keep freed memory inside the process, so CPU training steps stop page-faulting.

A training step allocates and frees the same large activation buffers (the MLP's (B*L, 4D)
hidden state, the logits, the attention scores) every step. glibc's malloc hands blocks above its
mmap threshold back to the kernel on free and trims the heap top above its trim threshold, so the
next step faults every page in again and the kernel zeroes it: measured on the peer benchmark
model (benchmarks/transformer.py, 1 thread), about 40,000-55,000 minor page faults per training
step by default and under 400 after `retain_freed_memory()`.
PyTorch's CPU tuning guide suggests swapping in jemalloc or tcmalloc with LD_PRELOAD for the same
reason; this does it with glibc's own knobs (`mallopt`), from inside the process.

The cost: the process keeps its peak heap instead of returning it to the system, which is what a
training process does anyway. Nothing changes on other C libraries or operating systems.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc <malloc.h>
_MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value: bigger blocks are still mmapped
_TRIM_THRESHOLD = 2 ** 31 - 1  # mallopt takes a C int
_applied = False


def retain_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process (once); True when in effect.
    Training entry points call it; call it yourself before a custom CPU training loop."""
    global _applied
    if _applied:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # no C library by that name, or not glibc (e.g. musl)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _applied = mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) == 1
    return _applied
