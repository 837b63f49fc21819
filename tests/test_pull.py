"""`serve-layers` and `pull`: only the changed layers travel, and faults leave DST usable.

Two versions of a 12-layer synthetic qwen35moe split differ in the bytes of layers 2, 5 and 9
(surgery `replace` with blocks of a model drawn from another seed). Servers run on 127.0.0.1,
in a thread or a subprocess the test starts and stops; what they sent is read from /stats.
"""

from __future__ import annotations

import dataclasses
import http.server
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx
import pytest
import uvicorn

from lemonslice.server.layers import LayerServer, create_layers_app
from lemonslice.slicing import split_gguf, verify_split
from lemonslice.surgery import surgery
from lemonslice.testing import tiny_qwen35moe, write_synthetic

LEMONSLICE = str(Path(sys.executable).with_name("lemonslice"))
CHANGED = ["layer_0002.gguf", "layer_0005.gguf", "layer_0009.gguf"]
RUN_S = 60  # bound on any one command


@pytest.fixture(scope="module")
def versions(tmp_path_factory) -> tuple[Path, Path]:
    """(old, new): split directories that differ in exactly the files CHANGED (and the manifest)."""
    d = tmp_path_factory.mktemp("versions")
    cfg = tiny_qwen35moe(n_layer=12)
    a = write_synthetic(d / "a.gguf", cfg)
    b = write_synthetic(d / "b.gguf", dataclasses.replace(cfg, seed=1))
    split_gguf(a, d / "old")
    surgery("; ".join(f"replace {i}={b}:{i}" for i in (2, 5, 9)), d / "old", d / "new")
    differ = sorted(p.name for p in (d / "new").glob("*.gguf") if p.read_bytes() != (d / "old" / p.name).read_bytes())
    assert differ == CHANGED
    return d / "old", d / "new"


@pytest.fixture
def dst(versions, tmp_path) -> Path:
    """A copy of the old version to pull into."""
    out = tmp_path / "dst"
    shutil.copytree(versions[0], out)
    return out


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}


def gguf_bytes(directory: Path) -> dict[str, bytes]:
    return {n: b for n, b in snapshot(directory).items() if n.endswith(".gguf") or n == "manifest.json"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stats(url: str) -> dict[str, int]:
    """Bytes sent per file name, from the server's /stats."""
    files = httpx.get(f"{url}/stats", timeout=5).json()["files"]
    return {n: v["bytes_sent"] for n, v in files.items()}


def wait_up(url: str, alive=lambda: True) -> None:  # noqa: ANN001
    deadline = time.monotonic() + 30
    while True:
        try:
            httpx.get(f"{url}/stats", timeout=2)
            return
        except httpx.TransportError:
            assert alive(), "the server died"
            assert time.monotonic() < deadline, "the server did not start in 30 s"
            time.sleep(0.05)


@contextmanager
def layer_server(directory: Path, **kw) -> Iterator[str]:  # noqa: ANN003
    """serve-layers' app under uvicorn in a thread of this process."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_layers_app(LayerServer(directory, **kw)), host="127.0.0.1",
                                           port=port, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_up(url, thread.is_alive)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def start_cli_server(directory: Path, port: int, *extra: str) -> subprocess.Popen:
    """`lemonslice serve-layers` in a subprocess; its stderr holds a line per response."""
    p = subprocess.Popen([LEMONSLICE, "serve-layers", str(directory), "--port", str(port), *extra],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_up(f"http://127.0.0.1:{port}", lambda: p.poll() is None)
    return p


@contextmanager
def raw_server(manifest: bytes, files: dict[str, bytes], cut: bool = False) -> Iterator[str]:
    """A plain http.server peer (no ranges, no ETag) serving `manifest` and `files`; with `cut`
    it sends half of each file under the whole file's Content-Length, then closes."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            name = self.path.lstrip("/")
            body = manifest if name == "manifest.json" else files.get(name)
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2] if cut and name != "manifest.json" else body)
            self.close_connection = True

        def log_message(self, *args) -> None:  # noqa: ANN002
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=10)


