"""The studio in a real browser: Debian's headless Chromium driven by Playwright (the Python
package, whose driver is Playwright's own), against `easel serve` with the bundled model and an
API key. It covers the key prompt, generating with Ctrl+Enter while progress and step previews
show, the queue and cancel, the gallery recalling an image's parameters, the cost page with the
job's cost, provider health and the break-even chart, and a 390 px wide phone screen.

With EASEL_STUDIO_SCREENSHOTS=DIR it also saves a screenshot of each page there (docs/ holds
the committed ones).

Run by .ci/run after `cargo build`: pytest tests/studio
"""

import json
import os
import re
import shutil
import tempfile

import pytest
from playwright.sync_api import expect, sync_playwright

from easel_process import start

KEY = "studio-secret"
SHOTS = os.environ.get("EASEL_STUDIO_SCREENSHOTS")


def shot(page, name):
    if SHOTS:
        page.screenshot(path=os.path.join(SHOTS, f"studio-{name}.png"), full_page=True)


@pytest.fixture(scope="module")
def server():
    # A closed provider with a list price, so the model picker, health table and break-even
    # have one (it is never called here).
    config = tempfile.NamedTemporaryFile("w", suffix=".json", delete=False)
    json.dump({
        "providers": [{"name": "peer", "kind": "openai-compatible", "base_url": "http://127.0.0.1:9/v1"}],
        "prices": [{"provider": "peer", "model": "easel-shapes", "unit": "image", "usd": 0.04}],
        "routing": {"tiers": {"draft": ["local:easel-shapes"]}},
    }, config)
    config.close()
    proc, base = start(["--api-key", f"team:{KEY}:100000", "--gpu-hourly-usd", "2.5", "--config", config.name], model=None)
    yield base
    proc.kill()
    proc.wait()


@pytest.fixture(scope="module")
def browser():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "the studio tests need Debian's chromium (apt-get install chromium)"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-dev-shm-usage"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def page(browser, server):
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    page.set_default_timeout(60_000)
    page.goto(server + "/")
    yield page
    page.close()


def test_the_key_prompt_appears_then_the_key_is_kept_in_the_browser(page, server):
    expect(page.locator("#error")).to_be_visible()
    expect(page.locator("#error")).to_contain_text("API key")
    page.fill("#api-key", KEY)
    page.press("#api-key", "Tab")
    expect(page.locator("#model option").first).to_have_text("easel-shapes — local")
    options = page.locator("#model option").all_inner_texts()
    assert "peer:easel-shapes — closed, $0.040/image" in options and "tier draft — routed" in options, options
    assert page.evaluate("localStorage.getItem('easel-api-key')") == KEY
    assert KEY not in page.url
    assert page.locator("#advanced").get_attribute("open") is None, "advanced options start collapsed"


def test_ctrl_enter_generates_with_progress_previews_and_the_image(page):
    page.click('nav button[data-tab="generate"]')
    page.fill("#prompt", "a red circle on a blue background")
    shot(page, "generate")
    page.press("#prompt", "Control+Enter")
    expect(page.locator("#preview")).to_have_attribute("src", re.compile(r"^data:image/png;base64,"))
    final = page.locator("#result img.final")
    expect(final).to_have_count(1)
    page.wait_for_function("() => { const i = document.querySelector('#result img.final'); return i && i.complete && i.naturalWidth > 0; }")
    expect(page.locator("#status")).to_contain_text("done: seed")
    shot(page, "result")


def test_cancel_stops_a_running_job_from_the_queue(page):
    page.click('nav button[data-tab="generate"]')
    page.click("#advanced summary")
    page.fill("#steps", "1000")
    page.fill("#prompt", "a slow green square")
    page.click("#go")
    expect(page.locator("#status")).to_contain_text("step")
    page.click('nav button[data-tab="queue"]')
    row = page.locator("#queue tr").first
    expect(row).to_contain_text("running")
    expect(row).to_contain_text("a slow green square")
    shot(page, "queue")
    row.locator(".cancel-job").click()
    expect(page.locator("#queue tr")).to_have_count(0)
    page.click('nav button[data-tab="generate"]')
    expect(page.locator("#status")).to_have_text("canceled")
    page.fill("#steps", "")


def test_the_gallery_lists_the_image_and_recalls_its_parameters(page):
    page.click('nav button[data-tab="gallery"]')
    thumb = page.locator('#grid img[alt="a red circle on a blue background"]').first
    expect(thumb).to_be_visible()
    shot(page, "gallery")
    # Keyboard: the thumbnail takes focus and Enter opens it.
    thumb.focus()
    page.keyboard.press("Enter")
    expect(page.locator("#detail")).to_be_visible()
    expect(page.locator("#detail-params")).to_contain_text('"prompt": "a red circle on a blue background"')
    href = page.locator("#download").get_attribute("href")
    assert "/v1/images/" in href and "sig=" in href
    head = page.evaluate("async (u) => Array.from(new Uint8Array(await (await fetch(u)).arrayBuffer()).slice(0, 8))", href)
    assert bytes(head) == b"\x89PNG\r\n\x1a\n"
    shot(page, "detail")
    page.click("#use-params")
    expect(page.locator("#tab-generate")).to_be_visible()
    expect(page.locator("#prompt")).to_have_value("a red circle on a blue background")
    assert not page.locator("#random-seed").is_checked(), "the image's seed is fixed"


def test_the_cost_page_shows_the_jobs_cost_provider_health_and_break_even(page):
    page.click('nav button[data-tab="cost"]')
    expect(page.locator("#usage")).to_contain_text("local")
    expect(page.locator("#usage")).to_contain_text("easel-shapes")
    expect(page.locator("#local-per-image")).to_have_text(re.compile(r"^\$0\.\d+"))
    expect(page.locator("#closed-per-image")).to_have_text("$0.040")
    expect(page.locator("#health")).to_contain_text("peer")
    expect(page.locator("#health")).to_contain_text("closed")
    expect(page.locator('#chart path[data-series="local"]')).to_have_count(1)
    expect(page.locator("#breakeven")).to_contain_text("breaks even above")
    shot(page, "cost")


def test_a_390_px_screen_fits_and_every_control_is_labelled_and_reachable_by_keyboard(browser, server):
    page = browser.new_page(viewport={"width": 390, "height": 844})
    page.goto(server + "/")
    page.fill("#api-key", KEY)
    page.press("#api-key", "Tab")
    expect(page.locator("#model option").first).to_have_text("easel-shapes — local")
    assert page.evaluate("document.documentElement.scrollWidth") <= 390, "no sideways scrolling"
    unlabelled = page.evaluate("""() => [...document.querySelectorAll('input, select, textarea')]
        .filter(e => !e.closest('label') && !e.getAttribute('aria-label') && !e.placeholder).map(e => e.id)""")
    assert unlabelled == [], unlabelled
    # From the prompt, Tab reaches the Generate button.
    page.focus("#prompt")
    for _ in range(12):
        if page.evaluate("document.activeElement.id") == "go":
            break
        page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "go"
    shot(page, "phone")
    for name in ["queue", "gallery", "cost"]:
        page.click(f'nav button[data-tab="{name}"]')
        page.wait_for_timeout(300)
        assert page.evaluate("document.documentElement.scrollWidth") <= 390, f"{name} fits 390 px"
    page.close()
