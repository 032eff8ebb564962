"""Ingest and loader benchmark: `python -m benchmarks.ingest_bench [--videos N] [--out DIR] [--report PATH]`.

Builds realistic upstream stage outputs (the engine's own shard layout: download, frames, asr, clip, audio,
scenegraph), then measures
- ingest: the per-shard join + verifier, and the Deep Lake write (rows/s) next to writing the same rows to
  Parquet with pyarrow; then the same rows written as two shard groups by 1 and by 2 concurrent writers
  (local processes; aggregate rows/s, peak RSS per writer, `max_rows_in_memory`);
- loader: samples/s and file opens per sample (strace -f -c, when installed) for a shuffled epoch (block
  shuffle) vs a sequential scan, plus naive random `ds[i]` row reads for comparison.
`make_upstream` is also what the tests build their runs with.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

REPO = Path(__file__).resolve().parents[1]


def _jpeg(seed: int, size: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    img = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=80)
    return buf.getvalue()


def _jpeg_crop(noise: np.ndarray, rng: np.random.Generator, size: int) -> bytes:
    from PIL import Image

    y, x = (int(v) for v in rng.integers(0, noise.shape[0] - size, 2))
    buf = io.BytesIO()
    Image.fromarray(noise[y:y + size, x:x + size]).save(buf, format="JPEG", quality=80)
    return buf.getvalue()


def make_upstream(run_dir: str | Path, n_videos: int = 6, num_shards: int = 2, seconds: float = 24.0,
                  fps: float = 1.0, d_clip: int = 16, d_audio: int = 32, image_size: int = 16,
                  no_speech_every: int = 3, seed: int = 0, distinct_frames: bool = False) -> Path:
    """Upstream outputs of `n_videos` videos in `run_dir` (pinned geometry + complete shards of every stage).

    Video k: frames every 1/fps s from PTS 0.25; every `no_speech_every`-th video has no speech (windows);
    the others have ASR segments with gaps, one of them too short to contain a frame (-> nearest frame).
    Embeddings are random but fixed by `seed`. Frames: 8 JPEGs repeated (cheap to build; a general-purpose
    compressor shrinks such a column ~20x, which real frames never allow), or with `distinct_frames` each frame
    its own JPEG (a crop of a noise image at an offset fixed by `seed`: entropy-coded data, like real frames).
    """
    from pipeline.manifest import Geometry, Item, pin_geometry, shard_of
    from pipeline.shards import ShardStore
    from pipeline.stages.asr import AsrStage
    from pipeline.stages.audio import AUDIO_SCHEMA, plan_spans

    run_dir = Path(run_dir)
    rng = np.random.default_rng(seed)
    items = [Item(f"vid{k:04d}", f"/media/vid{k:04d}.mp4", shard_of(f"vid{k:04d}", num_shards))
             for k in range(n_videos)]
    pin_geometry(run_dir, Geometry(num_shards, n_videos, f"synthetic-{seed}-{n_videos}"), items)
    images = [_jpeg(seed * 1000 + i, image_size) for i in range(8)]
    noise = np.random.default_rng(seed + 1).integers(0, 255, (4 * image_size, 4 * image_size, 3), dtype=np.uint8)
    clip_type = pa.list_(pa.float16())
    for shard in range(num_shards):
        vids = sorted(i.video_id for i in items if i.shard == shard)
        t: dict[str, dict[str, list[dict]]] = {s: {} for s in ("download", "frames", "asr", "clip", "audio",
                                                              "scenegraph")}
        for vid in vids:
            k = int(vid[3:])
            t["download"].setdefault("videos", []).append(
                {"video_id": vid, "path": f"/media/{vid}.mp4", "duration": seconds + 0.02})
            pts = [round(0.25 + n / fps, 6) for n in range(int((seconds - 0.25) * fps))]
            for n, p in enumerate(pts):
                t["frames"].setdefault("frames", []).append(
                    {"video_id": vid, "frame_idx": n, "pts": p, "shot": n // 5, "kind": "cut" if n % 5 == 0
                     else "uniform", "jpeg": _jpeg_crop(noise, rng, image_size) if distinct_frames
                     else images[(k + n) % len(images)], "width": image_size,
                     "height": image_size})
                t["clip"].setdefault("clip", []).append(
                    {"video_id": vid, "frame_idx": n, "pts": p, "model": "ViT-B-32/tiny",
                     "embedding": rng.standard_normal(d_clip).astype(np.float16)})
                t["scenegraph"].setdefault("scenegraph", []).append(
                    {"video_id": vid, "frame_idx": n, "pts": p,
                     "objects": [{"label": "cup", "score": 0.9, "box": [0.0, 0.0, 1.0, 1.0]}], "relations": [],
                     "text": f"cup {vid} {n}"})
            t["frames"].setdefault("videos", []).append(
                {"video_id": vid, "duration": seconds, "n_frames": len(pts), "first_pts": pts[0]})
            speech = no_speech_every <= 0 or k % no_speech_every != no_speech_every - 1
            segments = []
            if speech:
                s, idx = 0.4, 0
                while s < seconds - 2.0:
                    length = 0.4 if idx == 2 else float(rng.uniform(1.5, 4.0))   # #2 holds no frame
                    if idx == 2:
                        s = float(np.floor(s)) + 0.5                              # between frames .25 and 1.25
                    e = min(s + length, seconds - 0.5)
                    segments.append({"video_id": vid, "segment_idx": idx, "start": s, "end": e,
                                     "text": f"{vid} words of segment {idx}",
                                     "words": [{"word": f"w{idx}", "start": s, "end": e, "probability": 0.9}],
                                     "no_speech_prob": 0.01, "avg_logprob": -0.2, "language": "en",
                                     "language_probability": 0.99})
                    s, idx = e + float(rng.uniform(0.0, 0.6)), idx + 1
            t["asr"].setdefault("segments", []).extend(segments)
            t["asr"].setdefault("videos", []).append(
                {"video_id": vid, "language": "en", "language_probability": 0.99, "n_segments": len(segments),
                 "has_speech": bool(segments), "duration": seconds})
            for span in plan_spans(segments, seconds, 10.0):
                t["audio"].setdefault("audio", []).append(
                    {"video_id": vid, "segment_idx": span.segment_idx, "start": span.start, "end": span.end,
                     "source": span.source, "model_seconds": span.end - span.start,
                     "embedding": rng.standard_normal(d_audio).astype(np.float16),
                     "labels": ["Speech", "Music"], "scores": [0.8, 0.1]})
        schemas = {("asr", "segments"): AsrStage.schemas["segments"], ("asr", "videos"): AsrStage.schemas["videos"],
                   ("audio", "audio"): AUDIO_SCHEMA}
        for stage, tables in t.items():
            arrow = {}
            for name, rows in tables.items():
                if (stage, name) in schemas:
                    arrow[name] = pa.Table.from_pylist(rows, schema=schemas[(stage, name)])
                else:
                    if stage == "clip":   # list<halffloat>, as the clip stage writes it
                        emb = pa.array([r["embedding"] for r in rows], type=clip_type)
                        tab = pa.Table.from_pylist([{k: v for k, v in r.items() if k != "embedding"} for r in rows])
                        arrow[name] = tab.append_column("embedding", emb)
                    else:
                        arrow[name] = pa.Table.from_pylist(rows)
            ledger = [{"video_id": v, "status": "ok", "reason": "", "attempts": 1, "seconds": 0.1, "note": ""}
                      for v in vids]
            ShardStore(run_dir, stage, shard).finalize(ledger, arrow, {}, {"stage": stage, "shard": shard,
                                                                          "config_hash": f"{stage}-cfg"})
    return run_dir


def ingest_config(run_dir: Path, *overrides: str):
    from pipeline.config import compose

    return compose(["stage=ingest", f"run_dir={run_dir}", "models=tiny", *overrides])


def run_ingest_shards(cfg) -> float:
    """Join + verify every shard in this process (the engine's run_shard); returns seconds."""
    from pipeline.engine import run_shard
    from pipeline.manifest import load_items

    t0 = time.perf_counter()
    for shard in sorted({i.shard for i in load_items(Path(cfg.run_dir))}):
        run_shard(cfg, shard)
    return time.perf_counter() - t0


# ------------------------------------------------------------------------------------------------ measuring


def _strace_opens(code: str, env: dict) -> dict | None:
    """Run `python -c code` under strace -f -c; returns syscall counts (openat/open/statx/read) or None."""
    if shutil.which("strace") is None:
        return None
    out = subprocess.run(["strace", "-f", "-c", "-e", "trace=openat,open,read,pread64,statx,newfstatat",
                          sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO)
    counts = {}
    for line in out.stderr.splitlines():
        parts = line.split()
        if len(parts) >= 5 and parts[-1] in ("openat", "open", "read", "pread64", "statx", "newfstatat"):
            counts[parts[-1]] = int(parts[3]) if len(parts) >= 6 else int(parts[3])
    result = json.loads(out.stdout.strip().splitlines()[-1]) if out.stdout.strip() else {}
    return {"syscalls": counts, **result}


LOADER_CODE = """
import json, time, sys
from pipeline.loader import DeepLakeSource, LoaderConfig
mode, url, n = sys.argv[1] if len(sys.argv) > 1 else '{mode}', '{url}', 0
cfg = LoaderConfig(batch_size=32, block_rows={block}, shuffle_buffer_rows={buffer}, max_frames=8,
                   split_fractions=(1.0, 0.0, 0.0), shuffle={shuffle})
src = DeepLakeSource('{url}', cfg, split='train')
import torch; torch.zeros(1)   # torch's lazy init is not the loader's cost
if {baseline}:
    print(json.dumps({{'samples': 0, 'seconds': 0.0}})); sys.exit(0)
t0 = time.perf_counter()
for b in src.batches(0):
    n += len(b['video_id'])
print(json.dumps({{'samples': n, 'seconds': time.perf_counter() - t0}}))
"""

NAIVE_CODE = """
import json, time, random, deeplake
from pipeline.loader import DeepLakeSource, LoaderConfig   # same imports as the loader runs
ds = deeplake.open_read_only('{url}')
idx = list(range(len(ds))); random.Random(0).shuffle(idx); idx = idx[:{n}]
t0 = time.perf_counter()
for i in idx:
    row = ds[i]; row['clip']; row['audio']; row['text']; row['frame_pts']
print(json.dumps({{'samples': len(idx), 'seconds': time.perf_counter() - t0}}))
"""

def _reads(r: dict) -> int:
    return r["syscalls"].get("read", 0) + r["syscalls"].get("pread64", 0)


def measure_loader(url: str, rows: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # baseline: imports, opening the dataset and reading the split index, no epoch
    base = _strace_opens(LOADER_CODE.format(mode="base", url=url, block=64, buffer=64, shuffle=False,
                                            baseline=True), env)
    results = {}
    cases = {
        "sequential scan": LOADER_CODE.format(mode="seq", url=url, block=256, buffer=256, shuffle=False,
                                              baseline=False),
        "shuffled epoch (block shuffle)": LOADER_CODE.format(mode="shuf", url=url, block=64, buffer=1024,
                                                             shuffle=True, baseline=False),
        "random ds[i] rows (naive)": NAIVE_CODE.format(url=url, n=min(rows, 500)),
    }
    for name, code in cases.items():
        r = _strace_opens(code, env)
        if r is None:   # no strace: time only
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO)
            r = {"syscalls": {}, **json.loads(out.stdout.strip().splitlines()[-1])}
        # timings without strace overhead
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO)
        timed = json.loads(out.stdout.strip().splitlines()[-1])
        opens = r["syscalls"].get("openat", 0) + r["syscalls"].get("open", 0)
        base_opens = (base or {}).get("syscalls", {}).get("openat", 0) if base else 0
        n = max(1, r["samples"])
        results[name] = {"samples": timed["samples"], "samples_per_s": timed["samples"] / max(timed["seconds"], 1e-9),
                         "opens_per_sample": (opens - base_opens) / n if base else None,
                         "reads_per_sample": (_reads(r) - _reads(base)) / n if base else None}
    return results


STEP_CODE = """
import json, os, resource, sys, time
sys.path.insert(0, {repo!r})
if {step!r} == "deeplake":     # as the writer's entry points do first thing (python -m pipeline.dataset, Slurm tasks)
    from pipeline.dataset import prestart_writer_probes
    prestart_writer_probes()
def cpu():     # this process and the children it waited for (the probe child of the Deep Lake write)
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + c.ru_utime + c.ru_stime
from pathlib import Path
from benchmarks.ingest_bench import ingest_config, run_ingest_shards
cfg = ingest_config(Path({run!r}), *{overrides!r})
step = {step!r}
t0, c0, p0 = time.perf_counter(), cpu(), time.process_time()
out = {{}}
if step == "join":
    run_ingest_shards(cfg)
elif step in ("deeplake", "deeplake-late"):     # late: the probe child started by the write itself
    import deeplake  # noqa: F401  (imports are the process's start-up, as the Parquet step's are)
    import pyarrow.dataset  # noqa: F401
    from pipeline.stages.ingest import write_dataset
    from pipeline import dataset_health
    spare = dataset_health._spare       # the prestarted probe child: its CPU so far is start-up, not the write's
    before = 0.0
    if spare is not None and spare.proc is not None:
        stat = open(f"/proc/{{spare.proc.pid}}/stat").read().rsplit(")", 1)[1].split()
        before = (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")
    t0, c0, p0 = time.perf_counter(), cpu(), time.process_time()
    res = write_dataset(cfg, log=lambda s: None)
    out = {{k: res[k] for k in ("rows", "commits", "verify_seconds", "rows_written", "verdicts_used")}}
    out["child_cpu_before"] = before
elif step == "deeplake-bare":     # the format alone: the same rows appended and committed, no check, no probe
    import deeplake
    import pyarrow.dataset  # noqa: F401
    from pipeline import arrow_memory
    from pipeline.dataset.writer import ShardRows
    from pipeline.manifest import load_items
    from pipeline.schema import deeplake_columns, to_deeplake_columns
    from pipeline.shards import ShardStore
    arrow_memory.configure()
    t0, c0, p0 = time.perf_counter(), cpu(), time.process_time()
    ds = deeplake.create("file://" + str(Path({run!r}) / "dataset-bare"))
    for name, dtype in deeplake_columns().items():
        ds.add_column(name, dtype)
    ds.commit("create")
    shards, n = sorted({{i.shard for i in load_items(Path({run!r}))}}), 0
    for k, s in enumerate(shards):
        rows = ShardRows(ShardStore(Path({run!r}), "ingest", s), 1 << 62)
        for table in rows.batches():
            ds.append(to_deeplake_columns(table))
            n += table.num_rows
        rows.close()
        if k % int(cfg.stage.shards_per_commit) == int(cfg.stage.shards_per_commit) - 1 or k == len(shards) - 1:
            ds.commit(f"shards up to {{s}}")
    out = {{"rows": n}}
elif step == "writers":     # shard groups, one writer process per group, stage.writers of them at once
    from pipeline.dataset.writer import _combined, _write_in_children, run_layout
    t0, c0, p0 = time.perf_counter(), cpu(), time.process_time()
    layout = run_layout(cfg, lambda s: None)
    res = _combined(layout, _write_in_children(cfg, layout, int(cfg.stage.writers), lambda s: None), 0.0)
    out = {{k: res[k] for k in ("rows", "commits", "rows_written")}}
    out["groups"] = len(res["groups"])
elif step in ("parquet", "parquet-pipeline-pool"):
    if step == "parquet-pipeline-pool":     # Arrow's pool as the pipeline's data processes set it
        from pipeline import arrow_memory
        arrow_memory.configure()
    import pyarrow as pa
    import pyarrow.parquet as pq
    from pipeline.schema import TABLE
    from pipeline.shards import ShardStore, concat_tables
    from pipeline.manifest import load_items
    shards = sorted({{i.shard for i in load_items(Path({run!r}))}})
    table = concat_tables(ShardStore(Path({run!r}), "ingest", s).read_table(TABLE) for s in shards)
    t0, c0, p0 = time.perf_counter(), cpu(), time.process_time()          # the same rows, already in memory: the write alone
    pq.write_table(table, Path({run!r}) / "same_rows.parquet", compression="zstd")
    out = {{"rows": table.num_rows, "mib": table.nbytes / 2**20, "pool": pa.default_memory_pool().backend_name}}
out["seconds"], out["cpu_seconds"] = time.perf_counter() - t0, cpu() - c0
out["cpu_own_seconds"] = time.process_time() - p0       # this process alone (its children: the rest)
out["children_maxrss_kib"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps(out), flush=True)
"""


NOTES = [
    "## Where the time went, and what changed", "",
    "Before (same command, 2026-12-04): join + verify 124 rows/s, Deep Lake write 275 rows/s, Parquet 1,722 rows/s"
    " (Deep Lake / Parquet 0.16). cProfile of 40 videos (701 rows) on the loaded VM:", "",
    "- Deep Lake write, 10.4 s -> 3.4 s wall: each new head (create, every commit, the tag) was probed by a fresh"
    " child process that started Python and imported Deep Lake (5.2 s of the 10.4); now one warm child serves"
    " every probe of a write (`dataset_health.WarmProber`; a crash there is still reported and rolls back). Rows"
    " were converted for `ds.append` through Python lists, a Python float per embedding number (2.85 s); now"
    " column-wise from the Arrow buffers (`schema.to_deeplake_columns`, 0.04-0.1 s). `ds.append` itself took"
    " 0.1 s and the commits 0.2 s; fsync of the saved last-good version log 0.4 s.",
    "- Join + verify: the engine handed every upstream embedding to the join as a Python list of floats (3.6 s of"
    " 10.5 s); ingest now takes them as numpy vectors (`upstream_arrays`, same rows bit for bit). What is left"
    " (CPU seconds above): Parquet zstd encoding of every row twice (flushed parts, then the packed shard"
    " output) and reading them back; on wall time, the fsyncs of the engine's per-video in-flight record (two"
    " per video), of the parts and of the finalize, which on this shared disk wait far longer than they compute."
    " 1,000 rows/s needs the engine to write each row once (parts as the final output) and to keep the in-flight"
    " record without an fsync per video (it guards process deaths, which the page cache survives).", "",
    "Then (2026-12-05 morning, same command, idle VM): join + verify 730 rows/s, Deep Lake write 798 rows/s,"
    " Parquet 2,455 rows/s. Profiled again in one process (cProfile, 2,081 rows), and changed:", "",
    "- Arrow's memory pool. A fresh process's first read or write of the rows spent seconds in the kernel with"
    " pyarrow's default pool (mimalloc): reading the 58.7 MiB of rows took 1.36 s and writing them 1.11 s, against"
    " 0.33 s each with jemalloc. The pipeline's data processes (every stage shard, the writer) now use jemalloc"
    " (`pipeline/arrow_memory.py`; ARROW_DEFAULT_MEMORY_POOL still wins): join + verify went from 2.04 s to"
    " 0.97 s on the same rows. The default pool's cost comes and goes between runs here (the Parquet baseline's"
    " runs below show it), so the baseline is measured with both pools.",
    "- The probe of each new head decoded every JPEG it read (0.78 s of a 0.95 s probe of 2,081 rows). It now"
    " reads the images column as stored bytes (every chunk still read) and decodes a spread of 16 rows per"
    " commit: 0.22 s.",
    "- The writer waited for each probe (1.38 s of a 2.49 s write). Probes now run in the warm child while the"
    " writer reads, converts and appends the next shards: the new version log is copied aside right after the"
    " commit (`dataset_health.stage_good`) and becomes the last good version by renames once the probe has read"
    " the head, so a disk filling during the next appends still leaves the commit to roll back to. The next"
    " commit waits for the verdict: nothing is ever committed on top of an unprobed head.",
    "- The run-level check of each shard ran twice: in the join step's process and again in the writer (0.28 s"
    " of the write). It now runs once, right after the shard is finalized, and its verdict is kept beside the"
    " shard (`verified.json`), bound to the sha256 of the rows bytes, the shard's marker, the upstream markers,"
    " the manifest's videos, the modalities and the check settings; the writer uses it only when all of these"
    " match what it is about to append, and checks the shard itself otherwise. So the join step's time now"
    " includes that check.",
    "- The dataset-level row check of the rows each commit added (0.2-0.3 s at the end of the write) runs in the"
    " probe child, on the committed head as a reader sees it, while the writer goes on; the writer checks the"
    " rows itself when a child's answer is missing.",
    "- The dataset-level row check of the rows each commit added read them a second time in the child (0.08 s"
    " per commit of 1,040 rows). The child now checks each block of new rows from the values its probe just"
    " read (images as stored bytes: the check counts JPEGs), and reads embedding columns by slices instead of"
    " row lists (3x faster; only Sequence and image columns need row lists): a probe plus its row check of"
    " 1,040 rows went from 0.28 s to 0.12 s. `tests/test_ingest_child_checks.py` checks that the child and"
    " the check of stored rows find the same violations for five kinds of corrupted rows.",
    "- The writer read each shard's rows through a Python file object (the GIL held for every read) and only"
    " when it reached the shard. Rows tables are now memory-mapped (still one inode per shard), and the next"
    " shard is opened, hashed and, when both fit in `max_rows_in_memory` rows, decoded in a thread while the"
    " current one is appended (`writer.ShardReader`). Interleaved A/B of 8 writes each: median wall 1.11 s ->"
    " 0.96 s, writer CPU 1.05 s -> 0.81 s.",
    "- The benchmark's frames were 8 JPEGs repeated over every frame, so zstd shrank the frames column about"
    " 20x (16 MiB of shard files for 59 MiB of rows) and the Parquet baseline wrote a fraction of the bytes a"
    " real run writes. Each frame is now a JPEG of its own (crops of a noise image: entropy-coded data, like"
    " real frames); `--repeated-frames` keeps the old data, and `ingest-repeated-frames.md` beside this file"
    " has a run of it from the same day for comparison.",
    "- The probe child started when the write began, so its start-up (Python and Deep Lake imports, then the"
    " row check's at its first request: about 0.35 CPU s) competed with the first appends on this VM's 2 cores."
    " It is now started first thing by the writer's process, before the writer's own imports"
    " (`pipeline.dataset.prestart_writer_probes`: `python -m pipeline.dataset`, which the local finish step runs"
    " per group, calls it first, and so does each Slurm finish task, as the ingest stage's `finish_prelude`) and"
    " imports the row check's module before it says ready; `pipeline.atomic` no longer imports pyarrow at the"
    " top, so starting it imports almost nothing. The row 'started by the write itself' above keeps the old order"
    " for comparison; interleaved A/B of 7 runs on these rows: median 0.80 s -> 0.64 s.",
    "- Parquet min/max statistics of list columns (every JPEG, CLIP and audio number: nothing filters on them)"
    " were a quarter of a rows table's write time; the finalized tables keep statistics only for columns of one"
    " value per row. Join + verify, interleaved A/B of 6 runs: median 1.56 s -> 1.38 s. The tag's version log is"
    " now copied aside while its probe runs, as the commits' are.",
    "- Left in the Deep Lake write: the format's own work (the row 'the Deep Lake format alone': reading the"
    " shards, converting, `ds.append`, the commits; Deep Lake's own threads encode and write the chunks), the"
    " last commit's probe (nothing left to overlap it with: 0.1 s for 1,048 rows, a third of it the row check),"
    " the tag and its probe, and the probe child's work. On 2 cores the write is CPU-bound"
    " (the 'CPU floor' line above): the writer and its child together need about three times the Parquet"
    " write's CPU, so no overlap on both cores takes the ratio past the floor's bound, and the measured ratio"
    " moves with the VM's load. With more rows per"
    " commit the fixed costs fade and the probes hide behind the appends (the section at 4x the rows: the"
    " checked write about as fast as the format alone, which reads each shard only when it reaches it); with more"
    " cores the child leaves the writer's path.", "",
    "## Many writers: the layout, and its limit at 100 writers", "",
    "Built (`pipeline/dataset/`): one Deep Lake dataset per shard group, `<dataset>/group-<g>` with g = shard //"
    " `shards_per_group` (default 64: runs of up to 64 shards keep the single dataset at `<dataset>`, as before)."
    " The group size is pinned once in `<dataset>/catalogue.json` (num_shards, shards_per_group), written before"
    " any group by a hard link that only the first writer wins, and never updated: the catalogue is the list of"
    " groups it implies. Each group is written by exactly one writer at a time under its own lock"
    " (`<run_dir>/ingest/dataset-group-<g>.lock`) with the single dataset's guarantees: a commit per"
    " `shards_per_commit` shards holding rows, shard list and fingerprints together, every commit and tag probed"
    " and saved as the last good version, disk-full rollback, a tag per complete group. `write_dataset(cfg,"
    " group=g)` is one array task (`python -m pipeline.dataset <g>`); the ingest finish step runs every"
    " group, `stage.writers` at once. A writer reads a shard's rows in batches of at most `max_rows_in_memory`"
    " rows (twice from one memory-mapped file: digest + run-level check without images and embeddings, then"
    " the appends; the next shard is read ahead while one is appended, within the same bound;"
    " Deep Lake writes chunks out as rows are appended, so its memory does not grow with a commit)."
    " `pipeline.dataset.open_read_only(run_dir_or_url)` gives loader, verify, verify_content and the report one"
    " dataset: global row i is a row of the group whose offset range holds it, column slices read one"
    " contiguous slice per group they span; rows of a shard live only in its group, so no row appears twice;"
    " verify checks that each group holds and lists only its shards, and the union of keys. Concurrent appends"
    " to one dataset are not used: Deep Lake 4.7 documents no guarantee for them and the shard list in the"
    " metadata is a read-modify-write.",
]


def limit_notes(rate: float, cpu_rate: float, row_kib: float, rss_mib: float, open_s: float) -> list[str]:
    """The design's limit at 100 writers, on paper, from this run's measurements."""
    agg = 100 * rate
    return [
        "Limit at 100 writers, on paper (from this run's figures): writers share nothing but the filesystem and"
        " the manifest (read once), so the aggregate is 100 x one writer's rate until the storage saturates:"
        f" 100 x {rate:.0f} rows/s (the one-writer Deep Lake write above, on this VM; {cpu_rate:.0f} rows"
        f" per CPU second) = {agg / 1e3:.0f}k rows/s, {agg * row_kib / 2**20:.1f} GiB/s of appends of"
        f" {row_kib:.0f} KiB rows, plus 100 concurrent fsync streams (commits and last-good saves): a parallel"
        f" filesystem's or object store's load, not one local disk's. 1e9 rows at that rate: "
        f"{1e9 / agg / 3600:.1f} h. Memory: each writer peaks at ~{rss_mib:.0f} MiB here (imports dominate;"
        " rows in memory are bounded by `max_rows_in_memory`) plus its probe child of about as much, so ~8 writers"
        " per 16-CPU node fit in a few GiB. Readers open every group when they start"
        f" ({open_s * 1e3:.0f} ms per group here: {100 * open_s:.1f} s for 100 groups, once per process) and keep a"
        " 100-entry offset table; a contiguous block read crosses at most one group boundary. Past ~1,000 groups"
        " the open cost and the file count call for an offline merge of groups (or a larger `shards_per_group`).",
    ]


def _slurm_lines(res: dict, args) -> list[str]:
    from benchmarks.ingest_slurm_writers import table

    return ["## Many writers as a Slurm array (local cluster)", "",
            "The same rows as shard groups, written by the ingest finish step's Slurm array (`submit_groups`: one"
            " task per group, the array's `%` throttle = `stage.writers`); every group's rows counted back against"
            " its shards' rows tables. Wall: submission to the last task's result (Slurm scheduling, interpreter"
            " start-up and imports included); span: the writers' own `write_group` time, first start to last"
            f" end. {res['slurm']}; the local cluster's nodes all run on this machine; each task 1 CPU / 2 GiB; median"
            f" of {res['repeat']} runs by wall time, cases interleaved.", "", *table(res, args)[2:], ""]


def run_step(step: str, run_dir: Path, *overrides: str, children: bool = False) -> tuple[dict, float]:
    """One step in a child process: its own timing (JSON on stdout) and its peak RSS in MiB (wait4). `children`:
    the peak RSS of the largest process it started and waited for instead (getrusage of its children)."""
    import tempfile

    code = STEP_CODE.format(repo=str(REPO), run=str(run_dir), overrides=list(overrides), step=step)
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=err, cwd=REPO)
        out = proc.stdout.read().decode()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        proc.stdout.close()
        if proc.returncode:
            err.seek(0)
            raise RuntimeError(f"{step} failed ({proc.returncode}): {err.read().decode()[-2000:]}")
    result = json.loads(out.strip().splitlines()[-1])
    if children:
        return result, result.get("children_maxrss_kib", 0) / 1024
    return result, usage.ru_maxrss / 1024


