"""Load: 8 concurrent associations x 120 small CT instances, nothing lost; the association limit
answers a 9th association with A-ASSOCIATE-RJ instead of hanging."""

from __future__ import annotations

import copy
import threading
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, build_context
from pynetdicom.association import Association
from pynetdicom.sop_class import CTImageStorage, Verification
from sqlalchemy import select

from storage.models import Instance, Series
from tests.support.node import node_config, running_node, sample_file
from tests.support.raw_dicom import request_association

N_ASSOCIATIONS = 8
N_INSTANCES = 120


def _template() -> Dataset:
    """A 32x32 CT image (CT_small's pixels subsampled, geometry kept plausible)."""
    ds = pydicom.dcmread(sample_file("CT_small.dcm"))
    pixels = ds.pixel_array[::4, ::4]
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelSpacing = [float(v) * 4 for v in ds.PixelSpacing]
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def _series(template: Dataset, n: int) -> list[Dataset]:
    study, series = generate_uid(), generate_uid()
    out = []
    for i in range(n):
        ds = copy.deepcopy(template)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = i + 1
        out.append(ds)
    return out


def _associate(port: int, calling: str) -> Association:
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    return ae.associate("127.0.0.1", port, ae_title="SRNODE",
                        contexts=[build_context(CTImageStorage, [ExplicitVRLittleEndian]),
                                  build_context(Verification)])


@pytest.mark.slow
def test_eight_associations_store_every_acknowledged_instance(tmp_path: Path) -> None:
    template = _template()
    batches = [_series(template, N_INSTANCES) for _ in range(N_ASSOCIATIONS)]
    # the idle limit (network_timeout) is not under test here: on a loaded machine the first
    # association can wait longer than the test default (20 s) while the others are set up
    cfg = node_config(tmp_path, node={"max_associations": N_ASSOCIATIONS,
                                      "network_timeout": 120.0})
    with running_node(cfg) as node:
        port = node.scp.port
        assocs = [_associate(port, f"LOAD{i}") for i in range(N_ASSOCIATIONS)]
        assert all(a.is_established for a in assocs)
        # the 9th, beyond the limit, is rejected at once (A-ASSOCIATE-RJ), not left hanging
        ninth = request_association(port, "LOAD9")
        assert ninth.rejected, ninth
        results: dict[int, list[tuple[str, int]]] = {}
        errors: list[BaseException] = []

        def run(i: int) -> None:
            acked = []
            try:
                for ds in batches[i]:
                    status = assocs[i].send_c_store(ds)
                    acked.append((str(ds.SOPInstanceUID), int(status.get("Status", -1))))
                assocs[i].release()
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
            results[i] = acked

        threads = [threading.Thread(target=run, args=(i,)) for i in range(N_ASSOCIATIONS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
        assert not errors, errors
        acknowledged = {uid for r in results.values() for uid, status in r if status == 0}
        assert len(acknowledged) == N_ASSOCIATIONS * N_INSTANCES, {
            i: [s for _u, s in r if s != 0][:5] for i, r in results.items()}
        with node.db.session() as s:
            rows = dict(s.execute(select(Instance.sop_instance_uid, Instance.path)).all())
            counts = [n for (n,) in s.execute(select(Series.num_instances)).all()]
        assert set(rows) == acknowledged  # every acknowledged instance is indexed, none lost
        assert sorted(counts) == [N_INSTANCES] * N_ASSOCIATIONS
        for uid, path in rows.items():
            assert str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID) == uid
        # the slots are free again: a new association is accepted
        again = _associate(port, "LOAD9")
        assert again.is_established
        assert int(again.send_c_echo().Status) == 0
        again.release()
    storage = Path(cfg.node.storage_dir)
    assert not [p for p in storage.rglob(".tmp-*")]
    assert len([p for p in storage.rglob("*.dcm")]) == N_ASSOCIATIONS * N_INSTANCES
