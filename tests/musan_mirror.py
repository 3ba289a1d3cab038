"""A tiny MUSAN-shaped corpus as ``17/musan.tar.gz`` for the loopback mirror
(``librispeech_mirror.serve``): a few short 16 kHz WAV files in MUSAN's layout,
``musan/{music,speech,noise}/<source>/<part>-<source>-NNNN.wav``, with ANNOTATIONS files."""

from __future__ import annotations

import tarfile
import zlib
from pathlib import Path

from helpers import write_tone

# (part, source, seconds): windows of 10 s longer than 5 s are what training gets
FILES = (
    ("music", "fma", 23.0),        # 10 + 10 kept, the 3 s tail dropped
    ("music", "fma", 4.0),         # dropped whole
    ("speech", "librivox", 12.0),  # 10 kept, 2 dropped
    ("noise", "free-sound", 15.0),  # 10 kept; the tail is 5.0 s, not longer: dropped
    ("noise", "free-sound", 7.5),  # kept whole
)
# recording id -> (start, duration) of each window icefall's steps keep
WINDOWS = {
    "music-fma-0000": [(0.0, 10.0), (10.0, 10.0)],
    "speech-librivox-0000": [(0.0, 10.0)],
    "noise-free-sound-0000": [(0.0, 10.0)],
    "noise-free-sound-0001": [(0.0, 7.5)],
}


def build_musan(root: Path) -> dict[str, list[str]]:
    """Write ``root/musan/...``; returns part -> recording ids."""
    ids: dict[str, list[str]] = {}
    counters: dict[tuple[str, str], int] = {}
    for part, source, seconds in FILES:
        n = counters.get((part, source), 0)
        counters[(part, source)] = n + 1
        rid = f"{part}-{source}-{n:04d}"
        d = root / "musan" / part / source
        write_tone(d / f"{rid}.wav", seconds, seed=zlib.crc32(rid.encode()), fmt="WAV")
        with (d / "ANNOTATIONS").open("a") as f:  # MUSAN's: id, genres, vocals, artist
            f.write(f"{rid} pop N artist{n}\n" if part == "music" else f"{rid} http://x/{n}\n")
        ids.setdefault(part, []).append(rid)
    (root / "musan" / "README").write_text("MUSAN-shaped test corpus\n")
    return ids


def make_musan_tarball(src_root: Path, mirror: Path) -> Path:
    out = mirror / "17" / "musan.tar.gz"
    out.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(out, "w:gz") as tar:
        tar.add(src_root / "musan", arcname="musan")
    return out
