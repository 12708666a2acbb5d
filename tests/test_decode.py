"""read_gray: every supported format decodes to 2-D uint8, every broken file is refused by name."""

from __future__ import annotations

import io
import os
import struct
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, JpegImagePlugin, features

from pneumoscan.data import decode
from pneumoscan.data.decode import MAX_PIXELS, looks_like_image, read_gray, sniff_kind
from pneumoscan.errors import UnreadableImage

pydicom = pytest.importorskip("pydicom")
from pydicom.dataset import FileDataset, FileMetaDataset  # noqa: E402
from pydicom.encaps import encapsulate  # noqa: E402
from pydicom.uid import (  # noqa: E402
    JPEG2000,
    ExplicitVRLittleEndian,
    JPEGLSLossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared/data/chest_xray_224"
LUMA = np.array([0.299, 0.587, 0.114])


def gradient(height: int = 48, width: int = 64) -> np.ndarray:
    """A smooth 8-bit image with structure along both axes, so transposes are visible."""
    y, x = np.mgrid[0:height, 0:width]
    return ((x * 3 + y * 2) % 256).astype(np.uint8)


def rgb_image(height: int = 48, width: int = 64) -> np.ndarray:
    g = gradient(height, width).astype(np.int32)
    return np.stack([g, 255 - g, (g * 7) % 256], axis=-1).astype(np.uint8)


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def refused(source, *args, **kwargs) -> str:
    with pytest.raises(UnreadableImage) as info:
        read_gray(source, *args, **kwargs)
    return info.value.reason


def patch_png_chunk(data: bytes, chunk: bytes, body: bytes) -> bytes:
    """Replace the body of the first ``chunk`` (same length) and give it a valid CRC."""
    at = data.index(chunk)
    length = int.from_bytes(data[at - 4 : at], "big")
    assert len(body) == length
    crc = zlib.crc32(chunk + body).to_bytes(4, "big")
    return data[: at + 4] + body + crc + data[at + 8 + length :]


def ihdr_with_size(data: bytes, width: int, height: int) -> bytes:
    at = data.index(b"IHDR")
    body = struct.pack(">II", width, height) + data[at + 12 : at + 17]
    return patch_png_chunk(data, b"IHDR", body)


# --- formats and modes ----------------------------------------------------------------------


def test_8bit_gray_png_is_exact(tmp_path):
    pixels = gradient()
    out = read_gray(write(tmp_path / "g.png", encode(Image.fromarray(pixels), "PNG")))
    assert out.dtype == np.uint8 and out.shape == pixels.shape
    np.testing.assert_array_equal(out, pixels)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P", "LA"])
def test_colour_modes_become_luma(tmp_path, mode):
    rgb = rgb_image()
    image = Image.fromarray(rgb)
    if mode == "RGBA":
        image.putalpha(Image.fromarray(gradient()))
    elif mode == "LA":
        image = image.convert("L").convert("LA")
    elif mode == "P":
        image = image.quantize(256)
    out = read_gray(write(tmp_path / "c.png", encode(image, "PNG")))
    expected = np.asarray(image.convert("RGB").convert("L"))
    assert out.shape == rgb.shape[:2] and out.dtype == np.uint8
    np.testing.assert_array_equal(out, expected)
    if mode != "P":  # quantisation moves colours; alpha must simply be dropped
        np.testing.assert_allclose(out, rgb @ LUMA, atol=1.5)


def test_cmyk_jpeg(tmp_path):
    rgb = rgb_image()
    cmyk = Image.fromarray(rgb).convert("CMYK")
    out = read_gray(write(tmp_path / "c.jpg", encode(cmyk, "JPEG", quality=95)))
    expected = np.asarray(cmyk.convert("RGB").convert("L"), dtype=float)
    assert out.shape == rgb.shape[:2]
    assert np.abs(out - expected).mean() < 4


def test_16bit_png_ramp_maps_to_full_8bit_range(tmp_path):
    ramp = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    out = read_gray(write(tmp_path / "r.png", encode(Image.fromarray(ramp), "PNG")))
    flat = out.ravel().astype(int)
    assert out.dtype == np.uint8
    assert flat[0] == 0 and flat[-1] == 255
    assert np.all(np.diff(flat) >= 0)
    np.testing.assert_array_equal(flat, np.round(np.arange(65536) * 255 / 65535))


def test_16bit_png_honours_sbit(tmp_path):
    # A 12-bit source stored per the PNG spec: shifted up to 16 bits, sBIT records 12.
    source = np.linspace(0, 4095, 64 * 32).round().astype(np.uint16).reshape(32, 64)
    data = encode(Image.fromarray(source << 4), "PNG")
    sbit = b"\x00\x00\x00\x01sBIT\x0c" + zlib.crc32(b"sBIT\x0c").to_bytes(4, "big")
    at = data.index(b"IDAT") - 4
    out = read_gray(data[:at] + sbit + data[at:])
    np.testing.assert_array_equal(out, np.round(source.astype(float) * 255 / 4095))


def with_sbit(png: bytes, bits: int) -> bytes:
    """``png`` with an sBIT chunk for grey, placed before the first IDAT as the spec requires."""
    body = b"sBIT" + bytes([bits])
    chunk = b"\x00\x00\x00\x01" + body + zlib.crc32(body).to_bytes(4, "big")
    at = png.index(b"IDAT") - 4
    return png[:at] + chunk + png[at:]


def picture(bits: int) -> np.ndarray:
    """A ``bits``-deep image spanning its whole range, with structure along both axes."""
    top = (1 << bits) - 1
    return np.round(gradient(48, 64).astype(float) / 255 * top).astype(np.uint16)


@pytest.mark.parametrize("bits", [10, 12, 14])
@pytest.mark.parametrize("fmt", ["PNG", "TIFF", "TIFF-big-endian"])
def test_raw_low_bit_depth_in_16_bit_decodes_like_full_range(bits, fmt):
    # Medical exporters often store raw 10/12/14-bit values in a 16-bit file, without sBIT;
    # scaled from 16 bits a 12-bit image would come out as 0..15, a black picture.
    raw = picture(bits)
    full = np.round(raw.astype(float) * 65535 / ((1 << bits) - 1)).astype(np.uint16)
    dtype, fmt = (">u2", "TIFF") if fmt == "TIFF-big-endian" else ("<u2", fmt)
    out = read_gray(encode(Image.fromarray(raw.astype(dtype)), fmt))
    expected = read_gray(encode(Image.fromarray(full.astype(dtype)), fmt))
    assert out.max() == 255
    assert np.abs(out.astype(int) - expected).max() <= 1


def test_raw_12_bit_png_with_sbit_12_decodes_like_full_range():
    # sBIT says 12 but the samples were never scaled up to 16 bits, as the spec would want:
    # values that fit in 12 bits are taken as they are.
    raw = picture(12)
    full = np.round(raw.astype(float) * 65535 / 4095).astype(np.uint16)
    out = read_gray(with_sbit(encode(Image.fromarray(raw), "PNG"), 12))
    expected = read_gray(encode(Image.fromarray(full), "PNG"))
    assert np.abs(out.astype(int) - expected).max() <= 1


def test_a_dim_12_bit_image_keeps_its_detector_depth():
    # Peaks of 2,000 and 3,000 both need the 12-bit depth: the dim image stays dim, at the same
    # scale as the bright one (a per-image depth would double the dim one).
    ramp = gradient(48, 64).astype(float) / 255
    dim = read_gray(encode(Image.fromarray(np.round(ramp * 2000).astype(np.uint16)), "PNG"))
    bright = read_gray(encode(Image.fromarray(np.round(ramp * 3000).astype(np.uint16)), "PNG"))
    assert dim.max() == round(2000 * 255 / 4095) and bright.max() == round(3000 * 255 / 4095)


def test_full_range_16_bit_png_is_scaled_from_16_bits():
    # Any value at or above 32768 uses the top bit: scaled from the whole 16-bit range.
    values = np.round(gradient(48, 64).astype(float) / 255 * 40000).astype(np.uint16)
    out = read_gray(encode(Image.fromarray(values), "PNG"))
    np.testing.assert_array_equal(out, np.round(values.astype(float) * 255 / 65535))


def png16(samples: np.ndarray, color_type: int, sbit: bytes = b"") -> bytes:
    """A 16-bit PNG of ``samples`` (height, width, channels), which Pillow cannot write."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body).to_bytes(4, "big")
        return struct.pack(">I", len(body)) + kind + body + crc

    height, width = samples.shape[:2]
    rows = samples.astype(">u2").reshape(height, -1)
    idat = zlib.compress(b"".join(b"\0" + row.tobytes() for row in rows))
    ihdr = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + (chunk(b"sBIT", sbit) if sbit else b"")
        + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


def colour_samples(grey: np.ndarray, color_type: int) -> np.ndarray:
    """``grey`` as the channels of ``color_type`` (2 RGB, 4 grey+alpha, 6 RGBA), alpha opaque."""
    opaque = np.full_like(grey, 65535)
    channels = {2: [grey] * 3, 4: [grey, opaque], 6: [grey] * 3 + [opaque]}[color_type]
    return np.stack(channels, axis=-1)


@pytest.mark.parametrize("color_type, name", [(2, "RGB"), (4, "grey+alpha"), (6, "RGBA")])
def test_raw_detector_values_in_16_bit_colour_png_are_refused(tmp_path, color_type, name):
    # Pillow keeps only the high byte of 16-bit colour samples: raw 12-bit values would come out
    # as 0..15, a black picture, and the 16-bit grey depth rules cannot see them.
    raw = colour_samples(picture(12), color_type)
    path = write(tmp_path / "raw.png", png16(raw, color_type))
    with pytest.raises(UnreadableImage) as info:
        read_gray(path)
    assert str(info.value) == (
        f"{path}: 16-bit {name} PNG of raw values below 16384 is not supported: only the high "
        "byte of each sample can be read; save it as 16-bit grayscale"
    )
    # 12-bit values scaled up to 16 bits as the PNG spec asks (sBIT 12): the high byte is the
    # picture, and it decodes.
    sbit = bytes([12] * (1 if color_type == 4 else 3) + [16] * (color_type != 2))
    scaled = png16(colour_samples(picture(12) << 4, color_type), color_type, sbit)
    assert read_gray(scaled).max() >= 250


@pytest.mark.parametrize("color_type", [2, 4, 6])
def test_full_range_16_bit_colour_png_still_decodes(color_type):
    full = colour_samples(picture(16), color_type)
    data = png16(full, color_type, sbit=bytes([16] * {2: 3, 4: 2, 6: 4}[color_type]))
    expected = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").convert("L"))
    np.testing.assert_array_equal(read_gray(data), expected)
    assert read_gray(data).max() == 255


def test_dark_8_bit_colour_png_is_not_taken_for_raw_16_bit():
    dark = rgb_image() // 8  # every value below 64, in an 8-bit file: nothing to refuse
    out = read_gray(encode(Image.fromarray(dark), "PNG"))
    np.testing.assert_allclose(out, dark @ LUMA, atol=1.5)


def test_exif_orientation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    pixels = gradient(40, 80)
    data = encode(Image.fromarray(pixels), "JPEG", exif=exif.tobytes(), quality=95)
    out = read_gray(write(tmp_path / "rotated.jpg", data))
    assert out.shape == (80, 40)
    expected = np.rot90(pixels, k=-1).astype(float)
    assert np.abs(out - expected).mean() < 3
    # eda reports the size of the image as decoded, upright (width 80 by height 40 was said).
    from pneumoscan.eda import original_size

    assert original_size(str(tmp_path / "rotated.jpg")) == (out.shape[1], out.shape[0])
    # A PNG's size comes from its header alone: its pixels (here cut short) are not decoded.
    png = encode(Image.fromarray(gradient(40, 80)), "PNG")
    cut = write(tmp_path / "cut.png", png[: len(png) // 2])
    assert original_size(str(cut)) == (80, 40)


def test_resize_ignores_aspect_ratio(tmp_path):
    path = write(tmp_path / "wide.png", encode(Image.fromarray(gradient(30, 90)), "PNG"))
    out = read_gray(path, 50)
    assert out.shape == (50, 50) and out.dtype == np.uint8
    expected = Image.fromarray(gradient(30, 90)).resize((50, 50), Image.Resampling.BILINEAR)
    np.testing.assert_array_equal(out, np.asarray(expected))


@pytest.fixture
def draft_calls(monkeypatch):
    """Each JPEG draft request as (mode, requested size, size libjpeg will decode to)."""
    calls = []
    original = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        result = original(self, mode, size)
        calls.append((mode, size, self.size))
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    return calls


def assert_close_to(out: np.ndarray, expected: np.ndarray) -> None:
    # Measured over the project's X-rays, a reduced-scale decode moves pixels by under 0.2
    # grey levels on average and at most 4 (DRAFT_FACTOR's comment).
    diff = np.abs(out.astype(int) - np.asarray(expected, dtype=int))
    assert diff.mean() < 0.5 and diff.max() <= 4, (diff.mean(), diff.max())


def test_large_jpeg_is_decoded_at_reduced_scale(tmp_path, draft_calls):
    y, x = np.mgrid[0:1600, 0:2000]
    pixels = (127 + 60 * np.sin(x / 90) + 60 * np.cos(y / 70)).astype(np.uint8)
    path = write(tmp_path / "big.jpg", encode(Image.fromarray(pixels), "JPEG", quality=90))
    full = read_gray(path)
    assert draft_calls == [("L", None, (2000, 1600))]

    fast = read_gray(path, 64)
    # libjpeg decoded at 1/4 scale, which leaves at least 4x the target for the final resize.
    assert draft_calls[-1] == ("L", (256, 256), (500, 400))
    assert fast.shape == (64, 64)
    assert_close_to(fast, Image.fromarray(full).resize((64, 64), Image.Resampling.BILINEAR))

    read_gray(path, 224)
    # 1600 px is under 8x224, so halving would leave less than 4x the target: decoded whole.
    assert draft_calls[-1] == ("L", (896, 896), (2000, 1600))


def png_copy(tmp_path: Path, jpeg: Path) -> Path:
    """A lossless PNG of the JPEG's fully decoded pixels, written under ``tmp_path``."""
    png = tmp_path / "same.png"
    Image.fromarray(read_gray(jpeg)).save(png)
    return png


@pytest.mark.parametrize("size", [16, 28, 48])
def test_jpeg_and_png_of_the_same_pixels_agree(tmp_path, size):
    # Were libjpeg's reduced-scale decode to decide the pixels of a small target, they would be
    # up to 39 grey levels off at 48 px, enough to flip a prediction between a JPEG and its
    # lossless copy.
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:224, 0:224]
    texture = 128 + 50 * np.sin(x / 7) * np.cos(y / 5) + rng.normal(0, 20, (224, 224))
    pixels = Image.fromarray(texture.clip(0, 255).astype(np.uint8))
    jpeg = write(tmp_path / "x.jpg", encode(pixels, "JPEG", quality=90))
    png = png_copy(tmp_path, jpeg)
    assert_close_to(read_gray(jpeg, size), read_gray(png, size))


