"""`make demo`: the whole pipeline on sample videos made on the spot, with tiny models, locally, no cluster.

Makes sample videos with cuts and speech (ffmpeg + espeak-ng), serves half of them over a local HTTP server so the
download stage is real yt-dlp over HTTP (the other half are local files), then runs `workflows/demo.yaml`:
download -> frames -> asr / clip / audio / scenegraph -> ingest -> pretrain -> VQA finetune + eval, and prints the
status table and where the report is. Re-running it only does what is missing.
"""
from __future__ import annotations

import argparse
import http.server
import logging
import sys
import threading
from functools import partial
from pathlib import Path
from urllib.parse import urlparse

from .samples import make_samples

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger(__name__)


def serve(directory: Path, port: int = 0) -> tuple[http.server.ThreadingHTTPServer, str]:
    """Serve `directory` on 127.0.0.1:`port` (0: any free port). Returns the server and its base URL."""
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", port), partial(Quiet, directory=str(directory)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, f"http://127.0.0.1:{httpd.server_address[1]}"


def pinned_port(run_dir: Path) -> int:
    """The server port named by the URLs of the manifest pinned in `run_dir` (0: none pinned, or no such URL)."""
    from .manifest import GEOMETRY_FILE, load_items

    if not (run_dir / GEOMETRY_FILE).exists():
        return 0
    for item in load_items(run_dir):
        url = urlparse(item.url)
        if url.scheme == "http" and url.hostname == "127.0.0.1" and url.port:
            return url.port
    return 0


def start_server(run_dir: Path, samples: Path, paths: list[Path]) -> tuple[http.server.ThreadingHTTPServer, bool]:
    """Serve the samples; before the manifest is pinned, write it with this server's URLs. Returns (server, pinned).

    A pinned manifest keeps the URLs of the run that pinned it, so a re-run serves on the port they name: videos an
    interrupted download had not fetched yet still download."""
    from .errors import ConfigError
    from .manifest import GEOMETRY_FILE

    pinned = (run_dir / GEOMETRY_FILE).exists()
    port = pinned_port(run_dir)
    try:
        httpd, base = serve(samples, port)
    except OSError as exc:
        raise ConfigError(f"port {port}, which the manifest pinned in {run_dir} names, is not free ({exc}): stop "
                          "what holds it (another demo on this run dir?) or use a new --run-dir") from None
    if not pinned:
        write_manifest(run_dir, paths, base)
    return httpd, pinned


def write_manifest(run_dir: Path, paths: list[Path], base_url: str) -> Path:
    """Even-numbered videos over HTTP, odd ones as local files, plus one URL that 404s (a recorded failure)."""
    lines = [f"{p.stem} {base_url}/{p.name}" if i % 2 == 0 else f"{p.stem} {p.resolve()}" for i, p in enumerate(paths)]
    lines.append(f"missing_video {base_url}/missing_video.mp4")
    manifest = run_dir / "videos.txt"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def main() -> int:
    from .errors import ConfigError, fail
    from .logs import configure
    from .workflow import load, run_local

    configure()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", default="runs/demo")
    ap.add_argument("--videos", type=int, default=10)
    ap.add_argument("--workflow", default=str(REPO / "workflows" / "demo.yaml"))
    args = ap.parse_args()
    run_dir = Path(args.run_dir).resolve()
    samples = run_dir / "samples"
    log.info("making %d sample videos in %s (ffmpeg + espeak-ng)", args.videos, samples)
    paths = make_samples(samples, args.videos)
    try:
        httpd, pinned = start_server(run_dir, samples, paths)
    except ConfigError as exc:
        return fail(str(exc))
    try:
        wf = load(args.workflow, [f"run_dir={run_dir}", "launcher=local"])
        if pinned:  # the pinned manifest is the input now; videos.txt may list more videos (--videos)
            wf.steps.download.overrides = [o for o in wf.steps.download.overrides if not o.startswith("input=")]
        rc = run_local(wf)
    except ConfigError as exc:
        return fail(str(exc))
    finally:
        httpd.shutdown()
    from .status import format_status, run_status
    from .train.layout import VQA_RUN, report_file, vqa_metrics

    print("\n" + format_status(run_dir, run_status(run_dir)))
    metrics = vqa_metrics(run_dir / VQA_RUN)
    if metrics.exists():
        import json

        m = json.loads(metrics.read_text())
        print(f"\nVQA accuracy {m['accuracy']:.2f}% vs majority baseline {m['majority_baseline']:.2f}% "
              f"(always {m['majority_answer']!r}) on {m['n_eval_questions']} held-out questions")
    print(f"\nrun dir: {run_dir}")
    report = report_file(run_dir)
    if report.exists():
        print(f"report: {report}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
