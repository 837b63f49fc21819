"""Peer commands: serve-layers (a split directory over HTTP) and pull (fetch what differs)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from ..errors import LemonsliceError
from ._app import _human, _parse_size, _progress, app, err, out
from .serve import _check_port


@app.command("serve-layers")
def serve_layers(
    directory: Path = typer.Argument(
        ..., metavar="DIR", help="Split directory (manifest.json and the files it names)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (loopback unless told otherwise)."),
    port: int = typer.Option(8090, "--port", help="TCP port."),
    max_rate: Optional[str] = typer.Option(
        None, "--max-rate", metavar="SIZE",
        help="Cap on the bytes sent per second over all clients, e.g. 50MB (default: none)."),
) -> None:
    """Serve a split directory to `lemonslice pull`: its manifest.json and the files it names,
    with byte ranges and each file's sha256 as ETag; GET /stats gives the bytes sent per file."""
    import uvicorn

    from ..server.layers import LayerServer, create_layers_app
    from ..slicing.integrity import check_split

    if not 0 < port < 65536:
        raise LemonsliceError(f"--port must be in 1..65535, got {port}")
    rate = _parse_size(max_rate) if max_rate is not None else None
    if rate is not None and rate < 1:
        raise LemonsliceError(f"--max-rate must be at least 1 byte per second, got {max_rate}")
    for w in check_split(directory):
        err.print(f"warning: {w}", highlight=False)
    _check_port(host, port)
    server = LayerServer(directory, max_rate=rate, on_sent=lambda s: err.print(str(s), highlight=False))
    files = server.current().files
    size = sum(s for s, _ in files.values())
    err.print(f"serving {directory} ({len(files)} files, {_human(size)}) on http://{host}:{port}/; "
              f"bytes sent per file: http://{host}:{port}/stats", highlight=False)
    uvicorn.run(create_layers_app(server), host=host, port=port, log_level="warning", access_log=False,
                timeout_graceful_shutdown=2)


@app.command()
def pull(
    urls: List[str] = typer.Argument(..., metavar="URL", help="Peers running serve-layers (the first that answers "
                                                              "gives the manifest; files are spread over all)."),
    dst: Path = typer.Argument(..., help="Split directory to bring to the peers' version (created if missing)."),
    connections: int = typer.Option(4, "--connections", "-j", help="Files fetched at once."),
    retries: int = typer.Option(
        2, "--retries", help="Further rounds over the peers for a file whose connection dropped (0: none)."),
    timeout: float = typer.Option(30.0, "--timeout", help="Seconds a connect or a read may wait (connect: 5 at most)."),
) -> None:
    """Fetch from peers only the files DST lacks or holds in another version, resuming what an
    interrupted pull left; every file is checked against the manifest's sha256 before it goes
    in, the manifest last. Until then DST stays as it was."""
    from ..slicing.pull import pull as pull_split

    def warn(w: str) -> None:
        err.print(f"warning: {w}", highlight=False)

    with _progress("pull") as cb:
        def progress(done: int, total: int, files_done: int, files_total: int) -> None:
            cb(done, total, f"pull {files_done}/{files_total} files")

        r = pull_split(urls, dst, connections=connections, retries=retries, timeout=timeout, progress=progress,
                       on_warning=warn)
    width = max((len(n) for n in r.fetched + r.removed), default=0)
    for name in r.fetched:
        out.print(f"fetched  {name:<{width}}  {_human(r.manifest.file(name).size)}", highlight=False)
    for name in r.removed:
        out.print(f"removed  {name}", highlight=False)
    resumed = f", {_human(r.resumed_bytes)} of it resumed" if r.resumed_bytes else ""
    removed = f", removed {len(r.removed)}" if r.removed else ""
    peers = "; ".join(f"{p} {_human(n)}" for p, n in r.received.items() if n) or "nothing"
    out.print(f"pulled {r.source} -> {dst}: fetched {len(r.fetched)} file(s){resumed}, kept {len(r.kept)}{removed}; "
              f"received: {peers}", highlight=False)