def cli(*args: str, preexec=None) -> subprocess.CompletedProcess:  # noqa: ANN001
    return subprocess.run([LEMONSLICE, *map(str, args)], capture_output=True, text=True, timeout=RUN_S,
                          preexec_fn=preexec)


def assert_pulled(dst: Path, new: Path) -> None:
    assert verify_split(dst) == []
    assert gguf_bytes(dst) == gguf_bytes(new)
    assert not (dst / ".pull").exists()


# ---- the server ------------------------------------------------------------------------------


def test_serve_layers_ranges_etags_and_nothing_else(versions):
    new = versions[1]
    manifest = json.loads((new / "manifest.json").read_text())
    sha = next(f["sha256"] for f in manifest["files"] if f["name"] == "layer_0002.gguf")
    data = (new / "layer_0002.gguf").read_bytes()
    size = len(data)
    with layer_server(new) as url, httpx.Client(base_url=url, timeout=10) as c:
        r = c.get("/layer_0002.gguf", headers={"Range": "bytes=100-"})
        assert r.status_code == 206 and r.content == data[100:] and r.headers["etag"] == f'"{sha}"'
        assert r.headers["content-range"] == f"bytes 100-{size - 1}/{size}"
        assert c.get("/layer_0002.gguf", headers={"Range": "bytes=-10"}).content == data[-10:]
        r = c.get("/layer_0002.gguf", headers={"Range": f"bytes={size}-"})
        assert r.status_code == 416 and r.headers["content-range"] == f"bytes */{size}"
        assert c.get("/layer_0002.gguf", headers={"If-None-Match": f'"{sha}"'}).status_code == 304
        assert c.get("/layer_0002.gguf", headers={"If-Match": '"' + "0" * 64 + '"'}).status_code == 412
        assert c.get("/layer_0002.gguf", headers={"If-Match": f'"{sha}"'}).content == data
        # An If-Range for another version gets the whole (current) file.
        r = c.get("/layer_0002.gguf", headers={"Range": "bytes=5-9", "If-Range": '"' + "0" * 64 + '"'})
        assert r.status_code == 200 and r.content == data
        r = c.get("/layer_0002.gguf", headers={"Range": "bytes=5-9", "If-Range": f'"{sha}"'})
        assert (r.status_code, r.content) == (206, data[5:10])
        assert c.get("/manifest.json").content == (new / "manifest.json").read_bytes()
        for path in ["/", "/.lemonslice-verified.json", "/../old/manifest.json", "/%2e%2e/old/manifest.json",
                     "/layer_0099.gguf", "/layer_0002.gguf/x", "/etc/passwd"]:
            assert c.get(path).status_code == 404, path
        sent = stats(url)
    assert sent["layer_0002.gguf"] == (size - 100) + 10 + size + 5 + size
    assert sent["manifest.json"] == (new / "manifest.json").stat().st_size


# ---- pull ------------------------------------------------------------------------------------


def test_pull_transfers_only_the_changed_layers(versions, dst):
    old, new = versions
    with layer_server(new) as url:
        r = cli("pull", url, dst)
        assert r.returncode == 0, r.stderr
        sent = stats(url)
        again = cli("pull", url, dst)
        assert again.returncode == 0, again.stderr
        sent_again = stats(url)
    assert "fetched 3 file(s)" in r.stdout and "kept 10" in r.stdout
    assert sorted(ln.split()[1] for ln in r.stdout.splitlines() if ln.startswith("fetched ")) == CHANGED
    assert {n: b for n, b in sent.items() if n != "manifest.json"} == {n: (new / n).stat().st_size for n in CHANGED}
    assert_pulled(dst, new)
    assert cli("verify", dst).returncode == 0
    # Up to date: only the manifest travels.
    assert "fetched 0 file(s)" in again.stdout
    assert {n: b - sent.get(n, 0) for n, b in sent_again.items() if b != sent.get(n, 0)} == {
        "manifest.json": (new / "manifest.json").stat().st_size}


