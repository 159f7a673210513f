"""The dashboard page (`GET /_keyfailover/`) in a real browser: Playwright drives
Debian's chromium (`make deps` installs it) against a FailoverProxy served on
loopback over a MockUpstream. Nothing leaves the machine.

`KEYFAILOVER_SCREENSHOT=1 pytest tests/test_dashboard.py -k every_key` also
runs traffic for a while and saves docs/dashboard.png (the README's picture).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from conftest import FAKE_KEYS
from fastapi import FastAPI
from playwright.sync_api import (
    Browser,
    Dialog,
    Locator,
    Page,
    Request,
    Route,
    expect,
    sync_playwright,
)

import keyfailover as kf
from keyfailover.asgi import FailoverProxy
from keyfailover.testing import Limit, MockUpstream, Reply, serve_native

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(
    not os.path.exists(CHROMIUM), reason="needs chromium (`make deps` installs it)"
)

TOKEN = "dash-token-Zq81xv"
ADMIN = "/_keyfailover/"
MESSAGE = {"model": "claude-test", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "dashboard.png"
# Playwright's timeouts (ms); the page gets a state event every second.
WAIT = 5000


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--disable-background-networking",
            ],
        )
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """A fresh browser context (own sessionStorage); fails the test on a script
    error or a Content Security Policy violation."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(WAIT)
    problems: list[str] = []
    page.on("pageerror", lambda err: problems.append(f"script error: {err}"))
    page.on(
        "console",
        lambda msg: (
            problems.append(f"console: {msg.text}")
            if msg.type == "error" and "Content Security Policy" in msg.text
            else None
        ),
    )
    yield page
    context.close()
    assert not problems


@contextlib.contextmanager
def serve(app: Any) -> Iterator[str]:
    """`keyfailover.testing.serve_asgi`, but stopping at once: at shutdown uvicorn
    waits for the connections still open (a page's event stream among them, should
    the page not have left yet); here it cancels them after 0.2 s (a float works
    there, whatever the annotation says)."""
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=0,
        log_level="critical",
        timeout_graceful_shutdown=0.2,  # type: ignore[arg-type]
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="dashboard-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive(), "uvicorn did not start"
        assert time.monotonic() < deadline, "uvicorn did not start in time"
        time.sleep(0.005)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(params=["uvicorn", "native"])
def front_end(request: pytest.FixtureRequest) -> str:
    """Which server the dashboard is served by: FailoverProxy under uvicorn, or the
    native server `keyfailover serve` runs (`keyfailover.testing.serve_native`)."""
    return str(request.param)


@contextlib.contextmanager
def dashboard(
    up: MockUpstream,
    page: Page,
    n: int = 3,
    *,
    front_end: str,
    strategy: str = "ordered",
    **proxy: Any,
) -> Iterator[tuple[str, kf.KeyPool]]:
    """A FailoverProxy over the first `n` fake keys (key-0, key-1, ...) on `up`,
    served on loopback by `front_end`: yields its URL and the pool. The page leaves
    before the server stops, ending its event stream."""
    pool = kf.KeyPool(FAKE_KEYS[:n], strategy=strategy)
    client = kf.FailoverClient(pool, base_url=up.url)
    app = FailoverProxy(client, **proxy)
    server = serve(app) if front_end == "uvicorn" else serve_native(app, grace=0.2)
    with server as url:
        try:
            yield url, pool
        finally:
            page.goto("about:blank")  # ends the page's event stream


def send(url: str, n: int = 1) -> None:
    for _ in range(n):
        answer = httpx.post(url + "/v1/messages", json=MESSAGE, headers={"x-api-key": TOKEN})
        assert answer.status_code == 200, answer.text


def sign_in(page: Page, url: str, token: str = TOKEN) -> None:
    """Opens the dashboard at `url` (a proxy's URL, or the page's) and signs in."""
    page.goto(url if "/_keyfailover" in url else url + ADMIN)
    page.get_by_label("Client or admin token").fill(token)
    page.get_by_role("button", name="Connect").click()


def row(page: Page, label: str) -> Locator:
    return page.locator(f'tr[data-label="{label}"]')


def expect_state(page: Page, label: str, state: str, timeout: float = WAIT) -> None:
    expect(row(page, label).locator("td.c-state")).to_have_attribute(
        "data-state", state, timeout=timeout
    )


