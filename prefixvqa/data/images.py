"""Load any medical image reference (PNG/JPEG/TIFF incl. 16-bit, DICOM, NIfTI) as an 8-bit RGB PIL image.

open_clip preprocessing expects 8-bit RGB; medical files are often 12/16-bit, float, inverted (MONOCHROME1),
windowed, multi-frame or volumetric. This module makes that conversion explicit and in one place:

* 8-bit data is treated as display-ready and passed through unchanged;
* wider data is scaled to 0..255 by its min/max, or by a window (centre, width) when given or found in the DICOM
  header (VOI LUT Sequence first, then Window Center/Width; first value when multi-valued);
* the format is detected from magic bytes (``DICM`` at offset 128, NIfTI header magic, gzip, PIL), with the file
  suffix only as a fallback (``.dcm`` without preamble, ``.nii``/``.nii.gz``).

Every failure raises `ImageLoadError` naming the file and the reason. Every kind obeys one pixel limit, PIL's
decompression-bomb threshold (``2 * PIL.Image.MAX_IMAGE_PIXELS``), checked from the header before any pixel is
decoded: a small compressed file cannot expand into gigabytes.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import sys
import zlib
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from .records import DataError

__all__ = ["ImageLoadError", "load_image", "image_bytes_hash", "detect_image_kind"]

ImageRef = str | bytes | os.PathLike

_NIFTI_SUFFIXES = (".nii", ".nii.gz")
_DICOM_SUFFIXES = (".dcm", ".dicom", ".dic")
_PIL_MAGIC = {
    b"\x89PNG\r\n\x1a\n": "PNG",
    b"\xff\xd8\xff": "JPEG",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
    b"II+\x00": "TIFF",  # BigTIFF
    b"MM\x00+": "TIFF",
    b"GIF8": "GIF",
    b"BM": "BMP",
    b"\x00\x00\x00\x0cjP  ": "JPEG2000",
    b"\xff\x4f\xff\x51": "JPEG2000",
}


class ImageLoadError(DataError):
    """An image could not be read: missing, corrupt, truncated, unsupported, or undecodable pixel data."""


# ----------------------------------------------------------------------------------------------------------- helpers
def pixel_limit() -> int | None:
    """Largest image (pixels) any loader decodes: PIL's own error threshold, so PNG and DICOM/NIfTI agree.
    Follows ``PIL.Image.MAX_IMAGE_PIXELS`` at call time (None: no limit, for trusted large slides)."""
    return None if Image.MAX_IMAGE_PIXELS is None else 2 * int(Image.MAX_IMAGE_PIXELS)


def _check_pixels(label: str, kind: str, shape: tuple[int, ...], what: str = "image") -> None:
    limit = pixel_limit()
    count = int(np.prod([int(d) for d in shape], dtype=np.float64))
    if limit is not None and count > limit:
        size = " x ".join(str(int(d)) for d in shape)
        raise ImageLoadError(f"{label}: {kind} {what} of {size} = {count} pixels exceeds the limit of {limit} "
                             f"(2 x PIL.Image.MAX_IMAGE_PIXELS, as for PNG); raise PIL.Image.MAX_IMAGE_PIXELS (or set "
                             f"it to None) for trusted large images")


def _to_unit(arr: np.ndarray) -> np.ndarray:
    """Float copy with NaN/inf replaced by the finite minimum, so min/max and windows stay defined."""
    out = np.asarray(arr, dtype=np.float32 if arr.dtype.itemsize <= 2 else np.float64)
    finite = np.isfinite(out)
    if not finite.all():
        out = np.where(finite, out, out[finite].min() if finite.any() else 0.0)
    return out


def _quantize(unit: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(unit * 255.0), 0, 255).astype(np.uint8)


def _minmax_uint8(arr: np.ndarray) -> np.ndarray:
    values = _to_unit(arr)
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:  # constant image: black rather than a division by zero
        return np.zeros(values.shape, dtype=np.uint8)
    return _quantize((values - lo) / (hi - lo))


def _window_uint8(arr: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 windowing (LINEAR, LINEAR_EXACT, SIGMOID) straight to 0..255."""
    if width <= 0 or (width < 1 and function.upper() == "LINEAR"):
        raise ValueError(f"window width must be positive (>= 1 for LINEAR), got {width}")
    values = _to_unit(arr).astype(np.float64)
    function = function.upper()
    if function == "SIGMOID":
        unit = 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
    elif function == "LINEAR_EXACT":
        unit = (values - center) / width + 0.5
    else:
        unit = (values - (center - 0.5)) / max(width - 1.0, 1e-12) + 0.5
    return _quantize(np.clip(unit, 0.0, 1.0))


