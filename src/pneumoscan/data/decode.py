"""The single image decoder shared by training, prediction and the server.

Every X-ray enters the project through ``read_gray`` so that all three see identical pixels,
and so that a hostile or broken file can only ever produce ``UnreadableImage``.

Decisions worth knowing:

* The format is sniffed from the content; file extensions are ignored.
* Size limits are checked from the header, before any pixel is decoded.
* The cache of decoded images is keyed on ``decoder_signature()``: a hash of this file and the
  versions of Pillow, libjpeg, pydicom and its codecs, so no edit here can leave old pixels in
  use.
* 16-bit greyscale (PNG/TIFF) is scaled linearly to 0..255 from its significant bits: a PNG
  sBIT chunk's depth when present, else the smallest of 8, 10, 12, 14, 16 bits that holds the
  largest value, because many medical exporters store raw 10/12/14-bit values in 16-bit files
  (scaled from 16 bits they would come out nearly black). A file using the top bit decodes
  from the full 16-bit range. Values above the sBIT depth mean the encoder scaled
  them up to 16 bits as the PNG spec says, so the low ``16 - sbit`` bits are dropped instead.
* 16-bit colour PNGs are read by Pillow as their high bytes only; those that hold raw detector
  values (every high byte below 64) would come out nearly black and are refused, with the
  advice to save them as 16-bit grayscale.
* A JPEG is decoded by libjpeg at 1/2, 1/4 or 1/8 scale when that still leaves at least four
  times the target size (see ``DRAFT_FACTOR``), then resized like any other image: large files
  decode several times faster, and the pixels stay within a few grey levels of a full decode.
* Float images (mode "F") are not min-max stretched, because that would make the output depend
  on the image content: values up to 1 are read as 0..1, up to 255 as 0..255, else as 0..65535.
* DICOM goes through the modality LUT (rescale), then the VOI LUT or window, and is mapped to
  0..255 from the range the standard says those steps produce, never from the pixel min/max.
"""

from __future__ import annotations

import codecs
import errno
import functools
import hashlib
import os
import re
import stat
import struct
import warnings
import zlib
from io import BytesIO
from pathlib import Path
from typing import IO, Any, NamedTuple

import numpy as np
import PIL
from PIL import Image, ImageOps, features

from pneumoscan.errors import UnreadableImage

MAX_PIXELS: int = 100_000_000
MAX_FILE_BYTES: int = 512 * 1024 * 1024
MIN_SIDE: int = 2

SNIFF_BYTES = 132  # a DICOM preamble is 128 bytes, then b"DICM"
INTERNAL_ERROR = "internal decoder error"

_PILLOW_FORMATS = {
    "jpeg": "JPEG",
    "png": "PNG",
    "bmp": "BMP",
    "tiff": "TIFF",
    "gif": "GIF",
    "webp": "WEBP",
}
_LABELS = {**_PILLOW_FORMATS, "webp": "WebP", "dicom": "DICOM"}
_TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_BMP_HEADER_SIZES = frozenset({12, 16, 40, 52, 56, 64, 108, 124})
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})

# A JPEG is decoded at reduced scale only down to this multiple of the target size, so that
# the final antialiased resize does the real reduction. Against a full decode and the same
# resize, measured on the project's X-rays: at 1x (libjpeg's scaled IDCT deciding the pixels)
# up to 45 grey levels off, moving a 48 px model's probability by up to 0.23; at 2x still up
# to 15 levels (0.05); at 4x at most 4 levels and under 0.2 on average (probabilities within
# 0.02). So only JPEGs of at least 8x the target (shorter side) are reduced.
DRAFT_FACTOR = 4

DETECTOR_DEPTHS = (8, 10, 12, 14, 16)  # bits a sample of a 16-bit file holds, as exporters write

# pydicom and the plugins it decodes compressed pixel data with: their versions are part of
# decoder_signature(), since each may change the pixels a DICOM decodes to.
_DICOM_DISTRIBUTIONS = (
    "pydicom",
    "pylibjpeg",
    "pylibjpeg-libjpeg",
    "pylibjpeg-openjpeg",
    "pylibjpeg-rle",
    "pyjpegls",
    "python-gdcm",
)
_COLOUR_PNG_TYPES = {2: "RGB", 4: "grey+alpha", 6: "RGBA"}  # IHDR colour type -> name