def rate_limit(up: MockUpstream, key: str, seconds: int) -> None:
    reply = Reply.error(429, "rate_limit_error", "slow down", headers={"retry-after": str(seconds)})
    up.set_reply(key, reply)


def test_signing_in_shows_every_key(page: Page, front_end: str) -> None:
    # Four keys as a pool has them after some traffic: key-0 and key-3 valid,
    # with the rate-limit headers telling their headroom; key-1 rate-limited;
    # key-2 revoked.
    limits = {FAKE_KEYS[0]: Limit(requests=60), FAKE_KEYS[3]: Limit(requests=100)}
    with (
        MockUpstream(limits=limits) as up,
        dashboard(
            up, page, 4, front_end=front_end, strategy="round_robin", client_tokens=[TOKEN]
        ) as (url, pool),
    ):
        assert httpx.get(url + ADMIN + "livez").status_code == 200  # starts the sampler
        rate_limit(up, FAKE_KEYS[1], 300)
        up.set_reply(FAKE_KEYS[2], Reply.error(401, "authentication_error", "invalid x-api-key"))
        # The timeline tells the changes between samples: the first one (taken
        # at once) must come before key-1 and key-2 change.
        time.sleep(0.5)
        send(url, 8)

        sign_in(page, url)
        expect(page.locator("tr[data-label]")).to_have_count(4)
        for key in pool.snapshot():
            expect(row(page, key["label"]).locator(".c-hint")).to_have_text(key["hint"])
        expect_state(page, "key-0", "valid")
        expect_state(page, "key-1", "temporary")
        expect_state(page, "key-2", "permanent")
        expect(row(page, "key-0").locator(".c-headroom")).to_have_text(
            re.compile(r"requests \d+/60")
        )
        expect(row(page, "key-1").locator(".c-cooldown")).to_have_text(re.compile(r"^4m \d\ds$"))
        expect(row(page, "key-1").locator(".c-error")).to_have_text(re.compile(r"^429 · \d+s ago$"))
        expect(row(page, "key-2").locator(".c-error")).to_have_text(re.compile(r"^401 · "))
        expect(page.locator("#pool")).to_have_text("anthropic")
        expect(page.locator("#status")).to_have_text("degraded")
        expect(page.locator("#conn")).to_contain_text("live")
        expect(page.locator("#timeline li").first).to_be_visible()
        expect(page.locator("#timeline")).to_contain_text("revoked")
        expect(page.locator("#chart svg")).to_be_visible()
        if os.environ.get("KEYFAILOVER_SCREENSHOT") == "1":
            screenshot(page, url)


def screenshot(page: Page, url: str) -> None:
    """Sends 40 s of uneven traffic (key-1 is reset twice and rate-limited again
    each time), so the chart and the timeline have content; then saves
    docs/dashboard.png while the traffic goes on."""
    start = time.monotonic()
    done = threading.Event()

    def traffic() -> None:
        resets = [15.0, 30.0]
        while not done.is_set():
            elapsed = time.monotonic() - start
            send(url)
            if resets and elapsed > resets[0]:
                resets.pop(0)
                reset = httpx.post(url + ADMIN + "keys/key-1/reset", headers={"x-api-key": TOKEN})
                assert reset.status_code == 200
            time.sleep(0.1 + 0.25 * (1 + math.sin(elapsed / 5)))

    sender = threading.Thread(target=traffic, daemon=True)
    sender.start()
    try:
        page.wait_for_timeout(40_000)
        page.screenshot(path=str(SCREENSHOT))
    finally:
        done.set()
        sender.join(5)


def test_a_rate_limit_shows_within_two_seconds(
    page: Page, up: MockUpstream, front_end: str
) -> None:
    with dashboard(up, page, front_end=front_end, client_tokens=[TOKEN]) as (url, _):
        sign_in(page, url)
        expect_state(page, "key-0", "valid")
        page.evaluate("window.notReloaded = true")

        rate_limit(up, FAKE_KEYS[0], 120)
        send(url)
        expect_state(page, "key-0", "temporary", timeout=2000)
        countdown = row(page, "key-0").locator(".c-cooldown")
        expect(countdown).to_have_text(re.compile(r"^(2m 00s|1m 5\ds)$"), timeout=1000)
        expect(countdown).not_to_have_text(countdown.text_content() or "", timeout=2500)
        expect(row(page, "key-0").locator(".c-error")).to_have_text(re.compile(r"^429 · "))
        expect(row(page, "key-1").locator(".c-state")).to_have_attribute("data-state", "valid")
        assert page.evaluate("window.notReloaded") is True


