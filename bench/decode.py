"""Decode benchmark: time and peak memory of decoding one image at the pixel cap, by kind.

A server decodes each request's image in the handler thread that took it, so what one decode
holds at its peak, times the handler threads (`serve --workers`, default 8), bounds the memory
that images alone can take. Each kind is drawn here at the cap (40 MP by default; a JPEG at
100 MP, which decodes at 1/8 of each side, under the cap) and decoded through
`pictor.core.decode`, the one decode path of server, indexer and trainer, in a fresh process
each, whose peak resident memory (VmHWM, Linux) over its baseline is the figure. Flat images
compress well, so these files are small: the memory comes from the pixels, not the bytes sent.

Then files built to be slow, as a fuzzing audit sent them: a JPEG of 250 scans at the cap, and
JPEG, PNG and GIF files of millions of empty segments, chunks or blocks. Pictor refuses them;
the figure is how long that takes. Last, an AVIF whose header (its ``ispe`` box, what Pillow
reports and the cap is checked on) says 100x100 while its AV1 frame is 6x the cap: libavif
decodes the frame, up to its own limit of 16384x16384, and the figure is what that holds.

Run from the project root, under the shared CPU lock::

    flock /tmp/pictor-cpu.lock .venv/bin/python bench/decode.py
"""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
import tempfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from common import encoded, machine_line, parser

# A JPEG counts at its draft size (1/8 of each side, rounded up): drawn at 100 MP, or at 60x
# a cap too low for that (64x could round to just above it).
JPEG_PIXELS = 100_000_000

# (name, Pillow mode, format): what users send, from photos to 16-bit scans.
KINDS = (
    ("RGB JPEG (decoded at 1/8)", "RGB", "JPEG"),
    ("RGB PNG", "RGB", "PNG"),
    ("RGBA PNG (alpha on white)", "RGBA", "PNG"),
    ("greyscale PNG", "L", "PNG"),
    ("16-bit greyscale PNG", "I;16", "PNG"),
    ("palette GIF", "P", "GIF"),
    ("lossless RGBA WebP", "RGBA", "WEBP"),
    ("RGB AVIF", "RGB", "AVIF"),
)

# Runs in a fresh interpreter: decode the file once, print time and peak RSS over baseline.
# The peak is the process's VmHWM: ru_maxrss would carry over the parent's (Linux keeps it
# across fork and exec), and this parent has drawn a 100 MP image.
_CHILD = """
import json, re, sys, time
from pictor.core.decode import decode_image
from pictor.errors import InvalidImageError
def peak_kb():
    return int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1))
data = open(sys.argv[1], "rb").read()
before = peak_kb()
started = time.perf_counter()
try:
    size = decode_image(data, max_pixels=int(sys.argv[2]), draft_size=(256, 256)).size
except InvalidImageError as e:
    size = f"refused: {str(e)[:40]}..."
print(json.dumps({"seconds": time.perf_counter() - started, "size": size, "peak_mb": (peak_kb() - before) / 1024}))
"""


def draw(mode: str, fmt: str, pixels: int) -> bytes:
    """A gradient image of ``pixels`` (square), encoded as ``fmt``."""
    side = math.isqrt(pixels)
    ramp = np.linspace(0, 1, side, dtype=np.float32)[None, :] * np.ones((side, 1), np.float32)
    if mode == "I;16":
        im = Image.fromarray((ramp * 65535).astype(np.uint16))
    else:
        im = Image.fromarray((ramp * 255).astype(np.uint8), "L").convert(mode)
    return encoded(im, fmt, **SAVE_OPTIONS.get(fmt, {}))


SAVE_OPTIONS: dict[str, dict[str, Any]] = {"JPEG": {"quality": 90}, "WEBP": {"lossless": True},
                                           "AVIF": {"speed": 10}}  # aom's fastest: the decode is what is timed


