"""Dataset downloader against a local HTTP server (no network): resume, checksums, extraction."""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import io
import re
import shutil
import socket
import threading
import time
import urllib.parse
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tifffile

from clidim_jax.data import download
from clidim_jax.data.download import Dataset, DownloadError, fetch, locate

TIF = "sample_attempt2.tif"
NESTED = f"Mouse actin/Mouse actin/{TIF}"
ARCHIVE = "Mouse actin.zip"


class _State:
    """What the test server serves and what it saw."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}  # URL path -> body
        self.requests: list[dict[str, str | None]] = []
        self.cut_after: int | None = None  # next response: full Content-Length, then close early
        self.ignore_range = False  # always answer 200 with the whole file


class _Handler(http.server.BaseHTTPRequestHandler):
    state: _State  # set on the subclass made per server

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        st = self.state
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        rng = self.headers.get("Range")
        st.requests.append({"path": path, "range": rng})
        if path not in st.files:
            self.send_error(404, "Not Found")
            return
        data = st.files[path]
        start = 0
        m = re.fullmatch(r"bytes=(\d+)-", rng or "")
        if m and not st.ignore_range:
            start = int(m.group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if st.cut_after is not None:  # a broken download: announce everything, send a part
            body, st.cut_after = body[: st.cut_after], None
            self.close_connection = True
        self.wfile.write(body)
        self.wfile.flush()


@pytest.fixture
def server():
    """A threaded HTTP server on 127.0.0.1:<free port>; yields (state, base_url)."""
    state = _State()
    handler = type("Handler", (_Handler,), {"state": state})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        yield state, f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def _stack(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 4000, (3, 16, 16), dtype=np.uint16)


def _zip_bytes(tmp_path: Path, members: dict[str, bytes | np.ndarray]) -> bytes:
    """A zip (stored, not compressed) whose members are raw bytes or arrays written as TIFF."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name, content in members.items():
            if isinstance(content, np.ndarray):
                tif = tmp_path / "member.tif"
                tifffile.imwrite(tif, content, photometric="minisblack")
                content = tif.read_bytes()
            zf.writestr(name, content)
    return buf.getvalue()


def _dataset(sha256: str | None) -> Dataset:
    return Dataset(
        name="actin-test",
        record=123,
        archive=ARCHIVE,
        tif_name=TIF,
        shape=(3, 16, 16),
        sha256=sha256,
        description="test entry",
    )


@pytest.fixture
def served(server, tmp_path):
    """The server with a nested-folder zip holding a 3x16x16 uint16 TIFF; a matching Dataset."""
    state, base = server
    stack = _stack()
    data = _zip_bytes(tmp_path, {"Mouse actin/Mouse actin/": b"", NESTED: stack, "README": b"x"})
    state.files["/" + ARCHIVE] = data
    ds = _dataset(hashlib.sha256(data).hexdigest())
    return state, base, ds, data, stack, tmp_path / "root"


def test_success_nested_folder(served):
    state, base, ds, data, stack, root = served
    path = fetch(ds, root, base_url=base, progress=False)
    assert path == root / ds.name / NESTED
    np.testing.assert_array_equal(tifffile.imread(path), stack)
    assert (root / ds.name / ARCHIVE).read_bytes() == data
    assert not (root / ds.name / (ARCHIVE + ".part")).exists()
    assert state.requests == [{"path": "/" + ARCHIVE, "range": None}]
    record = (root / ds.name / "SHA256").read_text()
    assert record == f"{ds.sha256}  {ARCHIVE}\n"
    assert locate(ds, root) == path
    # Second call: found on disk, no request.
    assert fetch(ds, root, base_url=base, progress=False) == path
    assert len(state.requests) == 1


def test_resume_after_cut(served):
    state, base, ds, data, _, root = served
    state.cut_after = 700
    with pytest.raises(DownloadError, match="interrupted"):
        fetch(ds, root, base_url=base, progress=False, retries=0)
    part = root / ds.name / (ARCHIVE + ".part")
    assert part.read_bytes() == data[:700]
    path = fetch(ds, root, base_url=base, progress=False, retries=0)
    assert state.requests[-1]["range"] == "bytes=700-"
    assert (root / ds.name / ARCHIVE).read_bytes() == data
    assert not part.exists()
    assert path.is_file()


