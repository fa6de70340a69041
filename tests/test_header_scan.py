"""The fast header scan never disagrees with the full pydicom path.

Whenever :func:`scan_instance` vouches for an instance, the full path (``parse_dataset``,
``InstanceHeader.from_dataset``, ``check_image``) must accept it with the identical header; and
for clean data in the common encodings the scan must actually vouch (else it is useless).
"""

from __future__ import annotations

import io
from pathlib import Path

import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dicom_node.receive.header import header_from_dataset
from dicom_node.receive.header_scan import scan_instance
from dicom_node.receive.validation import check_image, parse_dataset
from storage.records import InstanceHeader
from tests.dicom_factory import make_ct_series, make_mr_series
from tests.support.malformed import (
    malformed_corpus,
    mutate,
    part10,
    receive_seeds,
)
from tests.support.node import sample_file, transfer_syntax_variants


def _full_path(data: bytes) -> InstanceHeader | None:
    """The header the full path produces, or None when it refuses the instance."""
    try:
        ds = parse_dataset(data)
        header = header_from_dataset(ds)
        check_image(ds)
    except Exception:  # noqa: BLE001 - any refusal
        return None
    return header


def _file_bytes(path: Path) -> bytes:
    ds = pydicom.dcmread(path)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _agree(data: bytes) -> InstanceHeader | None:
    fast = scan_instance(data)
    if fast is not None:
        assert _full_path(data) == fast
    return fast


def test_clean_instances_take_the_fast_path(tmp_path: Path) -> None:
    paths = [sample_file(name) for name in ("CT_small.dcm", "MR_small.dcm", "693_UNCR.dcm",
                                            "MR_small_implicit.dcm")]
    paths += make_ct_series(tmp_path / "ct", n_slices=2)
    paths += make_mr_series(tmp_path / "mr", n_slices=2)
    for path in paths:
        data = _file_bytes(path)
        assert _agree(data) is not None, path.name
    # the benchmark's instances (pydicom-data's 512x512 CT) too
    assert _agree(Path(sample_file("693_UNCR.dcm")).read_bytes()) is not None


def test_every_transfer_syntax_agrees(tmp_path: Path) -> None:
    vouched = 0
    for ts, path in transfer_syntax_variants(tmp_path).items():
        data = Path(path).read_bytes()
        if _agree(data) is not None:
            vouched += 1
            assert str(pydicom.dcmread(path).file_meta.TransferSyntaxUID) == ts
    assert vouched >= 5  # explicit, implicit and encapsulated syntaxes


def test_malformed_corpus_never_vouched_where_the_full_path_refuses() -> None:
    refused_by_full = 0
    for case in malformed_corpus():
        full = _full_path(case.data)
        fast = scan_instance(case.data)
        if fast is not None:
            assert full == fast, case.name
        if full is None:
            refused_by_full += 1
            assert fast is None, case.name
    assert refused_by_full > 50


@settings(max_examples=300, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(seed_index=st.integers(0, 50), ops=st.lists(
    st.tuples(st.sampled_from(["flip", "insert", "delete", "truncate", "overwrite"]),
              st.integers(0, 10**6), st.binary(min_size=1, max_size=4)),
    min_size=1, max_size=4))
def test_mutated_instances_agree(seed_index: int, ops: list) -> None:
    seeds = _SEEDS
    seed = seeds[seed_index % len(seeds)]
    body = mutate(seed.body, ops)
    data = part10(body, seed.sop_class_uid, "1.2.3.4", seed.transfer_syntax_uid)
    _agree(data)


_SEEDS = receive_seeds()


@pytest.mark.parametrize("keyword,value", [
    ("PatientName", "Müller^Hans"), ("SpecificCharacterSet", "ISO 2022 IR 87"),
    ("Modality", "CT\\MR"), ("InstanceNumber", "1.5"), ("SOPInstanceUID", "1.2.03"),
])
def test_unusual_values_fall_back_to_the_full_path(tmp_path: Path, keyword: str,
                                                   value: str) -> None:
    ds = pydicom.dcmread(sample_file("CT_small.dcm"))
    if keyword == "PatientName":
        ds.SpecificCharacterSet = "ISO_IR 100"
    setattr(ds, keyword, value)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    assert scan_instance(out.getvalue()) is None
