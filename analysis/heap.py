"""The command-line readers' heap: freed memory is kept for the next chunk, and Arrow's
buffers come from jemalloc.

A chunk's arrays are a few MB each and freed once counted. glibc returns such blocks to
the kernel (mmap'd, or trimmed off the heap), and the next chunk's arrays page-fault all
over again: on this project's 2-core machine that was a third of the reading time of a
10M-record log (BENCHMARKS.md, "Analysis at scale"). For the CLIs only, where the process
ends with the report: a library user's process keeps glibc's defaults.

Arrow's buffers (parquet parts, DuckDB's batches) go to jemalloc, which hands freed pages
back after a while: with pyarrow's default mimalloc a 30M-record parquet log peaked 6%
above a 10M one, with jemalloc 3% and 55 MB lower, at the same speed (measured on this
project's 2-core machine).
"""

import ctypes

import pyarrow as pa

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_MAX = 32 << 20  # glibc's largest accepted mmap threshold (64-bit)


def keep_freed_memory() -> None:
    """Blocks up to 32 MiB come from the heap, and the heap is never trimmed (glibc only;
    elsewhere nothing changes); Arrow allocates from jemalloc where pyarrow has it."""
    try:
        pa.set_memory_pool(pa.jemalloc_memory_pool())
    except NotImplementedError:  # a pyarrow built without jemalloc
        pass
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(M_MMAP_THRESHOLD, MMAP_MAX)
    mallopt(M_TRIM_THRESHOLD, 2**31 - 1)
