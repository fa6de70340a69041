"""Loading CT/MR series (classic and enhanced, any transfer syntax) and refusing bad ones."""

from __future__ import annotations

import random
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.pixels import apply_modality_lut
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    generate_uid,
)

from dicom_node.derive.series import SeriesError, SourceSeries, load_series
from tests.dicom_factory import (
    make_ct_series,
    make_enhanced_ct_in_hu,
    make_mr_series,
    source_path,
)

warnings.filterwarnings("ignore", category=UserWarning, module="pydicom")


def _normal(ds: pydicom.Dataset) -> np.ndarray:
    iop = np.array([float(v) for v in ds.ImageOrientationPatient])
    return np.cross(iop[:3], iop[3:])


def test_ct_series_sorted_by_position_in_modality_units(tmp_path: Path) -> None:
    paths = make_ct_series(tmp_path, n_slices=6, rows=32, spacing=2.5, thickness=3.0)
    shuffled = list(paths)
    random.Random(3).shuffle(shuffled)
    series = load_series(shuffled)
    assert isinstance(series, SourceSeries)
    assert series.volume.dtype == np.float32 and series.volume.shape == (6, 32, 32)
    assert series.modality == "CT" and not series.is_enhanced
    files = [pydicom.dcmread(p) for p in paths]
    for k, ds in enumerate(files):  # factory writes them in ascending position order
        assert series.source_refs[k].sop_instance_uid == ds.SOPInstanceUID
        assert series.source_refs[k].frame_number is None
        expected = apply_modality_lut(ds.pixel_array, ds).astype(np.float32)
        np.testing.assert_array_equal(series.volume[k], expected)
        np.testing.assert_allclose(series.positions[k], [float(v) for v in ds.ImagePositionPatient])
        assert series.datasets[k].SOPInstanceUID == ds.SOPInstanceUID
    assert series.volume.min() < -500  # HU, not stored values
    dz, dy, dx = series.spacing
    assert dz == pytest.approx(2.5) and series.slice_thickness == pytest.approx(3.0)
    assert dy == pytest.approx(float(files[0].PixelSpacing[0]))
    assert dx == pytest.approx(float(files[0].PixelSpacing[1]))
    assert np.all(np.diff(series.positions @ _normal(files[0])) > 0)
    assert series.slice_offsets == pytest.approx([2.5 * k for k in range(6)])
    assert series.study_instance_uid == files[0].StudyInstanceUID
    assert series.series_instance_uid == files[0].SeriesInstanceUID
    assert series.frame_of_reference_uid == files[0].FrameOfReferenceUID
    assert series.orientation == pytest.approx([1, 0, 0, 0, 1, 0])
    assert series.rescale_intercepts == [-1024.0] * 6 and series.has_rescale
    assert not series.lossy


@pytest.mark.parametrize(
    "transfer_syntax", [ImplicitVRLittleEndian, RLELossless, JPEG2000Lossless]
)
def test_any_lossless_transfer_syntax_decodes_identically(
    tmp_path: Path, transfer_syntax: str
) -> None:
    ref = load_series(make_mr_series(tmp_path / "ref", n_slices=3, rows=32))
    other = load_series(
        make_mr_series(tmp_path / "ts", n_slices=3, rows=32, transfer_syntax=transfer_syntax)
    )
    assert pydicom.dcmread(other.datasets[0].filename).file_meta.TransferSyntaxUID == (
        transfer_syntax
    )
    np.testing.assert_array_equal(ref.volume, other.volume)
    assert other.spacing == pytest.approx(ref.spacing)
    assert other.modality == "MR" and not other.has_rescale


