"""Image bytes -> RGB PIL image, safely: the one decode path of Pictor (Pillow only).

What users really send: phone photos with an EXIF rotation, camera exports in Adobe RGB or
ProPhoto RGB (an ICC profile: converted to sRGB, as a viewer shows them), emoji with alpha,
palette GIFs, CMYK and 16-bit scans, animated GIF/WebP, AVIF from phones and the web, and now
and then a corrupt, truncated or hostile file. Every such file either becomes a plain RGB image
or raises ``InvalidImageError`` saying what was wrong. The pixel cap is checked on the header,
before any pixel is decoded (an AVIF's may understate its AV1 frame: docs/benchmarks.md, "Decoding").

Example::

    from pictor.core.decode import load_image
    img = load_image("photo.jpg", draft_size=(256, 256))  # RGB, upright, JPEG decoded at 1/8
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Literal, NamedTuple, cast

import numpy as np
from PIL import AvifImagePlugin, Image, ImageCms, ImageOps, UnidentifiedImageError, WebPImagePlugin

from pictor.config import DEFAULT_MAX_PIXELS
from pictor.errors import InvalidImageError, InvalidRequestError, shown
from pictor.image_files import read_image_file

log = logging.getLogger(__name__)

# What a file decodes to, as a version: caches of embeddings (the trainer's) key on it, so
# bump it whenever some file decodes to other pixels. "draft": large JPEGs decoded at reduced
# size; 2: MPO photos drafted too, float images above 255 scaled to their maximum; 3: 32-bit
# integer images above 16 bits too; 4: RGB pixels of an ICC profile other than sRGB converted
# to sRGB; 5: palette and colour-keyed images' too, sRGB told by what a profile does to colours;
# 6: integer greyscale scaled by the bits its values use (8, 10, 12, 14 or 16), not always 16.
DECODE_VERSION = "6"

# Formats Pillow may parse. Never EPS (runs Ghostscript), PDF, PSD, ICO, SVG and the like.
ALLOWED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF")

# Magic numbers of formats we refuse, only to name them in the error message.
_KNOWN_DISALLOWED: tuple[tuple[bytes, str], ...] = (
    (b"%PDF", "PDF"),
    (b"%!PS", "EPS/PostScript"),
    (b"\xc5\xd0\xd3\xc6", "EPS"),
    (b"8BPS", "PSD"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"icns", "ICNS"),
    (b"DDS ", "DDS"),
    (b"qoif", "QOI"),
    (b"<svg", "SVG"),
    (b"<?xml", "XML/SVG"),
)
# Magic numbers of the allowed formats: a file that starts like one but does not open has a
# damaged header (a flipped byte fails a PNG's header checksum), not an unknown format.
_ALLOWED_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF8", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)
# Brands of ISO media images (HEIF's, AVIF's) in their ftyp box: AVIF (AV1-coded) is allowed,
# HEIC (HEVC-coded: an iPhone's photos) is not, as Pillow cannot read it.
_AVIF_BRANDS = frozenset({b"avif", b"avis"})
_HEIC_BRANDS = frozenset({b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx"})

# Errors Pillow's decoders raise on bad data (EOFError for cut streams, SyntaxError from
# some plugins' header parsers, struct.error from short reads).
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, IndexError, TypeError)


def _bad_data(e: BaseException, fmt: str | None = None) -> bool:
    """Whether ``e`` is a decoder's complaint about the bytes. Pillow's OSErrors carry no errno;
    one that does is the machine's (too many open files while Pillow imported a plugin: a valid
    PNG was called corrupt), not the image's fault. libavif's complaints come as RuntimeErrors
    ("Failed to decode frame 0: Decoding of color planes failed"), and a frame's time scale of 0
    as Pillow's ZeroDivisionError."""
    if fmt == "AVIF" and isinstance(e, RuntimeError | ArithmeticError):
        return True
    return isinstance(e, _DECODE_ERRORS) and not (isinstance(e, OSError) and e.errno is not None)


# Pixels of a high-depth image scaled at once (a 4 MB float32 block).
_DEPTH_BLOCK_PIXELS = 1 << 20

