"""Whole studies from a PACS (issue 12, item 14): every Storage SOP class is accepted by default,
stored or discarded per ``[node] other_sop_classes``, and never enhanced.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, RTPlanStorage, SecondaryCaptureImageStorage
from sqlalchemy import func, select

from dicom_node.codes import ALL_STORAGE_SOP_CLASSES, ENHANCEABLE_SOP_CLASSES
from storage.completeness import check_completeness
from storage.models import Instance, Job, Series
from storage.rules import Rule
from tests.support.dcmtk import storescu
from tests.support.node import node_config, running_node, sample_file, with_new_uids


def _files(tmp_path: Path) -> list[Path]:
    study = "1.2.826.0.1.3680043.8.498.14"
    return [
        with_new_uids(sample_file("SC_rgb.dcm"), tmp_path / "sc.dcm", StudyInstanceUID=study),
        with_new_uids(sample_file("rtplan.dcm"), tmp_path / "plan.dcm", StudyInstanceUID=study),
    ]


def _count(node: object, model: type) -> int:
    with node.db.session() as s:  # type: ignore[attr-defined]
        return int(s.execute(select(func.count()).select_from(model)).scalar_one())


def test_every_storage_class_is_offered_and_only_ct_mr_enhanced() -> None:
    assert set(ENHANCEABLE_SOP_CLASSES) <= set(ALL_STORAGE_SOP_CLASSES)
    assert SecondaryCaptureImageStorage in ALL_STORAGE_SOP_CLASSES
    assert "1.2.840.10008.5.1.4.1.1.88.67" in ALL_STORAGE_SOP_CLASSES  # X-Ray dose SR
    assert SecondaryCaptureImageStorage not in ENHANCEABLE_SOP_CLASSES


def test_other_sop_classes_are_stored_and_never_queued(tmp_path: Path) -> None:
    cfg = node_config(tmp_path)
    assert cfg.node.accept_all_storage and cfg.node.other_sop_classes == "store"
    with running_node(cfg) as node:
        ae = AE(ae_title="PACS")
        for sop_class in (SecondaryCaptureImageStorage, RTPlanStorage, CTImageStorage):
            ae.add_requested_context(sop_class)
        assoc = ae.associate("127.0.0.1", node.scp.port, ae_title="SRNODE")
        assert assoc.is_established
        assert not assoc.rejected_contexts
        assoc.release()
        rc, out = storescu("127.0.0.1", node.scp.port, _files(tmp_path), called_ae_title="SRNODE")
        assert rc == 0, out
        assert _count(node, Instance) == 2
        with node.db.session() as s:
            assert {r.enhanceable for r in s.scalars(select(Series))} == {False}
        check_completeness(node.db, [Rule(name="any")], 0.001, 60)
        assert _count(node, Job) == 0
        with node.db.session() as s:
            reasons = {r.skip_reason for r in s.scalars(select(Series))}
        assert reasons == {"SOP class is not a CT/MR image: stored, never enhanced"}


@pytest.mark.parametrize("policy", ["discard"])
def test_other_sop_classes_can_be_discarded(tmp_path: Path, policy: str) -> None:
    cfg = node_config(tmp_path, node={"other_sop_classes": policy})
    with running_node(cfg) as node:
        rc, out = storescu("127.0.0.1", node.scp.port, _files(tmp_path), called_ae_title="SRNODE")
        assert rc == 0, out  # success for the sender: its forward job completes
        assert _count(node, Instance) == 0
        assert "instance_discarded" in (tmp_path / "audit.log").read_text()
