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


# ------------------------------------------------------------------------------------ the stages on the oracle

STAGES = ("download", "frames", "asr", "audio", "clip", "scenegraph", "ingest")
# Every video is "low-cut" and sampled uniformly at 5 fps: one frame of every 0.2 s flash is taken. No-speech
# windows of 1 s (the verifier wants a last window of at least 1 s).
FALLBACK_FPS = 5.0
WINDOW_S = 1.0
STAGE_OVERRIDES = {
    "frames": ["stage.min_cuts_per_minute=100000", f"stage.fallback_fps={FALLBACK_FPS}"],
    "asr": ["stage.runner.backend=inline", "stage.beam_size=1"],
    "audio": ["stage.runner.backend=inline", f"stage.window_s={WINDOW_S}"],
    "clip": ["stage.runner.backend=inline"],
    "scenegraph": ["stage.runner.backend=inline", "stage.max_side=128"],
    "ingest": [f"stage.window_s={WINDOW_S}"],
}


def run_stages(run_dir: Path, videos: dict[str, Path], cache_dir: Path, stages=STAGES,
               extra: dict[str, list[str]] | None = None) -> Path:
    """The real stages, in this process (the engine's run_shard per shard, then the stage's finish), models=tiny,
    on `videos` ({video_id: path}); returns run_dir. The stage configs are saved as a launch saves them."""
    from omegaconf import OmegaConf

    from pipeline.atomic import write_text
    from pipeline.config import compose
    from pipeline.engine import container, run_shard
    from pipeline.manifest import load_items, pin_geometry, plan_geometry
    from pipeline.stages import get_stage

    run_dir = Path(run_dir)
    manifest = run_dir.parent / f"{run_dir.name}-manifest.txt"
    manifest.write_text("".join(f"{vid} {path}\n" for vid, path in videos.items()))
    for stage in stages:
        cfg = compose([f"stage={stage}", f"run_dir={run_dir}", f"input={manifest}", "models=tiny",
                       f"cache_dir={cache_dir}", "device=cpu", "launcher=local",
                       *STAGE_OVERRIDES.get(stage, []), *(extra or {}).get(stage, [])])
        if not (run_dir / "manifest.parquet").exists():
            geo, items, _ = plan_geometry(run_dir, cfg.input, cfg.num_shards, cfg.items_per_shard)
            pin_geometry(run_dir, geo, items)
        write_text(run_dir / stage / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(container(cfg))))
        for shard in sorted({i.shard for i in load_items(run_dir)}):
            run_shard(cfg, shard)
        get_stage(stage).finish(cfg)
    return run_dir


_SHARED: dict[str, object] = {}


def shared_variants(tmp_path_factory) -> dict[str, Variant]:
    """The variants, made once per test session whichever module asks first."""
    if "variants" not in _SHARED:
        _SHARED["variants"] = make_variants(tmp_path_factory.mktemp("sync-oracle"))
    return _SHARED["variants"]  # type: ignore[return-value]


def video_id(name: str) -> str:
    return name.replace(".", "_")


def shared_run(tmp_path_factory, cache_dir: Path) -> Path:
    """Every stage on every variant, once per test session (about a minute on 2 cores)."""
    if "run" not in _SHARED:
        variants = shared_variants(tmp_path_factory)
        run = tmp_path_factory.mktemp("oracle-run") / "run"
        _SHARED["run"] = run_stages(run, {video_id(n): v.path for n, v in variants.items()}, cache_dir)
    return _SHARED["run"]  # type: ignore[return-value]


# --------------------------------------------------------------------------- alignment of the dataset's rows

BEEP_RATIO = 0.25   # of the way from the silence embedding to a beep's: a beep in the span (measured: >= 0.5 with
#                     a beep, <= 0.05 without, codec pre-echo of a beep in the next window included)


