"""Derived series from what real scanners send (issue 12): numbering, real positions, Type 2
values, equipment history, pixel padding; every output is checked with dciodvfy too.
"""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import generate_uid

from dicom_node.derive.builder import build_derived_series
from dicom_node.derive.series import SeriesError, SourceSeries, load_series
from sr_engine import enhance_volume
from sr_engine.api import EnhanceRequest, EnhanceResult
from tests.dicom_factory import (
    make_ct_series,
    make_enhanced_ct_in_hu,
    make_mr_series,
    source_path,
)
from tests.test_derive import (
    _dciodvfy,
    _errors,
    by_position,
    options,
    slice_result,
    volume_result,
    write,
)

warnings.filterwarnings("ignore", category=UserWarning, module="pydicom")


def rewrite(paths: list[Path], change: Callable[[int, Dataset], None]) -> list[Path]:
    """Apply ``change(k, ds)`` to every file of a factory series (in slice order) and save it."""
    for k, path in enumerate(paths):
        ds = pydicom.dcmread(path)
        change(k, ds)
        ds.save_as(path, enforce_file_format=True)
    return paths


def engine_result(source: SourceSeries, mode: str, scale: int) -> EnhanceResult:
    """The real engine with the linear-interpolation model (no weights, fast on CPU)."""
    request = EnhanceRequest(mode=mode, scale=scale, model="linear", device="cpu")  # type: ignore[arg-type]
    return enhance_volume(source.volume, source.spacing, source.slice_thickness, source.modality,
                          request)


def assert_no_new_dciodvfy_errors(src_paths: list[Path], out: list[Dataset], folder: Path) -> None:
    """dciodvfy: no error in a derived instance that its source does not already have."""
    if shutil.which("dciodvfy") is None:
        return
    source_errors = _errors(_dciodvfy(src_paths[0]))
    for path in write(out, folder):
        new = _errors(_dciodvfy(path)) - source_errors
        assert not new, sorted(new)


def _z(ds: Dataset) -> float:
    return float(ds.ImagePositionPatient[2])


# --- item 1: instance order ----------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["slice", "volume"])
def test_instance_numbers_run_in_the_source_direction(tmp_path: Path, mode: str) -> None:
    """A head-first CT numbered from the head down (z falls as Instance Number rises)."""
    paths = make_ct_series(tmp_path / "src", n_slices=4, rows=16)
    rewrite(paths, lambda k, ds: setattr(ds, "InstanceNumber", 4 - k))
    source = load_series(paths)
    result = slice_result(source) if mode == "slice" else volume_result(source, 2)
    out = build_derived_series(source, result, options(mode=mode))
    assert [ds.InstanceNumber for ds in out] == list(range(1, len(out) + 1))
    z = [_z(ds) for ds in out]
    assert z == sorted(z, reverse=True)  # like the source: Instance Number 1 is the top slice
    src = sorted((pydicom.dcmread(p) for p in paths), key=lambda d: int(d.InstanceNumber))
    assert _z(src[0]) > _z(src[-1])
    assert_no_new_dciodvfy_errors(paths, out, tmp_path / "out")


def test_ascending_source_keeps_ascending_numbers(tmp_path: Path) -> None:
    source = load_series(make_ct_series(tmp_path, n_slices=3, rows=16))
    out = build_derived_series(source, slice_result(source), options())
    z = [_z(ds) for ds in out]
    assert z == sorted(z)


# --- item 2: real positions ----------------------------------------------------------------------

#: Source slice positions along the normal (mm): 5 mm nominal, jitter within the 2% tolerance.
JITTERED = [0.0, 5.04, 9.99, 15.03, 19.98, 25.02]


def _jittered_ct(folder: Path) -> list[Path]:
    paths = make_ct_series(folder, n_slices=len(JITTERED), rows=16, spacing=5.0, thickness=5.0)

    def move(k: int, ds: Dataset) -> None:
        ipp = [float(v) for v in ds.ImagePositionPatient]
        z0 = ipp[2] - 5.0 * k
        ds.ImagePositionPatient = [ipp[0], ipp[1], round(z0 + JITTERED[k], 4)]
        ds.SliceLocation = round(z0 + JITTERED[k], 4)

    return rewrite(paths, move)


