"""Alignment verifier: `python -m pipeline verify run_dir=<dir> [dataset=true|false] [max_listed=50]`.

Checks every joined row (the ingest shards' `rows` tables, and the Deep Lake dataset when it exists):
- frames: every frame PTS inside [start - frame_tolerance_s, end + frame_tolerance_s], or the row is flagged
  "nearest_frame" (one frame, within nearest_frame_tolerance_s of the span) or "no_frames" (none); and the row
  holds exactly the frames the join rule gives its planned span, rebuilt from the frames stage's table by PTS
  (missing or extra frame_idx are named);
- audio: the audio row's span equals the segment span (within span_tolerance_s, which only absorbs the last
  window's end, measured on each stage's own decode); a video without speech takes the audio stage's windows,
  which must tile [0, its duration) (contiguous from 0, equal full windows, the end within span_tolerance_s);
- keys: per frame, CLIP and scene-graph frame_idx lists equal the frames' and their PTS equal the frame PTS;
  per video, the CLIP/scene-graph frame keys equal the frames stage's and the audio segment keys equal the
  segments; keys unique; prev_text is the text of the preceding ASR segment(s), dropped rows or not;
- counts: videos ok in every upstream ledger == videos with rows; segments per video == ASR segments (or
  windows), less those ingest dropped for want of frames (recorded in its ledger note); per video, frames rows ==
  frames `videos.n_frames`, ASR segments == asr `videos.n_segments`, one CLIP and one scene-graph row per frame;
- dataset: its rows are exactly the rows of the shards its metadata lists as ingested, each once (a
  listed shard whose rows table is empty has none), and per row the stored frames, CLIP and scene-graph frame_idx
  lists are identical (as many images and CLIP embeddings as frames).
Exits 1 listing violations as `video_id segment_idx: what`, 0 when clean, 2 on usage errors.
`verify_shard` is also ingest's gate before it commits a shard to the dataset.

Layout: `checks` (row, video, key, count and window checks; each modality's own parts are named by
`pipeline.modalities`), `shard` (one ingest shard against its upstream tables and ledger; a whole run),
`dataset` (the committed Deep Lake dataset). Everything is importable from `pipeline.verify`.
"""
from __future__ import annotations

import sys
from pathlib import Path

from .checks import (DROPPED_NOTE, PTS_MATCH_S, Tolerances, Violation, _close, check_audio_keys,  # noqa: F401
                     check_audio_row, check_clip_row, check_counts, check_frame_keys, check_frame_row, check_frames,
                     check_keys, check_row, check_scenegraph_row, check_video, check_windows, dropped_of)
from .dataset import _column_names, _image_counts, _read, _runs, verify_dataset  # noqa: F401

# `shard` (Parquet reading, the stage configs) is imported on first use: the ingest writer's probe child imports
# `dataset` for its row check and needs none of it.
_SHARD = ("HEAVY_COLUMNS", "ROW_BULK", "ShardReport", "_read_parquet", "_rows_without_images", "heavy_columns",
          "ingest_settings", "row_bulk", "verify_run", "verify_shard")


def __getattr__(name: str):
    if name in _SHARD:
        from . import shard

        return getattr(shard, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def cli(overrides: list[str]) -> int:
    """`python -m pipeline verify run_dir=<dir> [dataset=true|false] [max_listed=N] [content=true [sample=N]
    [seed=S] [frames=N]]` (content: `pipeline.verify_content`)."""
    from ..errors import ConfigError

    args = dict(o.split("=", 1) for o in overrides if "=" in o)
    unknown = sorted(set(args) - {"run_dir", "dataset", "max_listed", "content", "sample", "seed", "frames"}) + \
        [o for o in overrides if "=" not in o]
    if unknown or "run_dir" not in args or args.get("content", "false").lower() not in ("true", "false") or \
            not all(args.get(k, "0").isdigit() for k in ("sample", "seed", "frames")):
        raise ConfigError("usage: python -m pipeline verify run_dir=<dir> [dataset=true|false] [max_listed=N] "
                          "[content=true [sample=N] [seed=S] [frames=N]]")
    run_dir = Path(args["run_dir"])
    if not (run_dir / "manifest.parquet").exists():
        raise ConfigError(f"not a run dir (no manifest.parquet): {run_dir}")
    from .shard import verify_run

    violations = verify_run(run_dir, check_dataset=args.get("dataset", "true").lower() != "false")
    if args.get("content", "false").lower() == "true":
        from ..verify_content import verify_content

        violations += verify_content(run_dir, sample=int(args.get("sample", 32)), seed=int(args.get("seed", 0)),
                                     frames_per_row=int(args.get("frames", 2)))
    limit = int(args.get("max_listed", 50))
    for v in violations[:limit]:
        print(v)
    if len(violations) > limit:
        print(f"... and {len(violations) - limit} more")
    print(f"verify {run_dir}: {len(violations)} violation(s)", file=sys.stderr)
    return 1 if violations else 0


def main(argv: list[str] | None = None) -> int:
    from ..errors import command_main
    from ..logs import configure

    configure()
    return command_main(cli, argv)

