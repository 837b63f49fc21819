"""A bare HTTP/1.1 GET whose body is received straight into the caller's buffer.

`pull` moves gigabytes through this: httpx hands a body over in 64 KiB pieces, each through
h11's parser and two copies, which cost about 0.5 CPU-seconds per GB, as much as the sha256
of the same bytes; on a two-core machine that halved pull's speed against curl. Here a body
costs one `recv_into` per buffer. Plain `Content-Length` bodies only (or up to the close),
one request per connection; `http://` and `https://`.
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

from .. import __version__

_MAX_HEAD = 64 << 10


class FetchError(Exception):
    """The peer broke HTTP (a connection or protocol problem, never a local write)."""


@dataclass
class Reply:
    status: int
    headers: dict[str, str]  # names in lower case
    length: int | None  # Content-Length; None: the body runs to the close
    sock: socket.socket
    pending: bytes  # body bytes that came with the headers

    def read_into(self, view: memoryview) -> int:
        """Up to len(view) body bytes into `view`; 0 when the peer closed."""
        if self.pending:
            n = min(len(view), len(self.pending))
            view[:n] = self.pending[:n]
            self.pending = self.pending[n:]
            return n
        try:
            return self.sock.recv_into(view)
        except TimeoutError:
            raise FetchError("timed out") from None
        except OSError as e:
            raise FetchError(e.strerror or str(e)) from None

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "Reply":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _connect(url: str, connect_s: float, timeout: float) -> tuple[socket.socket, str]:
    u = urlsplit(url)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise FetchError(f"not an http(s) URL: {url}")
    port = u.port or (443 if u.scheme == "https" else 80)
    try:
        sock = socket.create_connection((u.hostname, port), timeout=connect_s)
    except TimeoutError:
        raise FetchError("cannot connect (timed out)") from None
    except OSError as e:
        raise FetchError(f"cannot connect ({e.strerror or e})") from None
    sock.settimeout(timeout)
    if u.scheme == "https":
        try:
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=u.hostname)
        except (OSError, ssl.SSLError) as e:
            sock.close()
            raise FetchError(f"TLS: {e}") from None
    target = quote(u.path or "/") + (f"?{u.query}" if u.query else "")
    return sock, f"GET {target} HTTP/1.1\r\nHost: {u.netloc}\r\n"


def _read_head(sock: socket.socket) -> tuple[str, bytes]:
    head = bytearray()
    while (end := head.find(b"\r\n\r\n")) < 0:
        if len(head) > _MAX_HEAD:
            raise FetchError("response headers longer than 64 KiB")
        data = sock.recv(_MAX_HEAD)
        if not data:
            raise FetchError("connection closed before the response headers")
        head += data
    return head[:end].decode("latin-1"), bytes(head[end + 4:])


def get(url: str, headers: dict[str, str], *, connect_s: float, timeout: float) -> Reply:
    """Send GET `url` and read the response head; the body is left to `Reply.read_into`.
    Every network or protocol failure is a FetchError."""
    sock, request = _connect(url, connect_s, timeout)
    try:
        extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        sock.sendall((f"{request}User-Agent: lemonslice/{__version__}\r\nAccept-Encoding: identity\r\n"
                      f"Connection: close\r\n{extra}\r\n").encode("latin-1"))
        text, pending = _read_head(sock)
        lines = text.split("\r\n")
        version, _, rest = lines[0].partition(" ")
        if not version.startswith("HTTP/1.") or not rest[:3].isdigit():
            raise FetchError(f"not an HTTP/1 response ({lines[0][:60]!r})")
        fields = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            fields[name.strip().lower()] = value.strip()
        if "chunked" in fields.get("transfer-encoding", "").lower():
            raise FetchError("the body is chunked; serve the split with lemonslice serve-layers")
        length = fields.get("content-length")
        if length is not None and not length.isdigit():
            raise FetchError(f"bad Content-Length {length!r}")
        return Reply(int(rest[:3]), fields, None if length is None else int(length), sock, pending)
    except TimeoutError:
        sock.close()
        raise FetchError("timed out") from None
    except OSError as e:
        sock.close()
        raise FetchError(e.strerror or str(e)) from None
    except BaseException:
        sock.close()
        raise
