"""Downloading and unpacking dataset archives: resumable, checksum-verified, with offline errors
that name the file and its address."""

from __future__ import annotations

import hashlib
import tarfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from tqdm import tqdm

from segtrain.errors import DataError
from segtrain.progress import progress_enabled

CHUNK = 1 << 20


def md5sum(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(path: Path, md5: str | None) -> None:
    if md5 is None:
        return
    actual = md5sum(path)
    if actual != md5:
        raise DataError(f"{path} has MD5 {actual}, expected {md5}: the file is corrupt or a different release; "
                        "delete it and download again (or pass --skip-checksum for an archive you built yourself)")


def download(url: str, dest: Path, md5: str | None, progress: bool = True, timeout: float = 30.0) -> Path:
    """Fetch `url` to `dest`, resuming a `.part` file left by an interrupted download."""
    if dest.is_file():
        verify(dest, md5)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    offset = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:  # the .part file is already complete
            part.rename(dest)
            verify(dest, md5)
            return dest
        raise DataError(f"cannot download {dest.name} from {url}: HTTP {exc.code}. Download it yourself and pass "
                        f"its folder with --archives DIR") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DataError(f"cannot download {dest.name} from {url} ({reason}). Without internet, download it "
                        f"elsewhere and pass its folder with --archives DIR") from None
    with response:
        if offset and response.status != 206:  # the server ignored Range: start over
            offset = 0
        total = response.headers.get("Content-Length")
        total = int(total) + offset if total is not None else None
        with open(part, "ab" if offset else "wb") as handle, tqdm(
            total=total, initial=offset, unit="B", unit_scale=True, desc=dest.name,
            disable=not progress_enabled(progress),
        ) as bar:
            for block in iter(lambda: response.read(CHUNK), b""):
                handle.write(block)
                bar.update(len(block))
    part.rename(dest)
    verify(dest, md5)
    return dest


def extract(archive: Path, dest: Path) -> None:
    """Unpack a tar or zip archive into `dest`, refusing members that would land outside it."""
    dest.mkdir(parents=True, exist_ok=True)
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zipped:
                root = dest.resolve()
                for member in zipped.namelist():
                    if not (dest / member).resolve().is_relative_to(root):
                        raise DataError(f"{archive} contains an unsafe path: {member}")
                zipped.extractall(dest)
        else:
            with tarfile.open(archive) as tarred:
                tarred.extractall(dest, filter="data")
    except (tarfile.TarError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"cannot unpack {archive}: {exc}; the archive is damaged, delete it and fetch it "
                        "again") from None
