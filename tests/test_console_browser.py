"""The console in a real browser: Playwright drives Debian's headless Chromium against a real
federation (a home and two push peers, scim2-server processes). One federation, one walk through
the pages an operator uses, with a screenshot of each page (``$CONSOLE_SCREENSHOTS``, default
``build/screenshots/``)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from playwright.async_api import async_playwright, expect

from tests.console_support import operator_token
from tests.propagation_support import (
    assert_no_internal_id,
    federation,
    gate,
    home_ids,
    home_tool,
    peer_id,
    quiesce,
    tenant,
)
from tests.scim_support import Home, new_user, unique

CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SHOTS = Path(os.environ.get("CONSOLE_SCREENSHOTS", "build/screenshots"))

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="the browser tests need Chromium at /usr/bin/chromium: apt-get install -y chromium",
)


@pytest.fixture
def shots() -> Path:
    """The folder the screenshots go to (CI keeps it)."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    return SHOTS


async def test_an_operator_finds_merges_splits_and_retries_from_the_console(
    db_url: str, home: Home, peer_server: Home, monkeypatch: pytest.MonkeyPatch, shots: Path
) -> None:
    p1, p2 = tenant(peer_server, "p1"), tenant(peer_server, "p2")
    async with gate(p2) as front:
        async for broker in federation(
            db_url, home, {"P1": p1.url, "P2": front.url}, monkeypatch, peer_server.token
        ):
            users = {}
            for name in ("jsmith", "johns"):
                status, users[name] = await home_tool(
                    broker, "POST", "/Users", new_user(unique(name))
                )
                assert status == 201
            await quiesce(broker)
            front.failures = [(403, {})]  # P2 refuses the next delivery: a dead letter
            _, carol = await home_tool(broker, "POST", "/Users", new_user(unique("carol")))
            await quiesce(broker)
            jsmith, johns = users["jsmith"]["id"], users["johns"]["id"]
            l2 = await peer_id(broker, "P2", johns)
            assert l2 is not None

            async with async_playwright() as pw:
                browser = await pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
                page = await browser.new_page(viewport={"width": 1280, "height": 800})
                expect.set_options(timeout=30_000)

                # Sign in: a page asked for without a session leads to the sign-in form.
                await page.goto(f"{broker.admin_url}/console/deliveries")
                await expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
                await page.screenshot(path=shots / "signin.png")
                await page.get_by_label("Token").fill(await operator_token(broker))
                await page.keyboard.press("Enter")
                await expect(page.get_by_role("heading", name="Deliveries")).to_be_visible()
                await page.get_by_role("link", name="Overview").click()
                overview = page.locator("#live table")
                await expect(overview).to_contain_text("P2")
                await expect(overview.locator("tr", has_text="P2")).to_contain_text("push")
                await page.screenshot(path=shots / "overview.png", full_page=True)

                # Find a user by a peer's external ID: the seed's table, internal ID included.
                await page.get_by_role("link", name="Find").click()
                await page.get_by_label("Internal ID, DOMAIN:EXTERNAL_ID").fill(f"P2:{l2}")
                await page.keyboard.press("Enter")
                table = page.locator("table.seed").first
                await expect(table).to_contain_text(johns)
                await expect(table.locator("tr", has_text=l2)).to_contain_text("true")
                await page.screenshot(path=shots / "identity.png", full_page=True)

                # Merge it into jsmith from the identity page: dry run, confirm, watch.
                await page.get_by_role("link", name="Merge this one into another").click()
                await page.get_by_label("Survivor").fill(jsmith)
                await page.get_by_role("button", name="Dry run").click()
                after = page.locator("table.seed", has_text="The table after")
                await expect(after.locator("tr", has_text=l2)).to_contain_text("deletion_required")
                task = page.locator("table.tasks tr[data-peer=P2]", has_text="delete_alias")
                await expect(task).to_contain_text(f"external ID {l2}")  # as --dry-run prints
                await page.screenshot(path=shots / "merge-dry-run.png", full_page=True)
                await page.get_by_role("button", name="Confirm the merge").click()
                await expect(page.locator("#op-state")).to_have_text("done")
                for peer in ("P1", "P2"):
                    await expect(page.locator(f"tr[data-peer={peer}]")).to_contain_text("done")
                await page.screenshot(path=shots / "operation.png", full_page=True)

                # Split it back: a new entity made in home, provisioned now into both peers.
                status, again = home.call("POST", "/Users", new_user(unique("johns-again")))
                assert status == 201
                await page.goto(f"{broker.admin_url}/console/split?source={jsmith}")
                await page.get_by_label("New entity").fill(again["id"])
                await page.get_by_role("button", name="Dry run").click()
                provision = page.locator("table.tasks tr[data-peer=P2]", has_text="provision")
                await expect(provision).to_contain_text(again["id"])
                await page.screenshot(path=shots / "split-dry-run.png", full_page=True)
                await page.get_by_role("button", name="Confirm the split").click()
                await expect(page.locator("#op-state")).to_have_text("done")
                for peer in ("P1", "P2"):
                    await expect(page.locator(f"tr[data-peer={peer}]")).to_contain_text("1 of 1")
                assert await peer_id(broker, "P2", again["id"]) is not None

                # Retry the dead letter.
                await page.get_by_role("link", name="Deliveries").click()
                await page.get_by_label("State").select_option("dead")
                await page.get_by_role("button", name="Show").click()
                dead = page.locator("tbody tr", has_text=carol["id"])
                await expect(dead).to_contain_text("HTTP 403")
                await page.screenshot(path=shots / "deliveries.png", full_page=True)
                await dead.get_by_role("button", name=re.compile("^Retry")).click()
                await expect(page.locator("p.ok")).to_contain_text("retry")
                await quiesce(broker)
                assert await peer_id(broker, "P2", carol["id"]) is not None

                # Run a reconciliation dry run of P1: counts per situation, then the accounts.
                await page.get_by_role("link", name="Reconciliation").click()
                await page.get_by_label("Peer").select_option("P1")
                await page.get_by_role("button", name="Dry run").click()
                await expect(page.locator("#recon-state")).to_have_text("done")
                linked = page.locator("tr[data-situation=linked] td").first
                await expect(linked).not_to_have_text("0")  # the accounts the broker made
                await page.screenshot(path=shots / "reconcile.png", full_page=True)

                for name in ("Domains", "Audit"):
                    await page.get_by_role("link", name=name, exact=True).click()
                    await page.screenshot(path=shots / f"{name.lower()}.png", full_page=True)
                await expect(page.locator("table")).to_contain_text("delivery_retry")

                # Narrow window: the navigation wraps, the tables scroll in place.
                await page.set_viewport_size({"width": 420, "height": 800})
                await page.get_by_role("link", name="Overview").click()
                await page.screenshot(path=shots / "overview-narrow.png", full_page=True)

                # Sign out: the session opens nothing any more.
                await page.get_by_role("button", name="Sign out").click()
                await expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
                await page.goto(f"{broker.admin_url}/console/")
                await expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
                await browser.close()

            ids = home_ids(home)
            assert_no_internal_id(p1, ids)
            assert_no_internal_id(p2, ids)
