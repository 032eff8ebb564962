"""The Deep Lake dataset of a run: its layout (one dataset, or one per shard group), the writer, one read view.

- `layout`: where rows live (`Layout`, `dataset_url`, the catalogue of groups).
- `writer`: `write_dataset(cfg, group=None)`, one writer per group under its own lock.
- `view`: `open_read_only(run_dir_or_url)`, every group as one read-only dataset, each row once.
- `prestart_writer_probes()`: what a writer's process does first (`python -m pipeline.dataset`, Slurm finish tasks).
"""
from .layout import CATALOGUE, GROUP_PREFIX, Layout, dataset_url, read_layout, writer_layout
from .lock import writer_lock
from .view import GroupedView, exists, layout_of, open_read_only, repair

# The module of the writer's row check (`pipeline.verify.dataset.NEW_ROWS_CHECK`), which the writer's probe child
# imports as it starts (`python -m pipeline.dataset`), named here so that naming it imports nothing.
ROW_CHECK_MODULE = "pipeline.verify.dataset"


def prestart_writer_probes() -> None:
    """Start the writer's probe child now, its row check's module imported as it starts (`dataset_health.
    prestart_probes`): first thing in a writer's process, before the writer's own imports."""
    from .. import dataset_health

    dataset_health.prestart_probes(preload=(ROW_CHECK_MODULE,))


# The writer's names load the writer on first use: it imports the verifier, which reads through `view` (and
# importing `pipeline.dataset.view` must not import the verifier back).
_WRITER = ("FINGERPRINTS", "ShardRows", "current_version_tagged", "delete_shard_rows", "ingested_fingerprints",
           "ingested_shards", "marker_digest", "open_or_create", "read_rows", "rows_bytes", "run_layout",
           "write_dataset", "write_group")


def __getattr__(name: str):
    if name in _WRITER:
        from . import writer

        return getattr(writer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["CATALOGUE", "FINGERPRINTS", "GROUP_PREFIX", "GroupedView", "Layout", "ROW_CHECK_MODULE", "ShardRows",
           "current_version_tagged", "dataset_url", "delete_shard_rows", "exists", "ingested_fingerprints",
           "ingested_shards", "layout_of", "marker_digest", "open_or_create", "open_read_only",
           "prestart_writer_probes", "read_layout", "read_rows", "repair", "rows_bytes", "run_layout",
           "write_dataset", "write_group", "writer_layout", "writer_lock"]
