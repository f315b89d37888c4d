"""The Dagster UI in a real browser (Debian's Chromium driven by Playwright): materialize a region partition."""

import json
import os
import re
import sys
import urllib.request
from pathlib import Path

import pytest

from geojepa_pipeline.cli import main

from .services import Service, free_port

pytestmark = pytest.mark.e2e
CHROMIUM = Path("/usr/bin/chromium")
# Chromium on a machine without internet: no background traffic, no sandbox as root (FACTS.md)
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


def require_chromium():
    if not CHROMIUM.exists():
        if os.environ.get("GEOJEPA_REQUIRE_E2E"):
            pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium (.ci/run does this)")
        pytest.skip(f"{CHROMIUM} is missing: apt-get install -y chromium, or run .ci/run")


def test_materialize_tile_shards_partition_from_the_asset_graph(home, tmp_path):
    require_chromium()
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import expect, sync_playwright

    assert main(["regions", "add", "t", "--osm", "pyrosm:test", "--imagery", "none"]) == 0
    assert main(["materialize", "--region", "t", "--select", "key:osm_extract"]) == 0
    port = free_port()
    ui = Service("ui", [str(Path(sys.executable).parent / "geojepa"), "ui", "--port", str(port)], tmp_path,
                 {**os.environ, "GEOJEPA_HOME": str(home)})
    base = f"http://127.0.0.1:{port}"
    shot = tmp_path / "ui-success.png"
    try:
        ui.wait_http(f"{base}/server_info")
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            # "Join the Dagster community" covers a new instance's pages: dismiss it whenever it shows
            page.add_locator_handler(page.get_by_role("button", name="Skip"), lambda skip: skip.click())
            try:
                expect.set_options(timeout=30_000)  # a loaded 2-core machine renders slowly
                page.goto(f"{base}/asset-groups")  # the asset graph
                try:  # the dialog comes a moment after the page; take it out of the way first
                    page.get_by_role("button", name="Skip").click(timeout=10_000)
                except PlaywrightTimeout:
                    pass
                page.locator("div.CodeMirror").first.click()  # its asset filter
                page.keyboard.type("key:tile_shards")
                page.keyboard.press("Enter")
                expect(page.get_by_text("1 partition")).to_be_visible(timeout=60_000)
                page.get_by_role("button", name=re.compile("Materialize")).first.click()
                dialog = page.get_by_role("dialog").filter(has_text="Launch runs to materialize tile_shards")
                expect(dialog).to_be_visible()
                dialog.get_by_text("Select a partition or create one").click()
                page.get_by_placeholder("Filter partitions").fill("t")
                page.get_by_text("t", exact=True).filter(visible=True).first.click()  # the demo region's partition
                dialog.get_by_text("Launch runs to materialize tile_shards").click()  # close the picker
                dialog.get_by_role("button", name="Launch 1 run").click()
                page.get_by_role("link", name="View", exact=True).or_(page.get_by_role("button", name="View", exact=True)).first.click()
                expect(page).to_have_url(re.compile(r"/runs/[0-9a-f-]{36}"))
                expect(page.get_by_text("partition: t")).to_be_visible()
                expect(page.get_by_text("Success", exact=True).first).to_be_visible(timeout=300_000)
                page.screenshot(path=str(shot))
            except BaseException:
                page.screenshot(path=str(tmp_path / "ui-failure.png"))
                print(f"screenshot: {tmp_path / 'ui-failure.png'}\n{ui.tail()}")
                raise
            finally:
                browser.close()
        assert shot.stat().st_size > 10_000
        query = '{ assetOrError(assetKey: {path: ["tile_shards"]}) { ... on Asset { assetMaterializations(limit: 5) { partition } } } }'
        req = urllib.request.Request(f"{base}/graphql", data=json.dumps({"query": query}).encode(),
                                     headers={"Content-Type": "application/json"})
        mats = json.loads(urllib.request.urlopen(req, timeout=30).read())["data"]["assetOrError"]["assetMaterializations"]
        assert [m["partition"] for m in mats] == ["t"]
    finally:
        ui.stop()
