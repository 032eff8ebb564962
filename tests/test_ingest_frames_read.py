"""Reading the `frames` column (Sequence(Image(jpg))) of a dataset ingest wrote, in fresh processes.

Deep Lake 4.7.4 segfaults, in about half of fresh processes, slicing a Sequence(Image) column
(`ds["frames"][a:b]`) of a dataset whose every row reads fine by index or by a list of rows. The readers (the
kill soak's dataset digest, the grouped view's slices, the health probe) read such columns by row lists; the probe
reads every column of the rows a commit added, so a head whose new frames cannot be read is not tagged.
"""
from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FRESH_PROCESSES = 6     # with a slice, all six survive in well under 1% of tries

# Ground truth, independent of the code under test: row i holds 1 + i % 3 JPEGs of a flat colour.
MAKE = r"""
import io, os, sys
import deeplake, numpy as np
from PIL import Image

url, rows, first = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])

def jpg(v):
    b = io.BytesIO()
    Image.fromarray(np.full((16, 16, 3), v, np.uint8)).save(b, "JPEG")
    return b.getvalue()

if first == 0:
    ds = deeplake.create(url)
    ds.add_column("frames", deeplake.types.Sequence(deeplake.types.Image(sample_compression="jpg")))
    ds.add_column("row", "int64")
else:
    ds = deeplake.open(url)
ds.append({"frames": [[jpg(10 * i + k) for k in range(1 + i % 3)] for i in range(first, first + rows)],
           "row": list(range(first, first + rows))})
ds.commit(f"rows {first}..{first + rows - 1}")
os._exit(0)
"""


def _append(url: str, rows: int, first: int) -> None:
    subprocess.run([sys.executable, "-c", MAKE, url, str(rows), str(first)], check=True, timeout=120)


@pytest.fixture(scope="module")
def frames_dataset(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("frames") / "dataset"
    _append(str(path), 6, 0)
    return path


def test_soak_digest_reads_frames_in_every_fresh_process(frames_dataset):
    """The soak's digest read `ds[c][:]` for every column: about half its reads of a good dataset segfaulted on
    `frames`, which the soak reported as a dataset that differs from the reference."""
    code = ("import os, sys; from pathlib import Path; from benchmarks.kill_soak import _dataset_digest_here; "
            "print(_dataset_digest_here(Path(sys.argv[1])), flush=True); os._exit(0)")
    digests = []
    for _ in range(FRESH_PROCESSES):
        proc = subprocess.run([sys.executable, "-c", code, str(frames_dataset)], cwd=REPO, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        digests.append(proc.stdout.strip().splitlines()[-1])
    assert len(set(digests)) == 1 and len(digests[0]) == 40


def test_grouped_slices_of_frames_read_by_rows(frames_dataset):
    """A view's slice of `frames` (as `GroupedView` reads a group) gives every JPEG of every row, in fresh
    processes: 1 + i % 3 images of colour 10 i + k in row i."""
    code = ("import os, sys, deeplake; from pipeline.dataset.view import _slice; "
            "ds = deeplake.open_read_only(sys.argv[1]); "
            "v = _slice(ds, 'frames', 1, 6); "
            "print([[int(img.mean().round()) for img in row] for row in v], flush=True); os._exit(0)")
    want = [[10 * i + k for k in range(1 + i % 3)] for i in range(1, 6)]
    for _ in range(FRESH_PROCESSES):
        proc = subprocess.run([sys.executable, "-c", code, str(frames_dataset)], cwd=REPO, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        got = eval(proc.stdout.strip().splitlines()[-1])      # noqa: S307 - a list of lists of ints we printed
        # JPEG is lossy: a flat colour comes back within a step or two
        assert [len(r) for r in got] == [len(r) for r in want]
        assert all(abs(g - w) <= 2 for gr, wr in zip(got, want) for g, w in zip(gr, wr)), got


def test_probe_reads_every_row_of_every_column_a_commit_added(tmp_path):
    """A commit whose new frames cannot be read (its new chunks overwritten) fails the probe of the rows it
    added, while the head before it probes fine; a good head probes fine from any row."""
    from pipeline import dataset_health as health

    path = tmp_path / "dataset"
    url = f"file://{path}"
    _append(str(path), 3, 0)
    assert health.probe(url, 0).ok
    before = {p: p.stat().st_size for p in path.rglob("*") if p.is_file()}
    _append(str(path), 3, 3)
    good = health.probe(url, 3)
    assert good.ok and good.info["rows"] == 6, good.problem
    new_chunks = [p for p in path.rglob("*") if p.is_file() and p not in before and "_deeplake_log" not in p.parts]
    assert new_chunks
    for p in new_chunks:        # the data of the commit garbled, its version log intact
        p.write_bytes(bytes((7 * i + 13) % 256 for i in range(p.stat().st_size)))
    bad = health.probe(url, 3)
    assert not bad.ok and bad.problem


def test_a_tag_probe_reads_the_heads_info_and_a_lost_tag_is_a_failed_write(tmp_path):
    """After a tag (no rows changed) the probe only opens the head and reads its info. A good tag is saved with
    the last good version; a tag whose record the write left garbled (what a full disk leaves: the head then
    reads fine, without the tag) is a failed write, and the last good version stays the one before it."""
    import deeplake

    from pipeline import dataset_health as health

    path = tmp_path / "dataset"
    url = f"file://{path}"
    _append(str(path), 3, 0)
    log = path / "_deeplake_log"
    ds = health.held(deeplake.open(url))
    health.write_checked(url, lambda: ds.commit("rows"), "a commit", from_row=0)
    expect = {name: (lambda info, name=name: None if name in info.get("tags", {}) else "no tag")
              for name in ("t1", "t2")}
    health.write_checked(url, lambda: ds.tag("t1"), "tag t1", from_row=health.INFO_ONLY, expect=expect["t1"])
    saved = health.saved_state(path)
    assert saved is not None and saved["tags"] == {"t1": ds.version}, saved
    probe = health.probe(url, health.INFO_ONLY)
    assert probe.ok and probe.info["tags"] == {"t1": ds.version} and probe.info["rows"] == 3, probe

    def tag_then_garble():
        before = {p: p.stat().st_size for p in log.rglob("*.jsonl")}
        ds.tag("t2")
        written = [p for p in log.rglob("*.jsonl") if before.get(p) != p.stat().st_size]
        assert written
        for p in written:
            p.write_bytes(b"\x00" * p.stat().st_size)

    with pytest.raises(health.DatasetWriteError, match="tag t2 failed .*no tag.* reads fine"):
        health.write_checked(url, tag_then_garble, "tag t2", from_row=health.INFO_ONLY, expect=expect["t2"])
    assert health.saved_state(path)["tags"] == {"t1": saved["tags"]["t1"]}