# What Pillow raises on malformed input besides its own exception types; its plugins are
# parsers written in Python, so index and key errors are ordinary signs of a corrupt file.
_PILLOW_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    ValueError,
    SyntaxError,
    struct.error,
    EOFError,
    IndexError,
    KeyError,
    TypeError,
    ZeroDivisionError,
    OverflowError,
    NotImplementedError,
    zlib.error,
)


class _Refused(Exception):
    """Carries a reason up to ``read_gray``, which alone knows what to call the file."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@functools.cache
def decoder_signature() -> str:
    """What decides the pixels a file decodes to: this module's code and its decoders' versions.

    The decode cache is keyed on it, so no change to the decoder can serve pixels of an older
    one (a hand-bumped version number was once forgotten). Computed once per process; pydicom
    is not imported for its version, only its installed metadata read.
    """
    h = hashlib.sha256(_own_code())
    h.update(f"\0Pillow {PIL.__version__} libjpeg {features.version_codec('jpg')}".encode())
    for name in _DICOM_DISTRIBUTIONS:
        h.update(f"\0{name} {_installed_version(name)}".encode())
    return h.hexdigest()[:16]


def _own_code() -> bytes:
    try:
        return Path(__file__).read_bytes()  # the .pyc where only that is installed
    except OSError:
        # Which decoder this is cannot be told: a signature no other process shares, so that
        # caches are rebuilt rather than trusted.
        return os.urandom(16)


def _installed_version(distribution: str) -> str:
    import importlib.metadata  # here: an import of ~0.1 s that plain prediction never needs

    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "none"


# DICOM's value representations; those of the second set have a 4-byte length (PS3.5 7.1.2).
_DICOM_LONG_VRS = frozenset(
    b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
_DICOM_VRS = _DICOM_LONG_VRS | frozenset(
    b"AE AS AT CS DA DS DT FD FL IS LO LT PN SH SL SS ST TM UI UL US".split())


def sniff_kind(head: bytes) -> str | None:
    """The image format named by the magic number at the start of ``head``, or None."""
    head = bytes(head[:SNIFF_BYTES])
    # DICOM first: its 128-byte preamble may legitimately hold another format's header.
    if head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(_PNG_MAGIC):
        return "png"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head[:4] in _TIFF_MAGICS:
        return "tiff"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if _is_bmp(head):
        return "bmp"
    if _is_bare_dicom(head):
        return "dicom"
    return None


def _is_bare_dicom(head: bytes) -> bool:
    """A DICOM data set without its 128-byte preamble and b"DICM", as older systems and network
    captures write it: its first two elements parse, little endian, explicit or implicit VR, in
    ascending order within the file meta (0002) and identifying (0008) groups. One element's
    worth of bytes is not enough: a Targa header can look like that."""
    first = _element_at(head, 0)
    second = first and _element_at(head, first[1], explicit=first[2])
    return bool(second) and first[0] < second[0] and second[0][0] in (0x0002, 0x0008)


def _element_at(head: bytes, at: int, explicit: bool | None = None):
    """((group, element), where the next element starts, explicit VR?) of the element at
    ``at``, or None where ``head`` holds none there."""
    if len(head) < at + 8:
        return None
    tag = (int.from_bytes(head[at:at + 2], "little"), int.from_bytes(head[at + 2:at + 4], "little"))
    if tag[0] not in (0x0002, 0x0008):
        return None
    vr = head[at + 4:at + 6]
    if explicit is None:
        explicit = vr in _DICOM_VRS
    if not explicit:
        return tag, at + 8 + int.from_bytes(head[at + 4:at + 8], "little"), False
    if vr not in _DICOM_VRS:
        return None
    if vr in _DICOM_LONG_VRS:  # two reserved bytes, then a 4-byte length
        return tag, at + 12 + int.from_bytes(head[at + 8:at + 12], "little"), True
    return tag, at + 8 + int.from_bytes(head[at + 6:at + 8], "little"), True


def _is_bmp(head: bytes) -> bool:
    # "BM" alone is too weak: plenty of text files start with it.
    if not head.startswith(b"BM") or len(head) < 18:
        return False
    return int.from_bytes(head[14:18], "little") in _BMP_HEADER_SIZES


# Extensions taken from a folder without sniffing; other files in a folder are taken only when
# their content starts like an image (DICOMs often have no extension at all).
IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".dcm", ".dicom", ".bmp", ".tif", ".tiff", ".gif", ".webp"}
)


def looks_like_image(path: str | Path) -> bool:
    """Whether the file at ``path`` starts like an image this module can try to decode."""
    try:
        with _open_regular(Path(path)) as f:
            head = f.read(SNIFF_BYTES)
    except (OSError, _Refused):
        return False
    return sniff_kind(head) is not None


def read_gray(
    source: str | Path | bytes,
    size: int | None = None,
    *,
    name: str | None = None,
    keep_aspect: bool = False,
) -> np.ndarray:
    """Decode an image file or upload into a 2-D ``uint8`` greyscale array.

    With ``size``, the result is resized to exactly ``(size, size)`` without keeping the aspect
    ratio, as Keras' ``load_img(target_size=...)`` does; with ``keep_aspect`` too, its longest
    side is ``size`` instead (an image to show). Every failure raises ``UnreadableImage``
    naming ``name`` (default: the path, or "upload" for bytes).
    """
    if size is not None and size < 1:
        raise ValueError(f"size must be positive, got {size}")
    if not isinstance(source, (str, os.PathLike, bytes, bytearray, memoryview)):
        raise TypeError(f"source must be a path or bytes, not {type(source).__name__}")
    label = name if name is not None else _default_name(source)
    try:
        return _read_gray(source, size, keep_aspect)
    except _Refused as e:
        raise UnreadableImage(label, e.reason) from e.__cause__
    except MemoryError as e:
        raise UnreadableImage(label, "not enough memory to decode the image") from e
    except Exception as e:
        # A decoder bug must still reach the user as one line, not a traceback; the fuzz
        # tests look for this reason to find such bugs.
        reason = f"{INTERNAL_ERROR} ({type(e).__name__}: {_first_line(e)})"
        raise UnreadableImage(label, reason) from e


def _default_name(source: Any) -> str:
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    return "upload"


def _read_gray(source: str | os.PathLike | bytes, size: int | None,
               keep_aspect: bool = False) -> np.ndarray:
    data = _read_source(source)
    kind = sniff_kind(data[:SNIFF_BYTES])
    if kind is None:
        raise _Refused(_not_an_image_reason(data))
    if kind == "dicom":
        image = Image.fromarray(_decode_dicom(data))
    else:
        image = _decode_pillow(data, kind, size)
    low, high = image.getextrema()
    if low == high:  # a failed export or an empty frame: no X-ray, whatever a model would say
        raise _Refused(f"blank image (every pixel is {low})")
    if size is not None:
        target = (size, size)
        if keep_aspect:
            scale = size / max(image.size)
            target = tuple(max(1, round(side * scale)) for side in image.size)
        if image.size != target:
            image = image.resize(target, Image.Resampling.BILINEAR)
    return np.array(image, dtype=np.uint8)


# --- reading bytes -------------------------------------------------------------------------


def _read_source(source: str | os.PathLike | bytes) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    else:
        data = _read_file(Path(source))
    _check_length(len(data))
    return data


def _read_file(path: Path) -> bytes:
    try:
        with _open_regular(path) as f:
            _check_length(os.fstat(f.fileno()).st_size)
            # One byte past the limit, in case the file grew since fstat.
            return f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise _Refused(_os_reason(e)) from e


def _open_regular(path: Path) -> IO[bytes]:
    """Open ``path`` for reading, refusing anything that is not a regular file.

    O_NONBLOCK keeps a FIFO from hanging the caller; it changes nothing for regular files.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise _Refused("is a directory" if stat.S_ISDIR(mode) else "not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb")