# Scans a JPEG may hold (start-of-scan markers). A progressive decoder goes over the whole image
# once per scan: a 221 KB file of 20,000 tiny scans ran for minutes. Encoders write about 10;
# 256 is NVIDIA nvImageCodec's default limit (NVIMGCODEC_MAX_JPEG_SCANS), against the same attack.
MAX_JPEG_SCANS = 256
# ... and fewer for a large image: scans x pixels at most this, 64 scans at the default cap (a
# 40 MP file of 250 scans decoded in 7 s, and seven at once held the server's threads for 55 s).
JPEG_SCAN_PIXELS = 64 * DEFAULT_MAX_PIXELS
_MIN_JPEG_SCANS = 32  # whatever the image's size: what encoders write, with room to spare
# Segments of a JPEG, chunks of a PNG, blocks of a GIF (and stray bytes between them): Pillow
# reads them one by one in Python, and a file can be millions of empty ones (a 60 MB PNG of 5
# million took 28 s and 0.7 GB, a 40 MB JPEG of 10 million comments 22 s). Images hold a few:
# a file of more than this many, and one per KB beyond them, is refused before Pillow opens it.
_MAX_BLOCKS = 4096
_BYTES_PER_BLOCK = 1024  # libpng writes 8 KB chunks of pixels
# A GIF's blocks cost Pillow under 1 us each, and an XMP packet is written as one sub-block per
# ~33 bytes (its bytes read as lengths): one per 16 bytes.
_GIF_BYTES_PER_BLOCK = 16
_JPEG_MAGIC = b"\xff\xd8\xff"
_FILL = re.compile(rb"\xff+")  # a JPEG's fill bytes before a marker
# SOF markers of progressive JPEGs (Huffman and arithmetic coded).
_PROGRESSIVE_SOF = frozenset({0xC2, 0xC6, 0xCA, 0xCE})

_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})

# Our cap (``_check_size``, on the header, counting a JPEG at its draft size) replaces
# Pillow's process-wide one, which counts the full size: with it a 180 MP JPEG that decodes
# at 1/8 to 2.8 MP is refused, and images between its two limits print a raw warning.
Image.MAX_IMAGE_PIXELS = None


def _check_limits(max_pixels: int, draft_size: tuple[int, int] | None) -> None:
    """The caller's limits, as whole numbers: a NaN cap would let any image through."""
    if type(max_pixels) is not int or max_pixels < 1:
        raise InvalidRequestError(f"max_pixels must be a whole number of at least 1, got {shown(max_pixels, 40)}")
    if draft_size is not None and not (isinstance(draft_size, tuple | list) and len(draft_size) == 2
                                       and all(type(n) is int and n >= 1 for n in draft_size)):
        raise InvalidRequestError(f"draft_size must be (width, height) in whole pixels, got {shown(draft_size, 40)}")


def decode_image(
    data: bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft_size: tuple[int, int] | None = None,
) -> Image.Image:
    """Decode image bytes into an upright RGB image.

    Args:
        data: the encoded file (JPEG, PNG, WebP, GIF, BMP, TIFF or AVIF).
        max_pixels: refuse images that would decode to more pixels than this (from the
            header, before decoding; a drafted JPEG counts at its reduced size).
        draft_size: (width, height) the caller will shrink the image to; a JPEG much larger
            than that is decoded at 1/2, 1/4 or 1/8 scale (never below this size).

    Returns:
        A loaded RGB ``PIL.Image.Image``: first frame, EXIF orientation applied, colours in
        sRGB, alpha composited on white.

    Raises:
        InvalidImageError: empty, unrecognised, disallowed, oversized, corrupt or truncated.
    """
    _check_limits(max_pixels, draft_size)
    src = _open_within_cap(data, max_pixels, draft_size)
    try:
        src.load()  # frame 0: animated GIF/WebP/TIFF give their first frame
        # In place: an upright image is not copied (a 40 MP RGB copy is 120 MB more).
        ImageOps.exif_transpose(src, in_place=True)
        # After to_rgb: a palette image, or an RGB one with a colour key, holds RGB pixels of its
        # profile too, and the transform would drop the key (its info).
        out = in_srgb(to_rgb(src), src.info.get("icc_profile"))
    except BaseException as e:
        src.close()
        if _bad_data(e, src.format):
            cut = _avif_cut_short(data) if src.format == "AVIF" else None
            raise InvalidImageError(cut or _describe_decode_error(src.format, e, len(data), "image")) from e
        raise
    if out is not src:  # an RGB image is returned as decoded: closing it would empty it
        src.close()
    return out


