"""Fetches a data set archive over HTTPS, checks its MD5 and unpacks it.

The archive is written to a temporary file next to its destination and renamed only once its
MD5 matches, so an interrupted or tampered download never looks like a good one. Plain HTTP is
refused except on the loopback interface (a local mirror, or a test server).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tarfile
import urllib.parse
import urllib.request
from pathlib import Path

__all__ = ["download_and_extract", "md5sum"]

logger = logging.getLogger(__name__)

_LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def md5sum(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex MD5 digest of a file."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def _check_url(url: str) -> None:
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "https":
        return
    if parsed.scheme == "http" and parsed.hostname in _LOOPBACK:
        return
    raise ValueError(
        f"download url ({url!r}) must use https (plain http is accepted only on 127.0.0.1)"
    )


def download_and_extract(url: str, md5: str, root: str | os.PathLike, timeout: float = 60) -> Path:
    """Downloads ``url`` into ``root``, checks its MD5 and extracts the tar archive there.

    An archive already in ``root`` with the right MD5 is not downloaded again.

    Args:
        url: an https address (http only on the loopback interface).
        md5: expected hex MD5 of the archive.
        root: directory to download into and extract to; created when missing.
        timeout: seconds without data before the download fails.

    Returns:
        The path of the verified archive.

    Raises:
        ValueError: the url is not https, or the downloaded file's MD5 does not match.
        OSError: the download failed (the message names the url).
    """
    _check_url(url)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    archive = root / Path(urllib.parse.urlparse(url).path).name
    if not (archive.is_file() and md5sum(archive) == md5):
        tmp = archive.with_name(archive.name + f".part{os.getpid()}")
        logger.info("downloading %s", url)
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as f:
                shutil.copyfileobj(response, f)
            actual = md5sum(tmp)
            if actual != md5:
                raise ValueError(
                    f"download from {url} has MD5 {actual}, expected {md5}; the file was removed"
                )
            os.replace(tmp, archive)
        except OSError as err:
            raise OSError(f"download from {url} failed: {err}") from err
        finally:
            tmp.unlink(missing_ok=True)
    with tarfile.open(archive) as tar:
        tar.extractall(root, filter="data")
    logger.info("extracted %s into %s", archive.name, root)
    return archive
