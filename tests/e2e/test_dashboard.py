"""The dashboard in a real headless Chromium against the real service (API + worker, embedded default).

Needs Debian's `chromium` and `chromium-driver` (`make browser`, scripts/install_debian.sh). A missing browser is a
failure, never a skip: CI must not pass by testing less.

Set GS_SCREENSHOT_DIR to keep the screenshots (the README's docs/img/compare.png comes from here).
"""
from __future__ import annotations

import io
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from starvation.audit import ALIGNED_COLOUR, CONFLICTING_COLOUR
from tests.conftest import ADMIN_TOKEN

SHORT_ERM = {"preset": "paper_cmnist_erm", "steps": 40, "eval_every": 10, "seeds": [0]}
SHORT_SD = {"preset": "paper_cmnist_sd", "steps": 40, "eval_every": 10, "seeds": [0], "audit": False}
# The network is off but for this machine: every other host goes to a proxy that does not answer (loopback
# is never sent to a proxy), so a page that needs a CDN shows blank here.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1400,1000", "--proxy-server=http://127.0.0.1:9"]


def find(*names: str) -> str:
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    pytest.fail(f"{' or '.join(names)} is not installed: run `make browser` (Debian's chromium and "
                "chromium-driver)")


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver_path = find("chromium", "chromium-browser"), find("chromedriver")
    profile = tempfile.mkdtemp(prefix="gs-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.set_page_load_timeout(60)
    driver.set_script_timeout(30)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def series_labels(driver, selector: str) -> set[str]:
    """The charts redraw as events arrive: read the labels again if an element went stale."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    for _ in range(20):
        try:
            return {p.get_attribute("data-label") for p in driver.find_elements(By.CSS_SELECTOR, selector)}
        except StaleElementReferenceException:
            time.sleep(0.1)
    raise AssertionError(f"{selector} kept changing")


def wait_until(condition, timeout_s: float, what: str, on_timeout=lambda: ""):
    from selenium.common.exceptions import StaleElementReferenceException

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            value = condition()
        except StaleElementReferenceException:  # the page redrew under us: look again
            value = None
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"{what} did not happen in {timeout_s}s\n{on_timeout()}")


def screenshot_is_a_picture(driver, name: str) -> None:
    """Not blank: enough spread in brightness and enough pixels that are not background."""
    from PIL import Image, ImageStat

    png = driver.get_screenshot_as_png()
    image = Image.open(io.BytesIO(png)).convert("L")
    variance = ImageStat.Stat(image).var[0]
    histogram = image.histogram()
    background = max(histogram) / sum(histogram)
    assert variance > 300 and background < 0.97, f"{name} looks blank (variance {variance:.0f})"
    folder = os.environ.get("GS_SCREENSHOT_DIR")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / f"{name}.png").write_bytes(png)


def sign_in(driver, base: str) -> None:
    from selenium.webdriver.common.by import By

    driver.get(f"{base}/dashboard/jobs")
    assert "/dashboard/login" in driver.current_url  # not signed in yet
    driver.find_element(By.ID, "token").send_keys("not-a-token")
    driver.find_element(By.ID, "login-submit").click()
    # The answer is a new page: wait for it (a loaded machine once looked before it arrived).
    error = wait_until(lambda: driver.find_elements(By.CSS_SELECTOR, ".error"), 10, "the refusal")
    assert "unknown or revoked" in error[0].text
    driver.find_element(By.ID, "token").send_keys(ADMIN_TOKEN)
    driver.find_element(By.ID, "login-submit").click()
    wait_until(lambda: driver.current_url.endswith("/dashboard/jobs"), 10, "sign-in")
    (cookie,) = [c for c in driver.get_cookies() if c["name"] == "gs_session"]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/dashboard"
    assert driver.execute_script("return document.cookie") == ""  # page scripts cannot read the token


def test_a_job_submitted_on_the_dashboard_runs_live_and_its_report_and_comparison_render(embedded_stack, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    stack, driver = embedded_stack, browser
    base = str(stack.client.base_url).rstrip("/")
    sign_in(driver, base)

    # Submit the short ERM job from the page's own form.
    driver.execute_script("document.getElementById('new-job').open = true")
    Select(driver.find_element(By.ID, "new-preset")).select_by_value(SHORT_ERM["preset"])
    for field, value in (("new-steps", SHORT_ERM["steps"]), ("new-eval-every", SHORT_ERM["eval_every"]),
                         ("new-seeds", "0")):
        element = driver.find_element(By.ID, field)
        element.clear()
        element.send_keys(str(value))
    driver.find_element(By.ID, "new-submit").click()
    wait_until(lambda: "/dashboard/jobs/" in driver.current_url, 15, "the job page to open")
    job_id = driver.current_url.rstrip("/").rsplit("/", 1)[-1]
    assert stack.client.get(f"/v1/jobs/{job_id}").json()["spec"]["steps"] == 40
    sd = stack.client.post("/v1/jobs", json={"kind": "train", "spec": SHORT_SD}).json()  # to compare with, later

    # Watch it finish on the page: status and curves arrive over the event stream.
    seen = set()

    def finished() -> bool:
        status = driver.find_element(By.ID, "job-status").get_attribute("data-status")
        seen.add(status)
        return status in ("succeeded", "failed", "cancelled")

    wait_until(finished, 150, "the job to finish on its page", stack.log)
    assert driver.find_element(By.ID, "job-status").get_attribute("data-status") == "succeeded", stack.log()
    wait_until(lambda: len(driver.find_elements(By.CSS_SELECTOR, "#chart-accuracy path.series")) >= 2, 15,
               "accuracy curves (train and test of seed 0)")
    assert series_labels(driver, "#chart-loss path.series") == {"seed 0 train", "seed 0 test"}
    assert driver.find_elements(By.CSS_SELECTOR, "#chart-starved path.series")
    assert series_labels(driver, "#chart-conflicting path.series") == {"seed 0 train"}  # colored_mnist has both
    assert series_labels(driver, "#chart-core-margin path.series") == {"seed 0 core_only"}
    # The page reloads itself once the job is terminal; the outcome table comes with that reload.
    wait_until(lambda: driver.find_elements(By.ID, "summary"), 15, "the outcome table after the reload")
    assert "test accuracy" in driver.find_element(By.ID, "summary").text
    wait_until(lambda: "succeeded after" in driver.find_element(By.ID, "job-logs").text, 15, "the job's log")
    assert "train job started" in driver.find_element(By.ID, "job-logs").text
    screenshot_is_a_picture(driver, "job")

    assert driver.find_elements(By.CSS_SELECTOR, "#files-panel a.download")  # its checkpoints, to download

    # Its reliance report, in the dashboard's frame, with the plots inline and captioned.
    driver.find_element(By.ID, "report-link").click()
    wait_until(lambda: "Reliance report" in driver.title, 15, "the report page")
    nav = {a.get_attribute("href").removeprefix(base) for a in driver.find_elements(By.CSS_SELECTOR, "header.top nav a")}
    assert {"/dashboard/jobs", "/dashboard/compare", "/dashboard/keys"} <= nav
    assert driver.find_elements(By.CSS_SELECTOR, f"#crumbs a[href='/dashboard/jobs/{job_id}']")
    assert driver.execute_script("return getComputedStyle(document.body).backgroundColor") == "rgb(246, 247, 249)"
    images = driver.find_elements(By.CSS_SELECTOR, "img")
    assert images and all(img.get_attribute("src").startswith("data:image/png") for img in images)
    assert driver.execute_script("return Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
    captions = [c.text for c in driver.find_elements(By.CSS_SELECTOR, "#report figure > img + figcaption")]
    assert len(captions) == len(images) and all(len(caption) > 80 for caption in captions)  # a sentence, not a name
    numbers = re.findall(r"\d+\.\d+", " ".join(t.text for t in driver.find_elements(By.CSS_SELECTOR, "#report table")))
    assert numbers and {len(number.split(".")[1]) for number in numbers} == {3}  # one precision throughout
    links = [a.get_attribute("href") for a in driver.find_elements(By.CSS_SELECTOR, "#downloads a.download")]
    assert any("/dashboard/checkpoints/" in link for link in links) and any("/artifacts/" in link for link in links)
    statuses = driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "Promise.all(arguments[0].map(u => fetch(u).then(r => r.status))).then(done, e => done(String(e)));", links)
    assert statuses == [200] * len(links), dict(zip(links, statuses))
    screenshot_is_a_picture(driver, "report")

    # The API's own report.html renders under its stricter policy too: inline style, data: images, no script.
    driver.execute_cdp_cmd("Network.enable", {})
    driver.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": {"Authorization": f"Bearer {ADMIN_TOKEN}"}})
    try:
        driver.get(f"{base}/v1/jobs/{job_id}/report.html")
        wait_until(lambda: "Reliance report" in driver.title, 15, "report.html")
        assert driver.find_elements(By.CSS_SELECTOR, "img")
        assert driver.execute_script("return Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
        # The page's inline <style> applied (th gets a background only from it).
        assert driver.execute_script(
            "return getComputedStyle(document.querySelector('th')).backgroundColor") == "rgb(243, 243, 243)"
    finally:
        driver.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": {}})

    # ERM against SD, side by side.
    assert stack.wait_for(sd["id"], ("succeeded", "failed"), timeout_s=120)["status"] == "succeeded"
    driver.get(f"{base}/dashboard/compare?a={job_id}&b={sd['id']}")
    table = driver.find_element(By.ID, "compare-table").text
    assert "paper_cmnist_erm" in table and "paper_cmnist_sd" in table and "test accuracy" in table
    wait_until(lambda: len(driver.find_elements(By.CSS_SELECTOR, "#chart-accuracy path.series")) == 4, 15,
               "both jobs' accuracy curves")
    # A and B in colours of their own, apart from the group plots' bias-aligned and bias-conflicting ones.
    colour_of = "return getComputedStyle(arguments[0])[arguments[1]]"
    strokes = {driver.execute_script(colour_of, path, "stroke")
               for path in driver.find_elements(By.CSS_SELECTOR, "#chart-accuracy path.series")}
    swatches = {driver.execute_script(colour_of, swatch, "backgroundColor")
                for swatch in driver.find_elements(By.CSS_SELECTOR, "#compare-legend .swatch")}
    assert len(strokes) == 2 and strokes == swatches
    assert not strokes & {rgb(ALIGNED_COLOUR), rgb(CONFLICTING_COLOUR)}
    captions = [c.text for c in driver.find_elements(By.CSS_SELECTOR, "figure.report-plot > img + figcaption")]
    assert captions and all(len(caption) > 80 for caption in captions)  # A's plots (B trained without an audit)
    screenshot_is_a_picture(driver, "compare")

    # The job list filters by status and kind.
    driver.get(f"{base}/dashboard/jobs?status=succeeded&kind=train")
    assert {job_id, sd["id"]} <= listed_jobs(driver)
    driver.get(f"{base}/dashboard/jobs?kind=audit")
    assert job_id not in listed_jobs(driver)


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_the_api_docs_render_offline_from_the_service_own_files(embedded_stack, browser, page):
    from selenium.webdriver.common.by import By

    base = str(embedded_stack.client.base_url).rstrip("/")
    browser.get(base + page)
    title = "//*[self::h1 or self::h2][contains(., 'Gradient Starvation service')]"
    wait_until(lambda: browser.find_elements(By.XPATH, title), 30, f"{page} rendered the document's title")
    wait_until(lambda: "upload_checkpoint" in browser.page_source or "Upload Checkpoint" in browser.page_source, 30,
               f"{page} listed the operations")
    # What the page needs (scripts, styles, the document) is ours; ReDoc's bundle links its own "powered by"
    # logo from its CDN, an <img> that simply stays blank offline.
    loaded = browser.execute_script(
        "return performance.getEntriesByType('resource').filter(e => e.initiatorType !== 'img').map(e => e.name)")
    assert loaded and all(url.startswith(base + "/") for url in loaded), loaded
    screenshot_is_a_picture(browser, f"api-docs{page.replace('/', '-')}")


def rgb(hex_colour: str) -> str:
    """"#1f77b4" as the browser computes it: "rgb(31, 119, 180)"."""
    red, green, blue = (int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))
    return f"rgb({red}, {green}, {blue})"


def listed_jobs(driver) -> set[str]:
    from selenium.webdriver.common.by import By

    rows = driver.find_elements(By.CSS_SELECTOR, "#jobs-table tr[data-job-id]")
    return {row.get_attribute("data-job-id") for row in rows}


def test_the_session_cookie_opens_the_dashboard_only(embedded_stack):
    base = str(embedded_stack.client.base_url)
    with httpx.Client(base_url=base, follow_redirects=False, timeout=30) as anonymous:
        assert anonymous.get("/dashboard/jobs").status_code == 303
        refused = anonymous.post("/dashboard/login", data={"token": "wrong", "next": "/dashboard/jobs"})
        assert refused.status_code == 401 and "gs_session" not in refused.cookies
        signed_in = anonymous.post("/dashboard/login", data={"token": ADMIN_TOKEN, "next": "//evil.example/x"})
        assert signed_in.status_code == 303 and signed_in.headers["location"] == "/dashboard/jobs"  # no open redirect
        set_cookie = signed_in.headers["set-cookie"].lower()
        assert "httponly" in set_cookie and "samesite=strict" in set_cookie and "path=/dashboard" in set_cookie
        cookie = {"gs_session": ADMIN_TOKEN}

        page = httpx.get(f"{base}/dashboard/jobs", cookies=cookie)
        assert page.status_code == 200 and "default-src 'none'" in page.headers["content-security-policy"]
        # The API itself takes Bearer tokens only: a cookie is no credential there.
        assert httpx.get(f"{base}/v1/jobs", cookies=cookie).status_code == 401
        # A form posted without the page's CSRF token changes nothing.
        forged = httpx.post(f"{base}/dashboard/jobs", cookies=cookie,
                            data={"preset": "paper_cmnist_erm", "steps": "5", "seeds": "0"})
        assert forged.status_code == 403
        # The event stream the pages use needs the session too.
        assert httpx.get(f"{base}/dashboard/jobs/0123456789abcdef/events").status_code == 401
        assert httpx.get(f"{base}/dashboard/jobs/0123456789abcdef/events", cookies=cookie).status_code == 404
