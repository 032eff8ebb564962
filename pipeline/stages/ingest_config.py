"""Ingest's settings (`IngestConfig`, `stage.*` of `stage=ingest`) and `ingest_settings(run_dir)`, the ones a run
used: below the ingest stage, the Deep Lake writer and the verifier, which all read them. Re-exported by
`pipeline.stages.ingest` (and `ingest_settings` by `pipeline.verify`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .base import Resources, StageConfig


@dataclass
class IngestConfig(StageConfig):
    name: str = "ingest"
    dataset_path: Optional[str] = None    # Deep Lake URL or path; null = <run_dir>/dataset
    window_s: float = 10.0                # no-speech windows where the audio stage wrote none (else its spans)
    keep_no_speech: bool = True           # give videos without speech windows (else they have no rows)
    frame_tolerance_s: float = 0.001      # frame PTS slack at span boundaries (float rounding of rational PTS)
    nearest_frame_tolerance_s: float = 2.0  # a span without frames borrows the nearest one this close
    keep_no_frames: bool = True           # keep rows with no frame at all (flag no_frames) or drop them
    span_tolerance_s: float = 0.05        # audio window end vs segment end (each stage measures its decode)
    prev_segments: int = 1                # speech segments before this one whose text is prev_text
    shards_per_commit: int = 4            # shards per Deep Lake commit (a crash redoes at most this many)
    append_batch_rows: int = 256          # rows per ds.append call
    tag_prefix: str = "ingest"            # tag name prefix of a completed ingest run
    free_space_margin: float = 2.0        # a commit needs this many times its rows' bytes free on the dataset's disk
    free_space_min_mb: float = 64.0       # ... plus this much (version log, metadata)
    shards_per_group: int = 64            # shards per Deep Lake dataset; more shards: <dataset>/group-<g>, one writer each
    writers: int = 2                      # group writers the finish step runs at once (child processes)
    max_rows_in_memory: int = 4096        # rows of a shard a writer reads into memory at a time
    resources: Resources = field(default_factory=lambda: Resources(cpus=2, gpus=0, mem_gb=8))


def ingest_settings(run_dir: Path) -> Any:
    """The ingest config a run used (`<run_dir>/ingest/config.yaml`), else the defaults."""
    from omegaconf import OmegaConf

    base = OmegaConf.structured(IngestConfig)
    path = run_dir / "ingest" / "config.yaml"
    if path.exists():
        stage = OmegaConf.load(path).get("stage") or {}
        base = OmegaConf.merge(base, {k: v for k, v in stage.items() if k in base})
    return base