class BeepDetector:
    """Whether a row's audio embedding (the audio stage's tiny Cnn14) holds a beep: compared with the same model's
    embedding of silence and of one beep, padded as the audio stage pads the span."""

    def __init__(self, cache_dir: Path, min_span_s: float = 1.0, pad_multiple_s: float = 1.0):
        from pipeline.stages.audio import AudioTagger

        self.tagger = AudioTagger(checkpoint="", models="tiny", cache_dir=str(cache_dir), device="cpu",
                                  precision="fp32", top_k=1, max_forward_seconds=160.0)
        self.min_span_s, self.pad_multiple_s = min_span_s, pad_multiple_s
        self.refs: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _refs(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        from pipeline.stages.audio import SAMPLE_RATE

        if n not in self.refs:
            t = np.arange(n) / SAMPLE_RATE
            beep = (0.5 * np.sin(2 * np.pi * 1000 * t) * ((t >= 0.3) & (t < 0.3 + FLASH_S))).astype(np.float32)
            emb, _ = self.tagger._forward(np.stack([np.zeros(n, np.float32), beep]))
            self.refs[n] = (emb[0], emb[1])
        return self.refs[n]

    def ratio(self, embedding, start: float, end: float) -> float:
        from pipeline.stages.audio import Span, padded_samples

        silence, beep = self._refs(padded_samples(Span(0, start, end, ""), self.min_span_s, self.pad_multiple_s))
        e = np.asarray(embedding, np.float32)
        return float(np.linalg.norm(e - silence) / np.linalg.norm(beep - silence))


def alignment_violations(run: Path, variants: dict[str, Variant], detector: BeepDetector) -> list[str]:
    """Every dataset row of every variant against the ground truth: a row's frames (inside its span) show a flash
    exactly when a flash of the variant falls in the span, its audio embedding holds a beep exactly when a beep
    does, so where both streams cover a row, flash and beep rows are the same rows; and every flash the video
    shows is in some row."""
    import deeplake

    ds = deeplake.open_read_only(f"file://{Path(run) / 'dataset'}")
    n = len(ds)
    # frames by a list of rows: a slice of a Sequence(Image) column segfaults Deep Lake 4.7.4 now and then
    cols = {c: list(ds[c][list(range(n))] if c == "frames" else ds[c][0:n]) if n else []
            for c in ("video_id", "segment_idx", "start", "end", "frame_pts", "frames", "audio", "has_audio")}
    by_video: dict[str, list[int]] = {}
    for i, vid in enumerate(cols["video_id"]):
        by_video.setdefault(str(vid), []).append(i)
    out: list[str] = []
    for name, v in variants.items():
        rows = sorted(by_video.get(video_id(name), []), key=lambda i: cols["start"][i])
        if not rows:
            out.append(f"{name}: no rows")
            continue
        flashes = [(f, f + FLASH_S) for f in v.expected_flashes()]
        beeps = [(b, b + FLASH_S) for b in v.expected_beeps()]
        seen_flashes: list[float] = []
        for i in rows:
            a, b = float(cols["start"][i]), float(cols["end"][i])
            where = f"{name} row {int(cols['segment_idx'][i])} [{a:.3f}, {b:.3f})"
            inside = [(float(p), img) for p, img in zip(cols["frame_pts"][i], cols["frames"][i])
                      if a - 1e-3 <= float(p) < b]
            shown = [p for p, img in inside if is_flash(np.asarray(img))]
            seen_flashes += shown
            has_flash = bool(shown)
            want_flash = any(f0 < b and a < f1 for f0, f1 in flashes)
            if has_flash != want_flash:
                out.append(f"{where}: flash frames at {shown}, expected {'a flash' if want_flash else 'none'}")
            wrong = [p for p in shown if not any(f0 - 1e-6 <= p < f1 for f0, f1 in flashes)]
            if wrong:
                out.append(f"{where}: frames stamped {wrong} show a flash, no flash is there")
            if not bool(cols["has_audio"][i]) or not len(cols["audio"][i]):
                out.append(f"{where}: no audio embedding")
                continue
            ratio = detector.ratio(cols["audio"][i], a, b)
            has_beep = ratio > BEEP_RATIO
            want_beep = any(b0 < b and a < b1 for b0, b1 in beeps)
            if has_beep != want_beep:
                out.append(f"{where}: audio {'holds' if has_beep else 'holds no'} beep (ratio {ratio:.2f}), "
                           f"expected {'a beep' if want_beep else 'none'}")
            # a source second both streams play: its flash and its beep are in this row together
            both = [e for e in v.expected_flashes() if e in v.expected_beeps() and e < b and a < e + FLASH_S]
            if both and not (has_flash and has_beep):
                out.append(f"{where}: the second at {both} shows flash {has_flash}, beep {has_beep} in this row")
        missing = [f for f, _ in flashes if not any(f - 1e-6 <= p < f + FLASH_S for p in seen_flashes)]
        if missing:
            out.append(f"{name}: flashes at {missing} are in no row")
    return out