def _to_uint8(arr: np.ndarray, window: tuple[float, float] | None) -> np.ndarray:
    if window is not None:
        return _window_uint8(arr, float(window[0]), float(window[1]))
    if arr.dtype == np.uint8:
        return arr
    return _minmax_uint8(arr)


def _scale_nominal(arr: np.ndarray, bits: int) -> np.ndarray:
    """Scale by the nominal range 0..2**bits-1 (not min/max) so colour hues, brightness and masks are kept."""
    if arr.dtype == np.uint8 and bits == 8:
        return arr
    return _quantize(_to_unit(arr) / float(2**bits - 1))


def _rgb_image(arr: np.ndarray) -> Image.Image:
    arr = np.ascontiguousarray(arr)
    if arr.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {arr.dtype}")
    if arr.ndim == 2:
        return Image.fromarray(arr).convert("RGB")  # grayscale replicated to three channels
    if arr.ndim == 3 and arr.shape[-1] == 3:
        return Image.fromarray(arr)
    raise ValueError(f"cannot make an RGB image from an array of shape {arr.shape}")


def _describe(ref: Any, name: str | None) -> str:
    if name:
        return name
    if isinstance(ref, (bytes, bytearray)):
        return f"<{len(ref)} image bytes>"
    return str(ref)


def _has_suffix(label: str, suffixes: tuple[str, ...]) -> bool:
    return label.lower().endswith(suffixes)


# --------------------------------------------------------------------------------------------------------- detection
def _nifti_magic(head: bytes) -> bool:
    return head[344:348] in (b"n+1\x00", b"ni1\x00") or head[4:8] == b"n+2\x00"


def _pil_format(head: bytes) -> str | None:
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    return next((fmt for magic, fmt in _PIL_MAGIC.items() if head.startswith(magic)), None)


def detect_image_kind(head: bytes, label: str = "") -> str | None:
    """'dicom' | 'nifti' | 'nifti-gz' | 'pil' from the first bytes (>= 544), else a suffix fallback, else None."""
    if head[128:132] == b"DICM":
        return "dicom"
    if _nifti_magic(head):
        return "nifti"
    if head[:2] == b"\x1f\x8b":
        return "nifti-gz"  # the only gzip payload we read; confirmed after decompressing the header
    if _pil_format(head):
        return "pil"
    if _has_suffix(label, _DICOM_SUFFIXES):
        return "dicom"
    if _has_suffix(label, _NIFTI_SUFFIXES):
        return "nifti"
    return None


# --------------------------------------------------------------------------------------------------------------- PIL
def _load_pil(
    fp: IO[bytes], label: str, fmt: str | None, frame: int | None, window: tuple[float, float] | None
) -> Image.Image:
    try:
        with Image.open(fp) as img:
            if frame is not None:
                n_frames = getattr(img, "n_frames", 1)
                if not -n_frames <= frame < n_frames:
                    raise ImageLoadError(f"{label}: frame {frame} out of range (image has {n_frames} frame(s))")
                img.seek(frame % n_frames)
            img.load()
            return _pil_to_rgb(img, window)
    except ImageLoadError:
        raise
    except Image.DecompressionBombError as err:
        raise ImageLoadError(
            f"{label}: {err} Raise PIL.Image.MAX_IMAGE_PIXELS (or set it to None) for trusted large slides."
        ) from err
    except UnidentifiedImageError as err:
        why = f"corrupt or truncated {fmt} file" if fmt else "unsupported or corrupt image file"
        raise ImageLoadError(f"{label}: {why} (not DICOM or NIfTI, and PIL cannot identify it)") from err
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, struct.error ... for damaged files
        raise ImageLoadError(f"{label}: corrupt or truncated image file: {type(err).__name__}: {err}") from err


