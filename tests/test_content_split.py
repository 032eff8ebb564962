"""Splits by content identity: the download stage's content_id (sha256 of the file, or a site's own video id)
reaches the dataset through the real join + ingest, the loader keeps every video of one content in one split,
`status` lists the duplicates, and datasets without the column still load (split by video id)."""
from __future__ import annotations

import hashlib
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import run_cli

from benchmarks.ingest_bench import ingest_config, make_upstream, run_ingest_shards
from pipeline.loader import DeepLakeSource, LoaderConfig, split_of
from pipeline.schema import TABLE
from pipeline.shards import ShardStore, concat_tables
from pipeline.stages.download import content_id
from pipeline.stages.ingest import write_dataset

FRACTIONS = (0.5, 0.3, 0.2)


def sha256(path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def test_download_records_content_ids_and_status_lists_duplicates(tmp_path, shared_media, media_server):
    """The same file as a path, a copy under another name and over HTTP is one content (sha256 of its bytes,
    computed here with hashlib as the oracle); another file is another content. (The same path twice, or as a
    file:// URL, the manifest itself keeps once.)"""
    counter, fades = shared_media / "counter.mp4", shared_media / "fades.mp4"
    copy = tmp_path / "renamed-copy.mp4"
    shutil.copyfile(counter, copy)
    manifest = tmp_path / "m.txt"
    manifest.write_text("\n".join([f"a {counter}", f"c {copy}",
                                   f"d {media_server.url('v0.mp4')}",      # v0.mp4 is a copy of counter.mp4
                                   f"e {fades}", f"f {media_server.url('v1.mp4')}",   # v1.mp4: fades.mp4
                                   f"g {shared_media / 'delayed_start.mp4'}"]) + "\n")
    run = tmp_path / "run"
    run_cli("stage=download", f"run_dir={run}", f"input={manifest}", "num_shards=2", "stage.retries=0")
    videos = concat_tables(pq.read_table(p) for p in sorted(run.glob("download/shard-*/videos.parquet")))
    got = dict(zip(videos["video_id"].to_pylist(), videos["content_id"].to_pylist()))
    assert got == {"a": sha256(counter), "c": sha256(counter), "d": sha256(counter),
                   "e": sha256(fades), "f": sha256(fades), "g": sha256(shared_media / "delayed_start.mp4")}
    status = run_cli("status", f"run_dir={run}").stdout
    line = next(x for x in status.splitlines() if x.startswith("duplicate content"))
    assert "5 videos are 2 contents" in line
    assert f"{sha256(counter)} = a, c, d" in line and f"{sha256(fades)} = e, f" in line


def test_a_site_video_is_identified_by_the_extractors_id_whatever_the_url(tmp_path):
    """yt-dlp's YouTube extractor (offline: its URL pattern) gives every URL form of one video one id, and
    the content id is that id, not the bytes (which depend on the format chosen)."""
    from yt_dlp.extractor.youtube import YoutubeIE

    urls = ["https://www.youtube.com/watch?v=dQw4w9WgXcQ&t=42s", "https://youtu.be/dQw4w9WgXcQ",
            "https://www.youtube.com/shorts/dQw4w9WgXcQ", "https://m.youtube.com/watch?feature=share&v=dQw4w9WgXcQ"]
    ids = {YoutubeIE.get_temp_id(u) for u in urls}
    assert ids == {"dQw4w9WgXcQ"}
    one, two = tmp_path / "a.mp4", tmp_path / "b.mp4"
    one.write_bytes(b"360p bytes")
    two.write_bytes(b"other format")
    assert content_id(one, {"extractor_key": "Youtube", "id": ids.pop()}) == \
        content_id(two, {"extractor_key": "Youtube", "id": "dQw4w9WgXcQ"}) == "youtube:dQw4w9WgXcQ"
    assert content_id(one, {"extractor_key": "Generic", "id": "a"}) == sha256(one)


@pytest.fixture(scope="module")
def duplicated(tmp_path_factory):
    """A run whose download stage says videos 2k and 2k+1 are the same content; ingested for real."""
    run = make_upstream(tmp_path_factory.mktemp("content") / "run", n_videos=12, num_shards=2, seed=5)
    for shard in range(2):
        path = ShardStore(run, "download", shard).table_path("videos")
        table = pq.read_table(path)
        contents = [f"sha256:{int(v[3:]) // 2:064x}" for v in table["video_id"].to_pylist()]
        pq.write_table(table.append_column("content_id", pa.array(contents, pa.string())), path)
    cfg = ingest_config(run)
    run_ingest_shards(cfg)
    url = write_dataset(cfg, log=lambda s: None)["dataset"]
    rows = concat_tables(ShardStore(run, "ingest", s).read_table(TABLE) for s in range(2)).to_pylist()
    return url, rows


def test_videos_of_one_content_land_in_one_split(duplicated):
    url, rows = duplicated
    content = {r["video_id"]: r["content_id"] for r in rows}
    assert content["vid0004"] == content["vid0005"] != content["vid0006"]          # carried by join + ingest
    # by video id alone some pairs would be split apart: the grouping is what keeps them together
    pairs = {c: sorted(v for v in content if content[v] == c) for c in set(content.values())}
    assert any(len({split_of(v, FRACTIONS) for v in vs}) > 1 for vs in pairs.values())
    seen: dict[str, set[str]] = {}
    keys = []
    for split in ("train", "val", "test"):
        src = DeepLakeSource(url, LoaderConfig(batch_size=5, split_fractions=FRACTIONS, shuffle=False), split)
        for b in src.batches(0):
            for v, i, m in zip(b["video_id"], b["segment_idx"].tolist(), b["sample_mask"].tolist()):
                if m:
                    seen.setdefault(content[v], set()).add(split)
                    keys.append((v, i))
        for v in {r["video_id"] for r in rows}:     # oracle: the split of the content id's hash
            if split_of(content[v], FRACTIONS) == split:
                assert v in {k[0] for k in keys}
    assert all(len(s) == 1 for s in seen.values()) and len(seen) == 6
    assert sorted(keys) == sorted((r["video_id"], r["segment_idx"]) for r in rows)


def test_a_dataset_without_content_ids_splits_by_video_id(tmp_path, duplicated):
    """Rows of a dataset made before the column existed (no column) split as before, by video id."""
    import deeplake

    from pipeline.schema import ROW_SCHEMA, deeplake_columns, to_deeplake_columns

    _, rows = duplicated
    url = f"file://{tmp_path / 'old'}"
    ds = deeplake.create(url)
    for name, dtype in deeplake_columns().items():
        if name != "content_id":
            ds.add_column(name, dtype)
    table = pa.Table.from_pylist(rows, schema=ROW_SCHEMA)
    ds.append({k: v for k, v in to_deeplake_columns(table).items() if k != "content_id"})
    ds.commit("a dataset of the old schema")
    for split in ("train", "val", "test"):
        src = DeepLakeSource(url, LoaderConfig(batch_size=64, split_fractions=FRACTIONS), split)
        got = {v for b in src.batches(0) for v, m in zip(b["video_id"], b["sample_mask"].tolist()) if m}
        assert got == {r["video_id"] for r in rows if split_of(r["video_id"], FRACTIONS) == split}