@pytest.mark.parametrize("size", [16, 28, 48])
def test_real_jpeg_and_png_of_the_same_pixels_agree(tmp_path, size):
    jpeg = SHARED_DATA / "train/NORMAL/IM-0115-0001.jpeg"
    if not jpeg.exists():
        pytest.skip(f"{jpeg} not present")
    png = png_copy(tmp_path, jpeg)
    assert_close_to(read_gray(jpeg, size), read_gray(png, size))


def test_bytes_input_equals_path_input(tmp_path):
    data = encode(Image.fromarray(rgb_image()), "JPEG")
    path = write(tmp_path / "a.jpg", data)
    np.testing.assert_array_equal(read_gray(data, 32), read_gray(path, 32))
    np.testing.assert_array_equal(read_gray(bytearray(data)), read_gray(str(path)))


def test_extension_is_ignored(tmp_path):
    png = write(tmp_path / "x.jpeg", encode(Image.fromarray(gradient()), "PNG"))
    np.testing.assert_array_equal(read_gray(png), gradient())
    text = write(tmp_path / "x.png", b"patient notes, not a picture\n")
    assert refused(text) == "not an image (content is text/HTML)"


@pytest.mark.parametrize("fmt", ["BMP", "GIF", "TIFF", "WEBP"])
def test_other_pillow_formats(fmt):
    options = {"lossless": True} if fmt == "WEBP" else {}
    out = read_gray(encode(Image.fromarray(gradient()), fmt, **options))
    np.testing.assert_array_equal(out, gradient())