def _pil_to_rgb(img: Image.Image, window: tuple[float, float] | None = None) -> Image.Image:
    """PIL image of any mode -> 8-bit RGB; 16-bit/32-bit/float grayscale is scaled, not clipped."""
    if img.mode in ("I", "F") or img.mode.startswith("I;"):
        return _rgb_image(_to_uint8(np.asarray(img), window))
    if img.mode == "L":
        return _rgb_image(_to_uint8(np.asarray(img), window)) if window is not None else img.convert("RGB")
    rgb = img.convert("RGB")
    return _rgb_image(_window_uint8(np.asarray(rgb), *window)) if window is not None else rgb


# ------------------------------------------------------------------------------------------------------------- DICOM
def _import_optional(module: str, label: str, what: str) -> Any:
    try:
        return __import__(module)
    except ImportError as err:
        raise ImportError(
            f"{label}: reading {what} needs the '{module}' package: pip install 'prefixvqa[dicom]'"
        ) from err


def _pydicom_tools() -> dict[str, Any]:
    """pydicom >= 3 (`pydicom.pixels`) with a fallback to 2.x's `pixel_data_handlers.util`."""
    try:
        from pydicom import pixels

        return {
            "v3": True,
            "pixel_array": pixels.pixel_array,
            "modality": pixels.apply_modality_lut,
            "voi": pixels.apply_voi,
            "color_lut": pixels.apply_color_lut,
            "color_space": pixels.convert_color_space,
        }
    except ImportError:  # pragma: no cover - pydicom 2.x
        from pydicom.pixel_data_handlers import util

        return {
            "v3": False,
            "pixel_array": None,
            "modality": util.apply_modality_lut,
            "voi": util.apply_voi,
            "color_lut": util.apply_color_lut,
            "color_space": util.convert_color_space,
        }


def _first(value: Any) -> float:
    """Window Center/Width may be multi-valued: the first value is the default view."""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = value[0]
    return float(value)


def _voi_lut_range(ds: Any, voi: Any) -> tuple[float, float]:
    """Output range of the first VOI LUT, found by passing its whole input domain through pydicom."""
    n_entries, first_mapped = int(ds.VOILUTSequence[0].LUTDescriptor[0]), int(ds.VOILUTSequence[0].LUTDescriptor[1])
    n_entries = n_entries or 65536
    outputs = voi(np.arange(first_mapped, first_mapped + n_entries, dtype=np.int64), ds, index=0)
    return float(outputs.min()), float(outputs.max())


