"""The web client's files: read once from the package at app start, served from memory.

Owns `GET /static/<name>` (the JS module ``quartchat.js``, the page's script
and style) and the page itself, which the app serves at ``/`` for browsers and
at ``/client``. Every answer carries an ETag; a matching ``If-None-Match`` gets
304. The page revalidates on every load (``no-cache``), so a deployment is
seen at once; the scripts and style are cached for a few minutes.
"""

from __future__ import annotations

import hashlib
from importlib import resources

import attrs
from quart import Blueprint, Response, request

__all__ = ["StaticFiles", "load_static"]

_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".png": "image/png",
    ".svg": "image/svg+xml",
}
_PAGE = "index.html"
_ASSET_CACHE = "public, max-age=300"
_PAGE_CACHE = "no-cache"


@attrs.frozen
class StaticFile:
    """One file's bytes, content type and ETag."""

    body: bytes
    content_type: str
    etag: str


@attrs.frozen
class StaticFiles:
    """Every servable file of ``quartchat/static``, by name."""

    files: dict[str, StaticFile]

    def response(self, name: str, cache_control: str = _ASSET_CACHE) -> Response:
        """The file (200), 304 when the client's ETag matches, or a JSON 404."""
        f = self.files.get(name)
        if f is None:
            return Response(
                '{"error": "not_found", "message": "no such file"}',
                status=404,
                content_type="application/json",
            )
        headers = {
            "ETag": f.etag,
            "Cache-Control": cache_control,
            "X-Content-Type-Options": "nosniff",
        }
        if f.etag in request.headers.get("If-None-Match", ""):
            return Response(b"", status=304, headers=headers)
        return Response(f.body, content_type=f.content_type, headers=headers)

    def page(self) -> Response:
        """The web client page."""
        return self.response(_PAGE, _PAGE_CACHE)

    def blueprint(self) -> Blueprint:
        """`GET /static/<name>` and `GET /client`."""
        bp = Blueprint("webclient", __name__)

        @bp.get("/static/<name>")
        async def static_file(name: str) -> Response:
            return self.response(name)

        @bp.get("/client")
        async def client_page() -> Response:
            return self.page()

        return bp


def load_static() -> StaticFiles:
    """Read every known file type under the package's ``static`` folder, once."""
    files: dict[str, StaticFile] = {}
    for entry in resources.files("quartchat").joinpath("static").iterdir():
        suffix = "." + entry.name.rsplit(".", 1)[-1] if "." in entry.name else ""
        if not entry.is_file() or suffix not in _TYPES:
            continue
        body = entry.read_bytes()
        etag = '"' + hashlib.sha256(body).hexdigest()[:20] + '"'
        files[entry.name] = StaticFile(body, _TYPES[suffix], etag)
    if _PAGE not in files:
        raise RuntimeError(f"quartchat/static/{_PAGE} is missing from the package")
    return StaticFiles(files)