def _os_reason(e: OSError) -> str:
    if isinstance(e, FileNotFoundError):
        if e.filename is not None and os.path.islink(e.filename):
            return f"broken symlink (to {os.readlink(e.filename)}, which does not exist)"
        return "file vanished or does not exist"
    if isinstance(e, PermissionError):
        return "permission denied"
    if isinstance(e, IsADirectoryError):
        return "is a directory"
    if e.errno == errno.ELOOP:
        return "symlink loop"
    return f"cannot read file ({(e.strerror or str(e)).lower()})"


def _check_length(n: int) -> None:
    if n == 0:
        raise _Refused("empty file")
    if n > MAX_FILE_BYTES:
        raise _Refused(f"file too large: {n} bytes exceeds the limit of {MAX_FILE_BYTES}")


def _not_an_image_reason(data: bytes) -> str:
    head = data[:4096]
    if head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"<") or _is_text(head):
        return "not an image (content is text/HTML)"
    return "not an image (unrecognised format)"


def _is_text(head: bytes) -> bool:
    if any(b < 0x20 and b not in b"\t\n\r\f" for b in head):
        return False
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError:
        return False
    return True


def _check_dimensions(width: int, height: int) -> None:
    if width * height > MAX_PIXELS:
        raise _Refused(
            f"image too large: {width}x{height} pixels exceeds the limit of {MAX_PIXELS}"
        )
    if min(width, height) < MIN_SIDE:
        raise _Refused(f"image too small: {width}x{height} pixels")


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    text = lines[0] if lines else type(e).__name__
    if len(text) > 120:  # cut at a word boundary: a reason never ends mid-word
        text = text[:117].rsplit(" ", 1)[0].rstrip(" ,;:-(") + "..."
    return text[:1].lower() + text[1:]