def _dicom_monochrome(arr: np.ndarray, ds: Any, tools: dict, window: tuple[float, float] | None) -> np.ndarray:
    values = tools["modality"](arr, ds)  # Modality LUT Sequence, or Rescale Slope/Intercept
    if window is not None:
        out = _window_uint8(values, float(window[0]), float(window[1]))
    elif "VOILUTSequence" in ds and len(ds.VOILUTSequence):
        lo, hi = _voi_lut_range(ds, tools["voi"])
        mapped = _to_unit(tools["voi"](values, ds, index=0))
        out = _quantize((mapped - lo) / (hi - lo)) if hi > lo else np.zeros(mapped.shape, np.uint8)
    elif ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        out = _window_uint8(
            values, _first(ds.WindowCenter), _first(ds.WindowWidth), str(ds.get("VOILUTFunction") or "LINEAR")
        )
    elif values.dtype.kind in "ui" and values.min() >= 0 and int(ds.get("BitsStored") or 16) <= 8:
        out = _scale_nominal(values, int(ds.BitsStored))  # 1..8-bit data (masks, 8-bit US) keep their scale
    else:
        out = _minmax_uint8(values)
    if str(ds.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1":
        out = 255 - out  # MONOCHROME1: minimum value is displayed white
    return out


def _palette_to_native_order(ds: Any) -> None:
    """pydicom reads 16-bit OW palette LUT data in native byte order; byte-swap it for big-endian files."""
    little = ds.original_encoding[1] if hasattr(ds, "original_encoding") else ds.is_little_endian
    if little is None or little == (sys.byteorder == "little"):
        return
    for colour in ("Red", "Green", "Blue", "Alpha"):
        keyword = f"{colour}PaletteColorLookupTableData"
        data = ds.get(keyword)
        if isinstance(data, bytes) and int(ds[f"{colour}PaletteColorLookupTableDescriptor"].value[2]) > 8:
            setattr(ds, keyword, np.frombuffer(data, dtype=np.uint16).byteswap().tobytes())


def _ensure_transfer_syntax(ds: Any) -> None:
    """Files without a meta header (read with force=True) get the transfer syntax pydicom actually used."""
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    if "TransferSyntaxUID" in getattr(ds, "file_meta", {}):
        return
    from pydicom.dataset import FileMetaDataset

    implicit, little = ds.original_encoding if hasattr(ds, "original_encoding") else (ds.is_implicit_VR, True)
    if not hasattr(ds, "file_meta") or ds.file_meta is None:
        ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = (
        ImplicitVRLittleEndian if implicit else (ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    )


def _load_dicom(fp: IO[bytes], label: str, frame: int | None, window: tuple[float, float] | None) -> Image.Image:
    pydicom = _import_optional("pydicom", label, "DICOM")
    tools = _pydicom_tools()
    try:
        ds = pydicom.dcmread(fp, force=True)
    except Exception as err:
        raise ImageLoadError(f"{label}: unreadable DICOM file: {type(err).__name__}: {err}") from err
    if not any(tag in ds for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise ImageLoadError(
            f"{label}: DICOM file has no pixel data (Modality {ds.get('Modality', '?')}: a non-image object such as "
            "SR/RTPLAN, or a damaged file)"
        )
    try:
        _ensure_transfer_syntax(ds)
        n_frames = int(ds.get("NumberOfFrames") or 1)
    except Exception as err:
        raise ImageLoadError(f"{label}: malformed DICOM header: {type(err).__name__}: {err}") from err
    index = n_frames // 2 if frame is None else frame
    if not -n_frames <= index < n_frames:
        raise ImageLoadError(f"{label}: frame {frame} out of range (DICOM has {n_frames} frame(s))")
    index %= n_frames
    try:
        rows, cols = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
    except (TypeError, ValueError) as err:
        raise ImageLoadError(f"{label}: malformed DICOM header (Rows/Columns): {err}") from err
    _check_pixels(label, "DICOM", (rows, cols))
    syntax = ds.file_meta.TransferSyntaxUID
    try:
        if tools["v3"]:  # decodes only the chosen frame; YBR_FULL(_422) -> RGB
            arr = tools["pixel_array"](ds, index=index if n_frames > 1 else None)
        else:  # pragma: no cover - pydicom 2.x
            arr = ds.pixel_array
            arr = arr[index] if n_frames > 1 else arr
    except Exception as err:
        raise ImageLoadError(
            f"{label}: cannot decode DICOM pixel data with transfer syntax {syntax.name} ({syntax}): {err} "
            "(install a decoder plugin such as pylibjpeg with pylibjpeg-libjpeg/-openjpeg, or gdcm, or decompress "
            "the file first, e.g. `gdcmconv --raw`)"
        ) from err
    try:
        photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip()
        if int(ds.get("SamplesPerPixel", 1)) == 1 and photometric == "PALETTE COLOR":
            _palette_to_native_order(ds)
            rgb = tools["color_lut"](arr, ds)
            return _rgb_image(_scale_nominal(rgb, 8 * rgb.dtype.itemsize))
        if arr.ndim == 3 and arr.shape[-1] == 3:
            if not tools["v3"] and photometric.startswith("YBR_FULL"):  # pragma: no cover - pydicom 2.x
                arr = tools["color_space"](arr, photometric, "RGB")
            bits = int(ds.get("BitsStored") or 8 * arr.dtype.itemsize)
            rgb = _window_uint8(arr, *window) if window is not None else _scale_nominal(arr, bits)
            return _rgb_image(rgb)
        return _rgb_image(_dicom_monochrome(arr, ds, tools, window))
    except ImageLoadError:
        raise
    except Exception as err:
        raise ImageLoadError(f"{label}: cannot convert DICOM pixels to RGB: {type(err).__name__}: {err}") from err


# ------------------------------------------------------------------------------------------------------------- NIfTI
def _nifti_slice(data_obj: Any, label: str, frame: int | None, index: int | None) -> np.ndarray:
    """2D: itself; 3D: slice along the last axis; 4D: volume `frame` (default 0), then slice along axis 2.

    Only the slice is read from the (lazy) array proxy; trailing singleton axes are ignored.
    """
    full = tuple(data_obj.shape)
    shape = full
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) < 2 or len(shape) > 4:
        raise ImageLoadError(f"{label}: unsupported NIfTI shape {full} (expected 2D, 3D or 4D)")
    picks: list[int] = []
    if len(shape) >= 3:
        depth = shape[2]
        z = depth // 2 if index is None else index
        if not -depth <= z < depth:
            raise ImageLoadError(f"{label}: slice_index {index} out of range (volume has {depth} slices)")
        picks.append(z % depth)
    if len(shape) == 4:
        t = 0 if frame is None else frame
        if not -shape[3] <= t < shape[3]:
            raise ImageLoadError(f"{label}: frame {frame} out of range (4D NIfTI has {shape[3]} volumes)")
        picks.append(t % shape[3])
    key = (slice(None), slice(None), *picks, *(0,) * (len(full) - 2 - len(picks)))
    return np.asarray(data_obj[key])


def _load_nifti(
    ref: ImageRef,
    data: bytes | None,
    gzipped: bool,
    label: str,
    frame: int | None,
    slice_index: int | None,
    window: tuple[float, float] | None,
) -> Image.Image:
    nibabel = _import_optional("nibabel", label, "NIfTI")
    streamed = data is None and _has_suffix(str(ref), (".nii.gz", ".hdr.gz") if gzipped else (".nii", ".hdr"))
    shape = _nifti_header_shape(nibabel, ref, data, gzipped, label)
    _check_pixels(label, "NIfTI", shape[:2], "slice")
    if not streamed:  # parsed in memory: the whole volume is decompressed, so it obeys the limit too
        _check_pixels(label, "NIfTI", shape, "volume")
    try:
        if streamed:
            img = nibabel.load(os.fspath(ref))  # memory-mapped / streamed: only the slice is read
        else:  # bytes, or a name nibabel would misjudge: parse in memory
            raw = data if data is not None else Path(ref).read_bytes()
            raw = gzip.decompress(raw) if gzipped else raw
            cls = nibabel.Nifti2Image if raw[4:8] == b"n+2\x00" else nibabel.Nifti1Image
            img = cls.from_bytes(raw)
        slab = _nifti_slice(img.dataobj, label, frame, slice_index)
    except ImageLoadError:
        raise
    except Exception as err:
        raise ImageLoadError(f"{label}: corrupt or truncated NIfTI file: {type(err).__name__}: {err}") from err
    # voxel (i, j) -> display rows/cols: rotate so axis 1 runs bottom-to-top (the usual quick radiological view)
    return _rgb_image(_to_uint8(np.rot90(np.asarray(slab)), window))


def _nifti_header_shape(nibabel: Any, ref: Any, data: bytes | None, gzipped: bool, label: str) -> tuple[int, ...]:
    """The data shape from the (at most 540-byte) header alone: nothing of the volume is decompressed."""
    try:
        if data is not None:
            fh: IO[bytes] = gzip.GzipFile(fileobj=io.BytesIO(data)) if gzipped else io.BytesIO(data)
        else:
            fh = gzip.open(ref, "rb") if gzipped else open(ref, "rb")
        with fh:
            head = fh.read(540)
        cls = nibabel.Nifti2Header if head[4:8] == b"n+2\x00" or head[:4] in (b"\x1c\x02\x00\x00",
                                                                               b"\x00\x00\x02\x1c") \
            else nibabel.Nifti1Header
        return tuple(int(d) for d in cls.from_fileobj(io.BytesIO(head), check=False).get_data_shape())
    except Exception as err:
        raise ImageLoadError(f"{label}: corrupt or truncated NIfTI header: {type(err).__name__}: {err}") from err


# --------------------------------------------------------------------------------------------------------- public API
def load_image(
    ref: ImageRef | Path | Image.Image | dict,
    frame: int | None = None,
    slice_index: int | None = None,
    window: tuple[float, float] | None = None,
    *,
    name: str | None = None,
) -> Image.Image:
    """Load `ref` (path, encoded bytes, {bytes, path} cell or PIL image) as an 8-bit "RGB" PIL image.

    frame: DICOM frame (default: middle frame), page of a multi-page TIFF/GIF (default: first) or 4D NIfTI volume
    (default: first). slice_index: NIfTI slice along the last spatial axis (default: middle). window: (centre, width)
    in the image's own units (e.g. Hounsfield units after rescale: (40, 400) for soft tissue); overrides any header
    window. name: label used in error messages for bytes input.
    """
    if isinstance(ref, Image.Image):
        return _pil_to_rgb(ref, window)
    if isinstance(ref, dict):
        name = name or ref.get("path")
        ref = ref.get("bytes") or ref.get("path")
        if ref is None:
            raise ImageLoadError(f"{name or '<image cell>'}: image cell has neither bytes nor path")
    label = _describe(ref, name)
    data: bytes | None = None
    if isinstance(ref, (bytes, bytearray, memoryview)):
        data = bytes(ref)
        head = data[:1024]
    else:
        path = Path(ref)
        if not path.is_file():
            raise ImageLoadError(f"{label}: image file not found")
        with path.open("rb") as fh:
            head = fh.read(1024)
    kind = detect_image_kind(head, label)
    if kind == "nifti-gz":
        kind = _check_gzip_nifti(ref, data, label)
    if kind == "nifti":
        return _load_nifti(ref, data, head[:2] == b"\x1f\x8b", label, frame, slice_index, window)
    if not head:
        raise ImageLoadError(f"{label}: empty image file")
    fp: IO[bytes] = io.BytesIO(data) if data is not None else Path(ref).open("rb")
    try:
        if kind == "dicom":
            return _load_dicom(fp, label, frame, window)
        # known raster magic, or unknown: PIL identifies the many further formats it knows
        return _load_pil(fp, label, _pil_format(head), frame, window)
    finally:
        fp.close()


def _check_gzip_nifti(ref: Any, data: bytes | None, label: str) -> str:
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(data)) if data is not None else gzip.open(ref, "rb") as fh:
            inner = fh.read(544)
    except (OSError, EOFError, zlib.error) as err:
        raise ImageLoadError(f"{label}: corrupt or truncated gzip file: {err}") from err
    if not _nifti_magic(inner):
        raise ImageLoadError(f"{label}: gzip file does not contain a NIfTI image (unsupported)")
    return "nifti"


def image_bytes_hash(ref: ImageRef | Path) -> str:
    """sha256 hex digest of the encoded file bytes: the content key of the feature cache."""
    digest = hashlib.sha256()
    if isinstance(ref, (bytes, bytearray, memoryview)):
        digest.update(ref)
        return digest.hexdigest()
    try:
        with open(ref, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    except OSError as err:
        raise ImageLoadError(f"{ref}: cannot read image file: {err}") from err
    return digest.hexdigest()
