"""The REST API under /api/ on a node with real finished jobs (tests/support/console.py)."""

from __future__ import annotations

import json
import struct
import subprocess
from pathlib import Path

import pytest
import requests
from openapi_spec_validator import validate

from dicom_node.config import HttpConfig
from dicom_node.console.pictures import png_bytes
from storage.job_types import JobState
from tests.support.console import ConsoleSite
from tests.support.node import ROOT, srnode_executable, write_toml

TIMEOUT = 60
#: The patient name in pydicom's CT_small.dcm, which the test CT series is made from.
PATIENT = "CompressedSamples^CT1"


def _get(site: ConsoleSite, path: str, **kw: object) -> requests.Response:
    return requests.get(site.url(path), timeout=TIMEOUT, **kw)  # type: ignore[arg-type]


def _post(site: ConsoleSite, path: str) -> requests.Response:
    return requests.post(site.url(path), timeout=TIMEOUT)


def _error(r: requests.Response, status: int) -> str:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error", "detail"} and body["detail"], body
    return body["detail"]


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_openapi_document_validates_and_lists_every_endpoint(console_site: ConsoleSite) -> None:
    r = _get(console_site, "/api/openapi.json")
    assert r.status_code == 200
    doc = r.json()
    validate(doc)
    paths = set(doc["paths"])
    assert {"/api/jobs", "/api/jobs/{job_id}", "/api/jobs/{job_id}/retry",
            "/api/jobs/{job_id}/cancel", "/api/series", "/api/status", "/api/rules/test",
            "/api/audit", "/api/jobs/{job_id}/pictures/{kind}.png"} <= paths
    assert not any(p.startswith("/console") for p in paths)  # pages are not API


