"""ingest: join every modality per segment, verify alignment, then write the Deep Lake 4 dataset.

Per shard (an engine stage): each video's upstream rows are joined on explicit keys (`pipeline.join`) into
table `rows` keyed (video_id, segment_idx), schema `pipeline.schema.ROW_SCHEMA`. The verifier then checks the
video's rows and its upstream keys and counts (`pipeline.verify`); a video with any violation fails as
"misaligned: <first violations>" and none of its rows are written.

After every shard is joined, `write_dataset(cfg)` (the stage's `finish`; the writer lives in
`pipeline.dataset`) brings the Deep Lake dataset at `stage.dataset_path` (default `<run_dir>/dataset`; any URL
Deep Lake supports) up to date with the complete shards. Runs of more than `shards_per_group` shards (local
datasets) write one dataset per group of shards, `<dataset>/group-<g>`, each by its own writer and lock, up to
`writers` at once, read as one dataset through `pipeline.dataset.open_read_only` (`pipeline.dataset.layout`);
what follows holds per group. Under Slurm the group writers are one array; a re-run submits writers only for the
groups with something to do (`finish_groups_to_run`). Shard rows are read `max_rows_in_memory` at a time and
appended in batches of `append_batch_rows`, with a commit per `shards_per_commit` shards. Before a shard's rows are
appended they pass the run-level verifier (`pipeline.verify.verify_shard`: every frame of each span, counts against
the stage ledgers...). It runs once per finalized shard, right after the finalize (`IngestStage.after_finalize`), and
its verdict is kept in the shard (`verified.json`) bound to the sha256 of the rows bytes, the shard's and the
upstream shards' markers, the manifest's videos, the modalities and the check settings; the writer digests the
very bytes it appends and uses the verdict only when all of these match, and runs the check itself otherwise. A
shard that fails is not committed (logged, and listed with its first violations in the result's
`shards_refused`; no tag while any is), and the dataset-level check runs over the rows each commit added, in the
probe child on the committed head (keys and shard lists in the writer, over the whole dataset):
`dataset_violations`, no tag unless clean. Reports on videos ingest itself refused do not hold a shard back. In the same
commit as the rows, `ds.metadata["ingested_shards"]` lists the shards the dataset holds and
`ds.metadata["ingested_fingerprints"]` records per shard the sha256 of its `_SUCCESS` marker (rewritten by every
finalize) and of the `rows.parquet` bytes that were ingested. A re-run appends the shards not yet listed, and a
shard re-finalized since (retry_failed, upstream catch-up) whose rows digest changed has its old rows deleted
(`ds.delete`) and the new ones appended in one commit; unchanged markers cost no read of the rows. Deep Lake
drops uncommitted changes when a writer dies, so after a crash the dataset holds exactly the committed state
(old rows or new, never both) and a re-run completes it without duplicates; readers (`deeplake.open_read_only`)
see committed rows only. Writers of one dataset are serialised by a file lock, `<run_dir>/ingest/dataset.lock`
(`dataset-group-<g>.lock` per group; metadata is re-read once it is held). Whenever every shard is complete and
ingested and the current version has no tag, it is tagged `<tag_prefix>-<time>-<n>rows` (so a crash before the tag
is repaired by a re-run).

Full disks (`pipeline.dataset_health`; Deep Lake 4.7 reports no ENOSPC and leaves a head that crashes its readers):
before each commit's rows are written, the filesystem must have `free_space_margin` x their size (uncompressed,
from the Parquet metadata) + `free_space_min_mb` free, else nothing of them is written and the run stops with one
line. Every commit and tag is followed by a read of the new head in a child process: readable, its version log
(copied aside right after the commit) becomes the last good version; unreadable (the disk filled during the
commit), the saved log is put back, so the dataset is the last good version again, and the run stops saying so.
A commit's read runs while the writer appends the next shards; the next commit waits for its verdict. On open an
unreadable head is rolled back the same way first; a re-run once space is freed then writes what is missing, each
row once.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..dataset.layout import dataset_url
from ..dataset.writer import (FINGERPRINTS, current_version_tagged, delete_shard_rows, ingested_fingerprints,
                              ingested_shards, marker_digest, open_or_create, read_rows, rows_bytes, run_layout,
                              write_dataset, writer_lock)
from ..join import JoinParams, join_video, plan_segments
from .. import modalities
from ..schema import KEY, ROW_SCHEMA, TABLE, row_schema
from ..shards import ShardStore
from ..verify.checks import DROPPED_NOTE, Tolerances, check_counts, check_keys, check_video, check_windows
from .base import ItemResult, Stage, WorkItem
from .ingest_config import IngestConfig

MODEL_KEYS = ("model", "pretrained", "checkpoint", "backend", "detector")
# The Deep Lake writer lives in pipeline.dataset; its names stay importable from here.
__all__ = ["FINGERPRINTS", "IngestConfig", "IngestStage", "STAGE", "current_version_tagged", "dataset_url",
           "delete_shard_rows", "ingested_fingerprints", "ingested_shards", "marker_digest", "open_or_create",
           "read_rows", "rows_bytes", "upstream_provenance", "write_dataset", "writer_lock"]


def upstream_provenance(run_dir: Path, shard: int, stages: list[str]) -> dict[str, Any]:
    """Per upstream stage: the shard's config hash (its marker) and the model settings it ran with."""
    from omegaconf import OmegaConf

    out: dict[str, Any] = {"shard": shard}
    for stage in stages:
        marker = ShardStore(run_dir, stage, shard).marker() or {}
        entry: dict[str, Any] = {"config_hash": marker.get("config_hash", "")}
        cfg_path = run_dir / stage / "config.yaml"
        if cfg_path.exists():
            try:
                conf = OmegaConf.to_container(OmegaConf.load(cfg_path))
                stage_conf = conf.get("stage") or {}
                entry.update({k: str(stage_conf[k]) for k in MODEL_KEYS if stage_conf.get(k) is not None})
                entry["models"] = str(conf.get("models", ""))
            except Exception:  # noqa: BLE001 - provenance is informative; never fail a video on it
                pass
        out[stage] = entry
    return out


