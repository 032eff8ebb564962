"""Sync oracle: short videos (ffmpeg lavfi) whose every whole second of source shows a white frame and plays a
1 kHz beep, in the container variants real files come in. The ground truth of each variant is known by
construction (where on the container timeline source second k lands, which seconds have audio or video) and is
cross-checked against the ffmpeg CLI's own decode (`reference_flashes`, `reference_beeps`), an implementation
independent of the code under test.

Source: testsrc2 128x72 at 25 fps (every frame distinct); frames n with n mod 25 < 5 are white (a 0.2 s flash
from each whole second); audio 48 kHz, a 0.5-amplitude 1 kHz tone during [k, k + 0.2) of each second k, silence
otherwise.
"""
from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

DURATION = 6            # seconds of source
FPS = 25
FLASH_S = 0.2           # flash and beep length from each whole second
SIZE = "128x72"
AUDIO_RATE = 48000
CUT_AT = 1.3            # stream-copied cut point (not on a keyframe: the GOP is 2 s)
LATE_S = 1.5            # the late stream's delay
GAP = (1.5, 3.5)        # audio packets missing in the gap variant (source seconds; 2 s, between beeps)

VIDEO = (f"testsrc2=size={SIZE}:rate={FPS}:duration={DURATION},"
         r"drawbox=x=0:y=0:w=iw:h=ih:color=white:t=fill:enable='lt(mod(n\,25)\,5)'")
AUDIO = (r"aevalsrc='0.5*sin(2*PI*1000*t)*lt(mod(t\,1)\,0.2)'"
         f":s={AUDIO_RATE}:d={DURATION}:n=480")
X264 = ["-c:v", "libx264", "-g", "50", "-sc_threshold", "0", "-pix_fmt", "yuv420p", "-preset", "veryfast"]
AAC = ["-c:a", "aac", "-b:a", "96k"]


@dataclass
class Variant:
    """One oracle file and where its events must be on the container timeline."""
    name: str
    path: Path
    offset: float                     # container time of source time 0 (both streams)
    video_from: float = 0.0           # source seconds the video stream covers
    audio_from: float = 0.0           # source seconds the audio stream covers
    audio_gap: tuple[float, float] | None = None    # source seconds without audio packets
    sync_tolerance_s: float = 0.003   # |beep onset - expected| allowed (stream copies cut audio at packets)
    notes: list[str] = field(default_factory=list)

    def seconds(self) -> list[int]:
        return list(range(DURATION))

    def expected_flashes(self) -> list[float]:
        """Container times of the flash onsets the decoded video must show."""
        return [k + self.offset for k in self.seconds() if k >= self.video_from - 1e-9]

    def expected_beeps(self) -> list[float]:
        """Container times of the beep onsets the decoded audio must play."""
        out = []
        for k in self.seconds():
            if k < self.audio_from - 1e-9:
                continue
            if self.audio_gap and self.audio_gap[0] - 1e-9 <= k < self.audio_gap[1] - 1e-9:
                continue
            out.append(k + self.offset)
        return out

    def silent_spans(self) -> list[tuple[float, float]]:
        """Container-time spans where the audio must be silence (before the audio starts, the gap)."""
        spans = []
        if self.audio_from > 0:
            spans.append((0.0, self.audio_from + self.offset))
        if self.audio_gap:
            spans.append((self.audio_gap[0] + self.offset, self.audio_gap[1] + self.offset))
        return spans


def _ff(*args: str) -> None:
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", *args], check=True)


def _graph(video: str = VIDEO, audio: str = AUDIO) -> list[str]:
    """One lavfi input with both streams, so relative stream start times survive (separate inputs are each
    rebased to 0)."""
    return ["-f", "lavfi", "-i", f"{video}[out0];{audio}[out1]"]


def ffprobe_streams(path: Path) -> list[dict]:
    out = subprocess.run(["ffprobe", "-v", "error", "-show_entries", "stream=codec_type,start_time",
                          "-of", "json", str(path)], check=True, capture_output=True, text=True).stdout
    return json.loads(out)["streams"]


