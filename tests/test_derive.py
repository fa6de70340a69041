"""The derived-series builder: identity, labelling, geometry, pixels, and dciodvfy/dcentvfy.

The enhance results here come from plain interpolation (scipy.ndimage.zoom, linear blending
between slices): the builder does not care where the pixels came from.
"""

from __future__ import annotations

import shutil
import subprocess
import warnings
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    MRImageStorage,
    RLELossless,
)
from scipy.ndimage import zoom

from dicom_node import codes as c
from dicom_node.config import DerivedConfig
from dicom_node.derive.builder import CT_FLOOR_HU, DerivationOptions, build_derived_series
from dicom_node.derive.series import SourceSeries, load_series
from sr_engine.api import ConsistencyReport, EnhanceResult
from tests.dicom_factory import (
    make_ct_series,
    make_enhanced_ct_in_hu,
    make_mr_series,
)

warnings.filterwarnings("ignore", category=UserWarning, module="pydicom")

NOW = datetime(2026, 11, 25, 12, 30, 15, 123456, tzinfo=UTC)
CONSISTENCY = ConsistencyReport(mean_abs_error=1.25, max_abs_error=7.5, psnr=47.3)
needs_dicom3tools = pytest.mark.skipif(
    shutil.which("dciodvfy") is None or shutil.which("dcentvfy") is None,
    reason="dicom3tools not installed",
)


def slice_result(source: SourceSeries, scale: int = 2) -> EnhanceResult:
    """In-plane x``scale`` by linear interpolation."""
    vol = zoom(source.volume, (1, scale, scale), order=1).astype(np.float32)
    dz, dy, dx = source.spacing
    return EnhanceResult(
        volume=vol,
        spacing=(dz, dy / scale, dx / scale),
        slice_thickness=source.slice_thickness,
        slice_offsets=source.slice_offsets,
        contributing_slices=[[k] for k in range(source.num_slices)],
        consistency=CONSISTENCY,
        model_name="linear",
        model_version="test-1",
        device="cpu",
    )


def volume_result(source: SourceSeries, scale: int) -> EnhanceResult:
    """Through-plane x``scale``: linear blending between neighbouring slices."""
    n = source.num_slices
    dz, dy, dx = source.spacing
    slices, offsets, contributing = [], [], []
    for k in range((n - 1) * scale + 1):
        i0, rem = divmod(k, scale)
        w = rem / scale
        i1 = min(i0 + 1, n - 1)
        slices.append((1 - w) * source.volume[i0] + w * source.volume[i1])
        offsets.append(k * dz / scale)
        contributing.append([i0] if rem == 0 else [i0, i1])
    return EnhanceResult(
        volume=np.stack(slices).astype(np.float32),
        spacing=(dz / scale, dy, dx),
        slice_thickness=dz / scale,
        slice_offsets=offsets,
        contributing_slices=contributing,
        consistency=CONSISTENCY,
        model_name="linear",
        model_version="test-1",
        device="cpu",
    )