@pytest.mark.parametrize("make", [make_ct_series, make_mr_series])
def test_legacy_converted_enhanced_matches_classic(tmp_path: Path, make: object) -> None:
    classic = load_series(make(tmp_path / "c", n_slices=4, rows=32))  # type: ignore[operator]
    paths = make(tmp_path / "e", n_slices=4, rows=32, enhanced=True)  # type: ignore[operator]
    assert len(paths) == 1
    enhanced = load_series(paths)
    assert enhanced.is_enhanced
    np.testing.assert_array_equal(enhanced.volume, classic.volume)
    assert enhanced.spacing == pytest.approx(classic.spacing)
    np.testing.assert_allclose(enhanced.positions, classic.positions, atol=1e-4)
    assert len(enhanced.datasets) == 4 and all(d is enhanced.datasets[0] for d in enhanced.datasets)
    uids = {r.sop_instance_uid for r in enhanced.source_refs}
    assert uids == {enhanced.datasets[0].SOPInstanceUID}
    frames = [r.frame_number for r in enhanced.source_refs]
    assert sorted(frames) == [1, 2, 3, 4]  # type: ignore[type-var]


def test_enhanced_ct_supplemental_frames_sorted_and_rescaled(tmp_path: Path) -> None:
    path = make_enhanced_ct_in_hu(tmp_path)
    series = load_series([path])
    ds = pydicom.dcmread(path)
    assert series.is_enhanced and series.modality == "CT" and series.volume.shape == (2, 512, 512)
    # normal of (-1,0,0),(0,1,0) is (0,0,-1): the frame at z=-149 comes first
    assert series.positions[:, 2].tolist() == [-149.0, -159.0]
    assert [r.frame_number for r in series.source_refs] == [2, 1]
    assert series.spacing == pytest.approx((10.0, 0.388672, 0.388672))
    assert series.slice_thickness == pytest.approx(10.0)
    np.testing.assert_array_equal(series.volume[1], ds.pixel_array[0].astype(np.float32) - 1024)
    assert series.window_centers[0] == (49.0,) and series.window_widths[0] == (102.0,)


def test_single_slice_uses_slice_thickness(tmp_path: Path) -> None:
    series = load_series(make_ct_series(tmp_path, n_slices=1, rows=16, thickness=2.0))
    assert series.volume.shape == (1, 16, 16)
    assert series.spacing[0] == pytest.approx(2.0) and series.slice_thickness == pytest.approx(2.0)


def test_lossy_source_is_flagged(tmp_path: Path) -> None:
    paths = make_ct_series(tmp_path, n_slices=2, rows=16)
    ds = pydicom.dcmread(paths[1])
    ds.LossyImageCompression = "01"
    ds.save_as(paths[1])
    assert load_series(paths).lossy


# --- refusals -----------------------------------------------------------------------------------


def _edit(path: Path, **changes: object) -> None:
    ds = pydicom.dcmread(path)
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.save_as(path)


def _refused(paths: list[Path], match: str) -> None:
    with pytest.raises(SeriesError, match=match):
        load_series(paths)


def test_refuses_empty_and_non_dicom(tmp_path: Path) -> None:
    _refused([], "no instances")
    bad = tmp_path / "x.dcm"
    bad.write_bytes(b"not dicom at all" * 20)
    _refused([bad], "not a readable DICOM")


def test_refuses_mixed_series(tmp_path: Path) -> None:
    a = make_ct_series(tmp_path / "a", n_slices=2, rows=16)
    b = make_ct_series(tmp_path / "b", n_slices=2, rows=16)
    _refused(a + b, "mixed series")


def test_refuses_inconsistent_orientation(tmp_path: Path) -> None:
    paths = make_ct_series(tmp_path, n_slices=3, rows=16)
    _edit(paths[1], ImageOrientationPatient=[1, 0, 0, 0, 0.9950042, 0.0998334])
    _refused(paths, "inconsistent orientation")


def test_refuses_inconsistent_pixel_spacing(tmp_path: Path) -> None:
    paths = make_ct_series(tmp_path, n_slices=3, rows=16)
    _edit(paths[2], PixelSpacing=[1.0, 1.0])
    _refused(paths, "inconsistent pixel spacing")


