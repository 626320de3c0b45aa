"""The web client's routes: the page at / and /client, the JS module and assets from memory."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest
from quart import Quart

from quartchat.app import create_app
from quartchat.config import Settings


@pytest.fixture
async def app(make_settings: Callable[..., Settings]) -> AsyncIterator[Quart]:
    application = create_app(make_settings())
    async with application.test_app():
        yield application


async def test_browsers_get_the_page_at_root_and_programs_get_json(app: Quart) -> None:
    client = app.test_client()
    page = await client.get("/", headers={"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"})
    assert page.status_code == 200
    assert page.content_type == "text/html; charset=utf-8"
    assert page.headers["Vary"] == "Accept"
    html = await page.get_data(as_text=True)
    assert '<meta name="viewport" content="width=device-width, initial-scale=1">' in html
    assert '<script type="module" src="/static/app.js"></script>' in html
    health = await client.get("/", headers={"Accept": "application/json"})
    assert (await health.get_json())["status"] == "ok"
    alias = await client.get("/client")
    assert alias.status_code == 200 and await alias.get_data(as_text=True) == html
    assert alias.headers["Cache-Control"] == "no-cache"


@pytest.mark.parametrize(
    "name,ctype",
    [
        ("quartchat.js", "text/javascript; charset=utf-8"),
        ("app.js", "text/javascript; charset=utf-8"),
        ("app.css", "text/css; charset=utf-8"),
    ],
)
async def test_static_files_have_a_type_a_cache_header_and_an_etag(
    app: Quart, name: str, ctype: str
) -> None:
    client = app.test_client()
    r = await client.get(f"/static/{name}")
    assert r.status_code == 200
    assert r.content_type == ctype
    assert r.headers["Cache-Control"] == "public, max-age=300"
    assert r.headers["X-Content-Type-Options"] == "nosniff"
    etag = r.headers["ETag"]
    again = await client.get(f"/static/{name}", headers={"If-None-Match": etag})
    assert again.status_code == 304 and await again.get_data() == b""


async def test_files_are_read_once_at_start_not_per_request(
    app: Quart, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.resources

    def boom(*_: object) -> None:
        raise AssertionError("read from disk during a request")

    monkeypatch.setattr(importlib.resources, "files", boom)
    r = await app.test_client().get("/static/quartchat.js")
    assert r.status_code == 200
    assert b"export class QuartchatClient" in await r.get_data()


@pytest.mark.parametrize("path", ["/static/nope.js", "/static/..%2Fapp.py", "/static/"])
async def test_unknown_static_files_are_404(app: Quart, path: str) -> None:
    r = await app.test_client().get(path)
    assert r.status_code == 404