def test_jobs_list_has_the_cli_fields_filters_and_pages(console_site: ConsoleSite,
                                                         tmp_path: Path) -> None:
    r = _get(console_site, "/api/jobs")
    assert r.status_code == 200
    body = r.json()
    ids = [j["id"] for j in body["jobs"]]
    assert set(console_site.jobs.values()) <= set(ids)
    assert ids == sorted(ids, reverse=True)
    assert body["total"] >= 3 and body["offset"] == 0
    # the same fields as `srnode jobs --json` (one projection: JobQueue.list_jobs)
    cfg = write_toml({"node": {"database_url": console_site.config.node.database_url,
                               "storage_dir": console_site.config.node.storage_dir}},
                     tmp_path / "c.toml")
    cli = subprocess.run([srnode_executable(), "jobs", "--json", "--config", str(cfg)],
                         capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert cli.returncode == 0, cli.stderr
    cli_jobs = {j["id"]: j for j in json.loads(cli.stdout)}
    for job in body["jobs"]:
        assert set(job) == set(cli_jobs[job["id"]]), job["id"]
        assert job["state"] == cli_jobs[job["id"]]["state"]
    done = _get(console_site, "/api/jobs", params={"state": "done"}).json()
    assert {j["state"] for j in done["jobs"]} == {"done"}
    assert {console_site.jobs["done"], console_site.jobs["volume"]} <= {j["id"] for j in
                                                                         done["jobs"]}
    both = _get(console_site, "/api/jobs", params=[("state", "done"), ("state", "failed")])
    assert {j["state"] for j in both.json()["jobs"]} <= {"done", "failed"}
    page1 = _get(console_site, "/api/jobs", params={"limit": 1}).json()
    page2 = _get(console_site, "/api/jobs", params={"limit": 1, "offset": 1}).json()
    assert len(page1["jobs"]) == 1 and len(page2["jobs"]) == 1
    assert page1["jobs"][0]["id"] > page2["jobs"][0]["id"]
    assert page1["total"] == body["total"]


@pytest.mark.parametrize("params,needle", [
    ({"state": "finished"}, "unknown job state"),
    ({"limit": 0}, "limit"),
    ({"limit": 501}, "limit"),
    ({"offset": -1}, "offset"),
    ({"limit": "ten"}, "limit"),
])
def test_jobs_list_bad_input_is_a_400(console_site: ConsoleSite, params: dict,
                                      needle: str) -> None:
    assert needle in _error(_get(console_site, "/api/jobs", params=params), 400)


def test_finished_job_detail_has_stages_safety_destinations(console_site: ConsoleSite) -> None:
    job = _get(console_site, f"/api/jobs/{console_site.jobs['done']}").json()
    assert job["state"] == "done" and job["series_instance_uid"] == console_site.ct_series
    names = [s["name"] for s in job["stages"]]
    assert {"loading", "enhancing", "sending"} <= set(names), names
    assert all(s["seconds"] >= 0 for s in job["stages"])
    assert abs(sum(s["fraction"] for s in job["stages"]) - 1.0) < 1e-6
    assert job["safety"]["gate"] == "send"
    assert job["safety"]["consistency"]["psnr"] > 0
    [dest] = job["destinations"]
    assert dest["name"] == "pacs" and dest["ae_title"] == "PACS"
    assert dest["state"] == "delivered" and dest["sent"] == dest["expected"] == 2
    assert job["errors"] == [] and job["actions"] == {"retry": False, "cancel": False}
    assert set(job["pictures"]) == {"before", "after", "difference"}
    volume = _get(console_site, f"/api/jobs/{console_site.jobs['volume']}").json()
    assert set(volume["pictures"]) == {"before", "after", "difference", "before-sagittal",
                                       "before-coronal", "after-sagittal", "after-coronal"}


def test_failed_job_detail_names_the_destination_error(console_site: ConsoleSite) -> None:
    job = _get(console_site, f"/api/jobs/{console_site.jobs['failed']}").json()
    assert job["state"] == "failed"
    [dest] = job["destinations"]
    assert dest["name"] == "down" and dest["state"] == "not sent" and dest["error"]
    assert job["errors"] and "send failed" in job["errors"][-1]["error"]
    assert job["actions"]["retry"] is True


@pytest.mark.parametrize("path,status", [
    ("/api/jobs/999999", 404), ("/api/jobs/abc", 400), ("/api/jobs/0", 400),
    ("/api/jobs/999999/pictures/before.png", 404),
])
def test_unknown_or_malformed_job_id(console_site: ConsoleSite, path: str, status: int) -> None:
    _error(_get(console_site, path), status)


def test_pictures_are_pngs_of_the_right_size(console_site: ConsoleSite) -> None:
    job = _get(console_site, f"/api/jobs/{console_site.jobs['done']}").json()
    before = _get(console_site, job["pictures"]["before"])
    after = _get(console_site, job["pictures"]["after"])
    diff = _get(console_site, job["pictures"]["difference"])
    for r in (before, after, diff):
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    # the source has 32 columns; slice mode x2 makes 64
    assert _png_size(before.content) == (32, 32)
    assert _png_size(after.content) == (64, 64)
    assert _png_size(diff.content) == (64, 64)
    again = _get(console_site, job["pictures"]["before"])
    assert again.content == before.content  # cached
    vol = _get(console_site, f"/api/jobs/{console_site.jobs['volume']}").json()
    sag = _get(console_site, vol["pictures"]["after-sagittal"])
    assert sag.status_code == 200 and _png_size(sag.content)[0] == 32  # rows across
    assert "unknown picture" in _error(
        _get(console_site, f"/api/jobs/{console_site.jobs['done']}/pictures/x.png"), 400)
    # the send failed but the derived series was made: it is shown
    failed = console_site.jobs["failed"]
    assert _get(console_site, f"/api/jobs/{failed}/pictures/after.png").status_code == 200
    # a job that never derived anything has no after picture; no reformats outside volume mode
    never = console_site.make_job(JobState.FAILED)
    assert _get(console_site, f"/api/jobs/{never}").json()["pictures"] == {
        "before": f"/api/jobs/{never}/pictures/before.png"}
    _error(_get(console_site, f"/api/jobs/{never}/pictures/after.png"), 404)
    _error(_get(console_site, f"/api/jobs/{console_site.jobs['done']}/pictures/"
                              "before-sagittal.png"), 404)


def test_png_encoder_round_trips() -> None:
    import zlib

    import numpy as np

    img = (np.arange(12, dtype=np.uint8) * 20).reshape(3, 4)
    data = png_bytes(img)
    assert _png_size(data) == (4, 3)
    idat = data[data.index(b"IDAT") + 4:data.index(b"IEND") - 8]
    raw = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(3, 5)
    assert (raw[:, 0] == 0).all() and (raw[:, 1:] == img).all()


def test_retry_requeues_a_failed_job_and_refuses_other_states(console_site: ConsoleSite) -> None:
    job_id = console_site.make_job(JobState.FAILED)
    r = _post(console_site, f"/api/jobs/{job_id}/retry")
    assert r.status_code == 200, r.text
    assert r.json() == {"id": job_id, "previous_state": "failed", "state": "queued"}
    assert console_site.queue.get(job_id)["state"] == "queued"
    # the error that made it fail stays on the job page, once
    errors = _get(console_site, f"/api/jobs/{job_id}").json()["errors"]
    assert [e["error"] for e in errors] == ["send failed: down: test failure"]
    # now queued: a second retry is a conflict and changes nothing
    before = console_site.queue.get(job_id)
    assert "only failed or held" in _error(_post(console_site, f"/api/jobs/{job_id}/retry"), 409)
    assert console_site.queue.get(job_id) == before
    done = console_site.jobs["done"]
    _error(_post(console_site, f"/api/jobs/{done}/retry"), 409)
    assert console_site.queue.get(done)["state"] == "done"
    _error(_post(console_site, "/api/jobs/999999/retry"), 404)
    _error(_post(console_site, "/api/jobs/x/retry"), 400)
    assert _get(console_site, f"/api/jobs/{job_id}/retry").status_code == 405
    audit = _get(console_site, "/api/audit", params={"event": "job_retried",
                                                      "job_id": job_id}).json()["entries"]
    assert len(audit) == 1 and audit[0]["previous_state"] == "failed"
    console_site.queue.cancel(job_id)  # leave nothing runnable behind


def test_cancel_queued_held_and_running_jobs(console_site: ConsoleSite) -> None:
    queued = console_site.make_job(JobState.QUEUED)
    r = _post(console_site, f"/api/jobs/{queued}/cancel")
    assert r.status_code == 200 and r.json()["state"] == "cancelled"
    assert r.json()["previous_state"] == "queued"
    held = console_site.make_job(JobState.HELD)
    assert _post(console_site, f"/api/jobs/{held}/cancel").json()["state"] == "cancelled"
    errors = _get(console_site, f"/api/jobs/{held}").json()["errors"]
    assert [e["error"] for e in errors] == ["held by the safety gate: test"]  # listed once
    running = console_site.make_job(JobState.RUNNING)
    r = _post(console_site, f"/api/jobs/{running}/cancel")
    assert r.status_code == 200 and r.json()["previous_state"] == "running"
    # the worker that held it loses its lease: its next heartbeat tells it to stop the child
    assert console_site.queue.heartbeat(running, "test-worker", 30.0) is False
    info = console_site.queue.get(running)
    assert info["state"] == "cancelled" and info["worker_id"] is None
    # final: cancelling again, or cancelling a done or failed job, is a conflict
    before = console_site.queue.get(queued)
    assert "only queued, held or running" in _error(
        _post(console_site, f"/api/jobs/{queued}/cancel"), 409)
    assert console_site.queue.get(queued) == before
    _error(_post(console_site, f"/api/jobs/{console_site.jobs['done']}/cancel"), 409)
    _error(_post(console_site, f"/api/jobs/{console_site.jobs['failed']}/cancel"), 409)
    assert console_site.queue.get(console_site.jobs["failed"])["state"] == "failed"
    _error(_post(console_site, "/api/jobs/999999/cancel"), 404)


def test_series_list_with_counts_skip_reasons_and_job_links(console_site: ConsoleSite) -> None:
    body = _get(console_site, "/api/series").json()
    by_uid = {s["series_instance_uid"]: s for s in body["series"]}
    ct = by_uid[console_site.ct_series]
    assert ct["instances"] == ct["stored_files"] == 2 and ct["modality"] == "CT"
    assert ct["skip_reason"] is None
    assert {console_site.jobs["done"], console_site.jobs["failed"]} <= {j["id"] for j in
                                                                         ct["jobs"]}
    assert all(j["url"] == f"/api/jobs/{j['id']}" for j in ct["jobs"])
    assert ct["patient"] is None  # no token configured: no patient data
    derived = by_uid[console_site.derived_series]
    assert derived["is_derived"] and "derived" in derived["skip_reason"].lower()
    skipped = _get(console_site, "/api/series", params={"skipped": "true"}).json()
    assert [s["series_instance_uid"] for s in skipped["series"]] == [console_site.derived_series]
    assert _get(console_site, "/api/series", params={"limit": 1}).json()["total"] == 3
    _error(_get(console_site, "/api/series", params={"limit": "x"}), 400)
    _error(_get(console_site, "/api/series", params={"skipped": "maybe"}), 400)


def test_status_is_what_srnode_status_json_shows(console_site: ConsoleSite,
                                                  tmp_path: Path) -> None:
    body = _get(console_site, "/api/status").json()
    node = console_site.config.node
    cfg = write_toml({"node": {"database_url": node.database_url, "ae_title": node.ae_title,
                               "port": console_site.node.scp.port,
                               "storage_dir": node.storage_dir}}, tmp_path / "c.toml")
    cli = subprocess.run([srnode_executable(), "status", "--json", "--config", str(cfg)],
                         capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert cli.returncode == 0, cli.stdout + cli.stderr
    shown = json.loads(cli.stdout)
    assert set(shown) == set(body)  # one report: dicom_node.status.node_report
    assert set(shown["health"]["checks"]) == set(body["health"]["checks"])
    assert shown["jobs"] == body["jobs"] and shown["series"] == body["series"]
    assert body["series"] == 3 and body["instances"] == 2 + 4 + 2
    assert body["jobs"]["done"] >= 2 and set(body["jobs"]) == {str(s) for s in JobState}
    assert body["health"]["status"] == "ok"
    assert body["rules"] == ["ct-slice", "ct-down", "mr-volume"]
    assert any(f["id"] == console_site.jobs["failed"] for f in body["recent_failures"])


def test_rule_test_explains_matches_and_refusals(console_site: ConsoleSite) -> None:
    body = _get(console_site, "/api/rules/test", params={"series": console_site.ct_series}).json()
    assert body["matching_rules"] == ["ct-slice", "ct-down"] and body["rule"] == "ct-slice"
    mr_rule = next(r for r in body["rules"] if r["name"] == "mr-volume")
    assert not mr_rule["matches"] and "modality CT is not one of MR" in mr_rule["reasons"]
    derived = _get(console_site, "/api/rules/test",
                   params={"series": console_site.derived_series}).json()
    assert derived["matching_rules"] == [] and derived["rule"] is None
    assert any("DERIVED" in why for r in derived["rules"] for why in r["reasons"])
    assert "not a DICOM UID" in _error(
        _get(console_site, "/api/rules/test", params={"series": "1.2.abc"}), 400)
    _error(_get(console_site, "/api/rules/test", params={"series": "1.02.3"}), 400)
    _error(_get(console_site, "/api/rules/test"), 400)
    assert "not received" in _error(
        _get(console_site, "/api/rules/test", params={"series": "1.2.3.4.5"}), 404)


def test_audit_filters(console_site: ConsoleSite) -> None:
    everything = _get(console_site, "/api/audit").json()["entries"]
    assert any(e["event"] == "job_done" for e in everything)
    times = [e["time"] for e in everything]
    assert times == sorted(times, reverse=True)
    done = _get(console_site, "/api/audit", params={"event": "job_done"}).json()["entries"]
    assert done and {e["event"] for e in done} == {"job_done"}
    one = _get(console_site, "/api/audit",
               params={"job_id": console_site.jobs["done"]}).json()["entries"]
    assert one and {e["job_id"] for e in one} == {console_site.jobs["done"]}
    text = _get(console_site, "/api/audit", params={"q": console_site.mr_series}).json()
    assert text["entries"] and all(console_site.mr_series in json.dumps(e)
                                   for e in text["entries"])
    _error(_get(console_site, "/api/audit", params={"job_id": "x"}), 400)


def test_token_protects_the_api_and_unlocks_patient_data(console_site: ConsoleSite) -> None:
    from dicom_node.http_server import HttpServer, build_app

    node = console_site.node
    app = build_app(lambda: node.console.health(), node_registry(), "t0ken", node.console)
    server = HttpServer(HttpConfig(host="127.0.0.1", port=0, token="t0ken"), app)
    server.start()
    try:
        base = f"http://127.0.0.1:{server.port}"
        r = requests.get(base + "/api/series", timeout=TIMEOUT)
        assert r.status_code == 401 and r.json()["error"] == "unauthorized"
        r = requests.post(base + f"/api/jobs/{console_site.jobs['failed']}/retry",
                          timeout=TIMEOUT)
        assert r.status_code == 401
        assert console_site.queue.get(console_site.jobs["failed"])["state"] == "failed"
        page = requests.get(base + "/console/", timeout=TIMEOUT, allow_redirects=False)
        assert page.status_code == 303 and page.headers["location"] == "/console/login"
        good = {"Authorization": "Bearer t0ken"}
        series = requests.get(base + "/api/series", headers=good, timeout=TIMEOUT).json()
        ct = next(s for s in series["series"]
                  if s["series_instance_uid"] == console_site.ct_series)
        assert ct["patient"] is not None and ct["patient"]["id"]
        # a browser signs in once and carries a cookie that is not the token
        s = requests.Session()
        assert s.post(base + "/console/login", data={"token": "nope"},
                      timeout=TIMEOUT).status_code == 401
        r = s.post(base + "/console/login", data={"token": "t0ken"}, timeout=TIMEOUT)
        assert r.status_code == 200 and r.url.endswith("/console/")
        assert "t0ken" not in "".join(c.value or "" for c in s.cookies)
        assert s.get(base + "/api/status", timeout=TIMEOUT).status_code == 200
        # the pages show patient name and ID to this signed-in browser ...
        done = console_site.jobs["done"]
        for path in ("/console/series", f"/console/jobs/{done}"):
            assert PATIENT in s.get(base + path, timeout=TIMEOUT).text, path
    finally:
        server.stop()
    # ... and never without a token (the console_site node has none), nor in a log
    for path in ("/console/", "/console/series", f"/console/jobs/{done}", "/console/audit",
                 "/api/series", f"/api/jobs/{done}", "/api/jobs", "/api/status",
                 f"/api/rules/test?series={console_site.ct_series}", "/api/audit"):
        r = _get(console_site, path)
        assert r.status_code == 200 and PATIENT not in r.text and "1CT1" not in r.text, path
    node = console_site.config.node
    for text in (Path(node.log_file).read_text(), Path(node.audit_log).read_text()):
        assert "CompressedSamples" not in text


def node_registry():  # noqa: ANN201 - a prometheus CollectorRegistry
    from prometheus_client import CollectorRegistry

    return CollectorRegistry()


def test_cancel_stops_a_running_job_of_the_real_worker(tmp_path: Path) -> None:
    """The job hangs in sending (the destination blocks); cancel ends it and its child process."""
    import multiprocessing
    import signal
    import time

    from storage.jobs import JobQueue
    from tests.dicom_factory import make_ct_series
    from tests.support.dcmtk import StoreSCP, storescu
    from tests.support.node import node_config, running_node

    ct = make_ct_series(tmp_path / "ct", n_slices=2, rows=16)
    # storescp runs `sleep 30` in the foreground after the first instance: the send hangs
    with StoreSCP(tmp_path / "slow", aet="SLOW", extra_args=("-xcr", "sleep 30", "-xs")) as slow:
        cfg = node_config(
            tmp_path / "node", worker={"max_attempts": 1},
            rules=[{"name": "r", "modalities": ["CT"], "mode": "slice", "scale": 2,
                    "model": "fast", "destinations": ["slow"]}],
            destinations=[{"name": "slow", "ae_title": "SLOW", "host": "127.0.0.1",
                           "port": slow.port}])
        with running_node(cfg, run_worker=True) as node:
            queue = JobQueue(node.db)
            rc, out = storescu("127.0.0.1", node.scp.port, ct, called_ae_title="SRNODE")
            assert rc == 0, out

            def wait(check: object, what: str) -> None:
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline:
                    if check():  # type: ignore[operator]
                        return
                    time.sleep(0.2)
                pytest.fail(f"{what}: {queue.list_jobs()}")

            wait(lambda: [j["stage"] for j in queue.list_jobs()] == ["sending"], "not sending")
            [job] = queue.list_jobs()
            children = [p for p in multiprocessing.active_children()
                        if p.name == f"srnode-job-{job['id']}"]
            assert len(children) == 1  # the job's child process is sending
            r = requests.post(f"http://127.0.0.1:{node.http.port}/api/jobs/{job['id']}/cancel",
                              timeout=TIMEOUT)
            assert r.status_code == 200, r.text
            assert r.json() == {"id": job["id"], "previous_state": "running",
                                "state": "cancelled"}
            # the worker notices at its next heartbeat and stops the child process
            wait(lambda: not children[0].is_alive(), "child still alive")
            assert children[0].exitcode == -signal.SIGKILL  # stopped, not finished by itself
            info = queue.get(job["id"])
            assert info["state"] == "cancelled" and info["worker_id"] is None
            assert info["history"][-1]["note"] == "cancelled by the operator"


def test_requests_a_foreign_web_page_makes_are_refused(console_site: ConsoleSite) -> None:
    """Without a token: only loopback Host names; no state change from another origin."""
    failed = console_site.make_job(JobState.FAILED)
    url = console_site.url(f"/api/jobs/{failed}/retry")
    for headers in ({"Origin": "http://evil.example"},
                    {"Sec-Fetch-Site": "cross-site"},
                    {"Host": "evil.example"}):
        r = requests.post(url, headers=headers, timeout=TIMEOUT)
        assert r.status_code == 403, (headers, r.text)
        assert r.json()["error"] == "forbidden"
        assert console_site.queue.get(failed)["state"] == "failed"
    # a DNS-rebinding page cannot read either
    r = requests.get(console_site.url("/api/series"), headers={"Host": "evil.example:80"},
                     timeout=TIMEOUT)
    assert r.status_code == 403
    # the console's own page (same origin) and a client without Origin (curl) may
    own = {"Origin": console_site.base, "Sec-Fetch-Site": "same-origin"}
    assert requests.post(url, headers=own, timeout=TIMEOUT).json()["state"] == "queued"
    assert requests.get(console_site.url("/api/jobs"), headers={"Host": "localhost"},
                        timeout=TIMEOUT).status_code == 200
    console_site.queue.cancel(failed)


def test_srnode_cancel_is_the_same_action(console_site: ConsoleSite, tmp_path: Path) -> None:
    node = console_site.config.node
    cfg = write_toml({"node": {"database_url": node.database_url,
                               "storage_dir": node.storage_dir}}, tmp_path / "c.toml")
    job_id = console_site.make_job(JobState.QUEUED)

    def cancel() -> subprocess.CompletedProcess[str]:
        return subprocess.run([srnode_executable(), "cancel", str(job_id), "--config", str(cfg)],
                              capture_output=True, text=True, timeout=120,
                              env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})

    first = cancel()
    assert first.returncode == 0 and "was queued" in first.stdout, first.stderr
    assert console_site.queue.get(job_id)["state"] == "cancelled"
    again = cancel()
    assert again.returncode == 2 and "only queued, held or running" in again.stderr