# --- Pillow formats ------------------------------------------------------------------------


def _decode_pillow(data: bytes, kind: str, size: int | None) -> Image.Image:
    label = _LABELS[kind]
    png = _scan_png(data) if kind == "png" else None
    try:
        with warnings.catch_warnings():
            # Pillow's own bomb warning fires below our limit; our header check decides.
            # (catch_warnings is process-wide before Python 3.14; should threads race, the
            # worst outcome is this filter outliving the block, which changes no result.)
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = _open_and_load(data, kind, size)
        if png is not None:
            _check_sixteen_bit_colour(image, png)
        return _to_gray(image, png.gray_sbit() if png is not None else None)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise _Refused(_bomb_reason(e)) from e
    except _PILLOW_ERRORS as e:
        raise _Refused(_pillow_reason(e, label)) from e


def _open_and_load(data: bytes, kind: str, size: int | None) -> Image.Image:
    image = Image.open(BytesIO(data), formats=[_PILLOW_FORMATS[kind]])
    _check_dimensions(*image.size)
    frames = getattr(image, "n_frames", 1)
    if frames > 1 and kind != "jpeg":  # (a camera's JPEG may carry a second, smaller picture)
        # Which page is the X-ray? Reading the first alone would answer for it unasked.
        raise _Refused(f"multi-frame {_LABELS[kind]} is not supported ({frames} frames): save "
                       "the one to read as a file of its own")
    if kind == "jpeg":
        # libjpeg decodes straight to grey, and at 1/2, 1/4 or 1/8 scale when that still
        # leaves DRAFT_FACTOR times the target size: large JPEGs decode several times faster.
        target = (DRAFT_FACTOR * size, DRAFT_FACTOR * size) if size else None
        image.draft("L", target)
    image.load()
    ImageOps.exif_transpose(image, in_place=True)
    return image


def _bomb_reason(e: Exception) -> str:
    # Pillow refuses before the image object exists, so only its pixel count is known.
    match = re.search(r"\((\d+) pixels\)", str(e))
    count = f"{match.group(1)} pixels" if match else "pixel count"
    return f"image too large: {count} exceeds the limit of {MAX_PIXELS}"


