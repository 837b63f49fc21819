"""`lemonslice serve-layers`: a split directory's manifest.json and the files it names over HTTP.

Only the manifest and the files it names are served (anything else is a 404: no listing, no
path is ever built from the URL). Each file answers single byte ranges (206, 416 for one past
the end) and carries its manifest sha256 as ETag, so `If-Match` (412), `If-None-Match` (304)
and `If-Range` compare content, not modification times. Bytes sent are counted per file
(`GET /stats`), which is what a test uses to prove what a `pull` transferred. A changed
manifest.json is re-read on the next request, so a directory updated by `pull` is served as
its new version.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from ..errors import LemonsliceError
from ..gguf.constants import MANIFEST_NAME
from ..slicing.manifest import Manifest, parse_manifest

log = logging.getLogger(__name__)

__all__ = ["LayerServer", "Sent", "create_layers_app"]

CHUNK = 1 << 20
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


@dataclass(frozen=True)
class Sent:
    """One finished response: what was asked and how many body bytes went out."""

    name: str
    status: int
    start: int
    end: int  # exclusive; the range asked for
    size: int
    sent: int
    client: str

    def __str__(self) -> str:
        span = f" bytes {self.start}-{self.end - 1}/{self.size}" if self.status == 206 else ""
        short = "" if self.sent == self.end - self.start or self.status not in (200, 206) else " (cut short)"
        return f"{self.client} {self.name} {self.status}{span}: {self.sent} bytes sent{short}"


@dataclass
class _Served:
    """The manifest as read, and what it names."""

    raw: bytes
    etag: str
    files: dict[str, tuple[int, str]]  # name -> (size, sha256)
    fingerprint: tuple[int, int, int]


@dataclass
class _Pace:
    """A byte budget per second over all responses (None: unlimited)."""

    rate: int | None
    free_at: float = 0.0

    async def take(self, n: int) -> None:
        if not self.rate:
            return
        now = time.monotonic()
        start = max(self.free_at, now)
        self.free_at = start + n / self.rate
        await asyncio.sleep(start - now)


@dataclass
class LayerServer:
    """State of one served directory: the manifest, the byte counts, the pace."""

    directory: Path
    max_rate: int | None = None
    on_sent: Callable[[Sent], None] | None = None
    bytes_sent: dict[str, int] = field(default_factory=dict)
    requests: dict[str, int] = field(default_factory=dict)
    served: _Served | None = None

    def __post_init__(self) -> None:
        self.directory = Path(self.directory).resolve()
        self.pace = _Pace(self.max_rate)
        self.chunk = CHUNK if not self.max_rate else max(16 << 10, min(CHUNK, self.max_rate // 16))
        self.current()

    def current(self) -> _Served:
        """The manifest, re-read when its file changed; raises while it cannot be read (every
        request then answers 503 rather than serve files under a stale manifest)."""
        path = self.directory / MANIFEST_NAME
        st = os.stat(path)
        fp = (st.st_ino, st.st_size, st.st_mtime_ns)
        if self.served is None or self.served.fingerprint != fp:
            raw = path.read_bytes()
            m: Manifest = parse_manifest(raw, str(path))
            files = {f.name: (f.size, f.sha256) for f in m.files}
            self.served = _Served(raw, f'"{hashlib.sha256(raw).hexdigest()}"', files, fp)
        return self.served

    def count(self, name: str, n: int) -> None:
        self.bytes_sent[name] = self.bytes_sent.get(name, 0) + n

    def stats(self) -> dict[str, Any]:
        names = sorted(set(self.bytes_sent) | set(self.requests))
        return {"bytes_sent": sum(self.bytes_sent.values()), "requests": sum(self.requests.values()),
                "files": {n: {"bytes_sent": self.bytes_sent.get(n, 0), "requests": self.requests.get(n, 0)}
                          for n in names}}

    def finished(self, s: Sent) -> None:
        log.info("%s", s)
        if self.on_sent is not None:
            self.on_sent(s)


def _etag_matches(header: str | None, etag: str) -> bool:
    """If-None-Match: a list of (possibly weak) tags or `*`."""
    if header is None:
        return False
    tags = [t.strip().removeprefix("W/") for t in header.split(",")]
    return "*" in tags or etag in tags


def _byte_range(request: Request, size: int, etag: str) -> tuple[int, int] | None | str:
    """(start, end) of a single satisfiable range; None to send everything (no range, several
    ranges, a malformed one, or an If-Range that no longer matches); "416" for one past the end."""
    header = request.headers.get("range")
    if header is None or "," in header:
        return None
    if_range = request.headers.get("if-range")
    if if_range is not None and if_range.strip() != etag:
        return None
    m = _RANGE.fullmatch(header.strip())
    if m is None or m.group(1) == m.group(2) == "":
        return None
    first, last = m.group(1), m.group(2)
    if first == "":  # the last N bytes
        n = int(last)
        return (max(0, size - n), size) if n > 0 else "416"
    start = int(first)
    if last and int(last) < start:
        return None  # not a valid range: ignored, as RFC 9110 says
    if start >= size:
        return "416"
    return start, min(size, int(last) + 1) if last else size


class _FileBody(Response):
    """Bytes [start, end) of one file, read in chunks off the event loop and counted as they go.
    A client that leaves stops the reading (its disconnect is watched alongside)."""

    def __init__(self, server: LayerServer, name: str, path: Path, span: tuple[int, int], size: int,
                 status: int, headers: dict[str, str], client: str):
        super().__init__(status_code=status, headers=headers)
        self.server, self.name, self.path, self.span, self.size, self.client = server, name, path, span, size, client

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        start, end = self.span
        sent = 0
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        if scope["method"] == "HEAD":
            await send({"type": "http.response.body", "body": b""})
            return

        async def watch() -> None:
            # uvicorn drops what is sent after a disconnect silently; this notices it.
            while (await receive())["type"] != "http.disconnect":
                pass

        loop = asyncio.get_running_loop()
        watcher = asyncio.ensure_future(watch())
        fd = os.open(self.path, os.O_RDONLY)
        try:
            pos = start
            while pos < end and not watcher.done():
                n = min(self.server.chunk, end - pos)
                await self.server.pace.take(n)
                data = await loop.run_in_executor(None, os.pread, fd, n, pos)
                if not data or watcher.done():
                    break
                # Counted before it is handed over: a server killed mid-send never under-counts.
                self.server.count(self.name, len(data))
                sent += len(data)
                await send({"type": "http.response.body", "body": data, "more_body": pos + len(data) < end})
                pos += len(data)
            if pos < end and not watcher.done():
                # Returning before the body is complete makes uvicorn close the connection.
                log.warning("%s ended at byte %d, its manifest size is %d", self.path, pos, self.size)
        finally:
            watcher.cancel()
            os.close(fd)
            self.server.finished(Sent(self.name, self.status_code, start, end, self.size, sent, self.client))


def _file_response(server: LayerServer, request: Request, name: str, size: int, etag: str) -> Response:
    path = server.directory / name
    client = f"{request.client.host}:{request.client.port}" if request.client else "-"
    server.requests[name] = server.requests.get(name, 0) + 1
    try:
        st = os.stat(path)
        inside = path.resolve().parent == server.directory
    except OSError:
        st, inside = None, False
    if st is None or not inside or st.st_size != size:
        # The directory no longer holds what its manifest says (being rewritten, or damaged).
        return PlainTextResponse(f"{name} is not as the manifest says; try another peer\n", status_code=503)
    headers = {"etag": etag, "accept-ranges": "bytes", "content-type": "application/octet-stream"}
    if_match = request.headers.get("if-match")
    if if_match is not None and if_match.strip() != "*" and etag not in [t.strip() for t in if_match.split(",")]:
        # A client after another version of the file gets no body at all.
        server.finished(Sent(name, 412, 0, 0, size, 0, client))
        return PlainTextResponse("this peer holds another version\n", status_code=412, headers={"etag": etag})
    if _etag_matches(request.headers.get("if-none-match"), etag):
        return Response(status_code=304, headers={"etag": etag})
    span = _byte_range(request, size, etag)
    if span == "416":
        server.finished(Sent(name, 416, 0, 0, size, 0, client))
        return PlainTextResponse("range not satisfiable\n", status_code=416,
                                 headers={"content-range": f"bytes */{size}"})
    if span is None:
        headers["content-length"] = str(size)
        return _FileBody(server, name, path, (0, size), size, 200, headers, client)
    start, end = span
    headers |= {"content-length": str(end - start), "content-range": f"bytes {start}-{end - 1}/{size}"}
    return _FileBody(server, name, path, (start, end), size, 206, headers, client)


def create_layers_app(server: LayerServer) -> Starlette:
    """The app: GET/HEAD /manifest.json and /<file the manifest names>, GET /stats."""

    async def stats(request: Request) -> Response:
        return JSONResponse(server.stats())

    async def serve(request: Request) -> Response:
        name = request.path_params["name"]
        try:
            cur = server.current()
        except (OSError, LemonsliceError) as e:
            log.warning("cannot read the manifest of %s: %s", server.directory, e)
            return PlainTextResponse("manifest unavailable\n", status_code=503)
        if name == MANIFEST_NAME:
            server.requests[name] = server.requests.get(name, 0) + 1
            if _etag_matches(request.headers.get("if-none-match"), cur.etag):
                return Response(status_code=304, headers={"etag": cur.etag})
            server.count(name, 0 if request.method == "HEAD" else len(cur.raw))
            return Response(cur.raw, media_type="application/json", headers={"etag": cur.etag})
        if name not in cur.files:
            return PlainTextResponse("not found\n", status_code=404)
        size, sha = cur.files[name]
        return _file_response(server, request, name, size, f'"{sha}"')

    return Starlette(routes=[Route("/stats", stats, methods=["GET"]),
                             Route("/{name:path}", serve, methods=["GET", "HEAD"])])
