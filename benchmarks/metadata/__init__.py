"""Metadata-throughput benchmark: many small files vs packed stores (Deep Lake, Parquet, tar shards).

Run with ``python -m benchmarks.metadata [hydra overrides]``; see ``conf/metadata.yaml``.
"""
