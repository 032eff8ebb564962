"""`make demo`: the whole pipeline on sample videos made on the spot, with tiny models, locally, no cluster.

Makes sample videos with cuts and speech (ffmpeg + espeak-ng), serves half of them over a local HTTP server so the
download stage is real yt-dlp over HTTP (the other half are local files), then runs `workflows/demo.yaml`:
download -> frames -> asr / clip / audio / scenegraph -> ingest -> pretrain -> VQA finetune + eval, and prints the
status table and where the report is. Re-running it only does what is missing.
"""
from __future__ import annotations

import argparse
import http.server
import sys
import threading
from functools import partial
from pathlib import Path

from .samples import make_samples

REPO = Path(__file__).resolve().parents[1]


def serve(directory: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(Quiet, directory=str(directory)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, f"http://127.0.0.1:{httpd.server_address[1]}"


def write_manifest(run_dir: Path, paths: list[Path], base_url: str) -> Path:
    """Even-numbered videos over HTTP, odd ones as local files, plus one URL that 404s (a recorded failure)."""
    lines = [f"{p.stem} {base_url}/{p.name}" if i % 2 == 0 else f"{p.stem} {p.resolve()}" for i, p in enumerate(paths)]
    lines.append(f"missing_video {base_url}/missing_video.mp4")
    manifest = run_dir / "videos.txt"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def main() -> int:
    from .cli import fail
    from .errors import ConfigError
    from .workflow import load, run_local

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", default="runs/demo")
    ap.add_argument("--videos", type=int, default=10)
    ap.add_argument("--workflow", default=str(REPO / "workflows" / "demo.yaml"))
    args = ap.parse_args()
    run_dir = Path(args.run_dir).resolve()
    samples = run_dir / "samples"
    print(f"making {args.videos} sample videos in {samples} (ffmpeg + espeak-ng)", flush=True)
    paths = make_samples(samples, args.videos)
    httpd, base = serve(samples)
    try:
        write_manifest(run_dir, paths, base)
        # The manifest names this run's server port: pin it only on the first run (later runs reuse the pin).
        pinned = (run_dir / "geometry.json").exists()
        wf = load(args.workflow, [f"run_dir={run_dir}", "launcher=local"])
        if pinned:
            wf.steps.download.overrides = [o for o in wf.steps.download.overrides if not o.startswith("input=")]
        rc = run_local(wf)
    except ConfigError as exc:
        return fail(str(exc))
    finally:
        httpd.shutdown()
    from .status import format_status, run_status

    print("\n" + format_status(run_dir, run_status(run_dir)))
    metrics = run_dir / "vqa" / "vqa" / "metrics.json"
    if metrics.exists():
        import json

        m = json.loads(metrics.read_text())
        print(f"\nVQA accuracy {m['accuracy']:.2f}% vs majority baseline {m['majority_baseline']:.2f}% "
              f"(always {m['majority_answer']!r}) on {m['n_eval_questions']} held-out questions")
    print(f"\nrun dir: {run_dir}")
    report = run_dir / "report" / "report.md"
    if report.exists():
        print(f"report: {report}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
