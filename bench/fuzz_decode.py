"""Fuzz the decode path: mutated files of every allowed format, each decoded once.

Seeds of each format (plain, with alpha, greyscale, palette, animated, EXIF-rotated, 16-bit,
progressive, compressed: what the format has) are drawn here and mutated at random (bytes
overwritten, boundary values such as 0xFFFFFFFF written over lengths, runs deleted or inserted,
the file cut short), then decoded through `pictor.core.decode`, the one decode path of server,
indexer and trainer, in a child process that decodes one case after another. Each case must end
as an image or as `InvalidImageError` (what the server answers as INVALID_ARGUMENT and a batch
run skips); anything else is "unexpected", a child that dies is a crash (a server would die
with it) and one that takes longer than --timeout a hang. Such cases are kept under --keep to
reproduce.

Run from the project root, under the shared CPU lock::

    flock /tmp/pictor-cpu.lock .venv/bin/python bench/fuzz_decode.py --cases 20000
"""

from __future__ import annotations

import json
import random
import select
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from PIL import Image, ImageDraw

from common import encoded, machine_line, parser

# One case per line in, one JSON outcome per line out; a cap of 4 MP keeps memory small.
_CHILD = """
import json, sys, warnings
warnings.simplefilter("ignore")  # Pillow's about the damaged files: what they are
from pictor.core.decode import decode_image
from pictor.errors import InvalidImageError
for line in sys.stdin:
    try:
        decode_image(open(line.strip(), "rb").read(), max_pixels=4_000_000, draft_size=(256, 256))
        outcome = "decoded"
    except InvalidImageError:
        outcome = "refused"
    except BaseException as e:
        outcome = f"unexpected {type(e).__name__}: {e}"
    print(json.dumps(outcome), flush=True)
"""

# Values written over 4 bytes: lengths, sizes and counts at their edges.
_EDGES = (b"\xff\xff\xff\xff", b"\x00\x00\x00\x00", b"\x7f\xff\xff\xff", b"\x00\x00\x00\x01", b"\x80\x00\x00\x00")


def drawn(mode: str = "RGB", size: tuple[int, int] = (96, 64)) -> Image.Image:
    im = Image.new("RGB", size, (30, 120, 200))
    draw = ImageDraw.Draw(im)
    draw.ellipse((10, 8, 60, 50), fill=(230, 60, 40))
    draw.rectangle((50, 20, 90, 60), fill=(250, 220, 30))
    if mode == "RGBA":
        im.putalpha(Image.linear_gradient("L").resize(size))
    elif mode == "I;16":
        return im.convert("L").point(lambda v: v * 40).convert("I;16")
    return im if mode in ("RGB", "RGBA") else im.convert(mode)


def animated(fmt: str) -> bytes:
    frames = [drawn(), drawn().rotate(90)]
    return encoded(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100)


def rotated(fmt: str) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    return encoded(drawn(), fmt, exif=exif.tobytes())


# Seeds by format: what users send in each.
SEEDS: dict[str, tuple[Callable[[], bytes], ...]] = {
    "JPEG": (lambda: encoded(drawn(), "JPEG"), lambda: encoded(drawn(), "JPEG", progressive=True),
             lambda: rotated("JPEG"), lambda: encoded(drawn("CMYK"), "JPEG"), lambda: encoded(drawn("L"), "JPEG")),
    "PNG": (lambda: encoded(drawn(), "PNG"), lambda: encoded(drawn("RGBA"), "PNG"), lambda: encoded(drawn("P"), "PNG"),
            lambda: encoded(drawn("I;16"), "PNG"), lambda: encoded(drawn(), "PNG", icc_profile=b"x" * 64)),
    "WEBP": (lambda: encoded(drawn(), "WEBP"), lambda: encoded(drawn("RGBA"), "WEBP", lossless=True),
             lambda: animated("WEBP")),
    "GIF": (lambda: encoded(drawn("P"), "GIF"), lambda: animated("GIF")),
    "BMP": (lambda: encoded(drawn(), "BMP"), lambda: encoded(drawn("P"), "BMP")),
    "TIFF": (lambda: encoded(drawn(), "TIFF"), lambda: encoded(drawn("RGBA"), "TIFF", compression="tiff_lzw"),
             lambda: encoded(drawn("I;16"), "TIFF"), lambda: encoded(drawn("CMYK"), "TIFF", compression="tiff_deflate")),
    "AVIF": (lambda: encoded(drawn(), "AVIF"), lambda: encoded(drawn("RGBA"), "AVIF"), lambda: animated("AVIF"),
             lambda: rotated("AVIF"), lambda: encoded(drawn("L"), "AVIF")),
}