def check_pixels(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                 draft_size: tuple[int, int] | None = None) -> None:
    """Raise ``InvalidImageError`` where ``decode_image`` would refuse ``data`` by its header
    (format, size over the cap), without decoding a pixel: for images embedded before."""
    _open_within_cap(data, max_pixels, draft_size).close()


def _open_within_cap(data: bytes, max_pixels: int, draft_size: tuple[int, int] | None) -> Image.Image:
    """``data`` opened (header only), drafted when a JPEG, and checked against the cap."""
    if not data:
        raise InvalidImageError("empty image data (0 bytes)")
    _check_tiff_chunks(data, max_pixels)  # before Pillow, whose opening is what they cost
    jpeg = _read_jpeg_header(data) if data.startswith(_JPEG_MAGIC) else None  # likewise
    _check_blocks(data)
    if _sniff_allowed(data) == "WEBP" and (canvas := _webp_canvas(data[:30])):
        # libwebp allocates the canvas, twice, as Pillow opens the file (2 GB at 16383x16383;
        # under a memory limit the opening failed as a "corrupt header")
        _check_size("WEBP", canvas, max_pixels, canvas)
    src = _open_allowed(data)
    try:
        # The cap bounds decoding memory: a drafted JPEG (a 48 MP phone photo decodes at 1/8,
        # 0.75 MP) is checked at the size it will decode to.
        full = src.size
        # (MPO: a JPEG with more images after it, a phone's depth or gain map: Pillow opens it
        # as a JPEG of its first image, which drafts alike.)
        whole = False
        if src.format in ("JPEG", "MPO") and jpeg is not None:  # (Pillow's test is the same magic)
            # (Only such a file has more scans: libjpeg ends a single-scan one at a second.)
            if whole := jpeg.whole_image:
                _check_scans(data, jpeg.first_scan, full[0] * full[1])
            if draft_size is not None:
                _draft(src, draft_size)
        _check_size(src.format, src.size, max_pixels, full, whole=whole)
    except BaseException:
        src.close()
        raise
    return src


def load_image(
    path: str | os.PathLike[str],
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft_size: tuple[int, int] | None = None,
    data: bytes | None = None,
) -> Image.Image:
    """Read (unless ``data`` holds the file's bytes, read already by ``read_image_file``) and
    decode an image file; see ``decode_image``. Errors name the path."""
    if data is None:
        data = read_image_file(path)
    try:
        return decode_image(data, max_pixels=max_pixels, draft_size=draft_size)
    except InvalidImageError as e:
        raise InvalidImageError(f"{Path(path)}: {e}") from e


def in_srgb(im: Image.Image, icc: bytes | None) -> Image.Image:
    """An RGB image whose pixels are in the colour space of the ICC profile ``icc``, converted
    to sRGB (a new image); as it is without a profile or with one that is sRGB, not RGB or not
    readable. Unconverted, a ProPhoto or Adobe RGB photo embeds as another image than its sRGB
    export (cosine 0.90-0.99, 0.984 on average for the flower photos; converted: 0.991, the
    JPEG re-encoding's own loss: docs/benchmarks.md, "Colour profiles")."""
    if not icc:
        return im
    transform = _to_srgb_transform(bytes(icc))
    return im if transform is None else transform.apply(im)


def _to_srgb_transform(icc: bytes) -> ImageCms.ImageCmsTransform | None:
    """The transform from the profile ``icc`` to sRGB, built once per profile (milliseconds),
    or None: the profile is sRGB in effect (most are: no work), not an RGB profile, or one
    LittleCMS cannot read (the pixels kept as they are rather than the image refused)."""
    digest = hashlib.sha256(icc).digest()  # (a key of the profile itself would hold up to 16 MB)
    if (known := _transforms.get(digest, _UNSEEN)) is not _UNSEEN:
        return cast(ImageCms.ImageCmsTransform | None, known)
    transform = None  # (threads may build one twice: no harm, and no lock)
    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        if profile.profile.xcolor_space == "RGB ":
            transform = ImageCms.buildTransform(profile, _SRGB, "RGB", "RGB", flags=_TRANSFORM_FLAGS)
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError) as e:
        log.debug("ICC profile ignored: %s", e)
    if transform is not None and not _moves_colours(transform):
        transform = None
    if len(_transforms) >= _MAX_TRANSFORMS:  # a gallery holds a few profiles; a flood of new ones
        _transforms.clear()
    _transforms[digest] = transform
    return transform


