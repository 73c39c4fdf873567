"""The web interface in a REAL headless browser: Debian's chromium (system-wide, or unpacked by
scripts/install-chromium.sh under .cache/chromium) driven by Playwright, against the API and a
gpu and a cpu worker started by `lookalike serve`'s machinery (embedded SQLite broker, SQLite
database, a tiny 16-d model). The browser creates a gallery (asking for the API key), uploads
pictures (one of them broken), searches with a file, follows "more like this", registers a
dataset, trains a tiny model and watches its progress reach 100 %, then opens the evaluation
report and checks that every plot rendered. Screenshots of each page go to test-artifacts/ui/.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.core.config import Settings
from app.local import serve_processes
from app.services.jobs.base import CPU_QUEUE, GPU_QUEUE
from tests.app.conftest import TINY_TRAINING, png, worker_settings
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts" / "ui"
API_KEY = "ui-test-key"
TIMEOUT_MS = 20_000
TRAINING = {**TINY_TRAINING, "eval_train": True}


def find_chromium() -> str | None:
    """$LOOKALIKE_CHROMIUM, Debian's /usr/bin/chromium, or the one install-chromium.sh unpacked."""
    candidates = [
        os.environ.get("LOOKALIKE_CHROMIUM", ""),
        "/usr/bin/chromium",
        str(ROOT / ".cache" / "chromium" / "bin" / "chromium"),
    ]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


CHROMIUM = find_chromium()
try:
    from playwright.sync_api import Page, expect, sync_playwright
except ImportError:  # pragma: no cover - the dev extra installs it
    sync_playwright = None

if sync_playwright is None:
    MISSING = "the playwright package is not installed (pip install -e '.[dev]')"
elif CHROMIUM is None:
    MISSING = "no chromium found: run scripts/install-chromium.sh (or set LOOKALIKE_CHROMIUM)"
else:
    MISSING = ""
needs_browser = pytest.mark.skipif(bool(MISSING), reason=MISSING or "a browser is available")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Settings]]:
    root = tmp_path_factory.mktemp("ui")
    settings = worker_settings(root, api_keys=[API_KEY], job_heartbeat_timeout_s=120.0)
    port = free_port()
    with serve_processes(
        settings, port=port, workers=False, worker_log_dir=root / "logs"
    ) as running:
        running.start_worker(GPU_QUEUE)  # train and evaluate jobs
        running.start_worker(CPU_QUEUE)  # import, index and cluster jobs
        headers = {"X-API-Key": API_KEY}
        response = httpx.post(
            f"{running.url}/api/v1/models",
            data={"name": "tiny", "path": "tiny"},
            headers=headers,
            timeout=120,
        )
        assert response.status_code == 201, response.text
        yield running.url, settings


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu"]
        )
        yield launched
        launched.close()


@pytest.fixture(scope="module", autouse=True)
def artifacts() -> Path:
    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    ARTIFACTS.mkdir(parents=True)
    return ARTIFACTS


def wait_job(url: str, job_id: int, timeout_s: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = httpx.get(
            f"{url}/api/v1/jobs/{job_id}", headers={"X-API-Key": API_KEY}, timeout=60
        ).json()
        if job["state"] in ("succeeded", "failed", "cancelled"):
            assert job["state"] == "succeeded", job
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} did not end in {timeout_s} s")