def mutated(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    for _ in range(rng.choice((1, 1, 2, 4, 8, 16))):
        at, op = rng.randrange(len(out)), rng.random()
        if op < 0.5:
            out[at] = rng.randrange(256)
        elif op < 0.65:
            out[at:at + 4] = rng.choice(_EDGES)
        elif op < 0.8:
            del out[at:at + rng.randrange(1, 64)]
        elif op < 0.9:
            out[at:at] = rng.randbytes(rng.randrange(1, 32))
        else:
            del out[at:]
        if not out:
            out = bytearray(b"\0")
    return bytes(out)


class Decoder:
    """A child decoding one case at a time; restarted after a crash or a hang."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.proc: subprocess.Popen[str] | None = None

    def decode(self, path: Path) -> str:
        if self.proc is None:
            # (stderr: libtiff's and libjpeg's lines about the damage)
            self.proc = subprocess.Popen([sys.executable, "-c", _CHILD], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.write(f"{path}\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass
        ready, _, _ = select.select([self.proc.stdout], [], [], self.timeout)
        line = self.proc.stdout.readline() if ready else ""
        if line:
            return str(json.loads(line))
        self.proc.kill()
        code = self.proc.wait()
        self.proc = None
        return "hung" if not ready else f"crashed (exit {code})"

    def close(self) -> None:
        if self.proc is not None:
            self.proc.stdin.close()  # type: ignore[union-attr]
            self.proc.wait()


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--cases", type=int, default=2000, help="mutated files per format")
    p.add_argument("--formats", default=",".join(SEEDS), help="comma-separated, of " + ", ".join(SEEDS))
    p.add_argument("--seed", type=int, default=0, help="of the mutations")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds one case may take before it counts as a hang")
    p.add_argument("--keep", type=Path, default=Path("fuzz-cases"), help="where cases that fail are kept")
    args = p.parse_args()
    rng = random.Random(args.seed)
    print(machine_line("cpu"))
    print("| format | cases | decoded | refused | unexpected | crashed | hung |\n|---|---:|---:|---:|---:|---:|---:|")
    found = []
    decoder = Decoder(args.timeout)
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in args.formats.split(","):
            seeds = [make() for make in SEEDS[fmt]]
            counts: Counter[str] = Counter()
            for i in range(args.cases):
                case = Path(tmp) / f"{fmt.lower()}-{i}"
                case.write_bytes(mutated(rng.choice(seeds), rng))
                outcome = decoder.decode(case)
                kind = outcome.split(" ")[0]
                counts[kind] += 1
                if kind not in ("decoded", "refused"):
                    args.keep.mkdir(parents=True, exist_ok=True)
                    kept = args.keep / case.name
                    kept.write_bytes(case.read_bytes())
                    found.append(f"{kept}: {outcome}")
            print(f"| {fmt} | {args.cases:,} | {counts['decoded']:,} | {counts['refused']:,} | {counts['unexpected']} "
                  f"| {counts['crashed']} | {counts['hung']} |", flush=True)
    decoder.close()
    for line in found:
        print(line)


if __name__ == "__main__":
    main()