def _pillow_reason(e: BaseException, label: str) -> str:
    message = str(e).lower()
    if isinstance(e, EOFError) or "truncated" in message or "premature end" in message:
        return f"truncated {label}"
    if "cannot identify image file" in message:
        return f"corrupt {label} (unreadable header)"
    return f"corrupt {label} ({_first_line(e)})"


class _PngHeader(NamedTuple):
    depth: int  # bits a sample, from IHDR
    color_type: int
    sbit: bytes  # the sBIT chunk: significant bits of each channel; empty without one

    def gray_sbit(self) -> int | None:
        """The grey channel's significant bits, for the 16-bit grey depth rule; None if unknown."""
        if self.color_type not in (0, 4) or not self.sbit or not 1 <= self.sbit[0] <= 16:
            return None
        return self.sbit[0]


def _scan_png(data: bytes) -> _PngHeader:
    """Verify every PNG chunk's CRC (Pillow skips IDAT's); return what IHDR and sBIT say."""
    view = memoryview(data)
    pos, depth, color_type, sbit = len(_PNG_MAGIC), 0, -1, b""
    while pos + 12 <= len(data):
        length = int.from_bytes(data[pos : pos + 4], "big")
        end = pos + 12 + length
        if end > len(data):
            raise _Refused("truncated PNG")
        chunk_type, body = bytes(view[pos + 4 : pos + 8]), view[pos + 8 : end - 4]
        if zlib.crc32(body, zlib.crc32(chunk_type)) != int.from_bytes(view[end - 4 : end], "big"):
            raise _Refused("corrupt PNG (bad checksum)")
        if chunk_type == b"IHDR" and len(body) >= 10:
            depth, color_type = body[8], body[9]
        elif chunk_type == b"sBIT":
            sbit = bytes(body)
        elif chunk_type == b"IEND":
            return _PngHeader(depth, color_type, sbit)
        pos = end
    raise _Refused("truncated PNG")


def _check_sixteen_bit_colour(image: Image.Image, png: _PngHeader) -> None:
    """Refuse a 16-bit colour PNG of raw detector values, which would decode nearly black.

    Pillow reads 16-bit RGB, RGBA and grey+alpha PNGs as 8 bits a channel, the high byte of
    each sample, so the depth rules of 16-bit grey cannot be applied: raw 12-bit values keep
    only their top 4 bits. Colour files that use the 16-bit range (as the PNG spec asks, sBIT
    or not) lose nothing that matters and decode as before.
    """
    name = _COLOUR_PNG_TYPES.get(png.color_type)
    if png.depth != 16 or name is None or image.mode not in ("RGB", "RGBA"):
        return  # not such a file, or a Pillow that reads it whole
    if max(high for _, high in image.getextrema()[:3]) < 64:  # every sample below 2**14
        raise _Refused(
            f"16-bit {name} PNG of raw values below 16384 is not supported: only the high "
            "byte of each sample can be read; save it as 16-bit grayscale"
        )


def _to_gray(image: Image.Image, sbit: int | None) -> Image.Image:
    mode = image.mode
    if mode == "L":
        return image
    if mode in _SIXTEEN_BIT_MODES:
        return Image.fromarray(_sixteen_bit_to_uint8(np.asarray(image), sbit))
    if mode == "F":
        return Image.fromarray(_float_to_uint8(np.asarray(image)))
    if mode in ("P", "PA"):
        return image.convert("RGB").convert("L")
    if mode == "LAB":
        return image.getchannel(0)
    try:
        return image.convert("L")
    except ValueError:
        pass
    try:
        return image.convert("RGB").convert("L")
    except ValueError as e:
        raise _Refused(f"unsupported pixel mode {mode}") from e


def _detector_depth(peak: int) -> int:
    """The smallest usual detector depth (DETECTOR_DEPTHS) that holds 16-bit values up to
    ``peak``: the depth of raw data in a file that says 16 bits without saying its own."""
    return next(d for d in DETECTOR_DEPTHS if peak < 1 << d)


