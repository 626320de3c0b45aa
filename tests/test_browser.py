"""The web client in a real browser: Debian's chromium driven by Playwright, real servers.

No browser is downloaded: Playwright drives /usr/bin/chromium (installed by
ops/ensure-services.sh). Each test starts its own `quartchat serve` on SQLite;
the tests that cut the page off put a TCP proxy (tests/proxy.py) between the
browser and the server, so the page is disconnected exactly when the test
says, while other clients keep posting straight to the server.

Screenshots go to the test's tmp dir, and also to $QUARTCHAT_SCREENSHOTS when
set (the README's picture: QUARTCHAT_SCREENSHOTS=assets pytest tests/test_browser.py).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import playwright.async_api as playwright_api
import pytest

from quartchat.client import ChatClient

from .proxy import TcpProxy
from .servers import ServerProcess, free_port

CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WAIT_MS = 20_000


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(
            f"{CHROMIUM} is missing: run `bash ops/ensure-services.sh` (apt-get install chromium)"
        )
    async with playwright_api.async_playwright() as p:
        # launch() gives every browser a fresh, temporary user data dir.
        b = await p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        try:
            yield b
        finally:
            await b.close()


@pytest.fixture
def make_server(tmp_path: Path) -> Any:
    servers: list[ServerProcess] = []

    async def make(port: int | None = None, **env: str) -> ServerProcess:
        s = ServerProcess(
            tmp_path,
            {"QUARTCHAT_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/chat.db", **env},
            port=port,
        )
        servers.append(s)
        return await asyncio.to_thread(s.start)

    yield make
    for s in servers:
        s.stop()


@pytest.fixture
def shots(tmp_path: Path) -> Callable[[str], Path]:
    def path(name: str) -> Path:
        return tmp_path / name

    return path


def publish_shot(path: Path) -> None:
    target = os.environ.get("QUARTCHAT_SCREENSHOTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(target) / path.name)


def stored(db: Path, room: str) -> list[tuple[int, str, str, str | None]]:
    with sqlite3.connect(db) as conn:
        return list(
            conn.execute(
                "SELECT seq, sender_id, content, client_msg_id FROM messages "
                "WHERE room_id = ? ORDER BY seq",
                (room,),
            )
        )


class Page:
    """One user's tab: helpers over the page's DOM (what a person sees)."""

    def __init__(self, page: Any) -> None:
        self.page = page
        self.errors: list[str] = []
        page.on("pageerror", lambda e: self.errors.append(str(e)))

    @classmethod
    async def open(cls, browser: Any, url: str, **context: Any) -> Page:
        ctx = await browser.new_context(**context)
        self = cls(await ctx.new_page())
        await self.page.goto(url)
        return self

    async def connected(self) -> None:
        await self.page.wait_for_selector('#status[data-state="open"]', timeout=WAIT_MS)

    async def disconnected(self) -> None:
        await self.page.wait_for_selector('#status:not([data-state="open"])', timeout=WAIT_MS)

    async def join(self, room: str) -> None:
        await self.page.fill("#join-room", room)
        await self.page.press("#join-room", "Enter")
        await self.page.wait_for_function(
            "r => window.quartchatApp.client.rooms.get(r)?.joined === true",
            arg=room,
            timeout=WAIT_MS,
        )

    async def select(self, room: str) -> None:
        await self.page.click(f'#my-rooms button:has-text("{room}")')

    async def say(self, text: str) -> None:
        await self.page.fill("#text", text)
        await self.page.press("#text", "Enter")

    async def shown(self, room: str) -> list[dict[str, Any]]:
        """The messages the page shows for a room, top to bottom."""
        return await self.page.evaluate(
            """room => [...document.querySelectorAll(`ol.messages[data-room="${room}"] li.msg`)].map(li => ({
                 seq: Number(li.dataset.seq), sender: li.querySelector('.sender').textContent,
                 content: li.querySelector('.body').textContent, own: li.classList.contains('own'),
                 time: li.querySelector('time')?.textContent ?? null, state: li.querySelector('.state')?.textContent ?? null}))""",
            room,
        )

    async def wait_shown(self, room: str, n: int) -> list[dict[str, Any]]:
        await self.page.wait_for_function(
            '([room, n]) => document.querySelectorAll(`ol.messages[data-room="${room}"] li.msg[data-seq]`).length >= n',
            arg=[room, n],
            timeout=WAIT_MS,
        )
        return await self.shown(room)


async def test_two_users_chat_in_two_rooms_and_see_the_same_order(
    browser: Any, make_server: Any, shots: Callable[[str], Path]
) -> None:
    srv = await make_server()
    alice = await Page.open(
        browser, f"{srv.http}/?sender_id=alice&room=lobby", viewport={"width": 1000, "height": 640}
    )
    bob = await Page.open(browser, f"{srv.http}/?sender_id=bob&room=lobby")
    await alice.connected()
    await bob.connected()
    await alice.join("dev")
    await bob.join("dev")
    for room in ("lobby", "dev"):
        await alice.select(room)
        await bob.select(room)
        for i in range(3):  # interleaved, without waiting for acks
            await alice.say(f"alice {room} {i}")
            await bob.say(f"bob {room} {i}")
        await alice.wait_shown(room, 6)  # all read before the next room (no unread left over)
        await bob.wait_shown(room, 6)
    views = {}
    for room in ("lobby", "dev"):
        a = await alice.wait_shown(room, 6)
        b = await bob.wait_shown(room, 6)
        key = [(m["seq"], m["sender"].replace(" (you)", ""), m["content"]) for m in a]
        assert key == [(m["seq"], m["sender"].replace(" (you)", ""), m["content"]) for m in b], room
        assert [m["seq"] for m in a] == [1, 2, 3, 4, 5, 6]
        assert sorted(m["content"] for m in a) == sorted(
            f"{u} {room} {i}" for u in ("alice", "bob") for i in range(3)
        )
        assert all(m["own"] == m["content"].startswith("alice") for m in a), (
            "own messages styled as own"
        )
        assert all(m["time"] for m in a), "every message shows its time"
        views[room] = key
    print("order seen by both:", views)
    # Unread: alice reads dev; bob posts twice in lobby.
    await alice.select("dev")
    await bob.select("lobby")
    await bob.say("are you there?")
    await bob.say("hello?")
    await alice.page.wait_for_function("document.title === '(2) quartchat'", timeout=WAIT_MS)
    badge = await alice.page.text_content('#my-rooms button:has-text("lobby") .badge')
    assert badge == "2"
    await alice.page.click("#members-toggle")
    assert await alice.page.text_content("#members-toggle") == "Members (2)"
    await alice.page.screenshot(path=shots("web-client.png"))
    publish_shot(shots("web-client.png"))
    await alice.select("lobby")
    assert await alice.page.title() == "quartchat"
    assert alice.errors == [] and bob.errors == []


async def test_server_killed_and_restarted_page_shows_all_25_in_order_once(
    browser: Any, make_server: Any, shots: Callable[[str], Path]
) -> None:
    port = free_port()
    srv = await make_server(port)
    async with TcpProxy("127.0.0.1", port) as proxy:
        carol = await Page.open(browser, f"http://127.0.0.1:{proxy.port}/?sender_id=carol&room=r")
        await carol.connected()
        async with ChatClient(srv.url, sender_id="dave") as dave:
            await dave.join("r")
            for i in range(3):
                await dave.send("r", f"before {i}")
        await carol.wait_shown("r", 3)

        srv.signal(signal.SIGKILL, group=True)  # a crash: no close frame, the page sees 1006
        await asyncio.to_thread(srv.wait, 10)
        await proxy.cut()  # the page may not come back before dave has posted everything
        await carol.disconnected()
        srv = await make_server(port)
        async with ChatClient(srv.url, sender_id="dave") as dave:
            await dave.join("r")
            for i in range(25):
                await dave.send("r", f"after {i}")
            assert await carol.page.get_attribute("#status", "data-state") != "open"
            await proxy.restore()  # the page reconnects by itself, with since_seq
            await carol.connected()
            shown = await carol.wait_shown("r", 28)
            await dave.send("r", "live again")
            shown = await carol.wait_shown("r", 29)
            await carol.page.screenshot(path=shots("recovered.png"))
    assert [m["seq"] for m in shown] == list(range(1, 30))
    assert [m["content"] for m in shown] == (
        [f"before {i}" for i in range(3)] + [f"after {i}" for i in range(25)] + ["live again"]
    )
    cue = await carol.page.locator("li.sys.recovered").all_text_contents()
    assert cue == ["Reconnected: 25 missed messages recovered"]
    assert carol.errors == []


async def test_a_post_made_while_disconnected_is_sent_after_reconnecting_and_stored_once(
    browser: Any, make_server: Any, tmp_path: Path, shots: Callable[[str], Path]
) -> None:
    srv = await make_server()
    async with TcpProxy("127.0.0.1", srv.port) as proxy:
        base = f"http://127.0.0.1:{proxy.port}"
        erin = await Page.open(browser, f"{base}/?sender_id=erin&room=r")
        await erin.connected()
        await proxy.cut()
        await erin.disconnected()
        await erin.say("written offline")
        pending = erin.page.locator('li.msg.pending[data-state="pending"]')
        await pending.wait_for(timeout=WAIT_MS)
        assert await pending.locator(".state").text_content() == "sending…"
        await erin.page.screenshot(path=shots("pending.png"))
        await proxy.restore()
        shown = await erin.wait_shown("r", 1)
        await erin.page.wait_for_selector("li.msg.pending", state="detached", timeout=WAIT_MS)
        assert [(m["content"], m["own"], m["state"]) for m in shown] == [
            ("written offline", True, "✓ sent")
        ]
        rows = stored(tmp_path / "chat.db", "r")
        assert [(r[1], r[2]) for r in rows] == [("erin", "written offline")]
        # Name and rooms are remembered across a reload without any parameter.
        await erin.page.goto(f"{base}/")
        await erin.connected()
        assert await erin.page.input_value("#name") == "erin"
        assert await erin.page.text_content("#room-title") == "# r"
        shown = await erin.wait_shown("r", 1)
        assert [m["content"] for m in shown] == ["written offline"]
    assert erin.errors == []


async def test_five_posts_in_one_millisecond_are_five_messages(
    browser: Any, make_server: Any, tmp_path: Path
) -> None:
    srv = await make_server()
    ctx = await browser.new_context()
    # As on any plain-http host but localhost: no crypto.randomUUID.
    await ctx.add_init_script("delete Crypto.prototype.randomUUID;")
    page = Page(await ctx.new_page())
    await page.page.goto(f"{srv.http}/?sender_id=fran&room=r")
    await page.connected()
    took = await page.page.evaluate("""() => {
        if (typeof crypto.randomUUID !== 'undefined') throw new Error('randomUUID still there');
        const realNow = Date.now; Date.now = () => 1700000000000;  // one frozen millisecond
        const t0 = performance.now();
        const text = document.getElementById('text'), form = document.getElementById('composer');
        for (let i = 0; i < 5; i++) { text.value = `burst ${i}`; form.requestSubmit(); }
        const took = performance.now() - t0;
        Date.now = realNow;
        return took;
    }""")
    # Date.now() said the same millisecond for all five (a clock-based id would collide);
    # the real time they took is printed for the record.
    print(f"5 posts submitted in {took:.1f} ms of real time, all in one Date.now() millisecond")
    shown = await page.wait_shown("r", 5)
    await page.page.wait_for_selector("li.msg.pending", state="detached", timeout=WAIT_MS)
    assert [m["content"] for m in shown] == [f"burst {i}" for i in range(5)]
    rows = stored(tmp_path / "chat.db", "r")
    assert len(rows) == 5 and len({r[3] for r in rows}) == 5
    assert all(len(r[3] or "") == 36 and r[3][14] == "4" for r in rows), [r[3] for r in rows]
    assert page.errors == []


async def test_360px_viewport_has_no_horizontal_scroll(
    browser: Any, make_server: Any, shots: Callable[[str], Path]
) -> None:
    srv = await make_server()
    phone = await Page.open(
        browser,
        f"{srv.http}/?sender_id=gus&room=lobby",
        viewport={"width": 360, "height": 740},
        is_mobile=True,
        has_touch=True,
        device_scale_factor=2,
    )
    await phone.connected()
    await phone.join("a-room-with-a-rather-long-name.for-layout:checks")
    await phone.select("lobby")
    async with ChatClient(srv.url, sender_id="hana-with-a-long-sender-name@example.org") as hana:
        await hana.join("lobby")
        await hana.send("lobby", "A normal message, with a few words in it, to see how text wraps.")
        await hana.send("lobby", "https://example.org/" + "path/" * 60)
        await hana.send("lobby", "W" * 400)  # one very long word
    await phone.say("Mine, on a phone")
    await phone.wait_shown("lobby", 4)
    await phone.page.click("#members-toggle")
    metrics = await phone.page.evaluate("""() => {
        const de = document.documentElement;
        const wide = [...document.querySelectorAll('body *')].filter(e => e.offsetParent !== null
            && e.getBoundingClientRect().right > innerWidth + 0.5).map(e => e.tagName + '.' + e.className);
        return {innerWidth, scrollWidth: de.scrollWidth, bodyScroll: document.body.scrollWidth,
                bodyFont: getComputedStyle(document.querySelector('.msg .body')).fontSize, wide,
                logHeight: document.getElementById('log').getBoundingClientRect().height};
    }""")
    await phone.page.screenshot(path=shots("web-client-360.png"))
    publish_shot(shots("web-client-360.png"))
    print(metrics)
    assert metrics["innerWidth"] == 360, "the viewport meta makes the layout 360 px wide"
    assert metrics["scrollWidth"] <= 360 and metrics["bodyScroll"] <= 360
    assert metrics["wide"] == []
    assert float(metrics["bodyFont"].rstrip("px")) >= 15
    await phone.page.mouse.wheel(200, 0)
    assert await phone.page.evaluate("scrollX") == 0
    assert phone.errors == []


PAYLOADS = [
    '<img src=x onerror="window.__xss=1">',
    "<script>window.__xss=2</script>",
    '<svg onload="window.__xss=3"><circle r=5></svg>',
    '<a href="javascript:window.__xss=4">click me</a>',
    '<iframe srcdoc="<script>parent.__xss=5</script>"></iframe>',
    "&lt;b&gt;entities stay as typed&lt;/b&gt;",
]


async def test_injected_html_stays_text(browser: Any, make_server: Any) -> None:
    srv = await make_server()
    ivy = await Page.open(browser, f"{srv.http}/?sender_id=ivy&room=r")
    await ivy.connected()
    async with ChatClient(srv.url, sender_id="mallory") as mallory:
        await mallory.join("r")
        for p in PAYLOADS:
            await mallory.send("r", p)
    await ivy.say('<img src=y onerror="window.__xss=6">')
    shown = await ivy.wait_shown("r", len(PAYLOADS) + 1)
    assert [m["content"] for m in shown] == [*PAYLOADS, '<img src=y onerror="window.__xss=6">']
    for body in await ivy.page.locator("li.msg .body").all():
        await body.click()
    found = await ivy.page.evaluate("""() => ({
        xss: window.__xss ?? null,
        elements: document.querySelectorAll('#log img, #log script, #log svg, #log a, #log iframe, #log b').length})""")
    assert found == {"xss": None, "elements": 0}
    assert ivy.errors == []


async def test_a_bad_name_is_explained_before_connecting(browser: Any, make_server: Any) -> None:
    srv = await make_server()
    page = await Page.open(browser, f"{srv.http}/?sender_id=bad%20name!&room=r")
    problem = page.page.locator("#problem")
    await problem.wait_for(timeout=WAIT_MS)
    text = await problem.text_content()
    assert text == "A name may use only letters A-Z a-z, digits and _ . @ : - (not: space !)."
    assert await page.page.get_attribute("#status", "data-state") == "idle"
    assert srv.http_get("/")["connections"] == 0, "no socket was opened"
    # Fixing the name connects.
    await page.page.fill("#name", "good_name")
    await page.page.click("#connect")
    await page.connected()
    assert await problem.is_hidden()


async def test_load_older_pages_back_through_history(browser: Any, make_server: Any) -> None:
    srv = await make_server(QUARTCHAT_RATE_PER_S="0")
    async with ChatClient(srv.url, sender_id="kim") as kim:
        await kim.join("r")
        posts = [kim.post("r", f"old {i}") for i in range(60)]
        await asyncio.wait_for(asyncio.gather(*(p.wait() for p in posts)), 30)
    page = await Page.open(browser, f"{srv.http}/?sender_id=lea&room=r")
    await page.connected()
    shown = await page.wait_shown("r", 50)  # the first join replays the last 50
    assert [m["seq"] for m in shown] == list(range(11, 61))
    assert await page.page.title() == "quartchat", "a first join's history is not unread"
    older = page.page.locator("#older")
    assert await older.is_visible()
    await older.click()
    shown = await page.wait_shown("r", 60)
    assert [m["seq"] for m in shown] == list(range(1, 61))
    assert [m["content"] for m in shown] == [f"old {i}" for i in range(60)]
    await page.page.wait_for_selector("#older", state="hidden", timeout=WAIT_MS)
    assert page.errors == []


async def test_jwt_mode_a_token_link_chats_in_its_rooms_and_is_refused_others(
    browser: Any, make_server: Any, tmp_path: Path
) -> None:
    """The README's jwt lines: serve with a secret, `quartchat token alice --rooms 'team-1:*'`,
    open the web client with the token: chat in team-1:general, refused in `other`."""
    import subprocess
    import sys

    secret = "a-development-secret-of-32-bytes-or-more"
    srv = await make_server(QUARTCHAT_AUTH="jwt", QUARTCHAT_JWT_SECRET=secret)
    env = {**os.environ, "QUARTCHAT_AUTH": "jwt", "QUARTCHAT_JWT_SECRET": secret}
    made = await asyncio.to_thread(  # a blocking run, off the event loop the browser needs
        subprocess.run,
        [sys.executable, "-m", "quartchat", "token", "alice", "--rooms", "team-1:*"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    token = made.stdout.strip()
    alice = await Page.open(browser, f"{srv.http}/?token={token}&room=team-1:general")
    await alice.connected()
    await alice.page.wait_for_function(
        "r => window.quartchatApp.client.rooms.get(r)?.joined === true",
        arg="team-1:general",
        timeout=WAIT_MS,
    )
    await alice.say("hello from a token")
    shown = await alice.wait_shown("team-1:general", 1)
    assert [(m["content"], m["own"]) for m in shown] == [("hello from a token", True)]
    assert stored(tmp_path / "chat.db", "team-1:general")[0][1:3] == ("alice", "hello from a token")
    # Every error the page's client hears (the frames as the server sent them).
    await alice.page.evaluate(
        "() => { window.heard = []; window.quartchatApp.client.on('error', e => heard.push(e)); }"
    )
    await alice.page.fill("#join-room", "other")
    await alice.page.press("#join-room", "Enter")
    await alice.page.wait_for_function(
        "document.getElementById('problem').textContent.includes('forbidden')", timeout=WAIT_MS
    )
    heard = await alice.page.evaluate("() => window.heard")
    assert [(e["code"], e.get("action"), e.get("room_id")) for e in heard] == [
        ("forbidden", "join", "other")
    ], heard
    problem = await alice.page.text_content("#problem")
    assert problem is not None and problem.startswith("Could not join other: forbidden: "), problem
    assert token not in problem
    # The refused room is gone from the page too: the view is back on the room it can use.
    rooms = await alice.page.eval_on_selector_all(
        "#my-rooms li", "els => els.map(e => e.textContent)"
    )
    assert not any("other" in r for r in rooms), rooms
    assert "team-1:general" in (await alice.page.text_content("#room-title") or "")
    assert stored(tmp_path / "chat.db", "other") == []
    # Without a token the page cannot connect: the handshake is refused with 401, and the
    # page says so in words (a browser never sees the status, so the text names the causes).
    anon = await Page.open(browser, f"{srv.http}/?sender_id=mallory&room=team-1:general")
    await anon.page.wait_for_function("!document.getElementById('problem').hidden", timeout=WAIT_MS)
    problem = await anon.page.text_content("#problem")
    assert problem is not None and problem.startswith("Could not connect"), problem
    assert "missing or expired token" in problem, problem
    assert await anon.page.get_attribute("#status", "data-state") != "open"
    assert alice.errors == [] and anon.errors == []
