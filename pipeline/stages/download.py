"""download: fetch each video with yt-dlp (in-process, one YoutubeDL per shard), or use a local file in place.

Media lands in <run_dir>/media/videos/shard-NNNNN/BBB/<video_id>.<ext>, at most `max_files_per_dir` per folder,
written under a temp dir and renamed in. Every failure is recorded with a reason category: not_found, forbidden,
private, unavailable, geo_blocked, age_restricted, rate_limited, server_error, timeout, network,
unsupported_url, not_a_file, error.
"""
from __future__ import annotations

import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional
from urllib.parse import unquote, urlparse

from .base import ItemResult, Stage, StageConfig, WorkItem

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
    format: str = "bv*[height<=360]+ba/b[height<=360]/wv*+ba/w"
    merge_output_format: str = "mp4"
    max_files_per_dir: int = 1000
    socket_timeout_s: float = 30.0
    retries: int = 3
    max_attempts: int = 3
    backoff_s: float = 2.0
    sleep_between_s: float = 0.0
    rate_limit: Optional[str] = None
    cookies_file: Optional[str] = None
    proxy: Optional[str] = None


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


class DownloadStage(Stage):
    name = "download"
    Config = DownloadConfig
    tables = {"videos": ("video_id",)}

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
        for attempt in range(max(1, self.cfg.max_attempts)):
            if attempt:
                time.sleep(self.cfg.backoff_s * (2 ** (attempt - 1)))
            category, detail, path, info = self._fetch(item)
            if path is not None:
                if self.cfg.sleep_between_s:
                    time.sleep(self.cfg.sleep_between_s)
                return self._ok(item, path, source="yt-dlp", info=info)
            last = f"{category}: {detail}"
            if category not in TRANSIENT:
                break
        return ItemResult.failed(item.video_id, last)

    @staticmethod
    def _local_path(url: str) -> Path | None:
        parsed = urlparse(url)
        if parsed.scheme == "file":
            return Path(unquote(parsed.path))
        if parsed.scheme == "" and (url.startswith("/") or url.startswith(".") or Path(url).exists()):
            return Path(url)
        return None

    def _options(self, tmp_dir: Path, logger: _QuietLogger) -> dict:
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
        }
        if self.cfg.rate_limit:
            from yt_dlp.utils import parse_bytes

            opts["ratelimit"] = parse_bytes(str(self.cfg.rate_limit))
        if self.cfg.cookies_file:
            opts["cookiefile"] = self.cfg.cookies_file
        if self.cfg.proxy:
            opts["proxy"] = self.cfg.proxy
        return opts

    def _fetch(self, item: WorkItem) -> tuple[str, str, Path | None, dict]:
        import yt_dlp

        out_dir = self.media_path(item)
        tmp_dir = out_dir / f".tmp-{item.video_id}-{os.getpid()}"
        shutil.rmtree(tmp_dir, ignore_errors=True)
        tmp_dir.mkdir(parents=True)
        logger = _QuietLogger()
        try:
            with yt_dlp.YoutubeDL(self._options(tmp_dir, logger)) as ydl:
                info = ydl.extract_info(item.url, download=True)
            files = [p for p in tmp_dir.iterdir() if p.is_file() and not p.name.endswith((".part", ".ytdl"))
                     and not re.search(r"\.f\d+\.", p.name)]
            if not files:
                return "error", "yt-dlp reported success but wrote no file", None, {}
            src = max(files, key=lambda p: p.stat().st_size)
            final = out_dir / f"{item.video_id}{src.suffix}"
            os.replace(src, final)
            keep = {k: info.get(k) for k in ("title", "duration", "extractor", "format_id", "fps")} if info else {}
            return "ok", "", final, keep
        except Exception as exc:  # noqa: BLE001 - DownloadError and friends: classified, recorded
            message = " | ".join(logger.errors) or str(exc)
            return classify(message), _clean(message), None, {}
        finally:
            shutil.rmtree(tmp_dir, ignore_errors=True)

    def _ok(self, item: WorkItem, path: Path, source: str, info: dict) -> ItemResult:
        facts = probe(path)
        row = {"video_id": item.video_id, "url": item.url, "path": str(path), "source": source,
               "filesize": path.stat().st_size, "duration": facts.get("duration") or info.get("duration"),
               "width": facts.get("width"), "height": facts.get("height"), "vcodec": facts.get("vcodec"),
               "acodec": facts.get("acodec"), "title": info.get("title"), "extractor": info.get("extractor")}
        return ItemResult(item.video_id, rows={"videos": [row]})


STAGE = DownloadStage
