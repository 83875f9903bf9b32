"""The HTML study report (metrics/report.html), opened in headless Chromium with no network: every
plot is drawn, every image decodes, the gallery's counts add up and agree with the metrics."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from stages import report as report_stage

pytestmark = pytest.mark.e2e

CHROMIUM = Path(shutil.which("chromium") or "/usr/bin/chromium")
# Debian's Chromium as root, offline: no sandbox, and none of its background connections.
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
]
ARGS += ["--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip("no Chromium: `apt-get install chromium` (what `make browser` does as root)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield b
        b.close()


def ink(png: bytes) -> float:
    """The fraction of pixels that are not (near) white."""
    im = Image.open(io.BytesIO(png)).convert("L")
    hist = im.histogram()
    return 1 - sum(hist[240:]) / (im.width * im.height)


def test_the_page_renders_offline_with_every_plot_and_image(reproduced, browser, tmp_path):
    root = reproduced.root
    page = browser.new_page(viewport={"width": 1200, "height": 1000})
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto((root / "metrics" / "report.html").as_uri())
    page.wait_for_load_state("load")
    assert [u for u in requests if not u.startswith(("file:", "data:"))] == []  # nothing from a network
    images = page.eval_on_selector_all("img", "els => els.map(e => [e.complete, e.naturalWidth])")
    assert images and all(done and width > 0 for done, width in images)
    plots = page.locator("figure.plot")
    names = plots.evaluate_all("els => els.map(e => e.dataset.plot)")
    expected = {"study", "recall-coco", "recall-coco_val", "training-teacher", "training-distill", "probe"}
    assert expected <= set(names), names
    for i, name in enumerate(names):
        shot = plots.nth(i).locator("svg").screenshot()
        assert ink(shot) > 0.03, f"plot {name} looks blank"
    # Screenshots of the page's top and of the gallery (kept with the test's files).
    page.screenshot(path=str(tmp_path / "report-top.png"))
    page.locator("[data-gallery=coco]").scroll_into_view_if_needed()
    page.screenshot(path=str(tmp_path / "report-gallery.png"))
    assert ink((tmp_path / "report-gallery.png").read_bytes()) > 0.05


def test_the_gallery_counts_add_up_and_agree_with_the_metrics(reproduced, browser):
    root = reproduced.root
    page = browser.new_page()
    page.goto((root / "metrics" / "report.html").as_uri())
    info = json.loads((root / "metrics" / "info" / "base.json").read_text())
    figures = {m: json.loads((root / "metrics" / f"{m}.json").read_text()) for m in ("base", "student")}
    for name in ("coco", "flickr30k"):
        note = page.locator(f"[data-gallery={name}] + p")
        counts = json.loads(note.get_attribute("data-counts"))
        sample = json.loads(note.locator("[data-sample-counts]").get_attribute("data-sample-counts"))
        n = info["retrieval"][name]["captions"]
        assert sum(counts.values()) == n and sum(sample.values()) == min(200, n)
        for model, right in (
            ("student", ("both_right", "student_fixed")),
            ("base", ("both_right", "student_broke")),
        ):
            r_at_1 = figures[model]["retrieval"][name]["text_to_image"]["R@1"]
            assert round(sum(counts[g] for g in right) / n, 4) == r_at_1
    # Each example shows both models' top five; a model right on it has the true image first.
    right = {"student_fixed": (False, True), "student_broke": (True, False), "both_right": (True, True)}
    examples = page.locator(".example").all()
    assert examples
    for example in examples:
        rows = example.locator(".row").all()
        assert len(rows) == 2 and all(r.locator("img").count() == 5 for r in rows)
        first_true = tuple("true" in (r.locator("img").first.get_attribute("class") or "") for r in rows)
        group = example.get_attribute("data-group")
        if group in right:
            assert all(t for t, must in zip(first_true, right[group]) if must), group


def test_the_same_inputs_give_the_same_page(reproduced, tmp_path):
    root = reproduced.root
    metrics = tmp_path / "metrics"
    shutil.copytree(root / "metrics", metrics)
    (metrics / "report.html").unlink()
    report_stage.run(
        ["base", "student"], metrics, root / "data" / "curated", root / "metrics" / "ablations.json"
    )
    assert (metrics / "report.html").read_bytes() == (root / "metrics" / "report.html").read_bytes()