def write(datasets: list[Dataset], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, ds in enumerate(datasets):
        path = folder / f"IM{i + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def by_position(datasets: list[Dataset], normal: np.ndarray) -> list[Dataset]:
    """The derived instances in slice order (along the normal), whatever their numbering."""
    return sorted(
        datasets, key=lambda d: float(np.array(d.ImagePositionPatient, dtype=float) @ normal)
    )


def options(**kw: object) -> DerivationOptions:
    kw.setdefault("now", NOW)
    return DerivationOptions(**kw)  # type: ignore[arg-type]


def _code(item: Dataset) -> tuple[str, str]:
    return (item.CodeValue, item.CodingSchemeDesignator)


def _ds_values(ds: Dataset) -> list[str]:
    values: list[str] = []

    def visit(dataset: Dataset, elem: pydicom.DataElement) -> None:
        if elem.VR == "DS" and elem.value not in (None, ""):
            vals = elem.value if elem.VM > 1 else [elem.value]
            values.extend(str(v) if not hasattr(v, "original_string") or v.original_string is None
                          else v.original_string for v in vals)

    ds.walk(visit)
    return values


# --- identity, labelling, references -------------------------------------------------------------


def test_ct_slice_mode_identity_and_labelling(tmp_path: Path) -> None:
    src_paths = make_ct_series(tmp_path / "src", n_slices=4, rows=32)
    source = load_series(src_paths)
    result = slice_result(source)
    opts = options(series_description_prefix="SR x{scale} {mode} ")
    out = build_derived_series(source, result, opts)
    src = [pydicom.dcmread(p) for p in src_paths]
    assert len(out) == 4
    series_uids = {ds.SeriesInstanceUID for ds in out}
    assert len(series_uids) == 1 and src[0].SeriesInstanceUID not in series_uids
    sop_uids = {ds.SOPInstanceUID for ds in out}
    assert len(sop_uids) == 4 and not sop_uids & {s.SOPInstanceUID for s in src}
    assert all(u.startswith("2.25.") for u in sop_uids | series_uids)
    for k, ds in enumerate(out):
        assert ds.SOPClassUID == CTImageStorage == ds.file_meta.MediaStorageSOPClassUID
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.StudyInstanceUID == src[0].StudyInstanceUID
        assert ds.FrameOfReferenceUID == src[0].FrameOfReferenceUID
        assert ds.PatientName == src[0].PatientName and ds.PatientID == src[0].PatientID
        assert ds.StudyDate == src[0].StudyDate and ds.AccessionNumber == src[0].AccessionNumber
        assert ds.SeriesNumber == int(src[0].SeriesNumber) + 1000
        assert ds.SeriesDescription == "SR x2 slice"  # source has no description
        assert ds.InstanceNumber == k + 1
        assert list(ds.ImageType) == ["DERIVED", "SECONDARY", "AXIAL", "SRNODE"]
        assert [_code(i) for i in ds.DerivationCodeSequence] == [("113085", "DCM")]
        text = ds.DerivationDescription
        assert len(text) <= 1024
        for part in ("linear", "test-1", "slice mode", "x2", "1.25", "7.50", "47.3"):
            assert part in text
        # source image: exactly the contributing slice, purpose 121322
        (item,) = ds.SourceImageSequence
        assert item.ReferencedSOPInstanceUID == src[k].SOPInstanceUID
        assert item.ReferencedSOPClassUID == CTImageStorage
        assert "ReferencedFrameNumber" not in item
        assert [_code(i) for i in item.PurposeOfReferenceCodeSequence] == [("121322", "DCM")]
        (rel,) = ds.RelatedSeriesSequence
        assert rel.SeriesInstanceUID == src[0].SeriesInstanceUID
        assert rel.StudyInstanceUID == src[0].StudyInstanceUID
        assert [_code(i) for i in rel.PurposeOfReferenceCodeSequence] == [("121323", "DCM")]
        (refser,) = ds.ReferencedSeriesSequence
        assert refser.SeriesInstanceUID == src[0].SeriesInstanceUID
        assert [i.ReferencedSOPInstanceUID for i in refser.ReferencedInstanceSequence] == [
            src[k].SOPInstanceUID
        ]
        acq, proc = ds.ContributingEquipmentSequence
        assert [_code(i) for i in acq.PurposeOfReferenceCodeSequence] == [("109101", "DCM")]
        assert acq.Manufacturer == src[0].Manufacturer
        assert acq.ManufacturerModelName == src[0].ManufacturerModelName
        assert acq.InstitutionName == src[0].InstitutionName
        assert "DeviceSerialNumber" not in acq  # the source has none: nothing invented
        assert [_code(i) for i in proc.PurposeOfReferenceCodeSequence] == [("109102", "DCM")]
        assert proc.Manufacturer == "srnode project" and proc.ManufacturerModelName == "srnode"
        assert proc.SoftwareVersions == "0.1.0"
        assert proc.ContributionDateTime == "20261125123015.123456+0000"
        assert "linear" in proc.ContributionDescription
        assert "WindowCenter" not in ds and "WindowCenter" not in src[k]  # CT_small has none
        assert all(len(v) <= 16 for v in _ds_values(ds))
        assert "LossyImageCompression" not in ds


def test_series_description_prefix_suffix_and_number(tmp_path: Path) -> None:
    source = load_series(make_mr_series(tmp_path, n_slices=2, rows=16))
    long_desc = "T1 axial " * 10
    for ds in source.datasets:
        ds.SeriesDescription = long_desc[:64]
        ds.SeriesNumber = 7
    out = build_derived_series(
        source,
        slice_result(source),
        options(description_suffix=" (CHECK)", series_number_offset=50, uid_root="1.2.826.0.1.99"),
    )
    desc = out[0].SeriesDescription
    assert len(desc) <= 64 and desc.endswith(" (CHECK)") and desc.startswith("SR x2 T1 axial")
    assert out[0].SeriesNumber == 57
    assert out[0].SOPInstanceUID.startswith("1.2.826.0.1.99.")
    assert out[0].SeriesInstanceUID.startswith("1.2.826.0.1.99.")
    assert all(len(ds.SOPInstanceUID) <= 64 for ds in out)
    with pytest.raises(ValueError, match="IS range"):
        build_derived_series(source, slice_result(source), options(series_number_offset=2**31))
    with pytest.raises(ValueError, match="uid_root"):
        build_derived_series(source, slice_result(source), options(uid_root="1.02.abc"))
    with pytest.raises(ValueError, match="prefix"):
        build_derived_series(
            source, slice_result(source), options(series_description_prefix="{nope}")
        )
    with pytest.raises(ValueError, match="transfer syntax"):
        build_derived_series(source, slice_result(source), options(transfer_syntax="1.2.3"))


def test_options_from_config(tmp_path: Path) -> None:
    derived = DerivedConfig(
        uid_root="1.2.826.0.1.77",
        series_number_offset=300,
        series_description_prefix="SR{scale} ",
        manufacturer="Test Org",
        institution_name="Test Hospital",
    )
    opts = DerivationOptions.from_config(derived, "9.9", now=NOW, description_suffix=" (CHECK)")
    source = load_series(make_ct_series(tmp_path, n_slices=2, rows=16))
    out = build_derived_series(source, slice_result(source), opts)
    assert out[0].SeriesNumber == int(source.datasets[0].SeriesNumber) + 300
    assert out[0].SeriesDescription == "SR2 (CHECK)"
    assert out[0].SeriesInstanceUID.startswith("1.2.826.0.1.77.")
    proc = out[0].ContributingEquipmentSequence[-1]
    assert proc.Manufacturer == "Test Org" and proc.InstitutionName == "Test Hospital"
    assert proc.SoftwareVersions == "9.9"


def test_invalid_results_are_refused(tmp_path: Path) -> None:
    source = load_series(make_ct_series(tmp_path, n_slices=3, rows=16))
    good = slice_result(source)
    bad_nan = slice_result(source)
    bad_nan.volume[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        build_derived_series(source, bad_nan, options())
    bad_offsets = slice_result(source)
    bad_offsets.slice_offsets = good.slice_offsets[:2]
    with pytest.raises(ValueError, match="offsets"):
        build_derived_series(source, bad_offsets, options())
    bad_contrib = slice_result(source)
    bad_contrib.contributing_slices = [[0], [1], [9]]
    with pytest.raises(ValueError, match="contributing"):
        build_derived_series(source, bad_contrib, options())
    with pytest.raises(ValueError, match="slice mode"):
        build_derived_series(source, volume_result(source, 2), options(mode="slice"))


# --- geometry -----------------------------------------------------------------------------------


def test_slice_mode_geometry_keeps_field_of_view(tmp_path: Path) -> None:
    source = load_series(make_ct_series(tmp_path, n_slices=3, rows=32, spacing=4.0, thickness=5.0))
    result = slice_result(source, 2)
    out = build_derived_series(source, result, options())
    dz, dy, dx = source.spacing
    row, col = np.array(source.orientation[:3]), np.array(source.orientation[3:])
    for k, ds in enumerate(out):
        assert (ds.Rows, ds.Columns) == (64, 64)
        assert [float(v) for v in ds.PixelSpacing] == pytest.approx([dy / 2, dx / 2], abs=1e-6)
        expected = source.positions[k] + row * 0.5 * (dx / 2 - dx) + col * 0.5 * (dy / 2 - dy)
        assert [float(v) for v in ds.ImagePositionPatient] == pytest.approx(expected, abs=1e-5)
        # field of view: outer edge of the first pixel unchanged
        ipp = np.array([float(v) for v in ds.ImagePositionPatient])
        edge_new = ipp - row * dx / 4 - col * dy / 4
        edge_old = source.positions[k] - row * dx / 2 - col * dy / 2
        assert edge_new == pytest.approx(edge_old, abs=1e-5)
        assert float(ds.SliceThickness) == pytest.approx(5.0)
        assert float(ds.SpacingBetweenSlices) == pytest.approx(4.0)
        assert [float(v) for v in ds.ImageOrientationPatient] == pytest.approx(source.orientation)
        src_loc = float(source.datasets[k].SliceLocation)
        assert float(ds.SliceLocation) == pytest.approx(src_loc, abs=1e-5)


@pytest.mark.parametrize("scale", [2, 3])
def test_volume_mode_geometry_and_contributions(tmp_path: Path, scale: int) -> None:
    src_paths = make_mr_series(tmp_path, n_slices=4, rows=32, spacing=3.0, thickness=3.0)
    source = load_series(src_paths)
    result = volume_result(source, scale)
    out = build_derived_series(source, result, options())
    n_out = 3 * scale + 1
    assert len(out) == n_out
    normal = source.normal
    src_uids = [r.sop_instance_uid for r in source.source_refs]
    for k, ds in enumerate(out):
        expected = source.positions[0] + result.slice_offsets[k] * normal
        assert [float(v) for v in ds.ImagePositionPatient] == pytest.approx(expected, abs=1e-5)
        assert float(ds.SpacingBetweenSlices) == pytest.approx(3.0 / scale, abs=1e-5)
        assert float(ds.SliceThickness) == pytest.approx(3.0 / scale, abs=1e-5)
        assert (ds.Rows, ds.Columns) == (32, 32)
        assert [float(v) for v in ds.PixelSpacing] == pytest.approx(source.spacing[1:])
        refs = [i.ReferencedSOPInstanceUID for i in ds.SourceImageSequence]
        assert refs == [src_uids[i] for i in result.contributing_slices[k]]
        assert ds.SOPClassUID == MRImageStorage
        assert list(ds.ImageType) == ["DERIVED", "SECONDARY", "OTHER", "SRNODE"]
        assert f"x{scale}" in ds.DerivationDescription and "volume mode" in ds.DerivationDescription
        loc0 = float(source.datasets[0].SliceLocation)
        assert float(ds.SliceLocation) == pytest.approx(loc0 + result.slice_offsets[k], abs=1e-5)
        assert ds.InstanceNumber == k + 1
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in out])
    gaps = np.diff(positions @ normal)
    assert gaps == pytest.approx([3.0 / scale] * (n_out - 1), abs=1e-5)
    # the written series loads back as one consistent series with the new spacing
    back = load_series(write(out, tmp_path / "out"))
    assert back.spacing[0] == pytest.approx(3.0 / scale, abs=1e-5)
    np.testing.assert_allclose(back.volume, np.rint(np.maximum(result.volume, 0)), atol=0.5)