def test_reset_and_retire_after_confirmation(page: Page, up: MockUpstream, front_end: str) -> None:
    with dashboard(up, page, front_end=front_end, client_tokens=[TOKEN]) as (url, pool):
        rate_limit(up, FAKE_KEYS[0], 120)
        send(url)
        posts: list[str] = []
        page.on("request", lambda r: posts.append(r.url) if r.method == "POST" else None)
        sign_in(page, url)
        expect_state(page, "key-0", "temporary")

        page.once("dialog", lambda dialog: dialog.dismiss())
        row(page, "key-0").get_by_role("button", name="Reset").click()
        page.wait_for_timeout(300)
        assert posts == []
        assert pool.states()[0] == kf.KeyState.TEMPORARY

        messages: list[str] = []

        def accept(dialog: Dialog) -> None:
            messages.append(dialog.message)
            dialog.accept()

        page.once("dialog", accept)
        row(page, "key-0").get_by_role("button", name="Reset").click()
        expect_state(page, "key-0", "valid", timeout=2500)
        expect(page.locator("#notice")).to_have_text("Reset key-0 done: key-0 is now valid.")
        assert "key-0" in messages[0]
        assert posts == [url + ADMIN + "keys/key-0/reset"]

        page.once("dialog", lambda dialog: dialog.accept())
        row(page, "key-1").get_by_role("button", name="Retire").click()
        expect_state(page, "key-1", "permanent", timeout=2500)
        assert pool.states()[1] == kf.KeyState.PERMANENT
        expect(page.get_by_role("button", name="Reload keys")).to_be_hidden()


def test_reload_keys_below_a_mount(page: Page, up: MockUpstream) -> None:
    # The page finds the admin endpoints next to it, wherever the proxy is
    # mounted, with or without the trailing slash; an admin token acts too.
    source = [FAKE_KEYS[:2]]
    pool = kf.KeyPool(FAKE_KEYS[:2])
    proxy = FailoverProxy(
        kf.FailoverClient(pool, base_url=up.url),
        client_tokens=["another-token"],
        admin_tokens=[TOKEN],
        reload=lambda: source[0],
    )
    app = FastAPI()
    app.mount("/anthropic", proxy)
    with serve(app) as url:
        try:
            sign_in(page, url + "/anthropic/_keyfailover")
            expect(page.locator("tr[data-label]")).to_have_count(2)
            source[0] = FAKE_KEYS[:3]
            page.once("dialog", lambda dialog: dialog.accept())
            page.get_by_role("button", name="Reload keys").click()
            expect(page.locator("#notice")).to_contain_text("Reload done: added key-2")
            expect(page.locator("tr[data-label]")).to_have_count(3)
            expect_state(page, "key-2", "valid")
        finally:
            page.goto("about:blank")


def test_a_wrong_token_shows_an_error_and_no_data(
    page: Page, up: MockUpstream, front_end: str
) -> None:
    with dashboard(up, page, front_end=front_end, client_tokens=[TOKEN]) as (url, pool):
        sign_in(page, url, "not-the-token")
        alert = page.get_by_role("alert")
        expect(alert).to_contain_text("401")
        expect(alert).to_contain_text("admin endpoints need a client or admin token")
        expect(page.get_by_label("Client or admin token")).to_be_visible()
        assert page.locator("tr[data-label]").count() == 0
        html = page.content()
        for key in pool.snapshot():
            assert key["label"] not in html
            assert key["hint"] not in html
        assert page.evaluate("sessionStorage.getItem('keyfailover.token')") is None


