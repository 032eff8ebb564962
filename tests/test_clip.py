"""clip stage with the tiny open_clip model on frames decoded from a real video (Ray runner)."""
from __future__ import annotations

import io
from pathlib import Path

import av
import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from pipeline.models.clip import TINY_CONFIG
from pipeline.stages.base import RunContext, WorkItem
from pipeline.stages.clip import ClipConfig, ClipStage


pytestmark = pytest.mark.usefixtures("ray_session")  # one Ray for the module (conftest)


def _frame_rows(video_id: str, path, every: int, limit: int) -> list[dict]:
    """Frame rows as the frames stage writes them: video_id, frame_idx, pts, jpeg, width, height."""
    rows = []
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        for n, frame in enumerate(container.decode(stream)):
            if n % every:
                continue
            img = frame.to_image()
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=85)
            rows.append({"video_id": video_id, "frame_idx": len(rows), "pts": float(frame.time),
                         "jpeg": buf.getvalue(), "width": img.width, "height": img.height})
            if len(rows) == limit:
                break
    return rows


@pytest.fixture(scope="module")
def items(shared_media) -> list[WorkItem]:
    frames = {"counter": _frame_rows("counter", shared_media / "counter.mp4", every=3, limit=10),
              "fades": _frame_rows("fades", shared_media / "fades.mp4", every=25, limit=8)}
    bad = [dict(frames["fades"][0], video_id="broken", jpeg=b"not a jpeg")]
    inputs = {**frames, "broken": bad, "empty": []}
    return [WorkItem(vid, "", i, inputs={"frames": {"frames": rows}}) for i, (vid, rows) in enumerate(inputs.items())]


def _run(items, cache_dir, tmp_path, **cfg_kw):
    ctx = RunContext(run_dir=tmp_path, shard=0, models="tiny", cache_dir=cache_dir, device="cpu")
    stage = ClipStage(ClipConfig(**cfg_kw), ctx)
    return {r.video_id: r for r in stage.process(items)}, stage


@pytest.fixture(scope="module")
def ray_results(items, cache_dir, tmp_path_factory):
    results, stage = _run(items, cache_dir, tmp_path_factory.mktemp("clip-run"), patch_tokens=True)
    return results, stage.shard_stats()


def test_one_float16_embedding_per_frame(items, ray_results):
    results, stats = ray_results
    dim = TINY_CONFIG["embed_dim"]
    for item in items[:2]:
        res = results[item.video_id]
        assert res.status == "ok"
        table = pa.Table.from_pylist(res.rows["clip"], schema=ClipStage.schemas["clip"])
        assert table.column("frame_idx").to_pylist() == [r["frame_idx"] for r in item.rows("frames", "frames")]
        assert table.column("pts").to_pylist() == [r["pts"] for r in item.rows("frames", "frames")]
        assert table.schema.field("embedding").type.value_type == pa.float16()
        emb = np.array(table.column("embedding").to_pylist(), dtype=np.float32)
        assert emb.shape == (len(item.rows("frames", "frames")), dim)
        assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-2)   # normalised
        assert not np.allclose(emb[0], emb[-1])                              # different frames differ
        assert set(table.column("model").to_pylist()) == {"vpt-tiny-clip/vpt-tiny-clip.pt"}
    assert results["broken"].status == "failed" and results["broken"].reason.startswith("corrupt:")
    assert results["empty"].status == "ok" and results["empty"].note == "no_frames"
    assert stats["runner_ok"] == 3 and stats["runner_failed"] == 1 and stats["model_busy_s"] > 0


