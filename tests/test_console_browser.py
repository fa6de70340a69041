"""The console pages in a real browser: Debian's chromium driven by Playwright.

Screenshots are written to ``$SRNODE_ARTIFACTS`` (default: ``test-artifacts/console`` at the
repository root) as test artefacts.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, sync_playwright

from storage.job_types import JobState
from tests.support.console import ConsoleSite
from tests.support.node import ROOT

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(os.environ.get("SRNODE_ARTIFACTS", ROOT / "test-artifacts" / "console"))

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="Debian's chromium is not installed (scripts/setup.sh does it)")


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as pw:
        # Debian's chromium, never a downloaded browser
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    pg = context.new_page()
    pg.set_default_timeout(30_000)
    try:
        yield pg
    finally:
        context.close()


def _shot(page: Page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 0
    return path


def _images_loaded(page: Page) -> list[dict]:
    return page.evaluate(
        """() => Array.from(document.querySelectorAll('img[data-picture]')).map(i => ({
            kind: i.dataset.picture, complete: i.complete, w: i.naturalWidth,
            h: i.naturalHeight}))""")


def test_dashboard_to_a_finished_job_with_before_and_after(console_site: ConsoleSite,
                                                           page: Page) -> None:
    done = console_site.jobs["done"]
    page.goto(console_site.url("/console/"))
    assert page.locator("h1").inner_text() == "Dashboard"
    assert page.locator("#health").inner_text() == "ok"
    done_count = page.locator('[data-count="done"]').inner_text()
    assert int(done_count) >= 2
    row = page.locator(f'tr[data-job="{done}"]')
    assert row.locator("[data-job-state]").inner_text() == "done"
    assert row.locator(".bar").count() >= 4  # stage bars
    _shot(page, "dashboard")
    row.locator(f'a[href="/console/jobs/{done}"]').click()
    page.wait_for_url(f"**/console/jobs/{done}")
    page.wait_for_function(
        "() => Array.from(document.querySelectorAll('img[data-picture]'))"
        ".every(i => i.complete && i.naturalWidth > 0)")
    sizes = {i["kind"]: (i["w"], i["h"]) for i in _images_loaded(page)}
    # the source is 32 x 32; the slice-mode x2 derived series 64 x 64
    assert sizes == {"before": (32, 32), "after": (64, 64), "difference": (64, 64)}
    assert page.locator('button[data-action="retry"]').is_disabled()
    assert page.locator(".delivery").inner_text() == "delivered"
    _shot(page, "job-done")


def test_volume_job_shows_reformats(console_site: ConsoleSite, page: Page) -> None:
    page.goto(console_site.url(f"/console/jobs/{console_site.jobs['volume']}"))
    page.wait_for_function(
        "() => Array.from(document.querySelectorAll('img[data-picture]'))"
        ".every(i => i.complete && i.naturalWidth > 0)")
    sizes = {i["kind"]: (i["w"], i["h"]) for i in _images_loaded(page)}
    assert set(sizes) == {"before", "after", "difference", "before-sagittal", "before-coronal",
                          "after-sagittal", "after-coronal"}
    assert all(w > 0 and h > 0 for w, h in sizes.values())
    # volume mode x2: same in-plane matrix, twice the slices: taller reformats
    assert sizes["after"] == sizes["before"]
    assert sizes["after-sagittal"][1] >= sizes["before-sagittal"][1]
    _shot(page, "job-volume")


def test_retry_button_requeues_a_failed_job(console_site: ConsoleSite, page: Page) -> None:
    job_id = console_site.make_job(JobState.FAILED)
    page.goto(console_site.url(f"/console/jobs/{job_id}"))
    state = page.locator("h1 [data-job-state]")
    assert state.inner_text() == "failed"
    _shot(page, "job-failed")
    page.locator('button[data-action="retry"]').click()
    page.wait_for_function(
        "() => document.querySelector('h1 [data-job-state]').textContent === 'queued'")
    assert "failed \u2192 queued" in page.locator("#action-message").inner_text()
    assert console_site.queue.get(job_id)["state"] == "queued"
    # after the reload the page reads the stored state; cancel is now offered, retry is not
    page.wait_for_load_state()
    page.goto(console_site.url(f"/console/jobs/{job_id}"))
    assert page.locator("h1 [data-job-state]").inner_text() == "queued"
    assert page.locator('button[data-action="retry"]').is_disabled()
    page.locator('button[data-action="cancel"]').click()
    page.wait_for_function(
        "() => document.querySelector('h1 [data-job-state]').textContent === 'cancelled'")
    assert console_site.queue.get(job_id)["state"] == "cancelled"
    _shot(page, "job-retried-then-cancelled")


def test_series_and_audit_pages(console_site: ConsoleSite, page: Page) -> None:
    page.goto(console_site.url("/console/series"))
    text = page.locator("table.series").inner_text()
    assert console_site.ct_series in text and console_site.derived_series in text
    assert "no rule with include_derived" in text  # the derived series' skip reason
    page.select_option("select[name=skipped]", "yes")
    page.locator("form.filters button").click()
    page.wait_for_url("**skipped=yes**")
    rows = page.locator("table.series tbody tr")
    assert rows.count() == 1 and console_site.derived_series in rows.inner_text()
    _shot(page, "series")
    page.goto(console_site.url("/console/audit"))
    page.fill("input[name=event]", "job_done")
    page.locator("form.filters button").click()
    page.wait_for_url("**event=job_done**")
    events = page.locator("table.audit tbody tr td:nth-child(2)").all_inner_texts()
    assert events and set(events) == {"job_done"}
    _shot(page, "audit")


def test_unknown_job_page_is_a_404(console_site: ConsoleSite, page: Page) -> None:
    response = page.goto(console_site.url("/console/jobs/999999"))
    assert response.status == 404
    assert "does not exist" in page.locator("p.error").inner_text()


def test_sign_in_with_the_token_shows_patient_data(console_site: ConsoleSite,
                                                   page: Page) -> None:
    from prometheus_client import CollectorRegistry

    from dicom_node.config import HttpConfig
    from dicom_node.http_server import HttpServer, build_app

    console = console_site.node.console
    server = HttpServer(HttpConfig(host="127.0.0.1", port=0, token="s3cret"),
                        build_app(console.health, CollectorRegistry(), "s3cret", console))
    server.start()
    try:
        base = f"http://127.0.0.1:{server.port}"
        page.goto(base + "/console/series")
        page.wait_for_url("**/console/login")  # no session yet
        page.fill("input[name=token]", "wrong")
        page.locator("form.login button").click()
        assert "Wrong token" in page.locator("main").inner_text()
        page.fill("input[name=token]", "s3cret")
        page.locator("form.login button").click()
        page.wait_for_url("**/console/")
        assert page.locator("h1").inner_text() == "Dashboard"
        page.goto(base + "/console/series")
        header = page.locator("table.series thead").inner_text()
        assert "Patient" in header
        assert "CompressedSamples^CT1" in page.locator("table.series").inner_text()
        _shot(page, "series-signed-in")
    finally:
        server.stop()
    # the node without a token shows no patient column
    page.goto(console_site.url("/console/series"))
    assert "Patient" not in page.locator("table.series thead").inner_text()