def test_resume_within_one_call(served):
    state, base, ds, data, _, root = served
    state.cut_after = 300
    fetch(ds, root, base_url=base, progress=False)  # default retries resume by themselves
    assert [r["range"] for r in state.requests] == [None, "bytes=300-"]
    assert (root / ds.name / ARCHIVE).read_bytes() == data


def test_server_ignoring_range_restarts(served):
    state, base, ds, data, _, root = served
    state.cut_after = 500
    with pytest.raises(DownloadError):
        fetch(ds, root, base_url=base, progress=False, retries=0)
    state.ignore_range = True
    fetch(ds, root, base_url=base, progress=False, retries=0)
    assert state.requests[-1]["range"] == "bytes=500-"  # asked, got 200, started over
    assert (root / ds.name / ARCHIVE).read_bytes() == data


def test_complete_part_resumes_via_416(served):
    state, base, ds, data, _, root = served
    (root / ds.name).mkdir(parents=True)
    (root / ds.name / (ARCHIVE + ".part")).write_bytes(data)  # e.g. killed before the rename
    path = fetch(ds, root, base_url=base, progress=False)
    assert state.requests[-1]["range"] == f"bytes={len(data)}-"
    assert path.is_file()


def test_checksum_mismatch(served):
    _, base, ds, data, _, root = served
    wrong = "0" * 64
    with pytest.raises(DownloadError) as ei:
        fetch(dataclasses.replace(ds, sha256=wrong), root, base_url=base, progress=False)
    msg = str(ei.value)
    assert wrong in msg and hashlib.sha256(data).hexdigest() in msg and ARCHIVE in msg
    assert not (root / ds.name / ARCHIVE).exists()
    assert not (root / ds.name / (ARCHIVE + ".part")).exists()
    assert locate(ds, root) is None


def test_unknown_sha_recorded_then_enforced(served):
    state, base, ds, data, _, root = served
    ds = dataclasses.replace(ds, sha256=None)
    fetch(ds, root, base_url=base, progress=False)
    record = root / ds.name / "SHA256"
    digest = hashlib.sha256(data).hexdigest()
    assert record.read_text() == f"{digest}  {ARCHIVE}\n"
    # Everything but the record removed; the server now sends different bytes.
    for p in (root / ds.name).iterdir():
        if p.name != "SHA256":
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink()
    other = _zip_bytes(root.parent, {NESTED: _stack(seed=1)})
    state.files["/" + ARCHIVE] = other
    with pytest.raises(DownloadError) as ei:
        fetch(ds, root, base_url=base, progress=False)
    msg = str(ei.value)
    assert digest in msg and hashlib.sha256(other).hexdigest() in msg and "SHA256" in msg
    assert not (root / ds.name / ARCHIVE).exists()
    assert not (root / ds.name / (ARCHIVE + ".part")).exists()
    assert record.read_text() == f"{digest}  {ARCHIVE}\n"


def test_not_a_zip_rejected(server, tmp_path):
    state, base = server
    state.files["/" + ARCHIVE] = b"<html>maintenance</html>"
    ds = _dataset(None)
    with pytest.raises(DownloadError, match="not a zip archive"):
        fetch(ds, tmp_path, base_url=base, progress=False)
    assert sorted(p.name for p in (tmp_path / ds.name).iterdir()) == []


def test_already_extracted_no_request(server, tmp_path):
    state, base = server
    ds = _dataset(None)
    target = tmp_path / ds.name / "somewhere" / "deeper" / TIF
    target.parent.mkdir(parents=True)
    tifffile.imwrite(target, _stack(), photometric="minisblack")
    assert fetch(ds, tmp_path, base_url=base, progress=False) == target
    assert state.requests == []


def test_archive_placed_by_hand_is_extracted(served):
    state, base, ds, data, stack, root = served
    (root / ds.name).mkdir(parents=True)
    (root / ds.name / ARCHIVE).write_bytes(data)
    path = fetch(ds, root, base_url=base, progress=False)
    np.testing.assert_array_equal(tifffile.imread(path), stack)
    assert state.requests == []