def test_pull_into_a_new_directory_and_back_to_the_old_version(versions, tmp_path):
    old, new = versions
    fresh = tmp_path / "fresh"
    with layer_server(new) as url:
        assert cli("pull", url, fresh).returncode == 0
    assert_pulled(fresh, new)
    with layer_server(old) as url:
        r = cli("pull", url, fresh)
        assert r.returncode == 0, r.stderr
        assert set(stats(url)) == {"manifest.json", *CHANGED}
    assert_pulled(fresh, old)

    # A version with fewer layers: the files it no longer names go, after its manifest is in.
    short = tmp_path / "short"
    split_gguf(write_synthetic(tmp_path / "short.gguf", tiny_qwen35moe(n_layer=10)), short)
    with layer_server(short) as url:
        r = cli("pull", url, fresh)
        assert r.returncode == 0, r.stderr
    assert "removed 2" in r.stdout
    assert_pulled(fresh, short)
    assert not (fresh / "layer_0010.gguf").exists() and not (fresh / "layer_0011.gguf").exists()


@pytest.mark.parametrize("direct", [True, False])
def test_pull_writes_direct_where_it_can_and_buffered_where_not(versions, tmp_path, monkeypatch, direct):
    """Parts are written with O_DIRECT where the file system takes it, else through the page
    cache (no O_DIRECT here: as on a file system that refuses it); files whose sizes are not
    whole pages end in a buffered tail either way. Both give the new version, verified."""
    from lemonslice.slicing import pull as pull_mod

    old, new = versions
    if not direct:
        monkeypatch.delattr(os, "O_DIRECT")
    opened: list[bool] = []
    real_open = pull_mod._open_direct

    def spy(path):  # noqa: ANN001, ANN202
        fd = real_open(path)
        opened.append(pull_mod._direct(fd))
        return fd

    monkeypatch.setattr(pull_mod, "_open_direct", spy)
    assert any((new / n).stat().st_size % 4096 for n in CHANGED)
    with layer_server(new) as url:
        pull_mod.pull([url], tmp_path / "dst")
    assert opened and set(opened) == {direct}
    assert_pulled(tmp_path / "dst", new)


# A serve-layers process that also appends every count to a file as it makes it, so what it
# handed out is known after a SIGKILL (its /stats dies with it).
_LOGGED_SERVER = """
import os, sys, uvicorn
from lemonslice.server.layers import LayerServer, create_layers_app
directory, port, rate, log = sys.argv[1:]
fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
class Logged(LayerServer):
    def count(self, name, n):
        super().count(name, n)
        os.write(fd, f"{name} {n}\\n".encode())
uvicorn.run(create_layers_app(Logged(directory, max_rate=int(rate))), host="127.0.0.1", port=int(port),
            log_level="warning")
"""


