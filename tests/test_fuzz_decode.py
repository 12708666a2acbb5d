"""Property: for any bytes at all, read_gray returns a 2-D uint8 array or raises UnreadableImage.

``benchmarks/fuzz_decode.py`` runs these same properties with many more examples.
"""

from __future__ import annotations

import io
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from pneumoscan.data.decode import INTERNAL_ERROR, read_gray
from pneumoscan.errors import UnreadableImage

MAGICS = (
    b"\xff\xd8\xff\xe0",
    b"\x89PNG\r\n\x1a\n",
    b"GIF89a",
    b"II*\x00",
    b"MM\x00*",
    b"BM" + b"\x00" * 12 + (40).to_bytes(4, "little"),
    b"RIFF\x00\x10\x00\x00WEBPVP8 ",
    b"\x00" * 128 + b"DICM",
)


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _dicom_seed() -> bytes | None:
    try:
        from pydicom.dataset import FileDataset, FileMetaDataset
        from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage
    except ImportError:
        return None
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("seed.dcm", {}, file_meta=meta, preamble=b"\x00" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, "1.2.3.4"
    ds.Rows, ds.Columns, ds.SamplesPerPixel = 8, 6, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ds.RescaleSlope, ds.RescaleIntercept = 1, 0
    ds.PixelData = np.arange(48, dtype=np.uint16).tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _seeds() -> list[bytes]:
    gray = Image.fromarray((np.arange(64, dtype=np.uint8) * 4).reshape(8, 8))
    rgb = Image.merge("RGB", [gray, gray.transpose(Image.Transpose.ROTATE_90), gray])
    seeds = [
        _encode(gray, "PNG"),
        _encode(rgb, "PNG"),
        _encode(rgb.quantize(16), "PNG"),
        _encode(Image.fromarray(np.arange(64, dtype=np.uint16).reshape(8, 8) * 997), "PNG"),
        _encode(gray, "JPEG"),
        _encode(rgb, "JPEG", quality=50),
        _encode(rgb, "JPEG", progressive=True),
        _encode(gray, "GIF"),
        _encode(gray, "BMP"),
        _encode(gray, "TIFF"),
    ]
    dicom = _dicom_seed()
    return seeds + ([dicom] if dicom else [])


SEEDS = _seeds()


@st.composite
def mutated_files(draw: st.DrawFn) -> bytes:
    """A valid small file with a few bytes flipped, cut off, or spliced in or out."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    # Mostly spare the magic number (and DICOM preamble), or nearly every input would stop
    # at the sniffer; one time in ten it is fair game too.
    spared = 0 if draw(st.integers(0, 9)) == 0 else (132 if data[128:132] == b"DICM" else 8)
    for _ in range(draw(st.integers(1, 6))):
        if len(data) <= spared:
            break
        at = draw(st.integers(spared, len(data) - 1))
        op = draw(st.sampled_from(["flip", "set", "truncate", "insert", "delete", "duplicate"]))
        if op == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            data[at] = draw(st.sampled_from([0x00, 0x01, 0x7F, 0x80, 0xFF]))
        elif op == "truncate":
            del data[at:]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
        elif op == "delete":
            del data[at : at + draw(st.integers(1, 64))]
        else:
            length = draw(st.integers(1, 64))
            data[at:at] = data[draw(st.integers(0, len(data) - 1)) :][:length]
    # An attacker can fix PNG checksums, so let the mutations reach Pillow's PNG decoder too.
    if data.startswith(b"\x89PNG") and draw(st.integers(0, 1)):
        _fix_png_crcs(data)
    return bytes(data)


def _fix_png_crcs(data: bytearray) -> None:
    pos = 8
    while pos + 12 <= len(data):
        end = pos + 12 + int.from_bytes(data[pos : pos + 4], "big")
        if end > len(data):
            return
        data[end - 4 : end] = zlib.crc32(data[pos + 4 : end - 4]).to_bytes(4, "big")
        pos = end


random_bytes = st.binary(max_size=4096)
magic_then_junk = st.builds(lambda head, tail: head + tail, st.sampled_from(MAGICS), random_bytes)
mutated = mutated_files()


def check_decodes_or_refuses(data: bytes) -> None:
    """The property itself; raises AssertionError (or the stray exception) when it fails."""
    try:
        out = read_gray(data, name="fuzz")
    except UnreadableImage as e:
        assert INTERNAL_ERROR not in e.reason, e.reason
        return
    assert isinstance(out, np.ndarray)
    assert out.ndim == 2 and out.dtype == np.uint8 and min(out.shape) >= 2


def check_resized(data: bytes) -> None:
    try:
        out = read_gray(data, 16, name="fuzz")
    except UnreadableImage as e:
        assert INTERNAL_ERROR not in e.reason, e.reason
        return
    assert out.shape == (16, 16) and out.dtype == np.uint8


PROPERTIES = {
    "random bytes": (random_bytes, check_decodes_or_refuses),
    "magic number then random bytes": (magic_then_junk, check_decodes_or_refuses),
    "mutated valid files": (mutated, check_decodes_or_refuses),
    "mutated valid files, resized": (mutated, check_resized),
}

FUZZ = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
# Malformed DICOM makes pydicom warn about every odd element; that is expected here.
quiet = pytest.mark.filterwarnings("ignore")


def test_seeds_are_valid():
    for seed in SEEDS:
        assert read_gray(seed).ndim == 2


@quiet
@FUZZ
@given(random_bytes)
def test_random_bytes(data):
    check_decodes_or_refuses(data)


@quiet
@FUZZ
@given(magic_then_junk)
def test_magic_number_then_random_bytes(data):
    check_decodes_or_refuses(data)


@quiet
@FUZZ
@given(mutated)
def test_mutated_valid_files(data):
    check_decodes_or_refuses(data)


@quiet
@FUZZ
@given(mutated)
def test_mutated_valid_files_resized(data):
    check_resized(data)