def test_real_chest_xray_decodes():
    path = SHARED_DATA / "train/NORMAL/IM-0115-0001.jpeg"
    if not path.exists():
        pytest.skip(f"{path} not present")
    out = read_gray(path)
    assert out.shape == (224, 224) and out.dtype == np.uint8
    assert read_gray(path, 128).shape == (128, 128)


# --- refusals -------------------------------------------------------------------------------


def test_error_names_the_file(tmp_path):
    path = write(tmp_path / "empty.png", b"")
    with pytest.raises(UnreadableImage) as info:
        read_gray(path)
    assert str(info.value) == f"{path}: empty file"
    with pytest.raises(UnreadableImage) as info:
        read_gray(b"")
    assert str(info.value) == "upload: empty file"
    with pytest.raises(UnreadableImage) as info:
        read_gray(b"", name="chest.png")
    assert str(info.value) == "chest.png: empty file"


def test_file_over_size_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(decode, "MAX_FILE_BYTES", 16)
    path = write(tmp_path / "big.png", encode(Image.fromarray(gradient()), "PNG"))
    assert refused(path).startswith("file too large")
    assert refused(path.read_bytes()).startswith("file too large")


def test_truncated_jpeg(tmp_path):
    data = encode(Image.fromarray(rgb_image(200, 300)), "JPEG")
    assert refused(write(tmp_path / "t.jpg", data[: len(data) // 2])) == "truncated JPEG"


def test_truncated_png():
    data = encode(Image.fromarray(rgb_image()), "PNG")
    assert refused(data[: len(data) // 2]) == "truncated PNG"


@pytest.mark.parametrize("chunk", [b"IHDR", b"IDAT"])
def test_png_with_bad_crc(tmp_path, chunk):
    data = bytearray(encode(Image.fromarray(gradient()), "PNG"))
    at = data.index(chunk)
    data[at + 4 + int.from_bytes(data[at - 4 : at], "big")] ^= 0x5A  # first CRC byte
    reason = refused(write(tmp_path / "crc.png", bytes(data)))
    assert reason == "corrupt PNG (bad checksum)"


def test_html_named_jpeg(tmp_path):
    page = b"<!DOCTYPE html>\n<html><body>Not found</body></html>\n"
    assert refused(write(tmp_path / "x.jpeg", page)) == "not an image (content is text/HTML)"


def test_binary_junk():
    assert refused(bytes(range(256)) * 4) == "not an image (unrecognised format)"


@pytest.mark.parametrize("value", [0, 255])
def test_blank_image_is_refused(value):
    # A failed export or an empty frame: a model would still give it a confident answer.
    image = Image.new("L", (64, 48), value)
    assert refused(encode(image, "PNG")) == f"blank image (every pixel is {value})"
    assert refused(dicom_bytes(np.full((48, 64), value, np.uint8))).startswith("blank image")
    nearly = np.full((48, 64), value, np.uint8)
    nearly[0, 0] = 128
    assert read_gray(encode(Image.fromarray(nearly), "PNG")).shape == (48, 64)  # not blank


def test_one_pixel_image():
    data = encode(Image.new("L", (1, 1)), "PNG")
    assert refused(data) == "image too small: 1x1 pixels"


@pytest.mark.parametrize(
    ("width", "height", "expected"),
    [
        (50_000, 50_000, "image too large: 2500000000 pixels exceeds the limit of 100000000"),
        (12_000, 9_000, "image too large: 12000x9000 pixels exceeds the limit of 100000000"),
    ],
)
def test_decompression_bomb_refused_from_header(width, height, expected):
    data = ihdr_with_size(encode(Image.new("L", (4, 4)), "PNG"), width, height)
    started = time.perf_counter()
    assert refused(data) == expected
    assert time.perf_counter() - started < 1.0


def test_bomb_limit_is_ours_not_pillows(monkeypatch):
    # Pillow's warning threshold (~89M) is below ours; such images must not be refused by it.
    monkeypatch.setattr(decode, "MAX_PIXELS", 10)
    assert refused(encode(Image.new("L", (4, 4)), "PNG")).startswith("image too large: 4x4")
    assert MAX_PIXELS == 100_000_000


def test_directory(tmp_path):
    assert refused(tmp_path) == "is a directory"


def test_missing_file(tmp_path):
    assert refused(tmp_path / "nope.png") == "file vanished or does not exist"


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads all")
def test_permission_denied(tmp_path):
    path = write(tmp_path / "secret.png", encode(Image.fromarray(gradient()), "PNG"))
    path.chmod(0)
    try:
        assert refused(path) == "permission denied"
    finally:
        path.chmod(0o600)


def test_permission_error_is_reported_even_as_root(tmp_path, monkeypatch):
    path = write(tmp_path / "secret.png", encode(Image.fromarray(gradient()), "PNG"))

    def deny(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(decode.os, "open", deny)
    assert refused(path) == "permission denied"


def test_symlink_loop(tmp_path):
    (tmp_path / "a.png").symlink_to(tmp_path / "b.png")
    (tmp_path / "b.png").symlink_to(tmp_path / "a.png")
    assert refused(tmp_path / "a.png") == "symlink loop"


def test_fifo_is_not_read(tmp_path):
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs here")
    os.mkfifo(tmp_path / "pipe.png")
    assert refused(tmp_path / "pipe.png") == "not a regular file"


# --- sniffing -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("head", "kind"),
    [
        (b"\xff\xd8\xff\xe0\x00\x10JFIF", "jpeg"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR", "png"),
        (b"\x00" * 128 + b"DICM", "dicom"),
        (b"BM" + b"\x00" * 12 + (40).to_bytes(4, "little"), "bmp"),
        (b"II*\x00\x08\x00\x00\x00", "tiff"),
        (b"MM\x00*\x00\x00\x00\x08", "tiff"),
        (b"GIF89a\x01\x00", "gif"),
        (b"GIF87a\x01\x00", "gif"),
        (b"RIFF\x00\x00\x00\x00WEBPVP8 ", "webp"),
        # DICOM without its preamble: the meta header first, or the data set alone
        (b"\x02\x00\x00\x00UL\x04\x00\xc2\x00\x00\x00\x02\x00\x01\x00OB\x00\x00\x02\x00\x00\x00",
         "dicom"),
        (b"\x08\x00\x05\x00CS\x0a\x00ISO_IR 100\x08\x00\x16\x00UI\x1a\x00", "dicom"),
        (b"\x08\x00\x05\x00\x0a\x00\x00\x00ISO_IR 100\x08\x00\x16\x00\x1a\x00\x00\x00", "dicom"),
        (b"\x08\x00\x16\x00UI\x1a\x001.2.840", None),  # one element: not enough to tell
        (b"\x08\x00\x16\x00\x02\x00\x00\x001.\x08\x00\x05\x00\x00\x00\x00\x00", None),  # descending
        # A Targa header with an 8-byte image id: one 'implicit element' of group 0008, then
        # the image's origin where a second element's tag would be.
        (b"\x08\x00\x03\x00\x00\x00\x00\x00\x00\x00\x00\x00\x10\x00\x10\x00\x08\x00SCANNER1",
         None),
        (b"BMW owners' manual", None),
        (b"RIFF\x00\x00\x00\x00WAVEfmt ", None),
        (b"%PDF-1.7", None),
        (b"", None),
    ],
)
def test_sniff_kind(head, kind):
    assert sniff_kind(head) == kind


@pytest.mark.parametrize("image_id", [b"SCANNER1", b"XR"])
def test_a_targa_file_is_not_taken_for_dicom(image_id, tmp_path):
    """Its header starts as a bare DICOM element of group 0008 does when its id is 2 or 8 bytes
    long: predict named such files 'DICOM has no pixel data' instead of skipping them."""
    path = tmp_path / "scan.tga"
    Image.new("L", (16, 16)).save(path, id_section=image_id)
    assert path.read_bytes()[:2] == len(image_id).to_bytes(2, "little")
    assert sniff_kind(path.read_bytes()) is None and not looks_like_image(path)


def test_looks_like_image(tmp_path):
    assert looks_like_image(write(tmp_path / "a.txt", encode(Image.new("L", (4, 4)), "PNG")))
    assert not looks_like_image(write(tmp_path / "b.png", b"hello"))
    assert not looks_like_image(tmp_path / "missing.png")
    assert not looks_like_image(tmp_path)


# --- DICOM ----------------------------------------------------------------------------------


def dicom_bytes(pixels: np.ndarray, transfer_syntax=ExplicitVRLittleEndian, **attributes) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = transfer_syntax
    ds = FileDataset("x.dcm", {}, file_meta=meta, preamble=b"\x00" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.SamplesPerPixel = 3 if pixels.shape[-1] == 3 else 1
    ds.Rows, ds.Columns = pixels.shape[-3:-1] if ds.SamplesPerPixel == 3 else pixels.shape[-2:]
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored = ds.BitsAllocated
    ds.PixelRepresentation = int(pixels.dtype.kind == "i")
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    ds.HighBit = ds.BitsStored - 1
    if ds.SamplesPerPixel == 3:
        ds.PlanarConfiguration = 0
    ds.PixelData = pixels.tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def twelve_bit(pixels: np.ndarray) -> np.ndarray:
    return np.round(pixels.astype(float) * 4095 / 255).astype(np.uint16)


def test_dicom_monochrome2_12_in_16(tmp_path):
    source = gradient()
    data = dicom_bytes(twelve_bit(source), BitsStored=12)
    out = read_gray(write(tmp_path / "x.dcm", data))
    assert out.dtype == np.uint8 and out.shape == source.shape
    assert np.abs(out.astype(int) - source).max() <= 1
    np.testing.assert_array_equal(read_gray(data), out)


@pytest.mark.parametrize("implicit_vr", [True, False])
def test_dicom_without_its_preamble_decodes(implicit_vr):
    """Older systems and network captures write the data set without the 128-byte preamble
    and b"DICM", and at times without the meta header: 'not an image' before."""
    import pydicom

    source = gradient()
    full = dicom_bytes(twelve_bit(source), BitsStored=12)
    expected = read_gray(full)
    np.testing.assert_array_equal(read_gray(full[132:]), expected)  # meta header kept
    ds = pydicom.dcmread(io.BytesIO(full))
    del ds.file_meta
    ds.preamble = None
    bare = io.BytesIO()
    pydicom.dcmwrite(bare, ds, implicit_vr=implicit_vr, little_endian=True)
    assert not bare.getvalue().startswith(b"\x00" * 128)
    np.testing.assert_array_equal(read_gray(bare.getvalue()), expected)


def test_dicom_monochrome1_is_inverted():
    source = gradient()
    data = dicom_bytes(twelve_bit(source), BitsStored=12, PhotometricInterpretation="MONOCHROME1")
    assert np.abs(read_gray(data).astype(int) - (255 - source.astype(int))).max() <= 1


def test_raw_12_bit_dicom_that_declares_16_bits_decodes_like_12():
    # No window to say the range: the 16-bit range made it nearly black, and the model's
    # answer flipped; the data's own detector depth is taken, as for 16-bit PNGs.
    source = gradient()
    declared_12 = read_gray(dicom_bytes(twelve_bit(source), BitsStored=12))
    declared_16 = read_gray(dicom_bytes(twelve_bit(source), BitsStored=16))
    np.testing.assert_array_equal(declared_16, declared_12)
    full = np.round(source.astype(float) * 65535 / 255).astype(np.uint16)
    assert np.abs(read_gray(dicom_bytes(full)).astype(int) - source).max() <= 1  # 16 bits used
    # 8-bit data a converter wrote into a file that says 16 bits decodes like 8 bits.
    eight = source.astype(np.uint16)
    np.testing.assert_array_equal(read_gray(dicom_bytes(eight, BitsStored=16)), source)
    # A file that declares 12 bits is taken at its word, however dim the image.
    dim = (twelve_bit(source) // 8).astype(np.uint16)  # peak 511
    out = read_gray(dicom_bytes(dim, BitsStored=12)).astype(int)
    assert np.abs(out - np.round(dim.astype(float) * 255 / 4095)).max() <= 1


@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
def test_dicom_presentation_lut_shape_inverse_inverts_once(photometric):
    # The standard pairs INVERSE with MONOCHROME1 (one inversion, named twice); on MONOCHROME2
    # it alone asks for the image to be shown inverted.
    source = gradient()
    data = dicom_bytes(twelve_bit(source), BitsStored=12, PhotometricInterpretation=photometric,
                       PresentationLUTShape="INVERSE")
    assert np.abs(read_gray(data).astype(int) - (255 - source.astype(int))).max() <= 1


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # pydicom's sigmoid, silenced
def test_dicom_window_of_no_width_is_ignored_not_refused():  # outside tests (_silence_pydicom)
    source = gradient()
    plain = read_gray(dicom_bytes(twelve_bit(source), BitsStored=12))
    zero = dicom_bytes(twelve_bit(source), BitsStored=12, WindowCenter=2048, WindowWidth=0)
    np.testing.assert_array_equal(read_gray(zero), plain)
    # LINEAR_EXACT allows a width under 1: such a window is still applied.
    exact = dicom_bytes(twelve_bit(source), BitsStored=12, WindowCenter=2048, WindowWidth=0.5,
                        VOILUTFunction="LINEAR_EXACT")
    assert set(np.unique(read_gray(exact)).tolist()) <= {0, 128, 255}
    sigmoid = dicom_bytes(twelve_bit(source), BitsStored=12, WindowCenter=2048, WindowWidth=0.5,
                          VOILUTFunction="SIGMOID")
    assert not np.array_equal(read_gray(sigmoid), plain)  # applied too: it allows any width


def test_dicom_rescale_is_applied():
    # A negative slope reverses the stored values; only an applied rescale can show that.
    source = gradient()
    data = dicom_bytes(twelve_bit(source), BitsStored=12, RescaleSlope=-1, RescaleIntercept=4095)
    assert np.abs(read_gray(data).astype(int) - (255 - source.astype(int))).max() <= 1


def windowed(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2.1 linear window, to 0..255."""
    out = ((values - (center - 0.5)) / (width - 1) + 0.5) * 255
    return np.clip(np.round(out), 0, 255)


def test_dicom_window_is_applied():
    stored = np.arange(0, 4096, 2, dtype=np.uint16).reshape(32, 64)
    data = dicom_bytes(stored, BitsStored=12, WindowCenter=2048, WindowWidth=1024)
    out = read_gray(data).astype(int)
    assert out[stored < 1500].max() == 0 and out[stored > 2600].min() == 255
    assert np.abs(out - windowed(stored.astype(float), 2048, 1024)).max() <= 1


def test_dicom_window_after_rescale():
    stored = np.arange(0, 4096, 2, dtype=np.uint16).reshape(32, 64)
    data = dicom_bytes(
        stored,
        BitsStored=12,
        RescaleSlope=2,
        RescaleIntercept=-1000,
        WindowCenter=3000,
        WindowWidth=4000,
    )
    expected = windowed(stored * 2.0 - 1000, 3000, 4000)
    assert np.abs(read_gray(data).astype(int) - expected).max() <= 1


def test_dicom_signed_pixels_use_signed_range():
    stored = np.linspace(-2048, 2047, 48 * 64).round().astype(np.int16).reshape(48, 64)
    out = read_gray(dicom_bytes(stored, BitsStored=12))
    expected = np.round((stored.astype(float) + 2048) * 255 / 4095)
    assert np.abs(out - expected).max() <= 1


def test_dicom_rgb_to_gray():
    rgb = rgb_image()
    out = read_gray(dicom_bytes(rgb, PhotometricInterpretation="RGB"))
    assert out.shape == rgb.shape[:2]
    np.testing.assert_allclose(out, rgb @ LUMA, atol=1)


def test_dicom_resize():
    out = read_gray(dicom_bytes(twelve_bit(gradient()), BitsStored=12), 20)
    assert out.shape == (20, 20) and out.dtype == np.uint8


def test_dicom_without_pixel_data():
    data = dicom_bytes(twelve_bit(gradient()), BitsStored=12)
    ds = pydicom.dcmread(io.BytesIO(data))
    del ds.PixelData
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    assert refused(buffer.getvalue()) == "DICOM has no pixel data"


def test_multiframe_dicom_refused():
    frames = np.stack([twelve_bit(gradient())] * 12)
    data = dicom_bytes(frames, BitsStored=12, NumberOfFrames=12)
    assert refused(data) == "multi-frame DICOM is not supported (12 frames)"


@pytest.mark.parametrize("fmt", ["TIFF", "GIF", "PNG", "WEBP"])
def test_multiframe_images_are_refused_like_dicom(fmt):
    """A two-page TIFF (the X-ray and its mirror) was read as its first page without a word."""
    if fmt == "WEBP" and not features.check("webp"):
        pytest.skip("Pillow without WebP")
    first = Image.fromarray(gradient())
    second = first.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    buffer = io.BytesIO()
    first.save(buffer, fmt, save_all=True, append_images=[second])
    label = {"WEBP": "WebP"}.get(fmt, fmt)
    assert refused(buffer.getvalue()) == (f"multi-frame {label} is not supported (2 frames): "
                                          "save the one to read as a file of its own")
    one = io.BytesIO()
    first.save(one, fmt)
    assert read_gray(one.getvalue()).shape == gradient().shape  # one frame: read


def test_huge_dicom_refused_before_pixels():
    data = dicom_bytes(twelve_bit(gradient()), BitsStored=12, Rows=20_000, Columns=20_000)
    assert refused(data) == "image too large: 20000x20000 pixels exceeds the limit of 100000000"


@pytest.mark.parametrize(
    ("syntax", "expected"),
    [
        (JPEG2000, "cannot decode DICOM transfer syntax JPEG 2000 Image Compression"),
        (JPEGLSLossless, "cannot decode DICOM transfer syntax JPEG-LS Lossless Image Compression"),
    ],
)
def test_compressed_dicom_that_cannot_be_decoded(syntax, expected):
    data = dicom_bytes(twelve_bit(gradient()), BitsStored=12)
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.file_meta.TransferSyntaxUID = syntax
    ds.PixelData = encapsulate([b"\x00\x01junk" * 50])
    ds["PixelData"].VR = "OB"
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    reason = refused(buffer.getvalue())
    assert reason.startswith(expected)
    if syntax == JPEGLSLossless:
        assert "install" in reason


def test_dicom_without_pydicom(monkeypatch):
    import builtins

    data = dicom_bytes(twelve_bit(gradient()), BitsStored=12)
    real_import = builtins.__import__

    def no_pydicom(name, *args, **kwargs):
        if name == "pydicom" or name.startswith("pydicom."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pydicom)
    assert refused(data) == "pydicom is not installed: pip install pydicom"


def test_a_long_reason_is_cut_at_a_word_boundary():
    from pneumoscan.data.decode import _first_line

    text = _first_line(ValueError("word " * 40))
    assert len(text) <= 120 and text.endswith("word...")


def test_dicom_quirks_raise_no_warnings():
    """pydicom warned on stderr about a file it could still read (excess padding) and about
    headers the decoder then refused: a log was to hold results and one-line errors alone."""
    padded = dicom_bytes(twelve_bit(gradient()), BitsStored=12)
    tag = padded.rindex(b"\xe0\x7f\x10\x00")  # PixelData: tag, VR OW, 2 reserved, length
    length = int.from_bytes(padded[tag + 8 : tag + 12], "little")
    padded = padded[: tag + 8] + (length + 200).to_bytes(4, "little") + padded[tag + 12 :]
    padded += b"\0" * 200
    frames = dicom_bytes(twelve_bit(gradient()), BitsStored=12, NumberOfFrames=1)
    element = b"\x28\x00\x08\x00IS\x02\x001 "  # (0028,0008) IS, 2 bytes: "1 "
    assert element in frames
    bad_frames = frames.replace(element, element[:-2] + b"x ")  # "Invalid value for VR IS"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        decode._silence_pydicom.cache_clear()  # set once a process; here, in this test's filters
        assert read_gray(padded, 32).shape == (32, 32)
        assert "bad NumberOfFrames" in refused(bad_frames)
    assert [str(w.message) for w in caught] == []


def test_an_image_to_show_keeps_its_aspect_with_its_longest_side_as_asked(tmp_path):
    # What serve's page shows: the image in its own proportions, decoded at reduced scale where
    # the JPEG allows (a 20 MB upload must not be decoded whole just to be shown at 320 px).
    from PIL import Image

    wide = np.tile(np.linspace(0, 255, 600, dtype=np.uint8), (400, 1))
    path = tmp_path / "wide.jpeg"
    Image.fromarray(wide).save(path, quality=95)
    shown = read_gray(path, 320, keep_aspect=True)
    assert shown.shape == (213, 320)
    expected = np.asarray(Image.fromarray(wide).resize((320, 213), Image.Resampling.BILINEAR))
    assert np.abs(shown.astype(int) - expected.astype(int)).mean() < 4
    assert read_gray(path, 320).shape == (320, 320)  # the model's square input, as before