def test_slice_mode_keeps_every_real_position_and_slice_location(tmp_path: Path) -> None:
    paths = _jittered_ct(tmp_path / "src")
    source = load_series(paths)
    src = by_position([pydicom.dcmread(p) for p in paths], source.normal)
    out = build_derived_series(source, engine_result(source, "slice", 2), options())
    assert len(out) == len(src)
    for s, d in zip(src, by_position(out, source.normal), strict=True):
        assert _z(d) == pytest.approx(_z(s), abs=1e-4)
        assert float(d.SliceLocation) == pytest.approx(float(s.SliceLocation), abs=1e-4)
        (ref,) = d.SourceImageSequence
        assert ref.ReferencedSOPInstanceUID == s.SOPInstanceUID
        assert "SpacingBetweenSlices" not in d  # the gaps are not uniform: no single value
    assert_no_new_dciodvfy_errors(paths, out, tmp_path / "out")


def test_volume_mode_places_slices_on_the_real_positions(tmp_path: Path) -> None:
    paths = _jittered_ct(tmp_path / "src")
    source = load_series(paths)
    src = by_position([pydicom.dcmread(p) for p in paths], source.normal)
    result = engine_result(source, "volume", 2)
    out = by_position(build_derived_series(source, result, options()), source.normal)
    dz = source.spacing[0]
    z_src = np.array([_z(s) for s in src])
    for k, d in enumerate(out):
        f = result.slice_offsets[k] / dz  # fractional source index on the engine's grid
        i0 = int(np.clip(np.floor(f), 0, len(src) - 2))
        expected = z_src[i0] + (f - i0) * (z_src[i0 + 1] - z_src[i0])
        assert _z(d) == pytest.approx(expected, abs=1e-4)
        assert float(d.SliceLocation) == pytest.approx(expected, abs=1e-4)
        refs = [i.ReferencedSOPInstanceUID for i in d.SourceImageSequence]
        assert refs == [src[i].SOPInstanceUID for i in result.contributing_slices[k]]
        assert float(d.SliceThickness) == pytest.approx(result.slice_thickness)
    # the output slices that sit on a source slice (odd k at x2) sit exactly on its real position
    on_source = [d for k, d in enumerate(out) if abs(result.slice_offsets[k] / dz % 1) < 1e-9]
    assert {round(_z(d), 3) for d in on_source} <= {round(z, 3) for z in z_src}
    assert_no_new_dciodvfy_errors(paths, out, tmp_path / "out")


# --- item 8: no invented acquisition values ------------------------------------------------------


def test_empty_slice_thickness_stays_empty_in_slice_mode(tmp_path: Path) -> None:
    paths = make_ct_series(tmp_path / "src", n_slices=3, rows=16)
    rewrite(paths, lambda k, ds: setattr(ds, "SliceThickness", None))
    source = load_series(paths)
    out = build_derived_series(source, slice_result(source), options())
    for ds in out:
        assert "SliceThickness" in ds and ds.SliceThickness in (None, "")
    assert_no_new_dciodvfy_errors(paths, out, tmp_path / "out")


# --- item 9: equipment history -------------------------------------------------------------------


def _equipment(code: str, meaning: str, manufacturer: str) -> Dataset:
    item = Dataset()
    purpose = Dataset()
    purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning = code, "DCM", meaning
    item.PurposeOfReferenceCodeSequence = DicomSequence([purpose])
    item.Manufacturer = manufacturer
    item.ManufacturerModelName = f"{manufacturer} model"
    return item