def shot(page: Page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def test_static_pages_are_served(service):
    url, _ = service
    assert httpx.get(f"{url}/", timeout=60).headers.get("location") == "/ui/"
    index = httpx.get(f"{url}/ui/", timeout=60)
    assert index.status_code == 200 and '<script type="module"' in index.text
    script = httpx.get(f"{url}/ui/static/js/app.js", timeout=60)
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    assert httpx.get(f"{url}/ui/static/../../main.py", timeout=60).status_code == 404


@needs_browser
def test_the_web_interface_end_to_end(service, browser, tmp_path):
    url, _ = service
    context = browser.new_context(viewport={"width": 1280, "height": 900}, base_url=url)
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    console_errors: list[str] = []
    page.on("pageerror", lambda error: console_errors.append(str(error)))
    # The Content-Security-Policy blocks nothing the interface needs (a violation is logged).
    page.on(
        "console",
        lambda message: (
            console_errors.append(message.text)
            if "Content Security Policy" in message.text
            else None
        ),
    )

    # ------------------------------------------------------------ galleries: create (key asked)
    page.goto("/ui/#/galleries")
    expect(page.get_by_role("heading", name="Galleries", level=1)).to_be_visible()
    expect(page.get_by_text("No gallery yet")).to_be_visible()
    shot(page, "01-galleries-empty")
    page.get_by_label("Name").fill("shapes")
    page.get_by_role("button", name="Create gallery").click()
    dialog = page.locator("#key-dialog")
    expect(dialog).to_be_visible()
    expect(page.locator("#key-reason")).to_contain_text("API key")
    page.locator("#key-input").fill(API_KEY)
    page.locator("#key-save").click()
    expect(page.get_by_role("heading", name="shapes", level=1)).to_be_visible()
    assert page.evaluate("localStorage.getItem('lookalike.apiKey')") == API_KEY

    # ------------------------------------------------------------ upload, one class per batch
    files = {}
    for class_index in range(3):
        batch = []
        for sample in range(3):
            path = tmp_path / f"class{class_index}-{sample}.png"
            path.write_bytes(png(class_index, sample))
            batch.append(path)
            files[(class_index, sample)] = path
        if class_index == 2:
            broken = tmp_path / "broken.png"
            broken.write_bytes(b"\x89PNG\r\n\x1a\n this is not really a picture")
            batch.append(broken)
        page.get_by_label("Label for these files").fill(f"class-{class_index}")
        page.locator("#upload-files").set_input_files([str(p) for p in batch])
        expect(page.locator("#upload-summary")).to_contain_text("3 added", timeout=30_000)
    rejected = page.locator("#upload-results .upload-rejected")
    expect(rejected).to_have_count(1)
    expect(rejected).to_contain_text("broken.png")
    assert len(rejected.inner_text()) > len("broken.png — rejected: ") + 10  # the API's reason
    expect(page.locator("#gallery-count")).to_have_text("9")
    expect(page.locator("#gallery-images li.card")).to_have_count(9)
    shot(page, "02-gallery-uploaded")

    # ------------------------------------------------------------ search with a file
    gallery_id = page.url.rsplit("/", 1)[-1]
    images = httpx.get(f"{url}/api/v1/galleries/{gallery_id}/images", timeout=60).json()["items"]
    by_hash = {image["content_hash"]: image["id"] for image in images}
    query = files[(1, 2)]
    expected = by_hash[hashlib.sha256(query.read_bytes()).hexdigest()]
    page.goto(f"/ui/#/search?gallery={gallery_id}")
    expect(page.get_by_role("heading", name="Search by picture")).to_be_visible()
    # The route renders once more when its gallery list arrives; focus after it has settled,
    # or the Space below lands on a file input that was just replaced.
    page.wait_for_load_state("networkidle")
    page.locator("#search-k").fill("6")
    # Keyboard only: Tab onto the drop zone's file input, Space opens the file chooser.
    page.locator("#search-k").focus()
    page.keyboard.press("Tab")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "search-file"
    with page.expect_file_chooser() as chooser:
        page.locator("#search-file").press("Space")  # the focused input, re-found if re-rendered
    chooser.value.set_files(str(query))
    first = page.locator("#results li.result").first
    expect(first).to_have_attribute("data-image-id", str(expected))
    expect(page.locator("#results li.result")).to_have_count(6)
    expect(first.locator(".score")).to_have_text("1.000")
    expect(page.locator("#predicted-label")).to_have_text("class-1")
    page.wait_for_function(
        "[...document.querySelectorAll('#results img')]"
        ".every(img => img.complete && img.naturalWidth > 0)"
    )
    shot(page, "03-search-results")

    # "more like this": the second result becomes the query (searched by id).
    second = page.locator("#results li.result").nth(1)
    second_id = second.get_attribute("data-image-id")
    second.get_by_role("button", name="More like this").click()
    expect(page.locator(".query")).to_contain_text(f"Image {second_id}")
    expect(page.locator("#results li.result").first).not_to_have_attribute(
        "data-image-id", second_id
    )
    # The label filter narrows the results to that label.
    page.locator("#search-labels").fill("class-0")
    page.get_by_role("button", name="Search again").click()
    expect(page.locator("#results .tag.label").first).to_have_text("class-0")
    labels = page.locator("#results .tag.label").all_inner_texts()
    assert labels and set(labels) == {"class-0"}
    # A query the API rejects: its reason is shown.
    page.locator("#search-file").set_input_files(str(tmp_path / "broken.png"))
    expect(page.locator("#results .error")).to_contain_text("cannot be read")

    # Phone width: the same page still works in one column.
    phone = browser.new_context(viewport={"width": 390, "height": 844}, base_url=url)
    small = phone.new_page()
    small.goto(f"/ui/#/search?gallery={gallery_id}")
    small.locator("#search-file").set_input_files(str(query))
    expect(small.locator("#results li.result").first).to_have_attribute(
        "data-image-id", str(expected)
    )
    assert small.evaluate("document.documentElement.scrollWidth") <= 390
    shot(small, "04-search-phone")
    phone.close()

    # ------------------------------------------------------------ jobs: dataset, training
    page.goto("/ui/#/jobs")
    expect(page.get_by_text("No job yet")).to_be_visible()
    page.locator("#dataset-name").fill("tiny")
    page.locator("#dataset-kind").select_option("imagefolder")
    page.locator("#dataset-path").fill("tiny")
    page.get_by_role("button", name="Register dataset").click()
    expect(page.locator("#train-form")).to_be_visible()
    # The preset list is the server's (GET /presets): every preset file, recommended first.
    offered = page.locator("#presets option").evaluate_all("options => options.map(o => o.value)")
    assert offered[:3] == ["dvml-icons", "dvml-cjk", "dvml"]
    assert {"diva-icons", "dvml-icons", "diva-cjk", "dvml-cjk"} <= set(offered)
    page.locator("#train-method").select_option("margin")
    page.locator("#train-budget").fill("4")
    page.locator("#train-budget-kind").select_option("iterations")
    page.locator("#train-name").fill("tiny-margin")
    page.locator("#train-hyperparameters").fill(json.dumps(TRAINING))
    shot(page, "05-jobs-form")
    page.get_by_role("button", name="Start training").click()
    expect(page.locator("#jobs-list tr[data-job-id]")).to_have_count(1)
    shot(page, "06-jobs-list")
    page.locator("#jobs-list tr[data-job-id] a").first.click()
    expect(page.get_by_role("heading", name="train")).to_be_visible()
    bar = page.locator("#job-body [role=progressbar]")
    expect(bar).to_have_attribute("aria-valuenow", "100", timeout=120_000)
    expect(page.locator("#job-body .badge")).to_have_text("succeeded")
    expect(page.locator("#job-log")).to_contain_text("epoch")
    shot(page, "07-job-succeeded")

    # ------------------------------------------------------------ the evaluation report
    page.locator("#report-link").click()
    expect(page.get_by_role("heading", name="Evaluation report")).to_be_visible()
    expect(page.locator("table")).to_contain_text("test (training)")
    expect(page.locator("#memorisation")).to_contain_text("Train Recall@1")
    for name in ("recall", "training", "memorisation", "tsne"):
        figure = page.locator(f"#plot-{name}")
        expect(figure).to_have_attribute("data-loaded", "true", timeout=60_000)
        width = figure.locator("img").evaluate("img => img.naturalWidth")
        assert width > 300, name
    shot(page, "08-report")
    report_url = page.url

    # ------------------------------------------------------------ models
    page.goto("/ui/#/models")
    expect(page.locator("tr[data-model-id]")).to_have_count(2)
    expect(page.get_by_role("link", name="tiny-margin")).to_be_visible()
    shot(page, "09-models")
    page.get_by_role("link", name="tiny-margin").click()
    expect(page.get_by_role("heading", name="tiny-margin")).to_be_visible()
    expect(page.get_by_text("Metrics on its card")).to_be_visible()
    shot(page, "10-model-card")
    model_url = page.url

    # ------------------------------------------------------------ phone width: one column
    page.set_viewport_size({"width": 390, "height": 844})
    phone_pages = (
        ("12-jobs-phone", "/ui/#/jobs"),
        ("13-report-phone", report_url),
        ("14-model-phone", model_url),  # the method's parameters wrap, not widen the page
    )
    for name, where in phone_pages:
        page.goto(where)
        expect(page.locator("h1")).to_be_visible()
        if "report" in name:
            expect(page.locator("#plot-tsne")).to_have_attribute("data-loaded", "true")
        assert page.evaluate("document.documentElement.scrollWidth") <= 390, name
        shot(page, name)
    page.set_viewport_size({"width": 1280, "height": 900})

    # ------------------------------------------------------------ galleries list, duplicates
    page.goto("/ui/#/galleries")
    expect(page.locator(f"tr[data-gallery-id='{gallery_id}']")).to_contain_text("9")
    shot(page, "11-galleries")
    page.locator(f"tr[data-gallery-id='{gallery_id}'] a").first.click()
    # At similarity 0.5 the tiny models group pictures; keeping one picture of the largest
    # group deletes the rest of that group, and the gallery shrinks by as many.
    page.locator("#duplicates-threshold").fill("0.5")
    page.get_by_role("button", name="Find duplicates").click()
    expect(page.locator("#duplicates-summary")).to_be_visible()
    largest = page.locator("#duplicate-groups .duplicate-group").first
    members = largest.locator("li.card").count()
    assert members >= 2
    shot(page, "15-duplicates")
    page.once("dialog", lambda d: d.accept())
    largest.locator("li.card").first.locator("button", has_text="Keep only this").click()
    expect(page.locator("#gallery-count")).to_have_text(str(9 - (members - 1)))
    count = 9 - (members - 1)

    # ------------------------------------------------------------ import an archive, a folder
    archive = tmp_path / "more.zip"
    with zipfile.ZipFile(archive, "w") as packed:
        for sample in range(2):
            packed.writestr(f"class-3/{sample}.png", png(3, sample))
    page.locator("#import-archive").set_input_files(str(archive))
    page.get_by_role("button", name="Upload and import").click()
    expect(page.locator("#import-result")).to_contain_text("2 added", timeout=60_000)
    count += 2
    expect(page.locator("#gallery-count")).to_have_text(str(count))
    page.locator("#import-folder").fill("tiny/test")
    page.get_by_role("button", name="Import folder").click()
    expect(page.locator("#import-result")).to_contain_text("20 added", timeout=60_000)
    count += 20
    expect(page.locator("#gallery-count")).to_have_text(str(count))
    page.locator("#import-folder").fill("../outside")
    page.get_by_role("button", name="Import folder").click()
    expect(page.locator("#import-status .error")).to_contain_text("dataset root")
    shot(page, "17-import")

    # ------------------------------------------------------------ clusters of the gallery
    page.locator("#cluster-k-max").fill("4")
    page.get_by_role("button", name="Find clusters").click()
    expect(page.locator("#cluster-status [data-state]")).to_have_attribute(
        "data-state", "succeeded", timeout=60_000
    )
    expect(page.locator("#clusters-summary")).to_contain_text("clusters of")
    rows = page.locator("#clusters .cluster-row")
    assert 2 <= rows.count() <= 4
    for row in rows.all():  # a row shows its cluster's most typical pictures, 8 at most
        assert 1 <= row.locator(".mini-thumb").count() <= 8
    shot(page, "16-clusters")

    # ------------------------------------------------------------ index settings, re-index
    page.locator("#index-type").select_option("hnsw")
    ef_search = page.locator("#index-param-ef_search")
    assert ef_search.get_attribute("max") == "4096"  # the server's range (GET /index-types)
    ef_search.fill("5000")
    assert not page.locator("#index-settings-form").evaluate("form => form.checkValidity()")
    ef_search.fill("128")
    page.get_by_role("button", name="Apply").click()
    expect(page.locator("#index-settings-result")).to_contain_text("hnsw")
    expect(page.locator("#gallery-index")).to_contain_text("hnsw, version 2")
    model_ids = {
        m["name"]: str(m["id"])
        for m in httpx.get(f"{url}/api/v1/models", headers={"X-API-Key": API_KEY}).json()
    }
    page.locator("#reindex-model").select_option(model_ids["tiny-margin"])
    page.get_by_role("button", name="Re-index").click()
    expect(page.locator("#reindex-status [data-state]")).to_have_attribute(
        "data-state", "succeeded", timeout=60_000
    )
    expect(page.locator("#gallery-model-link")).to_have_text("tiny-margin")
    expect(page.locator("#gallery-index")).to_contain_text("version 3")
    shot(page, "18-index-settings")
    page.once("dialog", lambda d: d.accept())
    page.get_by_role("button", name="Delete gallery").click()
    expect(page.get_by_text("No gallery yet")).to_be_visible()

    # ------------------------------------------------------------ compare two models
    page.goto("/ui/#/models")
    page.locator("#compare-link").click()
    page.locator("#compare-a").select_option(model_ids["tiny"])
    page.locator("#compare-b").select_option(model_ids["tiny-margin"])
    page.get_by_role("button", name="Compare").click()
    expect(page.locator("#compare-sources")).to_contain_text("test (training)")
    page.locator("#compare-sources button").click()  # `tiny` was never measured on it
    expect(page.locator("#toasts")).to_contain_text("Evaluation job")
    jobs = httpx.get(
        f"{url}/api/v1/jobs", params={"type": "evaluate"}, headers={"X-API-Key": API_KEY}
    ).json()["items"]
    wait_job(url, jobs[0]["id"])
    page.reload()
    expect(page.locator("#compare-sources")).to_contain_text("evaluation job")
    expect(page.locator("#compare-plot")).to_have_attribute("data-loaded", "true", timeout=30_000)
    expect(page.locator("td.better").first).to_be_visible()
    shot(page, "19-compare")

    # ------------------------------------------------------------ a pretrained timm model
    import timm
    from safetensors.torch import save_file

    weights = tmp_path / "vit.safetensors"
    save_file(timm.create_model("test_vit").state_dict(), str(weights))
    page.goto("/ui/#/models")
    page.locator("#pretrained-name").fill("vit")
    page.locator("#pretrained-backbone").fill("test_vit")
    page.locator("#pretrained-weights").set_input_files(str(weights))
    page.locator("#pretrained-size").fill("96")
    page.get_by_role("button", name="Add model").click()
    expect(page.get_by_role("heading", name="vit", level=1)).to_be_visible(timeout=60_000)
    expect(page.locator("dl.facts")).to_contain_text("file:vit.safetensors (SHA-256")
    page.goto("/ui/#/models")
    page.locator("#pretrained-name").fill("nothing")
    page.locator("#pretrained-backbone").fill("no_such_backbone")
    page.get_by_role("button", name="Add model").click()
    expect(page.locator("#pretrained-form .error")).to_contain_text("unknown backbone")

    # ------------------------------------------------------------ t-SNE views
    page.goto(report_url)
    expect(page.locator("#plot-tsne")).to_have_attribute("data-loaded", "true", timeout=60_000)
    page.locator("#tsne-classes").fill("t1, t2")
    page.locator("#tsne-thumbnails").check()
    page.get_by_role("button", name="Redraw").click()
    expect(page.locator("#plot-tsne")).to_have_attribute("data-loaded", "true", timeout=60_000)
    shot(page, "20-tsne-thumbnails")
    page.locator("#tsne-classes").fill("nope")
    page.get_by_role("button", name="Redraw").click()
    expect(page.locator("#plot-tsne")).to_have_attribute("data-loaded", "error")
    expect(page.locator("#plot-tsne .error")).to_contain_text("no class 'nope'")

    assert not console_errors, console_errors
    context.close()