def test_refuses_non_uniform_spacing(tmp_path: Path) -> None:
    paths = make_ct_series(tmp_path, n_slices=5, rows=16)
    _refused([paths[0], paths[1], paths[3], paths[4]], "non-uniform slice spacing")


def test_refuses_inconsistent_matrix(tmp_path: Path) -> None:
    a = make_ct_series(tmp_path / "a", n_slices=2, rows=16)
    b = make_ct_series(tmp_path / "b", n_slices=3, rows=32)
    ds = pydicom.dcmread(a[0])
    _edit(
        b[2],
        SeriesInstanceUID=ds.SeriesInstanceUID,
        StudyInstanceUID=ds.StudyInstanceUID,
        FrameOfReferenceUID=ds.FrameOfReferenceUID,
    )
    _refused([*a, b[2]], "inconsistent matrix")


def test_refuses_duplicate_positions(tmp_path: Path) -> None:
    paths = make_ct_series(tmp_path, n_slices=3, rows=16)
    ds = pydicom.dcmread(paths[1])
    ds.SOPInstanceUID = generate_uid()
    dup = tmp_path / "dup.dcm"
    ds.save_as(dup)
    _refused([*paths, dup], "duplicate positions")


def test_refuses_missing_geometry(tmp_path: Path) -> None:
    paths = make_mr_series(tmp_path, n_slices=2, rows=16)
    _edit(paths[0], ImagePositionPatient=None)
    _refused(paths, "missing geometry")
    _refused([source_path("emri_small.dcm")], "missing geometry")


def test_refuses_positions_off_the_normal(tmp_path: Path) -> None:
    paths = make_ct_series(tmp_path, n_slices=3, rows=16)
    for k, p in enumerate(paths):
        ds = pydicom.dcmread(p)
        ipp = [float(v) for v in ds.ImagePositionPatient]
        _edit(p, ImagePositionPatient=[ipp[0], ipp[1] + 2.0 * k, ipp[2]])
    _refused(paths, "not along the slice normal")


def test_refuses_no_pixel_data(tmp_path: Path) -> None:
    paths = make_ct_series(tmp_path, n_slices=2, rows=16)
    _edit(paths[1], PixelData=None)
    _refused(paths, "no pixel data")


def test_refuses_colour(tmp_path: Path) -> None:
    paths = make_ct_series(tmp_path, n_slices=1, rows=16)
    ds = pydicom.dcmread(paths[0])
    rgb = np.zeros((16, 16, 3), dtype=np.uint8)
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = rgb.tobytes()
    ds.save_as(paths[0])
    _refused(paths, "colour image")


def test_refuses_other_sop_classes() -> None:
    _refused([source_path("SC_rgb.dcm")], "not a CT/MR image storage class")


def test_accepts_explicit_little_endian_default(tmp_path: Path) -> None:
    paths = make_ct_series(tmp_path, n_slices=2, rows=16)
    assert pydicom.dcmread(paths[0]).file_meta.TransferSyntaxUID == ExplicitVRLittleEndian


def test_modality_lut_sequence_is_applied(tmp_path: Path) -> None:
    paths = make_mr_series(tmp_path, n_slices=2, rows=16)
    stored = []
    for p in paths:
        ds = pydicom.dcmread(p)
        stored.append(ds.pixel_array.astype(np.float32))
        lut = pydicom.Dataset()
        lut.LUTDescriptor = [4096, 0, 16]
        lut.ModalityLUTType = "US"
        lut.add_new(0x00283006, "OW", (2 * np.arange(4096, dtype="<u2")).tobytes())
        ds.ModalityLUTSequence = [lut]
        ds.save_as(p)
    series = load_series(paths)
    expected = 2 * np.clip(np.stack(stored), 0, 4095)
    np.testing.assert_array_equal(series.volume, expected)
