"""Image loading: 16-bit and grayscale PIL formats, real DICOM files from pydicom-data, NIfTI, corrupt files."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
from pathlib import Path


import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from prefixvqa.data import DataError, ImageLoadError, image_bytes_hash, load_image  # noqa: E402

pydicom = pytest.importorskip("pydicom")
nibabel = pytest.importorskip("nibabel")


def _data_store() -> Path | None:
    spec = importlib.util.find_spec("data_store")  # the `pydicom-data` distribution installs package data_store
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(spec.submodule_search_locations[0]) / "data"
    return folder if folder.is_dir() else None


DICOM_DATA = _data_store()
needs_dicom_data = pytest.mark.skipif(DICOM_DATA is None, reason="pydicom-data (data_store) is not installed")


def real(name: str) -> Path:
    return DICOM_DATA / name


def rgb_array(ref, **kw) -> np.ndarray:
    img = load_image(ref, **kw)
    assert img.mode == "RGB"
    return np.asarray(img)


def expected_minmax(values: np.ndarray) -> np.ndarray:
    values = values.astype(np.float64)
    return np.rint((values - values.min()) / (values.max() - values.min()) * 255).astype(np.uint8)


def expected_window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    unit = np.clip((values.astype(np.float64) - (center - 0.5)) / (width - 1) + 0.5, 0, 1)
    return np.rint(unit * 255).astype(np.uint8)


def assert_gray(arr: np.ndarray) -> np.ndarray:
    assert arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[-1] == 3
    assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()
    return arr[..., 0]


def close(a: np.ndarray, b: np.ndarray, tol: int = 1) -> bool:
    return int(np.abs(a.astype(int) - b.astype(int)).max()) <= tol


RAMP16 = (np.arange(64 * 48, dtype=np.uint16).reshape(48, 64) * 7 + 1000).astype(np.uint16)  # 1000 .. 22497


# ---------------------------------------------------------------------------------------------------- PIL formats
@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16bit_grayscale_scaled_by_min_max(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"ramp{suffix}"
    Image.fromarray(RAMP16).save(path)
    assert Image.open(path).mode.startswith("I")
    gray = assert_gray(rgb_array(path))
    assert close(gray, expected_minmax(RAMP16)) and gray.min() == 0 and gray.max() == 255
    windowed = assert_gray(rgb_array(path, window=(5000, 2000)))
    assert close(windowed, expected_window(RAMP16, 5000, 2000))


def test_float_tiff_with_nan_and_multipage_frame(tmp_path: Path) -> None:
    values = np.linspace(-1.0, 3.0, 32 * 32, dtype=np.float32).reshape(32, 32)
    values[0, 0] = np.nan
    pages = [Image.fromarray(values), Image.fromarray(np.full((32, 32), 7, np.uint8))]
    path = tmp_path / "stack.tif"
    pages[0].save(path, save_all=True, append_images=pages[1:])
    gray = assert_gray(rgb_array(path))  # first page by default
    assert gray.max() == 255 and gray[0, 0] == 0
    assert (assert_gray(rgb_array(path, frame=1)) == 7).all()  # 8-bit page passes through unchanged
    with pytest.raises(ImageLoadError, match="frame 5 out of range"):
        load_image(path, frame=5)


def test_grayscale_jpeg_and_colour_modes(tmp_path: Path) -> None:
    ramp8 = (np.arange(32 * 32).reshape(32, 32) % 200 + 20).astype(np.uint8)
    jpeg = tmp_path / "gray.jpg"
    Image.fromarray(ramp8).save(jpeg, quality=95)
    assert Image.open(jpeg).mode == "L"
    gray = assert_gray(rgb_array(jpeg))
    assert close(gray, np.asarray(Image.open(jpeg)), 0)  # 8-bit is display-ready: no re-scaling
    rgba = tmp_path / "rgba.png"
    Image.new("RGBA", (5, 4), (10, 20, 30, 128)).save(rgba)
    assert rgb_array(rgba)[0, 0].tolist() == [10, 20, 30]
    assert rgb_array(Image.new("P", (3, 3))).shape == (3, 3, 3)  # PIL images are accepted too


def test_bytes_and_hf_cell_inputs_and_hash(tmp_path: Path) -> None:
    buf = io.BytesIO()
    Image.fromarray(RAMP16).save(buf, format="PNG")
    data = buf.getvalue()
    path = tmp_path / "a.png"
    path.write_bytes(data)
    assert (rgb_array(data) == rgb_array(path)).all()
    assert (rgb_array({"bytes": data, "path": "a.png"}) == rgb_array(path)).all()
    assert image_bytes_hash(path) == image_bytes_hash(data) == hashlib.sha256(data).hexdigest()


def test_detection_by_magic_bytes_not_name(tmp_path: Path) -> None:
    png_named_dcm = tmp_path / "really_a_png.dcm"
    Image.fromarray(RAMP16).save(png_named_dcm, format="PNG")
    assert close(assert_gray(rgb_array(png_named_dcm)), expected_minmax(RAMP16))


# ---------------------------------------------------------------------------------------------------------- DICOM
REAL_DICOM = [  # (file, modality, photometric interpretation)
    ("693_UNCR.dcm", "CT", "MONOCHROME2"),
    ("MR2_UNCR.dcm", "MR", "MONOCHROME2"),
    ("RG3_UNCR.dcm", "CR", "MONOCHROME1"),
    ("US1_UNCR.dcm", "US", "RGB"),
    ("OBXXXX1A.dcm", "US", "PALETTE COLOR"),
    ("color3d_jpeg_baseline.dcm", "US", "YBR_FULL_422"),
    ("JPEG2000_UNC.dcm", "NM", "MONOCHROME2"),
    ("emri_small.dcm", "MR", "MONOCHROME2"),
]


@needs_dicom_data
@pytest.mark.parametrize(("name", "modality", "photometric"), REAL_DICOM, ids=[r[0] for r in REAL_DICOM])
def test_real_dicom_modalities_load_as_rgb(name: str, modality: str, photometric: str) -> None:
    header = pydicom.dcmread(real(name), stop_before_pixels=True)
    assert (header.Modality, header.PhotometricInterpretation) == (modality, photometric)
    arr = rgb_array(real(name))
    assert arr.shape == (header.Rows, header.Columns, 3)
    assert arr.std() > 5  # a real picture, not a blank
    if photometric.startswith("MONOCHROME"):
        assert_gray(arr)


@needs_dicom_data
def test_ct_rescale_and_header_window_then_user_window() -> None:
    ds = pydicom.dcmread(real("693_UNCR.dcm"))
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    center, width = float(ds.WindowCenter), float(ds.WindowWidth)
    assert close(assert_gray(rgb_array(real("693_UNCR.dcm"))), expected_window(hu, center, width))
    assert close(assert_gray(rgb_array(real("693_UNCR.dcm"), window=(400, 1800))), expected_window(hu, 400, 1800))


@needs_dicom_data
def test_monochrome1_is_inverted_on_a_real_cr_file() -> None:
    ds = pydicom.dcmread(real("RG3_UNCR.dcm"))
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    inverted = assert_gray(rgb_array(real("RG3_UNCR.dcm")))
    ds.PhotometricInterpretation = "MONOCHROME2"
    buf = io.BytesIO()
    ds.save_as(buf)
    plain = assert_gray(rgb_array(buf.getvalue(), name="RG3 as MONOCHROME2"))
    assert (inverted == 255 - plain).all()
    assert close(plain, expected_window(ds.pixel_array, float(ds.WindowCenter[0] if ds["WindowCenter"].VM > 1
                                                              else ds.WindowCenter), float(ds.WindowWidth)))


@needs_dicom_data
@pytest.mark.parametrize(
    ("plain", "encoded"),
    [("693_UNCR.dcm", "693_J2KR.dcm"), ("US1_UNCR.dcm", "US1_J2KR.dcm"), ("emri_small.dcm", "emri_small_RLE.dcm"),
     ("emri_small.dcm", "emri_small_big_endian.dcm"), ("OBXXXX1A.dcm", "OBXXXX1A_expb.dcm"),
     ("OBXXXX1A_2frame.dcm", "OBXXXX1A_rle_2frame.dcm"), ("gdcm-US-ALOKA-16.dcm", "gdcm-US-ALOKA-16_big.dcm")],
)
def test_lossless_encodings_give_identical_images(plain: str, encoded: str) -> None:
    assert (rgb_array(real(plain)) == rgb_array(real(encoded))).all()


@needs_dicom_data
def test_ybr_full_is_converted_to_rgb() -> None:
    ybr, rgb = rgb_array(real("SC_ybr_full_uncompressed.dcm")), rgb_array(real("SC_rgb.dcm"))  # same test pattern
    assert close(ybr, rgb, 8) and np.abs(ybr.astype(int) - rgb).mean() < 1  # YCbCr rounding only


@needs_dicom_data
def test_multiframe_default_middle_and_chosen_frame() -> None:
    frames = pydicom.dcmread(real("emri_small.dcm")).pixel_array  # 10 frames, MR, no window in the header
    assert frames.shape[0] == 10
    middle = assert_gray(rgb_array(real("emri_small.dcm")))
    assert close(middle, expected_minmax(frames[5]))
    assert close(assert_gray(rgb_array(real("emri_small.dcm"), frame=2)), expected_minmax(frames[2]))
    assert close(assert_gray(rgb_array(real("emri_small.dcm"), frame=-1)), expected_minmax(frames[9]))
    with pytest.raises(ImageLoadError, match=r"emri_small\.dcm: frame 10 out of range"):
        load_image(real("emri_small.dcm"), frame=10)
    video = real("color3d_jpeg_baseline.dcm")  # 120-frame YBR JPEG cine loop: only the chosen frame is decoded
    assert not (rgb_array(video, frame=0) == rgb_array(video)).all()


@needs_dicom_data
def test_modality_and_voi_lut_sequences() -> None:
    from pydicom.pixels import apply_modality_lut, apply_voi

    ds = pydicom.dcmread(real("vlut_04.dcm"))
    expected = np.rint(apply_voi(ds.pixel_array, ds).astype(float) / 65535 * 255).astype(np.uint8)
    assert close(assert_gray(rgb_array(real("vlut_04.dcm"))), expected)
    ds = pydicom.dcmread(real("mlut_18.dcm"))
    assert close(assert_gray(rgb_array(real("mlut_18.dcm"))), expected_minmax(apply_modality_lut(ds.pixel_array, ds)))


@needs_dicom_data
def test_one_bit_segmentation_keeps_its_nominal_scale() -> None:
    mask = pydicom.dcmread(real("liver.dcm")).pixel_array  # SEG, 1 bit, 3 frames
    assert set(np.unique(assert_gray(rgb_array(real("liver.dcm"), frame=0)))) <= {0, 255}
    assert (assert_gray(rgb_array(real("liver.dcm"), frame=0)) == mask[0] * 255).all()


@needs_dicom_data
def test_compressed_without_decoder_names_file_and_transfer_syntax() -> None:
    from pydicom.pixels.decoders import JPEGLosslessSV1Decoder

    if JPEGLosslessSV1Decoder.is_available:
        pytest.skip("a JPEG Lossless decoder plugin is installed here")
    message = r"JPEG-LL\.dcm: cannot decode .*JPEG Lossless.*1\.2\.840\.10008\.1\.2\.4\.70"
    with pytest.raises(ImageLoadError, match=message):
        load_image(real("JPEG-LL.dcm"))


def synthetic_dicom(pixels: np.ndarray, photometric: str = "MONOCHROME2", meta: bool = True) -> bytes:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.Modality, ds.SOPClassUID, ds.SOPInstanceUID = "DX", "1.2.840.10008.5.1.4.1.1.1.1", generate_uid()
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.astype("<u2").tobytes()
    buf = io.BytesIO()
    if meta:
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    else:
        pydicom.dcmwrite(buf, ds, implicit_vr=True, little_endian=True)
    return buf.getvalue()


def test_synthetic_monochrome1_and_preamble_less_dicom(tmp_path: Path) -> None:
    pixels = (np.arange(16 * 16).reshape(16, 16) * 16).astype(np.uint16)
    plain = assert_gray(rgb_array(synthetic_dicom(pixels)))
    assert close(plain, expected_minmax(pixels))
    assert (assert_gray(rgb_array(synthetic_dicom(pixels, "MONOCHROME1"))) == 255 - plain).all()
    bare = tmp_path / "no_preamble.dcm"  # no DICM magic: the .dcm suffix is the fallback
    bare.write_bytes(synthetic_dicom(pixels, meta=False))
    assert (assert_gray(rgb_array(bare)) == plain).all()


# ---------------------------------------------------------------------------------------------------------- NIfTI
VOLUME = (np.arange(12 * 10 * 6, dtype=np.int16).reshape(12, 10, 6) % 97) * np.arange(1, 7, dtype=np.int16) - 50


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_nifti_slices(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"vol{suffix}"
    nibabel.save(nibabel.Nifti1Image(VOLUME, np.eye(4)), path)
    middle = assert_gray(rgb_array(path))
    assert middle.shape == (10, 12)  # rows = axis 1, columns = axis 0 (rot90 view)
    assert close(middle, expected_minmax(np.rot90(VOLUME[:, :, 3])))
    assert close(assert_gray(rgb_array(path, slice_index=1)), expected_minmax(np.rot90(VOLUME[:, :, 1])))
    assert (assert_gray(rgb_array(path.read_bytes(), slice_index=1)) == rgb_array(path, slice_index=1)[..., 0]).all()
    with pytest.raises(ImageLoadError, match="slice_index 6 out of range"):
        load_image(path, slice_index=6)


def test_nifti_4d_frame_selects_volume(tmp_path: Path) -> None:
    series = np.stack([VOLUME, VOLUME[::-1]], axis=-1)
    path = tmp_path / "series.nii.gz"
    nibabel.save(nibabel.Nifti1Image(series, np.eye(4)), path)
    assert close(assert_gray(rgb_array(path, frame=1, slice_index=2)), expected_minmax(np.rot90(series[:, :, 2, 1])))


# ------------------------------------------------------------------------------------------- corrupt and truncated
def _png(path: Path) -> None:
    Image.fromarray(RAMP16).save(path)


def _jpeg(path: Path) -> None:
    Image.fromarray((RAMP16 >> 8).astype(np.uint8)).save(path, quality=90)


def _tiff(path: Path) -> None:
    Image.fromarray(RAMP16).save(path, compression="tiff_deflate")


def _dicom(path: Path) -> None:
    path.write_bytes(synthetic_dicom((np.arange(64 * 64).reshape(64, 64) % 4096).astype(np.uint16)))


def _nifti(path: Path) -> None:
    nibabel.save(nibabel.Nifti1Image(VOLUME, np.eye(4)), path)


@pytest.mark.filterwarnings("ignore::UserWarning")  # PIL and pydicom warn about the damage before failing
@pytest.mark.parametrize(
    ("suffix", "write"),
    [(".png", _png), (".jpg", _jpeg), (".tif", _tiff), (".dcm", _dicom), (".nii", _nifti), (".nii.gz", _nifti)],
    ids=["png", "jpeg", "tiff", "dicom", "nifti", "nifti-gz"],
)
@pytest.mark.parametrize("damage", ["truncated", "garbage_body"])
def test_corrupt_files_raise_image_load_error_naming_the_file(tmp_path: Path, suffix: str, write, damage: str) -> None:
    path = tmp_path / f"broken{suffix}"
    write(path)
    data = path.read_bytes()
    if damage == "truncated":
        damaged = data[: len(data) // 2]
    else:  # scramble everything but the magic bytes, so detection still picks the right reader
        start, stop = {".dcm": (128, 132), ".nii": (344, 348)}.get(suffix, (0, 8))
        noise = np.random.default_rng(0).integers(0, 256, len(data), dtype=np.uint8).tobytes()
        damaged = noise[:start] + data[start:stop] + noise[stop:]
    path.write_bytes(damaged)
    with pytest.raises(ImageLoadError) as err:
        load_image(path)
    assert str(path) in str(err.value)
    assert isinstance(err.value, DataError)


def test_missing_empty_and_unknown_files(tmp_path: Path) -> None:
    with pytest.raises(ImageLoadError, match=r"nope\.png: image file not found"):
        load_image(tmp_path / "nope.png")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageLoadError, match=r"empty\.png: empty image file"):
        load_image(tmp_path / "empty.png")
    (tmp_path / "notes.txt").write_text("not an image at all")
    with pytest.raises(ImageLoadError, match=r"notes\.txt: unsupported"):
        load_image(tmp_path / "notes.txt")
    with pytest.raises(ImageLoadError, match=r"cell\.png: corrupt or truncated PNG"):
        load_image(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, name="cell.png")
    gz = tmp_path / "other.gz"
    gz.write_bytes(gzip.compress(b"plain text, not NIfTI" * 40))
    with pytest.raises(ImageLoadError, match="does not contain a NIfTI"):
        load_image(gz)


def test_nifti_found_by_magic_bytes_and_singleton_axes(tmp_path: Path) -> None:
    path = tmp_path / "scan.nii.gz"
    nibabel.save(nibabel.Nifti1Image(VOLUME[..., None, None], np.eye(4)), path)  # (x, y, z, 1, 1)
    renamed = tmp_path / "scan.bin"  # gzip + NIfTI magic, no telling suffix
    renamed.write_bytes(path.read_bytes())
    expected = expected_minmax(np.rot90(VOLUME[:, :, 3]))
    for ref in (path, renamed, path.read_bytes()):
        assert close(assert_gray(rgb_array(ref)), expected)


@pytest.mark.parametrize(
    ("suffix", "write", "as_bytes"),
    [(".png", _png, False), (".tif", _tiff, False), (".dcm", _dicom, False), (".dcm", _dicom, True),
     (".nii", _nifti, False), (".nii.gz", _nifti, False), (".nii.gz", _nifti, True)],
    ids=["png", "tiff", "dicom", "dicom-bytes", "nifti", "nifti-gz", "nifti-gz-bytes"],
)
def test_every_image_kind_obeys_the_pixel_limit_before_decoding(tmp_path: Path, monkeypatch, suffix: str, write,
                                                                 as_bytes: bool) -> None:
    """One limit for every kind, PIL's decompression-bomb threshold (2 x MAX_IMAGE_PIXELS), read from the header:
    a 389 KB .nii.gz of 20000 x 20000 must not be decompressed (47 s and 4 GB in issue 9)."""
    path = tmp_path / f"big{suffix}"
    write(path)
    ref = path.read_bytes() if as_bytes else path
    load_image(ref, name=path.name)  # within the default limit
    from prefixvqa.data import images

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)  # limit 100 pixels: every fixture image has more
    decoded = []
    for stage in ("_nifti_slice", "_rgb_image"):  # decoded NIfTI/DICOM pixels pass through these
        monkeypatch.setattr(images, stage, lambda *a, **k: decoded.append(1))
    with pytest.raises(ImageLoadError, match=r"exceeds the limit of 100 |decompression bomb") as err:
        load_image(ref, name=path.name)
    assert path.name in str(err.value) and not decoded
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # no limit: trusted large images
    monkeypatch.undo()
    load_image(ref, name=path.name)