def test_existing_contributing_equipment_is_kept_and_srnode_appended(tmp_path: Path) -> None:
    paths = make_ct_series(tmp_path / "src", n_slices=2, rows=16)

    def history(k: int, ds: Dataset) -> None:
        ds.ContributingEquipmentSequence = DicomSequence([
            _equipment("109101", "Acquisition Equipment", "Scanner Co"),
            _equipment("109102", "Processing Equipment", "Workstation Co"),
        ])
        ds.Manufacturer = "Workstation Co"

    rewrite(paths, history)
    source = load_series(paths)
    out = build_derived_series(source, slice_result(source), options())
    for ds in out:
        items = ds.ContributingEquipmentSequence
        assert [(i.PurposeOfReferenceCodeSequence[0].CodeValue, i.Manufacturer) for i in items] == [
            ("109101", "Scanner Co"), ("109102", "Workstation Co"), ("109102", "srnode project")
        ]
    assert_no_new_dciodvfy_errors(paths, out, tmp_path / "out")


def test_no_acquisition_item_is_invented_without_a_manufacturer(tmp_path: Path) -> None:
    paths = make_ct_series(tmp_path / "src", n_slices=2, rows=16)
    rewrite(paths, lambda k, ds: setattr(ds, "Manufacturer", None))
    source = load_series(paths)
    out = build_derived_series(source, slice_result(source), options())
    for ds in out:
        (item,) = ds.ContributingEquipmentSequence  # srnode only; no "UNKNOWN" scanner
        assert item.PurposeOfReferenceCodeSequence[0].CodeValue == "109102"
    assert_no_new_dciodvfy_errors(paths, out, tmp_path / "out")


# --- item 10: pixel padding ----------------------------------------------------------------------


