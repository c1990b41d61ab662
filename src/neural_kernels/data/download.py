"""Fetching archives: checksum-verified, retried on transient failures, atomic.

``torchvision.datasets.utils.download_url`` verifies md5 only, writes straight to the
final path (a killed transfer leaves a file that looks complete) and never retries, so
this module streams to ``<dest>.part``, checks the length and the digest, and only then
renames the file into place.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import time
import urllib.error
import urllib.request
from pathlib import Path

from tqdm.auto import tqdm

from neural_kernels.data.sources import ARCHIVES
from neural_kernels.errors import ChecksumError, DownloadError, SettingError
from neural_kernels.outputs import DISK_ERRORS, require_space

log = logging.getLogger(__name__)

#: HTTP status codes worth another try: timeouts, rate limits, server hiccups.
TRANSIENT_HTTP_CODES = frozenset({408, 425, 429, 500, 502, 503, 504})
CHUNK_BYTES = 1 << 20
HASH_ALGORITHMS = ("md5", "sha1", "sha256", "sha512")


def parse_checksum(checksum: str) -> tuple[str, str]:
    """Split ``"<algorithm>:<hex digest>"`` (e.g. ``"md5:c58f..."``) into its parts."""
    algorithm, sep, digest = checksum.partition(":")
    algorithm = algorithm.strip().lower()
    digest = digest.strip().lower()
    if not sep or algorithm not in HASH_ALGORITHMS or not digest:
        raise SettingError(
            f"checksum {checksum!r} is not of the form '<algorithm>:<hex digest>' with "
            f"algorithm one of {', '.join(HASH_ALGORITHMS)} (e.g. 'md5:c58f3010...')"
        )
    try:
        int(digest, 16)
    except ValueError:
        raise SettingError(f"checksum {checksum!r}: the digest is not hexadecimal") from None
    expected_len = hashlib.new(algorithm).digest_size * 2
    if len(digest) != expected_len:
        raise SettingError(
            f"checksum {checksum!r}: an {algorithm} digest has {expected_len} hex digits, "
            f"this one has {len(digest)}"
        )
    return algorithm, digest


def file_digest(path: Path, algorithm: str) -> str:
    """Hex digest of a file's bytes, read in 1 MiB chunks."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, algorithm).hexdigest()


def verify_checksum(path: Path, checksum: str) -> bool:
    """True when ``path``'s digest equals ``checksum`` (``"<algorithm>:<hex>"``)."""
    algorithm, expected = parse_checksum(checksum)
    return file_digest(path, algorithm) == expected


def _stream_to(response: http.client.HTTPResponse, part: Path, url: str) -> None:
    """Copy a response body to ``part``; raise ``IncompleteRead`` on a short body."""
    length_header = response.headers.get("Content-Length")
    expected = int(length_header) if length_header is not None else None
    if expected is not None:
        require_space(part.parent, {part.name.removesuffix(".part"): expected}, "download")
    received = 0
    with (
        open(part, "wb") as out,
        tqdm(
            total=expected,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=f"download {Path(part).name.removesuffix('.part')}",
            mininterval=1.0,
        ) as bar,
    ):
        while chunk := response.read(CHUNK_BYTES):
            try:
                out.write(chunk)
            except OSError as error:  # a full disk: no network problem, no retry
                raise OSError(error.errno, error.strerror, str(part)) from None
            received += len(chunk)
            bar.update(len(chunk))
    if expected is not None and received != expected:
        raise http.client.IncompleteRead(b"", expected - received)


def _existing_copy_is_good(dest: Path, algorithm: str, expected: str) -> bool:
    """True when ``dest`` exists with the ``expected`` digest; a wrong copy is removed."""
    if not dest.exists():
        return False
    actual = file_digest(dest, algorithm)
    if actual == expected:
        log.info("%s already present with the expected %s digest", dest, algorithm)
        return True
    log.warning(
        "%s exists but its %s digest is %s, not %s: removing it and downloading again",
        dest,
        algorithm,
        actual,
        expected,
    )
    dest.unlink()
    return False


def _attempt(
    request: urllib.request.Request, part: Path, url: str, dest: Path, timeout: float
) -> str | None:
    """One try at streaming ``url`` to ``part``: ``None`` on success, else the problem.

    Raises:
        DownloadError: an HTTP error that another try cannot fix (e.g. 404).
    """
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            _stream_to(response, part, url)
        return None
    except urllib.error.HTTPError as error:
        if error.code not in TRANSIENT_HTTP_CODES:
            raise DownloadError(
                f"HTTP {error.code} ({error.reason}) for {url}: the address is "
                f"wrong or the file moved. Fix the dataset's 'url' in the config, "
                f"or put a copy of the archive at {dest} and rerun."
            ) from None
        return f"HTTP {error.code} ({error.reason})"
    except http.client.IncompleteRead as error:
        return f"transfer cut short ({error.expected} bytes missing)"
    except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as error:
        if getattr(error, "errno", None) in DISK_ERRORS:
            raise  # the CLI words it (outputs.disk_error_message); retrying cannot help
        reason = getattr(error, "reason", error)
        return f"network error: {reason}"


