"""Downloads the benchmark TIFF stacks (Prakash et al., PN2V benchmark data) from Zenodo.

Standard library only. Layout: ``<root>/<name>/`` holds the archive, the files extracted from it
and a ``SHA256`` record (``"<hex>  <archive>"``). Downloads go to ``<archive>.part`` and resume
with an HTTP ``Range`` request; the archive is renamed into place only after its SHA-256 digest
is verified (against the known digest, or against the ``SHA256`` record of an earlier download
when no digest is known). Every failure the user can act on is a one-line `DownloadError`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import os
import pathlib
import re
import shutil
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from typing import TextIO

ZENODO = "https://zenodo.org/records"
CREDIT = (
    "Prakash et al., PN2V benchmark data (Fully Unsupervised Probabilistic Noise2Void, "
    "ISBI 2020), Zenodo"
)
RECORD_FILE = "SHA256"
USER_AGENT = "clidim-jax-downloader/0.1 (python urllib)"
_CHUNK = 1 << 20  # 1 MiB reads
_PROGRESS_INTERVAL_S = 0.1  # at most ~10 progress updates per second


class DownloadError(Exception):
    """A download problem the user can act on, reported as one line (no traceback)."""


@dataclasses.dataclass(frozen=True)
class Dataset:
    """One benchmark stack: a TIFF inside a zip archive attached to a Zenodo record."""

    name: str
    record: int
    archive: str  # file name of the zip on Zenodo
    tif_name: str  # file name of the stack inside the archive (searched recursively)
    shape: tuple[int, ...]  # (N, H, W) as documented
    sha256: str | None = None  # hex digest of the archive, None when not known
    size_bytes: int | None = None  # approximate archive size (messages only), None if unknown
    description: str = ""
    credit: str = CREDIT

    @property
    def url(self) -> str:
        """The Zenodo download URL of the archive."""
        return f"{ZENODO}/{self.record}/files/{urllib.parse.quote(self.archive)}?download=1"

    @property
    def record_url(self) -> str:
        """The Zenodo record page (for downloading by hand)."""
        return f"{ZENODO}/{self.record}"

    def url_for(self, base_url: str | None = None) -> str:
        """The download URL, or ``{base_url}/{quoted archive}`` when a base URL is given."""
        if base_url is None:
            return self.url
        return f"{base_url.rstrip('/')}/{urllib.parse.quote(self.archive)}"


DATASETS: dict[str, Dataset] = {
    d.name: d
    for d in (
        Dataset(
            name="convallaria",
            record=5156913,
            archive="Convallaria_diaphragm.zip",
            tif_name="20190520_tl_25um_50msec_05pc_488_130EM_Conv.tif",
            shape=(100, 1024, 1024),
            sha256="8a2ac3e2792334c833ee8a3ca449fc14eada18145f9d56fa2cb40f462c2e8909",
            size_bytes=344_000_000,
            description="Convallaria diaphragm, 100 noisy frames of one field, uint16",
        ),
        Dataset(
            name="actin",
            record=5156937,
            archive="Mouse actin.zip",
            tif_name="sample_attempt2.tif",
            shape=(100, 1024, 1024),
            description="Mouse actin, 100 noisy frames of one field",
        ),
        Dataset(
            name="skull",
            record=5156960,
            archive="Mouse skull nuclei.zip",
            tif_name="example2_digital_offset300.tif",
            shape=(200, 512, 512),
            description="Mouse skull nuclei, 200 noisy frames of one field",
        ),
    )
}


def default_root() -> pathlib.Path:
    """``$CLIDIM_JAX_DATA`` if set, else ``~/.cache/clidim_jax/datasets``."""
    env = os.environ.get("CLIDIM_JAX_DATA")
    if env:
        return pathlib.Path(env).expanduser()
    return pathlib.Path.home() / ".cache" / "clidim_jax" / "datasets"


def get_dataset(name: str | Dataset) -> Dataset:
    """Looks a dataset up by name (a `Dataset` passes through); unknown -> `DownloadError`."""
    if isinstance(name, Dataset):
        return name
    try:
        return DATASETS[name]
    except KeyError:
        raise DownloadError(
            f"unknown dataset {name!r}; available: {', '.join(sorted(DATASETS))}"
        ) from None


def _dataset_dir(ds: Dataset, root: str | os.PathLike | None) -> pathlib.Path:
    base = default_root() if root is None else pathlib.Path(root).expanduser()
    return base / ds.name


def locate(name: str | Dataset, root: str | os.PathLike | None = None) -> pathlib.Path | None:
    """The extracted stack TIFF below ``<root>/<name>/`` (searched recursively), or None.

    No network access. Nested folders from the archive (``Mouse actin/Mouse actin/...``) and a
    TIFF placed there by hand are both found.
    """
    ds = get_dataset(name)
    ddir = _dataset_dir(ds, root)
    if not ddir.is_dir():
        return None
    hits = sorted(p for p in ddir.rglob(ds.tif_name) if p.is_file())
    return hits[0] if hits else None


def fetch(
    name: str | Dataset,
    root: str | os.PathLike | None = None,
    *,
    base_url: str | None = None,
    progress: bool = True,
    timeout: float = 30,
    out: TextIO | None = None,
    retries: int = 2,
) -> pathlib.Path:
    """Returns the path of the dataset's stack TIFF, downloading and extracting it if needed.

    Args:
      name: a key of `DATASETS`, or a `Dataset` (e.g. a test entry).
      root: folder holding one sub-folder per dataset; None -> `default_root()`.
      base_url: replaces the Zenodo prefix; the URL becomes ``{base_url}/{quoted archive}``.
      progress: show a one-line progress bar on `out`.
      timeout: seconds for connecting and for each read (no network fails after this).
      out: stream for the progress bar (default: ``sys.stderr``).
      retries: how many times an interrupted transfer is resumed within this call.

    Raises:
      DownloadError: the server cannot be reached, answers with an HTTP error, the transfer
        stays interrupted, the digest does not match, or the archive is unusable.
    """
    ds = get_dataset(name)
    out = sys.stderr if out is None else out
    ddir = _dataset_dir(ds, root)
    found = locate(ds, ddir.parent)
    if found is not None:
        return found

    url = ds.url_for(base_url)
    archive = ddir / ds.archive
    try:
        ddir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DownloadError(f"cannot create {ddir} ({e.strerror or e})") from None

    if archive.is_file():  # downloaded earlier (or placed by hand) but not extracted yet
        _check_existing_archive(ds, archive)
    else:
        part = archive.with_name(archive.name + ".part")
        _download(ds, url, part, ddir, timeout=timeout, progress=progress, out=out, retries=retries)
        _verify_part(ds, part, ddir)
        os.replace(part, archive)
    return _extract(ds, archive, ddir)


# ---------------------------------------------------------------------------------------------
# Download with resume.


class _Interrupted(Exception):
    """The transfer stopped before the announced length (the .part is kept for resuming)."""


def _by_hand(ds: Dataset, ddir: pathlib.Path) -> str:
    return (
        f"Download {ds.archive} by hand from {ds.record_url} and place it in {ddir}/ "
        f"(the archive or the extracted {ds.tif_name}), then run again."
    )


def _download(
    ds: Dataset,
    url: str,
    part: pathlib.Path,
    ddir: pathlib.Path,
    *,
    timeout: float,
    progress: bool,
    out: TextIO,
    retries: int,
) -> None:
    """Fills `part` with the complete archive, resuming a partial one; raises DownloadError."""
    attempt = 0
    while True:
        try:
            _download_once(ds, url, part, ddir, timeout=timeout, progress=progress, out=out)
            return
        except _Interrupted as e:
            if attempt >= retries:
                kept = f"{part} is kept, " if part.is_file() else ""
                raise DownloadError(
                    f"download of {url} interrupted ({e}); {kept}run again to resume"
                ) from None
            attempt += 1


def _parse_content_range(value: str | None) -> tuple[int | None, int | None]:
    """``bytes START-END/TOTAL`` or ``bytes */TOTAL`` -> (START, TOTAL), None where absent."""
    m = re.fullmatch(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)\s*", value or "")
    if not m:
        return None, None
    start = int(m.group(1)) if m.group(1) is not None else None
    total = int(m.group(2)) if m.group(2) != "*" else None
    return start, total


def _open(
    url: str, offset: int, timeout: float, ds: Dataset, ddir: pathlib.Path
) -> tuple[http.client.HTTPResponse | None, str | None]:
    """Opens `url` (with ``Range: bytes=offset-`` when offset > 0); errors -> DownloadError.

    Returns (response, None), or (None, Content-Range header) for HTTP 416 on a resume.
    """
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if offset > 0:
        headers["Range"] = f"bytes={offset}-"
    req = urllib.request.Request(url, headers=headers)
    try:
        return urllib.request.urlopen(req, timeout=timeout), None
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset > 0:
            content_range = e.headers.get("Content-Range") if e.headers else None
            e.close()
            return None, content_range
        e.close()
        raise DownloadError(f"HTTP {e.code} {e.reason} for {url}. {_by_hand(ds, ddir)}") from None
    except urllib.error.URLError as e:
        raise DownloadError(f"cannot reach {url} ({e.reason}). {_by_hand(ds, ddir)}") from None
    except (OSError, http.client.HTTPException) as e:  # timeouts, resets, bad status lines
        reason = str(e) or type(e).__name__
        raise DownloadError(f"cannot reach {url} ({reason}). {_by_hand(ds, ddir)}") from None


def _download_once(
    ds: Dataset,
    url: str,
    part: pathlib.Path,
    ddir: pathlib.Path,
    *,
    timeout: float,
    progress: bool,
    out: TextIO,
) -> None:
    offset = part.stat().st_size if part.is_file() else 0
    resp, content_range = _open(url, offset, timeout, ds, ddir)
    if resp is None:  # 416: nothing left after `offset` -- complete, or a stale .part
        _, total = _parse_content_range(content_range)
        if total == offset:
            return
        part.unlink()
        raise _Interrupted(f"server rejected resuming at byte {offset}; restarting")
    with resp:
        status = resp.status
        length = resp.headers.get("Content-Length")
        length = int(length) if length and length.isdigit() else None
        if status == 206:
            start, total = _parse_content_range(resp.headers.get("Content-Range"))
            if start != offset:  # not the range we asked for: start over
                part.unlink(missing_ok=True)
                raise _Interrupted(f"server resumed at byte {start}, asked for {offset}")
            if total is None and length is not None:
                total = offset + length
            mode = "ab"
        elif status == 200:  # full body: the server ignored Range (or none was sent)
            offset, total, mode = 0, length, "wb"
        else:
            raise DownloadError(f"HTTP {status} {resp.reason} for {url}. {_by_hand(ds, ddir)}")

        bar = _Progress(out, ds.archive, total, offset, enabled=progress)
        done = offset
        try:
            with open(part, mode) as f:
                while True:
                    try:
                        chunk = resp.read(_CHUNK)
                    except (OSError, http.client.HTTPException) as e:
                        raise _Interrupted(
                            f"{type(e).__name__} after {done} of {total or '?'} bytes"
                        ) from None
                    if not chunk:
                        break
                    f.write(chunk)
                    done += len(chunk)
                    bar.update(done)
        finally:
            bar.close(done)
        if total is not None and done < total:
            raise _Interrupted(f"connection closed after {done} of {total} bytes")


class _Progress:
    """A one-line progress bar: bytes done / total, MB/s, ETA; redrawn at most ~10 times/s."""

    def __init__(
        self, out: TextIO, label: str, total: int | None, start: int, *, enabled: bool
    ) -> None:
        self.out, self.label, self.total, self.start = out, label, total, start
        self.enabled = enabled
        self.t0 = time.monotonic()
        self.last = 0.0
        self.drawn = False

    def update(self, done: int, *, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self.last < _PROGRESS_INTERVAL_S:
            return
        self.last = now
        elapsed = max(now - self.t0, 1e-9)
        rate = (done - self.start) / elapsed
        mb = 1e6
        if self.total:
            pct = 100.0 * done / self.total
            text = f"{done / mb:8.1f}/{self.total / mb:.1f} MB ({pct:5.1f}%)"
        else:
            text = f"{done / mb:8.1f} MB"
        text += f"  {rate / mb:6.2f} MB/s"
        if self.total and rate > 0:
            eta = int(max(self.total - done, 0) / rate)
            text += f"  ETA {eta // 3600:d}:{eta // 60 % 60:02d}:{eta % 60:02d}"
        self.out.write(f"\r{self.label}: {text}   ")
        self.out.flush()
        self.drawn = True

    def close(self, done: int) -> None:
        if not self.enabled:
            return
        self.update(done, force=True)
        if self.drawn:
            self.out.write("\n")
            self.out.flush()


# ---------------------------------------------------------------------------------------------
# Verification.


def _sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _read_record(ddir: pathlib.Path, archive: str) -> str | None:
    """The digest recorded for `archive` in ``<ddir>/SHA256``, or None."""
    try:
        text = (ddir / RECORD_FILE).read_text(encoding="utf-8")
    except OSError:
        return None
    for line in text.splitlines():
        fields = line.strip().split(None, 1)
        if len(fields) == 2 and fields[1].lstrip("*") == archive:
            return fields[0].lower()
    return None


def _write_record(ddir: pathlib.Path, archive: str, digest: str) -> None:
    (ddir / RECORD_FILE).write_text(f"{digest}  {archive}\n", encoding="utf-8")


def _expected_digest(ds: Dataset, ddir: pathlib.Path) -> tuple[str | None, str]:
    """(expected digest, where it comes from) -- the known digest, else the SHA256 record."""
    if ds.sha256:
        return ds.sha256.lower(), "the published digest"
    recorded = _read_record(ddir, ds.archive)
    return recorded, f"the digest recorded in {ddir / RECORD_FILE}"


def _verify_part(ds: Dataset, part: pathlib.Path, ddir: pathlib.Path) -> None:
    """Checks the downloaded `part`; a bad one is deleted and reported as DownloadError."""
    actual = _sha256(part)
    expected, source = _expected_digest(ds, ddir)
    if expected is not None and actual != expected:
        part.unlink(missing_ok=True)
        raise DownloadError(
            f"checksum mismatch for {ds.archive}: expected sha256 {expected} ({source}), "
            f"got {actual}; the download was deleted, run again to retry"
        )
    if not zipfile.is_zipfile(part):
        with open(part, "rb") as f:
            head = f.read(60)
        part.unlink(missing_ok=True)
        raise DownloadError(
            f"the file received for {ds.archive} is not a zip archive (starts with {head!r}); "
            f"the download was deleted. {_by_hand(ds, ddir)}"
        )
    _write_record(ddir, ds.archive, actual)


def _check_existing_archive(ds: Dataset, archive: pathlib.Path) -> None:
    """Verifies an archive already in place (kept from an earlier run, or placed by hand)."""
    ddir = archive.parent
    actual = _sha256(archive)
    expected, source = _expected_digest(ds, ddir)
    if expected is not None and actual != expected:
        raise DownloadError(
            f"checksum mismatch for {archive}: expected sha256 {expected} ({source}), "
            f"got {actual}; delete the file and run again"
        )
    if not zipfile.is_zipfile(archive):
        raise DownloadError(f"{archive} is not a zip archive; delete it and run again")
    if expected is None:
        _write_record(ddir, ds.archive, actual)


# ---------------------------------------------------------------------------------------------
# Extraction.


def _safe_target(ddir: pathlib.Path, member: str) -> pathlib.Path | None:
    """Where `member` extracts to below `ddir`, or None if it would land outside."""
    if not member or member.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", member):
        return None
    parts = re.split(r"[/\\]+", member)
    if any(p == ".." for p in parts):
        return None
    target = (ddir / pathlib.PurePosixPath(*[p for p in parts if p not in ("", ".")])).resolve()
    base = ddir.resolve()
    if target != base and base not in target.parents:
        return None
    return target


def _extract(ds: Dataset, archive: pathlib.Path, ddir: pathlib.Path) -> pathlib.Path:
    """Extracts `archive` into `ddir` (rejecting unsafe paths) and returns the stack TIFF."""
    try:
        with zipfile.ZipFile(archive) as zf:
            members = [m for m in zf.infolist() if not m.filename.startswith("__MACOSX/")]
            names = [m.filename for m in members]
            if not any(pathlib.PurePosixPath(n).name == ds.tif_name for n in names):
                files = [n for n in names if not n.endswith("/")]
                shown = ", ".join(files[:20])
                if len(files) > 20:
                    shown += f", ... ({len(files)} files)"
                raise DownloadError(
                    f"{ds.tif_name} not found in {archive}; it contains: {shown or 'nothing'}"
                )
            targets = []
            for m in members:
                target = _safe_target(ddir, m.filename)
                if target is None:
                    raise DownloadError(
                        f"{archive} holds an unsafe path {m.filename!r} (outside {ddir}); "
                        "refusing to extract it"
                    )
                targets.append((m, target))
            for m, target in targets:
                if m.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(target.name + ".extracting")
                with zf.open(m) as src, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst, _CHUNK)
                os.replace(tmp, target)  # a half-written TIFF is never found by `locate`
    except zipfile.BadZipFile as e:
        raise DownloadError(f"{archive} is not a valid zip archive ({e})") from None
    except OSError as e:
        raise DownloadError(f"extracting {archive} failed ({e})") from None
    found = locate(ds, ddir.parent)
    if found is None:  # only if the member name differs in a way rglob does not match
        raise DownloadError(f"{ds.tif_name} was not found in {ddir} after extracting {archive}")
    return found