def test_single_slice_output_has_no_spacing_between_slices(tmp_path: Path) -> None:
    source = load_series(make_ct_series(tmp_path, n_slices=1, rows=16))
    out = build_derived_series(source, slice_result(source), options())
    assert len(out) == 1 and "SpacingBetweenSlices" not in out[0]


# --- enhanced sources ---------------------------------------------------------------------------


def test_legacy_enhanced_mr_source_gives_classic_mr_with_frame_numbers(tmp_path: Path) -> None:
    paths = make_mr_series(tmp_path / "src", n_slices=4, rows=32, enhanced=True)
    source = load_series(paths)
    enhanced_uid = pydicom.dcmread(paths[0]).SOPInstanceUID
    result = volume_result(source, 2)
    out = build_derived_series(source, result, options())
    # highdicom writes the frames from the last position down: the numbering follows
    assert [ds.InstanceNumber for ds in by_position(out, source.normal)] == list(range(7, 0, -1))
    for k, ds in enumerate(by_position(out, source.normal)):
        assert ds.SOPClassUID == MRImageStorage and "NumberOfFrames" not in ds
        assert "PerFrameFunctionalGroupsSequence" not in ds
        assert "SharedFunctionalGroupsSequence" not in ds
        assert ds.ScanningSequence and ds.SequenceVariant  # Type 1 in the MR Image module
        frames = [i.ReferencedFrameNumber for i in ds.SourceImageSequence]
        expected = [source.source_refs[i].frame_number for i in result.contributing_slices[k]]
        assert frames == expected
        assert {i.ReferencedSOPInstanceUID for i in ds.SourceImageSequence} == {enhanced_uid}
        assert {i.ReferencedSOPClassUID for i in ds.SourceImageSequence} == {
            pydicom.dcmread(paths[0]).SOPClassUID
        }