def remux(src: Path, dst: Path, keep) -> None:
    """Copy `src` to `dst` packet by packet (no decoding), keeping the packets for which `keep(packet, seconds)`
    is true: how a splice or a recorder's cut loses packets."""
    import av

    with av.open(str(src)) as inp, av.open(str(dst), "w", format=inp.format.name.split(",")[0]) as out:
        streams = {s.index: out.add_stream_from_template(s) for s in inp.streams if s.type in ("video", "audio")}
        for packet in inp.demux(*[inp.streams[i] for i in streams]):
            ts = packet.pts if packet.pts is not None else packet.dts
            if packet.size == 0 or ts is None or not keep(packet, float(ts * packet.time_base)):
                continue
            packet.stream = streams[packet.stream_index]
            out.mux(packet)


def make_variants(root: Path) -> dict[str, Variant]:
    """Write every variant under `root` (about two seconds of ffmpeg in all)."""
    root.mkdir(parents=True, exist_ok=True)
    v: dict[str, Variant] = {}

    def add(name: str, **kw) -> Path:
        v[name] = Variant(name, root / name, **kw)
        return v[name].path

    plain = add("plain.mp4", offset=0.0)
    _ff(*_graph(), *X264, *AAC, str(plain))
    # passthrough: the CLI would otherwise fill the first 1.5 s with copies of the first frame
    _ff(*_graph(f"{VIDEO},trim=start={LATE_S}"), *X264, *AAC, "-fps_mode", "passthrough",
        str(add("video_late.mp4", offset=0.0, video_from=LATE_S)))
    _ff(*_graph(audio=f"{AUDIO},atrim=start={LATE_S}"), *X264, *AAC,
        str(add("audio_late.mp4", offset=0.0, audio_from=LATE_S)))
    ts = root / "plain.ts"
    _ff(*_graph(), *X264, *AAC, "-f", "mpegts", str(ts))
    # The TS muxer delays every stream (by 1.4 s plus the B-frame delay): source time 0 is the first video
    # frame's PTS as the demuxer reports it (ffprobe).
    ts_offset = next(float(s["start_time"]) for s in ffprobe_streams(ts) if s["codec_type"] == "video")
    v["plain.ts"] = Variant("plain.ts", ts, offset=ts_offset, sync_tolerance_s=0.003)
    # A recorder's TS that starts mid-GOP: no edit list in TS; the packets before the first keyframe are there
    # but the decoder outputs nothing for them.
    ts_cut = root / "mid_gop.ts"
    remux(ts, ts_cut, lambda p, t: t >= ts_offset + CUT_AT - 1e-6)
    v["mid_gop.ts"] = Variant("mid_gop.ts", ts_cut, offset=ts_offset, video_from=2.0, audio_from=CUT_AT,
                              sync_tolerance_s=0.003)
    _ff(*_graph(), "-c:v", "libvpx-vp9", "-deadline", "realtime", "-cpu-used", "8", "-g", "50", "-b:v", "300k",
        "-c:a", "libopus", "-b:a", "64k", str(add("vp9_opus.webm", offset=0.0, sync_tolerance_s=0.008)))
    # Stream copy from a non-keyframe: an edit list starts the video at CUT_AT, the packets before it (back to
    # the keyframe at 0) are pre-roll the decoder discards; the first frame shown is the first at or after the cut
    # (1.32 s), so the video is a fraction of a frame later than the audio.
    _ff("-ss", str(CUT_AT), "-i", str(plain), "-c", "copy", str(add("cut_editlist.mp4", offset=-CUT_AT,
                                                                     video_from=CUT_AT, audio_from=CUT_AT,
                                                                     sync_tolerance_s=0.025)))
    # MKV whose audio packets in [1.5 s, 3.5 s) are missing (a splice): the beeps at 2 and 3 are gone.
    mkv = root / "whole.mkv"
    _ff(*_graph(), *X264, "-c:a", "libopus", "-b:a", "64k", str(mkv))
    remux(mkv, add("audio_gap.mkv", offset=0.0, audio_gap=GAP, sync_tolerance_s=0.008),
          lambda p, t: p.stream.type != "audio" or not GAP[0] - 1e-6 <= t < GAP[1] - 1e-6)
    # VFR: odd seconds at 25 fps, even seconds thinned to every third frame (flash frames kept).
    vfr = r"select='gte(mod(t\,2)\,1)+lt(mod(n\,25)\,5)+not(mod(n\,3))'"
    _ff(*_graph(f"{VIDEO},{vfr}"), *X264, *AAC, "-fps_mode", "vfr", str(add("vfr.mp4", offset=0.0)))
    return v


