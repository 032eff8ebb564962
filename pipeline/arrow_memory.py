"""Arrow's memory pool for the pipeline's data processes (stage shards, the Deep Lake writer, its probe).

pyarrow 26's default pool is mimalloc. On a 2-core VM (kernel THP defrag=madvise, the kernel's default) a fresh
process spent most of its first read or write of a shard in the kernel with it: reading 58.7 MiB of ingest rows
took 1.36 s and writing them again 1.11 s, against 0.33 s and 0.33 s with jemalloc or the system allocator
(`benchmarks/results/ingest.md`). Later reads in the same process were fast with every pool: the cost is the
pool's first use of fresh memory, which every short-lived shard task pays. So the data processes use jemalloc
(the system allocator where pyarrow was built without it), unless ARROW_DEFAULT_MEMORY_POOL names a pool: a
user's choice wins.
"""
from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def configure() -> str:
    """Select the pool (idempotent, cheap); returns the backend in use."""
    import pyarrow as pa

    if os.environ.get("ARROW_DEFAULT_MEMORY_POOL"):
        return pa.default_memory_pool().backend_name
    current = pa.default_memory_pool().backend_name
    if current in ("jemalloc", "system"):
        return current
    try:
        pa.set_memory_pool(pa.jemalloc_memory_pool())
    except NotImplementedError:     # a pyarrow built without jemalloc
        pa.set_memory_pool(pa.system_memory_pool())
    return pa.default_memory_pool().backend_name