def _fetch_with_retries(
    request: urllib.request.Request,
    part: Path,
    url: str,
    dest: Path,
    *,
    retries: int,
    timeout: float,
    backoff: float,
) -> None:
    """Stream ``url`` to ``part``, retrying transient failures with exponential backoff.

    Raises:
        DownloadError: a permanent HTTP error, or every one of ``retries + 1`` tries failed.
    """
    last_problem = "no attempt made"
    for attempt in range(1, retries + 2):
        problem = _attempt(request, part, url, dest, timeout)
        if problem is None:
            return
        last_problem = problem
        if attempt <= retries:
            wait = backoff * 2 ** (attempt - 1)
            log.warning(
                "attempt %d/%d for %s failed (%s); retrying in %.1f s",
                attempt,
                retries + 1,
                url,
                last_problem,
                wait,
            )
            time.sleep(wait)
    raise DownloadError(
        f"could not download {url} to {dest} after {retries + 1} attempts; last "
        f"problem: {last_problem}. Check the network (or the 'url' in the config) "
        f"and rerun, or put a copy of the archive at {dest}."
    )


def _verify_and_move(part: Path, dest: Path, url: str, algorithm: str, expected: str) -> None:
    """Rename ``part`` to ``dest`` if its digest is ``expected``.

    Raises:
        ChecksumError: the digest differs (``part`` is left for the caller to remove).
    """
    actual = file_digest(part, algorithm)
    if actual != expected:
        raise ChecksumError(
            f"checksum mismatch for {dest} downloaded from {url}: expected {algorithm} "
            f"{expected}, got {actual} ({part.stat().st_size} bytes). The file was "
            f"removed. Rerun to download it again; if the archive was replaced "
            f"upstream, set the dataset's 'checksum' in the config."
        )
    os.replace(part, dest)


def download_file(
    url: str,
    dest: Path | str,
    checksum: str,
    *,
    retries: int = 3,
    timeout: float = 60.0,
    backoff: float = 2.0,
) -> Path:
    """Download ``url`` to ``dest`` and verify it against ``checksum``.

    An existing ``dest`` with the right digest is kept (no network access), so an
    archive copied in by hand is used as is. Transient failures (connection errors,
    timeouts, HTTP 408/429/5xx, a body shorter than its ``Content-Length``) are retried
    ``retries`` times with exponential ``backoff`` seconds. Nothing but a verified file
    is ever left at ``dest``; the partial ``<dest>.part`` is removed on any failure.

    Raises:
        ChecksumError: the downloaded bytes do not match ``checksum``.
        DownloadError: HTTP error, unreachable host, or every attempt truncated.
    """
    dest = Path(dest)
    algorithm, expected = parse_checksum(checksum)
    if _existing_copy_is_good(dest, algorithm, expected):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    request = urllib.request.Request(url, headers={"User-Agent": "neural-kernels"})
    try:
        _fetch_with_retries(
            request, part, url, dest, retries=retries, timeout=timeout, backoff=backoff
        )
        _verify_and_move(part, dest, url, algorithm, expected)
    finally:
        part.unlink(missing_ok=True)
    log.info("downloaded %s (%s %s)", dest, algorithm, expected)
    return dest


def download_source(
    out: str,
    source: str | None = None,
    url: str | None = None,
    checksum: str | None = None,
    *,
    retries: int = 3,
    timeout: float = 60.0,
) -> Path:
    """The ``download`` command: ``url`` and ``checksum`` default to those of the
    registered ``source``; an ``out`` ending in ``/`` (or an existing directory) gets
    the source's file name (or the URL's)."""
    if source and source not in ARCHIVES:
        raise SettingError(f"no archive source {source!r}; choose one of {', '.join(ARCHIVES)}")
    archive = ARCHIVES[source] if source else None
    url = url or (archive.url if archive else None)
    checksum = checksum or (archive.checksum if archive else None)
    if url is None or checksum is None:
        raise SettingError("give --source, or both --url and --checksum")
    dest = Path(out)
    if out.endswith("/") or dest.is_dir():
        dest = dest / (archive.filename if archive else Path(url).name)
    return download_file(url, dest, checksum, retries=retries, timeout=timeout)
