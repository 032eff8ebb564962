"""download: fetch each video with yt-dlp (in-process, one YoutubeDL per attempt), or use a local file in place.

Media lands in <run_dir>/media/videos/shard-NNNNN/BBB/<video_id>.<ext>, at most `max_files_per_dir` per folder,
written under a temp dir and renamed in. Every failure is recorded with a reason category: not_found, forbidden,
private, unavailable, geo_blocked, age_restricted, rate_limited, server_error, timeout, network,
unsupported_url, live, too_long, too_large, not_a_file, error.

Requests are paced: `sleep_between_s` after every attempt, exponential backoff before a retry, a longer one after
each HTTP 429, all with jitter. The cookies file is read through a private per-task copy (yt-dlp rewrites the
cookie file it is given), and the proxy never appears in a recorded reason or log line.

Content identity: every video gets a `content_id` in the `videos` table, what the dataset's train/val/test split
is decided by (`pipeline.loader`), so that one piece of content under two ids never lands in two splits:
- a video from a site extractor of yt-dlp: `<extractor>:<id>` as yt-dlp canonicalises it (`youtube:dQw4w9WgXcQ`
  for youtu.be/..., watch?v=...&t=..., shorts/..., or the bare id alike); the bytes of a site video depend on
  the format chosen, its id does not;
- a local file, a `file://` URL or a direct media URL (yt-dlp's `generic` extractor): `sha256:<hex>` of the
  file's bytes, so a copy of a file, or one file under two URLs, is one content.
Duplicates (a content id with more than one video id) are listed by `python -m pipeline status`.
"""
from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional
from urllib.parse import unquote, urlparse

from ..atomic import publish
from ..errors import ConfigError
from .base import ItemResult, Resources, Stage, StageConfig, WorkItem

TRANSIENT = {"timeout", "rate_limited", "server_error", "network"}

# (pattern in yt-dlp's message, category), first match wins
REASONS = [
    (r"HTTP Error 404|404: Not Found", "not_found"),
    (r"HTTP Error 403|403: Forbidden", "forbidden"),
    (r"HTTP Error 429|Too Many Requests", "rate_limited"),
    (r"HTTP Error 5\d\d", "server_error"),
    (r"[Pp]rivate video", "private"),
    (r"available in your country|geo.?restrict|blocked it in your country", "geo_blocked"),
    (r"[Ss]ign in to confirm your age|age.?restrict", "age_restricted"),
    (r"[Vv]ideo unavailable|is unavailable|has been removed|account .* terminated", "unavailable"),
    (r"timed out|[Tt]imeout", "timeout"),
    (r"Unsupported URL", "unsupported_url"),
    (r"Connection refused|Name or service not known|Temporary failure in name resolution|"
     r"Network is unreachable|Connection reset", "network"),
]


def classify(message: str) -> str:
    for pattern, category in REASONS:
        if re.search(pattern, message):
            return category
    return "error"


def _clean(message: str) -> str:
    message = re.sub(r"\x1b\[[0-9;]*m", "", message).strip()
    message = message.removeprefix("ERROR: ")
    return message.splitlines()[0][:300] if message else "unknown"


@dataclass
class DownloadConfig(StageConfig):
    name: str = "download"
    format: str = "bv*[height<=360]+ba/b[height<=360]/wv*+ba/w"   # <=360p video + audio; else the smallest
    merge_output_format: str = "mp4"
    max_files_per_dir: int = 1000       # media files per directory (metadata servers hate huge directories)
    socket_timeout_s: float = 30.0
    retries: int = 3                    # yt-dlp's own HTTP retries
    max_attempts: int = 3               # whole-item attempts for transient failures (timeout, 429, 5xx), with backoff
    backoff_s: float = 2.0              # 2, 4, 8 ... seconds before retry 1, 2, 3 (also yt-dlp's own retries)
    rate_limited_backoff_s: float = 30.0   # after an HTTP 429: 30, 60, 120 ... seconds, doubling per consecutive 429
    max_backoff_s: float = 900.0        # cap on any single backoff
    sleep_between_s: float = 0.0        # pause after every request attempt, ok or not (request rate limit)
    jitter: float = 0.25                # every pause is stretched by a random 0..25%
    rate_limit: Optional[str] = None    # bandwidth cap per download, e.g. 5M (bytes/s; yt-dlp syntax)
    max_duration_s: Optional[float] = 21600.0   # refuse longer videos (too_long); null: no limit; live: always refused
    max_filesize: Optional[str] = "5G"  # refuse bigger downloads (too_large), e.g. 500M; null: no limit
    cookies_file: Optional[str] = None  # never logged (conf/stage/download.yaml: $VPT_COOKIES_FILE)
    proxy: Optional[str] = None         # never logged (conf/stage/download.yaml: $VPT_PROXY)
    resources: Resources = field(default_factory=lambda: Resources(cpus=2, gpus=0, mem_gb=4))