def test_no_network_fails_fast(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ds = _dataset(None)
    t0 = time.monotonic()
    with pytest.raises(DownloadError) as ei:
        fetch(ds, tmp_path, base_url=f"http://127.0.0.1:{port}", progress=False, timeout=3)
    assert time.monotonic() - t0 < 5
    msg = str(ei.value)
    assert "cannot reach" in msg and "by hand" in msg
    assert ds.record_url in msg and ARCHIVE in msg and TIF in msg
    assert str(tmp_path / ds.name) in msg


def test_http_404(server, tmp_path):
    _, base = server
    with pytest.raises(DownloadError, match="404"):
        fetch(_dataset(None), tmp_path, base_url=base, progress=False)


@pytest.mark.parametrize("evil", ["../evil.txt", "Mouse actin/../../evil.txt", "/abs_evil.txt"])
def test_zip_path_traversal_rejected(server, tmp_path, evil):
    state, base = server
    data = _zip_bytes(tmp_path, {NESTED: _stack(), evil: b"pwned"})
    state.files["/" + ARCHIVE] = data
    root = tmp_path / "a" / "root"
    with pytest.raises(DownloadError, match="unsafe path"):
        fetch(_dataset(None), root, base_url=base, progress=False)
    assert not list(tmp_path.rglob("*evil.txt"))
    assert locate(_dataset(None), root) is None


def test_missing_tif_lists_contents(server, tmp_path):
    state, base = server
    state.files["/" + ARCHIVE] = _zip_bytes(tmp_path, {"Mouse actin/other.tif": _stack()})
    with pytest.raises(DownloadError, match=r"not found in .*other\.tif"):
        fetch(_dataset(None), tmp_path / "root", base_url=base, progress=False)


def test_progress_bar(served):
    _, base, ds, _, _, root = served
    out = io.StringIO()
    fetch(ds, root, base_url=base, progress=True, out=out)
    text = out.getvalue()
    assert text.startswith("\r") and text.endswith("\n") and text.count("\n") == 1
    assert "MB/s" in text and ARCHIVE in text


def test_download_command(served, monkeypatch, capsys):
    _, base, ds, _, _, root = served
    monkeypatch.setitem(download.DATASETS, ds.name, ds)
    from clidim_jax import cli

    argv = ["download", ds.name, f"--root={root}", f"--base_url={base}", "--noprogress"]
    assert cli.main(argv) == 0
    assert capsys.readouterr().out.strip() == str(root / ds.name / NESTED)
    assert cli.main(["download", "nope", f"--root={root}"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("clidim-jax download: error: unknown dataset 'nope'")
    assert "convallaria" in err


def test_registry_and_default_root(monkeypatch, tmp_path):
    assert set(download.DATASETS) >= {"convallaria", "actin", "skull"}
    actin = download.DATASETS["actin"]
    assert actin.url == "https://zenodo.org/records/5156937/files/Mouse%20actin.zip?download=1"
    assert actin.url_for("http://h/x/") == "http://h/x/Mouse%20actin.zip"
    conv = download.DATASETS["convallaria"]
    assert conv.shape == (100, 1024, 1024) and len(conv.sha256 or "") == 64
    assert all("Prakash" in d.credit and d.description for d in download.DATASETS.values())
    monkeypatch.setenv("CLIDIM_JAX_DATA", str(tmp_path))
    assert download.default_root() == tmp_path
    assert locate("skull") is None  # nothing there, no network
    monkeypatch.delenv("CLIDIM_JAX_DATA")
    assert download.default_root() == Path.home() / ".cache" / "clidim_jax" / "datasets"


def test_silent_server_times_out(tmp_path):
    with socket.socket() as s:  # accepts connections (kernel backlog) but never answers
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        t0 = time.monotonic()
        with pytest.raises(DownloadError, match=r"cannot reach .*timed out.*by hand"):
            fetch(_dataset(None), tmp_path, base_url=f"http://127.0.0.1:{port}", timeout=0.5)
        assert time.monotonic() - t0 < 3