def test_patch_tokens(ray_results):
    rows = ray_results[0]["counter"].rows["clip"]
    grid = (TINY_CONFIG["vision_cfg"]["image_size"] // TINY_CONFIG["vision_cfg"]["patch_size"]) ** 2
    assert rows[0]["patch_shape"] == [grid, TINY_CONFIG["vision_cfg"]["width"]]
    assert len(rows[0]["patch_tokens"]) == grid * TINY_CONFIG["vision_cfg"]["width"]


def test_inline_backend_gives_the_same_embeddings(items, ray_results, cache_dir, tmp_path):
    runner = ClipConfig().runner
    runner.backend = "inline"
    inline, _ = _run(items[:1], cache_dir, tmp_path, runner=runner)
    # same weights and preprocessing in-process and in Ray actors -> same embeddings (float16 rounding aside)
    a = np.array([r["embedding"] for r in inline["counter"].rows["clip"]], dtype=np.float32)
    b = np.array([r["embedding"] for r in ray_results[0]["counter"].rows["clip"]], dtype=np.float32)
    assert a.shape == b.shape and np.allclose(a, b, atol=2e-3)


def test_preprocessing_keeps_aspect(cache_dir):
    """A wide image is resized on its short side and center-cropped, never squashed."""
    from pipeline.models.clip import build_tiny_clip, image_transform

    weights = build_tiny_clip(cache_dir / "tiny" / "clip")
    size = TINY_CONFIG["vision_cfg"]["image_size"]
    img = np.zeros((100, 400, 3), np.uint8)
    img[:, :120] = 255            # a white band on the left that a center crop cuts away entirely
    x = image_transform("vpt-tiny-clip", str(weights))(Image.fromarray(img))
    assert tuple(x.shape) == (3, size, size)
    assert float(x.std(dim=(1, 2)).max()) < 1e-3  # uniformly black: cropped, not squashed (squashing would keep the band)


def test_clip_through_the_cli_on_frames_stage_output(shared_media, cache_dir, tmp_path):
    """download -> frames -> clip with the real CLI; a rerun does nothing."""
    import pyarrow.parquet as pq
    from conftest import run_cli

    manifest = tmp_path / "manifest.txt"
    manifest.write_text(f"counter {shared_media / 'counter.mp4'}\nfades {shared_media / 'fades.mp4'}\n")
    run_dir = tmp_path / "run"
    env = {"VPT_CACHE_DIR": str(cache_dir)}
    run_cli("stage=download", "launcher=local", f"run_dir={run_dir}", f"input={manifest}", "models=tiny", env=env)
    run_cli("stage=frames", "launcher=local", f"run_dir={run_dir}", "models=tiny", env=env)
    run_cli("stage=clip", "launcher=local", f"run_dir={run_dir}", "models=tiny", env=env)
    shard = run_dir / "clip" / "shard-00000"
    frames = pq.read_table(run_dir / "frames" / "shard-00000" / "frames.parquet")
    clip = pq.read_table(shard / "clip.parquet")
    assert sorted(zip(clip.column("video_id").to_pylist(), clip.column("frame_idx").to_pylist())) == \
        sorted(zip(frames.column("video_id").to_pylist(), frames.column("frame_idx").to_pylist()))
    assert clip.schema.field("embedding").type.value_type == pa.float16()
    assert {len(e) for e in clip.column("embedding").to_pylist()} == {TINY_CONFIG["embed_dim"]}
    before = (shard / "_SUCCESS").stat().st_mtime_ns
    run_cli("stage=clip", "launcher=local", f"run_dir={run_dir}", "models=tiny", env=env)
    assert (shard / "_SUCCESS").stat().st_mtime_ns == before


def _sorted_clip_rows(table: pa.Table) -> list[dict]:
    return table.sort_by([("video_id", "ascending"), ("frame_idx", "ascending")]).to_pylist()


def _uninterrupted_clip_rows(run_dir, cache_dir, tmp_path, runner) -> list[dict]:
    """The clip table of one uninterrupted in-process run over the frames stage's output of `run_dir`."""
    import pyarrow.parquet as pq

    frames = pq.read_table(run_dir / "frames" / "shard-00000" / "frames.parquet").to_pylist()
    by_video: dict[str, list[dict]] = {}
    for row in frames:
        by_video.setdefault(row["video_id"], []).append(row)
    items = [WorkItem(vid, "", i, inputs={"frames": {"frames": rows}})
             for i, (vid, rows) in enumerate(sorted(by_video.items()))]
    results, _ = _run(items, cache_dir, tmp_path, runner=runner)
    assert all(r.status == "ok" for r in results.values())
    rows = [row for r in results.values() for row in r.rows["clip"]]
    return _sorted_clip_rows(pa.Table.from_pylist(rows, schema=ClipStage.schemas["clip"]))


def _kill_worker_once_parts_exist(proc, parts, deadline_s: float = 300) -> None:
    """SIGKILL the launcher's pool worker (the process running the shard) once a first part is complete, then
    make sure nothing it started outlives it (Ray's processes normally go down with it)."""
    import os
    import signal
    import time

    import psutil

    deadline = time.time() + deadline_s
    while time.time() < deadline and not list(parts.glob("*.ledger.parquet")) and proc.poll() is None:
        time.sleep(0.02)
    assert proc.poll() is None, "the clip run ended before any part was written"
    launcher = psutil.Process(proc.pid)
    tree = launcher.children(recursive=True)
    workers = [c for c in launcher.children() if "spawn_main" in " ".join(c.cmdline())]
    assert workers, "no pool worker found"
    for w in workers:
        os.kill(w.pid, signal.SIGKILL)
    proc.wait(timeout=120)
    _, alive = psutil.wait_procs(tree, timeout=15)
    for p in alive:  # Ray's agents can outlive the killed worker for a while: this test's, so ended here
        p.kill()


@pytest.mark.slow
def test_clip_killed_mid_shard_resumes_from_its_parts(shared_media, cache_dir, tmp_path):
    """A clip worker SIGKILLed partway through its shard (flush_every=1) keeps its complete parts: the re-run
    embeds only the items no part holds, and the clip table equals an uninterrupted run's, without duplicates."""
    import json
    import os
    import shutil
    import subprocess
    import sys

    import pyarrow.parquet as pq
    from conftest import REPO, run_cli

    from pipeline.inference.runner import RunnerConfig

    media = ["counter.mp4", "fades.mp4", "delayed_start.mp4"]
    n = 9
    manifest = tmp_path / "manifest.txt"
    # one file per id: the manifest keeps the same media given twice only once
    copies = tmp_path / "media"
    copies.mkdir()
    for i in range(n):
        shutil.copy(shared_media / media[i % 3], copies / f"v{i}{Path(media[i % 3]).suffix}")
    manifest.write_text("".join(f"v{i} {copies / f'v{i}.mp4'}\n" for i in range(n)))
    env = {"VPT_CACHE_DIR": str(cache_dir)}
    base = tmp_path / "base"
    run_cli("stage=download", "launcher=local", f"run_dir={base}", f"input={manifest}", "models=tiny", env=env)
    # 10 frames/s on these low-cut videos (20-100 frames each) and one item at a time through the runner:
    # each item takes long enough that the kill lands between the first part and the last
    run_cli("stage=frames", "launcher=local", f"run_dir={base}", "models=tiny", "stage.fallback_fps=10", env=env)
    args = ["stage=clip", "launcher=local", "models=tiny", "stage.flush_every=1", "stage.runner.batch_size=1",
            "stage.runner.max_in_flight=1"]
    killed = tmp_path / "killed"
    shutil.copytree(base, killed)

    shard = killed / "clip" / "shard-00000"
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", *args, f"run_dir={killed}"], cwd=REPO,
                            env={**os.environ, **env},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _kill_worker_once_parts_exist(proc, shard / "parts")
    assert proc.returncode != 0
    assert not (shard / "_SUCCESS").exists()
    part_ledgers = sorted((shard / "parts").glob("*.ledger.parquet"))
    done_before = {r["video_id"] for p in part_ledgers for r in pq.read_table(p).to_pylist()}
    assert 1 <= len(done_before) < n, f"{len(done_before)} of {n} items done at the kill: not mid-shard"

    run_cli(*args, f"run_dir={killed}", env=env)
    stats = json.loads((shard / "stats.json").read_text())
    assert stats["processed"] == n - len(done_before)   # the parts were reused, not redone
    assert stats["items"] == n and stats["ok"] == n

    # the uninterrupted run: in-process (inline backend, same batches), which gives the Ray run's embeddings
    # up to float16 rounding (test_inline_backend_gives_the_same_embeddings)
    (tmp_path / "reference").mkdir()
    want = _uninterrupted_clip_rows(base, cache_dir, tmp_path / "reference",
                                    RunnerConfig(batch_size=1, max_in_flight=1, backend="inline"))
    got = _sorted_clip_rows(pq.read_table(shard / "clip.parquet"))
    keys = [(r["video_id"], r["frame_idx"]) for r in got]
    assert len(set(keys)) == len(keys)                  # no duplicates from parts and re-run together
    assert keys == [(r["video_id"], r["frame_idx"]) for r in want]
    assert {r["video_id"] for r in got} == {f"v{i}" for i in range(n)}
    for a, b in zip(got, want):
        assert a["pts"] == b["pts"] and a["model"] == b["model"]
    emb_got = np.array([r["embedding"] for r in got], dtype=np.float32)
    emb_want = np.array([r["embedding"] for r in want], dtype=np.float32)
    assert emb_got.shape == emb_want.shape and np.allclose(emb_got, emb_want, atol=2e-3)
    ledger = {r["video_id"]: r["status"] for r in pq.read_table(shard / "ledger.parquet").to_pylist()}
    assert ledger == {f"v{i}": "ok" for i in range(n)}