def probe(path: Path) -> dict:
    """Duration and stream facts of a media file; {} when unreadable (the frames stage records why)."""
    import av

    try:
        with av.open(str(path)) as container:
            v = next(iter(container.streams.video), None)
            a = next(iter(container.streams.audio), None)
            return {"duration": (container.duration / 1e6) if container.duration else None,
                    "width": v.codec_context.width if v else None, "height": v.codec_context.height if v else None,
                    "vcodec": v.codec_context.name if v else None, "acodec": a.codec_context.name if a else None}
    except Exception:  # noqa: BLE001
        return {}


class _QuietLogger:
    """yt-dlp logger: errors are classified by the stage; nothing (URLs with tokens, proxies) goes to stdout."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    def debug(self, msg: str) -> None:
        pass

    def info(self, msg: str) -> None:
        pass

    def warning(self, msg: str) -> None:
        pass

    def error(self, msg: str) -> None:
        self.errors.append(msg)


class _Refused(Exception):
    """Raised from a progress hook to stop a download; yt-dlp lets it propagate (ignoreerrors is off)."""


class _Guard:
    """Refuses live streams, videos over `max_duration_s` and downloads over `max_bytes`.

    The match filter catches what the extractor knows before downloading; the progress hook catches sizes that only
    show up while downloading (no filesize in the metadata). Either way the refusal is kept in `refused`.
    """

    def __init__(self, max_duration_s: float | None, max_bytes: int | None):
        self.max_duration_s, self.max_bytes = max_duration_s, max_bytes
        self.refused: tuple[str, str] | None = None   # (category, detail)
        self._sizes: dict[str, int] = {}

    def match_filter(self, info: dict, *, incomplete=False) -> str | None:
        """yt-dlp's match_filter: a returned message means "skip this video"."""
        duration = info.get("duration")
        if info.get("is_live") or info.get("live_status") in ("is_live", "is_upcoming"):
            self.refused = ("live", f"live_status={info.get('live_status') or 'is_live'}")
        elif self.max_duration_s and duration and duration > self.max_duration_s:
            self.refused = ("too_long", f"{duration:.0f} s > max_duration_s={self.max_duration_s:.0f}")
        elif self.max_bytes and not incomplete:  # `incomplete`: formats not selected yet, sizes unknown
            size = info.get("filesize") or info.get("filesize_approx")
            if size and size > self.max_bytes:
                self.refused = ("too_large", f"~{size} bytes > max_filesize={self.max_bytes}")
        return ": ".join(self.refused) if self.refused else None

    def progress(self, d: dict) -> None:
        if not self.max_bytes:
            return
        # Per file: video and audio of a merged format download one after the other.
        expected = d.get("total_bytes") or d.get("total_bytes_estimate") or 0
        self._sizes[d.get("filename", "")] = max(int(expected), int(d.get("downloaded_bytes") or 0))
        total = sum(self._sizes.values())
        if total > self.max_bytes:
            self.refused = ("too_large", f"{total} bytes > max_filesize={self.max_bytes}")
            raise _Refused(": ".join(self.refused))


def _private_copy(path: str) -> str:
    """A copy of the cookies file that only this task reads and yt-dlp rewrites (mkstemp: mode 0600)."""
    fd, copy = tempfile.mkstemp(prefix="vpt-cookies-", suffix=".txt")
    try:
        with os.fdopen(fd, "wb") as dst, open(os.path.expanduser(path), "rb") as src:
            shutil.copyfileobj(src, dst)
    except OSError:
        os.unlink(copy)
        raise ConfigError("stage.cookies_file is not a readable file") from None  # no path: it is a secret
    return copy