class IngestStage(Stage):
    name = "ingest"
    Config = IngestConfig
    upstream = modalities.LiveMapping(modalities.upstream)      # every registered modality's stage and tables
    tables = {TABLE: KEY}
    schemas = modalities.LiveMapping(lambda: {TABLE: row_schema()})
    upstream_arrays = frozenset({"embedding"})   # CLIP and audio embeddings reach the join as numpy vectors

    def __init__(self, cfg: Any, ctx: Any):
        super().__init__(cfg, ctx)
        self.params = JoinParams.from_config(cfg)
        self.tol = Tolerances.from_config(cfg)
        self.provenance = upstream_provenance(Path(ctx.run_dir), ctx.shard, list(self.upstream))
        self.rows_out = 0
        self.refused = 0

    def process_item(self, item: WorkItem) -> ItemResult:
        rows, dropped = join_video(item.video_id, item.inputs, self.params, self.ctx.shard, self.provenance)
        segments = plan_segments(item.inputs, self.params)
        expected = [s["segment_idx"] for s in segments]
        violations = check_keys(item.video_id, item.inputs, self.params)
        violations += check_windows(item.video_id, item.inputs, self.params, self.tol)
        violations += check_video(item.video_id, rows, self.tol, expected, dropped, segments)
        violations += check_counts(item.video_id, item.inputs)
        if violations:
            self.refused += 1
            shown = "; ".join(str(v) for v in violations[:3])
            more = f" (+{len(violations) - 3} more)" if len(violations) > 3 else ""
            return ItemResult.failed(item.video_id, f"misaligned: {shown}{more}")
        self.rows_out += len(rows)
        notes = []
        if dropped:
            notes.append(DROPPED_NOTE + ",".join(map(str, dropped)))
        if rows and not rows[0]["is_speech"]:
            notes.append("no_speech_windows")
        return ItemResult(item.video_id, rows={TABLE: rows}, note=";".join(notes))

    def shard_stats(self) -> dict[str, Any]:
        return {"rows": self.rows_out, "refused_videos": self.refused}

    @classmethod
    def after_finalize(cls, cfg: Any, store: ShardStore, video_ids: list[str]) -> None:
        """The run-level check of the shard's rows as installed, once: its verdict, bound to those bytes, spares
        the Deep Lake writer the same check (`pipeline.verify.shard.record_verdict`)."""
        import logging

        from ..verify.shard import record_verdict

        try:
            verdict = record_verdict(store.run_dir, store.shard, video_ids, Tolerances.from_config(cfg),
                                     JoinParams.from_config(cfg))
        except Exception as exc:  # noqa: BLE001 - without a verdict the writer checks the shard itself
            logging.getLogger(__name__).warning(f"ingest shard {store.shard}: no verdict kept ({exc}); the "
                                                "dataset writer will check the shard itself")
            return
        if verdict["blocking"]:
            logging.getLogger(__name__).warning(
                f"ingest shard {store.shard}: {len(verdict['blocking'])} violation(s) of the run-level check; the "
                f"dataset writer will not commit it: " + "; ".join(verdict["blocking"][:3]))

    finish_prelude = "pipeline.dataset:prestart_writer_probes"

    @classmethod
    def finish(cls, cfg: Any) -> None:
        write_dataset(cfg)

    @classmethod
    def finish_groups(cls, cfg: Any) -> list[int]:
        """The dataset's shard groups, each written by its own writer (a Slurm array runs one task per group);
        [] for a run of one dataset. Pins the catalogue of a grouped dataset."""
        layout = run_layout(cfg)
        return layout.groups() if layout.grouped else []

    @classmethod
    def finish_groups_to_run(cls, cfg: Any, groups: list[int]) -> list[int]:
        """The groups whose writer has something to do, for a finish step submitted once every shard is complete
        (a re-run): a group whose last good version holds every shard as it is now, tagged, is left alone."""
        from ..dataset.writer import group_up_to_date

        layout = run_layout(cfg)
        return [g for g in groups if not group_up_to_date(cfg, layout, g)]

    @classmethod
    def finish_group(cls, cfg: Any, group: int) -> dict[str, Any]:
        """One group's writer (an array task of the finish step)."""
        return write_dataset(cfg, group=group)


STAGE = IngestStage