# ----------------------------------------------------------------------------------------- onset detection


def onsets(times: np.ndarray, on: np.ndarray, min_off_s: float = 0.3) -> list[float]:
    """Times where `on` becomes true after at least `min_off_s` of false (or at the start)."""
    out: list[float] = []
    last_on = -np.inf
    for t, x in zip(times, on):
        if x:
            if t - last_on > min_off_s:
                out.append(float(t))
            last_on = t
    return out


def is_flash(image: np.ndarray) -> bool:
    return float(image.mean()) > 200.0


def flash_onsets(frames: list[tuple[float, np.ndarray]]) -> list[float]:
    return onsets(np.array([t for t, _ in frames]), np.array([is_flash(im) for _, im in frames]))


def beep_onsets(audio: np.ndarray, sample_rate: int, start: float = 0.0) -> list[float]:
    """Onsets of the tone: first sample above half the tone's amplitude after 0.3 s below it."""
    loud = np.abs(audio) > 0.25
    idx = np.flatnonzero(loud)
    out: list[float] = []
    last = -np.inf
    for i in idx:
        t = start + i / sample_rate
        if t - last > 0.3:
            out.append(float(t))
        last = t
    return out


# ------------------------------------------------------------------------------------ the ffmpeg CLI reference


def reference_frames(path: Path) -> list[tuple[float, float]]:
    """(pts, mean luma) of every frame the ffmpeg CLI decodes, on the container timeline (-copyts)."""
    out = subprocess.run(["ffprobe", "-v", "error", "-f", "lavfi", "-i",
                          f"movie={_lavfi_path(path)},signalstats",
                          "-show_entries", "frame=pts_time:frame_tags=lavfi.signalstats.YAVG", "-of", "json"],
                         check=True, capture_output=True, text=True).stdout
    frames = json.loads(out)["frames"]
    return [(float(f["pts_time"]), float(f["tags"]["lavfi.signalstats.YAVG"])) for f in frames]


def reference_flashes(path: Path) -> list[float]:
    frames = reference_frames(path)
    return onsets(np.array([t for t, _ in frames]), np.array([y > 200 for _, y in frames]))


def reference_audio(path: Path, sample_rate: int = 16000) -> np.ndarray:
    """The ffmpeg CLI's decode placed on the container timeline: timestamps kept (-copyts), gaps filled and the
    start padded/trimmed to time 0 by aresample's timestamp compensation."""
    raw = subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-copyts", "-i", str(path), "-vn",
                          "-af", f"aresample={sample_rate}:async=1:min_hard_comp=0.001:first_pts=0",
                          "-ac", "1", "-f", "f32le", "-"], check=True, capture_output=True).stdout
    return np.frombuffer(raw, dtype=np.float32)


def reference_beeps(path: Path, sample_rate: int = 16000) -> list[float]:
    return beep_onsets(reference_audio(path, sample_rate), sample_rate)


def ffmpeg_frame_at(path: Path, pts: float, size: tuple[int, int] | None = None) -> np.ndarray:
    """The frame shown at `pts` (container time), decoded by the ffmpeg CLI with accurate seek."""
    from pipeline.verify_content import ffmpeg_frame

    return ffmpeg_frame(path, pts, size)


def _lavfi_path(path: Path) -> str:
    return str(path).replace("\\", "\\\\").replace(":", "\\:").replace("'", "\\'")
