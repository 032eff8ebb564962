"""Sample videos for the demo, made on the spot with ffmpeg + espeak-ng: hard cuts between visually distinct
shots, and real synthetic speech, so every stage has something true to find. No downloaded media needed.

    python -m pipeline.samples --out runs/demo/samples --count 6
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
from pathlib import Path

# Visually distinct lavfi sources: consecutive shots differ strongly, so the cuts are real hard cuts.
SHOTS = [
    "testsrc2=size={w}x{h}:rate={fps}",
    "smptebars=size={w}x{h}:rate={fps}",
    "mandelbrot=size={w}x{h}:rate={fps}",
    "color=c=0x2060c0:size={w}x{h}:rate={fps}",
    "life=size={w}x{h}:rate={fps}:mold=10:ratio=0.1",
    "color=c=0xe0a030:size={w}x{h}:rate={fps}",
    "rgbtestsrc=size={w}x{h}:rate={fps}",
    "cellauto=size={w}x{h}:rate={fps}:rule=110",
]

SENTENCES = [
    "Welcome back to the workshop. Today we are building a small wooden box.",
    "First, measure the board twice and mark the cut with a pencil.",
    "The dog runs across the park and catches the red ball.",
    "Now add the sauce to the pan and stir it slowly for two minutes.",
    "This engine has four cylinders and it sounds very smooth.",
    "Look at the mountains behind the lake. The weather is perfect today.",
    "Put the blue cup on the table next to the laptop.",
    "Thanks for watching, and see you in the next video.",
]


def require_tools() -> None:
    missing = [t for t in ("ffmpeg", "espeak-ng") if shutil.which(t) is None]
    if missing:
        raise RuntimeError(f"missing {', '.join(missing)}: apt-get install ffmpeg espeak-ng (make install does it)")


def make_video(path: Path, index: int, shots: int = 4, shot_seconds: float = 3.0, width: int = 480,
               height: int = 270, fps: int = 25, speech: bool = True) -> Path:
    """One mp4 (H.264 + AAC) with `shots` hard cuts worth of shots and spoken sentences."""
    require_tools()
    path.parent.mkdir(parents=True, exist_ok=True)
    duration = shots * shot_seconds
    cmd = ["ffmpeg", "-nostdin", "-loglevel", "error", "-y"]
    for s in range(shots):
        src = SHOTS[(index + s) % len(SHOTS)].format(w=width, h=height, fps=fps)
        cmd += ["-f", "lavfi", "-t", f"{shot_seconds}", "-i", src]
    wav = path.with_suffix(".speech.wav")
    if speech:
        text = " ".join(SENTENCES[(index + k) % len(SENTENCES)] for k in range(2))
        subprocess.run(["espeak-ng", "-s", "150", "-w", str(wav), text], check=True, capture_output=True)
        cmd += ["-i", str(wav)]
    else:
        cmd += ["-f", "lavfi", "-t", f"{duration}", "-i", "anullsrc=r=16000:cl=mono"]
    concat = "".join(f"[{s}:v]" for s in range(shots)) + f"concat=n={shots}:v=1:a=0,format=yuv420p[v]"
    audio = f"[{shots}:a]apad,atrim=0:{duration},aresample=44100[a]"
    cmd += ["-filter_complex", f"{concat};{audio}", "-map", "[v]", "-map", "[a]", "-c:v", "libx264",
            "-preset", "veryfast", "-crf", "28", "-g", str(fps * 2), "-c:a", "aac", "-b:a", "64k", "-t",
            f"{duration}", "-movflags", "+faststart", str(path)]
    subprocess.run(cmd, check=True)
    wav.unlink(missing_ok=True)
    return path


def make_samples(out_dir: Path, count: int = 6, **kw) -> list[Path]:
    """`count` videos; every third has no speech (silence), so the no-speech path is exercised too."""
    out_dir = Path(out_dir)
    paths = []
    for i in range(count):
        p = out_dir / f"sample{i:02d}.mp4"
        if not p.exists():
            make_video(p, i, speech=(i % 3 != 2), **kw)
        paths.append(p)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--count", type=int, default=6)
    args = ap.parse_args()
    for p in make_samples(args.out, args.count):
        print(p)


if __name__ == "__main__":
    main()