def understated_avif(pixels: int) -> bytes:
    """A flat AVIF of ``pixels`` (square, at most libavif's 16384x16384) whose ``ispe`` box says 100x100."""
    side = min(16_000, math.isqrt(pixels))
    data = bytearray(encoded(Image.new("RGB", (side, side), (200, 30, 30)), "AVIF", **SAVE_OPTIONS["AVIF"]))
    at = data.index(b"ispe") + 8  # after the box type and its version and flags
    data[at:at + 8] = struct.pack(">II", 100, 100)
    return bytes(data)


def many_scans(pixels: int) -> bytes:
    """A flat progressive JPEG of ``pixels`` whose scans are repeated to 250."""
    side = math.isqrt(pixels)
    data = encoded(Image.new("RGB", (side, side), (200, 30, 30)), "JPEG", progressive=True)
    first = data.index(b"\xff\xda")
    scans = data[first:-2]
    return data[:first] + scans * (250 // scans.count(b"\xff\xda")) + b"\xff\xd9"


def tiny(fmt: str) -> bytes:
    return encoded(Image.new("RGB" if fmt != "GIF" else "P", (8, 8)), fmt)


def gif_with_comments(n: int) -> bytes:
    data = tiny("GIF")
    table_end = 13 + (3 << ((data[10] & 7) + 1) if data[10] & 0x80 else 0)  # header, screen, colours
    return data[:table_end] + b"\x21\xfe\x00" * n + data[table_end:]


def png_chunk(kind: bytes, body: bytes = b"") -> bytes:
    return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")


# (name, file): what an attacker sends. The empty blocks go where Pillow reads them one by one.
HOSTILE: tuple[tuple[str, Callable[[int], bytes]], ...] = (
    ("progressive JPEG of 250 scans", many_scans),
    ("JPEG of 10 million empty comments", lambda _: tiny("JPEG")[:2] + b"\xff\xfe\x00\x02" * 10_000_000
     + tiny("JPEG")[2:]),
    ("PNG of 5 million empty chunks", lambda _: tiny("PNG")[:33] + png_chunk(b"prVt") * 5_000_000 + tiny("PNG")[33:]),
    ("GIF of 20 million empty comments", lambda _: gif_with_comments(20_000_000)),
    ("AVIF that says 100x100, 6x the cap inside", lambda cap: understated_avif(6 * cap)),
)


def decode_in_child(path: Path, max_pixels: int) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-c", _CHILD, str(path), str(max_pixels)], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"decoding {path.name} failed:\n{out.stderr}")
    return dict(json.loads(out.stdout))


def decoded_to(r: dict[str, Any]) -> str:
    return f"{r['size'][0]}x{r['size'][1]}" if isinstance(r["size"], list) else r["size"]


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--max-pixels", type=int, default=40_000_000, help="the cap, as serve's --max-pixels")
    args = p.parse_args()
    print(machine_line("cpu"))
    print("| image | pixels | file | decoded to | time | peak memory |\n|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, mode, fmt in KINDS:
            pixels = min(JPEG_PIXELS, 60 * args.max_pixels) if fmt == "JPEG" else args.max_pixels
            path = Path(tmp) / f"image.{fmt.lower()}"
            path.write_bytes(draw(mode, fmt, pixels))
            r = decode_in_child(path, args.max_pixels)
            side = math.isqrt(pixels)
            print(f"| {name} | {side}x{side} ({side * side / 1e6:.0f} MP) | {path.stat().st_size / 1e6:.2f} MB "
                  f"| {decoded_to(r)} | {r['seconds']:.2f} s | {r['peak_mb']:.0f} MB |")
        print("\n| hostile file | file | decoded to | time | peak memory |\n|---|---|---|---|---|")
        for name, build in HOSTILE:
            path = Path(tmp) / "hostile"
            path.write_bytes(build(args.max_pixels))
            r = decode_in_child(path, args.max_pixels)
            print(f"| {name} | {path.stat().st_size / 1e6:.2f} MB | {decoded_to(r)} | {r['seconds']:.2f} s "
                  f"| {r['peak_mb']:.0f} MB |")


if __name__ == "__main__":
    main()