def _scrubber(proxy: str | None):
    """A function that masks the proxy URL, and its credentials, in any text (yt-dlp errors can quote them)."""
    secrets = []
    if proxy:
        parsed = urlparse(proxy if "://" in proxy else f"http://{proxy}")
        password = parsed.password
        secrets = [proxy, parsed.netloc.rpartition("@")[0] if "@" in parsed.netloc else ""]
        if password:
            secrets += [password, unquote(password)]
    secrets = sorted({s for s in secrets if s}, key=len, reverse=True)  # longest first: the URL before its parts

    def scrub(text: str) -> str:
        for secret in secrets:
            text = text.replace(secret, "***")
        return text

    return scrub


class DownloadStage(Stage):
    name = "download"
    Config = DownloadConfig
    tables = {"videos": ("video_id",)}

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        self._scrub = _scrubber(cfg.proxy)
        self._max_bytes, self._rate_limit = _parse_bytes(cfg.max_filesize), _parse_bytes(cfg.rate_limit)
        log = ctx.log
        self.ctx.log = lambda msg: log(self._scrub(msg))
        self._cookies: str | None = None   # private copy of cfg.cookies_file, made in process()
        self._throttled = 0                # consecutive HTTP 429 answers, across items

    def process(self, items):
        if self.cfg.cookies_file and self._cookies is None:
            self._cookies = _private_copy(self.cfg.cookies_file)
        for res in super().process(items):
            res.reason = self._scrub(res.reason)
            yield res

    def close(self) -> None:
        if self._cookies:
            Path(self._cookies).unlink(missing_ok=True)
            self._cookies = None

    def media_path(self, item: WorkItem) -> Path:
        bucket = item.index // max(1, self.cfg.max_files_per_dir)
        return self.ctx.media_dir / "videos" / f"shard-{self.ctx.shard:05d}" / f"{bucket:03d}"

    def process_item(self, item: WorkItem) -> ItemResult:
        local = self._local_path(item.url)
        if local is not None:
            if not local.is_file():
                return ItemResult.failed(item.video_id, f"not_a_file: {local} does not exist or is not a file")
            return self._ok(item, local.resolve(), source="local", info={})
        last = "error: no attempt"
        attempts = max(1, self.cfg.max_attempts)
        for attempt in range(attempts):
            category, detail, path, info = self._fetch(item)
            retry = path is None and category in TRANSIENT and attempt + 1 < attempts
            self._pause(category, attempt if retry else None)
            if path is not None:
                return self._ok(item, path, source="yt-dlp", info=info)
            last = f"{category}: {detail}"
            if not retry:
                break
        return ItemResult.failed(item.video_id, last)

    def _pause(self, category: str, retry_attempt: int | None) -> None:
        """Sleep after every request: `sleep_between_s`, plus backoff before a retry. A 429 is the site asking the
        whole crawl to slow down, so its backoff grows with consecutive 429s across items and applies even when
        this item gets no retry."""
        wait = self.cfg.sleep_between_s
        if category == "rate_limited":
            self._throttled += 1
            wait += self._backoff(self.cfg.rate_limited_backoff_s, self._throttled - 1)
        else:
            self._throttled = 0
            if retry_attempt is not None:
                wait += self._backoff(self.cfg.backoff_s, retry_attempt)
        if wait > 0:
            time.sleep(self._jittered(wait))

    def _backoff(self, base: float, n: int) -> float:
        return min(self.cfg.max_backoff_s, base * 2 ** min(n, 30))

    def _jittered(self, seconds: float) -> float:
        return seconds * (1 + self.cfg.jitter * random.random())  # parallel tasks must not retry in lockstep

    @staticmethod
    def _local_path(url: str) -> Path | None:
        parsed = urlparse(url)
        if parsed.scheme == "file":
            return Path(unquote(parsed.path))
        if parsed.scheme == "" and (url.startswith("/") or url.startswith(".") or Path(url).exists()):
            return Path(url)
        return None

    def _options(self, tmp_dir: Path, logger: _QuietLogger, guard: _Guard) -> dict:
        def retry_sleep(n: int) -> float:  # yt-dlp's own retries (5xx, broken fragments): not back-to-back
            return self._jittered(self._backoff(self.cfg.backoff_s, n))

        opts = {
            "format": self.cfg.format,
            "merge_output_format": self.cfg.merge_output_format,
            "outtmpl": {"default": str(tmp_dir / "video.%(ext)s")},
            "socket_timeout": self.cfg.socket_timeout_s,
            "retries": self.cfg.retries,
            "fragment_retries": self.cfg.retries,
            "noplaylist": True,
            "quiet": True,
            "no_warnings": True,
            "noprogress": True,
            "logger": logger,
            "overwrites": True,
            "cachedir": False,
            "match_filter": guard.match_filter,
            "progress_hooks": [guard.progress],
            "retry_sleep_functions": {"http": retry_sleep, "fragment": retry_sleep, "extractor": retry_sleep},
        }
        if self._rate_limit:
            opts["ratelimit"] = self._rate_limit
        if self._cookies:
            opts["cookiefile"] = self._cookies  # yt-dlp saves its jar there on close: never the user's own file
        if self.cfg.proxy:
            opts["proxy"] = self.cfg.proxy
        return opts

    def _fetch(self, item: WorkItem) -> tuple[str, str, Path | None, dict]:
        import yt_dlp

        out_dir = self.media_path(item)
        # Temp dirs of this item left by a killed worker (any pid) hold partial downloads: remove them first.
        stale = re.compile(re.escape(f".tmp-{item.video_id}-") + r"\d+")
        if out_dir.is_dir():
            for old in out_dir.iterdir():
                if stale.fullmatch(old.name):
                    shutil.rmtree(old, ignore_errors=True)
        tmp_dir = out_dir / f".tmp-{item.video_id}-{os.getpid()}"
        tmp_dir.mkdir(parents=True)
        logger = _QuietLogger()
        guard = _Guard(self.cfg.max_duration_s, self._max_bytes)
        try:
            with yt_dlp.YoutubeDL(self._options(tmp_dir, logger, guard)) as ydl:
                info = ydl.extract_info(item.url, download=True)
            if guard.refused:
                return *guard.refused, None, {}
            files = [p for p in tmp_dir.iterdir() if p.is_file() and not p.name.endswith((".part", ".ytdl"))
                     and not re.search(r"\.f\d+\.", p.name)]
            if not files:
                return "error", "yt-dlp reported success but wrote no file", None, {}
            src = max(files, key=lambda p: p.stat().st_size)
            final = out_dir / f"{item.video_id}{src.suffix}"
            publish(src, final)
            keep = ({k: info.get(k) for k in ("title", "duration", "extractor", "extractor_key", "id", "format_id",
                                              "fps")} if info else {})
            return "ok", "", final, keep
        except Exception as exc:  # noqa: BLE001 - DownloadError and friends: classified, recorded
            if guard.refused:
                return *guard.refused, None, {}
            message = " | ".join(logger.errors) or str(exc)
            return classify(message), _clean(self._scrub(message)), None, {}
        finally:
            shutil.rmtree(tmp_dir, ignore_errors=True)

    def _ok(self, item: WorkItem, path: Path, source: str, info: dict) -> ItemResult:
        facts = probe(path)
        row = {"video_id": item.video_id, "url": item.url, "path": str(path), "source": source,
               "filesize": path.stat().st_size, "duration": facts.get("duration") or info.get("duration"),
               "width": facts.get("width"), "height": facts.get("height"), "vcodec": facts.get("vcodec"),
               "acodec": facts.get("acodec"), "title": info.get("title"), "extractor": info.get("extractor"),
               "content_id": content_id(path, info)}
        return ItemResult(item.video_id, rows={"videos": [row]})


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def content_id(path: Path, info: dict) -> str:
    """The identity of a video's content (see the module docstring): `<extractor>:<id>` for a site video,
    `sha256:<hex>` of the file for local files and direct media URLs."""
    extractor = str(info.get("extractor_key") or info.get("extractor") or "").lower()
    if extractor and extractor != "generic" and info.get("id"):
        return f"{extractor}:{info['id']}"
    return f"sha256:{file_sha256(path)}"


def _parse_bytes(size) -> int | None:
    """"5G", "500M", 1000 -> bytes (yt-dlp's syntax); None stays None."""
    if size in (None, ""):
        return None
    from yt_dlp.utils import parse_bytes

    parsed = parse_bytes(str(size))
    if parsed is None:
        raise ConfigError(f"not a size: {size!r} (e.g. 500M, 5G)")
    return parsed


STAGE = DownloadStage