def test_killed_server_resume_sends_only_the_rest(versions, dst, tmp_path):
    old, new = versions
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    sizes = {n: (new / n).stat().st_size for n in CHANGED}
    log = tmp_path / "counts.log"
    # 60 KB/s over all three files, read 16 KiB at a time: the kill lands mid-file.
    srv = subprocess.Popen([sys.executable, "-c", _LOGGED_SERVER, str(new), str(port), "60000", str(log)])
    read_buffer = 16 << 10
    first = None
    try:
        wait_up(url, lambda: srv.poll() is None)
        first = subprocess.Popen([LEMONSLICE, "pull", url, str(dst), "--retries", "0"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + RUN_S
        while sum(stats(url).get(n, 0) for n in CHANGED) < 0.4 * sum(sizes.values()):
            assert time.monotonic() < deadline and first.poll() is None
            time.sleep(0.02)
    finally:
        srv.kill()
        srv.wait(timeout=10)
        if first is not None and sys.exc_info()[0] is not None:
            first.kill()
    _, err1 = first.communicate(timeout=RUN_S)
    sent1: dict[str, int] = {}
    for line in log.read_text().splitlines():
        name, n = line.split()
        sent1[name] = sent1.get(name, 0) + int(n)
    assert first.returncode == 1, err1
    assert err1.strip().splitlines()[-1].startswith("error: ") and url in err1
    assert gguf_bytes(dst) == gguf_bytes(old), "the interrupted pull changed DST"
    parts = {p.name.removesuffix(".part"): p.stat().st_size for p in (dst / ".pull").glob("*.part")}
    assert sorted(parts) == CHANGED and all(0 < parts[n] < sizes[n] for n in CHANGED), parts

    srv = start_cli_server(new, port)
    try:
        r = cli("pull", url, dst)
        sent2 = stats(url)
    finally:
        srv.send_signal(signal.SIGTERM)
        _, log2 = srv.communicate(timeout=10)
    assert r.returncode == 0, r.stderr
    assert "resumed" in r.stdout
    for n, size in sizes.items():
        assert f" {n} 206 bytes {parts[n]}-{size - 1}/{size}: {size - parts[n]} bytes sent" in log2, log2
        assert sent2[n] == size - parts[n]
        # The killed server may have handed out bytes that never reached the client: at most one read.
        assert size <= sent1[n] + sent2[n] <= size + read_buffer, (n, size, sent1[n], sent2[n])
    assert_pulled(dst, new)


def test_bad_bytes_from_one_peer_are_fetched_from_the_other(versions, dst, tmp_path):
    old, new = versions
    bad = tmp_path / "bad"
    shutil.copytree(new, bad)
    data = bytearray((bad / "layer_0002.gguf").read_bytes())
    data[-100] ^= 0xFF  # same size, manifest unchanged: only the hash tells
    (bad / "layer_0002.gguf").write_bytes(data)
    with layer_server(bad) as bad_url, layer_server(new) as good_url:
        # The bad peer comes first, and files are spread from it: it is asked for layer_0002.
        r = cli("pull", bad_url, good_url, dst)
        assert r.returncode == 0, r.stderr
        assert stats(bad_url)["layer_0002.gguf"] == len(data)
        assert stats(good_url)["layer_0002.gguf"] == len(data)
    warnings = [ln for ln in r.stderr.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1 and bad_url in warnings[0] and "layer_0002.gguf" in warnings[0], r.stderr
    assert "sent bad bytes" in warnings[0]
    assert_pulled(dst, new)

    # With only the bad peer, the pull fails naming it, and DST stays the old version.
    again = tmp_path / "again"
    shutil.copytree(old, again)
    with layer_server(bad) as bad_url:
        r = cli("pull", bad_url, again)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1].startswith(f"error: layer_0002.gguf: no peer served it intact ({bad_url}")
    assert gguf_bytes(again) == gguf_bytes(old)


def test_truncated_response_is_finished_from_another_peer(versions, dst):
    old, new = versions
    files = {n: (new / n).read_bytes() for n in CHANGED}
    with raw_server((new / "manifest.json").read_bytes(), files, cut=True) as cut_url, layer_server(new) as url:
        r = cli("pull", cut_url, url, dst)
        assert r.returncode == 0, r.stderr
        sent = stats(url)
    warned = [ln for ln in r.stderr.splitlines() if ln.startswith("warning:")]
    assert warned and all(cut_url in ln and "connection closed at byte" in ln for ln in warned), r.stderr
    # The files the cut peer started were resumed from the good one: half of each came from it.
    started = [n for n in CHANGED if any(n in ln for ln in warned)]
    assert started
    for n in started:
        assert sent[n] == len(files[n]) - len(files[n]) // 2
    assert_pulled(dst, new)


@pytest.mark.parametrize("bad_name", ["../x", "ABSOLUTE"])
def test_manifest_naming_a_path_outside_is_refused_before_any_write(versions, dst, tmp_path, bad_name):
    old, new = versions
    outside = tmp_path / "outside-x"
    name = str(outside) if bad_name == "ABSOLUTE" else bad_name
    m = json.loads((new / "manifest.json").read_text())
    m["files"][3]["name"] = name
    before = snapshot(dst)
    fresh = tmp_path / "fresh"
    with raw_server(json.dumps(m).encode(), {name: b"x" * 10}) as url:
        r = cli("pull", url, dst)
        r_fresh = cli("pull", url, fresh)
    for res in (r, r_fresh):
        assert res.returncode == 1
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and repr(name) in lines[0], res.stderr
    assert snapshot(dst) == before and sorted(os.listdir(dst)) == sorted(before)
    assert not fresh.exists() and not outside.exists() and not (tmp_path / "x").exists()


def _small_file_limit() -> None:
    # Writes past 64 KiB fail with EFBIG, as they would on a full disk with ENOSPC.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))


def test_full_disk_leaves_the_old_model_and_the_next_run_finishes(versions, dst):
    old, new = versions
    assert all((new / n).stat().st_size > 64 << 10 for n in CHANGED)
    with layer_server(new) as url:
        r = cli("pull", url, dst, preexec=_small_file_limit)
        assert r.returncode == 1
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: cannot write "), r.stderr
        assert "File too large" in lines[0] and f"{dst} is unchanged" in lines[0]
        assert gguf_bytes(dst) == gguf_bytes(old)
        assert verify_split(dst) == []  # .pull/ is not part of the split
        assert cli("verify", dst).returncode == 0
        done = cli("pull", url, dst)
    assert done.returncode == 0, done.stderr
    assert "resumed" in done.stdout
    assert_pulled(dst, new)


def test_a_part_left_for_another_version_is_discarded(versions, dst):
    old, new = versions
    stage = dst / ".pull"
    stage.mkdir()
    (stage / "layer_0005.gguf.part").write_bytes(b"\0" * 5000)
    (stage / "layer_0005.gguf.part.json").write_text(json.dumps({"sha256": "0" * 64, "size": 93120}))
    (stage / "layer_0007.gguf.part").write_bytes(b"stale")  # a file this version does not fetch
    with layer_server(new) as url:
        r = cli("pull", url, dst)
        assert r.returncode == 0, r.stderr
        assert stats(url)["layer_0005.gguf"] == (new / "layer_0005.gguf").stat().st_size
    assert "resumed" not in r.stdout
    assert_pulled(dst, new)


def test_pull_refuses_a_directory_with_other_files(versions, dst):
    (dst / "notes.txt").write_text("mine")
    with layer_server(versions[1]) as url:
        r = cli("pull", url, dst)
        assert set(stats(url)) <= {"manifest.json"}
    assert r.returncode == 1 and "notes.txt" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_files_renamed_before_a_kill_are_not_fetched_again(versions, dst):
    # What a pull SIGKILLed among its renames leaves: a new file beside the old manifest and stamp.
    old, new = versions
    shutil.copyfile(new / "layer_0005.gguf", dst / "layer_0005.gguf")
    with layer_server(new) as url:
        r = cli("pull", url, dst)
        assert r.returncode == 0, r.stderr
        assert set(stats(url)) == {"manifest.json", "layer_0002.gguf", "layer_0009.gguf"}
    assert "kept 11" in r.stdout
    assert_pulled(dst, new)


def test_a_peer_with_another_version_is_skipped_by_its_etag(versions, dst):
    old, new = versions
    with layer_server(new) as url, layer_server(old) as old_url:
        # The manifest comes from the first peer; the second, asked first for every other file,
        # holds the old version: it answers If-Match with 412 and sends no file body.
        r = cli("pull", url, old_url, dst)
        assert r.returncode == 0, r.stderr
        assert sum(stats(old_url).values()) == 0  # asked (If-Match), answered 412, nothing sent
    warned = [ln for ln in r.stderr.splitlines() if ln.startswith("warning:")]
    assert warned and all(old_url in ln and "holds another version" in ln for ln in warned), r.stderr
    assert_pulled(dst, new)
