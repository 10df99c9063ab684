"""Fetch item images (URLs from the raw Amazon 2023 reader) into a local folder.

Each image goes to ``<out>/<quoted item id><ext>``: written to a ``.part``
file first and renamed when complete, so an interrupted run leaves no
half-written image and a rerun skips what already exists (resumable).
Transient failures (connection errors, timeouts, HTTP 408/429/5xx) are retried
with exponential backoff; other HTTP errors (404, 403, ...) fail at once.
Downloads run in a thread pool (the work is network-bound). Uses the standard
library's ``urllib``: a plain GET needs no extra dependency.
"""
from __future__ import annotations

import os
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from http.client import HTTPException
from pathlib import Path

from tqdm import tqdm

from megarec.config import ConfigError
from megarec.data.domain import DataError, Domain

RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
USER_AGENT = "megarec-download-images/1"


@dataclass
class DownloadReport:
    """Counts of one run; ``failures`` holds ``(item id, url, reason)``."""

    downloaded: int = 0
    skipped: int = 0          # already on disk
    no_url: int = 0           # item without an http(s) image URL
    failures: list[tuple[str, str, str]] = field(default_factory=list)

    @property
    def failed(self) -> int:
        return len(self.failures)

    def as_dict(self) -> dict[str, int]:
        return {"downloaded": self.downloaded, "skipped": self.skipped, "failed": self.failed, "no_url": self.no_url}


def image_filename(item_id: str, url: str) -> str:
    """File name for an item's image: the URL-quoted item id plus the URL's extension (default ``.jpg``)."""
    ext = os.path.splitext(urllib.parse.urlparse(url).path)[1].lower()
    if not ext or len(ext) > 5 or not ext[1:].isalnum():
        ext = ".jpg"
    return urllib.parse.quote(item_id, safe="") + ext


def _is_url(value: str | None) -> bool:
    return bool(value) and urllib.parse.urlparse(str(value)).scheme in ("http", "https")


def fetch(url: str, dest: Path, *, retries: int = 4, backoff: float = 0.5, timeout: float = 30.0) -> None:
    """Download ``url`` to ``dest`` via ``dest.part`` + rename; raise ``OSError`` after the last try."""
    part = dest.with_name(dest.name + ".part")
    for attempt in range(retries + 1):
        try:
            req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
            with urllib.request.urlopen(req, timeout=timeout) as resp, open(part, "wb") as out:
                shutil.copyfileobj(resp, out)
            if part.stat().st_size == 0:
                raise urllib.error.URLError("empty response")
            os.replace(part, dest)
            return
        except urllib.error.HTTPError as e:
            part.unlink(missing_ok=True)
            if e.code not in RETRY_STATUS or attempt == retries:
                raise OSError(f"HTTP {e.code} {e.reason}") from e
        except (urllib.error.URLError, HTTPException, TimeoutError, ConnectionError) as e:
            part.unlink(missing_ok=True)
            if attempt == retries:
                raise OSError(str(getattr(e, "reason", e))) from e
        time.sleep(backoff * 2 ** attempt)


def download_images(domain: Domain, out_dir: str | Path, *, workers: int = 8, retries: int = 4,
                    backoff: float = 0.5, timeout: float = 30.0, progress: bool = True) -> DownloadReport:
    """Fetch every item's image URL into ``out_dir``; files already there are skipped."""
    if domain.item_image is None:
        raise DataError(f"domain {domain.name!r} ({domain.source or 'no source'}) has no image URLs; "
                        "only raw Amazon 2023 meta files carry them")
    if workers < 1 or retries < 0 or backoff < 0 or timeout <= 0:
        raise ConfigError(f"download-images needs workers >= 1, retries >= 0, backoff >= 0 and timeout > 0; got "
                          f"workers={workers}, retries={retries}, backoff={backoff}, timeout={timeout}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = DownloadReport()
    todo: list[tuple[str, str, Path]] = []
    for iid, url in zip(domain.item_ids, domain.item_image):
        if not _is_url(url):
            report.no_url += 1
            continue
        dest = out / image_filename(iid, str(url))
        if dest.is_file():
            report.skipped += 1
        else:
            todo.append((iid, str(url), dest))

    def one(job: tuple[str, str, Path]) -> tuple[str, str, str | None]:
        iid, url, dest = job
        try:
            fetch(url, dest, retries=retries, backoff=backoff, timeout=timeout)
            return iid, url, None
        except OSError as e:
            return iid, url, str(e)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for iid, url, err in tqdm(pool.map(one, todo), total=len(todo), desc=f"images {domain.name}",
                                  disable=not progress or not todo):
            if err is None:
                report.downloaded += 1
            else:
                report.failures.append((iid, url, err))
    return report


def with_local_images(domain: Domain, out_dir: str | Path) -> Domain:
    """The domain with each image URL replaced by its downloaded file (``None`` where absent)."""
    if domain.item_image is None:
        return domain
    out = Path(out_dir)
    local: list[str | None] = []
    for iid, url in zip(domain.item_ids, domain.item_image):
        path = out / image_filename(iid, str(url)) if _is_url(url) else None
        local.append(str(path) if path is not None and path.is_file() else None)
    return replace(domain, item_image=local)
