"""The worker against real peers: retries, backoff, dead letter, resume, timeout, safety gate."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import pydicom
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage, Verification

from storage.jobs import JobQueue
from tests.dicom_factory import make_ct_series
from tests.support.dcmtk import StoreSCP, refusing_port, storescu
from tests.support.node import node_config, running_node


def _wait(queue: JobQueue, pred, timeout: float = 90.0) -> list[dict]:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = queue.list_jobs()
        if jobs and pred(jobs):
            return jobs
        time.sleep(0.3)
    raise AssertionError(f"condition not reached: {queue.list_jobs()}")


def _audit(cfg) -> list[dict]:  # noqa: ANN001
    return [json.loads(x) for x in Path(cfg.node.audit_log).read_text().splitlines()]


def _dest(name: str, ae: str, port: int) -> dict:
    return {"name": name, "ae_title": ae, "host": "127.0.0.1", "port": port}


def test_destination_down_then_up_is_delivered_and_others_are_served(tmp_path: Path) -> None:
    ct = make_ct_series(tmp_path / "ct", n_slices=3, rows=32)
    # bound but not listening: connections are refused until the relay listens on this socket
    held = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    held.bind(("127.0.0.1", 0))
    down_port = int(held.getsockname()[1])
    with held, StoreSCP(tmp_path / "up") as up:
        cfg = node_config(
            tmp_path,
            worker={"backoff_base_seconds": 2.0, "max_attempts": 5},
            destinations=[_dest("up", "STORESCP", up.port), _dest("later", "LATER", down_port)],
            rules=[{"name": "r", "modalities": ["CT"], "destinations": ["up", "later"]}],
        )
        with running_node(cfg, run_worker=True) as node:
            queue = JobQueue(node.db)
            rc, out = storescu("127.0.0.1", node.scp.port, ct, called_ae_title="SRNODE")
            assert rc == 0, out
            jobs = _wait(queue, lambda j: j[0]["attempts"] >= 1 and j[0]["state"] == "queued")
            assert "later" in jobs[0]["error"]
            assert len(up.files()) == len(ct)  # the working destination was served meanwhile
            with StoreSCP(tmp_path / "later", aet="LATER") as later_scp:
                # StoreSCP picks its own free port: point the destination at it via a relay
                relay = _Relay(held, later_scp.port)
                try:
                    jobs = _wait(queue, lambda j: j[0]["state"] == "done")
                finally:
                    relay.shutdown()
                assert len(later_scp.files()) == len(ct)
        assert jobs[0]["attempts"] >= 2
    sent = [e for e in _audit(cfg) if e["event"] == "series_sent"]
    up_sends = [e for e in sent if e["destination"] == "up"]
    # the first destination was not sent the series a second time on the retry
    assert sum(e["sent"] for e in up_sends) == len(ct)


class _Relay:
    """A tiny loopback TCP relay so a destination's fixed port can come up later.

    It starts listening on ``bound``, a socket the test has held bound (refusing) until now.
    """

    def __init__(self, bound: socket.socket, target: int) -> None:
        bound.listen()
        self.sock = bound
        self.target = target
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _pipe(self, a, b) -> None:  # noqa: ANN001
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.close()
                except OSError:
                    pass

    def _serve(self) -> None:
        self.sock.settimeout(0.2)
        while not self.stop.is_set():
            try:
                client, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def shutdown(self) -> None:
        self.stop.set()
        self.sock.close()


def test_dead_letter_after_max_attempts_then_retry(tmp_path: Path) -> None:
    ct = make_ct_series(tmp_path / "ct", n_slices=2, rows=16)
    with refusing_port() as nowhere:
        cfg = node_config(
            tmp_path,
            worker={"backoff_base_seconds": 0.2, "max_attempts": 2},
            destinations=[_dest("nowhere", "NOWHERE", nowhere)],
            rules=[{"name": "r", "modalities": ["CT"], "destinations": ["nowhere"]}],
        )
        with running_node(cfg, run_worker=True) as node:
            queue = JobQueue(node.db)
            rc, out = storescu("127.0.0.1", node.scp.port, ct, called_ae_title="SRNODE")
            assert rc == 0, out
            jobs = _wait(queue, lambda j: j[0]["state"] == "failed")
            assert jobs[0]["attempts"] == 2
            assert "nowhere" in jobs[0]["error"]
            # the derived series was written once and is reused by every attempt
            derived = list((Path(cfg.node.storage_dir) / "derived").rglob("*.dcm"))
            assert len(derived) == len(ct)
            queue.retry(jobs[0]["id"])
            assert queue.get(jobs[0]["id"])["state"] in ("queued", "running")


def test_partial_send_resumes_with_the_missing_instances_only(tmp_path: Path) -> None:
    ct = make_ct_series(tmp_path / "ct", n_slices=4, rows=16)
    received: list[str] = []
    requests: list[str] = []
    refuse_left = [2]
    lock = threading.Lock()

    def handle_store(event: evt.Event) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)
        with lock:
            requests.append(uid)
            if refuse_left[0] > 0:
                refuse_left[0] -= 1
                return 0xA700
            received.append(uid)
        return 0x0000

    ae = AE(ae_title="FLAKY")
    ae.add_supported_context(Verification)
    ae.add_supported_context(CTImageStorage)
    server = ae.start_server(("127.0.0.1", 0), block=False,
                             evt_handlers=[(evt.EVT_C_STORE, handle_store)])
    port = int(server.server_address[1])
    try:
        cfg = node_config(
            tmp_path, worker={"backoff_base_seconds": 0.5, "max_attempts": 4},
            destinations=[_dest("flaky", "FLAKY", port)],
            rules=[{"name": "r", "modalities": ["CT"], "destinations": ["flaky"]}],
        )
        with running_node(cfg, run_worker=True) as node:
            queue = JobQueue(node.db)
            rc, out = storescu("127.0.0.1", node.scp.port, ct, called_ae_title="SRNODE")
            assert rc == 0, out
            jobs = _wait(queue, lambda j: j[0]["state"] in ("done", "failed"))
    finally:
        server.shutdown()
    assert jobs[0]["state"] == "done", jobs
    assert jobs[0]["attempts"] == 2
    assert len(received) == len(ct) and len(set(received)) == len(ct)
    assert len(requests) == len(ct) + 2  # only the two refused instances were sent again


def test_processing_timeout_stops_a_job(tmp_path: Path) -> None:
    ct = make_ct_series(tmp_path / "ct", n_slices=2, rows=16)
    cfg = node_config(
        tmp_path,
        worker={"job_timeout_seconds": 0.2, "max_attempts": 1},
        rules=[{"name": "r", "modalities": ["CT"]}],
    )
    with running_node(cfg, run_worker=True) as node:
        queue = JobQueue(node.db)
        rc, out = storescu("127.0.0.1", node.scp.port, ct, called_ae_title="SRNODE")
        assert rc == 0, out
        jobs = _wait(queue, lambda j: j[0]["state"] == "failed")
    assert "timeout" in jobs[0]["error"]


def _through_the_gate(tmp_path: Path, safety: dict) -> tuple[list[dict], list[Path]]:
    """Run a small CT series through a node whose [safety] is ``safety``; return jobs, files."""
    ct = make_ct_series(tmp_path / "ct", n_slices=2, rows=16)
    with StoreSCP(tmp_path / "pacs") as pacs:
        cfg = node_config(
            tmp_path,
            safety=safety,
            destinations=[_dest("pacs", "STORESCP", pacs.port)],
            # the consistency bounds judge SR output (an interpolation is the reference they
            # protect): name a learned model, whatever the selection tables would pick
            rules=[{"name": "r", "modalities": ["CT"], "destinations": ["pacs"],
                    "model": "fast"}],
        )
        with running_node(cfg, run_worker=True) as node:
            queue = JobQueue(node.db)
            rc, out = storescu("127.0.0.1", node.scp.port, ct, called_ae_title="SRNODE")
            assert rc == 0, out
            jobs = _wait(queue, lambda j: j[0]["state"] in ("held", "done", "failed"))
        return jobs, pacs.files()


def test_safety_gate_holds_a_series_and_sends_nothing(tmp_path: Path) -> None:
    jobs, files = _through_the_gate(tmp_path, {"hold_min_psnr": 1000.0, "warn_min_psnr": 1000.0})
    assert jobs[0]["state"] == "held", jobs
    assert "safety gate" in jobs[0]["error"]
    assert files == []


def test_warning_gate_marks_the_description(tmp_path: Path) -> None:
    jobs, files = _through_the_gate(tmp_path, {"hold_min_psnr": 0.0, "warn_min_psnr": 1000.0})
    assert jobs[0]["state"] == "done", jobs
    descriptions = {str(pydicom.dcmread(f).SeriesDescription) for f in files}
    assert len(descriptions) == 1 and "(CHECK)" in descriptions.pop()


def test_odd_image_is_left_out_in_slice_mode_and_reported(tmp_path: Path) -> None:
    """Slice mode enhances the main stack and names the image of another matrix (issue 12)."""
    ct = make_ct_series(tmp_path / "ct", n_slices=3, rows=32)
    odd = make_ct_series(tmp_path / "odd", n_slices=1, rows=16)[0]
    ds = pydicom.dcmread(odd)
    ref = pydicom.dcmread(ct[0])
    ds.StudyInstanceUID, ds.SeriesInstanceUID = ref.StudyInstanceUID, ref.SeriesInstanceUID
    ds.FrameOfReferenceUID = ref.FrameOfReferenceUID
    ds.save_as(odd, enforce_file_format=True)
    cfg = node_config(tmp_path, rules=[{"name": "r", "modalities": ["CT"]}])
    with running_node(cfg, run_worker=True) as node:
        queue = JobQueue(node.db)
        rc, out = storescu("127.0.0.1", node.scp.port, [*ct, odd], called_ae_title="SRNODE")
        assert rc == 0, out
        jobs = _wait(queue, lambda j: j[0]["state"] in ("failed", "done"))
    assert jobs[0]["state"] == "done", jobs
    (note,) = jobs[0]["result"]["notes"]
    assert "1 image(s) not enhanced" in note and "matrix" in note
    assert jobs[0]["result"]["instances"] == 3


def test_inconsistent_series_fails_with_a_clear_error(tmp_path: Path) -> None:
    """Volume mode keeps the strict checks: a permanent failure naming the reason."""
    ct = make_ct_series(tmp_path / "ct", n_slices=3, rows=32)
    odd = make_ct_series(tmp_path / "odd", n_slices=1, rows=16)[0]
    ds = pydicom.dcmread(odd)
    ref = pydicom.dcmread(ct[0])
    ds.StudyInstanceUID, ds.SeriesInstanceUID = ref.StudyInstanceUID, ref.SeriesInstanceUID
    ds.FrameOfReferenceUID = ref.FrameOfReferenceUID
    ds.save_as(odd, enforce_file_format=True)
    cfg = node_config(tmp_path, rules=[{"name": "r", "modalities": ["CT"], "mode": "volume",
                                        "scale": 2}])
    with running_node(cfg, run_worker=True) as node:
        queue = JobQueue(node.db)
        rc, out = storescu("127.0.0.1", node.scp.port, [*ct, odd], called_ae_title="SRNODE")
        assert rc == 0, out
        jobs = _wait(queue, lambda j: j[0]["state"] in ("failed", "done"))
    assert jobs[0]["state"] == "failed"
    assert jobs[0]["attempts"] == 1  # permanent: not retried
    assert "matrix" in jobs[0]["error"].lower() or "rows" in jobs[0]["error"].lower()


def test_engine_refusal_fails_permanently_without_backoff(tmp_path: Path) -> None:
    ct = make_ct_series(tmp_path / "ct", n_slices=1, rows=32)  # volume mode needs 2 slices
    cfg = node_config(tmp_path, worker={"max_attempts": 3, "backoff_base_seconds": 1.0},
                      rules=[{"name": "r", "modalities": ["CT"], "mode": "volume", "scale": 2}])
    with running_node(cfg, run_worker=True) as node:
        queue = JobQueue(node.db)
        rc, out = storescu("127.0.0.1", node.scp.port, ct, called_ae_title="SRNODE")
        assert rc == 0, out
        jobs = _wait(queue, lambda j: j[0]["state"] in ("failed", "done"))
    assert jobs[0]["state"] == "failed" and jobs[0]["attempts"] == 1, jobs
    assert "UnsupportedRequestError" in jobs[0]["error"] and "two slices" in jobs[0]["error"]


def test_each_destination_gets_its_configured_transfer_syntax(tmp_path: Path) -> None:
    import numpy as np

    ct = make_ct_series(tmp_path / "ct", n_slices=2, rows=16)
    with StoreSCP(tmp_path / "a") as rle, StoreSCP(tmp_path / "b") as j2k, \
            StoreSCP(tmp_path / "c") as plain, StoreSCP(tmp_path / "d") as dfl, \
            StoreSCP(tmp_path / "e", accept_all=False, extra_args=("+xi",)) as imp:
        cfg = node_config(
            tmp_path,
            destinations=[{**_dest("rle", "STORESCP", rle.port), "transfer_syntax": "rle"},
                          {**_dest("j2k", "STORESCP", j2k.port),
                           "transfer_syntax": "jpeg2000-lossless"},
                          _dest("plain", "STORESCP", plain.port),
                          {**_dest("dfl", "STORESCP", dfl.port), "transfer_syntax": "deflate"},
                          {**_dest("imp", "STORESCP", imp.port), "transfer_syntax": "implicit"}],
            rules=[{"name": "r", "modalities": ["CT"],
                    "destinations": ["rle", "j2k", "plain", "dfl", "imp"]}],
        )
        with running_node(cfg, run_worker=True) as node:
            queue = JobQueue(node.db)
            rc, out = storescu("127.0.0.1", node.scp.port, ct, called_ae_title="SRNODE")
            assert rc == 0, out
            jobs = _wait(queue, lambda j: j[0]["state"] in ("done", "failed"))
        assert jobs[0]["state"] == "done", jobs
        got = {}
        for name, scp in (("rle", rle), ("j2k", j2k), ("plain", plain), ("dfl", dfl),
                          ("imp", imp)):
            files = scp.files()
            assert len(files) == len(ct)
            got[name] = {str(pydicom.dcmread(f).SOPInstanceUID): pydicom.dcmread(f) for f in files}
        assert {str(d.file_meta.TransferSyntaxUID) for d in got["rle"].values()} == {
            "1.2.840.10008.1.2.5"}
        assert {str(d.file_meta.TransferSyntaxUID) for d in got["j2k"].values()} == {
            "1.2.840.10008.1.2.4.90"}
        assert {str(d.file_meta.TransferSyntaxUID) for d in got["plain"].values()} == {
            "1.2.840.10008.1.2.1"}
        assert {str(d.file_meta.TransferSyntaxUID) for d in got["dfl"].values()} == {
            "1.2.840.10008.1.2.1.99"}
        assert {str(d.file_meta.TransferSyntaxUID) for d in got["imp"].values()} == {
            "1.2.840.10008.1.2"}
        for uid, ds in got["plain"].items():  # lossless: identical pixels, same UIDs
            for other in ("rle", "j2k", "dfl", "imp"):
                np.testing.assert_array_equal(ds.pixel_array, got[other][uid].pixel_array)


def test_safety_gate_holds_nan_and_infinite_figures() -> None:
    import math

    from dicom_node.config import SafetyConfig
    from dicom_node.pipeline import safety_gate
    from sr_engine.api import ConsistencyReport

    safety = SafetyConfig()
    for psnr, mae in ((math.nan, 1.0), (-math.inf, 1.0), (50.0, math.nan)):
        gate, reason = safety_gate(ConsistencyReport(mae, 1.0, psnr), "MR", safety)
        assert gate == "hold", (psnr, mae, reason)
    assert safety_gate(ConsistencyReport(1.0, 1.0, math.inf), "MR", safety)[0] == "send"
    # the CT mean-error bounds (HU) hold and warn; MR units are arbitrary and not bounded
    hold_mae = safety.hold_mean_abs_error + 1
    warn_mae = (safety.warn_mean_abs_error + safety.hold_mean_abs_error) / 2
    assert safety_gate(ConsistencyReport(hold_mae, 1.0, 60.0), "CT", safety)[0] == "hold"
    assert safety_gate(ConsistencyReport(warn_mae, 1.0, 60.0), "CT", safety)[0] == "warn"
    assert safety_gate(ConsistencyReport(hold_mae, 1.0, 60.0), "MR", safety)[0] == "send"