def test_enhanced_ct_supplemental_source(tmp_path: Path) -> None:
    source = load_series([make_enhanced_ct_in_hu(tmp_path)])
    result = volume_result(source, 2)
    out = by_position(build_derived_series(source, result, options()), source.normal)
    assert [ds.InstanceNumber for ds in out] == [3, 2, 1]  # as the frames run
    assert len(out) == 3 and all(ds.SOPClassUID == CTImageStorage for ds in out)
    assert [[i.ReferencedFrameNumber for i in ds.SourceImageSequence] for ds in out] == [
        [2], [2, 1], [1]
    ]
    z = [float(ds.ImagePositionPatient[2]) for ds in out]
    assert z == pytest.approx([-149.0, -154.0, -159.0])
    assert all(float(ds.RescaleIntercept) == -1024 for ds in out)
    assert all(float(ds.WindowCenter) == 49 and float(ds.WindowWidth) == 102 for ds in out)
    acq = out[0].ContributingEquipmentSequence[0]
    assert acq.Manufacturer == "Acme Medical Devices" and acq.DeviceSerialNumber == "123456"


# --- pixels -------------------------------------------------------------------------------------


def _modality(ds: Dataset) -> np.ndarray:
    return np.asarray(apply_modality_lut(ds.pixel_array, ds), dtype=np.float64)