def _sixteen_bit_to_uint8(pixels: np.ndarray, sbit: int | None) -> np.ndarray:
    # Mode "I" is 32-bit, but Pillow uses it for 16-bit data; anything beyond is clipped.
    values = np.clip(pixels, 0, 65535).astype(np.uint32)
    peak = int(values.max())
    # Without sBIT, the depth is the smallest usual detector depth that holds the data: raw
    # 12-bit values (0..4095) scaled from 16 bits would come out as 0..15, a black image.
    # Whole detector depths, not the peak's own bit length, so that images of one detector
    # decode alike however bright each one is.
    bits = sbit or _detector_depth(peak)
    if peak >> bits:
        # Values beyond sBIT's depth: the encoder scaled them up to 16 bits, as the PNG spec
        # says, so the low bits carry nothing. (Raw values within the depth are scaled as they
        # are, which is what exporters that ignore the spec write.)
        values >>= 16 - bits
    top = (1 << bits) - 1
    return ((values * 255 + top // 2) // top).astype(np.uint8)


def _float_to_uint8(pixels: np.ndarray) -> np.ndarray:
    values = np.nan_to_num(pixels.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    peak = float(values.max()) if values.size else 0.0
    full_scale = 1.0 if peak <= 1.0 else 255.0 if peak <= 255.0 else 65535.0
    return _linear_to_uint8(values, 0.0, full_scale)


def _linear_to_uint8(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map ``low`` to 0 and ``high`` to 255 (either may be the larger), rounding and clipping."""
    if high == low:
        return np.zeros(values.shape, dtype=np.uint8)
    scaled = (values.astype(np.float32) - np.float32(low)) * np.float32(255.0 / (high - low))
    scaled = np.nan_to_num(scaled, nan=0.0, posinf=255.0, neginf=0.0)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


# --- DICOM ---------------------------------------------------------------------------------


def _decode_dicom(data: bytes) -> np.ndarray:
    try:
        import pydicom
        import pydicom.pixels
    except ImportError as e:
        raise _Refused("pydicom is not installed: pip install pydicom") from e
    _silence_pydicom()
    dataset = _read_dataset(pydicom, data)
    _check_dicom_header(dataset)
    pixels = _dicom_pixel_array(dataset)
    try:
        gray = _dicom_to_uint8(pixels, dataset)
    except _Refused:
        raise
    except Exception as e:  # pydicom's LUT code trusts the header; a bad one raises anything
        raise _Refused(f"corrupt DICOM ({_first_line(e)})") from e
    if pixels.ndim == 2 and _shown_inverted(dataset):
        gray = 255 - gray
    return gray


def _shown_inverted(ds: Any) -> bool:
    """Whether a grey image is meant to be shown with its values inverted: MONOCHROME1 (low
    values white), or a Presentation LUT Shape of INVERSE. The standard pairs the two for
    MONOCHROME1, both naming the one inversion; on MONOCHROME2, INVERSE alone asks for it."""
    return (_dicom_str(ds, "PhotometricInterpretation") == "MONOCHROME1"
            or _dicom_str(ds, "PresentationLUTShape") == "INVERSE")


@functools.cache
def _silence_pydicom() -> None:
    """No warnings from pydicom's code (its own, or numpy's in its arithmetic) on stderr.

    A file it can read despite an odd header or excess padding decodes as any other; one it
    cannot gets the one-line reason. A log then holds results and those lines alone. Set once
    for the process: ``catch_warnings`` is process-wide, and decoding runs on several threads.
    """
    warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")


def _read_dataset(pydicom: Any, data: bytes) -> Any:
    from pydicom import uid

    try:
        # force: the sniffer saw a DICOM preamble, or a bare data set, which pydicom reads only
        # when forced (and it tolerates an odd meta header).
        ds = pydicom.dcmread(BytesIO(data), force=True)
    except Exception as e:  # pydicom's parser raises whatever a malformed element provokes
        raise _Refused(f"corrupt DICOM ({_first_line(e)})") from e
    implicit, little = ds.original_encoding
    if "TransferSyntaxUID" not in ds.file_meta and implicit is not None and little is not None:
        # A data set without a meta header: its pixels are in the encoding its elements were
        # read in, which pydicom worked out; it decodes no pixels without being told.
        ds.file_meta.TransferSyntaxUID = (
            uid.ImplicitVRLittleEndian if implicit
            else uid.ExplicitVRLittleEndian if little else uid.ExplicitVRBigEndian)
    return ds


def _check_dicom_header(ds: Any) -> None:
    if "PixelData" not in ds:
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            raise _Refused("DICOM float pixel data is not supported")
        raise _Refused("DICOM has no pixel data")
    frames = _dicom_int(ds, "NumberOfFrames", 1)
    if frames > 1:
        raise _Refused(f"multi-frame DICOM is not supported ({frames} frames)")
    _check_dimensions(_dicom_int(ds, "Columns", 0), _dicom_int(ds, "Rows", 0))
    if _dicom_str(ds, "PhotometricInterpretation") == "PALETTE COLOR":
        raise _Refused("DICOM palette colour images are not supported")


def _dicom_int(ds: Any, keyword: str, default: int) -> int:
    try:
        value = ds.get(keyword, None)
        return default if value is None or value == "" else int(value)
    except Exception as e:  # a malformed value fails on first access, with any exception
        raise _Refused(f"corrupt DICOM (bad {keyword})") from e


def _dicom_str(ds: Any, keyword: str) -> str:
    try:
        return str(ds.get(keyword, "") or "").strip().upper()
    except Exception as e:
        raise _Refused(f"corrupt DICOM (bad {keyword})") from e


def _dicom_pixel_array(ds: Any) -> np.ndarray:
    try:
        pixels = ds.pixel_array
    except Exception as e:  # decoders raise RuntimeError, NotImplementedError, ValueError, ...
        raise _Refused(_dicom_decode_reason(ds, e)) from e
    if pixels.ndim == 3 and pixels.shape[-1] == 3:
        return pixels
    if pixels.ndim != 2:
        raise _Refused(f"corrupt DICOM (pixel array has shape {pixels.shape})")
    return pixels


def _dicom_decode_reason(ds: Any, e: Exception) -> str:
    uid = _transfer_syntax(ds)
    if uid is None:
        return f"corrupt DICOM pixel data ({_first_line(e)})"
    hint = _dicom_codec_hint(uid)
    if hint is None:
        return f"corrupt DICOM pixel data ({_first_line(e)})"
    return f"cannot decode DICOM transfer syntax {uid.name} ({hint})"


def _transfer_syntax(ds: Any) -> Any:
    try:
        uid = ds.file_meta.get("TransferSyntaxUID")
        return uid if uid is not None and uid.is_transfer_syntax and uid.is_compressed else None
    except Exception:  # an unreadable meta header just means no better message
        return None


def _dicom_codec_hint(uid: Any) -> str | None:
    """What to install for a compressed transfer syntax; None when a decoder is present."""
    from pydicom import uid as uids
    from pydicom.pixels import get_decoder

    try:
        if get_decoder(uid).is_available:
            return "corrupt or unsupported compressed data"
    except NotImplementedError:
        return "no decoder exists for it"
    if uid in (
        uids.JPEG2000Lossless,
        uids.JPEG2000,
        uids.HTJ2KLossless,
        uids.HTJ2KLosslessRPCL,
        uids.HTJ2K,
    ):
        return "install pylibjpeg-openjpeg or gdcm"
    if uid in (uids.JPEGLSLossless, uids.JPEGLSNearLossless):
        return "install pyjpegls, pylibjpeg-libjpeg or gdcm"
    if uid == uids.RLELossless:
        return "install pylibjpeg-rle"
    return "install pylibjpeg-libjpeg or gdcm"


def _dicom_to_uint8(pixels: np.ndarray, ds: Any) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    if pixels.ndim == 3:
        # pydicom has already converted YBR to RGB.
        luma = pixels[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        return _linear_to_uint8(luma, 0, (1 << _dicom_bits_stored(ds)) - 1)
    values = apply_modality_lut(pixels, ds)
    low, high = _modality_output_range(ds)
    voi_range = _voi_output_range(ds, low, high)
    if voi_range is None:
        low, high = _unwindowed_range(pixels, ds, low, high)
        return _linear_to_uint8(values, min(low, high), max(low, high))
    return _linear_to_uint8(apply_voi_lut(values, ds, prefer_lut=True), *voi_range)


def _dicom_bits_stored(ds: Any) -> int:
    bits = _dicom_int(ds, "BitsStored", 0) or _dicom_int(ds, "BitsAllocated", 8)
    if not 1 <= bits <= 32:
        raise _Refused(f"corrupt DICOM (BitsStored {bits})")
    return bits


def _modality_output_range(ds: Any) -> tuple[float, float]:
    """The value range after the modality LUT, as the standard (and pydicom) defines it.

    Not sorted: with a negative slope ``low > high``; windowing maps below-window to ``low``.
    """
    if ds.get("ModalityLUTSequence"):
        return 0.0, float((1 << int(ds.ModalityLUTSequence[0].LUTDescriptor[2])) - 1)
    bits = _dicom_bits_stored(ds)
    if _dicom_int(ds, "PixelRepresentation", 0) == 0:
        low, high = 0.0, float((1 << bits) - 1)
    else:
        low, high = float(-(1 << (bits - 1))), float((1 << (bits - 1)) - 1)
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is not None and intercept is not None:
        low, high = low * float(slope) + float(intercept), high * float(slope) + float(intercept)
    if not (np.isfinite(low) and np.isfinite(high)):
        raise _Refused("corrupt DICOM (bad rescale slope or intercept)")
    return low, high


def _unwindowed_range(pixels: np.ndarray, ds: Any, low: float, high: float
                      ) -> tuple[float, float]:
    """The range shown as black to white where no window says it: the modality range, except
    for plain unsigned values in a file that says 16 bits but holds raw 12-bit data, or 8-bit
    data from a converter (either would come out nearly black). Those get the smallest usual
    detector depth that holds them, as 16-bit PNGs without sBIT do; a file that declares 12 or
    14 bits is taken at its word."""
    plain = (_dicom_bits_stored(ds) == 16 and (low, high) == (0.0, 65535.0)  # no rescale
             and not ds.get("ModalityLUTSequence")
             and _dicom_int(ds, "PixelRepresentation", 0) == 0)
    if not plain or pixels.size == 0:
        return low, high
    peak = int(pixels.max())
    return 0.0, float((1 << _detector_depth(peak)) - 1)


def _voi_output_range(ds: Any, low: float, high: float) -> tuple[float, float] | None:
    """The range ``apply_voi_lut(prefer_lut=True)`` maps into, or None if it does nothing."""
    from pydicom.pixels import apply_voi

    sequence = ds.get("VOILUTSequence")
    if sequence and None not in (sequence[0].get("LUTDescriptor"), sequence[0].get("LUTData")):
        # The LUT's own entries bound its output; many files declare 16 bits but use 12.
        entries, first = sequence[0].LUTDescriptor[0] or 65536, sequence[0].LUTDescriptor[1]
        table = apply_voi(np.arange(first, first + entries, dtype=np.int64), ds)
        return float(table.min()), float(table.max())
    if ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        # The standard wants 1 or more for LINEAR (the default), more than 0 for LINEAR_EXACT
        # and SIGMOID: else no window.
        width = _first_value(ds, "WindowWidth")
        if width <= 0 or (width < 1 and _dicom_str(ds, "VOILUTFunction") in ("", "LINEAR")):
            return None
        return low, high
    return None


def _first_value(ds: Any, keyword: str) -> float:
    """A numeric element's first value (windows may come several to a file)."""
    from pydicom.multival import MultiValue

    try:
        value = ds.get(keyword)
        return float(value[0] if isinstance(value, MultiValue) else value)
    except Exception as e:  # a malformed value fails on first access, with any exception
        raise _Refused(f"corrupt DICOM (bad {keyword})") from e
