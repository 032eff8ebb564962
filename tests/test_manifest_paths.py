"""Manifest lines that are paths with spaces, non-ASCII or '#', ids of non-ASCII names, the same media twice."""
from __future__ import annotations

import shutil
from pathlib import Path
from urllib.parse import quote

import pyarrow.parquet as pq
import pytest
from conftest import run_cli

from pipeline.errors import ConfigError
from pipeline.manifest import SAFE_ID, item_from_entry, read_manifest


def _touch(path: Path) -> Path:
    path.write_bytes(b"not read here")
    return path


def test_a_line_that_is_an_existing_file_is_a_path(tmp_path, monkeypatch):
    odd = _touch(tmp_path / "vidéo 测试 #1.mp4")
    monkeypatch.chdir(tmp_path)
    _touch(tmp_path / "#2 clip.mp4")              # relative, starts with '#': a file, not a comment
    m = tmp_path / "m.txt"
    m.write_text(f"{odd}\n#2 clip.mp4\n# a comment\nmyid {odd.parent / 'x y.mp4'}\n".replace(
        "x y.mp4", "vidéo 测试 #1.mp4"), encoding="utf-8")
    items = read_manifest(m, warn=lambda msg: None)
    urls = [i.url for i in items]
    assert urls == [str(odd), "#2 clip.mp4"]  # the `myid <same file>` line is the same media: kept once
    assert all(not SAFE_ID.search(i.video_id) for i in items)
    assert items[0].video_id.startswith("vid_o_") and items[1].video_id.startswith("2_clip-")


def test_a_line_with_spaces_that_is_no_file_is_refused_with_what_it_is(tmp_path):
    m = tmp_path / "m.txt"
    m.write_text(f"{tmp_path / 'missing file.mp4'}\n")
    with pytest.raises(ConfigError, match=r"line 1 of .*neither an existing file nor `video_id url`"):
        read_manifest(m)


def test_non_ascii_names_keep_distinct_ids(tmp_path):
    a, b = _touch(tmp_path / "vidéo.mp4"), _touch(tmp_path / "vidèo.mp4")
    c = _touch(tmp_path / "vid_o.mp4")  # the plain ASCII name the two used to collapse into
    m = tmp_path / "m.txt"
    m.write_text(f"{a}\n{b}\n{c}\n", encoding="utf-8")
    items = read_manifest(m)
    ids = [i.video_id for i in items]
    assert len(set(ids)) == 3 and ids[2] == "vid_o"
    assert ids[0].startswith("vid_o-") and ids[1].startswith("vid_o-")
    assert [i.video_id for i in read_manifest(m)] == ids  # stable


@pytest.mark.parametrize("second", ["same path", "file url", "same url", "youtube"])
def test_the_same_media_twice_is_reported_and_kept_once(tmp_path, second):
    f = _touch(tmp_path / "vidéo 1.mp4")
    first_line = {"same path": str(f), "file url": str(f), "same url": "http://host/v/a.mp4",
                  "youtube": "dQw4w9WgXcQ"}[second]
    second_line = {"same path": str(f), "file url": "file://" + quote(str(f)),
                   "same url": "http://host/v/a.mp4", "youtube": "https://youtu.be/dQw4w9WgXcQ"}[second]
    m = tmp_path / "m.txt"
    m.write_text(f"{first_line}\nhttp://host/v/other.mp4\n{second_line}\n", encoding="utf-8")
    warnings: list[str] = []
    items = read_manifest(m, warn=warnings.append)
    assert len(items) == 2 and items[0].url == item_from_entry(first_line)[1]
    assert len(warnings) == 1 and "line 3" in warnings[0] and "line 1" in warnings[0]
    assert repr(second_line) in warnings[0] and repr(first_line) in warnings[0]


def test_same_id_for_different_media_is_still_refused(tmp_path):
    (tmp_path / "d1").mkdir()
    (tmp_path / "d2").mkdir()
    m = tmp_path / "m.txt"
    m.write_text(f"{_touch(tmp_path / 'd1' / 'a.mp4')}\n{_touch(tmp_path / 'd2' / 'a.mp4')}\n")
    with pytest.raises(ConfigError, match=r"'a' appears twice .*line 1 and line 2"):
        read_manifest(m)


def test_odd_names_through_the_download_stage(tmp_path, shared_media):
    """End to end: the real download stage takes the odd paths in place, one row per distinct file."""
    names = ["vidéo 测试 #1.mp4", "vidéo.mp4", "vidèo.mp4"]
    for n in names:
        shutil.copy(shared_media / "counter.mp4", tmp_path / n)
    m = tmp_path / "m.txt"
    m.write_text("\n".join([str(tmp_path / n) for n in names] + ["file://" + quote(str(tmp_path / names[1]))])
                 + "\n", encoding="utf-8")
    run = tmp_path / "run"
    proc = run_cli("stage=download", f"run_dir={run}", f"input={m}", "num_shards=1", timeout=300)
    assert "same media as line 2" in proc.stderr
    ledger = pq.read_table(run / "download" / "shard-00000" / "ledger.parquet").to_pylist()
    assert len(ledger) == 3 and all(r["status"] == "ok" for r in ledger), ledger
    videos = pq.read_table(run / "download" / "shard-00000" / "videos.parquet").to_pylist()
    assert sorted(Path(v["path"]).name for v in videos) == sorted(names)