def test_pixels_round_trip_and_representation(tmp_path: Path) -> None:
    source = load_series(make_ct_series(tmp_path / "src", n_slices=2, rows=32))
    result = slice_result(source)
    result.volume[0, :4, :4] = -1500.0  # undershoot below air: clipped to the floor
    out = build_derived_series(source, result, options())
    back = [pydicom.dcmread(p) for p in write(out, tmp_path / "out")]
    expected = np.rint(np.maximum(result.volume, CT_FLOOR_HU))
    for k, ds in enumerate(back):
        assert ds.BitsAllocated == 16 and ds.SamplesPerPixel == 1
        assert float(ds.RescaleSlope) == 1 and float(ds.RescaleIntercept) == -1024
        assert ds.PixelRepresentation == source.pixel_representation
        np.testing.assert_array_equal(_modality(ds), expected[k])
    assert "clipped" in out[0].DerivationDescription


def test_values_beyond_signed_range_switch_representation(tmp_path: Path) -> None:
    source = load_series(make_ct_series(tmp_path, n_slices=2, rows=16))
    assert source.pixel_representation == 1
    result = slice_result(source)
    result.volume[1, 5, 5] = 40000.0  # stored 41024: beyond int16, fits uint16
    out = build_derived_series(source, result, options())
    assert all(ds.PixelRepresentation == 0 and ds.BitsStored == 16 for ds in out)
    assert float(out[1].RescaleIntercept) == -1024
    assert _modality(out[1])[5, 5] == 40000.0  # not clipped


