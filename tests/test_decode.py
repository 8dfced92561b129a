"""Decoding what users really send: every corner case is drawn here, in the test."""

from __future__ import annotations

import errno
import io
import os
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageCms

from pictor.core import decode
from pictor.core.decode import ALLOWED_FORMATS, decode_image, load_image
from pictor.errors import InvalidImageError, InvalidRequestError, NotFoundError

DATA = Path(__file__).parent / "data"
RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def encode(im: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def close_to(pixel: float | tuple[int, ...] | None, want: tuple[int, ...], tol: int = 12) -> bool:
    assert isinstance(pixel, tuple), pixel  # what getpixel gives for a multi-band image
    return all(abs(int(a) - int(b)) <= tol for a, b in zip(pixel, want, strict=True))


def halves(left: tuple[int, int, int], right: tuple[int, int, int], size=(40, 20)) -> Image.Image:
    im = Image.new("RGB", size, left)
    im.paste(right, (size[0] // 2, 0, size[0], size[1]))
    return im


# ----------------------------------------------------------------------------- plain formats


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF"])
def test_allowed_formats_decode_to_rgb(fmt: str) -> None:
    im = decode_image(encode(halves(RED, BLUE), fmt))
    assert im.mode == "RGB" and im.size == (40, 20)
    assert close_to(im.getpixel((5, 10)), RED, 40) and close_to(im.getpixel((35, 10)), BLUE, 40)


def test_a_system_error_while_decoding_is_not_called_a_bad_image(monkeypatch: pytest.MonkeyPatch) -> None:
    """Out of file descriptors, Pillow's import of a plugin failed, and a valid PNG was refused
    as a "corrupt PNG image header" (the client's fault, INVALID_ARGUMENT)."""
    data = encode(Image.new("RGB", (8, 8), (200, 30, 30)), "PNG")

    def no_fds(*args: object, **kwargs: object) -> Image.Image:
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(decode.Image, "open", no_fds)
    with pytest.raises(OSError, match="Too many open files") as raised:
        decode_image(data)
    assert not isinstance(raised.value, InvalidImageError)
    monkeypatch.undo()
    real_load = Image.Image.load

    def load_without_memory(self: Image.Image) -> object:
        raise OSError(errno.ENOMEM, "Cannot allocate memory")

    monkeypatch.setattr(Image.Image, "load", load_without_memory)
    with pytest.raises(OSError, match="Cannot allocate memory") as raised:
        decode_image(data)
    assert not isinstance(raised.value, InvalidImageError)
    monkeypatch.setattr(Image.Image, "load", real_load)
    assert decode_image(data).size == (8, 8)


def test_real_photo_loads() -> None:
    im = load_image(DATA / "daisy.jpg")
    assert im.mode == "RGB" and max(im.size) == 400


def test_an_avif_photo_decodes_as_its_jpeg_does() -> None:
    """AVIF (AV1 in HEIF boxes: phones' and the web's newer photos) decodes through libavif."""
    photo = load_image(DATA / "daisy.jpg")
    im = decode_image(encode(photo, "AVIF", quality=90))
    assert im.mode == "RGB" and im.size == photo.size
    assert np.abs(np.asarray(im, np.int16) - np.asarray(photo, np.int16)).mean() < 3


# ----------------------------------------------------------------------------- orientation


@pytest.mark.parametrize("fmt", ["JPEG", "AVIF"])  # (an AVIF's rotation is its irot/imir boxes)
def test_exif_orientation_is_applied(fmt: str) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    im = decode_image(encode(halves(RED, BLUE), fmt, exif=exif, quality=95))
    assert im.size == (20, 40)  # upright: portrait
    # Rotating clockwise brings the left (red) edge to the top.
    assert close_to(im.getpixel((10, 5)), RED, 40) and close_to(im.getpixel((10, 35)), BLUE, 40)


# ----------------------------------------------------------------------------- transparency


def test_rgba_composited_on_white() -> None:
    im = Image.new("RGBA", (10, 10), (255, 0, 0, 0))  # fully transparent red
    im.putpixel((0, 0), (255, 0, 0, 255))
    im.putpixel((1, 0), (0, 0, 0, 128))
    out = decode_image(encode(im, "PNG"))
    assert out.mode == "RGB"
    assert out.getpixel((5, 5)) == WHITE
    assert out.getpixel((0, 0)) == RED
    assert close_to(out.getpixel((1, 0)), (127, 127, 127), 2)  # half black over white


def test_avif_alpha_composited_on_white() -> None:
    im = Image.new("RGBA", (32, 32), (255, 0, 0, 0))  # transparent red, with an opaque blue half
    im.paste((0, 0, 255, 255), (16, 0, 32, 32))
    out = decode_image(encode(im, "AVIF", quality=100))
    assert out.mode == "RGB"
    assert close_to(out.getpixel((4, 16)), WHITE, 4) and close_to(out.getpixel((28, 16)), BLUE, 12)


def test_la_composited_on_white() -> None:
    im = Image.new("LA", (8, 8), (0, 0))
    im.putpixel((0, 0), (0, 255))
    out = decode_image(encode(im, "PNG"))
    assert out.getpixel((4, 4)) == WHITE and out.getpixel((0, 0)) == (0, 0, 0)


def test_palette_with_transparency_png_and_gif() -> None:
    im = Image.new("P", (8, 8), 0)
    im.putpalette([0, 255, 0] + [255, 0, 0] * 255)
    im.putpixel((0, 0), 1)
    for fmt in ("PNG", "GIF"):
        out = decode_image(encode(im, fmt, transparency=0))
        assert out.mode == "RGB"
        assert out.getpixel((4, 4)) == WHITE, fmt  # transparent index -> white, not green
        assert out.getpixel((0, 0)) == RED, fmt


def test_16bit_grey_png_with_a_transparent_level() -> None:
    a = np.full((8, 8), 1000, np.uint16)
    a[0, 0] = 30000
    out = decode_image(encode(Image.fromarray(a), "PNG", transparency=1000))  # tRNS: level 1000 is see-through
    assert out.getpixel((4, 4)) == WHITE and close_to(out.getpixel((0, 0)), (117, 117, 117), 1)


def test_rgb_png_with_a_transparent_colour_key() -> None:
    im = Image.new("RGB", (8, 8), (0, 255, 0))
    im.putpixel((0, 0), RED)
    out = decode_image(encode(im, "PNG", transparency=(0, 255, 0)))  # tRNS: green is see-through
    assert out.getpixel((4, 4)) == WHITE and out.getpixel((0, 0)) == RED


def test_palette_without_transparency() -> None:
    im = Image.new("P", (8, 8), 0)
    im.putpalette([0, 255, 0] * 256)
    assert decode_image(encode(im, "PNG")).getpixel((1, 1)) == (0, 255, 0)


# ----------------------------------------------------------------------------- colour depth


def swapped_primaries_profile() -> bytes:
    """An RGB ICC profile that is not sRGB: LittleCMS's sRGB with the red and blue primaries
    swapped (their XYZ tags, 20 bytes each at 460 and 480) and named otherwise, so a file's red
    channel means blue."""
    icc = bytearray(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    assert icc[460:464] == icc[480:484] == b"XYZ "  # the layout this relies on
    icc[460:480], icc[480:500] = icc[480:500], icc[460:480]
    return bytes(icc).replace("sRGB".encode("utf-16-be"), "swap".encode("utf-16-be"))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_icc_profile_converted_to_srgb(fmt: str) -> None:
    out = decode_image(encode(Image.new("RGB", (16, 16), RED), fmt, icc_profile=swapped_primaries_profile()))
    assert close_to(out.getpixel((8, 8)), BLUE, 40)


@pytest.mark.parametrize("transparency", ["alpha", "colour key"])
def test_icc_profile_with_transparency_composited_then_converted(transparency: str) -> None:
    if transparency == "alpha":
        im = Image.new("RGBA", (16, 16), (*RED, 255))
        im.putpixel((0, 0), (*RED, 0))
        data = encode(im, "PNG", icc_profile=swapped_primaries_profile())
    else:  # the key's pixels are see-through: white, not converted from the key's colour
        im = Image.new("RGB", (16, 16), RED)
        im.putpixel((0, 0), (0, 255, 0))
        data = encode(im, "PNG", icc_profile=swapped_primaries_profile(), transparency=(0, 255, 0))
    out = decode_image(data)
    assert close_to(out.getpixel((8, 8)), BLUE, 40) and close_to(out.getpixel((0, 0)), WHITE, 2)


def test_icc_profile_of_a_palette_image_converted() -> None:
    out = decode_image(encode(Image.new("RGB", (16, 16), RED).convert("P"), "PNG",
                              icc_profile=swapped_primaries_profile()))
    assert close_to(out.getpixel((8, 8)), BLUE, 40)


SRGB_ICC = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


@pytest.mark.parametrize("icc", [SRGB_ICC, SRGB_ICC.replace("sRGB".encode("utf-16-be"), "mine".encode("utf-16-be")),
                                 b"not a profile" * 10], ids=["srgb", "srgb named otherwise", "unreadable"])
def test_srgb_or_unreadable_profile_leaves_pixels_as_stored(icc: bytes) -> None:
    stored = halves(RED, BLUE)
    out = decode_image(encode(stored, "PNG", icc_profile=icc))
    assert out.tobytes() == stored.tobytes()


def test_cmyk_jpeg() -> None:
    im = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # red in CMYK
    out = decode_image(encode(im, "JPEG", quality=95))
    assert out.mode == "RGB" and close_to(out.getpixel((8, 8)), RED, 20)


def test_16bit_grayscale_is_scaled_not_clipped() -> None:
    a = np.zeros((8, 16), np.uint16)
    a[:, :8] = 65535
    a[:, 8:] = 32896  # ~ 50 % grey
    im = Image.fromarray(a)
    assert im.mode.startswith("I;16")
    for fmt in ("PNG", "TIFF"):
        out = decode_image(encode(im, fmt))
        assert out.getpixel((2, 2)) == WHITE, fmt
        assert close_to(out.getpixel((12, 2)), (128, 128, 128), 1), fmt


@pytest.mark.parametrize(("top", "white"), [(4095, 4095), (1000, 1023), (4096, 16383), (200, 255), (1, 255)])
def test_16bit_grayscale_of_fewer_bits_is_scaled_by_the_bits_it_uses(top: int, white: int) -> None:
    # A 12-bit camera's 16-bit TIFF: its brightest pixel 4095 is white, not 16 of 255.
    a = np.zeros((8, 16), np.uint16)
    a[:, :8] = top
    a[:, 8:] = top // 2
    for fmt in ("TIFF", "PNG"):
        out = decode_image(encode(Image.fromarray(a), fmt))
        assert close_to(out.getpixel((2, 2)), (round(top * 255 / white),) * 3, 1), fmt
        assert close_to(out.getpixel((12, 2)), (round(top // 2 * 255 / white),) * 3, 1), fmt
    # The same rule for 32-bit integers below 16 bits.
    ints = Image.fromarray(a.astype(np.int32), mode="I")
    assert close_to(decode_image(encode(ints, "TIFF")).getpixel((2, 2)), (round(top * 255 / white),) * 3, 1)


def test_a_16bit_colour_key_is_not_taken_for_the_brightest_pixel() -> None:
    a = np.full((8, 16), 4095, np.uint16)  # a 12-bit image, white...
    a[:, 8:] = 65535  # ...with its see-through pixels keyed at 65535
    out = decode_image(encode(Image.fromarray(a), "PNG", transparency=65535))
    assert out.getpixel((2, 2)) == WHITE and out.getpixel((12, 2)) == WHITE
    a[:, :8] = 2048
    out = decode_image(encode(Image.fromarray(a), "PNG", transparency=65535))
    assert close_to(out.getpixel((2, 2)), (128, 128, 128), 1)  # 2048 of 4095, not of 65535


def test_16bit_scaling_is_the_same_across_row_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    # Blocks of 7 rows of 13 pixels: every row of the ramp lands in some block, none twice.
    monkeypatch.setattr(decode, "_DEPTH_BLOCK_PIXELS", 7 * 13)
    ramp = (np.arange(50 * 13, dtype=np.uint32) * 100).reshape(50, 13).astype(np.uint16)
    out = np.asarray(decode_image(encode(Image.fromarray(ramp), "PNG")))
    assert (out[..., 0] == np.rint(ramp / 257.0).astype(np.uint8)).all()


def test_32bit_int_and_float_grayscale() -> None:
    ints = Image.fromarray(np.full((4, 4), 40000, np.int32), mode="I")
    assert close_to(decode_image(encode(ints, "TIFF")).getpixel((1, 1)), (156, 156, 156), 1)
    # Beyond 16 bits, scaled to their maximum too (1/257 made 99.5% of such an image white).
    wide = Image.fromarray(np.linspace(0, 190000, 16, dtype=np.int32).reshape(4, 4), mode="I")
    out = decode_image(encode(wide, "TIFF"))
    assert out.getpixel((3, 3)) == WHITE and close_to(out.getpixel((1, 2)), (153, 153, 153), 1)
    floats = Image.fromarray(np.full((4, 4), 0.5, np.float32), mode="F")
    assert close_to(decode_image(encode(floats, "TIFF")).getpixel((1, 1)), (128, 128, 128), 1)
    # Floats beyond 255 (depth in mm, counts): scaled to their maximum, not by 1/257 to near black.
    ramp = Image.fromarray(np.linspace(0, 1000, 16, dtype=np.float32).reshape(4, 4), mode="F")
    out = decode_image(encode(ramp, "TIFF"))
    assert out.getpixel((3, 3)) == WHITE and close_to(out.getpixel((1, 2)), (153, 153, 153), 1)
    # Non-finite pixels: inf scaled the rest to 0 (a black image, and a RuntimeWarning).
    holes = np.full((4, 4), 0.5, np.float32)
    holes[0] = [np.inf, -np.inf, np.nan, 0.5]
    holes[1, 0] = -3e38  # x 255 overflows to -inf: black too, without a RuntimeWarning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = decode_image(encode(Image.fromarray(holes, mode="F"), "TIFF"))
    assert [out.getpixel((x, 0)) for x in range(4)] == [WHITE, (0, 0, 0), (0, 0, 0), (128, 128, 128)]
    assert close_to(out.getpixel((2, 2)), (128, 128, 128), 1)


@pytest.mark.parametrize("mode", ["L", "1"])
def test_grayscale_and_bilevel(mode: str) -> None:
    im = Image.new(mode, (8, 8), 255)
    out = decode_image(encode(im, "PNG"))
    assert out.mode == "RGB" and out.getpixel((3, 3)) == WHITE


# ----------------------------------------------------------------------------- animation


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "AVIF"])
def test_animated_first_frame(fmt: str) -> None:
    frames = [Image.new("RGB", (16, 16), c) for c in (RED, BLUE, (0, 255, 0))]
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100,
                  loop=0, **({"lossless": True} if fmt == "WEBP" else {}))
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 3
    out = decode_image(data)
    assert out.mode == "RGB" and close_to(out.getpixel((8, 8)), RED, 8)


# ----------------------------------------------------------------------------- draft mode


def test_jpeg_draft_decodes_at_reduced_size_not_below_target() -> None:
    big = halves(RED, BLUE, size=(2000, 1500))
    data = encode(big, "JPEG", quality=90)
    assert decode_image(data).size == (2000, 1500)
    small = decode_image(data, draft_size=(256, 256))
    assert small.size == (500, 375)  # 1/4: 1/8 would put the short side below 256
    assert close_to(small.getpixel((50, 180)), RED, 30)
    # Draft is a JPEG-only shortcut: a PNG of the same size decodes in full.
    assert decode_image(encode(big, "PNG"), draft_size=(256, 256)).size == (2000, 1500)


def test_mpo_jpeg_is_drafted_as_jpeg() -> None:
    # A phone photo with a depth or gain map after it: Pillow reads it as MPO, still a JPEG.
    buf = io.BytesIO()
    big = halves(RED, BLUE, size=(2000, 1500))
    big.save(buf, "MPO", save_all=True, append_images=[Image.new("L", (500, 375))])
    assert Image.open(buf).format == "MPO"
    small = decode_image(buf.getvalue(), draft_size=(256, 256), max_pixels=1_000_000)
    assert small.size == (500, 375) and close_to(small.getpixel((50, 180)), RED, 30)


def test_draft_with_exif_rotation_keeps_target() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(Image.new("RGB", (2400, 1200), RED), "JPEG", exif=exif)
    out = decode_image(data, draft_size=(256, 256))
    assert out.size == (300, 600) and min(out.size) >= 256


# ----------------------------------------------------------------------------- rejections


def test_truncated_jpeg_rejected() -> None:
    data = encode(Image.effect_noise((256, 256), 64).convert("RGB"), "JPEG", quality=90)
    cut = len(data) // 2
    with pytest.raises(InvalidImageError, match=rf"^truncated JPEG image data: the file \({cut:,} bytes\) ends before its "
                                               r"image does$"):
        decode_image(data[:cut])


def test_a_jpeg_cut_in_its_header_is_called_truncated() -> None:
    data = encode(Image.effect_noise((64, 64), 64).convert("RGB"), "JPEG", quality=90)
    with pytest.raises(InvalidImageError, match=r"^truncated JPEG image data: the file \(100 bytes\) ends before its "
                                               r"header does$"):
        decode_image(data[:100])


def test_truncated_png_rejected() -> None:
    data = encode(Image.effect_noise((128, 128), 64), "PNG")
    with pytest.raises(InvalidImageError, match="truncated|corrupt"):
        decode_image(data[: len(data) // 2])


def _png_with_header_size(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR claims ``width`` x ``height`` (a decompression-bomb header)."""
    data = bytearray(encode(Image.new("L", (1, 1)), "PNG"))
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


def test_decompression_bomb_rejected_on_header() -> None:
    # A real 48 MP bomb (a few KB of zeros) and a forged header: both refused before decoding.
    bomb = encode(Image.new("L", (8000, 6000)), "PNG")
    assert len(bomb) < 100_000
    with pytest.raises(InvalidImageError, match="too large.*8000x6000"):
        decode_image(bomb)
    # Our cap, not Pillow's process-wide guard (which says "could be decompression bomb DOS attack").
    with pytest.raises(InvalidImageError, match=r"100000x100000 = 10,000,000,000 pixels to decode, above the cap"):
        decode_image(_png_with_header_size(100_000, 100_000))


def test_large_jpeg_counts_at_its_drafted_size() -> None:
    # 42 MP, above the default cap: a phone photo that the embedder decodes at 1/8 scale.
    photo = encode(Image.new("L", (7000, 6000), 128), "JPEG")
    assert decode_image(photo, draft_size=(256, 256)).size == (875, 750)
    with pytest.raises(InvalidImageError, match=r"too large: 7000x6000 = 42,000,000 pixels"):
        decode_image(photo)  # decoded in full: the cap applies
    with pytest.raises(InvalidImageError, match=r"7000x6000 \(decoded at 875x750\)"):
        decode_image(photo, draft_size=(256, 256), max_pixels=500_000)


def test_jpeg_beyond_pillows_own_limit_is_drafted_not_refused() -> None:
    # A 180 MP header (above Pillow's 2 x 89 MP bomb limit) decodes at 1/8 = 2.8 MP, under our cap.
    data = bytearray(encode(Image.new("L", (64, 64), 128), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", 9000, 20000)  # height, width
    assert decode_image(bytes(data), draft_size=(256, 256)).size == (2500, 1125)


def test_progressive_jpeg_counts_at_its_full_size() -> None:
    # Its decoder holds the coefficients of the whole image whatever the draft: a 1 KB file
    # claiming 50000x50000 decoded at 1/8, under the cap, in 7 GB. Refused by its header now.
    data = bytearray(encode(Image.new("RGB", (64, 48), RED), "JPEG", progressive=True))
    sof = data.index(b"\xff\xc2")
    data[sof + 5:sof + 9] = struct.pack(">HH", 50000, 50000)
    with pytest.raises(InvalidImageError, match=r"50000x50000 = 2,500,000,000 pixels, above the cap .* a "
                       "progressive or multi-scan JPEG counts at its full size"):
        decode_image(bytes(data), draft_size=(256, 256))
    photo = Image.new("RGB", (400, 300), BLUE)
    baseline, progressive = encode(photo, "JPEG"), encode(photo, "JPEG", progressive=True)
    assert decode_image(baseline, draft_size=(64, 64), max_pixels=100_000).size == (100, 75)
    with pytest.raises(InvalidImageError, match="400x300 = 120,000 pixels"):
        decode_image(progressive, draft_size=(64, 64), max_pixels=100_000)
    assert decode_image(progressive, draft_size=(64, 64)).size == (100, 75)  # under the cap: drafted
    # A sequential JPEG whose first scan lacks a component is decoded from several scans, with
    # the whole image held too (the header alone is read: the bytes after it need not decode).
    sos = baseline.index(b"\xff\xda")
    assert not decode._read_jpeg_header(baseline).whole_image and baseline[sos + 4] == 3
    assert decode._read_jpeg_header(baseline[:sos + 4] + b"\x01" + baseline[sos + 5:]).whole_image


def test_jpeg_of_too_many_scans_refused() -> None:
    # Each scan is a pass over the whole image: 20,000 tiny ones ran for minutes.
    data = encode(Image.new("RGB", (64, 48), RED), "JPEG", progressive=True)
    first = data.index(b"\xff\xda")
    scans = data[first:-2]  # to the end-of-image marker
    many = data[:first] + scans * (decode.MAX_JPEG_SCANS // scans.count(b"\xff\xda") + 1) + b"\xff\xd9"
    with pytest.raises(InvalidImageError, match=r"JPEG image has \d+ scans, more than the 256 Pictor decodes"):
        decode_image(many)
    assert decode_image(data).size == (64, 48)


def test_large_progressive_jpeg_gets_fewer_scans(monkeypatch: pytest.MonkeyPatch) -> None:
    # A 40 MP file of 250 scans decoded in 7 s: scans x pixels is bounded too (here as if this
    # image were 5/3 of the default cap: 38 scans), never below 32 scans.
    data = encode(Image.new("RGB", (64, 48), RED), "JPEG", progressive=True)
    first = data.index(b"\xff\xda")
    scans = data[first:-2]
    many = data[:first] + scans * (40 // scans.count(b"\xff\xda") + 1) + b"\xff\xd9"
    assert decode_image(many).size == (64, 48)
    monkeypatch.setattr(decode, "JPEG_SCAN_PIXELS", 38 * 64 * 48)
    with pytest.raises(InvalidImageError, match=r"JPEG image has \d+ scans, more than the 38 Pictor decodes for "
                                                r"3,072 pixels"):
        decode_image(many)
    monkeypatch.setattr(decode, "JPEG_SCAN_PIXELS", 1)  # the floor
    with pytest.raises(InvalidImageError, match=r"more than the 32 Pictor decodes"):
        decode_image(many)
    assert decode_image(data).size == (64, 48)
    # Scans are counted from the first one: an ICC profile's bytes (in APP2 segments, before it)
    # hold FF DA too, and a 30 MP photo with a 6 MB profile was refused.
    profiled = encode(Image.new("RGB", (64, 48), RED), "JPEG", progressive=True,
                      icc_profile=SRGB_ICC + b"\xff\xda" * 100)
    assert decode_image(profiled).size == (64, 48)


def png_chunk(kind: bytes, body: bytes = b"") -> bytes:
    return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")


def gif_table_end(data: bytes) -> int:
    return 13 + (3 << ((data[10] & 7) + 1) if data[10] & 0x80 else 0)  # header, screen, colours


@pytest.mark.parametrize("case", ["JPEG comments", "JPEG fill bytes", "JPEG restart markers", "PNG chunks",
                                  "PNG chunks after a frame control", "GIF comments", "GIF stray bytes"])
def test_files_of_millions_of_tiny_blocks_refused_before_pillow_reads_them(case: str) -> None:
    # Pillow walks segments, chunks and blocks (and stray bytes) one by one in Python: a 60 MB
    # PNG of 5 million empty chunks took 28 s and 0.7 GB. A few are fine; 6,000 in a tiny image are not.
    fmt = case.split()[0]
    data = encode(Image.new("RGB" if fmt != "GIF" else "P", (8, 8)), fmt)
    with_blocks, what = {
        "JPEG comments": (lambda n: data[:2] + b"\xff\xfe\x00\x02" * n + data[2:], "segments or stray bytes"),
        "JPEG fill bytes": (lambda n: data[:2] + b"\xff" * n + data[2:], "segments or stray bytes"),
        "JPEG restart markers": (lambda n: data[:2] + b"\xff\xd0" * n + data[2:], "segments or stray bytes"),  # no length
        "PNG chunks": (lambda n: data[:33] + png_chunk(b"prVt") * n + data[33:], "chunks"),  # after IHDR
        # (a still image's fcTL does not end what Pillow reads: only an animated one's second frame)
        "PNG chunks after a frame control": (lambda n: data[:-12] + png_chunk(b"fcTL", bytes(26))
                                             + png_chunk(b"prVt") * n + data[-12:], "chunks"),
        "GIF comments": (lambda n: data[:gif_table_end(data)] + b"\x21\xfe\x00" * n + data[gif_table_end(data):],
                         "blocks or stray bytes"),
        "GIF stray bytes": (lambda n: data[:gif_table_end(data)] + b"\x00" * n + data[gif_table_end(data):],
                            "blocks or stray bytes"),
    }[case]
    assert decode_image(with_blocks(10)).size == (8, 8)
    with pytest.raises(InvalidImageError, match=f"{fmt} image has more than [0-9,]+ {what} .* Pictor refuses"):
        decode_image(with_blocks(6000))


def test_gif_with_a_large_xmp_packet_is_not_refused() -> None:
    # XMP in a GIF is an application extension whose bytes read as sub-block lengths: a 1.8 MB
    # packet indented with spaces is 55,000 sub-blocks of 33 bytes, which Pillow reads in 0.04 s.
    data = encode(Image.new("P", (8, 8)), "GIF")
    xmp = b"\x21\xff\x0bXMP DataXMP" + (b" " * 33) * 55_000 + bytes(range(255, -1, -1)) + b"\x00"
    assert decode_image(data[:gif_table_end(data)] + xmp + data[gif_table_end(data):]).size == (8, 8)


def test_animated_png_of_many_frames_is_not_refused() -> None:
    # Pillow reads an APNG's chunks up to its second frame: the others are not counted.
    frames = [Image.new("RGB", (8, 8), (i % 256, i // 256, 0)) for i in range(3000)]
    data = encode(frames[0], "PNG", save_all=True, append_images=frames[1:])
    assert data.count(b"fcTL") == 3000 and decode_image(data).getpixel((0, 0)) == (0, 0, 0)


def test_a_progressive_jpeg_behind_thousands_of_segments_still_counts_at_full_size() -> None:
    # The walk that finds a progressive JPEG stopped at 4,096 segments while the check before it let
    # more through: 4,200 comments hid the progressive header, and the full-size count with it.
    data = encode(Image.new("RGB", (64, 48), RED), "JPEG", progressive=True)
    comment = b"\xff\xfe\x04\x02" + bytes(1024)  # 1 KB each: the file stays within the limit
    padded = data[:2] + comment * 4200 + data[2:]
    assert decode._read_jpeg_header(padded).whole_image


def test_tiff_of_too_many_strips_refused() -> None:
    # Pillow reads each strip's offset in Python as it opens the file: a million one-row strips
    # took 11 s. One per 256 pixels of the cap.
    data = encode(Image.new("L", (300, 2000), 100), "TIFF", compression="tiff_lzw", strip_size=300)
    assert decode._tiff_chunks(data) == 2000
    with pytest.raises(InvalidImageError, match=r"stored in 2,000 strips or tiles, more than the 1,953 "):
        decode_image(data, max_pixels=500_000)
    assert decode_image(data, max_pixels=600_000).size == (300, 2000)
    big = encode(Image.new("L", (30, 20), 100), "TIFF", big_tiff=True)
    assert decode._tiff_chunks(big) == 1 and decode_image(big).size == (30, 20)
    assert decode._tiff_chunks(b"II*\x00\xff\xff\xff\x7f") == 0  # the header's offset out of the file


def test_pixel_cap_is_configurable() -> None:
    data = encode(Image.new("RGB", (100, 100)), "PNG")
    with pytest.raises(InvalidImageError, match="cap of 9,999"):
        decode_image(data, max_pixels=9_999)
    assert decode_image(data, max_pixels=10_000).size == (100, 100)
    for cap in (float("nan"), float("inf"), None, 0):  # a NaN cap let every image through
        with pytest.raises(InvalidRequestError, match="max_pixels must be a whole number of at least 1"):
            decode_image(data, max_pixels=cap)  # type: ignore[arg-type]
    for draft in ((1,), (float("nan"), 2), "x", 5):
        with pytest.raises(InvalidRequestError, match=r"draft_size must be \(width, height\) in whole pixels"):
            decode_image(data, draft_size=draft)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("data", "name"),
    [
        (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", "EPS"),
        (b"%PDF-1.7\n1 0 obj\n", "PDF"),
        (b"8BPS\x00\x01" + bytes(40), "PSD"),
    ],
)
def test_disallowed_formats_named(data: bytes, name: str) -> None:
    with pytest.raises(InvalidImageError, match=f"{name}.*not allowed"):
        decode_image(data)


@pytest.mark.parametrize("fmt", ["ICO", "PPM", "TGA"])
def test_formats_pillow_reads_but_we_refuse(fmt: str) -> None:
    assert fmt not in ALLOWED_FORMATS
    with pytest.raises(InvalidImageError):
        decode_image(encode(Image.new("RGB", (16, 16), RED), fmt))


def test_garbage_and_empty_rejected() -> None:
    with pytest.raises(InvalidImageError, match="empty"):
        decode_image(b"")
    with pytest.raises(InvalidImageError, match="not a recognised image"):
        decode_image(b"hello, I am not an image" * 10)
    # One of the allowed formats by its first bytes, with a damaged header: said so.
    png = bytearray(encode(Image.new("RGB", (16, 16), RED), "PNG"))
    png[20] ^= 0xFF  # in the IHDR chunk: its checksum fails
    with pytest.raises(InvalidImageError, match=r"^corrupt PNG image: it starts as one, but its header cannot be read"):
        decode_image(bytes(png))
    with pytest.raises(InvalidImageError, match="^corrupt JPEG image: it starts as one"):
        decode_image(b"\xff\xd8\xff" + bytes(100))
    bmp = bytearray(encode(Image.new("RGB", (16, 16), RED), "BMP"))
    bmp[14:18] = struct.pack("<I", 0x7FFFFFFF)  # the size of its info header
    with pytest.raises(InvalidImageError, match=r"^truncated BMP image data: the file \(\d+ bytes\) ends before its "
                                               r"header does"):  # (the header it claims)
        decode_image(bytes(bmp))
    bmp = bytearray(encode(Image.new("RGB", (16, 16), RED), "BMP"))
    bmp[18:22] = struct.pack("<i", -1)  # a width of -1: it read as 4294967295, "too large"
    with pytest.raises(InvalidImageError, match=r"^BMP image has an impossible size 4294967295x16: its header is damaged"):
        decode_image(bytes(bmp))


@pytest.mark.parametrize("lossless", [False, True])
def test_a_webp_cut_short_is_called_truncated(lossless: bool) -> None:
    data = encode(halves(RED, BLUE, (64, 48)), "WEBP", lossless=lossless)
    for cut in (24, len(data) // 2, len(data) - 1):
        with pytest.raises(InvalidImageError, match=f"^truncated WEBP image data: the file is {cut:,} bytes, its "
                                                    f"header says {len(data):,}$"):
            decode_image(data[:cut])


def test_an_avif_cut_short_is_called_truncated() -> None:
    data = encode(halves(RED, BLUE, (64, 48)), "AVIF")
    for cut in (30, 200, len(data) // 2, len(data) - 1):  # in the ftyp box, the meta box, the last byte
        with pytest.raises(InvalidImageError, match=f"^truncated AVIF image data: the file is {cut:,} bytes, its "
                                                    r"boxes say \d"):
            decode_image(data[:cut])


def test_an_avif_of_damaged_pixels_is_called_corrupt() -> None:
    """libavif's complaint comes as a RuntimeError: an image's fault all the same (a batch run
    logged it as an unexpected error with a traceback)."""
    data = bytearray(encode(halves(RED, BLUE, (64, 48)), "AVIF"))
    pixels = data.index(b"mdat") + 4
    data[pixels:pixels + 32] = bytes(32)  # the AV1 stream's headers
    with pytest.raises(InvalidImageError, match="^corrupt AVIF image data: Failed to decode"):
        decode_image(bytes(data))


def test_an_avif_libavif_cannot_parse_is_called_corrupt() -> None:
    """libavif's RuntimeError as Pillow opens the file, and Pillow's ZeroDivisionError on a
    track's time scale of 0, came out of decode_image (found by fuzzing mutated AVIFs)."""
    data = bytearray(encode(Image.new("RGB", (16, 16), RED), "AVIF"))
    at = data.index(b"pitm") + 8  # the primary item's id, after the box's version and flags
    data[at:at + 2] = struct.pack(">H", 99)
    with pytest.raises(InvalidImageError, match=r"^corrupt AVIF image: it starts as one, but its header cannot be "
                                                r"read \(\d+ bytes\): Failed to decode image: Missing"):
        decode_image(bytes(data))
    frames = [Image.new("RGB", (16, 16), c) for c in (RED, BLUE)]
    data = bytearray(encode(frames[0], "AVIF", save_all=True, append_images=frames[1:]))
    at = data.index(b"mdhd") + 4
    assert data[at] == 1  # version 1: 64-bit times before the time scale
    data[at + 20:at + 24] = bytes(4)
    with pytest.raises(InvalidImageError, match="^corrupt AVIF image data: division by zero"):
        decode_image(bytes(data))


def test_an_avif_over_the_cap_is_refused_before_decoding() -> None:
    data = encode(Image.new("RGB", (100, 60), RED), "AVIF")
    with pytest.raises(InvalidImageError, match="^AVIF image is too large: 100x60 = 6,000 pixels"):
        decode_image(data, max_pixels=5_999)


def test_avif_needs_a_pillow_with_libavif(monkeypatch: pytest.MonkeyPatch) -> None:
    data = encode(halves(RED, BLUE), "AVIF")
    monkeypatch.setattr(decode.AvifImagePlugin, "SUPPORTED", False)
    with pytest.raises(InvalidImageError, match="^AVIF images need a Pillow built with libavif"):
        decode_image(data)


@pytest.mark.parametrize("brands", [b"heic\0\0\0\0mif1heic", b"mif1\0\0\0\0mif1heic"])
def test_heic_is_named_not_allowed(brands: bytes) -> None:
    """An iPhone's HEVC-coded photo: Pillow reads none, and one whose major brand is mif1 goes
    to its AVIF plugin, which called it a corrupt AVIF."""
    data = (8 + len(brands)).to_bytes(4, "big") + b"ftyp" + brands + bytes(64)
    with pytest.raises(InvalidImageError, match=r"^image format HEIC is not allowed \(allowed: .*AVIF\); convert it"):
        decode_image(data)


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")  # Pillow's, as it reads the missing directory
def test_a_tiff_cut_before_its_directory_is_called_truncated() -> None:
    data = encode(halves(RED, BLUE, (64, 48)), "TIFF", compression="tiff_lzw")  # directory after the pixels
    with pytest.raises(InvalidImageError, match=r"^truncated TIFF image data: the file is 300 bytes, its header "
                                                r"puts its directory at byte \d"):
        decode_image(data[:300])


def test_a_webp_over_the_cap_is_refused_before_its_canvas_is_allocated() -> None:
    # libwebp allocates a canvas twice the image's RGBA size as Pillow opens a WebP: a small
    # file claiming 16383x16383 made 2 GB of it, which under a memory limit failed as "corrupt".
    small = bytearray(encode(Image.new("RGB", (8, 8), RED), "WEBP", lossless=True))
    assert small[12:16] == b"VP8L" and small[20] == 0x2F
    small[21:25] = struct.pack("<I", (struct.unpack("<I", small[21:25])[0] & ~0xFFFFFFF) | 0xFFFFFFF)
    script = (
        "import resource, sys\n"
        "from pictor.core.decode import decode_image\n"
        "from pictor.errors import InvalidImageError\n"
        "vm = int(open('/proc/self/status').read().split('VmSize:')[1].split()[0]) * 1024\n"
        "resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30), resource.RLIM_INFINITY))\n"
        "try:\n"
        "    decode_image(sys.stdin.buffer.read())\n"
        "except InvalidImageError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], input=bytes(small), capture_output=True, timeout=60)
    assert out.stdout.decode().startswith("WEBP image is too large: 16384x16384 = 268,435,456 pixels"), out


def test_corrupt_jpeg_body_rejected() -> None:
    data = bytearray(encode(Image.new("RGB", (64, 64), RED), "JPEG"))
    sos = data.index(b"\xff\xda")
    data[sos + 2:sos + 40] = b"\xff" * 38  # destroy the scan header
    with pytest.raises(InvalidImageError, match="corrupt|truncated"):
        decode_image(bytes(data))


def test_load_image_errors(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="missing.jpg: no such file"):
        load_image(tmp_path / "missing.jpg")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really")
    with pytest.raises(InvalidImageError, match="bad.jpg"):
        load_image(bad)
    (tmp_path / "folder.jpg").mkdir()
    # A manifest row naming a folder (the client commands add "`pictor index` takes folders").
    with pytest.raises(InvalidImageError, match="folder.jpg: a folder, not an image file$"):
        load_image(tmp_path / "folder.jpg")
    with pytest.raises(InvalidImageError, match="not a usable path"):
        load_image(str(tmp_path / "nul\0.jpg"))
    (tmp_path / "empty.png").touch()
    with pytest.raises(InvalidImageError, match="empty.png: an empty file"):
        load_image(tmp_path / "empty.png")
    with pytest.raises(InvalidImageError, match="^an empty path, not an image file$"):  # not "." as a folder
        load_image("")


def test_only_regular_files_are_read(tmp_path: Path) -> None:
    # Reading a FIFO named like an image would block forever (and /dev/zero never end).
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    with pytest.raises(InvalidImageError, match=f"^{fifo}: not a regular file"):  # named once
        load_image(fifo)