def _moves_colours(transform: ImageCms.ImageCmsTransform) -> bool:
    """Whether ``transform`` changes some colour of a grid of 4,096 by more than 2 levels: the
    sRGB profiles cameras and editors embed (under a dozen names) move none by more than 1,
    the nearest other one of the flower photos' profiles 9 levels, Adobe RGB 136."""
    return bool(np.abs(np.asarray(transform.apply(_PROBE), np.int16) - _PROBE_PIXELS).max() > 2)


_transforms: dict[bytes, ImageCms.ImageCmsTransform | None] = {}  # by the profile's sha256
_UNSEEN = object()
_MAX_TRANSFORMS = 64
_PROBE_PIXELS = np.stack(np.meshgrid(*[np.arange(0, 256, 17, dtype=np.int16)] * 3, indexing="ij"), -1).reshape(1, -1, 3)
_PROBE = Image.fromarray(_PROBE_PIXELS.astype(np.uint8), "RGB")
_SRGB = ImageCms.createProfile("sRGB")
# NOCACHE: no last pixel kept in the transform, which threads decoding at once would share;
# HIGHRESPRECALC: a lookup table, the same pixels as without it on the flower photos' profiles,
# a third faster (3.6 ms for a 0.17 MP photo on machine A).
_TRANSFORM_FLAGS = ImageCms.Flags.NOCACHE | ImageCms.Flags.HIGHRESPRECALC


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert a loaded image of any Pillow mode to RGB, compositing transparency on white."""
    if im.mode == "RGB" and "transparency" not in im.info:  # else a colour key: composited below
        return im
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return _high_depth_to_rgb(im)
    if im.mode in _ALPHA_MODES or "transparency" in im.info:
        # Pasted on white through its own alpha (the same pixels as Image.alpha_composite):
        # the composite's RGBA copies made a 40 MP PNG's decode peak at 0.9 GB, this at 0.5.
        rgba = im if im.mode == "RGBA" else im.convert("RGBA")
        out = Image.new("RGB", rgba.size, (255, 255, 255))
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    # "1", "L", "P", "CMYK", "YCbCr", "LAB", "HSV": Pillow's own conversions are right.
    return im.convert("RGB")


def _open_allowed(data: bytes) -> Image.Image:
    """Open lazily (header only) with the allowlisted plugins, or say why not."""
    try:
        im = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except UnidentifiedImageError as e:
        raise _unopened(data) from e
    except RuntimeError as e:  # libavif's, through Pillow's AVIF plugin, which takes ISO media files
        if _iso_media_format(data) is None:
            raise
        raise _unopened(data, f": {e}") from e
    except _DECODE_ERRORS as e:
        if not _bad_data(e):
            raise
        fmt = _sniff_allowed(data)
        if fmt == "WEBP" and (riff := 8 + int.from_bytes(data[4:8], "little")) > len(data):
            # (libwebp's word for a file cut short, a failed download's, is "could not create decoder")
            raise InvalidImageError(f"truncated WEBP image data: the file is {len(data):,} bytes, its header "
                                    f"says {riff:,}") from e
        raise InvalidImageError(_describe_decode_error(fmt, e, len(data), "header")) from e
    return im


def _unopened(data: bytes, why: str = "") -> InvalidImageError:
    """Why no allowed plugin opened ``data`` (``why``: the plugin's own words, if any)."""
    allowed = ", ".join(ALLOWED_FORMATS)
    tiff = _read_tiff_header(data) if (damaged := _sniff_allowed(data)) == "TIFF" else None
    if tiff is not None and tiff.first_directory >= len(data):
        # (a TIFF written in one go has its directory after the pixels: a cut file lost it)
        return InvalidImageError(f"truncated TIFF image data: the file is {len(data):,} bytes, its header "
                                 f"puts its directory at byte {tiff.first_directory:,}")
    if damaged == "AVIF" and not AvifImagePlugin.SUPPORTED:
        return InvalidImageError("AVIF images need a Pillow built with libavif (its wheels are); this one "
                                 "is not: convert the image to JPEG or PNG")
    if damaged == "AVIF" and (cut := _avif_cut_short(data)):
        return InvalidImageError(cut)
    if damaged:
        return InvalidImageError(f"corrupt {damaged} image: it starts as one, but its header cannot be read "
                                 f"({len(data)} bytes){why}")
    if known := _sniff_disallowed(data):
        return InvalidImageError(f"image format {known} is not allowed (allowed: {allowed}); convert it to one of those")
    return InvalidImageError(f"not a recognised image ({len(data)} bytes); allowed formats: {allowed}")


def _sniff_allowed(data: bytes) -> str | None:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if _iso_media_format(data) == "AVIF":
        return "AVIF"
    return next((name for magic, name in _ALLOWED_MAGIC if data.startswith(magic)), None)


def _sniff_disallowed(data: bytes) -> str | None:
    head = data[:64].lstrip()
    for magic, name in _KNOWN_DISALLOWED:
        if head.startswith(magic):
            return name
    iso = _iso_media_format(data)
    return iso if iso != "AVIF" else None


def _iso_media_format(data: bytes) -> str | None:
    """AVIF, HEIC, HEIF or other ISO media, by the brands of the ftyp box it starts with (the
    major brand first, then the compatible ones); None for a file that is not ISO media."""
    if data[4:8] != b"ftyp":
        return None
    end = min(int.from_bytes(data[:4], "big"), len(data), 256)
    brands = [data[8:12], *(data[i:i + 4] for i in range(16, end - 3, 4))]
    for brand in brands:
        if brand in _AVIF_BRANDS:
            return "AVIF"
        if brand in _HEIC_BRANDS:
            return "HEIC"
    return "HEIF" if {b"mif1", b"msf1"} & set(brands) else "ISO media (MP4, MOV)"


def _avif_cut_short(data: bytes) -> str | None:
    """What to say of an AVIF whose boxes run past its end (libavif says "BMFF parsing failed")."""
    if (end := _iso_media_end(data)) <= len(data):
        return None
    return f"truncated AVIF image data: the file is {len(data):,} bytes, its boxes say {end:,}"


def _iso_media_end(data: bytes) -> int:
    """Where an ISO media file's top-level boxes say it ends: past the end of ``data`` when it
    was cut short (as far as its first 4,096 boxes tell)."""
    at = 0
    for _ in range(_MAX_BLOCKS):
        if at >= len(data):
            return at
        if at + 8 > len(data):  # cut inside a box's header
            return at + 8
        size = int.from_bytes(data[at:at + 4], "big")
        if size == 1:  # the size is a 64-bit one after the type
            size = int.from_bytes(data[at + 8:at + 16], "big") if at + 16 <= len(data) else 16
        if size < 8:  # 0: the last box, to the end of the file; 2 to 7: damaged, not cut
            return len(data)
        at += size
    return len(data)


def _check_size(fmt: str | None, size: tuple[int, int], max_pixels: int, full: tuple[int, int], *,
                whole: bool = False) -> None:
    """An image of ``full`` size decoded at ``size``. ``whole``: the decoder holds every pixel
    of the full size, whatever size it decodes at."""
    w, h = size
    if w <= 0 or h <= 0:
        raise InvalidImageError(f"{fmt} image has an empty size {w}x{h}")
    if max(w, h) >= 1 << 31:  # a BMP's width of -1 reads as 4294967295
        raise InvalidImageError(f"{fmt} image has an impossible size {w}x{h}: its header is damaged")
    pixels = full[0] * full[1] if whole else w * h
    if pixels > max_pixels:
        drafted = f" (decoded at {w}x{h})" if (w, h) != full and not whole else ""
        raise InvalidImageError(
            f"{fmt} image is too large: {full[0]}x{full[1]}{drafted} = {pixels:,} pixels"
            f"{'' if whole else ' to decode'}, above the cap of {max_pixels:,} pixels (--max-pixels of serve, "
            "index, train and eval, PICTOR_MAX_PIXELS)"
            + ("; a progressive or multi-scan JPEG counts at its full size, as its decoder holds all of it"
               if whole else "")
        )


# Pillow's own reading of a WebP's canvas size from its header (private: without it, no check
# before opening, and tests/test_decode.py says so).
_webp_canvas = getattr(WebPImagePlugin, "_get_size", lambda header: None)


def _check_tiff_chunks(data: bytes, max_pixels: int) -> None:
    # Pillow reads a TIFF's strip (or tile) offsets in Python as it opens it: an 8 MB file of a
    # million one-row strips took 5 s to open and 6 more to decode. One per 256 pixels of the cap
    # covers one-row strips of any image 256 wide and 16x16 tiles, the smallest there are.
    if data[:4] not in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return
    chunks, limit = _tiff_chunks(data), max(1, max_pixels // 256)
    if chunks > limit:
        raise InvalidImageError(f"TIFF image is stored in {chunks:,} strips or tiles, more than the {limit:,} "
                                "Pictor reads (one per 256 pixels of --max-pixels; each costs time to open "
                                "and decode)")


def _tiff_chunks(data: bytes) -> int:
    """Strips or tiles of a TIFF's first image, as its header counts them (0 where it cannot
    be read: Pillow then says what is wrong)."""
    if (tiff := _read_tiff_header(data)) is None:
        return 0
    order, ifd = tiff.order, tiff.first_directory
    try:
        if tiff.classic:  # 32-bit offsets, 12-byte entries
            (n,) = struct.unpack_from(order + "H", data, ifd)
            first, size, entry = ifd + 2, 12, order + "HHI"
        else:  # BigTIFF: 64-bit offsets, 20-byte entries
            (n,) = struct.unpack_from(order + "Q", data, ifd)
            first, size, entry = ifd + 8, 20, order + "HHQ"
        entries = (struct.unpack_from(entry, data, first + i * size) for i in range(min(n, 4096)))
        return max((count for tag, _, count in entries if tag in (273, 324)), default=0)  # Strip/TileOffsets
    except struct.error:
        return 0


class _TiffHeader(NamedTuple):
    order: str  # struct's byte order: "<" or ">"
    classic: bool  # 32-bit offsets (else BigTIFF's 64-bit ones)
    first_directory: int  # where the first image's directory starts


def _read_tiff_header(data: bytes) -> _TiffHeader | None:
    """A TIFF's (or BigTIFF's) header; None where it is cut short."""
    order = "<" if data[:2] == b"II" else ">"
    classic = data[2:4] in (b"*\x00", b"\x00*")
    try:
        (ifd,) = struct.unpack_from(order + ("I" if classic else "Q"), data, 4 if classic else 8)
    except struct.error:
        return None
    return _TiffHeader(order, classic, int(ifd))


def _check_scans(data: bytes, first_scan: int, pixels: int) -> None:
    # Entropy-coded data stuffs a 0x00 after each 0xFF, so every FF DA from the first scan on is
    # a marker (not before it: an ICC profile's bytes in APP2 segments hold FF DA too).
    scans = data.count(b"\xff\xda", first_scan)
    limit = min(MAX_JPEG_SCANS, max(_MIN_JPEG_SCANS, JPEG_SCAN_PIXELS // max(1, pixels)))
    if scans > limit:
        raise InvalidImageError(f"JPEG image has {scans:,} scans, more than the {limit} Pictor decodes for "
                                f"{pixels:,} pixels (encoders write about 10; each costs a pass over the whole "
                                "image)")


def _check_blocks(data: bytes) -> None:
    """Refuse a PNG or GIF of more chunks or blocks than Pillow should walk (a JPEG's segments:
    ``_read_jpeg_header``)."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        _check_png_chunks(data)
    elif data.startswith(b"GIF8"):
        _check_gif_blocks(data)


def _block_limit(data: bytes, bytes_per_block: int = _BYTES_PER_BLOCK) -> int:
    return _MAX_BLOCKS + len(data) // bytes_per_block


def _too_many(fmt: str, what: str, limit: int, data: bytes) -> InvalidImageError:
    return InvalidImageError(f"{fmt} image has more than {limit:,} {what} ({len(data):,} bytes; images hold "
                             "a few): each costs time to read, so Pictor refuses such a file")


def _jpeg_segments(data: bytes) -> Iterator[tuple[int, int]]:
    """(marker, position of its FF) of a JPEG's segments up to its first scan (SOS, included);
    fewer where the header is damaged (the decoder will say so). More segments and stray bytes
    than ``_block_limit`` raise ``InvalidImageError``."""
    limit, pos, steps = _block_limit(data), 2, 0
    while (at := data.find(b"\xff", pos)) >= 0:
        seg = cast(re.Match[bytes], _FILL.match(data, at)).end() - 1  # the last FF of a run of fill bytes
        steps += 1 + seg - pos  # this segment and each stray or fill byte before it
        if steps > limit:
            raise _too_many("JPEG", "segments or stray bytes before its first scan", limit, data)
        if seg + 4 >= len(data):
            return
        marker = data[seg + 1]
        if marker == 0x00:  # a stray FF 00
            pos = seg + 2
            continue
        yield marker, seg
        if marker == 0xDA:
            return
        # RST0-7, SOI and EOI stand alone; every other segment says its length
        pos = seg + 2 + (0 if 0xD0 <= marker <= 0xD9 else int.from_bytes(data[seg + 2:seg + 4], "big"))


def _check_png_chunks(data: bytes) -> None:
    """A PNG's chunks as Pillow reads them: up to IEND, or in an animated PNG to its second
    frame (animated as Pillow tells it: the frame count of one valid acTL before the pixels,
    plus the default image when no fcTL precedes them, above 1)."""
    limit, pos, chunks = _block_limit(data), 8, 0
    frames: int | None = None
    control_seen = pixels_seen = animated = False
    while pos + 8 <= len(data):
        chunks += 1
        if chunks > limit:
            raise _too_many("PNG", "chunks", limit, data)
        kind = data[pos + 4:pos + 8]
        if kind == b"IEND" or (kind == b"fcTL" and animated):
            return
        if kind == b"acTL" and not pixels_seen:  # a second one makes the file a still image
            count = int.from_bytes(data[pos + 8:pos + 12], "big")
            frames = count if frames is None and 0 < count <= 0x80000000 else None
        elif kind == b"fcTL":
            control_seen = True
        elif kind == b"IDAT" and not pixels_seen:
            pixels_seen = True
            animated = frames is not None and frames + (not control_seen) > 1
        pos += 12 + int.from_bytes(data[pos:pos + 4], "big")  # length, type, data, CRC


def _check_gif_blocks(data: bytes) -> None:
    """A GIF's extensions, their sub-blocks and stray bytes before its first image."""
    limit, pos, blocks = _block_limit(data, _GIF_BYTES_PER_BLOCK), 13, 0  # after the header and screen descriptor
    if len(data) > 10 and data[10] & 0x80:  # a global colour table
        pos += 3 << ((data[10] & 7) + 1)
    while pos < len(data) and data[pos] not in (0x2C, 0x3B):  # the first image, or the end
        blocks += 1
        if data[pos] == 0x21:  # an extension: its label, then sub-blocks up to an empty one
            pos += 2
            while pos < len(data) and data[pos] and blocks <= limit:
                blocks += 1
                pos += data[pos] + 1
        pos += 1  # past the empty sub-block, or a stray byte (Pillow reads past it one at a time)
        if blocks > limit:
            raise _too_many("GIF", "blocks or stray bytes before its first image", limit, data)


class _JpegHeader(NamedTuple):
    first_scan: int  # where the first SOS segment starts (the file's end when it has none)
    whole_image: bool  # libjpeg buffers the coefficients of the whole image to decode it


def _read_jpeg_header(data: bytes) -> _JpegHeader:
    """A JPEG's header, walked once up to its first scan (``_jpeg_segments`` refuses more
    segments than Pillow should walk). The whole image is held when the file is progressive
    or its first scan lacks a component (a sequential JPEG of several scans): a 1 KB
    progressive file claiming 50000x50000 decodes at 1/8 under the cap, in 7 GB."""
    components, progressive = 0, False
    for marker, pos in _jpeg_segments(data):
        if marker in _PROGRESSIVE_SOF:
            progressive = True
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC) and pos + 9 < len(data):
            components = data[pos + 9]  # SOF: FF Cn, length, precision, height, width, Nf
        elif marker == 0xDA:  # SOS: FF DA, length, Ns
            return _JpegHeader(pos, progressive or data[pos + 4] < components)
    return _JpegHeader(len(data), progressive)  # a damaged header: the decoder will say so


def _draft(im: Image.Image, draft_size: tuple[int, int]) -> None:
    # JPEG DCT scaling: decodes at 1/2, 1/4 or 1/8 while keeping both sides >= draft_size.
    # EXIF rotation comes later, so ask for a square that covers either orientation.
    side = max(int(draft_size[0]), int(draft_size[1]), 1)
    before = im.size
    im.draft("RGB", (side, side))
    if im.size != before:
        log.debug("JPEG draft: %s decoded at %s", before, im.size)


def _high_depth_to_rgb(im: Image.Image) -> Image.Image:
    """16-bit and 32-bit grayscale to 8-bit RGB by scaling (Pillow's convert would clip).

    Scaled a block of rows at a time: float64 copies of the whole image made the decode of
    a 40 MP 16-bit PNG (78 KB of file) peak at 1.3 GB, blocks at 0.4 GB.
    """
    src = np.asarray(im)  # uint16, int32 or float32, as Pillow holds it
    key = im.info.get("transparency")
    key = key if isinstance(key, int) else None  # a PNG's see-through grey level: white below
    top = _finite_max(src, leaving_out=key)
    if im.mode == "F" and top <= 1.0:
        scale = 255.0  # float images are usually 0..1
    elif im.mode == "F" and top <= 255.0:
        scale = 1.0
    elif im.mode == "F" or top > 65535.0:
        scale = 255.0 / top  # a measurement (depth, counts) has no white: its maximum is
    else:
        scale = 255.0 / _white_level(top)
    out = np.empty(src.shape, np.uint8)
    with np.errstate(over="ignore", invalid="ignore"):  # -3e38 x 255 is -inf: clipped to 0 anyway
        for rows in _row_blocks(src):
            block = src[rows].astype(np.float32) * np.float32(scale)
            np.clip(block, 0.0, 255.0, out=block)
            np.nan_to_num(block, copy=False)
            out[rows] = np.rint(block, out=block)
    if key is not None:  # on white, as other transparency
        out[src == key] = 255
    return Image.fromarray(out, mode="L").convert("RGB")


def _white_level(top: float) -> int:
    """White for integer pixels whose largest value is ``top``: 2**bits - 1 for the fewest of
    8, 10, 12, 14 or 16 bits that hold it. Scientific cameras write 10-, 12- or 14-bit
    samples into 16-bit files unscaled (ImageJ's "16-bit range" setting is for them), which
    65535 as white showed nearly black. The cost: a 16-bit image darker than a quarter of
    full scale is brightened (by 4, 16 or 64 at most)."""
    return next(white for white in (255, 1023, 4095, 16383, 65535) if top <= white)


def _finite_max(src: np.ndarray, leaving_out: int | None = None) -> float:
    """The largest finite value (0 for none): a float image's inf would scale all else to 0,
    black, and NaN would spread. Non-finite pixels become white (inf) or black (-inf, NaN).
    ``leaving_out``: a value that is not a brightness (a colour key)."""
    if not src.size:
        return 0.0
    if src.dtype.kind != "f":
        if leaving_out is None:
            return float(src.max())
        blocks = (src[rows] for rows in _row_blocks(src))
        return max(float(block[block != leaving_out].max(initial=0)) for block in blocks)
    blocks = (src[rows] for rows in _row_blocks(src))
    top = max(float(block[np.isfinite(block)].max(initial=-np.inf)) for block in blocks)
    return top if np.isfinite(top) else 0.0


def _row_blocks(src: np.ndarray) -> list[slice]:
    """Rows of ``src`` in blocks of about ``_DEPTH_BLOCK_PIXELS``: a float copy of a block, not
    of the whole image, at a time."""
    rows = max(1, _DEPTH_BLOCK_PIXELS // max(1, src.shape[1]))
    return [slice(start, start + rows) for start in range(0, len(src), rows)]


def _describe_decode_error(fmt: str | None, e: BaseException, size: int, part: Literal["header", "image"]) -> str:
    """Why Pillow could not read the ``part`` of a ``size``-byte file: cut short, or corrupt."""
    text = str(e) or type(e).__name__
    kind = f"{fmt} image" if fmt else "image"
    if "truncated" in text.lower() or isinstance(e, EOFError):
        # (not Pillow's words: "Truncated File Read", or "image file is truncated (4 bytes not
        # processed)", which counts its read buffer's leftovers)
        return f"truncated {kind} data: the file ({size:,} bytes) ends before its {part} does"
    return f"corrupt {kind} {'header' if part == 'header' else 'data'}: {text}"
