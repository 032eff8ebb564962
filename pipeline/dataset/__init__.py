"""The Deep Lake dataset of a run: its layout (one dataset, or one per shard group), the writer, one read view.

- `layout`: where rows live (`Layout`, `dataset_url`, the catalogue of groups).
- `writer`: `write_dataset(cfg, group=None)`, one writer per group under its own lock.
- `view`: `open_read_only(run_dir_or_url)`, every group as one read-only dataset, each row once.
"""
from .layout import CATALOGUE, GROUP_PREFIX, Layout, dataset_url, read_layout, writer_layout
from .view import GroupedView, exists, layout_of, open_read_only, repair
from .writer import (FINGERPRINTS, ShardRows, current_version_tagged, delete_shard_rows, ingested_fingerprints,
                     ingested_shards, marker_digest, open_or_create, read_rows, rows_bytes, run_layout, write_dataset,
                     write_group, writer_lock)

__all__ = ["CATALOGUE", "FINGERPRINTS", "GROUP_PREFIX", "GroupedView", "Layout", "ShardRows", "current_version_tagged",
           "dataset_url", "delete_shard_rows", "exists", "ingested_fingerprints", "ingested_shards", "layout_of",
           "marker_digest", "open_or_create", "open_read_only", "read_layout", "read_rows", "repair", "rows_bytes",
           "run_layout", "write_dataset", "write_group", "writer_layout", "writer_lock"]