def test_the_page_holds_no_data_and_the_token_stays_out_of_urls(
    page: Page, up: MockUpstream, front_end: str
) -> None:
    with dashboard(up, page, front_end=front_end, client_tokens=[TOKEN]) as (url, pool):
        answer = httpx.get(url + ADMIN)
        assert answer.status_code == 200
        assert answer.headers["content-type"].startswith("text/html")
        assert "default-src 'none'" in answer.headers["content-security-policy"]
        for key in pool.snapshot():
            assert key["label"] not in answer.text
            assert key["hint"] not in answer.text
        for value in FAKE_KEYS:
            assert value[-8:] not in answer.text

        requests: list[Request] = []
        page.on("request", lambda r: requests.append(r))
        sign_in(page, url)
        expect(page.locator("tr[data-label]")).to_have_count(3)
        assert page.evaluate("sessionStorage.getItem('keyfailover.token')") == TOKEN

        # A reload connects again with the token the tab holds.
        page.reload()
        expect(page.locator("tr[data-label]")).to_have_count(3)
        expect(page.get_by_label("Client or admin token")).to_be_hidden()

        events = [r for r in requests if r.url == url + ADMIN + "events"]
        assert len(events) == 2
        assert all(r.all_headers().get("authorization") == f"Bearer {TOKEN}" for r in events)
        assert requests
        for r in requests:
            assert r.url.startswith(url + "/")
            assert TOKEN not in r.url

        page.get_by_role("button", name="Sign out").click()
        expect(page.get_by_label("Client or admin token")).to_be_visible()
        expect(page.locator("tr[data-label]")).to_have_count(0)
        assert page.evaluate("sessionStorage.getItem('keyfailover.token')") is None


def test_no_buttons_when_actions_are_off(page: Page, up: MockUpstream, front_end: str) -> None:
    # Neither client_tokens nor admin_tokens: the state is open to read, and
    # admin actions are off.
    with dashboard(up, page, front_end=front_end) as (url, _):
        sign_in(page, url, "")
        expect(page.locator("tr[data-label]")).to_have_count(3)
        expect_state(page, "key-0", "valid")
        assert page.get_by_role("button", name=re.compile("Reset|Retire|Reload")).count() == 0
        assert httpx.post(url + ADMIN + "keys/key-0/retire").status_code == 403


def test_a_long_label_wraps_and_keeps_the_table_in_the_window(page: Page, up: MockUpstream):
    long = "region-" + "x" * 293  # labels have no length limit
    pool = kf.KeyPool({long: FAKE_KEYS[0], "short": FAKE_KEYS[1]})
    pool.key(long).mark_temporary(60)
    app = FailoverProxy(kf.FailoverClient(pool, base_url=up.url), client_tokens=[TOKEN])
    with serve_native(app, grace=0.2) as url:
        try:
            sign_in(page, url)
            expect_state(page, "short", "valid")
            expect(row(page, long).locator(".c-label")).to_have_text(long)
            table = page.locator("table").first.bounding_box()
            assert table is not None
            assert table["x"] + table["width"] <= 1280, table
            # Every row's actions are on screen.
            reset = row(page, "short").get_by_role("button", name="Reset short").bounding_box()
            assert reset is not None
            assert reset["x"] + reset["width"] <= 1280, reset
        finally:
            page.goto("about:blank")


def test_it_reconnects_when_the_stream_ends(page: Page, up: MockUpstream, front_end: str) -> None:
    with dashboard(up, page, front_end=front_end, client_tokens=[TOKEN]) as (url, _):
        with httpx.stream("GET", url + ADMIN + "events", headers={"x-api-key": TOKEN}) as r:
            data = next(line for line in r.iter_lines() if line.startswith("data:"))
        state = json.loads(data[5:])
        state["pool"] = "canned"
        opened: list[float] = []

        def events(route: Route) -> None:
            opened.append(time.monotonic())
            if len(opened) == 1:  # one event, then the stream ends, saying why
                ending = {"type": "error", "error": {"type": "api_error", "message": "going away"}}
                body = (
                    f"event: state\ndata: {json.dumps(state)}\n\n"
                    f"event: error\ndata: {json.dumps(ending)}\n\n"
                )
                route.fulfill(status=200, content_type="text/event-stream", body=body)
            else:
                route.continue_()

        page.route(url + ADMIN + "events", events)
        sign_in(page, url)
        expect(page.locator("#pool")).to_have_text("canned")
        expect(page.locator("#conn")).to_contain_text("reconnecting (going away)")
        expect(page.locator("#pool")).to_have_text("anthropic", timeout=3000)
        expect(page.locator("#conn")).to_have_text("live")
        assert len(opened) == 2
        assert opened[1] - opened[0] >= 1.0