def test_values_beyond_16_bits_recompute_rescale(tmp_path: Path) -> None:
    source = load_series(make_ct_series(tmp_path, n_slices=2, rows=16))
    result = slice_result(source)
    result.volume[0, 3, 3] = 90000.0
    out = build_derived_series(source, result, options())
    slope = float(out[0].RescaleSlope)
    assert slope > 1
    assert all(float(ds.RescaleSlope) == slope for ds in out)
    got = _modality(out[0])
    assert got[3, 3] == pytest.approx(90000.0, abs=slope)
    np.testing.assert_allclose(got, np.maximum(result.volume[0], CT_FLOOR_HU), atol=slope)
    assert "recomputed" in out[0].DerivationDescription


def test_windowing_and_lossy_flag_carried_and_pixel_baggage_removed(tmp_path: Path) -> None:
    paths = make_mr_series(tmp_path / "src", n_slices=2, rows=16)
    for p in paths:
        ds = pydicom.dcmread(p)
        ds.LossyImageCompression = "01"
        ds.LossyImageCompressionRatio = "8"
        ds.LossyImageCompressionMethod = "ISO_10918_1"
        ds.add_new(0x60000010, "US", 16)
        ds.add_new(0x60000011, "US", 16)
        ds.add_new(0x60003000, "OW", b"\x00" * 32)
        icon = Dataset()
        icon.Rows = 4
        ds.IconImageSequence = [icon]
        ds.SmallestImagePixelValue = 0
        ds.add_new(0x00291010, "OB", b"\x01\x02")  # private, no creator
        ds.save_as(p)
    source = load_series(paths)
    assert source.lossy
    out = build_derived_series(source, slice_result(source), options())
    for ds in out:
        assert ds.LossyImageCompression == "01"
        assert ds.LossyImageCompressionRatio == "8"
        assert ds.LossyImageCompressionMethod == "ISO_10918_1"
        assert float(ds.WindowCenter) == 600 and float(ds.WindowWidth) == 1600
        assert not any(0x6000 <= (t >> 16) <= 0x60FF for t in ds.keys())
        assert "IconImageSequence" not in ds and "SmallestImagePixelValue" not in ds
        assert not any(t.is_private for t in ds.keys())


def test_timezone_of_source_is_used_for_creation_time(tmp_path: Path) -> None:
    source = load_series(make_ct_series(tmp_path, n_slices=1, rows=16))
    assert source.datasets[0].TimezoneOffsetFromUTC == "-0500"
    out = build_derived_series(source, slice_result(source), options())
    assert out[0].InstanceCreationDate == "20261125" and out[0].InstanceCreationTime == "073015"


