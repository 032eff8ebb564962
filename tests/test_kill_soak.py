"""The kill -9 soak, small: one SIGKILL of the whole frames task at a random moment, then a re-run identical to
the uninterrupted run (`python -m benchmarks.kill_soak --kills 20` for the full soak; README has a recorded run)."""
from __future__ import annotations

import json

from benchmarks.kill_soak import main


def test_kill_soak_one_kill(tmp_path, cache_dir):
    report, raw = tmp_path / "soak.md", tmp_path / "soak.json"
    rc = main(["--kills", "1", "--stages", "frames", "--speech-clips", "0", "--work", str(tmp_path / "work"),
               "--cache-dir", str(cache_dir), "--report", str(report), "--json", str(raw), "--seed", "3"])
    results = json.loads(raw.read_text())["results"]["frames"]
    assert rc == 0, results
    assert len(results) == 1 and results[0]["identical"] and results[0]["left_behind"] == 0
    assert "| frames |" in report.read_text() and "1 / 1" in report.read_text()