# the one-writer steps, in the order each repeat runs them (deeplake-late last of the writes: the dataset the
# loader is measured on is deeplake's, written again the same way)
ONE_WRITER_STEPS = ("join", "parquet", "parquet-pipeline-pool", "deeplake", "deeplake-late", "deeplake-bare")
SCALE_STEPS = ("parquet-pipeline-pool", "deeplake", "deeplake-bare")


def measure_scale(out: Path, args, factor: int) -> dict | None:
    """The one-writer steps again on `factor` times the videos and shards, with the stage's own commit size
    (`shards_per_commit` default): how the checked write compares with the format alone once a commit holds a
    production-like number of rows. Medians of `args.repeat` runs, steps interleaved."""
    if factor <= 1:
        return None
    run = out / "scale"
    shutil.rmtree(run, ignore_errors=True)
    upstream_from_args(run, args, factor)
    run_step("join", run)
    got: dict[str, list[dict]] = {step: [] for step in SCALE_STEPS}
    for _ in range(args.repeat):
        for path in (run / "dataset", run / "dataset.lastgood", run / "dataset-bare"):
            shutil.rmtree(path, ignore_errors=True)
        for step in SCALE_STEPS:
            got[step].append(run_step(step, run)[0])
    shutil.rmtree(run, ignore_errors=True)
    med = {step: sorted(rs, key=lambda r: r["seconds"])[len(rs) // 2] for step, rs in got.items()}
    return {"factor": factor, "videos": args.videos * factor, "shards": args.shards * factor, "median": med,
            "runs": {step: [r["seconds"] for r in rs] for step, rs in got.items()}}


def _scale_lines(sc: dict) -> list[str]:
    med = sc["median"]
    pool, write, bare = (med[s] for s in SCALE_STEPS)
    rows = pool["rows"]
    return [
        f"## At {sc['factor']}x the rows, the stage's commit size", "",
        f"The same steps on {sc['videos']} videos in {sc['shards']} shards ({rows} rows, {pool['mib']:.0f} MiB),"
        f" with the stage's defaults ({write['commits']} commits): median of {len(sc['runs']['deeplake'])} runs,"
        " steps interleaved.", "",
        "| step | seconds | rows/s | CPU seconds |", "|---|---|---|---|",
        f"| Deep Lake write (checks and probes as above) | {write['seconds']:.2f} | {rows / write['seconds']:.0f} |"
        f" {write['cpu_seconds']:.2f} |",
        f"| the Deep Lake format alone | {bare['seconds']:.2f} | {rows / bare['seconds']:.0f} | "
        f"{bare['cpu_seconds']:.2f} |",
        f"| same rows -> one Parquet file (jemalloc pool, zstd, rows in memory) | {pool['seconds']:.2f} | "
        f"{rows / pool['seconds']:.0f} | {pool['cpu_seconds']:.2f} |", "",
        f"Deep Lake write / Parquet write: {pool['seconds'] / write['seconds']:.2f} wall; the format alone: "
        f"{pool['seconds'] / bare['seconds']:.2f}; the checked write / the format alone: "
        f"{bare['seconds'] / write['seconds']:.2f}.", "",
        "All runs, seconds: " + "; ".join(f"{step} " + ", ".join(f"{x:.2f}" for x in xs)
                                          for step, xs in sc["runs"].items()) + ".", "",
    ]


def add_data_arguments(ap: argparse.ArgumentParser) -> None:
    """The synthetic upstream's size (`make_upstream`), shared with `benchmarks.ingest_slurm_writers`."""
    ap.add_argument("--videos", type=int, default=120)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--fps", type=float, default=1.0)
    ap.add_argument("--d-clip", type=int, default=512)
    ap.add_argument("--d-audio", type=int, default=2048)
    ap.add_argument("--image-size", type=int, default=96)
    ap.add_argument("--repeated-frames", action="store_true",
                    help="8 JPEGs repeated over all frames (the data of runs before 2026-12-05 midday), instead of "
                         "a JPEG of its own per frame")


def upstream_from_args(out: Path, args, factor: int = 1) -> Path:
    """`make_upstream` with the data arguments (`add_data_arguments`), `factor` times the videos and shards."""
    return make_upstream(out, args.videos * factor, args.shards * factor, args.seconds, args.fps, args.d_clip,
                         args.d_audio, args.image_size, no_speech_every=5, distinct_frames=not args.repeated_frames)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_arguments(ap)
    ap.add_argument("--max-rows", type=int, default=4096, help="max_rows_in_memory of the writers")
    ap.add_argument("--small-max-rows", type=int, default=128, help="... of the bounded-memory row")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each writers case (the median is reported)")
    ap.add_argument("--slurm", action=argparse.BooleanOptionalAction, default=True,
                    help="also write the groups as a Slurm array on the local cluster (started if none is up)")
    ap.add_argument("--scale", type=int, default=4,
                    help="also the one-writer steps on this many times the videos and shards (0: not)")
    ap.add_argument("--out", default="/tmp/ingest-bench")
    ap.add_argument("--report", default=str(REPO / "benchmarks" / "results" / "ingest.md"))
    args = ap.parse_args(argv)
    command = " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    upstream_from_args(out, args)
    build_s = time.perf_counter() - t0
    overrides = ("stage.shards_per_commit=2",)
    # each step in its own process, one after the other on the same rows; peak RSS is that process's. The
    # sequence runs `repeat` times from scratch (the join's outputs and the dataset removed) and each step's
    # median run by wall time is reported: this VM's idle runs vary up to 2x.
    steps: dict[str, list[tuple[dict, float]]] = {}
    for k in range(args.repeat):
        for path in (out / "ingest", out / "dataset", out / "dataset.lastgood"):
            shutil.rmtree(path, ignore_errors=True)
        shutil.rmtree(out / "dataset-bare", ignore_errors=True)
        for step in ONE_WRITER_STEPS:
            if step == "deeplake-late":     # the same dataset written again, its probe child started late
                for path in (out / "dataset", out / "dataset.lastgood"):
                    shutil.rmtree(path, ignore_errors=True)
            steps.setdefault(step, []).append(run_step(step, out, *overrides))
    shutil.rmtree(out / "dataset-bare", ignore_errors=True)
    (join, join_rss), (parquet, parquet_rss), (parquet_pool, parquet_pool_rss), (res, write_rss), \
        (late, late_rss), (bare, bare_rss) = (sorted(steps[step], key=lambda r: r[0]["seconds"])[len(steps[step]) // 2]
                                              for step in ONE_WRITER_STEPS)
    spread = {step: [r["seconds"] for r, _ in got] for step, got in steps.items()}
    # the same rows as two shard groups (two datasets), written by one process, then by two at once
    per_group = str(max(1, -(-args.shards // 2)))
    cases = ((1, args.max_rows), (2, args.max_rows), (2, args.small_max_rows))
    runs: dict[tuple[int, int], list[tuple[dict, float]]] = {c: [] for c in cases}
    for k in range(args.repeat):        # the cases interleaved, so that a change of the VM's load hits them alike
        for n, max_rows in cases:
            path = out / f"dataset-w{n}-m{max_rows}-{k}"
            sets = (*overrides, f"stage.dataset_path={path}", f"stage.shards_per_group={per_group}",
                    f"stage.writers={n}", f"stage.max_rows_in_memory={max_rows}")
            runs[(n, max_rows)].append(run_step("writers", out, *sets, children=True))
            if k < args.repeat - 1 or n == 1:
                shutil.rmtree(path, ignore_errors=True)
            else:
                grouped = path          # kept: the readers' open cost is measured on it
    slurm = None
    if args.slurm:      # the same groups as the finish step's Slurm array: 1 task at once, then 2
        from benchmarks.ingest_slurm_writers import measure_slurm_writers
        from pipeline.launchers.local_cluster import LocalClusterError

        try:
            slurm = measure_slurm_writers(out, overrides, shards_per_group=int(per_group), repeat=args.repeat)
        except LocalClusterError as exc:    # the rest of the run is kept; the report says what is missing
            print(f"ingest_bench: the local Slurm cluster did not start, so the Slurm writers are not measured "
                  f"(--no-slurm skips them): {str(exc).splitlines()[0]}", file=sys.stderr)
    scale = measure_scale(out, args, args.scale)
    from pipeline.dataset import open_read_only

    open_read_only(f"file://{grouped}")       # imports and first touch of the files: not the per-group cost
    t1 = time.perf_counter()
    view = open_read_only(f"file://{grouped}")
    open_s = (time.perf_counter() - t1) / max(1, len(view.groups))
    writers = []
    for (n, max_rows), got in runs.items():      # the median run by wall time; peak RSS the highest of all
        w = sorted(got, key=lambda r: r[0]["seconds"])[len(got) // 2][0]
        writers.append((n, max_rows, w, max(rss for _, rss in got)))
    rows, mb = parquet["rows"], parquet["mib"]
    window = res["cpu_seconds"] - res.get("child_cpu_before", 0.0)      # the write's CPU within its wall time
    join_s, parquet_s, write_s = join["seconds"], parquet["seconds"], res["seconds"]
    pool_s = parquet_pool["seconds"]
    from pipeline.stages.ingest import dataset_url

    url = dataset_url(ingest_config(out).stage, out)
    loader = measure_loader(url, rows)
    import multiprocessing

    machine = f"{platform.node()}: {platform.processor() or platform.machine()}, {multiprocessing.cpu_count()} cores, " \
              f"Python {platform.python_version()}, deeplake {__import__('deeplake').__version__}, " \
              f"pyarrow {pa.__version__}, local disk"
    lines = [
        "# Ingest and loader benchmark", "",
        f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Machine: {machine}; load average "
        f"{os.getloadavg()[0]:.1f} at the end of the run (a VM shared with other work: wall times vary with it, "
        f"CPU seconds much less). Command: `python -m benchmarks.ingest_bench {command}`.", "",
        f"Data: {args.videos} videos x {args.seconds:.0f} s, frames at {args.fps} fps ({args.image_size}px JPEG, "
        + ("8 JPEGs repeated over all frames, which zstd shrinks ~20x and real frames never allow" if
           args.repeated_frames else "each frame a JPEG of its own, as incompressible as real frames") + "), "
        f"CLIP {args.d_clip}-d fp16, audio {args.d_audio}-d fp16 -> {rows} rows, {mb:.1f} MiB in Arrow "
        f"(upstream built in {build_s:.1f} s).", "",
        "## Ingest", "",
        "Each step runs in its own process, one after the other on the same rows (same run, side by side); the"
        f" sequence ran {args.repeat} times from scratch and each step shows its median run (all runs below).", "",
        "| step | seconds | rows/s | MiB/s | CPU seconds | rows per CPU second | peak RSS MiB |",
        "|---|---|---|---|---|---|---|",
        f"| join + verify (engine, all shards; the run-level check of each finalized shard included) | {join_s:.2f}"
        f" | {rows / join_s:.0f} | {mb / join_s:.1f} | "
        f"{join['cpu_seconds']:.2f} | {rows / join['cpu_seconds']:.0f} | {join_rss:.0f} |",
        f"| Deep Lake write ({res['commits']} commits, batched appends; kept verdicts used for "
        f"{res.get('verdicts_used', 0)} of {args.shards} shards, dataset check {res['verify_seconds']:.2f} s of it,"
        f" a probe of each new head; the probe child started with the process, as the writer's entry points start"
        f" it, its start-up CPU counted) | {write_s:.2f} | {rows / write_s:.0f} | {mb / write_s:.1f} | "
        f"{res['cpu_seconds']:.2f} | {rows / res['cpu_seconds']:.0f} | {write_rss:.0f} |",
        f"| the same write with its probe child started by the write itself (its start-up inside the time) |"
        f" {late['seconds']:.2f} | {rows / late['seconds']:.0f} | {mb / late['seconds']:.1f} | "
        f"{late['cpu_seconds']:.2f} | {rows / late['cpu_seconds']:.0f} | {late_rss:.0f} |",
        f"| the Deep Lake format alone: the same rows read from the shards, appended and committed ({res['commits']}"
        f" commits), no check, no probe, no last-good save | {bare['seconds']:.2f} | {rows / bare['seconds']:.0f} | "
        f"{mb / bare['seconds']:.1f} | {bare['cpu_seconds']:.2f} | {rows / bare['cpu_seconds']:.0f} | {bare_rss:.0f} |",
        f"| same rows -> one Parquet file (pyarrow defaults: {parquet.get('pool', 'default')} pool; zstd; rows"
        f" already in memory) | {parquet_s:.2f} | {rows / parquet_s:.0f} | {mb / parquet_s:.1f} | "
        f"{parquet['cpu_seconds']:.2f} | {rows / parquet['cpu_seconds']:.0f} | {parquet_rss:.0f} |",
        f"| same rows -> one Parquet file ({parquet_pool.get('pool', '?')} pool, as the pipeline's data processes"
        f" use; zstd; rows already in memory) | {pool_s:.2f} | {rows / pool_s:.0f} | {mb / pool_s:.1f} | "
        f"{parquet_pool['cpu_seconds']:.2f} | {rows / parquet_pool['cpu_seconds']:.0f} | {parquet_pool_rss:.0f} |",
    ] + [
        f"| Deep Lake write as {w['groups']} shard groups, {n} writer{'s' if n > 1 else ''} at once"
        f" (max_rows_in_memory {m}; aggregate) | {w['seconds']:.2f} | {rows / w['seconds']:.0f} | "
        f"{mb / w['seconds']:.1f} | {w['cpu_seconds']:.2f} | {rows / w['cpu_seconds']:.0f} | {rss:.0f} per writer |"
        for n, m, w, rss in writers
    ] + [
        "",
        "Writers: local processes, as the ingest finish step runs them without Slurm (one `python -m"
        " pipeline.dataset <group>` per group, `stage.writers` at a time; the Slurm array is measured below), so each"
        " time includes the writers' start-up (Python + Deep Lake import, a few seconds on a loaded VM). Peak RSS"
        " per writer: the largest process the step waited for (a writer or its probe child). CPU seconds include"
        f" every child. Each writers row: the median of {args.repeat} runs (the cases interleaved). Aggregate"
        " speed-up,"
        f" 2 writers vs 1: {writers[0][2]['seconds'] / writers[1][2]['seconds']:.2f}x wall"
        f" (this VM has {os.cpu_count()} cores, shared).", "",
        f"Deep Lake write / Parquet write, rows/s (goal >= 0.5): {parquet_s / write_s:.2f} wall and "
        f"{parquet['cpu_seconds'] / res['cpu_seconds']:.2f} CPU against pyarrow's defaults; {pool_s / write_s:.2f} "
        f"wall and {parquet_pool['cpu_seconds'] / res['cpu_seconds']:.2f} CPU against Parquet with the pipeline's "
        f"pool; with the probe child started by the write: {pool_s / late['seconds']:.2f} wall against the"
        f" pipeline's pool. The Deep Lake format alone: {pool_s / bare['seconds']:.2f} wall against the same. Join +"
        " verify: "
        f"{rows / join_s:.0f} rows/s wall, {rows / join['cpu_seconds']:.0f} rows per CPU "
        "second (goal >= 1,000).", "",
        f"CPU floor: the Deep Lake write used {res['cpu_seconds']:.2f} CPU s ({res['cpu_own_seconds']:.2f} in the"
        f" writer, {res['cpu_seconds'] - res['cpu_own_seconds']:.2f} in its probe child: Python and Deep Lake"
        f" start-up, {res.get('child_cpu_before', 0.0):.2f} s of it before the write began, then every probe and"
        f" row check), on this VM's {os.cpu_count()} cores, so its wall time cannot go below"
        f" {window / os.cpu_count():.2f} s here: {pool_s / (window / os.cpu_count()):.2f} of the Parquet write"
        " with the pipeline's pool at best, with every core busy all the time.", "",
        "All runs, seconds: " + "; ".join(f"{step} " + ", ".join(f"{x:.2f}" for x in xs)
                                          for step, xs in spread.items()) + ".", "",
    ] + (_scale_lines(scale) if scale else []) + (_slurm_lines(slurm, args) if slurm else
         ["## Many writers as a Slurm array (local cluster)", "", "Not measured in this run (`--no-slurm`, or the"
          " local cluster did not start).", ""]) + [
        "## Loader (one epoch of the train split, batch 32)", "",
        "File opens per sample come from `strace -f -c` (openat of the whole process, minus the opens of a process"
        " that only imports and opens the dataset).", "",
        "| read pattern | samples | samples/s | opens/sample | read syscalls/sample |", "|---|---|---|---|---|",
    ]
    for name, r in loader.items():
        fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
        lines.append(f"| {name} | {r['samples']} | {r['samples_per_s']:.0f} | {fmt(r['opens_per_sample'])} | "
                     f"{fmt(r['reads_per_sample'])} |")
    lines += ["", "Shuffled epoch = blocks of 64 contiguous rows read with column slices, in a random block order,"
              " mixed in a 1,024-row in-memory shuffle buffer (`pipeline/loader.py`); sequential = blocks of 256"
              " in order, no buffer. Naive = `ds[i]` per row in random order (500 rows).", "",
              "Notes: the join step runs inside the engine (upstream Parquet read by key, Arrow parts flushed"
              " every `flush_every` videos, the packed Parquet output at the finalize, then the run-level check of"
              f" the shard); its CPU time is {join['cpu_seconds'] / join_s:.0%} of its wall time. Rows average "
              f"{mb * 2**20 / max(rows, 1) / 1024:.0f} KiB (JPEGs + 2048-d audio + CLIP).", ""] + NOTES + [""] + \
        limit_notes(rows / write_s, rows / res["cpu_seconds"], mb * 2**10 / max(rows, 1),
                    max(rss for *_, rss in writers), open_s)
    Path(args.report).parent.mkdir(parents=True, exist_ok=True)
    Path(args.report).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