@pytest.mark.parametrize("ts", [RLELossless, JPEG2000Lossless])
def test_compressed_output_decodes_to_same_values(tmp_path: Path, ts: str) -> None:
    source = load_series(make_mr_series(tmp_path, n_slices=2, rows=16))
    result = slice_result(source)
    plain = build_derived_series(source, result, options())
    packed = build_derived_series(source, result, options(transfer_syntax=ts))
    back = [pydicom.dcmread(p) for p in write(packed, tmp_path / "out")]
    for a, b in zip(plain, back, strict=True):
        assert b.file_meta.TransferSyntaxUID == ts
        np.testing.assert_array_equal(a.pixel_array, b.pixel_array)
        assert b.SOPInstanceUID == b.file_meta.MediaStorageSOPInstanceUID


# --- dciodvfy / dcentvfy ------------------------------------------------------------------------


def _dciodvfy(path: Path) -> list[str]:
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return run.stderr.splitlines()


def _errors(lines: list[str]) -> set[str]:
    return {line.strip() for line in lines if line.startswith("Error")}


SOURCES: dict[str, Callable[[Path], list[Path]]] = {
    "ct": lambda d: make_ct_series(d, n_slices=3, rows=32),
    "mr": lambda d: make_mr_series(d, n_slices=3, rows=32),
    "legacy-enhanced-mr": lambda d: make_mr_series(d, n_slices=3, rows=32, enhanced=True),
    "enhanced-ct": lambda d: [make_enhanced_ct_in_hu(d)],
}


@needs_dicom3tools
@pytest.mark.parametrize("ts", [ExplicitVRLittleEndian, RLELossless, JPEG2000Lossless])
@pytest.mark.parametrize("kind", list(SOURCES))
def test_dciodvfy_adds_no_errors_and_dcentvfy_consistent(
    tmp_path: Path, kind: str, ts: str
) -> None:
    src_paths = SOURCES[kind](tmp_path / "src")
    source = load_series(src_paths)
    result = volume_result(source, 2) if kind in ("enhanced-ct", "mr") else slice_result(source)
    out = build_derived_series(source, result, options(transfer_syntax=ts))
    paths = write(out, tmp_path / "out")
    source_errors = _errors(_dciodvfy(src_paths[0]))
    for path in paths:
        lines = _dciodvfy(path)
        new_errors = _errors(lines) - source_errors
        assert not new_errors, f"{kind}/{ts}: {sorted(new_errors)}"
    run = subprocess.run(
        ["dcentvfy", *map(str, paths)], capture_output=True, text=True, timeout=60
    )
    report = run.stdout + run.stderr
    assert run.returncode == 0 and "Error" not in report, report


@needs_dicom3tools
def test_dciodvfy_catches_a_broken_instance(tmp_path: Path) -> None:
    """The checker used above does report errors (so the assertions can fail)."""
    source = load_series(make_ct_series(tmp_path / "src", n_slices=2, rows=16))
    out = build_derived_series(source, slice_result(source), options())
    del out[0].ImageType
    with pytest.warns(UserWarning, match="exceeds the maximum length"):
        out[0].SliceThickness = "1.23456789012345678"
    out[1].SeriesNumber = 99
    out[1].PatientID = "someone else"
    paths = write(out, tmp_path / "out")
    assert _errors(_dciodvfy(paths[0]))
    run = subprocess.run(["dcentvfy", *map(str, paths)], capture_output=True, text=True)
    assert "Error" in run.stdout + run.stderr


def test_codes_module_values() -> None:
    assert (c.SPATIAL_RESAMPLING.value, c.SPATIAL_RESAMPLING.scheme_designator) == (
        "113085", "DCM"
    )
    assert c.SOURCE_IMAGE_FOR_PROCESSING.value == "121322"
    assert c.SOURCE_SERIES_FOR_PROCESSING.value == "121323"
    assert c.ACQUISITION_EQUIPMENT.value == "109101"
    assert c.PROCESSING_EQUIPMENT.value == "109102"
    assert c.IMAGE_TYPE_TOKEN == "SRNODE"
    assert pydicom.uid.UID(c.IMPLEMENTATION_CLASS_UID).is_valid
