"""`python -m benchmarks.ingest_bench` end to end on a tiny run: every section of the report is written, with the
row count the shards hold (counted here from their rows tables) and the scale section's own rows."""
from __future__ import annotations

import re

import pyarrow.parquet as pq
import pytest

from benchmarks.ingest_bench import main
from pipeline.schema import TABLE
from pipeline.shards import ShardStore


@pytest.mark.slow
def test_the_ingest_benchmark_writes_every_section(tmp_path):
    out, report = tmp_path / "bench", tmp_path / "ingest.md"
    assert main(["--videos", "4", "--shards", "2", "--seconds", "8", "--repeat", "1", "--no-slurm",
                 "--scale", "2", "--out", str(out), "--report", str(report)]) == 0
    text = report.read_text()
    tables = [pq.read_table(ShardStore(out, "ingest", s).table_path(TABLE), columns=["video_id", "frame_idx", "frames"])
              for s in range(2)]
    rows = sum(t.num_rows for t in tables)
    assert rows > 0 and f"-> {rows} rows," in text
    # each frame a JPEG of its own: as many distinct JPEGs as distinct (video, frame) keys
    by_frame = {(vid, i): j for t in tables for vid, idx, jpegs in zip(*(t.column(c).to_pylist() for c in
                                                                      ("video_id", "frame_idx", "frames")))
                for i, j in zip(idx or [], jpegs or [])}
    assert len(by_frame) > rows and len(set(by_frame.values())) == len(by_frame)
    assert "each frame a JPEG of its own" in text
    for heading in ("## Ingest", "## At 2x the rows, the stage's commit size", "## Many writers as a Slurm array",
                    "## Loader", "## Many writers: the layout, and its limit at 100 writers"):
        assert heading in text, heading
    ratio = re.search(r"goal >= 0\.5\): ([0-9.]+) wall", text)
    floor = re.search(r"CPU floor: the Deep Lake write used ([0-9.]+) CPU s \(([0-9.]+) in the writer", text)
    assert ratio and float(ratio.group(1)) > 0 and floor and 0 < float(floor.group(2)) <= float(floor.group(1))
    before = re.search(r"start-up, ([0-9.]+) s of it before the write began", text)
    assert before and float(before.group(1)) < float(floor.group(1)) - float(floor.group(2))
    late = re.search(r"\| the same write with its probe child started by the write itself [^|]*\| ([0-9.]+) \|", text)
    assert late and float(late.group(1)) > 0
    scale = re.search(r"The same steps on 8 videos in 4 shards \((\d+) rows", text)
    assert scale and int(scale.group(1)) > rows
