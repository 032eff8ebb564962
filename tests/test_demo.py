"""The demo's HTTP server: a re-run serves on the port the pinned manifest names, so an interrupted download
resumes instead of failing the videos it had not fetched yet."""
from __future__ import annotations

import urllib.request
from pathlib import Path

import pytest

from pipeline.demo import serve, start_server
from pipeline.errors import ConfigError
from pipeline.manifest import load_items, pin_geometry, plan_geometry


def _samples(tmp_path: Path) -> list[Path]:
    paths = [tmp_path / "run" / "samples" / f"sample_{i}.mp4" for i in range(3)]
    for i, p in enumerate(paths):
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(f"video {i}".encode())
    return paths


def _pin(run: Path) -> None:
    """What the download stage's first launch does before it fetches anything."""
    geo, items, _ = plan_geometry(run, str(run / "videos.txt"), None, 64)
    pin_geometry(run, geo, items)


def _stop(httpd) -> None:
    httpd.shutdown()
    httpd.server_close()


def test_rerun_serves_the_pinned_urls(tmp_path):
    paths = _samples(tmp_path)
    run = tmp_path / "run"
    httpd, pinned = start_server(run, run / "samples", paths)
    assert not pinned
    manifest = (run / "videos.txt").read_text()
    _pin(run)
    _stop(httpd)  # the first run is interrupted before its download finished

    httpd, pinned = start_server(run, run / "samples", paths)
    try:
        assert pinned and (run / "videos.txt").read_text() == manifest
        urls = [i.url for i in load_items(run) if i.url.startswith("http") and i.video_id != "missing_video"]
        assert urls
        for url in urls:
            with urllib.request.urlopen(url, timeout=10) as resp:
                assert resp.read() == (run / "samples" / url.rsplit("/", 1)[1]).read_bytes()
    finally:
        _stop(httpd)


def test_pinned_port_taken_is_a_clear_error(tmp_path):
    paths = _samples(tmp_path)
    run = tmp_path / "run"
    httpd, _ = start_server(run, run / "samples", paths)
    _pin(run)
    try:  # the first server still holds the port
        with pytest.raises(ConfigError, match="which the manifest pinned in .* names, is not free"):
            start_server(run, run / "samples", paths)
    finally:
        _stop(httpd)


def test_serve_on_a_given_port(tmp_path):
    first, base = serve(tmp_path)
    port = first.server_address[1]
    _stop(first)
    again, base2 = serve(tmp_path, port)
    _stop(again)
    assert base2 == base == f"http://127.0.0.1:{port}"