def _padded_ct(folder: Path, rows: int = 16) -> list[Path]:
    paths = make_ct_series(folder, n_slices=3, rows=rows)

    def pad(k: int, ds: Dataset) -> None:
        arr = ds.pixel_array.copy()
        arr[:, : rows // 4] = -2000  # outside the scan field
        ds.PixelData = arr.astype(np.int16).tobytes()
        ds.PixelPaddingValue = -2000
        ds["PixelPaddingValue"].VR = "SS"

    return rewrite(paths, pad)


def test_pixel_padding_is_kept_as_padding(tmp_path: Path) -> None:
    paths = _padded_ct(tmp_path / "src")
    source = load_series(paths)
    assert source.padding_mask is not None and source.padding_value == -2000
    assert source.volume.min() > -2000 - 1024  # the engine never sees the padding value
    result = engine_result(source, "slice", 2)
    out = build_derived_series(source, result, options())
    for ds in out:
        assert ds.PixelPaddingValue == -2000 and ds.PixelRepresentation == 1
        arr = ds.pixel_array
        assert np.all(arr[:, : 32 // 4] == -2000)  # the padded columns, at twice the matrix
        assert np.all(arr[:, 32 // 4 :] != -2000)
    assert_no_new_dciodvfy_errors(paths, out, tmp_path / "out")


def test_padding_does_not_enter_the_consistency_check(tmp_path: Path) -> None:
    """On a small image the padding edge alone used to dominate the re-degradation error.

    The consistency figures of a padded source equal those of the same image whose padding
    region simply holds the lowest real value (no padding edge at all).
    """
    padded = load_series(_padded_ct(tmp_path / "padded"))
    fill_stored = int(padded.padding_fill - padded.rescale_intercepts[0])

    def unpad(k: int, ds: Dataset) -> None:
        arr = ds.pixel_array.copy()
        arr[arr == -2000] = fill_stored
        ds.PixelData = arr.astype(np.int16).tobytes()
        del ds.PixelPaddingValue

    clean = load_series(rewrite(_padded_ct(tmp_path / "clean"), unpad))
    assert clean.padding_mask is None
    got = engine_result(padded, "slice", 2).consistency
    reference = engine_result(clean, "slice", 2).consistency
    assert got.mean_abs_error == pytest.approx(reference.mean_abs_error, abs=1e-3)
    assert got.max_abs_error == pytest.approx(reference.max_abs_error, abs=1e-3)
    assert got.psnr == pytest.approx(reference.psnr, abs=1e-3)


# --- item 3: CT not in Hounsfield units ----------------------------------------------------------


def test_ct_parametric_map_is_refused_with_its_units(tmp_path: Path) -> None:
    # pydicom's eCT_Supplemental: Rescale Type US and a value mapping in ml/100ml/s
    with pytest.raises(SeriesError, match="ml/100ml/s.*not Hounsfield"):
        load_series([source_path("eCT_Supplemental.dcm")])
    paths = make_ct_series(tmp_path / "classic", n_slices=2, rows=16)
    rewrite(paths, lambda k, ds: setattr(ds, "RescaleType", "MGML"))
    with pytest.raises(SeriesError, match="Rescale Type MGML"):
        load_series(paths)


def test_enhanced_ct_in_hu_keeps_its_rescale_type(tmp_path: Path) -> None:
    path = make_enhanced_ct_in_hu(tmp_path / "src")
    source = load_series([path])
    out = build_derived_series(source, volume_result(source, 2), options())
    assert {ds.RescaleType for ds in out} == {"HU"}
    assert all("RealWorldValueMappingSequence" not in ds for ds in out)
    assert_no_new_dciodvfy_errors([path], out, tmp_path / "out")


# --- item 4: Siemens MOSAIC ----------------------------------------------------------------------


def test_mosaic_is_refused(tmp_path: Path) -> None:
    paths = make_mr_series(tmp_path, n_slices=1, rows=32)
    rewrite(paths, lambda k, ds: setattr(ds, "ImageType", ["ORIGINAL", "PRIMARY", "M", "ND",
                                                           "MOSAIC"]))
    with pytest.raises(SeriesError, match="MOSAIC"):
        load_series(paths)


# --- item 11: enhanced MR to classic MR ----------------------------------------------------------


def test_enhanced_mr_groups_give_only_classic_mr_attributes(tmp_path: Path) -> None:
    paths = make_mr_series(tmp_path / "src", n_slices=3, rows=16, enhanced=True)

    def add_mr_groups(k: int, ds: Dataset) -> None:
        timing = Dataset()
        timing.RepetitionTime = 500.0
        timing.FlipAngle = 15.0
        timing.EchoTrainLength = 1
        timing.RFEchoTrainLength = 1
        timing.GradientEchoTrainLength = 0
        mode = Dataset()
        mode.OperatingModeType, mode.OperatingMode = "STATIC FIELD", "IEC_NORMAL"
        timing.OperatingModeSequence = DicomSequence([mode])
        sar = Dataset()
        sar.SpecificAbsorptionRateDefinition = "IEC_WHOLE_BODY"
        sar.SpecificAbsorptionRateValue = 0.5
        timing.SpecificAbsorptionRateSequence = DicomSequence([sar])
        fov = Dataset()
        fov.InPlanePhaseEncodingDirection = "ROW"
        fov.MRAcquisitionFrequencyEncodingSteps = 256
        fov.PercentSampling = 100.0
        shared = ds.SharedFunctionalGroupsSequence[0]
        shared.MRTimingAndRelatedParametersSequence = DicomSequence([timing])
        shared.MRFOVGeometrySequence = DicomSequence([fov])

    rewrite(paths, add_mr_groups)
    source = load_series(paths)
    out = build_derived_series(source, slice_result(source), options())
    for ds in out:
        for keyword in ("OperatingModeSequence", "SpecificAbsorptionRateSequence",
                        "RFEchoTrainLength", "GradientEchoTrainLength",
                        "MRAcquisitionFrequencyEncodingSteps"):
            assert keyword not in ds, keyword
        # the classic MR Image module's attributes still come through (converted ones first)
        assert "FlipAngle" in ds and "InPlanePhaseEncodingDirection" in ds
        assert float(ds.PercentSampling) == 100.0
        assert "RescaleType" not in ds  # no MR Image module attribute
    assert_no_new_dciodvfy_errors(paths, out, tmp_path / "out")


# --- item 12: slice mode needs no regular stack --------------------------------------------------


def _slice_mode_output(paths: list[Path], folder: Path) -> tuple[SourceSeries, list[Dataset]]:
    """Volume mode refuses the series; slice mode derives it (dciodvfy-clean)."""
    with pytest.raises(SeriesError):
        load_series(paths)
    source = load_series(paths, slice_mode=True)
    out = build_derived_series(source, engine_result(source, "slice", 2), options(mode="slice"))
    assert_no_new_dciodvfy_errors(paths, out, folder)
    return source, out


def test_slice_mode_accepts_gantry_tilt(tmp_path: Path) -> None:
    paths = make_ct_series(tmp_path / "src", n_slices=4, rows=16)

    def tilt(k: int, ds: Dataset) -> None:  # 5 mm slices, 20 degree tilt: y moves 1.82 mm/slice
        ipp = [float(v) for v in ds.ImagePositionPatient]
        ds.ImagePositionPatient = [ipp[0], round(ipp[1] + k * 1.82, 3), ipp[2]]

    rewrite(paths, tilt)
    source, out = _slice_mode_output(paths, tmp_path / "out")
    src = by_position([pydicom.dcmread(p) for p in paths], source.normal)
    for s, d in zip(src, by_position(out, source.normal), strict=True):
        assert float(d.ImagePositionPatient[1]) == pytest.approx(
            float(s.ImagePositionPatient[1]) + 0.5 * (float(d.PixelSpacing[0])
                                                      - float(s.PixelSpacing[0])), abs=1e-4)
        assert d.SourceImageSequence[0].ReferencedSOPInstanceUID == s.SOPInstanceUID


def test_slice_mode_accepts_gaps_and_missing_slices(tmp_path: Path) -> None:
    paths = make_ct_series(tmp_path / "src", n_slices=6, rows=16)
    paths[2].unlink()
    paths = [p for p in paths if p.exists()]
    _, out = _slice_mode_output(paths, tmp_path / "out")
    assert len(out) == 5 and all("SpacingBetweenSlices" not in d for d in out)


def test_slice_mode_accepts_duplicate_positions_of_a_multi_echo_series(tmp_path: Path) -> None:
    paths = make_mr_series(tmp_path / "src", n_slices=3, rows=16)
    rewrite(paths, lambda k, ds: setattr(ds, "EchoNumbers", 1))
    echoes = []
    for k, path in enumerate(paths):
        ds = pydicom.dcmread(path)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.EchoNumbers, ds.EchoTime, ds.InstanceNumber = 2, 80.0, 4 + k
        echo = path.with_name(f"echo2_{k}.dcm")
        ds.save_as(echo, enforce_file_format=True)
        echoes.append(echo)
    source, out = _slice_mode_output(paths + echoes, tmp_path / "out")
    assert len(out) == 6
    refs = {d.SourceImageSequence[0].ReferencedSOPInstanceUID for d in out}
    assert len(refs) == 6


def test_slice_mode_leaves_out_a_localizer_and_says_so(tmp_path: Path, capsys: Any) -> None:
    paths = make_ct_series(tmp_path / "src", n_slices=3, rows=16)
    scout = paths[0].with_name("SCOUT.dcm")
    ds = pydicom.dcmread(paths[0])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]  # sagittal
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.save_as(scout, enforce_file_format=True)
    source, out = _slice_mode_output([*paths, scout], tmp_path / "out")
    assert len(out) == 3
    (note,) = source.notes
    assert "1 image(s) not enhanced" in note and "SCOUT.dcm" in note
    # srnode enhance says so too
    from dicom_node.config import parse_config
    from dicom_node.pipeline import enhance_path

    written = enhance_path(tmp_path / "src", tmp_path / "cli", parse_config({}), model="linear",
                           progress=False)
    assert sum(len(v) for v in written.values()) == 3
    assert "SCOUT.dcm" in capsys.readouterr().err


def test_slice_mode_keeps_an_absent_frame_of_reference_absent(tmp_path: Path) -> None:
    paths = make_ct_series(tmp_path / "src", n_slices=3, rows=16)
    rewrite(paths, lambda k, ds: delattr(ds, "FrameOfReferenceUID"))
    _, out = _slice_mode_output(paths, tmp_path / "out")
    assert all("FrameOfReferenceUID" not in d for d in out)
