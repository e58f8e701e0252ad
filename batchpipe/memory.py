"""Keep a long run's heap from growing with the dataset (glibc's malloc; a no-op elsewhere).

A ``batchpipe run`` allocates and frees millions of prompt strings, request bytes and
result lines larger than Python's small-object allocator handles, so they come from
malloc. glibc raises its mmap threshold each time a large block is freed, after which
blocks of several hundred KB (a chunk of 10,000 rows, Arrow buffers) come from the main
heap, and freed space inside that heap stays part of the process. Measured with
bench/bench_pipeline.py at 500,000 rows on SQLite, peak RSS was 329 MiB by default and
284 MiB with the thresholds fixed (what ``MALLOC_MMAP_THRESHOLD_`` /
``MALLOC_TRIM_THRESHOLD_`` do); handing free pages back after each batch
(:func:`release_free_memory`) keeps what one batch freed from adding to the next stage's.

Python's cyclic garbage collector is tuned here too (:func:`tune_collector`): it is about
how the process spends memory work, and it runs per allocation in the same loops.
"""

from __future__ import annotations

import ctypes
import gc
import os
import sys
from functools import cache
from typing import Any

# mallopt parameters from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# A young-generation collection every this many container allocations (CPython: 700).
_GC_GEN0_THRESHOLD = 50_000
# glibc's own starting values; fixing them stops the dynamic growth described above.
_THRESHOLD_BYTES = 128 * 1024


@cache
def _glibc() -> Any | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)  # the C library this process already runs on
    except OSError:
        return None
    if not hasattr(libc, "mallopt") or not hasattr(libc, "malloc_trim"):
        return None  # e.g. musl
    return libc


def tune_allocator() -> None:
    """Fix malloc's mmap and trim thresholds, unless the user set them in the environment."""
    libc = _glibc()
    if libc is None:
        return
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        libc.mallopt(_M_MMAP_THRESHOLD, _THRESHOLD_BYTES)
    if "MALLOC_TRIM_THRESHOLD_" not in os.environ:
        libc.mallopt(_M_TRIM_THRESHOLD, _THRESHOLD_BYTES)


def release_free_memory() -> None:
    """Return the heap's free pages to the system (after a batch, before the next step)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def tune_collector() -> None:
    """Collect cycles less often, and never re-scan what start-up allocated.

    The hot loops allocate millions of short-lived dicts and tuples (a row, its request,
    a result line) that never form cycles, but each 700 allocations trigger a collection
    that scans the young objects, and every so often all of them. Measured with
    bench/bench_pipeline.py at 100,000 rows on SQLite: 10.8 s of CPU before, 9.8 s with
    ``gc.freeze()`` after the imports and a first-generation threshold of 50,000; peak RSS
    unchanged. Cycles are still collected, just in larger steps.
    """
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(_GC_GEN0_THRESHOLD, gen1, gen2)
