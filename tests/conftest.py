"""Shared fixtures: repo paths, the shared sample media, a local HTTP media server, CLI runner."""
from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_MEDIA = REPO / "tests" / "media"  # real sample media shipped with the repo (see its SOURCES.md)
sys.path.insert(0, str(Path(__file__).resolve().parent))  # test helper modules (slurm_cluster, ...)

from slurm_cluster import slurm_cluster  # noqa: E402,F401  (session fixture: a real local Slurm)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Re-arm pytest's fatal-signal traceback before every test. `ray.init` in this process replaces the
    SIGABRT/SIGSEGV handlers with Ray's own, which prints nothing once Ray is shut down: a native crash in a later
    test would then end the run without a word about where."""
    import faulthandler

    from _pytest.faulthandler import fault_handler_stderr_fd_key

    fd = item.config.stash.get(fault_handler_stderr_fd_key, None)
    if fd is not None:
        faulthandler.disable()  # enable() alone is a no-op while faulthandler believes it is installed
        faulthandler.enable(file=fd, all_threads=True)


# Deep Lake 4.7's native objects now and then abort the process while they are freed ("double free detected in
# tcache 2"; seen when a handle is collected after another handle wrote the same dataset). The suite keeps every
# handle it or the code under test opens until the session ends, and ends without the interpreter's teardown
# once pytest has written its report (the CLI commands that read datasets end the same way:
# pipeline.dataset_health.exit_skipping_native_teardown). Nothing is faked: the same native calls run.
_DEEPLAKE_HANDLES: list = []


def _keep_deeplake_handles() -> None:
    try:
        import deeplake
    except ImportError:
        return
    for name in ("open", "open_read_only", "create"):
        real = getattr(deeplake, name)
        if getattr(real, "_keeps_handles", False):
            continue

        def keeping(*args, _real=real, **kwargs):
            ds = _real(*args, **kwargs)
            _DEEPLAKE_HANDLES.append(ds)
            return ds

        keeping._keeps_handles = True
        setattr(deeplake, name, keeping)


_keep_deeplake_handles()
_EXIT_STATUS: list[int] = []


def pytest_sessionfinish(session, exitstatus):
    _EXIT_STATUS.append(int(exitstatus))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    if _EXIT_STATUS and os.environ.get("VPT_TEST_NATIVE_TEARDOWN") != "1":
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os._exit(_EXIT_STATUS[-1])


@pytest.fixture(scope="session")
def shared_media() -> Path:
    if not SHARED_MEDIA.is_dir():
        pytest.fail(f"sample media not found at {SHARED_MEDIA}")
    return SHARED_MEDIA


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One cache for tiny models per test session (they are built once, like a user's ~/.cache)."""
    path = os.environ.get("VPT_TEST_CACHE_DIR")
    return Path(path) if path else tmp_path_factory.mktemp("model-cache")


class _MediaHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a directory; /slow/<file> stalls before answering, /status/<code> answers that code."""

    slow_seconds = 5.0

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def do_GET(self) -> None:
        if self.path.startswith("/slow/"):
            time.sleep(self.slow_seconds)
            self.path = self.path[len("/slow"):]
        elif self.path.startswith("/status/"):
            code = int(self.path.split("/")[2].split(".")[0])
            self.send_response(code)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        super().do_GET()

    do_HEAD = do_GET


class MediaServer:
    def __init__(self, root: Path):
        self.root = root
        handler = lambda *a, **kw: _MediaHandler(*a, directory=str(root), **kw)  # noqa: E731
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def url(self, path: str) -> str:
        return f"{self.base}/{path.lstrip('/')}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def ray_session():
    """One local Ray for a test module (the inference runner reuses a running Ray instead of starting its own)."""
    import ray

    from pipeline.inference.runner import ensure_ray

    started = ensure_ray(num_cpus=2)
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def media_server(tmp_path_factory, shared_media):
    """Real HTTP on 127.0.0.1 serving copies of the sample videos (v0.mp4 ... v9.mp4)."""
    root = tmp_path_factory.mktemp("www")
    sources = [shared_media / n for n in ("counter.mp4", "fades.mp4", "delayed_start.mp4")]
    for i in range(10):
        (root / f"v{i}.mp4").write_bytes(sources[i % len(sources)].read_bytes())
    server = MediaServer(root)
    yield server
    server.close()


def run_cli(*args: str, env: dict | None = None, timeout: float = 600, check: bool = True,
            module: str = "pipeline") -> subprocess.CompletedProcess:
    """Run `python -m pipeline ...` as a user would."""
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=full_env, capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"python -m {module} {' '.join(args)} -> {proc.returncode}\n"
                             f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}")
    return proc
